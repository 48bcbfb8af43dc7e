"""NOD (Natural Object Dataset, OpenNeuro ds004496): betas, labels, HCP-MMP ROIs, pRF R2, dataset.

Layout (``NOD_ROOT``, by default ``ROOT/nod``) is a datalad clone of ds004496 plus the
NOD support files::

    NOD_ROOT/derivatives/ciftify/sub-01/results/ses-imagenet01_task-imagenet_run-1/
        ses-imagenet01_task-imagenet_run-1_beta.dscalar.nii      (100 trials x 91282 grayordinates)
    NOD_ROOT/derivatives/ciftify/sub-01/results/ses-prf_task-prf/ses-prf_task-prf_params.dscalar.nii
    NOD_ROOT/sub-01/ses-imagenet01/func/sub-01_ses-imagenet01_task-imagenet_run-01_events.tsv
    NOD_ROOT/stimuli/imagenet/n01440764/n01440764_10026.JPEG
    NOD_ROOT/supportfiles/{MMP_mpmLR32k.mat, roilbl_mmp.csv, superClassMapping.csv}

Conventions, as in the NOD authors' ``validation/nod_utils.py`` (github.com/BNUCNL/NOD-fmri),
and what this module assumes where that code is silent:

- ImageNet sessions ``ses-imagenet01..04`` of sub-01..09, runs 1..10, 100 trials per run;
  the ciftify result folders number runs without padding (``run-1``), the BIDS events
  files with two digits (``run-01``).
- Each beta map is read with nibabel; the CIFTI_STRUCTURE_CORTEX_LEFT and _RIGHT surface
  models are kept, in file order (59412 grayordinates in the real files: 29696 + 29716),
  the subcortical volume models are dropped. Betas are z-scored per vertex within each
  run (population std; a constant vertex becomes 0) and stacked in session, run, trial
  order; the stack is cached as float32 ``.npy`` in the support folder.
- Events: ``trial_type`` is the 1-based ImageNet class id, ``stim_file`` the image path
  relative to ``stimuli/imagenet`` (a leading ``imagenet/`` is accepted); rows are trials
  in presentation order, one per beta map.
- ``superClassMapping.csv`` has one row per class in class-id order and a ``superClassID``
  column; ``sub-XX_imagenet-label.csv`` (class_id, image_name, superclass_id) is written
  next to it.
- ``MMP_mpmLR32k.mat`` holds ``glasser_MMP``, one HCP-MMP label per cortical grayordinate:
  area i of ``roilbl_mmp.csv`` (rows ``L_<name>_ROI``, left areas first) is label i in
  the left hemisphere and i + 180 in the right (V1 = 1/181, V2 = 4/184, V3 = 5/185,
  V4 = 6/186).
- pRF R2 is map index 3 (the fourth row) of ``ses-prf_task-prf_params.dscalar.nii``;
  NaN becomes 0. The vertices of an ROI are its top 50 by R2 in each hemisphere.
"""

import hashlib
import json
import re
from pathlib import Path

import numpy as np

import utils

N_SESSIONS, N_RUNS, N_TRIALS = 4, 10, 100
N_CORTEX = 59412
N_MMP_AREAS = 180
CORTEX_STRUCTURES = ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")
PRF_R2_ROW = 3
NOD_ROIS = ("V1", "V2", "V3", "V4")
# NOD ROI -> NSD (Algonauts) ROI whose models extract the features, ventral or dorsal.
NSD_ROI = {"ventral": {"V1": "V1v", "V2": "V2v", "V3": "V3v", "V4": "hV4"},
           "dorsal": {"V1": "V1d", "V2": "V2d", "V3": "V3d", "V4": "hV4"}}
DATASET_URL = "https://github.com/OpenNeuroDatasets/ds004496.git"
SUPPORT_URL = "https://github.com/BNUCNL/NOD-fmri (folder validation/supportfiles)"


# --- Paths -----------------------------------------------------------------------------

