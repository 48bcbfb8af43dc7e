"""Demo: the whole pipeline on a small synthetic dataset, on a CPU (minutes: the measured time is in the README).

`make demo` (or `python demo.py`) runs, in order:
  1. synthetic_data.py: 2 subjects x 300 images with a planted ground truth, under ROOT;
  2. generate_voxel_roi_mappings.py;
  3. CL tuning of the ROIS of every subject, regression tuning for SUBJ, pooled (h-avg)
     tuning over all subjects, for a few epochs;
  4. fit_encoding_models.py for untuned, cl-tuned and pooled-avg (every subject) and
     reg-tuned (SUBJ); every subject's CL model on every subject at the untuned layer (the
     authors' cross-subject protocol) and the transfer matrices;
  5. generate_results.py: MI bounds, fc7 classification probes on a synthetic ImageFolder
     (ROOT/datasets/caltech256, classes of separable colour and orientation), figures;
  6. the landscape notebook, headless;
  7. generate_results.py --type paper-figures: the paper's group figures over the
     subjects and the summary cortical maps (fsaverage5).
It prints a summary per ROI (test r of untuned, CL, regression and pooled, % of voxels
where CL beats untuned, MI bound), says whether CL beats untuned on the planted pRF ROIs,
and how long the run took on which machine; the same Markdown goes to OUTPUT/summary.md and,
with --update-docs, into the demo blocks of README.md and docs/demo.md. Every figure is
copied to OUTPUT. A rerun skips finished work (--overwrite redoes it).
"""

import shutil
import sys
import time
from pathlib import Path

import numpy as np

import cl_model_training
import fit_encoding_models
import generate_results
import generate_voxel_roi_mappings
import pooled_model_training
import reg_model_training
import synthetic_data
import options
import safe_io
import utils

# The heavy helpers load on first use, so that --help answers at once.
encoding_results = options.lazy_import("encoding_results")
ru = options.lazy_import("results_utils")

# --- Options ---
ROOT = "demo_data"  # folder the synthetic dataset and all results go to
OUTPUT = "demo_output"  # folder every figure is copied to
SUBJECTS = 2  # number of synthetic subjects
IMAGES = 300  # images per subject
IMAGE_SIZE = 64  # side of the synthetic images and of AlexNet's input, in pixels (small keeps the CPU time low)
SNR = 1.0  # median signal-to-noise ratio of the planted responses
SEED = 0  # seed of the dataset, the random weights and the training
SUBJ = 1  # subject whose models are tuned and evaluated
HEMISPHERE = "left"  # hemisphere of the ROIs
ROIS = ["V1v", "EBA"]  # ROIs to tune (V1v..hV4 hold planted pRFs; the others image-statistics responses)
EPOCHS = 8  # epochs of CL, regression and pooled tuning
BATCH_SIZE = 64  # image-fMRI pairs per step (small: a few hundred images give several steps per epoch)
WEIGHTS = "auto"  # auto (ImageNet weights if in the torch cache, else seeded random), imagenet, none or a state-dict path
CLASSES = 4  # classes of the synthetic classification dataset
CLASS_IMAGES = 40  # images per class
NOTEBOOK = True  # run the landscape notebook headless
DEVICE = "auto"  # auto, cpu or cuda
OVERWRITE = False  # redo every step even if its outputs exist
UPDATE_DOCS = False  # write this run's summary into the demo blocks of README.md and docs/demo.md, and its landscape to docs/
# ---
CHOICES = {"HEMISPHERE": utils.HEMISPHERE_NAMES, "ROIS": utils.ROIS}
RANGES = {"SUBJECTS": options.between(1, utils.N_SUBJECTS), "IMAGES": options.at_least(1),
          "IMAGE_SIZE": utils.ALEXNET_INPUT, "SNR": options.POSITIVE, "SEED": options.SEED_RANGE,
          "SUBJ": options.Allowed("between 1 and --subjects", lambda subj, opts: 1 <= subj <= opts.SUBJECTS),
          "EPOCHS": options.at_least(1), "BATCH_SIZE": options.at_least(2), "CLASSES": options.at_least(2),
          "CLASS_IMAGES": options.at_least(1)}

DATASET = "caltech256"  # the ImageFolder-layout dataset name of generate_results.py
# The encoding methods and their columns in the summary table.
METHODS = {"untuned": "untuned r", "cl-tuned": "CL r", "reg-tuned": "reg r", "pooled-avg": "pooled r"}


