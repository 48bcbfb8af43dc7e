"""Write a complete synthetic Algonauts 2023 dataset with a planted, known ground truth.

Layout written under ROOT (the same as the real data, see README):

    training_images/SubjX/train-%04d_nsd-%05d.png     procedural images (1/f textures,
                                                       colour gradients, gratings, shapes)
    training_fmri/SubjX/subjX_{lh,rh}_training_fmri.npy  float32 (n_images, n_vertices)
    roi_masks/SubjX/{lh,rh}.<class>_challenge_space.npy  int64 labels, one per vertex
    roi_masks/SubjX/mapping_<class>.npy                  dict code -> ROI name
    roi_masks/SubjX/{lh,rh}.all-vertices_fsaverage_space.npy  int64 (163842,) 0/1
    synthetic_truth/SubjX/subjX_{lh,rh}_noise_free.npy   float32 (n_images, n_vertices)
    synthetic_truth/SubjX/subjX_{lh,rh}_params.npz       planted per-vertex parameters
    synthetic_truth/SubjX/subjX_image_stats.npy          float32 (n_images, 12) image statistics

About a third of the images are shared by all subjects (as NSD's shared 1000); the
rest are unique to each subject. The masks are either generated (small: about 800-2000
vertices per hemisphere, ROIs of mostly 20-150 vertices, each ROI a patch of fsaverage5
vertices where the real ROI lies, so cortical maps look like a brain) or copied from real
Algonauts masks (``masks_from``), optionally keeping only ``max_vertices`` vertices per
hemisphere.

The planted model, per vertex (``kind`` code in the params file):

- kind 1, pRF (vertices in prf-visualrois or in the 'early' stream): a Gaussian
  population receptive field at (x, y) with width ``size`` (image coordinates in
  [-1, 1], x to the right, y up; left hemispheres see the right half of the image,
  ventral ROIs the upper half) and a preferred orientation (radians, of the grating's
  wave vector, in [0, pi)) and spatial frequency (cycles per image). The response is
  sqrt(sum over the field of the quadrature Gabor energy of that channel), computed
  with FFT filters on a 32 x 32 grey version of the image.
- kind 2, image statistics (every other ROI vertex): softplus of a weighted sum of 12
  z-scored image statistics (colour opponency, luminance, saturation, contrast, edge
  density, high spatial frequency fraction, up/down and centre/surround layout,
  left/right edges, orientation anisotropy, colourfulness); each ROI has its own
  weights, shared by its vertices, plus a per-vertex part.
- kind 0 (vertices in no ROI): like kind 2 with per-vertex weights, and a ten times
  lower SNR.

Each noise-free response is z-scored over the subject's images (mean 0, variance 1),
and the fMRI is ``noise_free + noise`` with Gaussian noise of variance 1 / snr_v. So
the signal-to-noise ratio ``snr_v`` of a vertex is signal variance / noise variance,
and the expected correlation between a vertex's fMRI and its noise-free response is
sqrt(snr_v / (1 + snr_v)). ``snr_v = snr * 10**u`` with u uniform in
[-SNR_SPREAD / 2, SNR_SPREAD / 2] (times 0.1 for kind 0).

The params file holds per-vertex arrays (NaN where not applicable): ``kind`` (int8),
``snr``, ``x``, ``y``, ``size``, ``orientation``, ``sf``, ``channel`` (int, -1 for
non-pRF vertices), ``stat_weights`` (n_vertices, 12); and ``sfs``, ``orientations``
(the filter bank) and ``nsd_ids`` (the subject's image ids, in row order).

Usage: python synthetic_data.py --root DIR --subjects 2 --images 300 --image-size 425 --seed 0
"""

import functools
import heapq
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import options
import safe_io
import utils

# --- Options ---
ROOT = "synthetic"  # folder to write the dataset into
SUBJECTS = 2  # number of subjects (Subj1..SubjN)
IMAGES = 300  # images per subject
IMAGE_SIZE = 425  # side of the square PNG images, in pixels
SEED = 0  # random seed: the same seed gives the same dataset
SNR = 1.0  # median signal-to-noise ratio (signal variance / noise variance) of ROI vertices
MASKS_FROM: str | None = None  # folder of real Algonauts roi_masks/SubjX folders to copy (None: generate masks)
MAX_VERTICES: int | None = None  # with MASKS_FROM, keep only this many vertices per hemisphere (None: all)
OVERWRITE = False  # rewrite a dataset that already exists under ROOT
NOD = False  # write a synthetic NOD tree (ds004496 layout, IMAGES // 100 runs of 100 trials) under ROOT/nod instead
# ---
RANGES = {"SUBJECTS": options.at_least(1), "IMAGES": options.at_least(1), "IMAGE_SIZE": options.at_least(8),
          "SEED": options.at_least(0), "SNR": options.POSITIVE, "MAX_VERTICES": options.at_least(1)}

GRID = 32  # side of the grey image the pRF model sees
SFS = np.array([2.0, 4.0, 8.0])  # preferred spatial frequencies, cycles per image
ORIENTATIONS = np.arange(8) * np.pi / 8  # preferred orientations of the filter bank
N_STATS = 12  # number of image statistics driving kind-2 vertices
SNR_SPREAD = 1.0  # decades over which the per-vertex SNR varies
SHARED_FRACTION = 1 / 3  # fraction of each subject's images shown to all subjects
CHUNK = 32  # images rendered at once
SMOOTH_SIZE = 256  # largest side at which the smooth image layers are rendered
# The prf-visualrois ROIs: visual field half (1: upper, as ventral ROIs see it; -1: lower,
# dorsal ROIs; 0: both), pRF size scale and preferred spatial frequency probabilities (over SFS).
PRF_ROIS = {
    "V1v": (1, 1.0, (0.2, 0.4, 0.4)), "V1d": (-1, 1.0, (0.2, 0.4, 0.4)),
    "V2v": (1, 1.4, (0.3, 0.4, 0.3)), "V2d": (-1, 1.4, (0.3, 0.4, 0.3)),
    "V3v": (1, 1.8, (0.4, 0.4, 0.2)), "V3d": (-1, 1.8, (0.4, 0.4, 0.2)),
    "hV4": (0, 2.5, (0.6, 0.3, 0.1)),
}
KIND_NONE, KIND_PRF, KIND_STATS = 0, 1, 2


def _rng(seed, *keys):
    """An independent generator for one part of the dataset (so parts do not shift each other)."""
    return np.random.default_rng([int(seed), *keys])


# --- Images ----------------------------------------------------------------------------

