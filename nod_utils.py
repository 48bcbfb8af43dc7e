"""NOD (Natural Object Dataset, OpenNeuro ds004496): betas, labels, HCP-MMP ROIs, pRF R2, dataset.

Layout (``NOD_ROOT``, by default ``ROOT/nod``) is a datalad clone of ds004496 plus the
NOD support files::

    NOD_ROOT/derivatives/ciftify/sub-01/results/ses-imagenet01_task-imagenet_run-1/
        ses-imagenet01_task-imagenet_run-1_beta.dscalar.nii      (100 maps x 59412 cortical grayordinates)
    NOD_ROOT/derivatives/ciftify/sub-01/results/ses-prf_task-prf/ses-prf_task-prf_params.dscalar.nii
    NOD_ROOT/sub-01/ses-imagenet01/func/sub-01_ses-imagenet01_task-imagenet_run-01_events.tsv
    NOD_ROOT/stimuli/imagenet/n01440764/n01440764_10026.JPEG
    NOD_ROOT/supportfiles/{MMP_mpmLR32k.mat, roilbl_mmp.csv, superClassMapping.csv}

What the real files hold, and the conventions (those of the NOD authors'
``validation/nod_utils.py``, github.com/BNUCNL/NOD-fmri, and of the paper's code):

- ImageNet sessions ``ses-imagenet01..04`` of sub-01..09, runs 1..10, 100 trials per run;
  the ciftify result folders number runs without padding (``run-1``), the BIDS events
  files with two digits (``run-01``).
- A beta file is float32, 100 maps x 59412 grayordinates: only the CIFTI_STRUCTURE_CORTEX_LEFT
  (29696) and _RIGHT (29716) surface models, in that order; map i is named after the
  stimulus of row i of the run's events file (``n01440764_10026.JPEG``). Other files
  may add subcortical volume models: only the two cortex models are ever kept.
- Betas are z-scored within each run, then stacked in session, run, trial order and cached
  as float32 ``.npy`` in the support folder, one cache per normalisation. ``zscore="run"``
  (the authors'): one mean and one std over the whole run block, as
  ``scipy.stats.zscore(block, axis=None)``; ``"vertex"``: each vertex within each run.
- Events: ``onset, duration, trial_type, response_time, stim_file`` (some runs add
  ``response``); ``trial_type`` is the 1-based ImageNet class id written as a float
  (``521.0``), ``stim_file`` the image path under ``stimuli/`` (``imagenet/<wnid>/<wnid>_<n>.JPEG``).
- ``superClassMapping.csv``: ``classID`` (the wnid), ``superClassID`` (1..30), ``className``,
  ``superClassName``, 1000 rows in class-id order; ``sub-XX_imagenet-label.csv``
  (class_id, image_name, superclass_id) is written next to it.
- ``MMP_mpmLR32k.mat`` holds ``glasser_MMP``, one HCP-MMP label per cortical grayordinate.
  Area i of ``roilbl_mmp.csv`` (a header line, then rows ``L_<area>_ROI,R_<area>_ROI``)
  carries labels i and i + 180. In the real file the CORTEX_LEFT block carries 181..360
  and the CORTEX_RIGHT block 1..180. ``hemisphere_convention="anatomical"`` (default)
  takes the left hemisphere from the CIFTI brain models (the CORTEX_LEFT grayordinates)
  whatever the label numbers; ``"authors"`` reproduces the authors' code, which takes
  labels 1..180 as 'left' (on the real files, right-cortex vertices).
- pRF parameters: maps ang, ecc, gain, R2, rfsize (R2 in percent) of
  ``ses-prf_task-prf_params.dscalar.nii``; R2 is map 3, NaN becomes 0. The vertices of an
  area are the last ``k`` of ``np.argsort`` of their R2 (float64, cortical index order),
  as the authors' ``np.argsort(r2)[-50:]``.
"""

import glob
import hashlib
import json
import re
from pathlib import Path, PurePosixPath

import numpy as np

import options
import safe_io
import utils

