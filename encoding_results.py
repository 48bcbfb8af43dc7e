"""Encoding results: the one place that knows their format (where they are, how they are
written and read), and what is computed from them alone: the per-subject summary tables,
the tidy table of every result (``results_table``), the authors' group summaries and the
transfer (cross-subject) matrices.

A result is one ROI of one subject, hemisphere and method: its arrays (voxels, per-voxel
alphas, CV r, test r, ...) in a ``.npz``, every other field (settings, best layer, layer
scores, config) in a ``.json`` beside it, written last, so a result is complete exactly
when its ``.json`` exists. Neither file is a pickle. NOD results use the same format.
"""

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

import nod_utils
import safe_io
import utils

# The methods of the group summaries, each on its own subject with the per-method protocol.
SUMMARY_METHODS = ("untuned", "cl-tuned", "reg-tuned", "pooled-avg", "pooled-const")
SUMMARY_COMPARISONS = (("cl-tuned", "untuned"), ("cl-tuned", "reg-tuned"), ("pooled-avg", "cl-tuned"),
                       ("pooled-const", "cl-tuned"))
# What each score of the group summaries is. CV r is measured on the folds that chose the layer
# and the alphas, so it is biased upward (on pure-noise fMRI: about 0.07 where test r is 0).
SCORE_NOTES = {"test_r": "unbiased: held-out test split, used for no choice",
               "cv_r": "optimistic (the authors' number): the folds that chose the layer and alphas"}
# The methods whose model, tuned on one subject, can be applied to another (transfer).
TRANSFER_METHODS = ("cl-tuned", "reg-tuned")


# --- The format: where results are, writing and reading ----------------------------------

def method_tag(method, subj, model_subj, protocol):
    """Folder name of a method's NSD results: method [+ _from-SubjY] [+ _untuned-layer]."""
    tag = method
    if model_subj is not None and int(model_subj) != int(subj):
        tag += f"_from-{utils.subj_dir(model_subj)}"
    if protocol == "untuned-layer" and method != "untuned":
        tag += "_untuned-layer"
    return tag


def result_path(root, subj, tag, hemisphere, roi):
    """The .npz of one NSD ROI result; its .json (written last) marks it complete (save_result)."""
    return utils.encoding_dir(root, subj) / tag / f"{utils.hemi_code(hemisphere)}_{roi}.npz"


RESULT_FIX = "delete it and its .json, or refit that ROI with --overwrite"
# The per-voxel arrays of every result, besides its voxels (NSD) or vertices (NOD).
RESULT_ARRAYS = ("alphas", "alpha_index", "cv_r", "test_r")


def load_result(path, root=None, subj=None):
    """One ROI's result: the JSON fields plus the arrays of the .npz (voxels, alphas, cv_r, test_r, ...),
    checked by ``check_result`` (against the masks of subject ``subj`` under ``root`` when given)."""
    path = Path(path)
    try:
        out = json.loads(path.with_suffix(".json").read_text())
        with np.load(path) as f:
            out.update({k: f[k] for k in f.files})
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise safe_io.UserError(f"cannot read the result {path} ({type(e).__name__}): it is truncated or corrupt; "
                                f"{RESULT_FIX}") from None
    check_result(path, out, root, subj)
    return out


