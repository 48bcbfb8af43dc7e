"""Voxelwise encoding models (PCA + ridge) of each ROI from the AlexNet features of one method.

For subject SUBJ, one hemisphere and each ROI, the engine in encoding.py scores all eight
AlexNet layers by 5-fold cross-validation inside the 85% training split (PCA, ridge for
all ALPHAS, one alpha per voxel), picks the best layer, refits on the training split and
reports the test r of every voxel. METHOD picks the feature extractor: the untuned AlexNet
(features extracted once for all ROIs) or the AlexNet of the ROI's cl-tuned, reg-tuned or
pooled checkpoint. With MODEL_SUBJ set to another subject, that subject's tuned model is
applied to SUBJ (transfer). PROTOCOL untuned-layer reuses the layer and per-voxel alphas
chosen on the untuned network (its results must exist).

Outputs, under ROOT/encoding_results/SubjX/:
  <tag>/<hemi>_<ROI>.npz and .json   per ROI, written after each ROI (reruns skip them);
                                     tag = method [+ _from-SubjY] [+ _untuned-layer]
  <tag>/layer_scores.csv, <tag>/layer_scores_<hemi>.png/.pdf   ROI x layer CV scores, best layer boxed
  methods.csv, methods_<hemi>.png/.pdf                          every method present, per ROI
  scatter_<tag>_vs_untuned_<hemi>.png/.pdf                      per-voxel test r against untuned
  absent_rois.json                                              ROIs skipped for having < MIN_VOXELS voxels
  group_summary.csv (and ../group_summary.csv for all subjects) per ROI group (all, early,
                     higher) and score (test r, CV r): mean r per method, % of voxels where
                     CL > untuned, CL > reg, pooled > CL (the authors' unweighted ROI averages)
With --transfer-matrix nothing is fitted: the model-subject x target-subject matrices of
METHOD (mean test r, fraction of target voxels improved over untuned) per ROI group are
built from the results that exist, as ROOT/encoding_results/transfer_<method>_<hemi>*.csv
and .png/.pdf; TRANSFER_AGGREGATION authors averages the per-ROI matrices without weights
(an ROI absent in a subject counts as 0), voxels pools the voxels of the ROIs.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import encoding
import figures
import models
import results_utils as ru
import utils

# --- Options ---
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
MIN_VOXELS = utils.MIN_VOXELS  # ROIs with fewer voxels are skipped and recorded as absent (the authors' 20)
OVERWRITE = False  # recompute ROIs whose results exist
TRANSFER_MATRIX = False  # only build the model-subject x target-subject matrices from existing results
TRANSFER_AGGREGATION = "authors"  # transfer matrices: authors (unweighted mean over ROIs, absent ROI = 0) or voxels (pooled)
# ---
CHOICES = {"METHOD": utils.METHODS, "HEMISPHERE": utils.HEMISPHERE_NAMES, "ROIS": utils.ROIS,
           "PROTOCOL": ["per-method", "untuned-layer"], "FEATURE_PRECISION": utils.PRECISIONS,
           "ENGINE_PRECISION": encoding.ENGINE_PRECISIONS,
           "TRANSFER_AGGREGATION": ["authors", "voxels"]}
RANGES = {"SUBJ": utils.SUBJECT, "MODEL_SUBJ": utils.SUBJECT, "ALPHAS": utils.ALPHA_GRID,
          "N_COMPONENTS": utils.at_least(1), "N_FOLDS": utils.at_least(2), "IMAGE_SIZE": utils.ALEXNET_INPUT,
          "SEED": utils.at_least(0), "CL_EPOCHS": utils.at_least(1), "REG_EPOCHS": utils.at_least(1),
          "POOLED_EPOCHS": utils.at_least(1), "BATCH_SIZE": utils.at_least(1), "MIN_VOXELS": utils.at_least(1)}

TRANSFER_METHODS = ("cl-tuned", "reg-tuned")
# The methods of the group summaries, each on its own subject with the per-method protocol.
SUMMARY_METHODS = ("untuned", "cl-tuned", "reg-tuned", "pooled-avg", "pooled-const")
SUMMARY_COMPARISONS = (("cl-tuned", "untuned"), ("cl-tuned", "reg-tuned"), ("pooled-avg", "cl-tuned"),
                       ("pooled-const", "cl-tuned"))


def check_transfer(opts):
    """A model from another subject (MODEL_SUBJ) exists only for the subject-specific methods."""
    if opts.MODEL_SUBJ not in (None, opts.SUBJ) and opts.METHOD not in TRANSFER_METHODS:
        raise utils.UserError(f"MODEL_SUBJ {opts.MODEL_SUBJ} is for cl-tuned or reg-tuned models only "
                              f"({opts.METHOD} is not tuned on one subject): drop --model-subj")


def untuned_choice(root, subj, hemisphere, roi, voxels, alphas):
    """(best layer, per-voxel alpha index) chosen on the untuned network for the untuned-layer protocol."""
    path = ru.result_path(root, subj, "untuned", hemisphere, roi)
    if not ru.result_complete(path):
        raise utils.UserError(f"no untuned result at {path}: run python fit_encoding_models.py --method untuned "
                              f"--subj {subj} --hemisphere {utils.hemi_code(hemisphere)} --rois {roi} first")
    base = ru.load_result(path)
    if not np.array_equal(base["voxels"], voxels) or base["alpha_grid"] != list(alphas):
        raise utils.UserError(f"untuned result {path} was fitted on other voxels or ALPHAS: "
                              "re-run the untuned method with --overwrite")
    return base["best_layer"], base["alpha_index"]


def spill_folder(opts):
    """Where the features are spilled: SCRATCH, its $VARS expanded in this process (on a cluster,
    on the node that runs the job), or ROOT/cache."""
    if opts.SCRATCH is None:
        return utils.cache_dir(opts.ROOT)
    folder = os.path.expandvars(opts.SCRATCH)
    if "$" in folder:
        raise utils.UserError(f"--scratch {opts.SCRATCH}: an environment variable in it is not set here "
                              f"({folder}); set it, or give a folder")
    return Path(folder)


def record_absent(root, subj, hemisphere, roi, n_voxels):
    """Add (or, with n_voxels None, remove) an ROI in the subject's absent_rois.json."""
    path = utils.encoding_dir(root, subj) / "absent_rois.json"
    absent = json.loads(path.read_text()) if path.is_file() else {}
    if n_voxels is None and roi not in absent.get(utils.hemi_code(hemisphere), {}):
        return
    hemi = absent.setdefault(utils.hemi_code(hemisphere), {})
    if n_voxels is None:
        hemi.pop(roi, None)
    else:
        hemi[roi] = int(n_voxels)
    utils.atomic_json_dump(absent, path)