def nod_dir(root, nod_root=None):
    """The ds004496 clone: ``nod_root`` if given, else ROOT/nod."""
    return Path(nod_root) if nod_root else Path(root) / "nod"


def support_dir(nod):
    return Path(nod) / "supportfiles"


def sub_name(subj):
    """1 -> 'sub-01'."""
    return f"sub-{int(subj):02d}"


def _run_name(session, run):
    return f"ses-imagenet{int(session):02d}_task-imagenet_run-{int(run)}"


def beta_path(nod, subj, session, run):
    name = _run_name(session, run)
    return Path(nod) / "derivatives" / "ciftify" / sub_name(subj) / "results" / name / f"{name}_beta.dscalar.nii"


def events_path(nod, subj, session, run):
    ses = f"ses-imagenet{int(session):02d}"
    return (Path(nod) / sub_name(subj) / ses / "func"
            / f"{sub_name(subj)}_{ses}_task-imagenet_run-{int(run):02d}_events.tsv")


def prf_params_path(nod, subj):
    return (Path(nod) / "derivatives" / "ciftify" / sub_name(subj) / "results" / "ses-prf_task-prf"
            / "ses-prf_task-prf_params.dscalar.nii")


def stimulus_path(nod, stim_file):
    rel = str(stim_file).replace("\\", "/")
    rel = rel[len("imagenet/"):] if rel.startswith("imagenet/") else rel
    return Path(nod) / "stimuli" / "imagenet" / rel


def mmp_path(nod):
    return support_dir(nod) / "MMP_mpmLR32k.mat"


def roi_labels_path(nod):
    return support_dir(nod) / "roilbl_mmp.csv"


def superclass_path(nod):
    return support_dir(nod) / "superClassMapping.csv"


def label_csv_path(nod, subj):
    return support_dir(nod) / f"{sub_name(subj)}_imagenet-label.csv"


def beta_cache_path(nod, subj, sessions, runs):
    """The cached z-scored stack; its name encodes the sessions and runs it holds."""
    key = hashlib.sha1(json.dumps([list(map(int, sessions)), list(map(int, runs))]).encode()).hexdigest()[:8]
    return support_dir(nod) / f"{sub_name(subj)}_imagenet-beta_zscored_{len(sessions)}ses-{len(runs)}runs_{key}.npy"


def require_nod_file(nod, path):
    """Raise a UserError naming ``path`` and the datalad command that fetches it, unless it exists."""
    path = Path(path)
    if path.is_file():
        return path
    nod = Path(nod)
    if path.parent == support_dir(nod):
        raise utils.UserError(f"missing NOD support file {path}: download {path.name} from {SUPPORT_URL} "
                              f"into {path.parent}")
    rel = path.relative_to(nod) if path.is_relative_to(nod) else path
    clone = "" if (nod / ".datalad").is_dir() else f"datalad clone {DATASET_URL} {nod} && "
    raise utils.UserError(f"missing NOD file {path}: fetch it with `{clone}cd {nod} && datalad get {rel}`")


# --- CIFTI -----------------------------------------------------------------------------

def read_cortex_dscalar(path):
    """The cortical columns of a dscalar CIFTI-2 file.

    Returns
    -------
    data : np.ndarray float32 (n_maps, n_cortex), left cortex then right cortex in file order.
    n_left : int, the number of left-cortex columns.
    """
    import nibabel as nib
    try:
        img = nib.load(str(path))
        axis = img.header.get_axis(1)
        structures = {name: slc for name, slc, _ in axis.iter_structures()}
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise utils.UserError(f"cannot read {path} as a CIFTI-2 dscalar file ({type(e).__name__}: {e}): "
                              "fetch it again with `datalad get`") from None
    missing = [s for s in CORTEX_STRUCTURES if s not in structures]
    if missing:
        raise utils.UserError(f"{path} has no {', '.join(missing)} brain model: expected a ciftify "
                              "dscalar file on the fs_LR 32k surfaces")
    left, right = (np.arange(data.shape[1])[structures[s]] for s in CORTEX_STRUCTURES)
    return np.ascontiguousarray(data[:, np.concatenate([left, right])]), len(left)


