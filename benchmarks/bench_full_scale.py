"""Encoding at the real Algonauts size, run as a user runs it, with time per stage and peak memory.

Writes once, under ROOT, a synthetic Subj1 of the real size: 9841 images of 425 px (PNG, like
the real ones) and the real Subj1 masks from MASKS_FROM (all 19004 lh vertices). Then each
part runs a script in its own process; the benchmark reads the wall time, the script's own
'stage times' line (decode/cache, forward pass, Gram, PCA eigendecompositions, ridge and
scoring, writing) and the peak resident memory from the OS (wait4's ru_maxrss):

  untuned  fit_encoding_models.py --method untuned over every non-empty lh ROI: one shared
           pass (the image cache is deleted first, so its decode is part of the run)
  per-roi  the same script on each ROI of PER_ROI alone, in a second root that shares the
           inputs and the image cache (the per-ROI path that the shared pass replaces)
  train    cl_model_training.py on TUNED_ROI for TRAIN_EPOCHS epoch(s): the checkpoint of 'tuned'
  tuned    fit_encoding_models.py --method cl-tuned --rois TUNED_ROI

The encoding parts (untuned, per-roi, tuned) run once per engine precision of ENGINE_PRECISIONS
(--engine-precision): fp64 writes under ROOT, another precision under ROOT_<precision>, which
links ROOT's inputs, image cache and checkpoints, so both encode the same features. They are
reported side by side: wall time and PCA stage of each, their ratios, the largest per-voxel
|difference| of CV r and test r from fp64, whether every best layer and alpha is the same, and
the load average at the start and end of each run (timings on a shared machine are upper bounds).

Each finished part is saved at once in benchmarks/output/bench_full_scale.json; a rerun skips
the parts already there (--overwrite measures them again). The ratio of the per-ROI path to
the shared pass is reported measured on the PER_ROI subset, and extrapolated to all ROIs
(labelled as such) from the mean per-ROI time.

    python benchmarks/bench_full_scale.py                       # everything (hours on a 2-core CPU)
    python benchmarks/bench_full_scale.py --parts untuned --device cuda
    python benchmarks/bench_full_scale.py --n-images 1000 --n-components 150 --root benchmarks/output/small_scale
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import encoding_results  # noqa: E402
import synthetic_data  # noqa: E402
import options  # noqa: E402
import safe_io  # noqa: E402
import utils  # noqa: E402

# --- Options ---
ROOT = "benchmarks/output/full_scale"  # dataset and outputs (written on first use)
MASKS_FROM = "../shared/algonauts_roi_masks"  # real Algonauts roi_masks/SubjX folders
N_IMAGES = 9841  # images of Subj1 in the Algonauts release
PNG_SIZE = 425  # side of the PNG files, as the real ones
IMAGE_SIZE = 224  # side the images are resized to (the protocol's)
N_COMPONENTS = 1000  # PCA components (the protocol's; with a small --n-images, about 0.15 x the fold rows lets mixed refine as it does at full size)
ENGINE_PRECISIONS = ["fp64", "mixed"]  # engine precisions of the encoding parts, measured side by side
DEVICE = "cpu"  # cpu or cuda, for every part
PARTS = ["untuned", "per-roi", "train", "tuned"]  # parts to run, in this order
PER_ROI = ["V1v"]  # ROIs fitted one at a time by the per-ROI path
TUNED_ROI = "EBA"  # ROI of the tuned method (lh EBA of Subj1: 2837 voxels)
TRAIN_EPOCHS = 1  # epochs of the CL checkpoint that 'tuned' reads
TRAIN_BATCH_SIZE = 256  # batch size of that training run (the paper's 1024 needs a GPU's memory)
OVERWRITE = False  # measure again the parts already in the JSON
# ---

PART_NAMES = ["untuned", "per-roi", "train", "tuned"]
CHOICES = {"ENGINE_PRECISIONS": utils.ENGINE_PRECISIONS}
# Links that make a second project folder encode the same inputs and checkpoints as ROOT.
SHARED = ("training_images", "training_fmri", "roi_masks", "cache", "cl_models")


def ensure_dataset(opts):
    """The synthetic full-size subject under ROOT (written once, about 5 GB)."""
    root = Path(opts.ROOT)
    if not utils.fmri_path(root, 1, "lh").is_file():
        masks = Path(opts.MASKS_FROM)
        safe_io.require_dir(masks / "Subj1", "give --masks-from the folder holding the real SubjX roi_masks")
        synthetic_data.write_algonauts_dataset(root, n_subjects=1, n_images=opts.N_IMAGES,
                                               image_size=opts.PNG_SIZE, seed=0, masks_from=masks)
    return root.resolve()


def run_measured(cmd, log):
    """Run ``cmd`` (a list) in its own process; wall seconds, peak RSS in GiB and its stdout.

    The peak is the child's own maximum resident set size, as the kernel reports it (wait4);
    'loadavg' is the 1-minute load average at the start and at the end.
    """
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: see {log}\n{out[-2000:]}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "loadavg": [load, os.getloadavg()[0]],
            "stdout": out}


def stage_times(stdout):
    """The script's 'stage times: cache 1.2 s, forward 3.4 s, ...' line as a dict of seconds."""
    line = [l for l in stdout.splitlines() if l.startswith("stage times:")][-1]
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", line)}


