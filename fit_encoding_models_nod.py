"""Transfer to NOD: encoding models of NOD V1-V4 with the feature extractors tuned on NSD.

For each NOD subject (Natural Object Dataset, OpenNeuro ds004496; see nod_utils.py for
the layout and conventions), hemisphere and HCP-MMP area (V1, V2, V3, V4), the responses
of the area's top-N_VOXELS vertices by pRF R2 are predicted from the AlexNet features of
each method (untuned, cl-tuned, reg-tuned, pooled-avg, pooled-const) tuned on NSD subject
MODEL_SUBJ, same hemisphere, NSD ROI V1v/V2v/V3v/hV4 (dorsal V1d/V2d/V3d with NSD_STREAM).
The betas are z-scored per run block (ZSCORE); the hemisphere of a vertex comes from the
CIFTI brain models, or from the label numbers as in the authors' code (HEMISPHERE_CONVENTION).
The protocol is the NSD one (encoding.py): the seeded 85/15 split of the trials, 5
contiguous folds inside train (utils.cv_folds), PCA + ridge per layer and fold,
per-vertex alpha, best layer by mean CV r, refit on train, test r per vertex.

Outputs under ROOT/encoding_results/nod/: sub-XX/sub-XX_<hemi>_<area>_<method>.{npz,json}
(written after each one; reruns skip them unless --overwrite, and refuse results made
with another ZSCORE or HEMISPHERE_CONVENTION), summary.csv and the
figure nod_transfer.png / .pdf (mean test r per area and method across subjects).
"""

import sys

import numpy as np
import nod_utils
import options
import safe_io
import utils

# The heavy helpers load on first use, so that --help answers at once.
models = options.lazy_import("models")
encoding = options.lazy_import("encoding")
encoding_results = options.lazy_import("encoding_results")
figures = options.lazy_import("figures")

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
NOD_ROOT: str | None = None  # the ds004496 clone holding supportfiles/ (None: ROOT/nod)
SUBJECTS = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # NOD subjects
SESSIONS = [1, 2, 3, 4]  # NOD ImageNet sessions
RUNS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # runs of each session
ROIS = ["V1", "V2", "V3", "V4"]  # NOD (HCP-MMP) areas
HEMISPHERES = ["lh", "rh"]  # hemispheres; NSD models of the same hemisphere extract the features
HEMISPHERE_CONVENTION = "anatomical"  # anatomical (CIFTI CORTEX_LEFT/RIGHT) or authors (lh = HCP-MMP labels 1..180)
ZSCORE = "run"  # run: one mean and std per 100-trial run block (the authors'); vertex: per vertex within each run
N_VOXELS = 50  # vertices per area and hemisphere: the top ones by pRF R2
METHODS = ["untuned", "cl-tuned", "reg-tuned", "pooled-avg", "pooled-const"]  # feature extractors
MODEL_SUBJ = 1  # the NSD subject whose tuned models extract the features
NSD_STREAM = "ventral"  # NSD ROIs of V1-V3: ventral (V1v, V2v, V3v) or dorsal (V1d, V2d, V3d)
CL_EPOCHS = utils.DEFAULT_EPOCHS["cl-tuned"]  # epochs in the cl-tuned checkpoint names
REG_EPOCHS = utils.DEFAULT_EPOCHS["reg-tuned"]  # epochs in the reg-tuned checkpoint names
POOLED_EPOCHS = utils.DEFAULT_EPOCHS["pooled-avg"]  # epochs in the pooled checkpoint names
WEIGHTS = "imagenet"  # AlexNet weights of the untuned method: imagenet, none (seeded random) or a path
SEED = 0  # seed of the random AlexNet when WEIGHTS is none
ALPHAS = [0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7]  # ridge penalties
N_COMPONENTS = 1000  # PCA components (at most the fold's train size and the layer size)
N_FOLDS = 5  # cross-validation folds inside the train split
ENGINE_PRECISION = "fp64"  # PCA eigensolver: fp64 (exact) or mixed (float32 eigh refined in float64; for GPUs with slow float64)
IMAGE_SIZE = 224  # images are squash-resized to IMAGE_SIZE x IMAGE_SIZE
BATCH_SIZE = 256  # images per forward pass
DEVICE = "auto"  # auto, cpu or cuda
OVERWRITE = False  # recompute results that exist
# ---
CHOICES = {"ROIS": nod_utils.NOD_ROIS, "HEMISPHERES": utils.HEMISPHERE_NAMES,
           "HEMISPHERE_CONVENTION": nod_utils.HEMISPHERE_CONVENTIONS, "ZSCORE": nod_utils.ZSCORES,
           "METHODS": utils.METHODS, "NSD_STREAM": list(nod_utils.NSD_ROI),
           "ENGINE_PRECISION": utils.ENGINE_PRECISIONS}