def write_cortex_dscalar(data, n_left, path, n_subcortical=0, map_names=None):
    """Write a dscalar CIFTI-2 file whose columns are cortex-left, cortex-right and subcortical voxels.

    Parameters
    ----------
    data : array (n_maps, n_left + n_right + n_subcortical).
    n_left : int, the number of left-cortex columns; the next ones up to the subcortical
        block are right cortex. Surface vertices are numbered 0..n-1 on a mesh of n vertices.
    n_subcortical : int, trailing columns written as a volume model (thalamus), like the
        subcortical grayordinates of real ciftify files.
    """
    import nibabel as nib
    from nibabel.cifti2 import cifti2_axes as ax
    data = np.asarray(data, dtype=np.float32)
    n_right = data.shape[1] - n_left - n_subcortical
    bm = (ax.BrainModelAxis.from_surface(np.arange(n_left), n_left, "CortexLeft")
          + ax.BrainModelAxis.from_surface(np.arange(n_right), n_right, "CortexRight"))
    if n_subcortical:
        bm = bm + ax.BrainModelAxis.from_mask(np.ones((n_subcortical, 1, 1), bool), "ThalamusLeft", affine=np.eye(4))
    names = map_names or [f"map{i}" for i in range(data.shape[0])]
    header = nib.cifti2.Cifti2Header.from_axes((ax.ScalarAxis(names), bm))
    img = nib.Cifti2Image(data, header)
    img.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SCALARS")
    with utils.atomic_path(path) as tmp:
        nib.save(img, tmp)


# --- Betas and labels ------------------------------------------------------------------

def zscore_runs(betas, run_lengths):
    """Z-score each vertex within each run (population std; constant vertices become 0).

    Parameters
    ----------
    betas : array (n_trials_total, n_vertices), runs stacked in order.
    run_lengths : list of int, trials per run, summing to n_trials_total.

    Returns
    -------
    z : np.ndarray float32, same shape.
    """
    betas = np.asarray(betas, dtype=np.float32)
    if sum(run_lengths) != len(betas):
        raise ValueError(f"run lengths sum to {sum(run_lengths)} but there are {len(betas)} rows")
    out = np.empty_like(betas)
    start = 0
    for n in run_lengths:
        block = betas[start:start + n].astype(np.float64)
        std = block.std(axis=0)
        out[start:start + n] = np.divide(block - block.mean(axis=0), std, out=np.zeros_like(block), where=std > 0)
        start += n
    return out


def load_betas(nod, subj, sessions=range(1, N_SESSIONS + 1), runs=range(1, N_RUNS + 1), overwrite=False):
    """Run-wise z-scored cortical betas of one subject, cached in the support folder.

    Returns
    -------
    betas : np.memmap float32 (n_sessions * n_runs * n_trials, n_cortex), rows in session,
        run, trial order (the order of the events files), read-only.
    """
    sessions, runs = list(sessions), list(runs)
    cache = beta_cache_path(nod, subj, sessions, runs)
    if cache.is_file() and not overwrite:
        return np.load(cache, mmap_mode="r")
    from tqdm.auto import tqdm
    blocks, n_left = [], None
    pairs = [(s, r) for s in sessions for r in runs]
    for s, r in pairs:
        require_nod_file(nod, beta_path(nod, subj, s, r))
    for s, r in tqdm(pairs, desc=f"{sub_name(subj)} betas", leave=False):
        path = beta_path(nod, subj, s, r)
        data, left = read_cortex_dscalar(path)
        if blocks and (data.shape[1], left) != (blocks[0].shape[1], n_left):
            raise utils.UserError(f"{path} has {data.shape[1]} cortical grayordinates ({left} left) but "
                                  f"{beta_path(nod, subj, *pairs[0])} has {blocks[0].shape[1]} ({n_left} left): "
                                  "fetch all betas from the same ds004496 release")
        n_left = left
        blocks.append(zscore_runs(data, [len(data)]))
    betas = np.concatenate(blocks)
    utils.atomic_np_save(betas, cache)
    return np.load(cache, mmap_mode="r")


