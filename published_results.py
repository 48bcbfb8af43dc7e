"""The authors' published NSD encoding results (``published/``), read as this project's results,
and the reproduction scorecard that holds a user's NSD encoding results against them.

The published results follow the authors' 2025 protocol (per-method best layer, per-voxel
alpha, 5-fold CV r inside the 85% training split; ``published/README.md``), and so does every
comparison here: CV r against CV r, of this project's own-subject, per-method results
(``encoding_results.load_encoding``). Reading them needs nothing outside the repository.
"""

from pathlib import Path

import numpy as np
import pandas as pd

import encoding_results
import safe_io
import utils

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
SUMMARY_FILE = "authors_nsd_encoding_summary.csv"
LAYER_SCORES_FILE = "authors_nsd_layer_scores.csv"
VOXELS_FILE = "authors_nsd_encoding_voxels.npz"
# The authors' method names in the files -> this project's (utils.METHODS).
METHOD_NAMES = {"untuned": "untuned", "cl-tuned": "cl-tuned", "reg-tuned": "reg-tuned",
                "pooled-tuned-avg": "pooled-avg", "pooled-tuned-const": "pooled-const"}
AUTHORS_NAMES = {ours: theirs for theirs, ours in METHOD_NAMES.items()}
PROTOCOL = "2025 protocol: per-method best layer, per-voxel alpha, 5-fold CV r"
KEYS = ["subject", "hemisphere", "roi", "method"]


# --- Reading the published files -------------------------------------------------------------

def _file(folder, name):
    fix = "restore the published/ folder of the repository (git checkout -- published)"
    return safe_io.require_file(Path(folder) / name, fix)


def _canonical(table):
    """``table`` sorted by subject, ROI (canonical order), hemisphere and method (utils.METHODS order)."""
    order = table.assign(_roi=table["roi"].map(utils.ROIS.index), _method=table["method"].map(utils.METHODS.index))
    return order.sort_values(["subject", "_roi", "hemisphere", "_method"]).drop(columns=["_roi", "_method"]).reset_index(drop=True)


def load_summary(folder=PUBLISHED_DIR):
    """The published ROI summaries, one row per (subject, hemisphere, ROI, method), this project's method names.

    Returns
    -------
    DataFrame with subject, hemisphere, roi, method, n_voxels, best_layer, mean_cv_r, median_cv_r,
    pct_voxels_above_untuned (NaN for untuned).
    """
    table = pd.read_csv(_file(folder, SUMMARY_FILE))
    return _canonical(table.assign(method=table["method"].map(METHOD_NAMES)))


def load_layer_scores(folder=PUBLISHED_DIR):
    """The published layer scores: subject, hemisphere, roi, method, layer, score (the ROI's mean CV r at that layer)."""
    table = pd.read_csv(_file(folder, LAYER_SCORES_FILE))
    return _canonical(table.assign(method=table["method"].map(METHOD_NAMES)).rename(columns={"mean_cv_r": "score"}))


def voxel_counts(folder=PUBLISHED_DIR):
    """Voxel count of every (subject, hemisphere, ROI) of the published subjects, as
    ``results_utils.voxel_counts`` gives them from masks (0 where the published results have none).

    Returns a DataFrame with subject, hemisphere, roi, n_voxels.
    """
    summary = load_summary(folder)
    keys = ["subject", "hemisphere", "roi"]
    counts = summary.drop_duplicates(keys).set_index(keys)["n_voxels"]
    every = pd.MultiIndex.from_product([sorted(summary["subject"].unique()), utils.HEMISPHERES, utils.ROIS], names=keys)
    return counts.reindex(every, fill_value=0).reset_index()


def load_results(folder=PUBLISHED_DIR, subjects=None):
    """The published per-voxel results in the shape of ``encoding_results.load_encoding``.

    Parameters
    ----------
    subjects : the subjects to read (default all 8).

    Returns
    -------
    {subject: {(method, hemisphere, roi): result}}, a result holding method, hemisphere, roi,
    best_layer, cv_r and alphas (float32, in the order of the ROI's mask) and voxels, the
    positions 0..n-1 of those voxels in the ROI (``place_on_masks`` turns them into vertices).
    """
    summary = load_summary(folder)
    if subjects:
        summary = summary[summary["subject"].isin([int(s) for s in subjects])]
    out = {}
    with np.load(_file(folder, VOXELS_FILE)) as arrays:
        for row in summary.itertuples():
            stem = f"subj{row.subject}_{row.hemisphere}_{row.roi}_{AUTHORS_NAMES[row.method]}"
            out.setdefault(int(row.subject), {})[row.method, row.hemisphere, row.roi] = {
                "method": row.method, "hemisphere": row.hemisphere, "roi": row.roi, "best_layer": row.best_layer,
                "cv_r": arrays[f"{stem}_r"], "alphas": arrays[f"{stem}_alpha"], "voxels": np.arange(row.n_voxels)}
    return out