# The NSD models are read from --root, which need not hold the NSD data (roi_masks).
RANGES = {"SUBJECTS": options.at_least(1), "HEMISPHERES": utils.HEMISPHERE_LIST, "SESSIONS": options.at_least(1), "RUNS": options.at_least(1),
          "N_VOXELS": options.at_least(1), "MODEL_SUBJ": options.between(1, utils.N_SUBJECTS),
          "CL_EPOCHS": options.at_least(1), "REG_EPOCHS": options.at_least(1), "POOLED_EPOCHS": options.at_least(1),
          "SEED": options.SEED_RANGE, "ALPHAS": utils.ALPHA_GRID, "N_COMPONENTS": options.at_least(1),
          "N_FOLDS": options.at_least(2), "IMAGE_SIZE": utils.ALEXNET_INPUT, "BATCH_SIZE": options.at_least(1)}


def settings(opts, method):
    """The settings a result of ``method`` records and that must agree for it to be reused."""
    out = {"zscore": opts.ZSCORE, "hemisphere_convention": opts.HEMISPHERE_CONVENTION,
           "sessions": list(opts.SESSIONS), "runs": list(opts.RUNS), "n_voxels": opts.N_VOXELS,
           "nsd_stream": opts.NSD_STREAM, "alpha_grid": list(map(float, opts.ALPHAS)),
           "n_components": opts.N_COMPONENTS, "n_folds": opts.N_FOLDS, "image_size": opts.IMAGE_SIZE,
           "epochs": utils.method_epochs(opts, method), "engine_precision": opts.ENGINE_PRECISION,
           "format_version": utils.FORMAT_VERSION}
    if method in ("cl-tuned", "reg-tuned"):
        out["model_subj"] = opts.MODEL_SUBJ
    if method == "untuned":
        out["weights"] = opts.WEIGHTS
        if str(opts.WEIGHTS).lower() == "none":
            out["seed"] = opts.SEED
    return out


def pending(opts, subj, hemi, roi, method):
    """Whether a result must be fitted; an existing one made with other settings is an error."""
    path = encoding_results.nod_result_path(opts.ROOT, subj, hemi, roi, method)
    if opts.OVERWRITE or not encoding_results.result_complete(path):
        return True
    safe_io.check_same_settings(path, encoding_results.load_result(path), settings(opts, method),
                              "rerun with --overwrite, or write these settings under another --root")
    return False


def todo_results(opts):
    """dict subject -> {(method, hemisphere): [areas whose result is still to fit]} (pending, for each)."""
    hemis = [utils.hemi_code(h) for h in opts.HEMISPHERES]
    return {subj: {(method, hemi): [roi for roi in opts.ROIS if pending(opts, subj, hemi, roi, method)]
                   for method in opts.METHODS for hemi in hemis} for subj in opts.SUBJECTS}