def check_result(path, result, root=None, subj=None):
    """Raise a UserError naming ``path`` unless ``result`` is a whole encoding result: per-voxel arrays of one
    length, finite; a best layer and layer scores of AlexNet's LAYERS, finite. With ``root``, its voxels must
    be those the masks under ``root`` give for its subject ``subj``, hemisphere and ROI (the file name's):
    a result copied from another ROI set would have its indices applied to the wrong vertices."""
    points = "vertices" if "vertices" in result else "voxels"
    for key in (points,) + RESULT_ARRAYS:
        array = result.get(key)
        if not isinstance(array, np.ndarray) or array.shape != (len(result.get(points, ())),):
            shape = array.shape if isinstance(array, np.ndarray) else "none"
            raise safe_io.UserError(f"the result {path} holds {key} of shape {shape}, not one value for each of "
                                    f"its {points}: {RESULT_FIX}")
        if array.dtype.kind not in "biuf" or not np.isfinite(array).all():
            raise safe_io.UserError(f"the result {path} holds NaN, Inf or non-numbers in {key}: {RESULT_FIX}")
    scores = result.get("layer_scores")
    layers = [result.get("best_layer")] + list(scores if isinstance(scores, dict) else [None])
    unknown = [layer for layer in layers if layer not in utils.LAYERS]
    if unknown:
        raise safe_io.UserError(f"the result {path} names the layer {unknown[0]!r}, not one of AlexNet's "
                                f"{', '.join(utils.LAYERS)}: {RESULT_FIX}")
    if not all(isinstance(s, (int, float)) and np.isfinite(s) for s in scores.values()):
        raise safe_io.UserError(f"the result {path} holds a layer score that is not a finite number: {RESULT_FIX}")
    if root is not None:
        hemi, roi = result.get("hemisphere"), result.get("roi")
        if hemi not in utils.HEMISPHERES or roi not in utils.ROI_CLASS or path.name != f"{hemi}_{roi}.npz":
            raise safe_io.UserError(f"the result {path} records hemisphere {hemi!r} and ROI {roi!r}, not those "
                                    f"of its file name: {RESULT_FIX}")
        expected = utils.roi_voxel_indices(root, subj, hemi, roi)
        if not np.array_equal(result["voxels"], expected):
            raise safe_io.UserError(
                f"the result {path} was fitted on other voxels ({len(result['voxels'])}) than the masks under "
                f"{root} give for {utils.subj_dir(subj)} {hemi} {roi} ({len(expected)}): the masks changed, or the "
                f"result was copied from another subject or ROI set; {RESULT_FIX}")


def save_result(result, path):
    """Write an encoding result (NSD or NOD): its numpy arrays to the .npz ``path``, every
    other field to the .json beside it, written last so that it marks the result complete.

    An existing .json is removed first: a run killed between the two writes leaves an
    incomplete result (fitted again by the next run), never an old .json beside a new
    .npz. Neither file is a pickle, so reading a result never runs code from the file.
    """
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    json_path = Path(path).with_suffix(".json")
    json_path.unlink(missing_ok=True)
    with safe_io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    safe_io.atomic_json_dump({k: v for k, v in result.items() if k not in arrays}, json_path)


def result_complete(path):
    """Whether the result whose .npz is ``path`` is complete: save_result writes its .json last."""
    return Path(path).with_suffix(".json").is_file()


def complete_results(folder, pattern, skip=(), root=None, subj=None):
    """Yield (.npz path, result) of every complete result in ``folder`` whose .npz matches the glob
    ``pattern`` (but the paths in ``skip``), in sorted path order; ``root`` and ``subj`` as for load_result."""
    for path in sorted(Path(folder).glob(pattern)):
        if result_complete(path) and path not in skip:
            yield path, load_result(path, root, subj)


def collect_results(root, subj, skip=()):
    """Every complete NSD ROI result of a subject (but the .npz paths in ``skip``), checked against the masks
    under ``root``: dict (tag, hemisphere, roi) -> result."""
    return {(path.parent.name, r["hemisphere"], r["roi"]): r
            for path, r in complete_results(utils.encoding_dir(root, subj), "*/*.npz", skip, root, subj)}


def load_encoding(root, subjects=None):
    """{subject: collect_results dict} of each subject's own-model, per-method results (no transfer,
    no untuned-layer protocol), for the subjects (default: every one under roi_masks) that have some."""
    out = {}
    for subj in subjects or utils.find_subjects(root):
        results = {k: r for k, r in collect_results(root, subj).items() if k[0] in utils.METHODS}
        if results:
            out[int(subj)] = results
    return out


def nod_results_dir(root):
    """Where the NOD results go: ROOT/encoding_results/nod."""
    return Path(root) / "encoding_results" / "nod"


def nod_result_path(root, subj, hemisphere, roi, method):
    """The .npz of one NOD subject, hemisphere, area and method; its .json (written last) marks it complete."""
    sub = nod_utils.sub_name(subj)
    return nod_results_dir(root) / sub / f"{sub}_{utils.hemi_code(hemisphere)}_{roi}_{method}.npz"


def collect_nod_results(root):
    """Every complete NOD result: dict (subject, hemisphere, area, method) -> result."""
    return {(r["subject"], r["hemisphere"], r["roi"], r["method"]): r
            for _, r in complete_results(nod_results_dir(root), "sub-*/sub-*_*.npz")}


def absent_path(root, subj):
    return utils.encoding_dir(root, subj) / "absent_rois.json"