def resolve_weights(weights):
    """WEIGHTS, with 'auto' resolved to 'imagenet' when the file is in the torch cache, else 'none'."""
    if weights != "auto":
        return weights
    path = utils.imagenet_weights_path()
    if path.is_file():
        return "imagenet"
    print(f"notice: no ImageNet AlexNet weights at {path}, so the demo starts from seeded random weights "
          f"(download {utils.IMAGENET_WEIGHTS_URL} there to use them)")
    return "none"


def write_image_folder(folder, n_classes, per_class, size=80, seed=0):
    """A synthetic ImageFolder: class k is a grating of orientation k pi / n_classes and its own hue.

    Each image has a random colour background, 1/f-like noise, and the class grating with
    jittered orientation, frequency, phase and tint, so the classes are separable but not
    trivially (see the planted ``orientation`` and ``hue``).
    """
    from PIL import Image
    rng = np.random.default_rng(seed)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    xx, yy = np.meshgrid(c, -c)
    hues = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.8, 0.1],
                     [0.8, 0.2, 0.8], [0.1, 0.8, 0.8]])
    for k in range(n_classes):
        d = Path(folder) / f"{k + 1:03d}.class{k + 1}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ori = np.pi * k / n_classes + rng.normal(0, 0.15)
            freq = rng.uniform(3, 6)
            wave = 0.5 + 0.5 * np.sin(np.pi * freq * (xx * np.cos(ori) + yy * np.sin(ori)) + rng.uniform(0, 2 * np.pi))
            tint = np.clip(hues[k % len(hues)] + rng.normal(0, 0.15, 3), 0, 1)
            background = rng.uniform(0, 1, 3)
            image = background * (1 - 0.6 * wave[..., None]) + tint * 0.6 * wave[..., None]
            image += rng.normal(0, 0.08, image.shape)
            Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(d / f"{i:03d}.png")


def run_notebook(root, dataset):
    """Execute the landscape notebook with ROOT and DATASET injected after its parameters cell; returns it
    (nbformat, with its outputs)."""
    import nbclient
    import nbformat
    repo = Path(__file__).resolve().parent
    nb = nbformat.read(repo / "feature_extraction_model_landscape_imagenet.ipynb", 4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(f"ROOT = {str(Path(root).resolve())!r}\nDATASET = {dataset!r}"))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()
    return nb


def copy_figures(root, output):
    """Copy every .png and .pdf under ROOT's result folders to ``output``; returns the copies.

    The copy's name is the path below the figures or encoding_results folder with '_' for '/', so
    results/figures/paper/x.png -> paper_x.png and encoding_results/Subj1/cl-tuned/y.png -> Subj1_cl-tuned_y.png.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    copies = []
    for folder, skip in ((utils.results_dir(root), 1), (Path(root) / "encoding_results", 0)):
        for path in sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".pdf")):
            name = "_".join(path.relative_to(folder).parts[skip:])
            copies.append(Path(shutil.copy2(path, output / name)))
    return copies


def summary_table(root, subj, hemisphere, rois, epochs):
    """Per ROI: mean test r of each method, % of voxels where CL beats untuned, MI bounds (bits).

    Read back from the saved encoding results and MI bounds.

    Returns
    -------
    DataFrame indexed by ROI.
    """
    import pandas as pd
    mi = mi_bounds(root, subj, hemisphere, rois, epochs)
    rows = {}
    for roi in rois:
        test_r = {m: encoding_results.load_result(encoding_results.result_path(root, subj, m, hemisphere, roi))["test_r"] for m in METHODS}
        rows[roi] = {"voxels": len(test_r["untuned"]),
                     **{METHODS[m]: float(np.mean(r)) for m, r in test_r.items()},
                     "CL > untuned %": encoding_results.pct_beats_untuned(test_r["cl-tuned"], test_r["untuned"]),
                     "MI CL bits": mi[roi][0], "MI untuned bits": mi[roi][1]}
    return pd.DataFrame.from_dict(rows, orient="index")


def mi_bounds(root, subj, hemisphere, rois, epochs):
    """{roi: (tuned, untuned)} MI bounds in bits (post-hoc temperature) of the CL models, from results/mi_bounds."""
    import json
    path = utils.results_dir(root) / "mi_bounds" / f"{ru.summary_stem('cl-tuned', subj, hemisphere, epochs)}.json"
    saved = json.loads(path.read_text())["rois"]
    return {roi: tuple(saved[roi][str(subj)][k]["scaled_bits"] for k in ("tuned", "untuned")) for roi in rois}


def prf_verdicts(table):
    """For each planted-pRF ROI of the table, a line saying whether CL's mean test r beats untuned's."""
    prf = [roi for roi in table.index if roi in synthetic_data.PRF_ROIS]
    lines = []
    for roi in prf:
        cl, untuned = table.loc[roi, "CL r"], table.loc[roi, "untuned r"]
        verdict = "beats" if cl > untuned else "does not beat"
        lines.append(f"{roi} (planted pRFs): CL {verdict} untuned, mean test r {cl:.3f} vs {untuned:.3f}, "
                     f"{table.loc[roi, 'CL > untuned %']:.0f}% of voxels improved")
    return lines or ["no planted-pRF ROI among ROIS (V1v, V1d, V2v, V2d, V3v, V3d, hV4)"]


def summary_markdown(table, title, notes):
    """The run's summary as Markdown: ``title``, the table (numbers to 3 decimals), then ``notes``, one a line."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    rows = ["| ROI | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    rows += [f"| {roi} | " + " | ".join(cell(v) for v in row) + " |"
             for roi, row in zip(table.index, table.astype(object).itertuples(index=False))]
    return "\n\n".join([title, "\n".join(rows), "\n".join(f"- {line}" for line in notes)]) + "\n"