def fit_method(opts, data, folds, device, subj, hemi, method, todo, cache):
    """Fit every area in ``todo`` with one method's features, extracting each AlexNet's features once.

    ``cache`` holds the last network's features and checkpoint meta as {key: (features, meta)};
    the untuned ones serve every area and hemisphere, a tuned model's only its own NSD ROI and
    hemisphere, so a network is loaded only when its features are not cached.
    """
    streams = nod_utils.NSD_ROI[opts.NSD_STREAM]
    for roi in todo:
        nsd_roi = streams[roi]
        key = (method,) if method == "untuned" else (method, hemi, nsd_roi)
        if key not in cache:
            alexnet, meta = models.load_feature_alexnet(opts.ROOT, method, opts.MODEL_SUBJ, hemi, nsd_roi,
                                                        utils.method_epochs(opts, method), opts.WEIGHTS, device,
                                                        opts.SEED, opts.IMAGE_SIZE, voxels=False)
            cache.clear()
            cache[key] = encoding.layer_features(alexnet, data.images, device, opts.BATCH_SIZE), meta
        layers, meta = cache[key]
        vertices, fmri = data.roi_fmri(roi, hemi, opts.N_VOXELS)
        result = encoding.encode_roi(layers, fmri, data.train, data.test, folds, opts.ALPHAS,
                                     opts.N_COMPONENTS, device=device, precision=opts.ENGINE_PRECISION)
        if result["n_constant"]:
            options.say(f"warning: {roi}: {result['n_constant']} constant vertex(es) on the training split; "
                        "their r is set to 0")
        result.update(subject=subj, hemisphere=hemi, roi=roi, method=method, nsd_roi=nsd_roi,
                      model_subj=opts.MODEL_SUBJ if method in encoding_results.TRANSFER_METHODS else None,
                      vertices=vertices, weights=opts.WEIGHTS if meta is None else meta.get("weights"),
                      config=options.run_config(opts))
        result.update(settings(opts, method))
        encoding_results.save_result(result, encoding_results.nod_result_path(opts.ROOT, subj, hemi, roi, method))
        print(f"{nod_utils.sub_name(subj)} {hemi} {roi} {method}: best layer {result['best_layer']}, "
              f"mean CV r {np.mean(result['cv_r']):.3f}, mean test r {np.mean(result['test_r']):.3f}")


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    device, jobs = check_inputs(opts)
    for subj, todo in options.progress(jobs.items(), "NOD subjects"):
        if not any(todo.values()):
            print(f"{nod_utils.sub_name(subj)}: all results exist, skipped (use --overwrite)")
            continue
        data = nod_utils.NODSubjectData(opts.ROOT, subj, opts.NOD_ROOT, opts.SESSIONS, opts.RUNS, opts.IMAGE_SIZE,
                                        opts.ZSCORE, opts.HEMISPHERE_CONVENTION, opts.OVERWRITE)
        folds, cache = utils.cv_folds(data.train, opts.N_FOLDS), {}
        for (method, hemi), rois in todo.items():
            if rois:
                fit_method(opts, data, folds, device, subj, hemi, method, rois, cache)
    folder = encoding_results.nod_results_dir(opts.ROOT)
    table = encoding_results.nod_summary_table(opts.ROOT)
    if not table.empty:
        other = (table["zscore"] != opts.ZSCORE) | (table["hemisphere_convention"] != opts.HEMISPHERE_CONVENTION)
        if other.any():
            print(f"{int(other.sum())} result(s) under {folder} made with other ZSCORE or "
                  "HEMISPHERE_CONVENTION settings are left out of the summary")
        table = table[~other].reset_index(drop=True)
    if table.empty:
        raise safe_io.UserError(f"no NOD results under {folder}: check SUBJECTS and METHODS")
    safe_io.atomic_write_text(table.to_csv(index=False), folder / "summary.csv")
    figures.plot_nod_summary(table, folder / "nod_transfer")
    print(table.groupby(["hemisphere", "roi", "method"], sort=False)[["mean_cv_r", "mean_test_r"]].mean().round(3))
    return table


def check_inputs(opts):
    """Every input of the run, checked before anything is written: the device, the output folders, the
    results that exist (settings), the AlexNet weights or the tuned checkpoints (read whole: checksum,
    tensors), and for every subject with work to do its events and labels, its betas (each run read and
    checked unless a sound cache of the same files exists), its stimuli (headers) and its pRF R2 and areas.

    Returns
    -------
    device, and jobs : dict subject -> {(method, hemisphere): [areas still to fit]}.
    """
    device = utils.resolve_device(opts.DEVICE)
    safe_io.check_writable(encoding_results.nod_results_dir(opts.ROOT), utils.cache_dir(opts.ROOT))
    jobs = todo_results(opts)
    todo = {(method, hemi, roi) for areas in jobs.values() for (method, hemi), rois in areas.items() for roi in rois}
    if any(method == "untuned" for method, _, _ in todo):
        utils.load_alexnet(opts.WEIGHTS, opts.SEED)
    # Only the NSD models' trunks are used, so their voxels are not checked (ROOT needs no NSD masks).
    for method, hemi, roi in sorted(todo):
        if method != "untuned":
            models.tuned_meta(opts.ROOT, method, opts.MODEL_SUBJ, hemi, nod_utils.NSD_ROI[opts.NSD_STREAM][roi],
                              utils.method_epochs(opts, method), opts.IMAGE_SIZE, voxels=False)
    nod = nod_utils.nod_dir(opts.ROOT, opts.NOD_ROOT)
    for subj, areas in jobs.items():
        if any(areas.values()):
            labels = nod_utils.trial_labels(nod, subj, opts.SESSIONS, opts.RUNS)
            shape = nod_utils.beta_shape(nod, subj, opts.SESSIONS, opts.RUNS, opts.ZSCORE, opts.OVERWRITE)
            nod_utils.check_sizes(nod, subj, shape, len(labels))
            safe_io.check_image_files(nod_utils.stimulus_paths(nod, labels))
            _, n_left = nod_utils.load_prf_r2(nod, subj)
            for hemi, roi in {(hemi, roi) for (_, hemi), rois in areas.items() for roi in rois}:
                nod_utils.roi_vertices(nod, roi, hemi, n_left, opts.HEMISPHERE_CONVENTION)
    return device, jobs


if __name__ == "__main__":
    main()
