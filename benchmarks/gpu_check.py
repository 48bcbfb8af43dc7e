"""GPU check: CL training, feature extraction and the encoding engine on CUDA.

On a synthetic subject (written on first use under ROOT), with a seeded random AlexNet:
1. trains one CL epoch on CUDA through cl_model_training.py in PRECISION (channels_last is
   the training loop's CUDA path) and reports training images/s;
2. extracts the features of every image on CUDA and reports images/s;
3. runs the encoding engine on those same features for every non-empty lh ROI, once on CUDA
   and once on the CPU, and asserts that every voxel's CV r and test r agree within
   TOLERANCE (the same features on both sides, so only the engine's arithmetic differs);
   reports the encoding time per ROI on each device;
4. runs the engine on CUDA in both precisions (fp64 and mixed, encoding.ENGINE_PRECISIONS) for
   all those ROIs in one shared pass with PRECISION_COMPONENTS components, reports the PCA stage
   and whole-pass times side by side, and asserts that every voxel's CV r and test r agree
   within MIXED_TOLERANCE, with the same best layers and alphas;
5. times one full-size fold's PCA (top 1000 eigenpairs of a FULL_SIZE_ROWS-row Gram matrix of
   power-law features) in both precisions: the ratio a full-size run gets on this GPU (fewer
   rows, for a dry run, keep the full size's ratio of components to rows).
Without CUDA it prints one line saying it was skipped and exits 0.

    python benchmarks/gpu_check.py            # make gpu-check
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cl_model_training  # noqa: E402
import encoding  # noqa: E402
import models  # noqa: E402
import synthetic_data  # noqa: E402
import options  # noqa: E402
import utils  # noqa: E402

# Rows of a fold at full size (Subj1: 9841 images, 85% train, 5 folds), where k = encoding.N_COMPONENTS.
FOLD_ROWS = 6692

# --- Options ---
ROOT = "benchmarks/output/gpu_check"  # synthetic dataset and outputs (written on first use)
N_IMAGES = 2000  # images of the synthetic subject
IMAGE_SIZE = 224  # side of the images (the protocol's)
TRAIN_ROI = "EBA"  # ROI of the CL training epoch
BATCH_SIZE = 1024  # training batch size (the paper's)
TOLERANCE = 1e-6  # largest allowed |CUDA - CPU| difference of a voxel's CV r or test r
PRECISION_COMPONENTS = 200  # PCA components of step 4: to the 1360-row folds of 2000 images what 1000 is to the full size's 6692 (mixed refines only where 2 x components <= half the fold)
MIXED_TOLERANCE = 1e-5  # largest allowed |mixed - fp64| difference of a voxel's CV r or test r
FULL_SIZE_ROWS = FOLD_ROWS  # rows of the Gram matrix of step 5 (FOLD_ROWS: a real full-size fold)
PRECISION = "fp32"  # training arithmetic of the CL epoch: fp32 (the default) or bf16
DEVICE = "cuda"  # the device checked against the CPU (cpu: a dry run of this script on a machine without a GPU)
# ---


def main(argv=None):
    import gpu_check
    opts = options.parse_options(gpu_check, argv)
    dev = opts.DEVICE
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped, CUDA is not available on this machine")
        return None
    torch.backends.cudnn.benchmark = True
    root = Path(opts.ROOT)
    if not utils.fmri_path(root, 1, "lh").is_file():
        synthetic_data.write_algonauts_dataset(root, n_subjects=1, n_images=opts.N_IMAGES, image_size=256, seed=0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}; {opts.N_IMAGES} images at {opts.IMAGE_SIZE} px")

    path = cl_model_training.main.__wrapped__(
        ["--root", str(root), "--roi", opts.TRAIN_ROI, "--epochs", "1", "--weights", "none", "--device", dev,
         "--batch-size", str(opts.BATCH_SIZE), "--image-size", str(opts.IMAGE_SIZE), "--precision", opts.PRECISION, "--overwrite"])
    epoch = json.loads(models.log_path(path).read_text())[-1]
    n_train = len(utils.train_test_split(opts.N_IMAGES)[0])
    print(f"CL training ({opts.PRECISION}, channels_last): {n_train / epoch['seconds']:.0f} images/s "
          f"(one epoch of {n_train} images with its held-out loss, {epoch['seconds']:.1f} s)")

    images = utils.subject_images(root, 1, opts.IMAGE_SIZE)
    alexnet = utils.load_alexnet("none", 0)
    utils.extract_features(alexnet, images[:256], 256, dev)  # warm-up: cuDNN autotuning
    timer = encoding.StageTimer(dev)
    with timer("features"):
        feats = utils.extract_features(alexnet, images, 256, dev)
    seconds = timer.seconds["features"]
    print(f"feature extraction: {len(images) / seconds:.0f} images/s (all 8 layers, {seconds:.1f} s)")

    train, test = utils.train_test_split(len(images))
    folds = utils.cv_folds(train)
    rois = [r for r in utils.ROIS if utils.roi_voxel_count(root, 1, "lh", r) >= 20]
    devices = (dev, "cpu")
    worst, times = 0.0, {device: {} for device in devices}
    for roi in rois:
        fmri = utils.load_fmri(root, 1, "lh", utils.roi_voxel_indices(root, 1, "lh", roi))
        out = {}
        for device in devices:
            timer = encoding.StageTimer(device)
            with timer("encode"):
                out[device] = encoding.encode_roi(feats, fmri, train, test, folds, device=device)
            times[device][roi] = timer.seconds["encode"]
        for key in ("cv_r", "test_r"):
            diff = float(np.abs(out[dev][key] - out["cpu"][key]).max())
            worst = max(worst, diff)
            if diff > opts.TOLERANCE:
                raise SystemExit(f"gpu_check FAILED: {roi} {key} differs by {diff:.2e} between CUDA and CPU "
                                 f"(tolerance {opts.TOLERANCE:g})")
        if out[dev]["best_layer"] != out["cpu"]["best_layer"]:
            raise SystemExit(f"gpu_check FAILED: {roi} best layer {out[dev]['best_layer']} on CUDA, "
                             f"{out['cpu']['best_layer']} on the CPU")
    for device in devices:
        t = np.array(list(times[device].values()))
        print(f"encoding on {device:4s}: {t.mean():.2f} s per ROI (mean over {len(t)} ROIs, {t.sum():.1f} s in all)")
    mixed_worst = check_precisions(opts, root, feats, rois, train, test, folds)
    time_full_size_pca(opts)
    print(f"gpu_check passed: CV r and test r of every voxel agree within {worst:.1e} between {dev} and the CPU "
          f"(tolerance {opts.TOLERANCE:g}), within {mixed_worst:.1e} between the precisions "
          f"(tolerance {opts.MIXED_TOLERANCE:g})")
    return worst


def check_precisions(opts, root, feats, rois, train, test, folds):
    """Step 4: every ROI in one pass on the device in each engine precision; the largest |mixed - fp64| r."""
    dev = opts.DEVICE
    voxels = np.unique(np.concatenate([utils.roi_voxel_indices(root, 1, "lh", r) for r in rois]))
    fmri = utils.load_fmri(root, 1, "lh", voxels)
    columns = {r: np.searchsorted(voxels, utils.roi_voxel_indices(root, 1, "lh", r)) for r in rois}
    res, seconds = {}, {}
    for precision in encoding.ENGINE_PRECISIONS:
        timer = encoding.StageTimer(dev)
        with timer("pass"):
            res[precision] = encoding.encode_rois(feats, fmri, columns, train, test, folds,
                                                  n_components=opts.PRECISION_COMPONENTS, device=dev, timer=timer,
                                                  precision=precision)
        seconds[precision] = timer.seconds
    exact, mixed = res["fp64"], res["mixed"]
    worst = max(float(np.abs(exact[r][key] - mixed[r][key]).max()) for r in rois for key in ("cv_r", "test_r"))
    changed = [r for r in rois if exact[r]["best_layer"] != mixed[r]["best_layer"]
               or not np.array_equal(exact[r]["alpha_index"], mixed[r]["alpha_index"])]
    a, b = seconds["fp64"], seconds["mixed"]
    print(f"engine precisions on {dev} ({len(rois)} ROIs, {len(voxels)} voxels in one pass, "
          f"{opts.PRECISION_COMPONENTS} components of {len(folds[0][0])}-row folds): PCA fp64 {a['pca']:.2f} s, "
          f"mixed {b['pca']:.2f} s ({a['pca'] / b['pca']:.2f}x); whole pass fp64 {a['pass']:.2f} s, mixed "
          f"{b['pass']:.2f} s ({a['pass'] / b['pass']:.2f}x); max |mixed - fp64| of CV r and test r {worst:.1e}")
    if worst > opts.MIXED_TOLERANCE or changed:
        raise SystemExit(f"gpu_check FAILED: mixed precision moved r by {worst:.2e} (tolerance {opts.MIXED_TOLERANCE:g})"
                         f" or changed the best layer or alphas of {changed or 'no ROI'}")
    return worst


def time_full_size_pca(opts):
    """Step 5: one full-size fold's top 1000 eigenpairs in each engine precision, timed on the device."""
    dev, n = opts.DEVICE, opts.FULL_SIZE_ROWS
    k = max(1, encoding.N_COMPONENTS * n // FOLD_ROWS)
    gen = torch.Generator(device=dev).manual_seed(0)
    # Columns scaled by i^-0.6 give eigenvalues ~ i^-1.2, the decay of the seeded AlexNet's layers here.
    scale = torch.arange(1, 2 * n + 1, device=dev, dtype=torch.float64).pow(-0.6)
    x = torch.randn(n, 2 * n, generator=gen, device=dev, dtype=torch.float64) * scale
    gram = x @ x.T
    del x
    lam, seconds = {}, {}
    for precision in encoding.ENGINE_PRECISIONS:
        encoding.top_eigenpairs(gram[:400, :400], 50, precision)  # warm-up: solver handles and workspaces
        timer = encoding.StageTimer(dev)
        with timer("pca"):
            lam[precision], _ = encoding.top_eigenpairs(gram, k, precision)
        seconds[precision] = timer.seconds["pca"]
    rel = float(((lam["mixed"] - lam["fp64"]).abs() / lam["fp64"]).max())
    print(f"one full-size fold's PCA on {dev} (top {k} eigenpairs of a {n} x {n} Gram matrix): "
          f"fp64 {seconds['fp64']:.2f} s, mixed {seconds['mixed']:.2f} s "
          f"({seconds['fp64'] / seconds['mixed']:.2f}x); eigenvalues agree within {rel:.0e} (relative)")


if __name__ == "__main__":
    main()