# --- Summaries and figures ---------------------------------------------------------------


def _roi_order(key):
    return utils.ROIS.index(key)


def comparable_untuned_r(result, untuned):
    """The untuned test r to compare a tuned result with: None for an untuned result, or without an
    untuned result on the same voxels."""
    if untuned is None or result["method"] == "untuned" or not np.array_equal(result["voxels"], untuned["voxels"]):
        return None
    return untuned["test_r"]


def group_summary(results, subj):
    """Per ROI group (utils.ROI_GROUPS) and score (test r, CV r at the best layer): the authors' summaries.

    For every method of SUMMARY_METHODS with results, averaged without weights over the
    (hemisphere, ROI) pairs of the group that every such method has fitted on the same
    voxels: the mean r, and for each pair of SUMMARY_COMPARISONS the % of voxels where the
    first method's r beats the second's (NaN where a method has no results).

    Parameters
    ----------
    results : dict (tag, hemisphere, roi) -> result, from ``collect_results``.

    Returns
    -------
    DataFrame, one row per (group, score).
    """
    methods = [m for m in SUMMARY_METHODS if any(k[0] == m for k in results)]
    rows = []
    for group, members in utils.ROI_GROUPS.items():
        pairs = []
        for hemi in utils.HEMISPHERES:
            for roi in members:
                found = [results.get((m, hemi, roi)) for m in methods]
                if methods and all(r is not None and np.array_equal(r["voxels"], found[0]["voxels"]) for r in found):
                    pairs.append(dict(zip(methods, found)))
        for score in ("test_r", "cv_r"):
            row = {"subject": int(subj), "group": group, "score": score, "n_rois": len(pairs)}
            for m in SUMMARY_METHODS:
                row[f"mean_{m}"] = (float(np.mean([p[m][score].mean() for p in pairs]))
                                    if pairs and m in methods else np.nan)
            for a, b in SUMMARY_COMPARISONS:
                row[f"pct_{a}_gt_{b}"] = (100 * float(np.mean([np.mean(p[a][score] > p[b][score]) for p in pairs]))
                                          if pairs and a in methods and b in methods else np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def write_group_summaries(root, subj, results):
    """The subject's group_summary.csv, then encoding_results/group_summary.csv of every subject that has one."""
    utils.atomic_write_text(group_summary(results, subj).to_csv(index=False),
                            utils.encoding_dir(root, subj) / "group_summary.csv")
    files = [utils.encoding_dir(root, s) / "group_summary.csv" for s in utils.find_subjects(root)]
    every = pd.concat([pd.read_csv(f) for f in files if f.is_file()], ignore_index=True)
    utils.atomic_write_text(every.to_csv(index=False), Path(root) / "encoding_results" / "group_summary.csv")


def write_summaries(root, subj):
    """Regenerate the subject's summary tables (group_summary.csv included) and figures from every result.

    Returns
    -------
    methods : DataFrame, one row per (tag, hemisphere, ROI), as written to methods.csv.
    """
    out_dir = utils.encoding_dir(root, subj)
    results = ru.collect_results(root, subj)
    rows = []
    for (tag, hemi, roi), r in sorted(results.items(), key=lambda kv: (kv[0][1], _roi_order(kv[0][2]), kv[0][0])):
        untuned = results.get(("untuned", hemi, roi))
        rows.append({"tag": tag, "method": r["method"], "model_subj": r["model_subj"], "protocol": r["protocol"],
                     "hemisphere": hemi, "roi": roi, "n_voxels": len(r["voxels"]), "best_layer": r["best_layer"],
                     "mean_cv_r": float(np.mean(r["cv_r"])), "mean_test_r": float(np.mean(r["test_r"])),
                     "pct_beats_untuned": ru.pct_beats_untuned(r["test_r"], comparable_untuned_r(r, untuned)),
                     **{layer: r["layer_scores"][layer] for layer in utils.LAYERS}})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    write_group_summaries(root, subj, results)
    methods = table.drop(columns=utils.LAYERS)
    utils.atomic_write_text(methods.to_csv(index=False), out_dir / "methods.csv")
    for tag, sub in table.groupby("tag", sort=False):
        cols = ["hemisphere", "roi"] + utils.LAYERS + ["best_layer"]
        utils.atomic_write_text(sub[cols].to_csv(index=False), out_dir / tag / "layer_scores.csv")
        for hemi, part in sub.groupby("hemisphere"):
            figures.plot_layer_scores(part, out_dir / tag / f"layer_scores_{hemi}.png")
    for hemi, part in table.groupby("hemisphere"):
        figures.plot_methods(part, out_dir / f"methods_{hemi}.png")
        for tag in dict.fromkeys(part["tag"]):
            pairs = [(results["untuned", hemi, roi], results[tag, hemi, roi]) for roi in part["roi"].unique()
                     if tag != "untuned" and (tag, hemi, roi) in results and ("untuned", hemi, roi) in results]
            pairs = [(u, r) for u, r in pairs if np.array_equal(u["voxels"], r["voxels"])]
            if pairs:
                figures.plot_scatter(np.concatenate([u["test_r"] for u, _ in pairs]),
                             np.concatenate([r["test_r"] for _, r in pairs]), tag,
                             out_dir / f"scatter_{tag}_vs_untuned_{hemi}.png")
    return methods


def transfer_table(root, method, hemisphere, rois, min_voxels=utils.MIN_VOXELS):
    """One row per (ROI, model subject, target subject) of ``method``, over the model and target subjects
    that have at least one result.

    'status' is 'fitted' (a result exists), 'absent' (the ROI has fewer than ``min_voxels``
    voxels in the target or the model subject, so the authors count it as 0) or 'missing'
    (not fitted yet). 'mean_test_r' and 'frac_improved' (fraction of the target's voxels
    whose test r beats its untuned result; NaN without one) are set for fitted rows;
    'sum_r', 'n_improved' and 'n_compared' serve the voxel-pooled aggregation.
    """
    hemi = utils.hemi_code(hemisphere)
    found = {}
    for target in utils.find_subjects(root):
        for model_subj in utils.find_subjects(root):
            for roi in rois:
                path = ru.result_path(root, target, ru.method_tag(method, target, model_subj, "per-method"), hemi, roi)
                if ru.result_complete(path):
                    found[roi, model_subj, target] = path
    model_subjects, targets = sorted({k[1] for k in found}), sorted({k[2] for k in found})
    counts = {(s, roi): utils.roi_voxel_count(root, s, hemi, roi)
              for s in set(model_subjects) | set(targets) for roi in rois}
    rows = []
    for roi in rois:
        for model_subj in model_subjects:
            for target in targets:
                row = {"roi": roi, "model_subj": model_subj, "target_subj": target, "status": "missing",
                       "n_voxels": 0, "sum_r": 0.0, "n_compared": 0, "n_improved": 0,
                       "mean_test_r": np.nan, "frac_improved": np.nan}
                if (roi, model_subj, target) in found:
                    r = ru.load_result(found[roi, model_subj, target])
                    base = ru.result_path(root, target, "untuned", hemi, roi)
                    untuned = ru.load_result(base) if ru.result_complete(base) else None
                    row.update(status="fitted", n_voxels=len(r["voxels"]), sum_r=float(r["test_r"].sum()),
                               mean_test_r=float(r["test_r"].mean()))
                    if untuned is not None and np.array_equal(untuned["voxels"], r["voxels"]):
                        improved = r["test_r"] > untuned["test_r"]
                        row.update(n_compared=len(improved), n_improved=int(improved.sum()),
                                   frac_improved=float(improved.mean()))
                elif min(counts[target, roi], counts[model_subj, roi]) < min_voxels:
                    row["status"] = "absent"
                rows.append(row)
    return pd.DataFrame(rows, columns=["roi", "model_subj", "target_subj", "status", "n_voxels", "sum_r",
                                       "n_compared", "n_improved", "mean_test_r", "frac_improved"])


def transfer_matrices(table, rois, aggregation="authors"):
    """Model-subject x target-subject matrices of mean test r and fraction improved over the ROIs ``rois``.

    Parameters
    ----------
    table : DataFrame from ``transfer_table``.
    rois : the ROIs to aggregate (e.g. one of utils.ROI_GROUPS).
    aggregation : 'authors': the unweighted mean of the per-ROI values over the ROIs with
        at least one result, an absent ROI counting as 0 and a missing one making the
        entry NaN; 'voxels': the voxels of the fitted ROIs pooled (absent ROIs add nothing).

    Returns
    -------
    mean_r, frac_improved : DataFrames indexed by model subject, columns target subject
        (None, None when no ROI of ``rois`` has a result).
    """
    part = table[table["roi"].isin(rois)]
    part = part[part.groupby("roi")["status"].transform(lambda st: (st == "fitted").any())]
    if part.empty:
        return None, None
    keys = ["model_subj", "target_subj"]
    if aggregation == "voxels":
        fitted = part.assign(**{c: part[c].where(part["status"] == "fitted", 0)
                                for c in ("n_voxels", "sum_r", "n_compared", "n_improved")})
        pooled = fitted.groupby(keys)[["n_voxels", "sum_r", "n_compared", "n_improved"]].sum()
        mean_r = pooled["sum_r"] / pooled["n_voxels"].where(pooled["n_voxels"] > 0)
        frac = pooled["n_improved"] / pooled["n_compared"].where(pooled["n_compared"] > 0)
    else:
        absent = part["status"] == "absent"
        values = part.assign(mean_test_r=part["mean_test_r"].mask(absent, 0.0),
                             frac_improved=part["frac_improved"].mask(absent, 0.0))
        # mean(skipna=False): one missing ROI makes the entry NaN rather than silently dropping it.
        grouped = values.groupby(keys)
        mean_r = grouped["mean_test_r"].apply(lambda v: v.mean(skipna=False))
        frac = grouped["frac_improved"].apply(lambda v: v.mean(skipna=False))
    return mean_r.unstack("target_subj"), frac.unstack("target_subj")


def run_transfer_matrix(opts):
    """Write the per-ROI transfer table and, per ROI group, the two matrices and their figure."""
    if opts.METHOD not in TRANSFER_METHODS:
        raise utils.UserError(f"--transfer-matrix needs a subject-specific method, not {opts.METHOD!r}: "
                              "use --method cl-tuned or reg-tuned")
    hemi = utils.hemi_code(opts.HEMISPHERE)
    table = transfer_table(opts.ROOT, opts.METHOD, hemi, opts.ROIS, opts.MIN_VOXELS)
    if not (table["status"] == "fitted").any():
        raise utils.UserError(f"no {opts.METHOD} results under {Path(opts.ROOT) / 'encoding_results'}: "
                              "fit some first (with --model-subj for transfer)")
    base = Path(opts.ROOT) / "encoding_results" / f"transfer_{opts.METHOD}_{hemi}"
    utils.atomic_write_text(table.drop(columns=["sum_r"]).to_csv(index=False), f"{base}.csv")
    suffix = "" if opts.TRANSFER_AGGREGATION == "authors" else f"_{opts.TRANSFER_AGGREGATION}"
    matrices = {}
    for group, members in utils.ROI_GROUPS.items():
        mean_r, frac = transfer_matrices(table, members, opts.TRANSFER_AGGREGATION)
        if mean_r is None:
            continue
        stem = f"{base}_{group}{suffix}"
        utils.atomic_write_text(mean_r.to_csv(), f"{stem}_mean_r.csv")
        utils.atomic_write_text(frac.to_csv(), f"{stem}_frac_improved.csv")
        figures.plot_transfer(mean_r, frac, f"{opts.METHOD} {hemi} {group} ROIs ({opts.TRANSFER_AGGREGATION})", f"{stem}.png")
        print(f"{group} ROIs, mean test r (rows: model subject, columns: target subject)\n{mean_r.round(3)}")
        matrices[group] = (mean_r, frac)
    return table, matrices


# --- Fitting ---------------------------------------------------------------------------

def result_settings(opts, method, epochs):
    """The settings of this run that a result records and that must agree for it to be reused."""
    settings = {"alpha_grid": list(map(float, opts.ALPHAS)), "n_components": opts.N_COMPONENTS,
                "n_folds": opts.N_FOLDS, "image_size": opts.IMAGE_SIZE, "epochs": epochs,
                "feature_precision": opts.FEATURE_PRECISION, "engine_precision": opts.ENGINE_PRECISION,
                "code_version": utils.CODE_VERSION}
    if method == "untuned":
        settings["weights"] = opts.WEIGHTS
        if str(opts.WEIGHTS).lower() == "none":
            settings["seed"] = opts.SEED
    return settings


def pending_rois(opts, root, subj, hemi, tag, settings):
    """The ROIs still to fit, as a list of (roi, voxels, result path), and the absent ones, as
    {roi: voxel count}; absent and finished ones are skipped with a line.

    A finished result made with other voxels or ``settings`` is an error (utils.check_same_settings).
    Nothing is written here: the caller records the absent ROIs once every input is checked.
    """
    pending, absent = [], {}
    for roi in opts.ROIS:
        voxels = utils.roi_voxel_indices(root, subj, hemi, roi)
        path = ru.result_path(root, subj, tag, hemi, roi)
        if len(voxels) < opts.MIN_VOXELS:
            tqdm.write(f"skip {roi}: {len(voxels)} voxels in {hemi} of {utils.subj_dir(subj)} "
                       f"(fewer than MIN_VOXELS={opts.MIN_VOXELS}); recorded as absent")
            absent[roi] = len(voxels)
        elif ru.result_complete(path) and not opts.OVERWRITE:
            utils.check_same_settings(path, ru.load_result(path), {"voxels": voxels, **settings},
                                      "use --overwrite to refit it, or another --root")
            tqdm.write(f"skip {roi}: {path} exists (use --overwrite to refit)")
        else:
            pending.append((roi, voxels, path))
    return pending, absent


@utils.cli
def main(argv=None):
    opts = utils.parse_options(sys.modules[__name__], argv)
    check_transfer(opts)
    if opts.TRANSFER_MATRIX:
        return run_transfer_matrix(opts)
    root, subj, method, hemi = opts.ROOT, opts.SUBJ, opts.METHOD, utils.hemi_code(opts.HEMISPHERE)
    model_subj = subj if opts.MODEL_SUBJ is None else opts.MODEL_SUBJ
    tag = ru.method_tag(method, subj, model_subj, opts.PROTOCOL)
    device = utils.resolve_device(opts.DEVICE)
    scratch = spill_folder(opts)
    utils.check_writable(utils.encoding_dir(root, subj), utils.cache_dir(root), scratch)
    epochs = utils.method_epochs(opts, method)
    settings = result_settings(opts, method, epochs)
    pending, absent = pending_rois(opts, root, subj, hemi, tag, settings)
    # The summaries read every result of the subject: a corrupt one fails now, not after the fits.
    ru.collect_results(root, subj, skip={path for _, _, path in pending})
    if method != "untuned":
        # Every checkpoint is checked before any work.
        for roi, _, _ in pending:
            models.tuned_meta(root, method, model_subj, hemi, roi, epochs, opts.IMAGE_SIZE)
    fixed = None
    if opts.PROTOCOL == "untuned-layer" and method != "untuned":
        fixed = {roi: untuned_choice(root, subj, hemi, roi, v, opts.ALPHAS) for roi, v, _ in pending}
    n_images = len(utils.list_images(root, subj))
    train, test = utils.train_test_split(n_images)
    folds = utils.cv_folds(train, opts.N_FOLDS)
    # The fMRI of every pending ROI is read (and checked for NaN or Inf) before any work.
    all_voxels = np.unique(np.concatenate([v for _, v, _ in pending])) if pending else None
    if pending:
        fmri_all = utils.load_fmri(root, subj, hemi, all_voxels)
        utils.check_counts(n_images, fmri_all, str(utils.fmri_path(root, subj, hemi)))
    for roi, n_voxels in absent.items():
        record_absent(root, subj, hemi, roi, n_voxels)
    timer = encoding.StageTimer(device)
    with timer("cache"):
        utils.subject_images(root, subj, opts.IMAGE_SIZE)
    written = {roi: None for roi in opts.ROIS}
    # The untuned network's features are the same for every ROI: one pass serves them all.
    # A tuned network belongs to one ROI: one pass each.
    passes = [pending] if method == "untuned" and pending else [[item] for item in pending]
    for group in tqdm(passes, desc=f"{utils.subj_dir(subj)} {hemi} {tag}", disable=len(passes) < 2):
        voxels = np.unique(np.concatenate([v for _, v, _ in group]))
        fmri = fmri_all if len(voxels) == len(all_voxels) else fmri_all[:, np.searchsorted(all_voxels, voxels)]
        columns = {roi: np.searchsorted(voxels, v) for roi, v, _ in group}
        alexnet, meta = models.load_feature_alexnet(root, method, model_subj, hemi, group[0][0], epochs,
                                                    opts.WEIGHTS, device, opts.SEED, opts.IMAGE_SIZE)
        images = utils.subject_images(root, subj, opts.IMAGE_SIZE)
        with encoding.FeatureSpill(alexnet, images, scratch, device, opts.BATCH_SIZE,
                                   timer=timer, precision=opts.FEATURE_PRECISION) as spill:
            del images, alexnet  # the cache's pages and the network are not needed past the forward pass
            results = encoding.encode_rois(spill.layers(device), fmri, columns, train, test, folds, opts.ALPHAS,
                                           opts.N_COMPONENTS, fixed, device, timer=timer,
                                           precision=opts.ENGINE_PRECISION)
        for roi, roi_voxels, path in group:
            result = results[roi]
            if result["n_constant"]:
                tqdm.write(f"warning: {roi}: {result['n_constant']} constant voxel(s) on the training split; "
                           "their r is set to 0")
            result.update(
                method=method, subject=subj, model_subj=model_subj if method in TRANSFER_METHODS else None,
                hemisphere=hemi, roi=roi, protocol=opts.PROTOCOL, voxels=roi_voxels, seed=opts.SEED)
            result.update(settings)
            result.update(
                weights=opts.WEIGHTS if meta is None else meta.get("weights"),
                checkpoint=None if method == "untuned" else str(
                    utils.method_checkpoint_path(root, method, model_subj, hemi, roi, epochs)),
                mean_cv_r=float(np.mean(result["cv_r"])), mean_test_r=float(np.mean(result["test_r"])),
                config=utils.run_config(opts))
            with timer("write"):
                ru.save_result(result, path)
                record_absent(root, subj, hemi, roi, None)
            written[roi] = path
            tqdm.write(f"{roi}: best layer {result['best_layer']}, mean CV r {result['mean_cv_r']:.3f}, "
                       f"mean test r {result['mean_test_r']:.3f} ({len(roi_voxels)} voxels)")
    with timer("write"):
        write_summaries(root, subj)
    print(f"stage times: {timer}")
    return written


if __name__ == "__main__":
    main()