# The demo blocks of the documentation that UPDATE_DOCS rewrites, between these two lines.
DOC_BLOCK = ("<!-- demo summary: written by `python demo.py --update-docs`, do not edit -->", "<!-- end of demo summary -->")
DOCS = ("README.md", "docs/demo.md")


def replace_block(text, summary, where="the file"):
    """``text`` with what lies between the DOC_BLOCK lines replaced by ``summary``; a ValueError unless the
    lines are there once each, in order."""
    start, end = DOC_BLOCK
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{where} has no single demo summary block ({start} ... {end})")
    head, rest = text.split(start)
    return f"{head}{start}\n{summary}{end}{rest.split(end)[1]}"


# The demo figure shown in the documentation: (the copy in OUTPUT, the documentation's copy).
DOC_FIGURE = (f"landscape_{DATASET}_inpca.png", "docs/demo_landscape.png")


def update_docs(summary, output, repo=Path(__file__).resolve().parent):
    """Write ``summary`` into the demo block of each of DOCS (atomically) and copy the run's landscape
    (DOC_FIGURE, from the folder ``output``) over the documentation's; returns the paths written."""
    paths = [repo / name for name in DOCS]
    texts = [replace_block(p.read_text(), summary, p) for p in paths]
    for path, text in zip(paths, texts):
        safe_io.atomic_write_text(text, path)
    figure = repo / DOC_FIGURE[1]
    with safe_io.atomic_path(figure) as tmp:
        shutil.copyfile(Path(output) / DOC_FIGURE[0], tmp)
    return paths + [figure]