def _pink_noise(rng, n, size):
    """(n, size, size) float32 textures with a 1/f^alpha amplitude spectrum, unit variance."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    alpha = rng.uniform(0.8, 1.8, size=(n, 1, 1))
    spectrum = np.fft.rfft2(rng.standard_normal((n, size, size), dtype=np.float32))
    noise = np.fft.irfft2(spectrum * f ** -alpha, s=(size, size)).astype(np.float32)
    noise -= noise.mean(axis=(1, 2), keepdims=True)
    noise /= noise.std(axis=(1, 2), keepdims=True) + 1e-8
    return noise


def _render_chunk(rng, n, size):
    """Render ``n`` images: uint8 (n, size, size, 3).

    Background: a colour gradient plus a tinted 1/f texture; then up to two windowed
    colour gratings; then up to five flat or textured shapes (ellipses, rectangles,
    triangles) drawn with PIL. The smooth layers are rendered at most SMOOTH_SIZE px wide
    and upsampled, which keeps large images fast; shape edges stay sharp.
    """
    from PIL import Image, ImageDraw
    inner = min(size, SMOOTH_SIZE)
    c = (np.arange(inner, dtype=np.float32) + 0.5) / inner * 2 - 1
    xx, yy = c[None, None, :], -c[None, :, None]
    uniform = lambda lo, hi, shape: rng.uniform(lo, hi, shape).astype(np.float32)
    colour = lambda: uniform(0, 1, (n, 1, 1, 3))

    theta = uniform(0, 2 * np.pi, (n, 1, 1))
    g = (0.5 + 0.5 * (xx * np.cos(theta) + yy * np.sin(theta)) * uniform(0.3, 1, (n, 1, 1)))[..., None]
    img = colour() * (1 - g) + colour() * g
    img += uniform(0.05, 0.3, (n, 1, 1, 1)) * _pink_noise(rng, n, inner)[..., None] * (0.5 + colour())

    for _ in range(2):
        present = rng.random(n) < 0.5
        m = int(present.sum())
        ori, freq, phase, cx, cy, radius = (uniform(lo, hi, (m, 1, 1)) for lo, hi in (
            (0, np.pi), (2, 20), (0, 2 * np.pi), (-0.7, 0.7), (-0.7, 0.7), (0.2, 0.8)))
        wave = (0.5 + 0.5 * np.sin(np.pi * freq * (xx * np.cos(ori) + yy * np.sin(ori)) + phase))[..., None]
        alpha = np.clip((radius - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)) * (inner / 4), 0, 1)[..., None]
        layer = uniform(0, 1, (m, 1, 1, 3)) * (1 - wave) + uniform(0, 1, (m, 1, 1, 3)) * wave
        img[present] = img[present] * (1 - alpha) + layer * alpha

    base = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        im = Image.fromarray(base[i])
        if inner != size:
            im = im.resize((size, size), Image.BILINEAR)
        other = im.transpose(Image.Transpose.ROTATE_90)
        for _ in range(rng.integers(0, 6)):
            polygon = _shape_polygon(rng, size)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.3:
                mask = Image.new("L", (size, size), 0)
                ImageDraw.Draw(mask).polygon(polygon, fill=255)
                im.paste(other, (0, 0), mask)
            else:
                ImageDraw.Draw(im).polygon(polygon, fill=fill)
        out[i] = np.asarray(im)
    return out


def _save_png(image, path):
    from PIL import Image
    with safe_io.atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1)


def _shape_polygon(rng, size):
    """Vertices (pixel coordinates) of a random ellipse, rectangle or triangle."""
    centre = rng.uniform(0.1, 0.9, 2) * size
    a, b = rng.uniform(0.05, 0.3, 2) * size
    rot = rng.uniform(0, np.pi)
    kind = rng.integers(3)
    t = np.linspace(0, 2 * np.pi, (24, 4, 3)[kind], endpoint=False) + (0, np.pi / 4, 0)[kind]
    u, v = a * np.cos(t), b * np.sin(t)
    px = centre[0] + u * np.cos(rot) - v * np.sin(rot)
    py = centre[1] + u * np.sin(rot) + v * np.cos(rot)
    return [(float(x), float(y)) for x, y in zip(px, py)]


# --- Image features the planted model reads ---------------------------------------------

def _gabor_bank():
    """Quadrature (one-sided) Gabor filters in the Fourier domain: (n_channels, GRID, GRID)."""
    f = np.fft.fftfreq(GRID) * GRID
    fx, fy = f[None, :], -f[:, None]  # y up, as in image coordinates
    filters = []
    for sf in SFS:
        for ori in ORIENTATIONS:
            cx, cy = sf * np.cos(ori), sf * np.sin(ori)
            filters.append(np.exp(-((fx - cx) ** 2 + (fy - cy) ** 2) / (2 * (0.35 * sf) ** 2)))
    return np.stack(filters).astype(np.float32)


def _channel(sf_index, ori_index):
    return sf_index * len(ORIENTATIONS) + ori_index


def _grid_coords():
    c = (np.arange(GRID) + 0.5) / GRID * 2 - 1
    return np.meshgrid(c, -c)  # x right, y up, row 0 at the top


def image_features(images):
    """Features the planted model reads from uint8 images (n, S, S, 3).

    Returns
    -------
    energy : float32 (n, n_channels, GRID * GRID), Gabor energy per channel and position.
    stats : float32 (n, N_STATS), raw (not z-scored) image statistics.
    """
    from PIL import Image
    n = len(images)
    grey = np.empty((n, GRID, GRID), dtype=np.float32)
    small = np.empty((n, 64, 64, 3), dtype=np.float32)
    for i, im in enumerate(images):
        pil = Image.fromarray(im)
        grey[i] = np.asarray(pil.convert("L").resize((GRID, GRID), Image.BILINEAR), dtype=np.float32) / 255
        small[i] = np.asarray(pil.resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    spectrum = np.fft.fft2(grey - grey.mean(axis=(1, 2), keepdims=True))
    energy = np.abs(np.fft.ifft2(spectrum[:, None] * _gabor_bank()[None])) ** 2
    return energy.reshape(n, -1, GRID * GRID).astype(np.float32), _image_stats(small)


def _image_stats(rgb):
    """(n, N_STATS) statistics of float RGB images (n, 64, 64, 3) in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    lum = rgb.mean(-1)
    sat = rgb.max(-1) - rgb.min(-1)
    gy, gx = np.gradient(lum, axis=(1, 2))
    edges = np.sqrt(gx ** 2 + gy ** 2)
    power = np.abs(np.fft.fft2(lum - lum.mean(axis=(1, 2), keepdims=True))) ** 2
    f = np.abs(np.fft.fftfreq(64) * 64)
    high = np.maximum(f[:, None], f[None, :]) > 8
    centre = np.zeros((64, 64), dtype=bool)
    centre[16:48, 16:48] = True
    stats = [
        (r - g).mean(axis=(1, 2)),
        ((r + g) / 2 - b).mean(axis=(1, 2)),
        lum.mean(axis=(1, 2)),
        sat.mean(axis=(1, 2)),
        lum.std(axis=(1, 2)),
        edges.mean(axis=(1, 2)),
        power[:, high].sum(-1) / (power.sum(axis=(1, 2)) + 1e-8),
        lum[:, :32].mean(axis=(1, 2)) - lum[:, 32:].mean(axis=(1, 2)),
        edges[:, centre].mean(-1) - edges[:, ~centre].mean(-1),
        edges[:, :, :32].mean(axis=(1, 2)) - edges[:, :, 32:].mean(axis=(1, 2)),
        np.abs(gx).mean(axis=(1, 2)) - np.abs(gy).mean(axis=(1, 2)),
        np.stack([r - g, (r + g) / 2 - b], -1).std(axis=(1, 2)).mean(-1),
    ]
    return np.stack(stats, 1).astype(np.float32)