N_SESSIONS, N_RUNS, N_TRIALS = 4, 10, 100
N_CORTEX_LEFT, N_CORTEX_RIGHT = 29696, 29716  # the real fs_LR 32k cortex without the medial wall
N_CORTEX = N_CORTEX_LEFT + N_CORTEX_RIGHT
N_MMP_AREAS = 180
CORTEX_STRUCTURES = ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")
PRF_R2_ROW = 3
NOD_ROIS = ("V1", "V2", "V3", "V4")
HEMISPHERE_CONVENTIONS = ("anatomical", "authors")
ZSCORES = ("run", "vertex")
# NOD ROI -> NSD (Algonauts) ROI whose models extract the features, ventral or dorsal.
NSD_ROI = {"ventral": {"V1": "V1v", "V2": "V2v", "V3": "V3v", "V4": "hV4"},
           "dorsal": {"V1": "V1d", "V2": "V2d", "V3": "V3d", "V4": "hV4"}}
DATASET_URL = "https://github.com/OpenNeuroDatasets/ds004496.git"
SUPPORT_URL = "https://github.com/BNUCNL/NOD-fmri (folder validation/supportfiles)"


def check_conventions(zscore="run", hemisphere_convention="anatomical"):
    """Raise a UserError for an unknown normalisation or hemisphere convention."""
    if zscore not in ZSCORES:
        raise safe_io.UserError(f"unknown ZSCORE {zscore!r}: use run (one mean and std per run, the authors') "
                              "or vertex (per vertex within each run)")
    if hemisphere_convention not in HEMISPHERE_CONVENTIONS:
        raise safe_io.UserError(f"unknown HEMISPHERE_CONVENTION {hemisphere_convention!r}: use anatomical "
                              "(CIFTI CORTEX_LEFT/RIGHT) or authors (left = HCP-MMP labels 1..180)")


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
    """The image of an events file's ``stim_file`` (``imagenet/<wnid>/<file>``, or without 'imagenet/')."""
    rel = _stim_parts(stim_file)
    rel = rel[1:] if rel[:1] == ("imagenet",) else rel
    return Path(nod).joinpath("stimuli", "imagenet", *rel)


def _stim_parts(stim_file):
    """The parts of a ``stim_file`` path, with either separator."""
    return PurePosixPath(str(stim_file).replace("\\", "/")).parts


def mmp_path(nod):
    return support_dir(nod) / "MMP_mpmLR32k.mat"


def roi_labels_path(nod):
    return support_dir(nod) / "roilbl_mmp.csv"


def superclass_path(nod):
    return support_dir(nod) / "superClassMapping.csv"


def label_csv_path(nod, subj):
    return support_dir(nod) / f"{sub_name(subj)}_imagenet-label.csv"


def _beta_cache_stem(subj, sessions, runs, zscore):
    """The start of the names of the caches of one normalisation, sessions and runs."""
    key = hashlib.sha1(json.dumps([zscore, list(map(int, sessions)), list(map(int, runs))]).encode()).hexdigest()[:8]
    return f"{sub_name(subj)}_imagenet-beta_zscore-{zscore}_{len(sessions)}ses-{len(runs)}runs_{key}"


def beta_cache_path(nod, subj, sessions, runs, zscore="run"):
    """The cached z-scored stack. Its name encodes the normalisation, sessions and runs it holds and a key of
    the names, sizes and mtimes of the beta and events files it is made from (utils.file_key), so that
    changed inputs make a new cache; every one of them must exist (require_nod_file)."""
    inputs = [p for s in sessions for r in runs for p in (beta_path(nod, subj, s, r), events_path(nod, subj, s, r))]
    for path in inputs:
        require_nod_file(nod, path)
    return support_dir(nod) / f"{_beta_cache_stem(subj, sessions, runs, zscore)}_{utils.file_key(inputs)}.npy"


def require_nod_file(nod, path):
    """Raise a UserError naming ``path`` and the datalad command that fetches it, unless it exists."""
    path = Path(path)
    if path.is_file():
        return path
    nod = Path(nod)
    if path.parent == support_dir(nod):
        raise safe_io.UserError(f"missing NOD support file {path}: download {path.name} from {SUPPORT_URL} "
                              f"into {path.parent}")
    rel = path.relative_to(nod) if path.is_relative_to(nod) else path
    clone = "" if (nod / ".datalad").is_dir() else f"datalad clone {DATASET_URL} {nod} && "
    raise safe_io.UserError(f"missing NOD file {path}: fetch it with `{clone}cd {nod} && datalad get {rel}`")


