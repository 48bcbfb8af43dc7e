"""The science helpers: ROIs and their groups, paths, ROI masks, fMRI and images, splits and
folds, the image cache, AlexNet and feature extraction.

Scripts import this module; it never imports a script. Every path is built from a
``root`` folder given by the caller, so nothing here depends on the working directory.
The safeguards (atomic writes, safe loading, settings checks) are in safe_io.py, the
command-line options in options.py.
"""

import glob
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import options
import safe_io

# Imported on first use, so that a script's --help answers before torch loads.
torch = options.lazy_import("torch")

# The version of what checkpoints and results mean: their format and the protocol that made
# them. Every checkpoint and result records it, and one of another version is refused
# (safe_io.check_same_settings) rather than mixed with new ones. Raise it whenever a change
# makes an earlier checkpoint or result read differently or hold other numbers.
# 2: checkpoints record the method (not the kind); results record the engine precision.
FORMAT_VERSION = 2

# --- ROIs ------------------------------------------------------------------------------

ROI_CLASSES = {
    "prf-visualrois": ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"],
    "floc-bodies": ["EBA", "FBA-1", "FBA-2", "mTL-bodies"],
    "floc-faces": ["OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"],
    "floc-places": ["OPA", "PPA", "RSC"],
    "floc-words": ["OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"],
    "streams": ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"],
}
ROIS = [roi for rois in ROI_CLASSES.values() for roi in rois]
ROI_CLASS = {roi: cls for cls, rois in ROI_CLASSES.items() for roi in rois}
# The integer code of each ROI inside its class mask (0 means "Unknown").
ROI_CODE = {roi: i + 1 for rois in ROI_CLASSES.values() for i, roi in enumerate(rois)}
# The authors' ROI groups (their cross-subject averages, cs_heatmap_avgs): early = the pRF
# visual ROIs, higher = the category ROIs, anatomical = the streams, all = every ROI. The
# summaries, transfer matrices, figures and landscapes all use these.
ROI_GROUPS = {
    "all": list(ROIS),
    "early": list(ROI_CLASSES["prf-visualrois"]),
    "higher": [r for c in ("floc-bodies", "floc-faces", "floc-places", "floc-words") for r in ROI_CLASSES[c]],
    "anatomical": list(ROI_CLASSES["streams"]),
}
# ROIs (pooled models: subjects) with fewer voxels are not trained, pooled, fitted or
# exported. The authors' current code takes every ROI with a voxel (1); 20 reproduces the
# paper's 2024 figures. Every script's MIN_VOXELS option defaults to this.
MIN_VOXELS = 1
# The authors' minimum of the MI bound's target subject and of the subject models' probes
# (random-rois-list draws among ROIs with more voxels than this).
ANALYSIS_MIN_VOXELS = 20
HEMISPHERES = ("lh", "rh")
N_SUBJECTS = 8
N_FSAVERAGE_VERTICES = 163842

# --- AlexNet ---------------------------------------------------------------------------

