"""How much bf16 training moves a tuned model's encoding r: CL models trained in fp32 and under bf16 autocast.

On one synthetic subject (written on first use under ROOT), with a seeded random AlexNet,
the CL model of each of ROIS is trained twice with the same seed and options, once with
--precision fp32 (the default, the authors') and once with --precision bf16 (autocast on
DEVICE), each in its own folder under ROOT/runs; each model then goes through the full
encoding protocol (fit_encoding_models.py --method cl-tuned, fp32 features), as does the
untuned network. Prints and writes to benchmarks/output/bench_training_precision.json, per
ROI: the mean test r of the fp32-, bf16-trained and untuned networks, their best layers, and
the largest per-voxel |bf16 - fp32| test r; and over the ROIs the mean and largest |change|
of the mean test r, next to the mean |CL - untuned| change that tuning itself makes.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  first, as in the other benchmarks: torch.Generator() fails here otherwise

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cl_model_training_all_rois  # noqa: E402
import encoding_results  # noqa: E402
import fit_encoding_models  # noqa: E402
import options  # noqa: E402
import safe_io  # noqa: E402
import synthetic_data  # noqa: E402
import utils  # noqa: E402

# --- Options ---
ROOT = "benchmarks/output/synthetic_precision"  # dataset folder (written if missing) and the two training runs
N_IMAGES = 600  # images of the synthetic subject
PNG_SIZE = 128  # side of the PNG files
IMAGE_SIZE = 128  # side the images are resized to, for training and encoding
ROIS = ["V1v", "V2v", "hV4", "EBA", "FFA-1", "PPA"]  # lh ROIs whose CL models are trained and fitted
EPOCHS = 5  # CL training epochs
BATCH_SIZE = 128  # CL training batch size
DEVICE = "cpu"  # device of training and encoding (bf16 autocast runs on any device)
# ---
CHOICES = {"ROIS": utils.ROIS}
RANGES = {"N_IMAGES": options.at_least(60), "EPOCHS": options.at_least(1), "BATCH_SIZE": options.at_least(2)}
PRECISIONS = ("fp32", "bf16")


def run_folder(root, name):
    """ROOT/runs/<name>, whose inputs link to the shared dataset (outputs stay apart)."""
    folder = root / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("training_images", "training_fmri", "roi_masks", "cache"):
        if not (folder / sub).exists():
            os.symlink((root / sub).resolve(), folder / sub)
    return folder


def fit(folder, opts, method):
    common = ["--root", str(folder), "--rois", *opts.ROIS, "--weights", "none", "--device", opts.DEVICE,
              "--image-size", str(opts.IMAGE_SIZE), "--cl-epochs", str(opts.EPOCHS)]
    fit_encoding_models.main.__wrapped__(common + ["--method", method])
    return {roi: encoding_results.load_result(encoding_results.result_path(folder, 1, method, "lh", roi))
            for roi in opts.ROIS}


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    root = Path(opts.ROOT)
    if not (root / "training_images").is_dir():
        synthetic_data.write_algonauts_dataset(root, n_subjects=1, n_images=opts.N_IMAGES,
                                               image_size=opts.PNG_SIZE, seed=0)
    utils.cache_dir(root).mkdir(exist_ok=True)
    results, seconds = {}, {}
    for precision in PRECISIONS:
        folder = run_folder(root, precision)
        t0 = time.perf_counter()
        cl_model_training_all_rois.main.__wrapped__(
            ["--root", str(folder), "--rois", *opts.ROIS, "--epochs", str(opts.EPOCHS), "--batch-size",
             str(opts.BATCH_SIZE), "--weights", "none", "--device", opts.DEVICE, "--image-size", str(opts.IMAGE_SIZE),
             "--precision", precision])
        seconds[precision] = time.perf_counter() - t0
        results[precision] = fit(folder, opts, "cl-tuned")
    untuned = fit(run_folder(root, "fp32"), opts, "untuned")

    rows = {}
    for roi in opts.ROIS:
        a, b, u = results["fp32"][roi], results["bf16"][roi], untuned[roi]
        rows[roi] = {"n_voxels": len(a["voxels"]), "mean_test_r_fp32": float(a["test_r"].mean()),
                     "mean_test_r_bf16": float(b["test_r"].mean()), "mean_test_r_untuned": float(u["test_r"].mean()),
                     "best_layer_fp32": a["best_layer"], "best_layer_bf16": b["best_layer"],
                     "best_layer_untuned": u["best_layer"],
                     "max_voxel_abs_diff": float(np.abs(b["test_r"] - a["test_r"]).max())}
    change = np.array([r["mean_test_r_bf16"] - r["mean_test_r_fp32"] for r in rows.values()])
    tuning = np.array([r["mean_test_r_fp32"] - r["mean_test_r_untuned"] for r in rows.values()])
    summary = {"n_images": opts.N_IMAGES, "image_size": opts.IMAGE_SIZE, "epochs": opts.EPOCHS,
               "batch_size": opts.BATCH_SIZE, "device": opts.DEVICE, "training_s": seconds,
               "mean_abs_change_mean_r": float(np.abs(change).mean()), "max_abs_change_mean_r": float(np.abs(change).max()),
               "signed_mean_change_mean_r": float(change.mean()),
               "best_layer_changes": sum(r["best_layer_fp32"] != r["best_layer_bf16"] for r in rows.values()),
               "max_voxel_abs_diff": max(r["max_voxel_abs_diff"] for r in rows.values()),
               "mean_abs_tuning_change_mean_r": float(np.abs(tuning).mean()), "rois": rows}
    print(json.dumps(summary, indent=1))
    safe_io.atomic_json_dump(summary, Path("benchmarks/output/bench_training_precision.json"))
    return summary


if __name__ == "__main__":
    main()