# --- CIFTI -----------------------------------------------------------------------------

def read_cortex_dscalar(path, dtype=np.float32):
    """The cortical columns of a dscalar CIFTI-2 file, found from its brain models.

    Returns
    -------
    data : np.ndarray (n_maps, n_cortex) of ``dtype``, CORTEX_LEFT columns then CORTEX_RIGHT
        columns, each in file order; other brain models (subcortical volumes) are dropped.
    n_left : int, the number of CORTEX_LEFT columns (29696 in the real files).
    map_names : list of str, the names of the maps (rows).
    """
    import nibabel as nib
    try:
        img = nib.load(str(path))
        names = [str(n) for n in img.header.get_axis(0).name]
        structures = {name: slc for name, slc, _ in img.header.get_axis(1).iter_structures()}
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:
        raise safe_io.UserError(f"cannot read {path} as a CIFTI-2 dscalar file ({type(e).__name__}: {e}): "
                              "fetch it again with `datalad get`") from None
    missing = [s for s in CORTEX_STRUCTURES if s not in structures]
    if missing:
        raise safe_io.UserError(f"{path} has no {', '.join(missing)} brain model: expected a ciftify "
                              "dscalar file on the fs_LR 32k surfaces")
    left, right = (np.arange(data.shape[1])[structures[s]] for s in CORTEX_STRUCTURES)
    return np.ascontiguousarray(data[:, np.concatenate([left, right])]), len(left), names