# --- ROI masks -------------------------------------------------------------------------

def _layout(rng, sizes, lo, hi):
    """Start positions of disjoint blocks of ``sizes`` placed in random order inside [lo, hi)."""
    sizes = np.asarray(sizes)
    order = rng.permutation(len(sizes))
    gaps = rng.dirichlet(np.ones(len(sizes) + 1)) * (hi - lo - sizes.sum())
    starts = np.empty(len(sizes), dtype=np.int64)
    pos = lo
    for gap, i in zip(gaps[:-1], order):
        pos += int(gap)
        starts[i] = pos
        pos += sizes[i]
    return starts


def _roi_sizes(rng, subj, hemi):
    """Vertex count of each ROI for one generated subject and hemisphere."""
    sizes = {roi: int(rng.integers(20, 151)) for roi in utils.ROIS}
    for roi in ("V1v", "V2v", "V3v", "hV4", "EBA", "FFA-1", "PPA"):
        sizes[roi] = int(rng.integers(40, 151))
    sizes["mTL-faces"] = 0
    sizes["mTL-words"] = int(rng.integers(6, 16))
    if subj % 2 == 0:
        sizes["FBA-2"] = 0
    if hemi == "rh" and subj % 2 == 1:
        sizes["aTL-faces"] = 0
    return sizes


def generate_masks(seed, subj, hemi):
    """Generated label arrays of one subject and hemisphere, in generation order (``place_on_fsaverage5``
    puts each vertex on the cortex).

    Vertices lie on a line: the prf-visualrois block first, the 'early' stream over most
    of it, the other streams and the floc classes after it, each class with its own
    random disjoint placement, so classes overlap and ROIs of one class do not.

    Returns
    -------
    labels : dict class -> int64 (n_vertices,) codes (utils.ROI_CODE, 0 = no ROI).
    """
    rng = _rng(seed, 1, subj, utils.HEMISPHERES.index(hemi))
    sizes = _roi_sizes(rng, subj, hemi)
    prf = utils.ROI_CLASSES["prf-visualrois"]
    prf_end = sum(sizes[r] for r in prf)
    lo = int(0.8 * prf_end)
    needed = max(sum(sizes[r] for r in rois) for cls, rois in utils.ROI_CLASSES.items() if cls != "prf-visualrois")
    n = prf_end + needed + int(rng.integers(150, 400))
    labels = {}
    for cls, rois in utils.ROI_CLASSES.items():
        codes = np.zeros(n, dtype=np.int64)
        if cls == "prf-visualrois":
            starts = np.cumsum([0] + [sizes[r] for r in rois[:-1]])
        elif cls == "streams":
            sizes["early"] = int(0.9 * prf_end)
            starts = np.concatenate([[0], _layout(rng, [sizes[r] for r in rois[1:]], prf_end, n)])
        else:
            starts = _layout(rng, [sizes[r] for r in rois], lo, n)
        for roi, start in zip(rois, starts):
            codes[start:start + sizes[roi]] = utils.ROI_CODE[roi]
        labels[cls] = codes
    return labels


# fsaverage5 vertex at the centre of each ROI (None: of the vertices in no ROI), per hemisphere: the vertex
# nearest the mean sphere position of the ROI's vertices in the 8 subjects of the real Algonauts masks, each
# fsaverage vertex taken to its nearest fsaverage5 vertex. No real subject has mTL-faces or aTL-faces, nor lh
# mTL-bodies: those take FFA-2's centre and rh mTL-bodies' (fsaverage's two spheres coincide).
FSAVERAGE5_CENTRES = {
    "lh": {"V1v": 5649, "V1d": 9651, "V2v": 8563, "V2d": 9663, "V3v": 1997, "V3d": 6911, "hV4": 8577, "EBA": 5090,
           "FBA-1": 10052, "FBA-2": 621, "mTL-bodies": 10073, "OFA": 1526, "FFA-1": 2753, "FFA-2": 10061,
           "mTL-faces": 10061, "aTL-faces": 10061, "OPA": 5200, "PPA": 10141, "RSC": 569, "OWFA": 3502,
           "VWFA-1": 5576, "VWFA-2": 5600, "mfs-words": 8008, "mTL-words": 5617, "early": 4368, "midventral": 6374,
           "midlateral": 9591, "midparietal": 306, "ventral": 8005, "lateral": 552, "parietal": 5174, None: 207},
    "rh": {"V1v": 339, "V1d": 1373, "V2v": 7087, "V2d": 9432, "V3v": 10021, "V3d": 2344, "hV4": 4388, "EBA": 8555,
           "FBA-1": 6105, "FBA-2": 3335, "mTL-bodies": 10073, "OFA": 4383, "FFA-1": 353, "FFA-2": 156,
           "mTL-faces": 156, "aTL-faces": 156, "OPA": 7815, "PPA": 6089, "RSC": 3750, "OWFA": 980, "VWFA-1": 7995,
           "VWFA-2": 3932, "mfs-words": 10069, "mTL-words": 5539, "early": 1375, "midventral": 4385,
           "midlateral": 9666, "midparietal": 2340, "ventral": 5606, "lateral": 2355, "parietal": 5195, None: 979},
}