def place_on_masks(encoding, root):
    """``load_results``' results with voxels = the challenge-space vertices of ROOT's ROI masks.

    A count that differs from the mask's is a user error (masks other than the authors').
    """
    placed = {}
    for subj, results in encoding.items():
        placed[subj] = {}
        for key, r in results.items():
            vertices = utils.roi_voxel_indices(root, subj, r["hemisphere"], r["roi"])
            if len(vertices) != len(r["voxels"]):
                raise safe_io.UserError(
                    f"{utils.roi_mask_path(root, subj, r['hemisphere'], utils.ROI_CLASS[r['roi']])} gives "
                    f"{r['roi']} {len(vertices)} voxels, the published results {len(r['voxels'])}: these are not "
                    "the Algonauts 2023 masks the authors used; put the original roi_masks under --root")
            placed[subj][key] = {**r, "voxels": vertices}
    return placed


# --- The scorecard ------------------------------------------------------------------------------

def _pct_above(results, key, scores):
    """% of voxels whose CV r beats the untuned CV r of the same source; NaN for untuned or without it."""
    untuned = results.get(("untuned",) + key[1:])
    if key[0] == "untuned" or untuned is None or len(untuned["cv_r"]) != len(scores):
        return np.nan
    return encoding_results.pct_beats_untuned(scores, untuned["cv_r"])


def _voxel_corr(a, b):
    """Pearson r of two per-voxel score vectors; NaN when either is constant (or has one voxel)."""
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return np.nan
    return float(np.corrcoef(a, b)[0, 1])


def scorecard(yours, published, tolerance):
    """One row per (subject, hemisphere, ROI, method) present in both sets of results.

    Parameters
    ----------
    yours, published : {subject: {(method, hemisphere, roi): result with 'cv_r' and 'best_layer'}}.
    tolerance : rows whose mean CV r differs by more are flagged (``differs``).

    Returns
    -------
    DataFrame: keys, n_voxels, best layer and mean CV r of each, their difference (yours -
    published), per-voxel correlation and RMS difference of CV r, % of voxels above untuned of
    each, differs. A voxel count that differs anywhere is a user error (other masks).
    """
    rows, mismatched = [], []
    for subj in sorted(yours.keys() & published.keys()):
        for key in yours[subj].keys() & published[subj].keys():
            a, b = np.asarray(yours[subj][key]["cv_r"], float), np.asarray(published[subj][key]["cv_r"], float)
            if len(a) != len(b):
                mismatched.append(f"subj{subj} {key[1]} {key[2]} {key[0]}: {len(a)} voxels here, {len(b)} published")
                continue
            rows.append({"subject": subj, "hemisphere": key[1], "roi": key[2], "method": key[0], "n_voxels": len(a),
                         "best_layer_yours": yours[subj][key]["best_layer"],
                         "best_layer_published": published[subj][key]["best_layer"],
                         "mean_cv_r_yours": a.mean(), "mean_cv_r_published": b.mean(),
                         "difference": a.mean() - b.mean(), "voxel_corr": _voxel_corr(a, b),
                         "rms_difference": float(np.sqrt(np.mean((a - b) ** 2))),
                         "pct_above_untuned_yours": _pct_above(yours[subj], key, a),
                         "pct_above_untuned_published": _pct_above(published[subj], key, b)})
    if mismatched:
        raise safe_io.UserError(f"voxel counts differ from the published results in {len(mismatched)} of "
                                f"{len(mismatched) + len(rows)} results, e.g. {mismatched[0]}: wrong masks; refit "
                                "with the original Algonauts 2023 roi_masks")
    if not rows:
        raise safe_io.UserError("no (subject, hemisphere, ROI, method) of your encoding results is in the published "
                                "ones: fit some with fit_encoding_models.py (own subject, --protocol per-method)")
    card = _canonical(pd.DataFrame(rows))
    return card.assign(differs=card["difference"].abs() > tolerance)