def write_cortex_dscalar(data, n_left, path, n_subcortical=0, map_names=None, mesh_sizes=None):
    """Write a dscalar CIFTI-2 file whose columns are cortex-left, cortex-right and subcortical voxels.

    Parameters
    ----------
    data : array (n_maps, n_left + n_right + n_subcortical), written as float32.
    n_left : int, the number of left-cortex columns; the next ones up to the subcortical
        block are right cortex.
    n_subcortical : int, trailing columns written as a volume model (thalamus).
    map_names : list of str, one per map (default map0, map1, ...).
    mesh_sizes : (int, int), vertices of the left and right meshes (default: the column
        counts). Larger meshes leave a gap of unlisted vertices in the middle of each
        hemisphere, as the medial wall of the real fs_LR 32k files (32492 per mesh).
    """
    import nibabel as nib
    from nibabel.cifti2 import cifti2_axes as ax
    data = np.asarray(data, dtype=np.float32)
    n_right = data.shape[1] - n_left - n_subcortical
    sizes = mesh_sizes or (n_left, n_right)

    def surface(n, size, name):
        vertices = np.arange(n) + (np.arange(n) >= n // 2) * (size - n)
        return ax.BrainModelAxis.from_surface(vertices, size, name)

    bm = surface(n_left, sizes[0], "CortexLeft") + surface(n_right, sizes[1], "CortexRight")
    if n_subcortical:
        bm = bm + ax.BrainModelAxis.from_mask(np.ones((n_subcortical, 1, 1), bool), "ThalamusLeft", affine=np.eye(4))
    names = map_names or [f"map{i}" for i in range(data.shape[0])]
    header = nib.cifti2.Cifti2Header.from_axes((ax.ScalarAxis(names), bm))
    img = nib.Cifti2Image(data, header)
    img.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SCALARS")
    with safe_io.atomic_path(path) as tmp:
        nib.save(img, tmp)


# --- Betas and labels ------------------------------------------------------------------

def zscore_runs(betas, run_lengths, zscore="run"):
    """Z-score each run block of a stack of betas (population std).

    Parameters
    ----------
    betas : array (n_trials_total, n_vertices), runs stacked in order.
    run_lengths : list of int, trials per run, summing to n_trials_total.
    zscore : "run": one mean and one std over the whole block, as
        ``scipy.stats.zscore(block, axis=None)`` (the authors'); "vertex": each vertex
        (column) within the block, as ``scipy.stats.zscore(block, axis=0)``. A constant
        block or vertex becomes 0 (scipy: NaN).

    Returns
    -------
    z : np.ndarray float32, same shape (computed in float64).
    """
    betas = np.asarray(betas)
    if sum(run_lengths) != len(betas):
        raise ValueError(f"run lengths sum to {sum(run_lengths)} but there are {len(betas)} rows")
    axis = None if zscore == "run" else 0
    out = np.empty(betas.shape, dtype=np.float32)
    start = 0
    for n in run_lengths:
        block = betas[start:start + n].astype(np.float64)
        std = block.std(axis=axis, keepdims=True)
        out[start:start + n] = np.divide(block - block.mean(axis=axis, keepdims=True), std,
                                         out=np.zeros_like(block), where=std > 0)
        start += n
    return out


def check_beta_run(path, data, map_names, events, events_file):
    """One-line UserErrors unless a run's betas are finite and their maps follow the events' trials.

    The real beta maps are named after the stimulus files (``n01440764_10026.JPEG``),
    map i for row i of the events file.
    """
    stims = [PurePosixPath(str(s).replace("\\", "/")).name for s in events["stim_file"]]
    if len(map_names) != len(stims):
        raise safe_io.UserError(f"{path} has {len(map_names)} beta maps but {events_file} lists {len(stims)} "
                              "trials: fetch both from the same ds004496 release")
    names = [PurePosixPath(str(n).replace("\\", "/")).name for n in map_names]
    bad = [i for i, (a, b) in enumerate(zip(names, stims)) if a != b]
    if bad:
        raise safe_io.UserError(f"map {bad[0]} of {path} is named {map_names[bad[0]]!r} but row {bad[0]} of "
                              f"{events_file} shows {stims[bad[0]]!r} ({len(bad)} of {len(stims)} differ): "
                              "betas and events must list the same stimuli in the same order")
    bad = safe_io.first_nonfinite(data)
    if bad is not None:
        row, col = bad
        raise safe_io.UserError(f"{path} has a non-finite beta ({data[row, col]}) in map {row}, cortical column "
                              f"{col}: fetch it again with `datalad get`")


def read_runs(nod, subj, sessions, runs):
    """Yield the cortical betas (n_trials, n_cortex) of each run, in session, run order, each checked against
    its events file (``check_beta_run``) and the first run's grayordinates; every beta file must exist."""
    pairs = [(s, r) for s in sessions for r in runs]
    for s, r in pairs:
        require_nod_file(nod, beta_path(nod, subj, s, r))
    first = None
    for s, r in options.progress(pairs, f"{sub_name(subj)} betas", log="end"):
        path = beta_path(nod, subj, s, r)
        data, left, names = read_cortex_dscalar(path)
        if first is not None and (data.shape[1], left) != first:
            raise safe_io.UserError(f"{path} has {data.shape[1]} cortical grayordinates ({left} left) but "
                                    f"{beta_path(nod, subj, *pairs[0])} has {first[0]} ({first[1]} left): "
                                    "fetch all betas from the same ds004496 release")
        check_beta_run(path, data, names, read_events(nod, subj, s, r), events_path(nod, subj, s, r))
        first = data.shape[1], left
        yield data


def load_betas(nod, subj, sessions=range(1, N_SESSIONS + 1), runs=range(1, N_RUNS + 1), zscore="run",
               overwrite=False):
    """Run-wise z-scored cortical betas of one subject, cached in the support folder (``beta_cache_path``;
    ``overwrite`` rebuilds the cache, a damaged one is rebuilt).

    Each run is checked against its events file (map names = stimulus file names, in row
    order) before it is z-scored (``zscore_runs``).

    Returns
    -------
    betas : np.memmap float32 (n_sessions * n_runs * n_trials, n_cortex), rows in session,
        run, trial order (the order of the events files), read-only.
    """
    check_conventions(zscore)
    sessions, runs = list(sessions), list(runs)
    cache = beta_cache_path(nod, subj, sessions, runs, zscore)
    cached = None if overwrite else safe_io.cached_array(cache, None, np.float32)
    if cached is not None:
        return cached
    betas = np.concatenate([zscore_runs(data, [len(data)], zscore) for data in read_runs(nod, subj, sessions, runs)])
    for old in support_dir(nod).glob(f"{glob.escape(_beta_cache_stem(subj, sessions, runs, zscore))}_*.npy"):
        old.unlink()
    safe_io.atomic_np_save(betas, cache)
    return np.load(cache, mmap_mode="r")


def beta_shape(nod, subj, sessions, runs, zscore="run", overwrite=False):
    """The shape (n_trials, n_cortex) that ``load_betas`` returns, every input checked as it checks them but
    nothing written: the cache's shape, or with ``overwrite`` or no sound cache, every run read and checked."""
    check_conventions(zscore)
    cache = beta_cache_path(nod, subj, sessions, runs, zscore)
    cached = None if overwrite else safe_io.cached_array(cache, None, np.float32)
    if cached is not None:
        return cached.shape
    shapes = [data.shape for data in read_runs(nod, subj, sessions, runs)]
    return sum(n for n, _ in shapes), shapes[0][1]


def read_events(nod, subj, session, run):
    """The events table of one run (pandas DataFrame with trial_type and stim_file); a stim_file that leaves
    the stimuli folder (an absolute path, or one with '..') is a UserError naming the file and row."""
    path = require_nod_file(nod, events_path(nod, subj, session, run))
    events = safe_io.read_csv(path, "expected a ds004496 ImageNet events file; fetch it again with `datalad get`",
                              columns=("trial_type", "stim_file"), sep="\t")
    for row, stim in enumerate(events["stim_file"]):
        parts = _stim_parts(stim)
        if not parts or parts[0] == "/" or ".." in parts:
            raise safe_io.UserError(f"row {row} of {path} names the stimulus {stim!r}, outside "
                                    f"{Path(nod) / 'stimuli'}: expected imagenet/<wnid>/<file>.JPEG")
    return events


def trial_labels(nod, subj, sessions=range(1, N_SESSIONS + 1), runs=range(1, N_RUNS + 1)):
    """The trial labels of one subject, from its events files and superClassMapping.csv (nothing written).

    Returns
    -------
    labels : pandas DataFrame (class_id, image_name, superclass_id), one row per trial in
        session, run, trial order; class_id is 1-based as in the events files.
    """
    import pandas as pd
    path = require_nod_file(nod, superclass_path(nod))
    mapping = safe_io.read_csv(path, f"download superClassMapping.csv from {SUPPORT_URL}", columns=("superClassID",))
    events = pd.concat([read_events(nod, subj, s, r) for s in sessions for r in runs], ignore_index=True)
    trial_type = pd.to_numeric(events["trial_type"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(trial_type) | (trial_type != np.round(trial_type)) | (trial_type < 1) \
        | (trial_type > len(mapping))
    if bad.any():
        raise safe_io.UserError(f"trial_type {events['trial_type'][np.argmax(bad)]} of {sub_name(subj)} is not a "
                              f"class id in 1..{len(mapping)}, the classes of {path}: check the events files")
    class_id = trial_type.astype(np.int64)
    labels = pd.DataFrame({"class_id": class_id, "image_name": events["stim_file"].astype(str),
                           "superclass_id": mapping["superClassID"].to_numpy()[class_id - 1]})
    return labels


def save_labels(nod, subj, labels):
    """Write the ``trial_labels`` of a subject to ``sub-XX_imagenet-label.csv`` in the support folder."""
    safe_io.atomic_write_text(labels.to_csv(index=False), label_csv_path(nod, subj))


def stimulus_paths(nod, labels):
    """The image of every trial of ``labels`` (trial_labels), each of which must exist."""
    return [require_nod_file(nod, stimulus_path(nod, name)) for name in labels["image_name"]]


def check_sizes(nod, subj, beta_shape, n_labels):
    """UserErrors unless the betas (``beta_shape``) have one row per events row (``n_labels``) and one column
    per grayordinate of the HCP-MMP atlas."""
    if beta_shape[0] != n_labels:
        raise safe_io.UserError(f"{sub_name(subj)} has {beta_shape[0]} beta maps but {n_labels} events rows: "
                                "each run's events file must list one row per trial")
    n_mmp = len(load_mmp(nod))
    if beta_shape[1] != n_mmp:
        raise safe_io.UserError(f"the betas of {sub_name(subj)} ({beta_path(nod, subj, 1, 1).parent.parent}) "
                                f"have {beta_shape[1]} cortical grayordinates but {mmp_path(nod)} labels {n_mmp} "
                                f"(real ds004496: {N_CORTEX} = {N_CORTEX_LEFT} left + {N_CORTEX_RIGHT} right): "
                                "use files on the same fs_LR 32k surfaces")


# --- ROIs and pRF ----------------------------------------------------------------------

def mmp_area_index(nod):
    """Dict area name -> HCP-MMP area number (1..180), the row of ``L_<area>_ROI`` in roilbl_mmp.csv."""
    path = require_nod_file(nod, roi_labels_path(nod))
    names = []
    # The header line of the real file is not UTF-8: decode bytes one to one.
    for line in path.read_bytes().decode("latin-1").splitlines():
        m = re.match(r'^"?L_(.+?)_ROI\b', line.strip())
        if m:
            names.append(m.group(1))
    if not names:
        raise safe_io.UserError(f"{path} has no L_<area>_ROI rows: download roilbl_mmp.csv from {SUPPORT_URL}")
    return {name: i + 1 for i, name in enumerate(names)}


def load_mmp(nod):
    """HCP-MMP label per cortical grayordinate, int64 (n_cortex,): 1..360, 0 none."""
    import scipy.io
    path = require_nod_file(nod, mmp_path(nod))
    try:
        labels = scipy.io.loadmat(str(path))["glasser_MMP"]
    except (KeyError, ValueError, OSError) as e:
        raise safe_io.UserError(f"cannot read glasser_MMP from {path} ({type(e).__name__}: {e}): "
                              f"download MMP_mpmLR32k.mat from {SUPPORT_URL}") from None
    return np.asarray(labels).ravel().astype(np.int64)


def roi_vertices(nod, roi, hemisphere, n_left, convention="anatomical"):
    """Sorted cortical indices (int64) of an HCP-MMP area ('V1', 'V4', ...) in one hemisphere.

    Parameters
    ----------
    n_left : int, the number of CORTEX_LEFT grayordinates (from the CIFTI brain models).
    convention : "anatomical": the area's vertices (label i or i + 180) among the first
        ``n_left`` grayordinates for the left hemisphere, among the others for the right;
        "authors": label i for 'left' and i + 180 for 'right', wherever they lie (on the
        real files, 'left' is then right cortex).
    """
    check_conventions(hemisphere_convention=convention)
    index = mmp_area_index(nod)
    if roi not in index:
        raise safe_io.UserError(f"unknown HCP-MMP area {roi!r}: valid names include {', '.join(NOD_ROIS)} "
                              f"(all are listed in {roi_labels_path(nod)})")
    right = utils.hemi_code(hemisphere) == "rh"
    mmp = load_mmp(nod)
    if convention == "authors":
        return np.flatnonzero(mmp == index[roi] + (N_MMP_AREAS if right else 0)).astype(np.int64)
    in_area = (mmp > 0) & ((mmp - 1) % N_MMP_AREAS + 1 == index[roi])
    in_hemi = (np.arange(len(mmp)) >= n_left) == right
    return np.flatnonzero(in_area & in_hemi).astype(np.int64)


def load_prf_r2(nod, subj):
    """pRF R2 per cortical grayordinate and the CORTEX_LEFT count of the pRF file, checked: no Inf, and one
    value per grayordinate of the HCP-MMP atlas.

    Returns
    -------
    r2 : np.ndarray float64 (n_cortex,), map 3 of the parameters, NaN -> 0.
    n_left : int.
    """
    path = require_nod_file(nod, prf_params_path(nod, subj))
    params, n_left, names = read_cortex_dscalar(path, dtype=np.float64)
    if params.shape[0] <= PRF_R2_ROW:
        raise safe_io.UserError(f"{path} has {params.shape[0]} maps: expected the pRF parameters with R2 "
                              f"in map {PRF_R2_ROW}")
    named = [i for i, n in enumerate(names) if str(n).strip().lower() == "r2"]
    if named and named[0] != PRF_R2_ROW:
        raise safe_io.UserError(f"{path} names map {named[0]} 'R2' (maps: {', '.join(map(str, names))}) but R2 is "
                              f"read from map {PRF_R2_ROW}, as in ds004496: fetch the ds004496 pRF file")
    r2 = params[PRF_R2_ROW]
    if np.isinf(r2).any():
        vertex = int(np.flatnonzero(np.isinf(r2))[0])
        raise safe_io.UserError(f"{path} has an infinite pRF R2 ({r2[vertex]}) at cortical vertex {vertex}: it would "
                                "win the top-R2 selection; fetch the ds004496 pRF file again")
    n_mmp = len(load_mmp(nod))
    if len(r2) != n_mmp:
        raise safe_io.UserError(f"{path} has {len(r2)} cortical grayordinates but {mmp_path(nod)} labels {n_mmp}: "
                                f"use files on the same fs_LR 32k surfaces (real: {N_CORTEX})")
    return np.nan_to_num(r2, nan=0.0), n_left


def top_vertices(r2, candidates, k=50):
    """The ``k`` candidates with the largest R2, as the authors' ``np.argsort(r2)[-k:]``.

    Parameters
    ----------
    r2 : array (n_cortex,), compared as float64.
    candidates : int array of cortical indices, ascending.

    Returns
    -------
    top : np.ndarray int64 (min(k, len(candidates)),), in ascending R2 (best last). Ties
        at the cut fall as numpy's default argsort leaves them: it is not stable, and its
        order of equal values depends on the numpy version and the CPU's SIMD sort, so the
        same numpy on the same kind of CPU picks what the authors' code picks.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    order = np.argsort(np.asarray(r2, dtype=np.float64)[candidates])
    return candidates[order[len(order) - min(k, len(order)):]]


def select_vertices(nod, subj, roi, hemisphere, k=50, convention="anatomical"):
    """The top-``k`` pRF-R2 vertices of an HCP-MMP area in one hemisphere of a subject (best last).

    A line warns when some of them have R2 = 0 (ties, picked by argsort order).
    """
    r2, n_left = load_prf_r2(nod, subj)
    top = top_vertices(r2, roi_vertices(nod, roi, hemisphere, n_left, convention), k)
    zero = int(np.sum(r2[top] <= 0))
    if zero:
        options.say(f"warning: {sub_name(subj)} {utils.hemi_code(hemisphere)} {roi}: {zero} of the {len(top)} "
                    f"selected vertices have pRF R2 <= 0 in {prf_params_path(nod, subj)}")
    return top


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
    zscore : "run" or "vertex" (see ``zscore_runs``).
    hemisphere_convention : "anatomical" or "authors" (see ``roi_vertices``).
    overwrite : rebuild the beta cache (see ``load_betas``).

    Attributes
    ----------
    images : np.memmap uint8 (n, S, S, 3), the decoded stimuli (utils.image_cache).
    betas : np.memmap float32 (n, n_cortex), z-scored within runs.
    labels : pandas DataFrame (class_id, image_name, superclass_id).
    train, test : np.ndarray int64, the seeded 85/15 split of the rows (utils.train_test_split).
    """

    def __init__(self, root, subj, nod_root=None, sessions=range(1, N_SESSIONS + 1),
                 runs=range(1, N_RUNS + 1), image_size=224, zscore="run", hemisphere_convention="anatomical",
                 overwrite=False):
        check_conventions(zscore, hemisphere_convention)
        self.nod, self.subj, self.image_size = nod_dir(root, nod_root), int(subj), image_size
        self.hemisphere_convention = hemisphere_convention
        self.labels = trial_labels(self.nod, subj, sessions, runs)
        self.betas = load_betas(self.nod, subj, sessions, runs, zscore, overwrite)
        check_sizes(self.nod, subj, self.betas.shape, len(self.labels))
        paths = stimulus_paths(self.nod, self.labels)
        self.images = utils.image_cache(paths, image_size, utils.cache_dir(root), name=f"nod_{sub_name(subj)}")
        save_labels(self.nod, subj, self.labels)
        self.train, self.test = utils.train_test_split(len(paths))

    def __len__(self):
        return len(self.labels)

    def roi_fmri(self, roi, hemisphere, k=50):
        """(sorted vertices (k,), responses float32 (n, k)) of the top-``k`` pRF-R2 vertices of an area."""
        vertices = np.sort(select_vertices(self.nod, self.subj, roi, hemisphere, k, self.hemisphere_convention))
        return vertices, np.ascontiguousarray(self.betas[:, vertices])