@functools.cache
def fsaverage5_sphere():
    """nilearn's packaged fsaverage5 sphere (the same for both hemispheres): vertex positions (radius 100) and,
    per vertex, its neighbours (scipy CSR adjacency)."""
    from nilearn import datasets, surface
    from scipy.sparse import coo_matrix
    mesh = surface.load_surf_mesh(datasets.fetch_surf_fsaverage("fsaverage5")["sphere_left"])
    edges = np.asarray(mesh.faces)[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    n = len(mesh.coordinates)
    adjacency = coo_matrix((np.ones(2 * len(edges)), (edges.ravel(), edges[:, ::-1].ravel())), shape=(n, n)).tocsr()
    return np.asarray(mesh.coordinates, dtype=float), adjacency


def _grow_patch(size, centre, free):
    """``size`` free fsaverage5 vertices grown from the free vertex nearest ``centre`` through free neighbours,
    nearest to the centre first (a new seed, the nearest free vertex, where the patch is enclosed). Marks them
    taken in ``free``; returns them in the order taken."""
    xyz, adjacency = fsaverage5_sphere()
    distance = np.linalg.norm(xyz - xyz[centre], axis=1)
    patch, frontier = [], []
    while len(patch) < size:
        if not frontier:
            seed = int(np.flatnonzero(free)[np.argmin(distance[free])])
            frontier = [(distance[seed], seed)]
        _, v = heapq.heappop(frontier)
        if not free[v]:
            continue
        free[v] = False
        patch.append(v)
        for w in adjacency.indices[adjacency.indptr[v]:adjacency.indptr[v + 1]]:
            if free[w]:
                heapq.heappush(frontier, (distance[w], int(w)))
    return np.array(patch, dtype=np.int64)


def place_on_fsaverage5(labels, hemi):
    """An fsaverage vertex for each generated vertex, all among fsaverage5's own (below 10242), so that the
    maps look like a brain: the vertices whose first ROI in canonical order (the one a cortical map draws) is
    the same form one patch, the free fsaverage5 vertices nearest that ROI's real centre (FSAVERAGE5_CENTRES),
    placed ROI by ROI in canonical order, each grown from its centre through the vertices still free
    (``_grow_patch``), then the vertices in no ROI.

    Returns (n_vertices,) int64, distinct.
    """
    first = np.full(len(labels["streams"]), len(utils.ROIS))
    for k in reversed(range(len(utils.ROIS))):
        roi = utils.ROIS[k]
        first[labels[utils.ROI_CLASS[roi]] == utils.ROI_CODE[roi]] = k
    rows = np.empty(len(first), dtype=np.int64)
    free = np.ones(fsaverage5_sphere()[1].shape[0], dtype=bool)
    for k, roi in enumerate(utils.ROIS + [None]):
        members = np.flatnonzero(first == k)
        rows[members] = _grow_patch(len(members), FSAVERAGE5_CENTRES[hemi][roi], free)
    return rows


def subsample_masks(seed, subj, hemi, labels, max_vertices):
    """Keep ``max_vertices`` vertices (sorted indices) so that no non-empty ROI becomes empty.

    Each non-empty ROI keeps min(size, 5) random vertices first; the rest are random.
    """
    n = len(next(iter(labels.values())))
    if max_vertices is None or max_vertices >= n:
        return np.arange(n)
    rng = _rng(seed, 2, subj, utils.HEMISPHERES.index(hemi))
    forced = [rng.choice(np.flatnonzero(codes == code), size=min(5, int((codes == code).sum())), replace=False)
              for codes in labels.values() for code in np.unique(codes[codes > 0])]
    keep = np.zeros(n, dtype=bool)
    keep[np.concatenate(forced + [np.zeros(0, dtype=np.int64)]).astype(np.int64)] = True
    rest = np.flatnonzero(~keep)
    extra = max(0, max_vertices - int(keep.sum()))
    keep[rng.choice(rest, size=min(extra, len(rest)), replace=False)] = True
    return np.flatnonzero(keep)


# --- Planted model ---------------------------------------------------------------------

def plant_params(seed, subj, hemi, labels, snr):
    """Per-vertex planted parameters from the ROI labels (see the module docstring)."""
    rng = _rng(seed, 3, subj, utils.HEMISPHERES.index(hemi))
    n = len(labels["prf-visualrois"])
    prf_names = utils.ROI_CLASSES["prf-visualrois"]
    prf_code = labels["prf-visualrois"]
    in_roi = np.any([codes > 0 for codes in labels.values()], axis=0)
    kind = np.where(in_roi, KIND_STATS, KIND_NONE).astype(np.int8)
    kind[(prf_code > 0) | (labels["streams"] == utils.ROI_CODE["early"])] = KIND_PRF

    side = 1.0 if hemi == "lh" else -1.0  # the left hemisphere sees the right visual field
    half = np.zeros(n)
    scale = np.full(n, 1.2)
    sf_index = np.zeros(n, dtype=np.int64)
    probs = np.full((n, len(SFS)), 1 / len(SFS))
    for name in prf_names:
        m = prf_code == utils.ROI_CODE[name]
        half[m], scale[m], probs[m] = PRF_ROIS[name][0], PRF_ROIS[name][1], PRF_ROIS[name][2]
    prf = kind == KIND_PRF
    x = side * rng.uniform(0.05, 0.9, n)
    y_mag = rng.uniform(0.05, 0.9, n)
    y = np.where(half == 0, rng.uniform(-0.9, 0.9, n), half * y_mag)
    size = scale * rng.uniform(0.06, 0.12, n) * (0.5 + np.sqrt(x ** 2 + y ** 2))
    sf_index = (rng.random(n)[:, None] > np.cumsum(probs, 1)).sum(1).clip(0, len(SFS) - 1)
    ori_index = rng.integers(0, len(ORIENTATIONS), n)
    nan = np.full(n, np.nan)

    n_rois = len(utils.ROIS)
    roi_weights = rng.standard_normal((n_rois, N_STATS))
    member = np.zeros((n, n_rois), dtype=bool)
    for j, roi in enumerate(utils.ROIS):
        member[:, j] = labels[utils.ROI_CLASS[roi]] == utils.ROI_CODE[roi]
    stat_weights = member @ roi_weights + 0.5 * rng.standard_normal((n, N_STATS))
    stat_weights[kind == KIND_NONE] = rng.standard_normal((int((kind == KIND_NONE).sum()), N_STATS))
    stat_weights /= np.linalg.norm(stat_weights, axis=1, keepdims=True)
    stat_weights[prf] = np.nan

    vertex_snr = snr * 10 ** rng.uniform(-SNR_SPREAD / 2, SNR_SPREAD / 2, n)
    vertex_snr[kind == KIND_NONE] *= 0.1
    return {
        "kind": kind, "snr": vertex_snr,
        "x": np.where(prf, x, nan), "y": np.where(prf, y, nan), "size": np.where(prf, size, nan),
        "orientation": np.where(prf, ORIENTATIONS[ori_index], nan), "sf": np.where(prf, SFS[sf_index], nan),
        "channel": np.where(prf, _channel(sf_index, ori_index), -1),
        "stat_weights": stat_weights,
    }


def prf_fields(params):
    """Normalised Gaussian fields of the pRF vertices, grouped by preferred channel.

    Returns
    -------
    fields : list of (channel, cols, weights): ``cols`` are the vertices' positions among
        the pRF vertices, ``weights`` float32 (GRID * GRID, len(cols)), each column summing to 1.
    """
    gx, gy = _grid_coords()
    prf = np.flatnonzero(params["kind"] == KIND_PRF)
    channels = params["channel"][prf]
    fields = []
    for c in np.unique(channels):
        cols = np.flatnonzero(channels == c)
        v = prf[cols]
        d2 = (gx.reshape(-1, 1) - params["x"][v]) ** 2 + (gy.reshape(-1, 1) - params["y"][v]) ** 2
        w = np.exp(-d2 / (2 * params["size"][v] ** 2))
        w[w < 1e-6 * w.max(0)] = 0  # float32 denormals would slow the products down ~100x
        fields.append((int(c), cols, (w / w.sum(0, keepdims=True)).astype(np.float32)))
    return fields


def prf_responses(energy, fields, n_prf):
    """Noise-free, not yet standardised responses of the pRF vertices: float32 (n_images, n_prf).

    Parameters
    ----------
    energy : (n_images, n_channels, GRID * GRID) from image_features.
    fields : from prf_fields.
    n_prf : number of pRF vertices.
    """
    out = np.empty((len(energy), n_prf), dtype=np.float32)
    for c, cols, weights in fields:
        out[:, cols] = np.sqrt(energy[:, c] @ weights + 1e-12)
    return out


def stats_responses(params, stats_z):
    """Noise-free, not yet standardised responses of the other vertices: (n_images, n_other).

    ``stats_z`` is (n_images, N_STATS) z-scored image statistics.
    """
    other = params["kind"] != KIND_PRF
    return np.logaddexp(0, stats_z @ params["stat_weights"][other].T).astype(np.float32)


# --- The dataset -----------------------------------------------------------------------

def truth_dir(root, subj):
    return Path(root) / "synthetic_truth" / utils.subj_dir(subj)


def noise_free_path(root, subj, hemisphere):
    return truth_dir(root, subj) / f"subj{int(subj)}_{utils.hemi_code(hemisphere)}_noise_free.npy"


def params_path(root, subj, hemisphere):
    return truth_dir(root, subj) / f"subj{int(subj)}_{utils.hemi_code(hemisphere)}_params.npz"


def load_truth(root, subj, hemisphere):
    """The planted parameters of a hemisphere (see the module docstring) plus "noise_free"."""
    fix = "write the dataset with synthetic_data.py (only synthetic datasets have a ground truth)"
    with np.load(safe_io.require_file(params_path(root, subj, hemisphere), fix)) as params:
        truth = dict(params)
    truth["noise_free"] = np.load(safe_io.require_file(noise_free_path(root, subj, hemisphere), fix))
    return truth


def column_correlation(a, b):
    """Pearson r between matching columns of two (n, p) arrays: (p,); 0 for a constant column."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a ** 2).sum(0) * (b ** 2).sum(0))
    return np.where(denom > 0, (a * b).sum(0) / np.where(denom > 0, denom, 1), 0.0)


def _image_plan(seed, n_subjects, n_images):
    """NSD ids of the image pool and, per subject, the sorted pool rows it sees."""
    rng = _rng(seed, 4)
    shared = int(round(SHARED_FRACTION * n_images)) if n_subjects > 1 else 0
    unique = n_images - shared
    n_pool = shared + n_subjects * unique
    nsd_ids = np.sort(rng.choice(73000, size=n_pool, replace=False))
    pool = rng.permutation(n_pool)
    rows = []
    for s in range(n_subjects):
        mine = np.concatenate([pool[:shared], pool[shared + s * unique: shared + (s + 1) * unique]])
        rows.append(np.sort(mine))
    return nsd_ids, rows


def _load_masks(masks_from, subj):
    """Labels, mappings and fsaverage masks of a subject in a folder of real ``SubjX`` mask folders.

    Returns
    -------
    dict hemi -> (labels dict class -> int64 codes, fsaverage 0/1 mask), and dict class -> mapping.
    """
    fix = f"point --masks-from at a folder holding the Algonauts roi_masks {utils.subj_dir(subj)} folder"
    # The utils path helpers give ROOT/roi_masks/SubjX/<file>; here the folder itself holds SubjX.
    real = lambda path: safe_io.require_file(Path(masks_from) / path.relative_to("roi_masks"), fix)
    out = {}
    for hemi in utils.HEMISPHERES:
        labels = {cls: utils.load_label_file(real(utils.roi_mask_path("", subj, hemi, cls))) for cls in utils.ROI_CLASSES}
        out[hemi] = (labels, utils.load_label_file(real(utils.fsaverage_mask_path("", subj, hemi))))
    mappings = {cls: safe_io.load_mapping_file(real(utils.roi_mapping_path("", subj, cls))) for cls in utils.ROI_CLASSES}
    return out, mappings


# Small products: OpenBLAS threads spinning against torch's on a busy CPU made them ~100x slower.
@threadpool_limits.wrap(limits=1, user_api="blas")
def write_algonauts_dataset(root, n_subjects=2, n_images=300, image_size=425, seed=0, snr=1.0,
                            masks_from=None, max_vertices=None):
    """Write a synthetic Algonauts dataset with a planted model under ``root``.

    Parameters
    ----------
    root : path-like, the project folder to write into (created if needed).
    n_subjects : int, subjects Subj1..SubjN.
    n_images : int, images (and fMRI rows) per subject.
    image_size : int, side of the PNG images.
    seed : int, the same seed gives identical files.
    snr : float > 0, median signal variance / noise variance of ROI vertices.
    masks_from : optional path of a folder with real ``SubjX`` roi_masks folders
        (e.g. ../shared/algonauts_roi_masks); None generates small masks.
    max_vertices : optional int, with ``masks_from``, vertices kept per hemisphere.

    Returns
    -------
    summary : dict subj -> hemi -> {"n_vertices": int, "roi_sizes": {roi: int}}.
    """
    root = Path(root)
    if n_subjects < 1 or n_images < 1 or image_size < 8:
        raise safe_io.UserError(f"need at least 1 subject, 1 image and 8 px images, got {n_subjects}, "
                              f"{n_images}, {image_size}: pass positive sizes")
    if not snr > 0:
        raise safe_io.UserError(f"snr must be positive, got {snr}: pass e.g. --snr 1.0")
    if masks_from is not None:
        masks_from = safe_io.require_dir(masks_from, "point --masks-from at the folder holding the SubjX roi_masks")
        masks = {s: _load_masks(masks_from, s) for s in range(1, n_subjects + 1)}

    # Vertices are generated, planted and simulated in the order of generate_masks' blocks, then written in
    # challenge-space order (sorted by fsaverage vertex, as the real masks'): ``order`` takes one to the other.
    summary, params, order = {}, {}, {}
    for s in range(1, n_subjects + 1):
        summary[s] = {}
        for hemi in utils.HEMISPHERES:
            if masks_from is None:
                labels = generate_masks(seed, s, hemi)
                fsavg_rows = place_on_fsaverage5(labels, hemi)
                mappings = {cls: {0: "Unknown", **{utils.ROI_CODE[r]: r for r in rois}}
                            for cls, rois in utils.ROI_CLASSES.items()}
            else:
                labels, fsavg = masks[s][0][hemi]
                keep = subsample_masks(seed, s, hemi, labels, max_vertices)
                labels = {cls: codes[keep] for cls, codes in labels.items()}
                fsavg_rows = np.flatnonzero(fsavg)[keep]
                mappings = masks[s][1]
            fsavg = np.zeros(utils.N_FSAVERAGE_VERTICES, dtype=np.int64)
            fsavg[fsavg_rows] = 1
            order[s, hemi] = np.argsort(fsavg_rows)
            for cls, codes in labels.items():
                safe_io.atomic_np_save(codes[order[s, hemi]].astype(np.int64), utils.roi_mask_path(root, s, hemi, cls))
            for cls, mapping in mappings.items():
                with safe_io.atomic_path(utils.roi_mapping_path(root, s, cls)) as tmp, open(tmp, "wb") as f:
                    np.save(f, mapping, allow_pickle=True)
            safe_io.atomic_np_save(fsavg, utils.fsaverage_mask_path(root, s, hemi))
            params[s, hemi] = plant_params(seed, s, hemi, labels, snr)
            summary[s][hemi] = {"n_vertices": len(labels["streams"]), "roi_sizes": {
                roi: int((labels[utils.ROI_CLASS[roi]] == utils.ROI_CODE[roi]).sum()) for roi in utils.ROIS}}

    nsd_ids, rows = _image_plan(seed, n_subjects, n_images)
    n_pool = len(nsd_ids)
    where = np.full((n_subjects, n_pool), -1)
    for s, r in enumerate(rows):
        where[s, r] = np.arange(len(r))
    for s in range(1, n_subjects + 1):
        utils.images_dir(root, s).mkdir(parents=True, exist_ok=True)
    # pRF responses are computed chunk by chunk, so the Gabor energy of all images is never held.
    fields = {key: prf_fields(p) for key, p in params.items()}
    n_prf = {key: int((p["kind"] == KIND_PRF).sum()) for key, p in params.items()}
    prf_raw = {key: np.empty((n_images, n_prf[key]), dtype=np.float32) for key in params}
    stats = np.empty((n_pool, N_STATS), dtype=np.float32)
    rng = _rng(seed, 6)
    # PNG encoding releases the GIL: a chunk is saved by threads while the next one renders.
    pending = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in options.progress(range(0, n_pool, CHUNK), "synthetic images", log="end"):
            chunk = _render_chunk(rng, min(CHUNK, n_pool - start), image_size)
            energy, stats[start:start + len(chunk)] = image_features(chunk)
            rows_here = where[:, start:start + len(chunk)]
            for (s, hemi), p in params.items():
                seen = rows_here[s - 1] >= 0
                prf_raw[s, hemi][rows_here[s - 1][seen]] = prf_responses(energy[seen], fields[s, hemi], n_prf[s, hemi])
            jobs = [(im, utils.images_dir(root, s + 1) / f"train-{rows_here[s, i] + 1:04d}_nsd-{nsd_ids[start + i]:05d}.png")
                    for i, im in enumerate(chunk) for s in np.flatnonzero(rows_here[:, i] >= 0)]
            for future in pending:
                future.result()
            pending = [pool.submit(_save_png, *job) for job in jobs]
    stats_z = (stats - stats.mean(0)) / (stats.std(0) + 1e-8)

    for s in range(1, n_subjects + 1):
        r = rows[s - 1]
        safe_io.atomic_np_save(stats[r], truth_dir(root, s) / f"subj{s}_image_stats.npy")
        for hemi in utils.HEMISPHERES:
            p = params[s, hemi]
            prf = p["kind"] == KIND_PRF
            signal = np.empty((n_images, len(prf)), dtype=np.float32)
            signal[:, prf] = prf_raw.pop((s, hemi))
            signal[:, ~prf] = stats_responses(p, stats_z[r])
            sd = signal.std(0)
            signal = (signal - signal.mean(0)) / np.where(sd > 1e-8, sd, np.inf)
            fmri = _rng(seed, 7, s, utils.HEMISPHERES.index(hemi)).standard_normal(signal.shape, dtype=np.float32)
            fmri *= np.sqrt(1 / p["snr"]).astype(np.float32)
            fmri += signal
            k = order[s, hemi]
            safe_io.atomic_np_save(signal[:, k], noise_free_path(root, s, hemi))
            with safe_io.atomic_path(params_path(root, s, hemi)) as tmp:
                np.savez(tmp, sfs=SFS, orientations=ORIENTATIONS, nsd_ids=nsd_ids[r], **{key: v[k] for key, v in p.items()})
            safe_io.atomic_np_save(fmri[:, k], utils.fmri_path(root, s, hemi))
    return summary



# --- NOD -------------------------------------------------------------------------------

# The first HCP-MMP areas in roilbl_mmp.csv order (V1 = 1, V2 = 4, V3 = 5, V4 = 6).
NOD_MMP_AREAS = ["V1", "MST", "V6", "V2", "V3", "V4", "V8", "4"]
# Planted pRF size (Gaussian sigma, fraction of the image side) per visual area.
NOD_PRF_SIGMA = {"V1": 0.05, "V2": 0.07, "V3": 0.09, "V4": 0.12}
# The maps of the real ses-prf_task-prf_params.dscalar.nii (R2 in percent, map 3).
NOD_PRF_MAPS = ["ang", "ecc", "gain", "R2", "rfsize"]
NOD_IMAGE_DEG = 16.0  # visual angle of the image side (the NOD stimuli: 200 px at 16/200 deg per px)
NOD_MESH_RATIO = 32492 / 29696  # fs_LR 32k mesh vertices per listed cortex vertex (the medial wall is left out)


def nod_wnids(n_classes):
    """Made-up WordNet ids, ascending like the 1000 ImageNet classes (class id i + 1 = row i)."""
    return [f"n{1440764 + 97 * i:08d}" for i in range(n_classes)]


def local_contrast_responses(images, x, y, sigma):
    """pRF responses to local contrast: Gaussian-weighted mean of the squared high-pass luminance.

    Parameters
    ----------
    images : uint8 (n, S, S, 3).
    x, y, sigma : arrays (V,), pRF centres and sizes as fractions of the image side.

    Returns
    -------
    responses : np.ndarray float64 (n, V), noise-free.
    """
    from scipy.ndimage import gaussian_filter
    lum = np.asarray(images, dtype=np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
    size = lum.shape[1]
    energy = (lum - gaussian_filter(lum, sigma=(0, size / 32, size / 32))) ** 2
    grid = (np.arange(size) + 0.5) / size
    gy = np.exp(-(grid[None, :] - np.asarray(y)[:, None]) ** 2 / (2 * np.asarray(sigma)[:, None] ** 2))
    gx = np.exp(-(grid[None, :] - np.asarray(x)[:, None]) ** 2 / (2 * np.asarray(sigma)[:, None] ** 2))
    weights = gy[:, :, None] * gx[:, None, :]
    weights /= weights.sum(axis=(1, 2), keepdims=True)
    return energy.reshape(len(energy), -1) @ weights.reshape(len(weights), -1).T


def write_nod_dataset(root, n_subjects=2, n_sessions=1, n_runs=2, n_trials=100, image_size=64,
                      n_vertices=(600, 620), n_subcortical=30, roi_size=70, n_planted=60, snr=1.0,
                      n_classes=1000, seed=0):
    """Write a small ds004496-shaped NOD tree with planted pRF responses under ``root/nod``.

    The files have the structure of the real ones (see nod_utils), only smaller:

    - betas: float32 CIFTI dscalar files with only the CORTEX_LEFT and CORTEX_RIGHT models
      (``n_vertices`` columns each, numbered on meshes with a medial-wall gap),
      ``n_trials`` maps per run named after the stimulus files;
    - events: ``onset, duration, trial_type`` (the class id as a float), ``response_time``
      (``n/a`` where no response), ``stim_file`` (``imagenet/<wnid>/<wnid>_<n>.JPEG``),
      and a ``response`` column in even runs;
    - ``superClassMapping.csv`` (classID wnid, superClassID 1..30, className,
      superClassName; ``n_classes`` rows), ``roilbl_mmp.csv`` (a header line, then
      ``L_<area>_ROI,R_<area>_ROI`` rows), ``MMP_mpmLR32k.mat`` with labels 181.. in the
      CORTEX_LEFT block and 1.. in the CORTEX_RIGHT block, as the real file;
    - pRF: maps ang, ecc, gain, R2 (percent), rfsize over the cortex and ``n_subcortical``
      volume voxels.

    Each subject sees its own ``n_sessions * n_runs * n_trials`` JPEG images once. Every
    hemisphere's V1, V2, V3 and V4 hold ``roi_size`` vertices; ``n_planted`` of them respond
    to the local contrast in a Gaussian receptive field (z-scored signal plus noise of
    variance 1 / ``snr``, so their correlation with the signal is sqrt(snr / (1 + snr))) and
    have a pRF R2 in [30, 90]; the others, and all other vertices, are noise, with R2
    below 10 or NaN. Each run is scaled and shifted by its own gain and offset, which both
    run-wise z-scorings remove.

    Ground truth goes to ``root/synthetic_truth/nod/sub-XX_truth.npz``: ``signal`` (the
    z-scored noise-free responses, trials x cortex, 0 where nothing is planted), ``planted``
    (bool per cortical vertex), and the pRF ``x``, ``y``, ``sigma`` (fractions of the image).

    Returns
    -------
    nod : Path, the NOD root (root/nod).
    """
    import pandas as pd
    import scipy.io
    from PIL import Image

    import nod_utils
    root = Path(root)
    nod = root / "nod"
    rng = _rng(seed, 100)
    n_left, n_right = n_vertices
    n_cortex = n_left + n_right
    meshes = tuple(int(round(n * NOD_MESH_RATIO)) for n in n_vertices)
    safe_io.atomic_write_text('{"Name": "synthetic NOD (ds004496 layout)", "BIDSVersion": "1.8.0"}\n',
                            nod / "dataset_description.json")

    # Atlas: V1..V4 blocks at the start of each hemisphere, the rest spread over other areas;
    # as in the real file, the left cortex carries the labels 181..360.
    areas = {a: i + 1 for i, a in enumerate(NOD_MMP_AREAS)}
    mmp = np.zeros(n_cortex, dtype=np.int64)
    roi_of = np.full(n_cortex, "", dtype=object)
    for start, n, offset in ((0, n_left, nod_utils.N_MMP_AREAS), (n_left, n_right, 0)):
        others = [areas[a] for a in NOD_MMP_AREAS if a not in NOD_PRF_SIGMA]
        mmp[start:start + n] = rng.choice(others, n) + offset
        for k, roi in enumerate(NOD_PRF_SIGMA):
            block = slice(start + k * roi_size, start + (k + 1) * roi_size)
            mmp[block], roi_of[block] = areas[roi] + offset, roi
    with safe_io.atomic_path(nod_utils.mmp_path(nod)) as tmp:
        scipy.io.savemat(tmp, {"glasser_MMP": mmp[None, :].astype(np.float64)})
    rows = [f"L_{a}_ROI,R_{a}_ROI" for a in NOD_MMP_AREAS]
    safe_io.atomic_write_text("???,???\n" + "\n".join(rows) + "\n", nod_utils.roi_labels_path(nod))
    wnids = nod_wnids(n_classes)
    superclass = rng.integers(1, 31, n_classes)
    mapping = pd.DataFrame({"classID": wnids, "superClassID": superclass,
                            "className": [f"class {i + 1}" for i in range(n_classes)],
                            "superClassName": [f"superclass {c}" for c in superclass]})
    safe_io.atomic_write_text(mapping.to_csv(index=False), nod_utils.superclass_path(nod))

    for subj in range(1, n_subjects + 1):
        sub = nod_utils.sub_name(subj)
        rng = _rng(seed, 101, subj)
        # Planted vertices: the first n_planted of each visual block.
        planted = np.zeros(n_cortex, bool)
        for start in (0, n_left):
            for k in range(len(NOD_PRF_SIGMA)):
                planted[start + k * roi_size:start + k * roi_size + n_planted] = True
        idx = np.flatnonzero(planted)
        x, y = np.zeros(n_cortex), np.zeros(n_cortex)
        sigma = np.zeros(n_cortex)
        x[idx], y[idx] = rng.uniform(0.2, 0.8, len(idx)), rng.uniform(0.2, 0.8, len(idx))
        sigma[idx] = [NOD_PRF_SIGMA[r] for r in roi_of[idx]] * rng.uniform(0.8, 1.25, len(idx))
        r2 = np.where(planted, rng.uniform(30, 90, n_cortex), rng.uniform(0, 10, n_cortex))
        r2[(rng.random(n_cortex) < 0.05) & ~planted] = np.nan
        # Image coordinates (y down) to the visual field (degrees, y up), as the pRF maps hold it.
        fx, fy = (x - 0.5) * NOD_IMAGE_DEG, (0.5 - y) * NOD_IMAGE_DEG
        prf = np.stack([np.arctan2(fy, fx), np.hypot(fx, fy), planted * rng.uniform(0.5, 2, n_cortex),
                        r2, sigma * NOD_IMAGE_DEG]).astype(np.float32)
        prf = np.concatenate([prf, np.full((len(NOD_PRF_MAPS), n_subcortical), np.nan, np.float32)], 1)
        nod_utils.write_cortex_dscalar(prf, n_left, nod_utils.prf_params_path(nod, subj), n_subcortical,
                                       map_names=NOD_PRF_MAPS, mesh_sizes=meshes)

        n_total = n_sessions * n_runs * n_trials
        images = np.concatenate([_render_chunk(rng, min(CHUNK, n_total - start), image_size)
                                 for start in range(0, n_total, CHUNK)])
        signal = np.zeros((n_total, n_cortex), np.float32)
        s = local_contrast_responses(images, x[idx], y[idx], sigma[idx])
        signal[:, idx] = (s - s.mean(0)) / s.std(0)
        noisy = signal + rng.standard_normal((n_total, n_cortex)).astype(np.float32) / np.sqrt(snr)

        classes = rng.integers(1, n_classes + 1, n_total)
        trial = 0
        for session in range(1, n_sessions + 1):
            for run in range(1, n_runs + 1):
                rows = slice(trial, trial + n_trials)
                stim = [f"imagenet/{wnids[c - 1]}/{wnids[c - 1]}_{subj}{t:05d}.JPEG"
                        for c, t in zip(classes[rows], range(rows.start, rows.stop))]
                for name, im in zip(stim, images[rows]):
                    path = nod_utils.stimulus_path(nod, name)
                    with safe_io.atomic_path(path) as tmp:
                        Image.fromarray(im).save(tmp, format="JPEG", quality=95)
                answered = rng.random(n_trials) < 0.8
                events = pd.DataFrame({"onset": 4.0 * np.arange(n_trials), "duration": 1.0,
                                       "trial_type": classes[rows].astype(np.float64),
                                       "response_time": np.where(answered, rng.uniform(0.4, 1.5, n_trials), np.nan),
                                       "stim_file": stim})
                if run % 2 == 0:
                    events["response"] = np.where(answered, rng.integers(1, 3, n_trials), np.nan)
                safe_io.atomic_write_text(events.to_csv(sep="\t", index=False, na_rep="n/a"),
                                        nod_utils.events_path(nod, subj, session, run))
                gain, offset = rng.uniform(0.5, 2.0), rng.normal(0, 3)
                nod_utils.write_cortex_dscalar(noisy[rows] * gain + offset, n_left,
                                               nod_utils.beta_path(nod, subj, session, run),
                                               map_names=[Path(n).name for n in stim], mesh_sizes=meshes)
                trial += n_trials
        truth = root / "synthetic_truth" / "nod" / f"{sub}_truth.npz"
        with safe_io.atomic_path(truth) as tmp, open(tmp, "wb") as f:
            np.savez(f, signal=signal, planted=planted, x=x, y=y, sigma=sigma)
    return nod


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    safe_io.check_writable(opts.ROOT)
    if opts.NOD:
        n_runs = max(1, opts.IMAGES // 100)
        nod = write_nod_dataset(opts.ROOT, opts.SUBJECTS, n_sessions=1, n_runs=n_runs, image_size=opts.IMAGE_SIZE,
                                snr=opts.SNR, seed=opts.SEED)
        print(f"wrote a synthetic NOD tree of {opts.SUBJECTS} subjects x {n_runs} runs of 100 trials under {nod}: "
              f"use fit_encoding_models_nod.py --sessions 1 --runs {' '.join(map(str, range(1, n_runs + 1)))}")
        return nod
    existing = [utils.fmri_path(opts.ROOT, s, h) for s in range(1, opts.SUBJECTS + 1) for h in utils.HEMISPHERES]
    if all(p.exists() for p in existing) and not opts.OVERWRITE:
        print(f"{opts.ROOT} already holds a dataset of {opts.SUBJECTS} subjects: skipped (use --overwrite)")
        return None
    summary = write_algonauts_dataset(opts.ROOT, opts.SUBJECTS, opts.IMAGES, opts.IMAGE_SIZE, opts.SEED,
                                      opts.SNR, opts.MASKS_FROM, opts.MAX_VERTICES)
    for s, hemis in summary.items():
        for hemi, info in hemis.items():
            empty = [roi for roi, k in info["roi_sizes"].items() if k == 0]
            print(f"{utils.subj_dir(s)} {hemi}: {info['n_vertices']} vertices, "
                  f"{len(utils.ROIS) - len(empty)} non-empty ROIs (empty: {', '.join(empty) or 'none'})")
    print(f"wrote {opts.IMAGES} images of {opts.IMAGE_SIZE} px per subject and the fMRI under {opts.ROOT}")
    return summary


if __name__ == "__main__":
    main()