def read_absent(root, subj):
    """The subject's absent_rois.json, {hemisphere: {roi: n_voxels}} ({} when there is none), checked."""
    path = absent_path(root, subj)
    if not path.is_file():
        return {}
    fix = "delete it; the next fit_encoding_models.py run of each hemisphere records the absent ROIs again"
    absent = safe_io.read_json(path, fix)
    if not all(h in utils.HEMISPHERES and isinstance(rois, dict) and set(rois) <= set(utils.ROIS)
               and all(isinstance(n, int) for n in rois.values()) for h, rois in absent.items()):
        raise safe_io.UserError(f"{path} is not a record of absent ROIs ({{hemisphere: {{ROI: voxel count}}}}): {fix}")
    return absent


def record_absent(root, subj, hemisphere, roi, n_voxels):
    """Add (or, with n_voxels None, remove) an ROI in the subject's absent_rois.json."""
    path = absent_path(root, subj)
    absent = read_absent(root, subj)
    if n_voxels is None and roi not in absent.get(utils.hemi_code(hemisphere), {}):
        return
    hemi = absent.setdefault(utils.hemi_code(hemisphere), {})
    if n_voxels is None:
        hemi.pop(roi, None)
    else:
        hemi[roi] = int(n_voxels)
    safe_io.atomic_json_dump(absent, path)


# --- Summaries --------------------------------------------------------------------------