LAYERS = [
    "features.2", "features.5", "features.7", "features.9", "features.12",
    "classifier.2", "classifier.5", "classifier.6",
]
# Flattened sizes at the default 224 x 224 input (see layer_dims for other sizes).
LAYER_DIMS = {
    "features.2": 64 * 27 * 27, "features.5": 192 * 13 * 13, "features.7": 384 * 13 * 13,
    "features.9": 256 * 13 * 13, "features.12": 256 * 6 * 6,
    "classifier.2": 4096, "classifier.5": 4096, "classifier.6": 1000,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
IMAGENET_WEIGHTS_URL = "https://download.pytorch.org/models/" + IMAGENET_WEIGHTS_FILE


# --- Paths -----------------------------------------------------------------------------

def subj_dir(subj):
    """Folder name of a subject: 1 -> 'Subj1'."""
    return f"Subj{int(subj)}"


def hemi_code(hemisphere):
    """Normalise a hemisphere name ('left', 'lh', 'right', 'rh') to 'lh' or 'rh'."""
    h = str(hemisphere).lower()
    if h in ("left", "lh", "l"):
        return "lh"
    if h in ("right", "rh", "r"):
        return "rh"
    raise safe_io.UserError(f"unknown hemisphere {hemisphere!r}: use 'left' or 'right'")


def check_roi(roi):
    """Return ``roi`` if it is one of the 31 ROI names, else raise a UserError listing them."""
    if roi not in ROI_CLASS:
        raise safe_io.UserError(f"unknown ROI {roi!r}: valid names are {', '.join(ROIS)}")
    return roi


def roi_group(roi):
    """The group of ROI_GROUPS other than 'all' that holds ``roi``: 'early', 'higher' or 'anatomical'."""
    return next(g for g, members in ROI_GROUPS.items() if g != "all" and check_roi(roi) in members)


def fmri_path(root, subj, hemisphere):
    h = hemi_code(hemisphere)
    return Path(root) / "training_fmri" / subj_dir(subj) / f"subj{int(subj)}_{h}_training_fmri.npy"


def images_dir(root, subj):
    return Path(root) / "training_images" / subj_dir(subj)


def roi_masks_dir(root, subj):
    return Path(root) / "roi_masks" / subj_dir(subj)


def roi_mask_path(root, subj, hemisphere, roi_class):
    return roi_masks_dir(root, subj) / f"{hemi_code(hemisphere)}.{roi_class}_challenge_space.npy"


def roi_mapping_path(root, subj, roi_class):
    return roi_masks_dir(root, subj) / f"mapping_{roi_class}.npy"


def fsaverage_mask_path(root, subj, hemisphere):
    return roi_masks_dir(root, subj) / f"{hemi_code(hemisphere)}.all-vertices_fsaverage_space.npy"


def voxel_roi_mapping_path(root, subj, hemisphere):
    h = hemi_code(hemisphere)
    return Path(root) / "voxel_roi_mappings" / subj_dir(subj) / f"subj{int(subj)}_{h}_voxel_roi_mappings.joblib"


def cl_model_path(root, subj, hemisphere, roi, epochs):
    h = hemi_code(hemisphere)
    return Path(root) / "cl_models" / subj_dir(subj) / f"subj{int(subj)}_{h}_{roi}_model_e{int(epochs)}.pt"


def pooled_model_path(root, hemisphere, roi, epochs, h_method):
    if h_method not in ("const", "avg"):
        raise safe_io.UserError(f"unknown H_METHOD {h_method!r}: use 'const' or 'avg'")
    return Path(root) / "cl_models" / f"{hemi_code(hemisphere)}_{roi}_pooled_model_e{int(epochs)}_h{h_method}.pt"


def reg_model_path(root, subj, hemisphere, roi, epochs):
    h = hemi_code(hemisphere)
    return (Path(root) / "baseline_models" / "nn_reg" / subj_dir(subj)
            / f"subj{int(subj)}_{h}_{roi}_reg_model_e{int(epochs)}.pt")


def encoding_dir(root, subj):
    return Path(root) / "encoding_results" / subj_dir(subj)


def results_dir(root):
    return Path(root) / "results"


def classification_preds_dir(root):
    return Path(root) / "classification_preds"


def cache_dir(root):
    """Where derived caches (decoded images) live; safe to delete."""
    return Path(root) / "cache"


def find_subjects(root):
    """Subjects (ints, sorted) that have a folder under ``root/roi_masks``."""
    masks = safe_io.require_dir(Path(root) / "roi_masks", "put the Algonauts roi_masks/SubjX folders there (see README)")
    subjects = sorted(int(p.name[4:]) for p in masks.iterdir() if p.is_dir() and p.name[:4] == "Subj" and p.name[4:].isdigit())
    if not subjects:
        raise safe_io.UserError(f"no SubjX folders in {masks}: put the Algonauts roi_masks/SubjX folders there (see README)")
    return subjects


# --- ROI masks -------------------------------------------------------------------------

MASKS_FIX = "copy the Algonauts roi_masks folder for this subject (see README)"


def load_label_file(path):
    """A 1-D numeric mask file (ROI labels or the fsaverage 0/1 mask), with one-line errors."""
    labels = safe_io.load_npy(safe_io.require_file(path, MASKS_FIX), "re-" + MASKS_FIX)
    if labels.ndim != 1:
        raise safe_io.UserError(f"{path} has shape {labels.shape}: expected one value per vertex; re-{MASKS_FIX}")
    return labels


def load_roi_mask(root, subj, hemisphere, roi_class):
    """Integer label per challenge-space vertex, shape (n_vertices,)."""
    return load_label_file(roi_mask_path(root, subj, hemisphere, roi_class))


def load_roi_mapping(root, subj, roi_class):
    """Dict code -> ROI name of one class (code 0 is 'Unknown')."""
    return safe_io.load_mapping_file(safe_io.require_file(roi_mapping_path(root, subj, roi_class), MASKS_FIX))


def n_vertices(root, subj, hemisphere):
    """Number of challenge-space vertices of a hemisphere (from the fsaverage mask)."""
    return int(load_label_file(fsaverage_mask_path(root, subj, hemisphere)).sum())


def roi_voxel_indices(root, subj, hemisphere, roi):
    """Sorted indices (int64) of the challenge-space vertices inside ``roi``; empty if absent."""
    roi_class = ROI_CLASS[check_roi(roi)]
    mapping = load_roi_mapping(root, subj, roi_class)
    codes = [code for code, name in mapping.items() if name == roi]
    mask = load_roi_mask(root, subj, hemisphere, roi_class)
    return np.flatnonzero(np.isin(mask, codes)).astype(np.int64)


def roi_voxel_count(root, subj, hemisphere, roi):
    return len(roi_voxel_indices(root, subj, hemisphere, roi))


# --- fMRI and images -------------------------------------------------------------------

def load_fmri(root, subj, hemisphere, voxels=None):
    """Training fMRI of one hemisphere, float32 (n_images, n_vertices), or its ``voxels`` columns.

    The width is checked against the subject's fsaverage mask; NaN or Inf in the columns
    read is a UserError naming the first bad row and column.
    """
    path = safe_io.require_file(fmri_path(root, subj, hemisphere),
                        "place the Algonauts training_fmri files there (see README)")
    fmri = safe_io.load_npy(path, "re-copy the Algonauts training_fmri file", mmap_mode="r")
    if fmri.ndim != 2:
        raise safe_io.UserError(f"{path} has shape {fmri.shape}: expected 2-D (n_images, n_vertices)")
    expected = n_vertices(root, subj, hemisphere)
    if fmri.shape[1] != expected:
        raise safe_io.UserError(f"{path} has {fmri.shape[1]} columns but the roi_masks of {subj_dir(subj)} "
                        f"have {expected} {hemi_code(hemisphere)} vertices: use the matching masks")
    out = np.ascontiguousarray(fmri if voxels is None else fmri[:, voxels], dtype=np.float32)
    bad = safe_io.first_nonfinite(out)
    if bad is not None:
        row, col = bad
        column = col if voxels is None else int(np.asarray(voxels)[col])
        raise safe_io.UserError(f"{path} has a non-finite value ({out[row, col]}) at row {row}, column {column}: "
                        "fMRI responses must be numbers; fix or re-copy the file")
    return out


def list_images(root, subj):
    """Sorted PNG paths of a subject; their order is the fMRI row order (checked: safe_io.check_image_numbers)."""
    d = safe_io.require_dir(images_dir(root, subj), "place the Algonauts training_images there (see README)")
    paths = sorted(p for p in d.iterdir() if p.suffix.lower() == ".png")
    if not paths:
        raise safe_io.UserError(f"no .png images in {d}: place the Algonauts training_images there (see README)")
    safe_io.check_image_numbers(paths)
    return paths


def nsd_ids(paths):
    """The NSD image ids in Algonauts file names (``train-0001_nsd-00013.png`` -> 13): int64 (n,)."""
    ids = []
    for p in paths:
        m = re.search(r"_nsd-(\d+)", Path(p).name)
        if m is None:
            raise safe_io.UserError(f"{p} has no NSD id in its name: Algonauts images are named like train-0001_nsd-00013.png")
        ids.append(int(m.group(1)))
    return np.asarray(ids, dtype=np.int64)


def check_counts(n_images, fmri, what):
    if fmri.shape[0] != n_images:
        raise safe_io.UserError(f"{what} has {fmri.shape[0]} rows but there are {n_images} images: "
                        "fMRI rows and images must match one to one")


def decode_image(path, image_size):
    """Decode one image as RGB, squash-resize to (image_size, image_size): uint8 (S, S, 3).

    Identical to torchvision's ``Resize((S, S))`` on a PIL image (bilinear, antialiased).
    """
    from PIL import Image
    return np.asarray(safe_io.read_image(path).resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)


def file_key(paths, *extra):
    """A 16-hex-digit key of ``extra`` and the names, sizes and mtimes of ``paths``: a cache built from
    those files is rebuilt when one changes. A missing file (a dangling link) is a UserError naming it."""
    h = hashlib.sha1("|".join(map(str, extra)).encode())
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise safe_io.UserError(f"cannot read {p} ({e.strerror}; a dangling or looping link?): "
                                    "replace or remove it") from None
        h.update(f"{Path(p).name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def image_cache(paths, image_size, cache_folder, name="images", workers=None, decode=decode_image):
    """Decode and resize every image once into a memory-mapped uint8 (n, S, S, 3) ``.npy``.

    The file name holds a key of the file names, sizes, mtimes and image size, so a
    changed image list builds a new cache; older caches of the same ``name`` are removed,
    and a damaged one (truncated) is rebuilt. The disk space is checked and reserved first.

    Parameters
    ----------
    paths : list of path-like, image files in row order.
    image_size : int, side of the square output.
    cache_folder : path-like, where the cache lives.
    name : str, prefix of the cache file.
    decode : function (path, image_size) -> uint8 (S, S, 3); default the squash resize
        of decode_image (the probes pass a resize + centre crop).

    Returns
    -------
    images : np.memmap uint8, shape (n, image_size, image_size, 3), read-only.
    """
    paths = [Path(p) for p in paths]
    cache_folder = Path(cache_folder)
    target = cache_folder / f"{name}_s{image_size}_{file_key(paths, image_size)}.npy"
    shape = (len(paths), image_size, image_size, 3)
    cached = safe_io.cached_array(target, shape, np.uint8)
    if cached is not None:
        return cached
    for old in cache_folder.glob(f"{glob.escape(name)}_s{image_size}_*.npy"):
        old.unlink()
    safe_io.remove_stale_temps(cache_folder, f"{glob.escape(name)}_s{image_size}_*.npy")
    cache_folder.mkdir(parents=True, exist_ok=True)
    safe_io.check_free_space(target, np.prod(shape), "the image cache", "or lower --image-size")
    with safe_io.atomic_path(target) as tmp:
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            # The new file is sparse: a write into its memory map on a full disk kills the
            # process with SIGBUS. Reserving every block first turns that into an OSError here.
            if hasattr(os, "posix_fallocate"):
                with open(tmp, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise safe_io.UserError(f"cannot write the image cache {target} ({e.strerror or e}): it needs "
                            f"{np.prod(shape) / 2**30:.2f} GiB free there; free disk space") from None
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            decoded = pool.map(lambda p: decode(p, image_size), paths)
            for i, im in enumerate(options.progress(decoded, f"caching {name}", total=len(paths), log="end")):
                out[i] = im
        out.flush()
        del out
    return np.load(target, mmap_mode="r")


def subject_images(root, subj, image_size):
    """The cached uint8 images (n, S, S, 3) of a subject, in fMRI row order."""
    return image_cache(list_images(root, subj), image_size, cache_dir(root), name=f"{subj_dir(subj)}")


def normalize_images(batch, device=None):
    """uint8 (B, S, S, 3) array or tensor -> float32 (B, 3, S, S) ImageNet-normalised on ``device``.

    The permuted NHWC tensor is already channels_last, which is what CUDA convolutions want.
    """
    x = torch.as_tensor(np.asarray(batch) if not torch.is_tensor(batch) else batch)
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    # (x / 255 - mean) / std as one in-place scale and shift: 2.5x faster on the CPU.
    scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=x.device).view(1, 3, 1, 1)
    return x.mul_(scale).sub_(shift)


class SubjectData:
    """Images and fMRI of one subject and hemisphere, restricted to some voxels.

    Attributes
    ----------
    images : np.memmap uint8 (n, S, S, 3), the image cache, rows in sorted file order.
    fmri : np.ndarray float32 (n, n_voxels), row i is the response to image i.
    voxels : np.ndarray int64 (n_voxels,), challenge-space indices of the columns.
    train, test : np.ndarray int64, the seeded 85/15 split of the rows.
    """

    def __init__(self, root, subj, hemisphere, voxels=None, image_size=224):
        self.subj, self.hemisphere, self.image_size = int(subj), hemi_code(hemisphere), image_size
        paths = list_images(root, subj)
        fmri = load_fmri(root, subj, hemisphere, voxels)
        check_counts(len(paths), fmri, str(fmri_path(root, subj, hemisphere)))
        self.fmri = fmri
        self.voxels = np.arange(fmri.shape[1]) if voxels is None else np.asarray(voxels, dtype=np.int64)
        self.image_paths = paths
        self.images = image_cache(paths, image_size, cache_dir(root), name=subj_dir(subj))
        self.train, self.test = train_test_split(len(paths))

    def __len__(self):
        return len(self.image_paths)


def iterate_batches(images, fmri, indices, batch_size, device, shuffle=False, generator=None):
    """Yield (normalised images (B, 3, S, S), fMRI (B, V)) tensors on ``device``.

    Rows come from the uint8 cache, so no PNG is decoded; with ``shuffle`` the order of
    ``indices`` is permuted by ``generator`` each call. ``fmri`` may be None.
    """
    indices = np.asarray(indices)
    if shuffle:
        indices = indices[torch.randperm(len(indices), generator=generator).numpy()]
    pin = torch.device(device).type == "cuda"
    for start in range(0, len(indices), batch_size):
        idx = np.sort(indices[start:start + batch_size]) if not shuffle else indices[start:start + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(images[idx]))
        y = None if fmri is None else torch.from_numpy(np.ascontiguousarray(fmri[idx]))
        if pin:
            x = x.pin_memory()
            y = None if y is None else y.pin_memory()
        yield normalize_images(x, device), (None if y is None else y.to(device, non_blocking=True))


# --- Splits ----------------------------------------------------------------------------

def train_test_split(n, train_fraction=0.85, seed=0):
    """The seeded split of the protocol (README): perm = randperm(n, seed); train = perm[:int(0.85 n)].

    Returns
    -------
    train, test : np.ndarray int64, disjoint, covering range(n).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    cut = int(train_fraction * n)
    return perm[:cut].astype(np.int64), perm[cut:].astype(np.int64)


def cv_folds(train, n_folds=5):
    """Contiguous folds inside ``train``: fold k validates on train[k v:(k+1) v], v = int(len/n_folds).

    Returns
    -------
    folds : list of (fit_indices, val_indices) np.ndarray int64 pairs. Rows past
        n_folds * v are never validated on and always fitted on.
    """
    train = np.asarray(train, dtype=np.int64)
    v = int(len(train) / n_folds)
    if v < 1:
        raise safe_io.UserError(f"{len(train)} training images cannot make {n_folds} folds: use fewer folds or more images")
    folds = []
    for k in range(n_folds):
        val = train[k * v:(k + 1) * v]
        fit = np.concatenate([train[:k * v], train[(k + 1) * v:]])
        folds.append((fit, val))
    return folds


# --- Devices and AlexNet ---------------------------------------------------------------

def resolve_device(name):
    """'auto' -> cuda when available else cpu; 'cpu', 'cuda', 'cuda:N' or 'mps' where available, else a UserError."""
    name = str(name).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise safe_io.UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device.type]:
        raise safe_io.UserError(f"device {name!r} asked for but {device.type.upper()} is not available here: "
                                "use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise safe_io.UserError(f"device {name!r} asked for but this machine has {torch.cuda.device_count()} "
                                "CUDA device(s): use --device cuda")
    return device


PRECISIONS = ("fp32", "bf16")
# The encoding engine's eigensolver: fp64 (exact), or mixed (float32 eigendecomposition refined in
# float64; for GPUs whose float64 is slow). encoding.top_eigenpairs implements both.
ENGINE_PRECISIONS = ("fp64", "mixed")


def check_precision(precision):
    if precision not in PRECISIONS:
        raise safe_io.UserError(f"unknown precision {precision!r}: use fp32 (the authors') or bf16")
    return precision


def autocast(device, precision="fp32"):
    """The context of training and feature extraction: plain fp32 (the authors'), or bf16 autocast on any device.

    bf16 rounds activations to 8 significant bits; features feed PCA, ridge, probes and
    the MI critic directly, and training follows its gradients, so fp32 is the default;
    bf16 is faster on a GPU.
    """
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16")


def imagenet_weights_path():
    """Where torchvision keeps the ImageNet AlexNet weights ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_WEIGHTS_FILE


def load_alexnet(weights="imagenet", seed=0):
    """A torchvision AlexNet in eval mode.

    Parameters
    ----------
    weights : 'imagenet' (torchvision's IMAGENET1K_V1 file, which must already be in the
        torch cache: nothing is downloaded), 'none' (seeded random initialisation), or the
        path of an AlexNet state dict.
    seed : int, the seed of the random initialisation.
    """
    from torchvision.models import alexnet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = alexnet(weights=None)
    if str(weights).lower() == "none":
        return model.eval()
    if str(weights).lower() == "imagenet":
        path = imagenet_weights_path()
        if not path.is_file():
            raise safe_io.UserError(f"ImageNet AlexNet weights not found at {path}: download {IMAGENET_WEIGHTS_URL} "
                            "to that path (or set TORCH_HOME), or use --weights none for random weights")
    else:
        path = Path(weights)
    state = safe_io.load_state_dict_file(path, "AlexNet weights")
    safe_io.check_state_dict(path, state, model.state_dict(),
                             "it is not an AlexNet state dict; pass a torchvision AlexNet state dict")
    bad = safe_io.nonfinite_tensor(state)
    if bad is not None:
        raise safe_io.UserError(f"AlexNet weights {path} hold NaN or Inf ({bad}): re-download or re-create the file")
    model.load_state_dict(state)
    return model.eval()


def layer_dims(image_size=224):
    """Flattened size of each of LAYERS for a square input of side ``image_size``."""
    if image_size == 224:
        return dict(LAYER_DIMS)
    with torch.no_grad():
        feats = feature_extractor(load_alexnet("none"))(torch.zeros(1, 3, image_size, image_size))
    return {k: int(v[0].numel()) for k, v in feats.items()}


def feature_extractor(alexnet, layers=LAYERS):
    """torchvision ``create_feature_extractor`` over ``layers`` of an AlexNet (eval mode)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    return create_feature_extractor(alexnet.eval(), return_nodes=list(layers))


def iter_features(alexnet, images, batch_size=256, device="cpu", layers=LAYERS, indices=None, precision="fp32"):
    """One forward pass per batch through all ``layers`` at once.

    Parameters
    ----------
    alexnet : torchvision AlexNet (or the ``alexnet`` of a tuned model).
    images : uint8 array (n, S, S, 3), e.g. the image cache.
    indices : optional rows of ``images`` to use, in order.
    precision : 'fp32' (default, as the authors) or 'bf16' (see autocast).

    Yields
    ------
    (start, feats) : start row of the batch, and dict layer -> float32 tensor (B, d_layer) on ``device``.
    """
    device = torch.device(device)
    extractor = feature_extractor(alexnet, layers).to(device)
    if device.type == "cuda":
        extractor = extractor.to(memory_format=torch.channels_last)
    rows = np.arange(len(images)) if indices is None else np.asarray(indices)
    for start in options.progress(range(0, len(rows), batch_size), "features", log="end"):
        x = normalize_images(np.ascontiguousarray(images[rows[start:start + batch_size]]), device)
        with torch.no_grad(), autocast(device, precision):
            out = extractor(x)
        feats = {k: v.flatten(1).float() for k, v in out.items()}
        # One device-to-host check per batch for all layers; the bad layer is looked up only on failure.
        if not torch.stack([torch.isfinite(v).all() for v in feats.values()]).all():
            k, v = next((k, v) for k, v in feats.items() if not torch.isfinite(v).all())
            row, col = safe_io.first_nonfinite(v.cpu().numpy())
            raise safe_io.UserError(f"the AlexNet features of layer {k} are non-finite ({v[row, col].item()}) at image "
                            f"row {start + row}, column {col}: the network's weights hold NaN or Inf (a diverged "
                            "checkpoint?); re-train that model or check the weights file")
        yield start, feats


def extract_features(alexnet, images, batch_size=256, device="cpu", layers=LAYERS, indices=None, precision="fp32"):
    """All ``layers`` for all rows (or ``indices``, in order) as float32 numpy arrays: dict layer -> (n, d_layer)."""
    out = {}
    n = len(images) if indices is None else len(indices)
    for start, feats in iter_features(alexnet, images, batch_size, device, layers, indices, precision):
        for k, v in feats.items():
            if k not in out:
                out[k] = np.empty((n, v.shape[1]), dtype=np.float32)
            out[k][start:start + len(v)] = v.cpu().numpy()
    return out


# --- Option values of the science (used in the scripts' CHOICES and RANGES) -------------

HEMISPHERE_NAMES = ["left", "right", "lh", "rh"]
# The classification datasets of the probes (folders ROOT/datasets/<name>).
CLASSIFICATION_DATASETS = ("caltech256", "places365", "imagenet", "sun397")
# The rows of saved embeddings: the test split in split order (the authors'), or all images.
EMBEDDING_SPLITS = ("test", "all")
# The cortical maps of the paper figures: all, per subject the CL gain and the winning method, or none.
CORTICAL_MAPS = ("all", "summary", "none")
# The encoding protocols: layer and alphas chosen per method, or the untuned network's reused.
PROTOCOLS = ("per-method", "untuned-layer")
# How a transfer matrix averages the per-ROI values of a group (encoding_results.transfer_matrices).
TRANSFER_AGGREGATIONS = ("authors", "absent-zero", "voxels")
# The smallest square input for which all eight LAYERS exist: at 62 px the last max-pool
# (features.12) gets a 2 x 2 map and fails (found by trying torchvision's AlexNet).
MIN_IMAGE_SIZE = 63
# The largest: at 1024 px a 10000-image cache is 31 GB (the protocol's 224 px: 1.5 GB).
MAX_IMAGE_SIZE = 1024


ALEXNET_INPUT = options.Allowed(f"between {MIN_IMAGE_SIZE} (the smallest input of AlexNet's eight layers) and "
                                f"{MAX_IMAGE_SIZE}", lambda size, opts: MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE)
SUBJECT = options.Allowed(f"between 1 and {N_SUBJECTS} with a folder roi_masks/SubjX under --root",
                  lambda subj, opts: 1 <= subj <= N_SUBJECTS and subj in find_subjects(opts.ROOT),
                  found=lambda opts: f"{Path(opts.ROOT) / 'roi_masks'} holds "
                                     + ", ".join(map(subj_dir, find_subjects(opts.ROOT))))
# left and lh name one hemisphere: a list holding both would run it twice.
HEMISPHERE_LIST = options.Allowed("hemispheres among left, right, lh, rh, each hemisphere once",
                          lambda hemis, opts: len({hemi_code(h) for h in hemis}) == len(hemis), whole=True)
ALPHA_GRID = options.Allowed("positive numbers in strictly ascending order, at least one",
                     lambda alphas, opts: len(alphas) > 0 and alphas[0] > 0
                     and all(a < b for a, b in zip(alphas, alphas[1:])), whole=True)


# --- Feature-extraction methods ---------------------------------------------------------

METHODS = ["untuned", "cl-tuned", "reg-tuned", "pooled-avg", "pooled-const"]
# The script that writes each tuned method's checkpoints (named in "missing checkpoint" errors).
METHOD_SCRIPTS = {
    "cl-tuned": "cl_model_training.py", "reg-tuned": "reg_model_training.py",
    "pooled-avg": "pooled_model_training.py --h-method avg",
    "pooled-const": "pooled_model_training.py --h-method const",
}


def method_checkpoint_path(root, method, subj, hemisphere, roi, epochs):
    """Checkpoint file of a tuned method ('cl-tuned', 'reg-tuned', 'pooled-avg', 'pooled-const').

    ``subj`` is the subject the model was tuned on (ignored for pooled models).
    """
    if method == "cl-tuned":
        return cl_model_path(root, subj, hemisphere, roi, epochs)
    if method == "reg-tuned":
        return reg_model_path(root, subj, hemisphere, roi, epochs)
    if method in ("pooled-avg", "pooled-const"):
        return pooled_model_path(root, hemisphere, roi, epochs, method.split("-")[1])
    raise safe_io.UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


def shard(items, spec="1/1"):
    """Part K of N of ``items`` for ``spec`` = "K/N" (1 <= K <= N): items[K-1::N].

    Round-robin, so the N parts cover every item exactly once and mix large and small
    ROIs; a SLURM array task passes ``--shard $SLURM_ARRAY_TASK_ID/N`` with ``--array=1-N``.
    """
    try:
        k, n = (int(part) for part in str(spec).split("/"))
    except ValueError:
        raise safe_io.UserError(f"bad shard {spec!r}: use K/N, e.g. 2/4 for the second of four parts") from None
    if not 1 <= k <= n:
        raise safe_io.UserError(f"bad shard {spec!r}: K must be between 1 and N")
    return list(items)[k - 1::n]


# --- Saved settings ----------------------------------------------------------------------

# h of the pooled models' const method: the largest ROI of the NSD subjects (subj5 rh EBA).
H_CONST = 5741
# Epochs of each tuned method (the authors'): the training scripts' default and the number
# in checkpoint names that the encoding and results scripts read by default.
DEFAULT_EPOCHS = {"cl-tuned": 30, "reg-tuned": 75, "pooled-avg": 30, "pooled-const": 30}


# The option that gives the epochs in each tuned method's checkpoint names.
EPOCHS_OPTION = {"cl-tuned": "CL_EPOCHS", "reg-tuned": "REG_EPOCHS", "pooled-avg": "POOLED_EPOCHS",
                 "pooled-const": "POOLED_EPOCHS"}


def method_epochs(opts, method):
    """Epochs in the checkpoint names of ``method`` (0 for untuned), from CL_EPOCHS, REG_EPOCHS or POOLED_EPOCHS.

    Raises ValueError for a name that is not one of METHODS.
    """
    if method == "untuned":
        return 0
    if method not in EPOCHS_OPTION:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    return getattr(opts, EPOCHS_OPTION[method])