def fit_command(opts, root, precision, *args):
    return [sys.executable, "fit_encoding_models.py", "--root", str(root), "--subj", "1", "--hemisphere", "lh",
            "--weights", "none", "--device", opts.DEVICE, "--image-size", str(opts.IMAGE_SIZE),
            "--n-components", str(opts.N_COMPONENTS), "--engine-precision", precision, "--overwrite", *args]


def part_key(part, precision):
    """The JSON key of a part's measurement: the part's name for fp64 (and for training), else part-precision."""
    return part if precision == "fp64" or part == "train" else f"{part}-{precision}"


def linked_root(root, folder):
    """``folder`` made a project folder whose inputs, image cache and checkpoints are ROOT's (symbolic links)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        # A link to a folder not made yet (the checkpoints before training) would stop the scripts' mkdir.
        (root / name).mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(folder / name):
            os.symlink((root / name).resolve(), folder / name)
    return folder


def part_root(root, part, precision):
    """The project folder an encoding part writes its results to, for one engine precision."""
    base = root if precision == "fp64" else linked_root(root, Path(f"{root}_{precision}"))
    return linked_root(root, Path(f"{base}_per_roi")) if part == "per-roi" else base


def present_rois(root):
    """The lh ROIs of Subj1 with at least MIN_VOXELS voxels."""
    import fit_encoding_models
    return [r for r in utils.ROIS if utils.roi_voxel_count(root, 1, "lh", r) >= fit_encoding_models.MIN_VOXELS]


def run_part(opts, part, root, precision="fp64"):
    logs = Path(opts.ROOT).parent
    log = "" if precision == "fp64" else f"_{precision}"
    where = None if part == "train" else part_root(root, part, precision)
    if part == "untuned":
        for old in utils.cache_dir(root).glob(f"Subj1_s{opts.IMAGE_SIZE}_*.npy"):
            old.unlink()
        rois = present_rois(root)
        res = run_measured(fit_command(opts, where, precision, "--rois", *rois), logs / f"full_scale_untuned{log}.log")
        voxels = set().union(*(utils.roi_voxel_indices(root, 1, "lh", r).tolist() for r in rois))
        return {"rois": rois, "n_rois": len(rois), "n_union_voxels": len(voxels),
                "stages": stage_times(res.pop("stdout")), **res}
    if part == "per-roi":
        runs = {}
        for roi in opts.PER_ROI:
            res = run_measured(fit_command(opts, where, precision, "--rois", roi),
                               logs / f"full_scale_per_roi_{roi}{log}.log")
            runs[roi] = {"n_voxels": int(utils.roi_voxel_count(root, 1, "lh", roi)),
                         "stages": stage_times(res.pop("stdout")), **res}
        return runs
    if part == "train":
        cmd = [sys.executable, "cl_model_training.py", "--root", str(root), "--subj", "1", "--hemisphere", "lh",
               "--roi", opts.TUNED_ROI, "--epochs", str(opts.TRAIN_EPOCHS), "--batch-size", str(opts.TRAIN_BATCH_SIZE),
               "--weights", "none", "--device", opts.DEVICE, "--image-size", str(opts.IMAGE_SIZE), "--overwrite"]
        res = run_measured(cmd, logs / "full_scale_train.log")
        res.pop("stdout")
        n_train = len(utils.train_test_split(opts.N_IMAGES)[0])
        return {"roi": opts.TUNED_ROI, "epochs": opts.TRAIN_EPOCHS, "batch_size": opts.TRAIN_BATCH_SIZE,
                "images_per_s": n_train * opts.TRAIN_EPOCHS / res["seconds"], **res}
    res = run_measured(fit_command(opts, where, precision, "--method", "cl-tuned", "--cl-epochs", str(opts.TRAIN_EPOCHS),
                                   "--rois", opts.TUNED_ROI), logs / f"full_scale_tuned{log}.log")
    return {"roi": opts.TUNED_ROI, "n_voxels": int(utils.roi_voxel_count(root, 1, "lh", opts.TUNED_ROI)),
            "stages": stage_times(res.pop("stdout")), **res}


def compare_precision(root, part, precision, results):
    """Per-voxel agreement of a part's results in ``precision`` with its fp64 results (None if either is missing).

    Returns
    -------
    dict with 'max_abs_diff_cv_r', 'max_abs_diff_test_r' (over the voxels of every ROI of the
    part), 'same_best_layers' and 'same_alphas' (for every ROI).
    """
    measured = results[part_key(part, precision)]
    rois = measured["rois"] if part == "untuned" else list(measured) if part == "per-roi" else [measured["roi"]]
    tag = "cl-tuned" if part == "tuned" else "untuned"
    paths = [(encoding_results.result_path(part_root(root, part, "fp64"), 1, tag, "lh", roi),
              encoding_results.result_path(part_root(root, part, precision), 1, tag, "lh", roi)) for roi in rois]
    if not all(encoding_results.result_complete(p) for pair in paths for p in pair):
        return None
    pairs = [(encoding_results.load_result(a), encoding_results.load_result(b)) for a, b in paths]
    return {"max_abs_diff_cv_r": max(float(abs(a["cv_r"] - b["cv_r"]).max()) for a, b in pairs),
            "max_abs_diff_test_r": max(float(abs(a["test_r"] - b["test_r"]).max()) for a, b in pairs),
            "same_best_layers": all(a["best_layer"] == b["best_layer"] for a, b in pairs),
            "same_alphas": all(bool((a["alpha_index"] == b["alpha_index"]).all()) for a, b in pairs)}


def encoding_runs(results, part, precision):
    """(name, measurement) of each encoding run of a part in one precision."""
    r = results.get(part_key(part, precision))
    if r is None:
        return []
    if part == "per-roi":
        return [(f"untuned, {roi} alone", m) for roi, m in r.items()]
    return [(f"untuned, {r['n_rois']} ROIs, one pass" if part == "untuned" else f"cl-tuned, {r['roi']}", r)]


def report_precisions(results, precisions):
    """Print each encoding run measured in fp64 and in another precision side by side, with their agreement."""
    for precision in precisions:
        if precision == "fp64":
            continue
        for part in ("untuned", "per-roi", "tuned"):
            exact = dict(encoding_runs(results, part, "fp64"))
            other = encoding_runs(results, part, precision)
            if not exact or not other:
                continue
            agree = results.get("agreement", {}).get(part_key(part, precision))
            print(f"{part}, fp64 against {precision}: " + (
                "results not compared (those of one precision are missing)" if agree is None else
                f"max |diff CV r| {agree['max_abs_diff_cv_r']:.1e}, max |diff test r| "
                f"{agree['max_abs_diff_test_r']:.1e}, same best layers {agree['same_best_layers']}, "
                f"same alphas {agree['same_alphas']}"))
            for name, b in other:
                a = exact.get(name)
                if a is None:
                    continue
                pca_a, pca_b = a["stages"].get("pca", float("nan")), b["stages"].get("pca", float("nan"))
                load = " / ".join(f"{x['loadavg'][0]:.1f}-{x['loadavg'][1]:.1f}" if "loadavg" in x else "n/a"
                                  for x in (a, b))
                print(f"  {name:28s} wall {a['seconds'] / 60:.1f} / {b['seconds'] / 60:.1f} min "
                      f"({a['seconds'] / b['seconds']:.2f}x), PCA {pca_a:.0f} / {pca_b:.0f} s "
                      f"({pca_a / pca_b:.2f}x), load {load}")


def report(results, precisions):
    """Print the measured table and the ratios."""
    def line(name, r):
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["stages"].items()) if "stages" in r else ""
        print(f"{name:36s} {r['seconds'] / 60:7.1f} min  peak RSS {r['peak_rss_gib']:5.2f} GiB  {stages}")
    for precision in precisions:
        for part in ("untuned", "per-roi"):
            for name, r in encoding_runs(results, part, precision):
                line(f"{name} ({precision})", r)
    if "train" in results:
        t = results["train"]
        line(f"CL training, {t['epochs']} epoch", t)
        print(f"{'':36s} {t['images_per_s']:.1f} training images/s")
    for precision in precisions:
        for name, r in encoding_runs(results, "tuned", precision):
            line(f"{name} ({precision})", r)
    if "untuned" in results and results.get("per-roi"):
        u, per = results["untuned"], results["per-roi"]
        mean_alone = sum(r["seconds"] for r in per.values()) / len(per)
        print(f"per-ROI path (fp64): {mean_alone / 60:.1f} min per ROI (measured on {', '.join(per)}); the shared pass "
              f"fits {u['n_rois']} ROIs in {u['seconds'] / 60:.1f} min, {u['seconds'] / mean_alone:.2f}x one ROI alone")
        print(f"extrapolated: the per-ROI path over all {u['n_rois']} ROIs would take "
              f"{u['n_rois'] * mean_alone / 3600:.1f} h, {u['n_rois'] * mean_alone / u['seconds']:.1f}x the shared pass")
    report_precisions(results, precisions)


def main(argv=None):
    import bench_full_scale
    opts = options.parse_options(bench_full_scale, argv)
    unknown = [p for p in opts.PARTS if p not in PART_NAMES]
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}: use {' '.join(PART_NAMES)}")
    root = ensure_dataset(opts)
    out_path = Path(opts.ROOT).parent / "bench_full_scale.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results["device"] = opts.DEVICE
    for part in opts.PARTS:
        for precision in ["fp64"] if part == "train" else opts.ENGINE_PRECISIONS:
            key = part_key(part, precision)
            if key in results and not opts.OVERWRITE:
                print(f"{key}: measured before (use --overwrite to measure again)")
                continue
            print(f"{key}: running ...", flush=True)
            results[key] = run_part(opts, part, root, precision)
            safe_io.atomic_json_dump(results, out_path)
    results["agreement"] = {part_key(part, p): compare_precision(root, part, p, results)
                            for part in ("untuned", "per-roi", "tuned") for p in opts.ENGINE_PRECISIONS
                            if p != "fp64" and part in results and part_key(part, p) in results}
    safe_io.atomic_json_dump(results, out_path)
    report(results, opts.ENGINE_PRECISIONS)
    print(f"wrote {out_path}")
    return results


if __name__ == "__main__":
    main()
