"""Voxelwise encoding models (PCA + ridge) of each ROI from the AlexNet features of one method.

For subject SUBJ, one hemisphere and each ROI, the engine in encoding.py scores all eight
AlexNet layers by 5-fold cross-validation inside the 85% training split (PCA, ridge for
all ALPHAS, one alpha per voxel), picks the best layer, refits on the training split and
reports the test r of every voxel. METHOD picks the feature extractor: the untuned AlexNet
(features extracted once for all ROIs) or the AlexNet of the ROI's cl-tuned, reg-tuned or
pooled checkpoint. With MODEL_SUBJ set to another subject, that subject's tuned model is
applied to SUBJ (transfer). PROTOCOL untuned-layer reuses the layer and per-voxel alphas
chosen on the untuned network (its results must exist).

Outputs, under ROOT/encoding_results/SubjX/ (the format is in encoding_results.py):
  <tag>/<hemi>_<ROI>.npz and .json   per ROI, written after each ROI (reruns skip them);
                                     tag = method [+ _from-SubjY] [+ _untuned-layer]
  absent_rois.json                   ROIs skipped for having < MIN_VOXELS voxels
and at the end the subject's summaries, rebuilt from every result (as
``generate_results.py --type summaries`` does): methods.csv, <tag>/layer_scores.csv,
group_summary.csv and their figures. The transfer matrices are made from the saved
results by ``generate_results.py --type transfer-matrix``.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import options
import safe_io
import utils

# The heavy helpers load on first use, so that --help answers at once.
models = options.lazy_import("models")
encoding = options.lazy_import("encoding")
figures = options.lazy_import("figures")
encoding_results = options.lazy_import("encoding_results")

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
METHOD = "untuned"  # feature extractor: untuned, cl-tuned, reg-tuned, pooled-avg or pooled-const
SUBJ = 1  # subject whose fMRI is predicted
MODEL_SUBJ: int | None = None  # subject whose cl-/reg-tuned model extracts the features (None: SUBJ; another: transfer)
HEMISPHERE = "left"  # left or right
ROIS = list(utils.ROIS)  # ROIs to fit (those with fewer than MIN_VOXELS voxels are skipped)
PROTOCOL = "per-method"  # per-method (choose layer and alphas on this method) or untuned-layer
ALPHAS = [0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7]  # ridge penalties, ascending
N_COMPONENTS = 1000  # PCA components (at most the fold's train size and the layer size)
N_FOLDS = 5  # cross-validation folds inside the train split
DEVICE = "auto"  # auto, cpu or cuda
IMAGE_SIZE = 224  # images are squash-resized to IMAGE_SIZE x IMAGE_SIZE
WEIGHTS = "imagenet"  # AlexNet of the untuned method: imagenet, none (seeded random) or a state-dict file
SEED = 0  # seed of the random AlexNet when WEIGHTS is none
CL_EPOCHS = utils.DEFAULT_EPOCHS["cl-tuned"]  # epochs in the cl-tuned checkpoint names
REG_EPOCHS = utils.DEFAULT_EPOCHS["reg-tuned"]  # epochs in the reg-tuned checkpoint names
POOLED_EPOCHS = utils.DEFAULT_EPOCHS["pooled-avg"]  # epochs in the pooled checkpoint names
BATCH_SIZE = 128  # images per forward pass
SCRATCH: str | None = None  # folder of the temporary feature spill, ~8 GB per run at full size (None: ROOT/cache); $VARS expand when the run starts, e.g. '$TMPDIR' for a cluster node's local disk
FEATURE_PRECISION = "fp32"  # feature extraction: fp32 (the authors') or bf16 (autocast on CUDA, faster)
ENGINE_PRECISION = "fp64"  # PCA eigensolver: fp64 (exact) or mixed (float32 eigh refined in float64; for GPUs with slow float64)
MIN_VOXELS = utils.MIN_VOXELS  # ROIs with fewer voxels are skipped and recorded as absent (1, the authors'; 20: the paper's 2024 figures)
OVERWRITE = False  # recompute ROIs whose results exist
# ---
CHOICES = {"METHOD": utils.METHODS, "HEMISPHERE": utils.HEMISPHERE_NAMES, "ROIS": utils.ROIS,
           "PROTOCOL": utils.PROTOCOLS, "FEATURE_PRECISION": utils.PRECISIONS,
           "ENGINE_PRECISION": utils.ENGINE_PRECISIONS}
RANGES = {"SUBJ": utils.SUBJECT, "MODEL_SUBJ": utils.SUBJECT, "ALPHAS": utils.ALPHA_GRID,
          "N_COMPONENTS": options.at_least(1), "N_FOLDS": options.at_least(2), "IMAGE_SIZE": utils.ALEXNET_INPUT,
          "SEED": options.SEED_RANGE, "CL_EPOCHS": options.at_least(1), "REG_EPOCHS": options.at_least(1),
          "POOLED_EPOCHS": options.at_least(1), "BATCH_SIZE": options.at_least(1), "MIN_VOXELS": options.at_least(1)}



@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    run = check_inputs(opts)
    root, subj, method, hemi = opts.ROOT, opts.SUBJ, opts.METHOD, run.hemi
    timer = encoding.StageTimer(run.device)
    # The cache decodes every image: an unreadable one stops the run before the first output.
    with timer("cache"):
        utils.subject_images(root, subj, opts.IMAGE_SIZE)
    for roi, n_voxels in run.absent.items():
        encoding_results.record_absent(root, subj, hemi, roi, n_voxels)
    written = {roi: None for roi in opts.ROIS}
    # The untuned network's features are the same for every ROI: one pass serves them all.
    # A tuned network belongs to one ROI: one pass each.
    passes = [run.pending] if method == "untuned" and run.pending else [[item] for item in run.pending]
    for group in options.progress(passes, f"{utils.subj_dir(subj)} {hemi} {run.tag}"):
        voxels = np.unique(np.concatenate([v for _, v, _ in group]))
        fmri = run.fmri if len(voxels) == len(run.voxels) else run.fmri[:, np.searchsorted(run.voxels, voxels)]
        columns = {roi: np.searchsorted(voxels, v) for roi, v, _ in group}
        alexnet, meta = models.load_feature_alexnet(root, method, run.model_subj, hemi, group[0][0], run.epochs,
                                                    opts.WEIGHTS, run.device, opts.SEED, opts.IMAGE_SIZE)
        images = utils.subject_images(root, subj, opts.IMAGE_SIZE)
        with encoding.FeatureSpill(alexnet, images, run.scratch, run.device, opts.BATCH_SIZE,
                                   timer=timer, precision=opts.FEATURE_PRECISION) as spill:
            del images, alexnet  # the cache's pages and the network are not needed past the forward pass
            results = encoding.encode_rois(spill.layers(run.device), fmri, columns, run.train, run.test, run.folds,
                                           opts.ALPHAS, opts.N_COMPONENTS, run.fixed, run.device, timer=timer,
                                           precision=opts.ENGINE_PRECISION)
        for roi, roi_voxels, path in group:
            result = results[roi]
            if result["n_constant"]:
                options.say(f"warning: {roi}: {result['n_constant']} constant voxel(s) on the training split; "
                            "their r is set to 0")
            result.update(
                method=method, subject=subj,
                model_subj=run.model_subj if method in encoding_results.TRANSFER_METHODS else None,
                hemisphere=hemi, roi=roi, protocol=opts.PROTOCOL, voxels=roi_voxels, seed=opts.SEED)
            result.update(run.settings)
            result.update(
                weights=opts.WEIGHTS if meta is None else meta.get("weights"),
                checkpoint=None if method == "untuned" else str(
                    utils.method_checkpoint_path(root, method, run.model_subj, hemi, roi, run.epochs)),
                mean_cv_r=float(np.mean(result["cv_r"])), mean_test_r=float(np.mean(result["test_r"])),
                config=options.run_config(opts))
            with timer("write"):
                encoding_results.save_result(result, path)
                encoding_results.record_absent(root, subj, hemi, roi, None)
            written[roi] = path
            options.say(f"{roi}: best layer {result['best_layer']}, mean CV r {result['mean_cv_r']:.3f}, "
                        f"mean test r {result['mean_test_r']:.3f} ({len(roi_voxels)} voxels)")
    with timer("write"):
        figures.summary_figures(root, subj, *encoding_results.write_summaries(root, subj))
    print(f"stage times: {timer}")
    return written


# --- Checking every input before the first write ------------------------------------------

def result_settings(opts, method, epochs):
    """The settings of this run that a result records and that must agree for it to be reused."""
    settings = {"alpha_grid": list(map(float, opts.ALPHAS)), "n_components": opts.N_COMPONENTS,
                "n_folds": opts.N_FOLDS, "image_size": opts.IMAGE_SIZE, "epochs": epochs,
                "feature_precision": opts.FEATURE_PRECISION, "engine_precision": opts.ENGINE_PRECISION,
                "format_version": utils.FORMAT_VERSION}
    if method == "untuned":
        settings["weights"] = opts.WEIGHTS
        if str(opts.WEIGHTS).lower() == "none":
            settings["seed"] = opts.SEED
    return settings


def run_settings(opts):
    """(model subject, result tag, checkpoint epochs, result_settings) of a run of these options."""
    model_subj = opts.SUBJ if opts.MODEL_SUBJ is None else opts.MODEL_SUBJ
    tag = encoding_results.method_tag(opts.METHOD, opts.SUBJ, model_subj, opts.PROTOCOL)
    epochs = utils.method_epochs(opts, opts.METHOD)
    return model_subj, tag, epochs, result_settings(opts, opts.METHOD, epochs)


def pending(opts):
    """The ROIs a run of these options would fit, as pending_rois lists them (finished and absent ones left out)."""
    _, tag, _, settings = run_settings(opts)
    return pending_rois(opts, opts.SUBJ, utils.hemi_code(opts.HEMISPHERE), tag, settings)[0]


def pending_rois(opts, subj, hemi, tag, settings):
    """The ROIs still to fit, as a list of (roi, voxels, result path), and the absent ones, as
    {roi: voxel count}; absent and finished ones are skipped with a line.

    A finished result made with other voxels or ``settings`` is an error (safe_io.check_same_settings).
    Nothing is written here: main records the absent ROIs once every input is checked.
    """
    pending, absent = [], {}
    for roi in opts.ROIS:
        voxels = utils.roi_voxel_indices(opts.ROOT, subj, hemi, roi)
        path = encoding_results.result_path(opts.ROOT, subj, tag, hemi, roi)
        if len(voxels) < opts.MIN_VOXELS:
            options.say(f"skip {roi}: {len(voxels)} voxels in {hemi} of {utils.subj_dir(subj)} "
                        f"(fewer than MIN_VOXELS={opts.MIN_VOXELS}); recorded as absent")
            absent[roi] = len(voxels)
        elif encoding_results.result_complete(path) and not opts.OVERWRITE:
            safe_io.check_same_settings(path, encoding_results.load_result(path), {"voxels": voxels, **settings},
                                        "use --overwrite to refit it, or another --root")
            options.say(f"skip {roi}: {path} exists (use --overwrite to refit)")
        else:
            pending.append((roi, voxels, path))
    return pending, absent


def untuned_choice(root, subj, hemisphere, roi, voxels, alphas):
    """(best layer, per-voxel alpha index) chosen on the untuned network for the untuned-layer protocol."""
    path = encoding_results.result_path(root, subj, "untuned", hemisphere, roi)
    if not encoding_results.result_complete(path):
        raise safe_io.UserError(f"no untuned result at {path}: run python fit_encoding_models.py --method untuned "
                                f"--subj {subj} --hemisphere {utils.hemi_code(hemisphere)} --rois {roi} first")
    base = encoding_results.load_result(path)
    if not np.array_equal(base["voxels"], voxels) or base["alpha_grid"] != list(alphas):
        raise safe_io.UserError(f"untuned result {path} was fitted on other voxels or ALPHAS: "
                                "re-run the untuned method with --overwrite")
    return base["best_layer"], base["alpha_index"]


def spill_folder(opts):
    """Where the features are spilled: SCRATCH, its $VARS expanded in this process (on a cluster,
    on the node that runs the job), or ROOT/cache."""
    if opts.SCRATCH is None:
        return utils.cache_dir(opts.ROOT)
    return Path(safe_io.expand_vars(opts.SCRATCH, "--scratch"))


def check_inputs(opts):
    """Every input of the run, checked before anything is written: the output folders, the results
    that exist (settings, readability and voxels, since the summaries read them all, with the
    absent_rois.json and the other subjects' group summaries), the AlexNet weights or every
    checkpoint (read whole: checksum, tensors), the untuned choices of the untuned-layer protocol,
    the images (names in row order, headers) and the fMRI of every pending ROI (NaN, Inf, row
    count). Only the image cache, built next, decodes every image.

    Returns
    -------
    SimpleNamespace: hemi, tag, model_subj, device, scratch, epochs, settings, pending [(roi,
    voxels, path)], absent {roi: n_voxels}, fixed (untuned choices or None), train, test and
    folds (the split), voxels (union of the pending ROIs' voxels) and fmri (their columns,
    float32 (n_images, n_voxels)).
    """
    root, subj, method, hemi = opts.ROOT, opts.SUBJ, opts.METHOD, utils.hemi_code(opts.HEMISPHERE)
    if opts.MODEL_SUBJ not in (None, subj) and method not in encoding_results.TRANSFER_METHODS:
        raise safe_io.UserError(f"MODEL_SUBJ {opts.MODEL_SUBJ} is for cl-tuned or reg-tuned models only "
                                f"({method} is not tuned on one subject): drop --model-subj")
    model_subj, tag, epochs, settings = run_settings(opts)
    device = utils.resolve_device(opts.DEVICE)
    scratch = spill_folder(opts)
    safe_io.check_writable(utils.encoding_dir(root, subj), utils.cache_dir(root), scratch)
    pending, absent = pending_rois(opts, subj, hemi, tag, settings)
    encoding_results.check_summary_inputs(root, subj, skip={path for _, _, path in pending})
    if method == "untuned" and pending:
        utils.load_alexnet(opts.WEIGHTS, opts.SEED)
    for roi, _, _ in pending if method != "untuned" else []:
        models.tuned_meta(root, method, model_subj, hemi, roi, epochs, opts.IMAGE_SIZE)
    fixed = None
    if opts.PROTOCOL == "untuned-layer" and method != "untuned":
        fixed = {roi: untuned_choice(root, subj, hemi, roi, v, opts.ALPHAS) for roi, v, _ in pending}
    paths = utils.list_images(root, subj)
    safe_io.check_image_files(paths)
    n_images = len(paths)
    train, test = utils.train_test_split(n_images)
    folds = utils.cv_folds(train, opts.N_FOLDS)
    voxels = np.unique(np.concatenate([v for _, v, _ in pending])) if pending else None
    fmri = None
    if pending:
        fmri = utils.load_fmri(root, subj, hemi, voxels)
        utils.check_counts(n_images, fmri, str(utils.fmri_path(root, subj, hemi)))
    return SimpleNamespace(hemi=hemi, tag=tag, model_subj=model_subj, device=device, scratch=scratch, epochs=epochs,
                           settings=settings, pending=pending, absent=absent, fixed=fixed, train=train, test=test,
                           folds=folds, voxels=voxels, fmri=fmri)


if __name__ == "__main__":
    main()