def machine():
    """The CPU count, the GPU if any and the 1-minute load average: what a timing depends on."""
    import os

    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}, 1-minute load average {os.getloadavg()[0]:.1f}"


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    started, fresh, load = time.perf_counter(), not Path(opts.ROOT).exists(), machine()
    root, hemi, subj = opts.ROOT, utils.hemi_code(opts.HEMISPHERE), opts.SUBJ
    rois = opts.ROIS
    overwrite = ["--overwrite"] if opts.OVERWRITE else []
    weights = resolve_weights(opts.WEIGHTS)
    common = ["--root", root, "--image-size", str(opts.IMAGE_SIZE), "--device", opts.DEVICE, "--seed", str(opts.SEED)]
    train = common + ["--hemisphere", hemi, "--epochs", str(opts.EPOCHS), "--batch-size", str(opts.BATCH_SIZE),
                      "--weights", weights] + overwrite

    print("1. synthetic dataset")
    synthetic_data.main(["--root", root, "--subjects", str(opts.SUBJECTS), "--images", str(opts.IMAGES),
                         "--image-size", str(opts.IMAGE_SIZE), "--seed", str(opts.SEED), "--snr", str(opts.SNR)]
                        + overwrite)
    print("2. voxel-ROI mappings")
    generate_voxel_roi_mappings.main(["--root", root] + overwrite)
    subjects = [str(s) for s in range(1, opts.SUBJECTS + 1)]
    print(f"3. tuning {', '.join(rois)} ({hemi}) for {opts.EPOCHS} epochs: CL on every subject, regression on "
          f"{utils.subj_dir(subj)}, pooled over all subjects")
    for roi in rois:
        for s in subjects:
            cl_model_training.main(train + ["--subj", s, "--roi", roi])
        reg_model_training.main(train + ["--subj", str(subj), "--roi", roi])
        pooled_model_training.main(train + ["--roi", roi, "--h-method", "avg"])
    print("4. encoding models")
    for s in subjects:
        for method in METHODS if int(s) == subj else [m for m in METHODS if m != "reg-tuned"]:
            fit_encoding_models.main(common + ["--subj", s, "--hemisphere", hemi, "--rois", *rois, "--method", method,
                                               "--weights", weights, "--cl-epochs", str(opts.EPOCHS),
                                               "--reg-epochs", str(opts.EPOCHS), "--pooled-epochs", str(opts.EPOCHS)]
                                     + overwrite)
    for s in subjects:
        for model_subj in subjects:
            fit_encoding_models.main(common + ["--subj", s, "--model-subj", model_subj, "--hemisphere", hemi,
                                               "--rois", *rois, "--method", "cl-tuned", "--protocol", "untuned-layer",
                                               "--weights", weights, "--cl-epochs", str(opts.EPOCHS)] + overwrite)
    generate_results.main(["--root", root, "--type", "transfer-matrix", "--method", "cl-tuned", "--hemispheres", hemi,
                           "--rois", *rois])
    print("5. MI bounds, classification probes and figures")
    folder = Path(root) / "datasets" / DATASET
    if not folder.is_dir() or opts.OVERWRITE:
        shutil.rmtree(folder, ignore_errors=True)
        write_image_folder(folder, opts.CLASSES, opts.CLASS_IMAGES, seed=opts.SEED)
        print(f"wrote a synthetic {opts.CLASSES}-class ImageFolder under {folder} (standing in for {DATASET})")
    results = ["--root", root, "--hemispheres", hemi, "--rois", *rois,
               "--epochs", str(opts.EPOCHS), "--device", opts.DEVICE, "--seed", str(opts.SEED)] + overwrite
    probes = ["--dataset", DATASET, "--image-size", str(opts.IMAGE_SIZE), "--weights", weights, "--subjects", str(subj)]
    generate_results.main(results + ["--type", "lower-bound-mi", "--subjects", *subjects])
    generate_results.main(results + ["--type", "lower-bound-mi-pooled-avg", "--subjects", str(subj)])
    for method in ("cl-tuned", "reg-tuned"):
        generate_results.main(results + probes + ["--type", "classification-task", "--method", method])
    generate_results.main(results + probes + ["--type", "classification-task-pooled-avg"])
    for method in ("cl-tuned", "pooled-avg"):
        generate_results.main(["--root", root, "--type", "figures", "--dataset", DATASET, "--method", method,
                               "--epochs", str(opts.EPOCHS)])
    if opts.NOTEBOOK:
        print("6. landscape notebook")
        run_notebook(root, DATASET)
    print("7. the paper's figures: group figures over the subjects, summary cortical maps")
    generate_results.main(["--root", root, "--type", "voxel-counts"])
    generate_results.main(["--root", root, "--type", "paper-figures", "--epochs", str(opts.EPOCHS), "--maps", "summary"])
    figures = copy_figures(root, opts.OUTPUT)
    table = summary_table(root, subj, hemi, rois, opts.EPOCHS)
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    how = "every step run" if fresh or opts.OVERWRITE else "a rerun: finished steps skipped"
    summary = summary_markdown(
        table, f"**{utils.subj_dir(subj)} {hemi}, {opts.EPOCHS} epochs, weights {weights}**: mean test r over the "
               "ROI's voxels, % of voxels where CL beats untuned, MI bound (bits, test split)",
        prf_verdicts(table) + [f"{len(figures)} figures in {opts.OUTPUT}/",
                               f"{minutes} min {seconds} s of wall time ({how}) on {load} at the start"])
    safe_io.atomic_write_text(summary, Path(opts.OUTPUT) / "summary.md")
    print("\n" + summary)
    if opts.UPDATE_DOCS:
        print("wrote this summary and the landscape into " + ", ".join(map(str, update_docs(summary, opts.OUTPUT))))
    return table


if __name__ == "__main__":
    main()