def pct_beats_untuned(test_r, untuned_r):
    """% of voxels whose test r beats the untuned one: 100 mean(test_r > untuned_r); NaN without ``untuned_r``."""
    if untuned_r is None:
        return np.nan
    return 100 * float(np.mean(np.asarray(test_r) > np.asarray(untuned_r)))


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

    Each row's ``note`` says what its score is (SCORE_NOTES): test r is the unbiased number, CV r
    the authors', optimistic because the layer and alphas were chosen on its folds.

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
            row = {"subject": int(subj), "group": group, "score": score, "note": SCORE_NOTES[score],
                   "n_rois": len(pairs)}
            for m in SUMMARY_METHODS:
                row[f"mean_{m}"] = (float(np.mean([p[m][score].mean() for p in pairs]))
                                    if pairs and m in methods else np.nan)
            for a, b in SUMMARY_COMPARISONS:
                row[f"pct_{a}_gt_{b}"] = (100 * float(np.mean([np.mean(p[a][score] > p[b][score]) for p in pairs]))
                                          if pairs and a in methods and b in methods else np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def group_means(table, value, groups=utils.ROI_GROUPS):
    """The authors' group means of a per-ROI score, as in their summary tables.

    Per ROI group, only the (subject, hemisphere, ROI) that have a ``value`` for every method
    in ``table`` count; each subject's mean over those, unweighted, then the mean over subjects.

    Parameters
    ----------
    table : DataFrame with subject, hemisphere, roi, method and the column ``value``.

    Returns
    -------
    per_subject : DataFrame, one row per (subject, group): n_rois and one column per method.
    means : DataFrame indexed by group: n_subjects, n_rois (summed over subjects) and the mean over
        subjects of each method's column.
    """
    methods = [m for m in utils.METHODS if m in set(table["method"])]
    wide = table.pivot_table(index=["subject", "hemisphere", "roi"], columns="method", values=value)
    wide = wide.reindex(columns=methods).dropna().reset_index()
    parts = []
    for group, members in groups.items():
        part = wide[wide["roi"].isin(members)].groupby("subject")[methods]
        parts.append(part.mean().assign(group=group, n_rois=part.size()).reset_index())
    per_subject = pd.concat(parts, ignore_index=True)[["subject", "group", "n_rois"] + methods]
    means = per_subject.groupby("group", sort=False).agg(n_subjects=("subject", "size"), n_rois=("n_rois", "sum"),
                                                         **{m: (m, "mean") for m in methods})
    return per_subject, means


def read_group_summary(root, subj):
    """The subject's group_summary.csv (None when there is none), checked: a table of that subject."""
    path = utils.encoding_dir(root, subj) / "group_summary.csv"
    if not path.is_file():
        return None
    fix = f"delete it; python generate_results.py --type summaries --subjects {int(subj)} rebuilds it"
    table = safe_io.read_csv(path, fix, columns=["subject", "group", "score"])
    if not (table["subject"] == int(subj)).all():
        others = sorted(set(table["subject"].astype(str)) - {str(int(subj))})
        raise safe_io.UserError(f"{path} holds summaries of subject {', '.join(others)}, not of "
                                f"{utils.subj_dir(subj)}: {fix}")
    return table


def write_group_summaries(root, subj, results):
    """The subject's group_summary.csv, then encoding_results/group_summary.csv of every subject that has one."""
    safe_io.atomic_write_text(group_summary(results, subj).to_csv(index=False),
                            utils.encoding_dir(root, subj) / "group_summary.csv")
    tables = [read_group_summary(root, s) for s in utils.find_subjects(root)]
    every = pd.concat([t for t in tables if t is not None], ignore_index=True)
    safe_io.atomic_write_text(every.to_csv(index=False), Path(root) / "encoding_results" / "group_summary.csv")


def check_summary_inputs(root, subj, skip=()):
    """Read and check what write_summaries and record_absent will read, before a run writes anything: the
    subject's results (but the .npz paths in ``skip``, about to be refitted), its absent_rois.json and the
    other subjects' group_summary.csv."""
    collect_results(root, subj, skip)
    read_absent(root, subj)
    for other in utils.find_subjects(root):
        if other != int(subj):
            read_group_summary(root, other)


def summary_rows(results):
    """One row per result of ``results`` ((tag, hemisphere, roi) -> result), by hemisphere, ROI (canonical order)
    and tag: tag, method, model_subj, protocol, hemisphere, roi, n_voxels, best_layer, mean_cv_r, mean_test_r,
    gain_cv_r and gain_test_r (mean r - the untuned mean r on the same voxels), pct_beats_untuned (test r), and
    the score of each layer. Gains and % are NaN for untuned and where no untuned result has the same voxels."""
    rows = []
    for (tag, hemi, roi), r in sorted(results.items(), key=lambda kv: (kv[0][1], _roi_order(kv[0][2]), kv[0][0])):
        untuned = results.get(("untuned", hemi, roi))
        untuned_r = comparable_untuned_r(r, untuned)
        gain = lambda score: np.nan if untuned_r is None else float(np.mean(r[score]) - np.mean(untuned[score]))
        rows.append({"tag": tag, "method": r["method"], "model_subj": r["model_subj"], "protocol": r["protocol"],
                     "hemisphere": hemi, "roi": roi, "n_voxels": len(r["voxels"]), "best_layer": r["best_layer"],
                     "mean_cv_r": float(np.mean(r["cv_r"])), "mean_test_r": float(np.mean(r["test_r"])),
                     "gain_cv_r": gain("cv_r"), "gain_test_r": gain("test_r"),
                     "pct_beats_untuned": pct_beats_untuned(r["test_r"], untuned_r),
                     **{layer: r["layer_scores"][layer] for layer in utils.LAYERS}})
    return pd.DataFrame(rows)


# The columns of results_table, in order.
RESULTS_TABLE_COLUMNS = ["subject", "hemisphere", "roi", "method", "model_subj", "protocol", "tag", "best_layer",
                         "n_voxels", "mean_cv_r", "mean_test_r", "gain_cv_r", "gain_test_r", "pct_beats_untuned"]


def results_table(root, subjects=None):
    """Every NSD encoding result under ``root`` (own-subject, transfer, either protocol), one row each: the
    columns of RESULTS_TABLE_COLUMNS (``summary_rows``' without the layer scores, and the subject), by
    subject, hemisphere, ROI and tag. Empty (with those columns) when there is no result."""
    tables = [summary_rows(collect_results(root, subj)).assign(subject=int(subj))
              for subj in subjects or utils.find_subjects(root)]
    tables = [t for t in tables if not t.empty]
    if not tables:
        return pd.DataFrame(columns=RESULTS_TABLE_COLUMNS)
    return pd.concat(tables, ignore_index=True)[RESULTS_TABLE_COLUMNS]


def write_summaries(root, subj):
    """Regenerate the subject's summary tables from every result: methods.csv, <tag>/layer_scores.csv
    and group_summary.csv (and the all-subject encoding_results/group_summary.csv).

    Returns
    -------
    table : DataFrame, one row per (tag, hemisphere, ROI): the columns of methods.csv and one
        per layer (empty when the subject has no result).
    results : dict (tag, hemisphere, roi) -> result, from ``collect_results``.
    """
    out_dir = utils.encoding_dir(root, subj)
    results = collect_results(root, subj)
    table = summary_rows(results)
    if table.empty:
        return table, results
    write_group_summaries(root, subj, results)
    safe_io.atomic_write_text(table.drop(columns=utils.LAYERS).to_csv(index=False), out_dir / "methods.csv")
    for tag, sub in table.groupby("tag", sort=False):
        cols = ["hemisphere", "roi"] + utils.LAYERS + ["best_layer"]
        safe_io.atomic_write_text(sub[cols].to_csv(index=False), out_dir / tag / "layer_scores.csv")
    return table, results


def nod_summary_table(root):
    """One row per saved result: subject, hemisphere, area, method, best layer, mean CV r,
    mean test r and % of vertices whose test r beats untuned (NaN without an untuned result)."""
    results = collect_nod_results(root)
    rows = []
    for (subj, hemi, roi, method), r in sorted(results.items(), key=lambda kv: (
            kv[0][0], kv[0][1], nod_utils.NOD_ROIS.index(kv[0][2]), utils.METHODS.index(kv[0][3]))):
        base = results.get((subj, hemi, roi, "untuned"))
        improved = pct_beats_untuned(r["test_r"], None if base is None else base["test_r"])
        rows.append({"subject": subj, "hemisphere": hemi, "roi": roi, "method": method,
                     "nsd_roi": r["nsd_roi"], "model_subj": r["model_subj"], "n_voxels": len(r["vertices"]),
                     "zscore": r.get("zscore"), "hemisphere_convention": r.get("hemisphere_convention"),
                     "best_layer": r["best_layer"], "mean_cv_r": float(np.mean(r["cv_r"])),
                     "mean_test_r": float(np.mean(r["test_r"])), "pct_improved_over_untuned": improved})
    return pd.DataFrame(rows)


# --- Transfer matrices ---------------------------------------------------------------------

def transfer_table(root, method, hemispheres, rois, protocol="untuned-layer", min_voxels=utils.MIN_VOXELS):
    """One row per (hemisphere, ROI, model subject, target subject) of ``method`` under ``protocol``, over the
    model and target subjects that have at least one result.

    'status' is 'fitted' (a result exists), 'absent' (the ROI has fewer than ``min_voxels``
    voxels in the target or the model subject) or 'missing' (not fitted yet). 'mean_test_r'
    and 'frac_improved' (fraction of the target's voxels whose test r beats the target's
    untuned result; NaN without one on the same voxels) are set for fitted rows; 'sum_r',
    'n_improved' and 'n_compared' serve the voxel-pooled aggregation. With the untuned-layer
    protocol (the authors'), the transfer and the untuned control are both fitted at the
    untuned network's best layer with its alphas.
    """
    hemis = [utils.hemi_code(h) for h in hemispheres]
    subjects = utils.find_subjects(root)
    found = {}
    for hemi in hemis:
        for target in subjects:
            for model_subj in subjects:
                for roi in rois:
                    path = result_path(root, target, method_tag(method, target, model_subj, protocol), hemi, roi)
                    if result_complete(path):
                        found[hemi, roi, model_subj, target] = path
    model_subjects, targets = sorted({k[2] for k in found}), sorted({k[3] for k in found})
    counts = {(s, hemi, roi): utils.roi_voxel_count(root, s, hemi, roi)
              for s in set(model_subjects) | set(targets) for hemi in hemis for roi in rois}
    rows = []
    for hemi in hemis:
        for roi in rois:
            for model_subj in model_subjects:
                for target in targets:
                    row = {"hemisphere": hemi, "roi": roi, "model_subj": model_subj, "target_subj": target,
                           "status": "missing", "n_voxels": 0, "sum_r": 0.0, "n_compared": 0, "n_improved": 0,
                           "mean_test_r": np.nan, "frac_improved": np.nan}
                    if (hemi, roi, model_subj, target) in found:
                        row.update(status="fitted", **_transfer_values(root, found[hemi, roi, model_subj, target],
                                                                       target, hemi, roi))
                    elif min(counts[target, hemi, roi], counts[model_subj, hemi, roi]) < min_voxels:
                        row["status"] = "absent"
                    rows.append(row)
    return pd.DataFrame(rows, columns=["hemisphere", "roi", "model_subj", "target_subj", "status", "n_voxels",
                                       "sum_r", "n_compared", "n_improved", "mean_test_r", "frac_improved"])


def _transfer_values(root, path, target, hemisphere, roi):
    """The fitted columns of a transfer_table row: the result's voxels and test r, compared with the target's untuned r."""
    r = load_result(path, root, target)
    values = {"n_voxels": len(r["voxels"]), "sum_r": float(r["test_r"].sum()), "mean_test_r": float(r["test_r"].mean())}
    base = result_path(root, target, "untuned", hemisphere, roi)
    untuned = load_result(base, root, target) if result_complete(base) else None
    if untuned is not None and np.array_equal(untuned["voxels"], r["voxels"]):
        improved = r["test_r"] > untuned["test_r"]
        values.update(n_compared=len(improved), n_improved=int(improved.sum()), frac_improved=float(improved.mean()))
    return values


def transfer_matrices(table, rois, aggregation="authors"):
    """Model-subject x target-subject matrices of mean test r and fraction improved over the ROIs ``rois``.

    Each (hemisphere, ROI) pair of ``rois`` with at least one result is one per-ROI matrix.

    Parameters
    ----------
    table : DataFrame from ``transfer_table``.
    rois : the ROIs to aggregate (e.g. one of utils.ROI_GROUPS).
    aggregation : 'authors': the unweighted mean of the per-ROI matrices of the pairs present
        in every subject of the table (no 'absent' row), as the authors' cs_heatmap_avgs;
        'absent-zero': the same over every pair, an absent entry counting as 0;
        'voxels': the voxels of the fitted entries pooled (absent ones add nothing). With
        'authors' and 'absent-zero' a missing entry makes the matrix entry NaN.

    Returns
    -------
    mean_r, frac_improved : DataFrames indexed by model subject, columns target subject
        (None, None when no pair of ``rois`` is left).
    """
    part = table[table["roi"].isin(rois)]
    flags = part.assign(fitted=part["status"] == "fitted", present=part["status"] != "absent")
    flags = flags.groupby(["hemisphere", "roi"])
    keep = flags["fitted"].any()
    if aggregation == "authors":
        keep &= flags["present"].all()
    part = part[part.set_index(["hemisphere", "roi"]).index.isin(keep[keep].index)]
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


def write_transfer_matrices(root, method, hemispheres, rois, protocol="untuned-layer", min_voxels=utils.MIN_VOXELS,
                            aggregation="authors"):
    """Write ``method``'s per-ROI transfer table and, per ROI group, its two matrices as CSV files under
    ROOT/encoding_results: transfer_<method>[_untuned-layer]_<hemispheres>[_<group>[_<aggregation>]]...,
    <hemispheres> being lh, rh or lh-rh (both averaged together, as the authors do).

    Returns
    -------
    table : DataFrame from ``transfer_table``.
    matrices : dict group -> (mean_r, frac_improved, stem), stem the path the group's files start with.
    """
    if method not in TRANSFER_METHODS:
        raise safe_io.UserError(f"transfer matrices need a subject-specific method, not {method!r}: "
                                "use --method cl-tuned or reg-tuned")
    hemis = sorted({utils.hemi_code(h) for h in hemispheres})
    table = transfer_table(root, method, hemis, rois, protocol, min_voxels)
    tag = method_tag(method, 1, None, protocol)  # the name without a model subject
    if not (table["status"] == "fitted").any():
        raise safe_io.UserError(f"no {tag} {'/'.join(hemis)} results under {Path(root) / 'encoding_results'}: "
                                f"fit some first (fit_encoding_models.py --method {method} --protocol {protocol}, "
                                "with --model-subj for transfer), or pass the --protocol they were fitted with")
    base = Path(root) / "encoding_results" / f"transfer_{tag}_{'-'.join(hemis)}"
    safe_io.atomic_write_text(table.drop(columns=["sum_r"]).to_csv(index=False), f"{base}.csv")
    suffix = "" if aggregation == "authors" else f"_{aggregation}"
    matrices = {}
    for group, members in utils.ROI_GROUPS.items():
        mean_r, frac = transfer_matrices(table, members, aggregation)
        if mean_r is None:
            continue
        stem = f"{base}_{group}{suffix}"
        safe_io.atomic_write_text(mean_r.to_csv(), f"{stem}_mean_r.csv")
        safe_io.atomic_write_text(frac.to_csv(), f"{stem}_frac_improved.csv")
        matrices[group] = (mean_r, frac, stem)
    return table, matrices