def read_events(nod, subj, session, run):
    """The events table of one run (pandas DataFrame with trial_type and stim_file)."""
    import pandas as pd
    path = require_nod_file(nod, events_path(nod, subj, session, run))
    events = pd.read_csv(path, sep="\t")
    missing = {"trial_type", "stim_file"} - set(events.columns)
    if missing:
        raise utils.UserError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: "
                              "expected a ds004496 ImageNet events file")
    return events


def build_labels(nod, subj, sessions=range(1, N_SESSIONS + 1), runs=range(1, N_RUNS + 1)):
    """The trial labels of one subject, written to ``sub-XX_imagenet-label.csv`` in the support folder.

    Returns
    -------
    labels : pandas DataFrame (class_id, image_name, superclass_id), one row per trial in
        session, run, trial order; class_id is 1-based as in the events files.
    """
    import pandas as pd
    path = require_nod_file(nod, superclass_path(nod))
    mapping = pd.read_csv(path)
    if "superClassID" not in mapping.columns:
        raise utils.UserError(f"{path} has no superClassID column: download superClassMapping.csv from {SUPPORT_URL}")
    events = pd.concat([read_events(nod, subj, s, r) for s in sessions for r in runs], ignore_index=True)
    class_id = events["trial_type"].to_numpy().astype(np.int64)
    bad = (class_id < 1) | (class_id > len(mapping))
    if bad.any():
        raise utils.UserError(f"trial_type {class_id[bad][0]} of {sub_name(subj)} is outside 1..{len(mapping)}, "
                              f"the classes of {path}: check the events files")
    labels = pd.DataFrame({"class_id": class_id, "image_name": events["stim_file"].astype(str),
                           "superclass_id": mapping["superClassID"].to_numpy()[class_id - 1]})
    utils.atomic_write_text(labels.to_csv(index=False), label_csv_path(nod, subj))
    return labels


# --- ROIs and pRF ----------------------------------------------------------------------

def mmp_area_index(nod):
    """Dict area name -> left-hemisphere HCP-MMP label (1..180), from roilbl_mmp.csv."""
    path = require_nod_file(nod, roi_labels_path(nod))
    names = []
    for line in path.read_text().splitlines():
        m = re.match(r'^"?L_(.+?)_ROI\b', line.strip())
        if m:
            names.append(m.group(1))
    if not names:
        raise utils.UserError(f"{path} has no L_<area>_ROI rows: download roilbl_mmp.csv from {SUPPORT_URL}")
    return {name: i + 1 for i, name in enumerate(names)}


def load_mmp(nod):
    """HCP-MMP label per cortical grayordinate, int64 (n_cortex,): left 1..180, right 181..360, 0 none."""
    import scipy.io
    path = require_nod_file(nod, mmp_path(nod))
    try:
        labels = scipy.io.loadmat(str(path))["glasser_MMP"]
    except (KeyError, ValueError, OSError) as e:
        raise utils.UserError(f"cannot read glasser_MMP from {path} ({type(e).__name__}: {e}): "
                              f"download MMP_mpmLR32k.mat from {SUPPORT_URL}") from None
    return np.asarray(labels).ravel().astype(np.int64)


def roi_vertices(nod, roi, hemisphere):
    """Sorted cortical indices (int64) of an HCP-MMP area ('V1', 'V4', ...) in one hemisphere."""
    index = mmp_area_index(nod)
    if roi not in index:
        raise utils.UserError(f"unknown HCP-MMP area {roi!r}: valid names include {', '.join(NOD_ROIS)} "
                              f"(all are listed in {roi_labels_path(nod)})")
    label = index[roi] + (N_MMP_AREAS if utils.hemi_code(hemisphere) == "rh" else 0)
    return np.flatnonzero(load_mmp(nod) == label).astype(np.int64)