def share_above_untuned(card, value, method="cl-tuned"):
    """% of the ROI-hemispheres (of every subject) with every method in ``card`` where ``method``'s ``value``
    beats untuned's; NaN without both."""
    wide = card.pivot_table(index=["subject", "hemisphere", "roi"], columns="method", values=value).dropna()
    if method not in wide or "untuned" not in wide or wide.empty:
        return np.nan
    return 100 * float((wide[method] > wide["untuned"]).mean())


def compared_group_means(card):
    """The authors' group means (``encoding_results.group_means``) of both sources over the scorecard's rows.

    Returns a DataFrame, one row per (group, method): n_subjects, n_rois, yours, published, difference.
    """
    rows = []
    _, yours = encoding_results.group_means(card, "mean_cv_r_yours")
    _, theirs = encoding_results.group_means(card, "mean_cv_r_published")
    methods = [m for m in utils.METHODS if m in theirs.columns]
    for group in theirs.index:
        for m in methods:
            rows.append({"group": group, "method": m, "n_subjects": theirs.loc[group, "n_subjects"],
                         "n_rois": theirs.loc[group, "n_rois"], "yours": yours.loc[group, m],
                         "published": theirs.loc[group, m], "difference": yours.loc[group, m] - theirs.loc[group, m]})
    return pd.DataFrame(rows)


def markdown_table(means, column):
    """A Markdown table of one column of ``compared_group_means``: rows ROI groups, columns methods."""
    methods = list(dict.fromkeys(means["method"]))
    lines = ["| ROI group | subjects | ROI-hemispheres (all subjects) | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for group, part in means.groupby("group", sort=False):
        values = part.set_index("method")[column]
        lines.append(f"| {group} | {part['n_subjects'].iloc[0]} | {part['n_rois'].iloc[0]} | "
                     + " | ".join(f"{values[m]:.4f}" for m in methods) + " |")
    return "\n".join(lines)


def verdict(card, means, tolerance):
    """The printed summary of a comparison: lines of text."""
    worst = card.loc[card["difference"].abs().idxmax()]
    n_differ = int(card["differs"].sum())
    lines = [f"Held against the authors' published NSD encoding results ({PROTOCOL}), CV r against CV r:",
             f"{len(card)} (subject, hemisphere, ROI, method) in both, subjects "
             f"{', '.join(str(s) for s in sorted(card['subject'].unique()))}; voxel counts equal in all.",
             f"mean CV r, yours - published: mean {card['difference'].mean():+.4f}, largest |difference| "
             f"{abs(worst['difference']):.4f} (subj{worst['subject']} {worst['hemisphere']} {worst['roi']} "
             f"{worst['method']}); {n_differ} differ by more than {tolerance:g}.",
             f"per voxel: correlation median {card['voxel_corr'].median():.3f} (lowest {card['voxel_corr'].min():.3f}), "
             f"RMS difference median {card['rms_difference'].median():.4f} (largest {card['rms_difference'].max():.4f}).",
             f"best layer the same in {int((card['best_layer_yours'] == card['best_layer_published']).sum())} "
             f"of {len(card)}."]
    for column in ("yours", "published"):
        lines += ["", f"Group means, {column} (mean CV r over the ROI-hemispheres with every method, per subject, "
                      "then over subjects):", markdown_table(means, column)]
    far = means.loc[means["difference"].abs().idxmax()]
    lines += [f"group means, yours - published: largest |difference| {abs(far['difference']):.4f} "
              f"({far['group']}, {far['method']})", ""]
    for method in utils.METHODS[1:]:
        mine, theirs = share_above_untuned(card, "mean_cv_r_yours", method), share_above_untuned(card, "mean_cv_r_published", method)
        if np.isfinite(mine):
            lines.append(f"{method} above untuned in {mine:.0f}% of ROI-hemispheres (yours); published {theirs:.0f}%.")
    lines.append(f"verdict: reproduced within {tolerance:g} (mean CV r) in every compared result" if not n_differ else
                 f"verdict: {n_differ} of {len(card)} results differ by more than {tolerance:g} in mean CV r "
                 "(column differs of the CSV)")
    return lines
