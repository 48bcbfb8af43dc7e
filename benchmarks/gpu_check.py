"""GPU check: CL training, feature extraction and the encoding engine on CUDA.

On a synthetic subject (written on first use under ROOT), with a seeded random AlexNet:
1. trains one CL epoch on CUDA through cl_model_training.py in PRECISION (channels_last is
   the training loop's CUDA path) and reports training images/s;
2. extracts the features of every image on CUDA and reports images/s;
3. runs the encoding engine on those same features for every non-empty lh ROI, once on CUDA
   and once on the CPU, and asserts that every voxel's CV r and test r agree within
   TOLERANCE (the same features on both sides, so only the engine's arithmetic differs);
   reports the encoding time per ROI on each device.
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

# --- Options ---
ROOT = "benchmarks/output/gpu_check"  # synthetic dataset and outputs (written on first use)
N_IMAGES = 2000  # images of the synthetic subject
IMAGE_SIZE = 224  # side of the images (the protocol's)
TRAIN_ROI = "EBA"  # ROI of the CL training epoch
BATCH_SIZE = 1024  # training batch size (the paper's)
TOLERANCE = 1e-6  # largest allowed |CUDA - CPU| difference of a voxel's CV r or test r
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
    print(f"gpu_check passed: CV r and test r of every voxel agree within {worst:.1e} (tolerance {opts.TOLERANCE:g})")
    return worst


if __name__ == "__main__":
    main()