def load_prf_r2(nod, subj):
    """pRF R2 per cortical grayordinate, float32 (n_cortex,), NaN -> 0."""
    path = require_nod_file(nod, prf_params_path(nod, subj))
    params, _ = read_cortex_dscalar(path)
    if params.shape[0] <= PRF_R2_ROW:
        raise utils.UserError(f"{path} has {params.shape[0]} maps: expected the pRF parameters with R2 "
                              f"in map {PRF_R2_ROW}")
    return np.nan_to_num(params[PRF_R2_ROW], nan=0.0)


def top_vertices(r2, candidates, k=50):
    """The ``k`` candidates with the largest R2, best first (ties: the lower index first).

    Parameters
    ----------
    r2 : array (n_cortex,).
    candidates : int array of cortical indices.

    Returns
    -------
    top : np.ndarray int64 (min(k, len(candidates)),).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    order = np.lexsort((candidates, -np.asarray(r2)[candidates]))
    return candidates[order[:k]]


def select_vertices(nod, subj, roi, hemisphere, k=50):
    """The top-``k`` pRF-R2 vertices of an HCP-MMP area in one hemisphere of a subject, best first."""
    r2, n_mmp = load_prf_r2(nod, subj), len(load_mmp(nod))
    if len(r2) != n_mmp:
        raise utils.UserError(f"{prf_params_path(nod, subj)} has {len(r2)} cortical grayordinates but "
                              f"{mmp_path(nod)} labels {n_mmp}: use files on the same fs_LR 32k surfaces")
    return top_vertices(r2, roi_vertices(nod, roi, hemisphere), k)


# --- Dataset ---------------------------------------------------------------------------

class NODSubjectData:
    """Images, labels and z-scored betas of one NOD subject, rows in trial order.

    Parameters
    ----------
    root : project folder (the image cache goes to utils.cache_dir(root)).
    subj : int, NOD subject (1..9).
    nod_root : the ds004496 clone, default ROOT/nod.
    sessions, runs : the ImageNet sessions and runs to use.
    image_size : int, the images are squash-resized to (S, S), as for NSD.

    Attributes
    ----------
    images : np.memmap uint8 (n, S, S, 3), the decoded stimuli (utils.image_cache).
    betas : np.memmap float32 (n, n_cortex), run-wise z-scored.
    labels : pandas DataFrame (class_id, image_name, superclass_id).
    train, test : np.ndarray int64, the seeded 85/15 split of the rows (utils.train_test_split).
    """

    def __init__(self, root, subj, nod_root=None, sessions=range(1, N_SESSIONS + 1),
                 runs=range(1, N_RUNS + 1), image_size=224):
        self.nod, self.subj, self.image_size = nod_dir(root, nod_root), int(subj), image_size
        self.labels = build_labels(self.nod, subj, sessions, runs)
        self.betas = load_betas(self.nod, subj, sessions, runs)
        if len(self.betas) != len(self.labels):
            raise utils.UserError(f"{sub_name(subj)} has {len(self.betas)} beta maps but {len(self.labels)} "
                                  "events rows: each run's events file must list one row per trial")
        paths = [stimulus_path(self.nod, name) for name in self.labels["image_name"]]
        for p in paths:
            require_nod_file(self.nod, p)
        self.images = utils.image_cache(paths, image_size, utils.cache_dir(root), name=f"nod_{sub_name(subj)}")
        self.train, self.test = utils.train_test_split(len(paths))

    def __len__(self):
        return len(self.labels)

    def roi_fmri(self, roi, hemisphere, k=50):
        """(sorted vertices (k,), responses float32 (n, k)) of the top-``k`` pRF-R2 vertices of an area."""
        vertices = np.sort(select_vertices(self.nod, self.subj, roi, hemisphere, k))
        if len(load_mmp(self.nod)) != self.betas.shape[1]:
            raise utils.UserError(f"the betas of {sub_name(self.subj)} have {self.betas.shape[1]} cortical "
                                  f"grayordinates but {mmp_path(self.nod)} labels {len(load_mmp(self.nod))}: "
                                  "use files on the same fs_LR 32k surfaces")
        return vertices, np.ascontiguousarray(self.betas[:, vertices])
