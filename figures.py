"""Every figure, drawn from saved results: the scripts' figures, the paper's group figures, landscapes and cortical maps.

``save_figure`` writes each one (PNG and PDF, atomically). Everything here reads what the scripts saved (encoding results, voxel counts, MI bounds,
classification probes and predictions), or the authors' published encoding results
(``published_results``), and draws; nothing is fitted. ``paper_figures`` builds every
figure that has its inputs and names, for each one that has not, the command that makes
them. ``generate_results.py --type paper-figures`` calls it. A figure with the name of one
of the paper's (the authors' ``paper_figs/``) shows the same quantity, rows and columns.
``write_index`` writes results/figures/index.html, every figure with its caption and command
(FIGURE_INDEX). A method has one colour in every figure (METHOD_COLOURS).

ROI groups are the authors' (utils.ROI_GROUPS): 'early' the prf-visualrois class (V1v..hV4),
'higher' the floc classes, 'anatomical' the streams. The paper's ROI-hemisphere tables have the pRF and
category ROIs (early + higher).

Cortical maps use nilearn's packaged fsaverage5 mesh (no download). fsaverage nests
fsaverage5: the first 10242 of fsaverage's 163842 vertices per hemisphere are fsaverage5's.
Challenge-space vertex i is fsaverage vertex ``np.flatnonzero(all-vertices mask)[i]``; on
fsaverage5 every fitted vertex is averaged into its nearest fsaverage5 vertex (pycortex's
table, fsaverage/README.md), on a full fsaverage mesh each is drawn where it is.
"""

import functools
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import encoding_results
import nod_utils
import published_results
import results_utils as ru
import safe_io
import utils

GROUP_NAMES = {"early": "early visual (V1v..hV4)", "higher": "higher (floc ROIs)", "anatomical": "anatomical (streams)"}
PAPER_ROIS = utils.ROI_GROUPS["early"] + utils.ROI_GROUPS["higher"]
# Where paper_figures reads from: ROOT's saved results, or the authors' published ones (published/).
SOURCES = ("results", "published")
SCORE_NAMES = {"test_r": "test r", "cv_r": "CV r"}
FSAVERAGE5_VERTICES = 10242
SURFACES = ("inflated", "pial")
VIEWS = ("lateral", "medial", "ventral")
POOLED = ("pooled-avg", "pooled-const")
HEMI_NAMES = {"lh": "left hemisphere", "rh": "right hemisphere"}
# One colour per method in every figure (Okabe-Ito, safe for colour-blind readers): untuned is black, so
# that where it wins shows on the grey cortex of the winner map; the landscapes' oracle is grey.
METHOD_COLOURS = {"untuned": "#000000", "cl-tuned": "#D55E00", "reg-tuned": "#0072B2", "pooled-avg": "#009E73",
                  "pooled-const": "#CC79A7", "oracle": "#999999"}
GROUP_COLOURS = {"early": "#1f77b4", "higher": "#ff7f0e", "anatomical": "#2ca02c"}  # the paper's: early blue, higher orange
OVERLAP_NOTE = ("where a vertex lies in several ROIs, the value of the first ROI in canonical order "
                "(prf-visualrois, floc-bodies, -faces, -places, -words, then streams) is drawn")


class Missing(Exception):
    """A figure's inputs are absent; the message names the command that makes them."""


def paper_dir(root, source="results"):
    """Where paper_figures writes: results/figures/paper (ROOT's results) or results/figures/published."""
    return utils.results_dir(root) / "figures" / ("paper" if source == "results" else "published")


# --- Saving, and the figures of the scripts -------------------------------------------

FAMILY_MARKERS = {"prf-visualrois": "o", "floc-bodies": "s", "floc-faces": "^", "floc-places": "D",
                  "floc-words": "v", "streams": "P"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, stem):
    """Save a matplotlib figure as ``stem``.png and ``stem``.pdf (atomically, 150 dpi) and close it.

    A ``stem`` ending in .png or .pdf loses that suffix. Returns the two paths.
    """
    plt = pyplot()
    stem = Path(stem)
    if stem.suffix in (".png", ".pdf"):
        stem = stem.with_suffix("")
    paths = []
    for ext in ("png", "pdf"):
        path = Path(f"{stem}.{ext}")
        with safe_io.atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def plot_roi_heatmaps(tables, references, title, label, stem, fmt="{:.2f}"):
    """ROI x subject heatmaps, one panel per hemisphere.

    The colour is the change from the untuned reference (red: better, blue: worse), the
    text the value itself, so both the level and the gain can be read.

    Parameters
    ----------
    tables : {hemisphere: DataFrame ROI x column}.
    references : {hemisphere: float or DataFrame of the same shape}, the untuned values.
    """
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    hemis = list(tables)
    diffs = {h: tables[h] - references[h] for h in hemis}
    span = max(float(np.nanmax(np.abs(d.to_numpy()))) for d in diffs.values()) or 1.0
    norm = TwoSlopeNorm(0.0, -span, span)
    height = max(len(t) for t in tables.values())
    width = max(7.0, 2.5 + 0.9 * sum(t.shape[1] for t in tables.values()))
    fig, axes = plt.subplots(1, len(hemis), figsize=(width, 2 + 0.3 * height), squeeze=False, layout="constrained")
    for ax, h in zip(axes[0], hemis):
        t = tables[h]
        im = ax.imshow(diffs[h].to_numpy(), cmap="RdBu_r", norm=norm, aspect="auto")
        d = diffs[h].to_numpy()
        for (i, j), v in np.ndenumerate(t.to_numpy()):
            if np.isfinite(v):
                # Light text on the saturated ends of the diverging map, dark text near white.
                dark = np.isfinite(d[i, j]) and abs(norm(d[i, j]) - 0.5) > 0.3
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="w" if dark else "k")
        # The summaries' columns 'subjX' (and 'pooled'), spelled as every figure spells a subject.
        ax.set_xticks(range(t.shape[1]), [utils.subj_dir(c[4:]) if c.startswith("subj") else c for c in t.columns],
                      rotation=45)
        ax.set_yticks(range(len(t)), t.index)
        ax.set_title(HEMI_NAMES[h])
    fig.colorbar(im, ax=list(axes[0]), label=f"{label} - untuned")
    fig.suptitle(title)
    return save_figure(fig, stem)


def results_figures(root, dataset, method, epochs):
    """The classification-accuracy and MI-bound heatmaps of one method, from the saved results.

    Returns the written paths; a quantity without results is skipped, both missing is an error.
    """
    folder = utils.results_dir(root) / "figures"
    paths, missing = [], []
    try:
        tables, untuned = ru.classification_tables(root, dataset, method, epochs)
        paths += plot_roi_heatmaps(tables, {h: untuned for h in tables},
                                   f"{dataset} classification accuracy, {method} (untuned: {untuned:.3f})",
                                   "accuracy", folder / f"classification_{dataset}_{method}_e{int(epochs)}")
    except safe_io.UserError as e:
        missing.append(str(e))
    try:
        mi = ru.mi_tables(root, method, epochs)
        paths += plot_roi_heatmaps({h: t for h, (t, _) in mi.items()}, {h: u for h, (_, u) in mi.items()},
                                   f"InfoNCE MI lower bound (bits, post-hoc temperature), {method}",
                                   "bits", folder / f"mi_bound_{method}_e{int(epochs)}")
    except safe_io.UserError as e:
        missing.append(str(e))
    if not paths:
        raise safe_io.UserError(" and ".join(missing))
    return paths


def plot_landscape(land, stem, title=None):
    """Scatter of a ``landscape``: colour = accuracy, marker = ROI family, untuned star, oracle cross."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    fig, ax = plt.subplots(figsize=(6.5, 5))
    acc = np.array([m["accuracy"] for m in land["metas"]])
    models = [i for i, m in enumerate(land["metas"]) if m["method"] not in ("untuned", "oracle")]
    norm = plt.Normalize(acc[models].min() if models else acc.min(), acc[models].max() if models else acc.max())
    xy = land["coords"]
    for family, marker in FAMILY_MARKERS.items():
        idx = [i for i in models if utils.ROI_CLASS.get(land["metas"][i].get("roi")) == family]
        if idx:
            ax.scatter(xy[idx, 0], xy[idx, 1], c=acc[idx], cmap="viridis", norm=norm, marker=marker, s=40,
                       edgecolors="k", linewidths=0.3)
    legend = [Line2D([], [], marker=m, ls="", color="grey", label=f) for f, m in FAMILY_MARKERS.items()
              if any(utils.ROI_CLASS.get(land["metas"][i].get("roi")) == f for i in models)]
    for special, marker, size in (("untuned", "*", 300), ("oracle", "X", 150)):
        idx = [i for i, m in enumerate(land["metas"]) if m["method"] == special]
        if idx:
            ax.scatter(xy[idx, 0], xy[idx, 1], marker=marker, s=size, c=METHOD_COLOURS[special], edgecolors="w",
                       linewidths=0.6, zorder=3)
            legend.append(Line2D([], [], marker=marker, ls="", color=METHOD_COLOURS[special],
                                 markersize=10, label=f"{special} ({acc[idx[0]]:.3f})"))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="test accuracy")
    vals = land["eigenvalues"]
    kind = "InPCA" if land["method"] == "inpca" else "MDS"
    ax.set_xlabel(f"{kind} 1 (eigenvalue {vals[0]:.3g})")
    ax.set_ylabel(f"{kind} 2 (eigenvalue {vals[1]:.3g})")
    ax.legend(handles=legend, fontsize=7, loc="best")
    ax.set_title(title or "model landscape")
    return save_figure(fig, stem)


def plot_salience(image, cams, titles, stem, suptitle=None):
    """A panel: rows = models, columns = (image, mirrored image), each with its Grad-CAM overlaid.

    Parameters
    ----------
    image : uint8 (S, S, 3). cams : array (n_models, 2, S, S). titles : list of str, one per model.
    """
    plt = pyplot()
    fig, axes = plt.subplots(len(cams), 2, figsize=(5, 2.5 * len(cams)), squeeze=False)
    for r, (pair, title) in enumerate(zip(cams, titles)):
        for c, (img, cam) in enumerate(zip((image, image[:, ::-1]), pair)):
            ax = axes[r, c]
            ax.imshow(img)
            ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title(f"{title}{' (mirrored)' if c else ''}", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return save_figure(fig, stem)


def plot_layer_scores(table, path, title=""):
    """ROI x layer heatmap of the CV scores with the best layer of each ROI boxed; returns the figure."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    scores = table[utils.LAYERS].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(utils.LAYERS), 1.6 + 0.3 * len(table)), layout="constrained")
    im = ax.imshow(scores, aspect="auto", cmap="viridis")
    for i, best in enumerate(table["best_layer"]):
        ax.add_patch(Rectangle((utils.LAYERS.index(best) - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(utils.LAYERS)), utils.LAYERS, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), table["roi"])
    fig.colorbar(im, ax=ax, label="ROI mean 5-fold CV r")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    return fig


def tag_name(tag):
    """A method tag in words: 'cl-tuned_from-Subj2' -> 'cl-tuned (Subj2's model)', '_untuned-layer' -> ', untuned layer'."""
    method, *rest = tag.split("_")
    words = [f"{part[5:]}'s model" if part.startswith("from-") else part.replace("-", " ") for part in rest]
    return method + (f" ({', '.join(words)})" if words else "")


def _tag_order(tag):
    """Untuned first, then the methods in utils.METHODS order, each before its transfers and protocols."""
    method = tag.split("_")[0]
    return (utils.METHODS.index(method) if method in utils.METHODS else len(utils.METHODS), tag != method, tag)


def _roi_list(rois, most=6):
    """'V1v, hV4 and EBA', or '12 ROIs' beyond ``most``."""
    rois = list(rois)
    if len(rois) > most:
        return f"{len(rois)} ROIs"
    return rois[0] if len(rois) == 1 else f"{', '.join(rois[:-1])} and {rois[-1]}"


HATCHES = (None, "//", "\\\\", "xx", "..", "++")  # a method's own bar, then its transfers and other protocols


def plot_methods(table, path, results=None, title=""):
    """Per ROI of one hemisphere's ``table`` (methods.csv rows), one bar per method tag (untuned first, one
    colour per method; its transfers and other protocols hatched, one hatch each): mean test r, with the
    interquartile range of the per-voxel test r as error bars when ``results`` ((tag, hemisphere, roi) ->
    result) is given. Returns the figure."""
    plt = pyplot()
    tags = sorted(dict.fromkeys(table["tag"]), key=_tag_order)
    rois = sorted(set(table["roi"]), key=utils.ROIS.index)
    hemi = table["hemisphere"].iloc[0]
    width = 0.8 / len(tags)
    fig, ax = plt.subplots(figsize=(max(7.5, 2 + 0.6 * len(rois) * max(1, len(tags) / 2)), 3.8), layout="constrained")
    for k, tag in enumerate(tags):
        sub = table[table["tag"] == tag].set_index("roi").reindex(rois)
        x = np.arange(len(rois)) + (k - (len(tags) - 1) / 2) * width
        spread = None
        if results is not None:
            quartiles = np.array([np.percentile(results[tag, hemi, roi]["test_r"], [25, 75]) if (tag, hemi, roi) in results
                                  else (np.nan, np.nan) for roi in rois])
            spread = np.nan_to_num(np.abs(quartiles.T - sub["mean_test_r"].to_numpy()))
        method = tag.split("_")[0]
        variant = [t for t in tags if t.split("_")[0] == method].index(tag)  # the method's own tag sorts first
        ax.bar(x, sub["mean_test_r"], width, yerr=spread, capsize=1.5, error_kw={"lw": 0.6},
               color=METHOD_COLOURS.get(method, "0.5"), hatch=HATCHES[variant % len(HATCHES)], edgecolor="w",
               lw=0.3, label=tag_name(tag))
    ax.set_xticks(range(len(rois)), rois, rotation=45, ha="right")
    ax.set_ylabel("mean test r")
    ax.axhline(0, color="k", lw=0.5)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="outside right upper")
    ax.set_title(title + ("\nbars: mean over the ROI's voxels; error bars: their 25th-75th percentile" if results else ""),
                 fontsize=9)
    save_figure(fig, path)
    return fig


def plot_scatter(x, y, label, path, title=""):
    """Per-voxel test r of a method (y) against untuned (x), with the identity line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.4), layout="constrained")
    ax.scatter(x, y, s=3, alpha=0.5, color=METHOD_COLOURS.get(label.split("_")[0], "0.5"))
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("untuned test r")
    ax.set_ylabel(f"{tag_name(label)} test r")
    ax.set_title(f"{title}{chr(10) if title else ''}{100 * np.mean(y > x):.1f}% of {len(x)} voxels above the line",
                 fontsize=8)
    save_figure(fig, path)
    return fig


def plot_transfer(mean_r, frac, title, path):
    """Two model-subject x target-subject heatmaps, each cell labelled with its value ('n/a': not fitted)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, m, label in zip(axes, (mean_r, frac), ("mean test r", "fraction of voxels improved over untuned")):
        values = m.to_numpy(dtype=float)
        im = ax.imshow(values, cmap="viridis")
        for (i, j), v in np.ndenumerate(values):
            # Dark text on the bright end of viridis, light text on the dark end.
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=7,
                    color="k" if np.isnan(v) or im.norm(v) > 0.6 else "w")
        ax.set_xticks(range(m.shape[1]), [utils.subj_dir(s) for s in m.columns], rotation=45)
        ax.set_yticks(range(m.shape[0]), [utils.subj_dir(s) for s in m.index])
        ax.set_xlabel("target subject")
        ax.set_ylabel("model subject")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def summary_figures(root, subj, table, results):
    """The subject's figures of ``encoding_results.write_summaries``: per method tag and hemisphere the
    ROI x layer scores, per hemisphere the methods per ROI and, per tuned tag, its per-voxel test r
    against untuned. Each title names the subject, hemisphere, method and ROIs."""
    out_dir = utils.encoding_dir(root, subj)
    who = lambda hemi: f"{utils.subj_dir(subj)}, {HEMI_NAMES[hemi]}"
    for tag, sub in table.groupby("tag", sort=False):
        for hemi, part in sub.groupby("hemisphere"):
            plot_layer_scores(part, out_dir / tag / f"layer_scores_{hemi}.png",
                              f"{who(hemi)}, {tag_name(tag)}: encoding score per ROI and layer\n"
                              "ROI mean 5-fold CV r, best layer boxed")
    for hemi, part in table.groupby("hemisphere"):
        plot_methods(part, out_dir / f"methods_{hemi}.png", results,
                     f"{who(hemi)}: mean test r per ROI and method ({_roi_list(part['roi'].unique())})")
        for tag in dict.fromkeys(part["tag"]):
            rois = [roi for roi in part["roi"].unique()
                    if tag != "untuned" and (tag, hemi, roi) in results and ("untuned", hemi, roi) in results
                    and np.array_equal(results["untuned", hemi, roi]["voxels"], results[tag, hemi, roi]["voxels"])]
            if rois:
                plot_scatter(np.concatenate([results["untuned", hemi, roi]["test_r"] for roi in rois]),
                             np.concatenate([results[tag, hemi, roi]["test_r"] for roi in rois]), tag,
                             out_dir / f"scatter_{tag}_vs_untuned_{hemi}.png",
                             f"{who(hemi)}, {_roi_list(rois)}:\n{tag_name(tag)} vs untuned, per-voxel test r")


def plot_nod_summary(table, stem):
    """NOD: mean test r per area and method across subjects (bars, SEM), one panel per hemisphere.

    ``table`` is encoding_results.nod_summary_table's; returns the PNG and PDF paths.
    """
    plt = pyplot()
    hemis = sorted(table["hemisphere"].unique())
    methods = [m for m in utils.METHODS if m in set(table["method"])]
    rois = [r for r in nod_utils.NOD_ROIS if r in set(table["roi"])]
    fig, axes = plt.subplots(1, len(hemis), figsize=(4.5 * len(hemis), 3.5), squeeze=False, sharey=True)
    width = 0.8 / len(methods)
    for ax, hemi in zip(axes[0], hemis):
        for k, method in enumerate(methods):
            sub = table[(table["hemisphere"] == hemi) & (table["method"] == method)]
            stats = sub.groupby("roi")["mean_test_r"].agg(["mean", "sem", "count"]).reindex(rois)
            x = np.arange(len(rois)) + (k - (len(methods) - 1) / 2) * width
            ax.bar(x, stats["mean"], width, yerr=stats["sem"].fillna(0), label=method, capsize=2,
                   color=METHOD_COLOURS[method])
            for i, roi in enumerate(rois):
                ys = sub[sub["roi"] == roi]["mean_test_r"].to_numpy()
                ax.plot(np.full(len(ys), x[i]), ys, "k.", ms=3)
        ax.set_xticks(np.arange(len(rois)), rois)
        ax.set_title(f"NOD {hemi}, {table['subject'].nunique()} subject(s)\n"
                     f"z-score per {table['zscore'].iloc[0]}, {table['hemisphere_convention'].iloc[0]} hemispheres",
                     fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    axes[0, 0].set_ylabel("mean test r")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, stem)


def salience_figure(root, dataset, method, subj, roi, image_index, epochs, maps):
    """Draw ``results_utils.salience_maps``: rows = models, columns = the image and its mirror.

    Writes results/figures/salience_<dataset>_[SubjX_]<roi>_<method>_e<E>_img<i>.png/.pdf; returns the paths.
    """
    who = "" if method.startswith("pooled") else f"{utils.subj_dir(subj)}_"
    stem = utils.results_dir(root) / "figures" / f"salience_{dataset}_{who}{roi}_{method}_e{int(epochs)}_img{image_index}"
    return plot_salience(maps.image, maps.cams, maps.titles, stem,
                         f"Grad-CAM at features.12 for the true class: {maps.class_name}")


# --- Tables from the saved (or the published) results -------------------------------------

def encoding_table(encoding, score="test_r"):
    """One row per (subject, hemisphere, ROI, method) of ``encoding_results.load_encoding``'s (or
    ``published_results.load_results``') results.

    mean_r is the mean of ``score`` ('test_r', or 'cv_r', the CV r at the best layer) over the
    ROI's voxels; gain the mean over them of the method's minus untuned's, pct_improved the % of
    them where the method's beats untuned's, both NaN for untuned and without an untuned result
    on the same voxels.

    Returns
    -------
    DataFrame with subject, hemisphere, roi, group, method, n_voxels, best_layer, mean_r, gain, pct_improved.
    """
    rows = []
    for subj, results in encoding.items():
        for (method, hemi, roi), r in results.items():
            u = results.get(("untuned", hemi, roi))
            same = method != "untuned" and u is not None and np.array_equal(u["voxels"], r["voxels"])
            rows.append({"subject": subj, "hemisphere": hemi, "roi": roi, "group": utils.roi_group(roi),
                         "method": method, "n_voxels": len(r["voxels"]), "best_layer": r["best_layer"],
                         "mean_r": float(np.mean(r[score])),
                         "gain": float(np.mean(r[score] - u[score])) if same else np.nan,
                         "pct_improved": encoding_results.pct_beats_untuned(r[score], u[score]) if same else np.nan})
    columns = ["subject", "hemisphere", "roi", "group", "method", "n_voxels", "best_layer", "mean_r", "gain", "pct_improved"]
    return pd.DataFrame(rows, columns=columns).astype({c: float for c in columns[-3:]})


def layer_table(encoding):
    """The CV layer scores of ``encoding_results.load_encoding``'s results, one row per layer:
    subject, hemisphere, roi, method, layer, score (as ``published_results.load_layer_scores``)."""
    rows = [{"subject": s, "hemisphere": h, "roi": roi, "method": m, "layer": layer, "score": float(r["layer_scores"][layer])}
            for s, results in encoding.items() for (m, h, roi), r in results.items() for layer in utils.LAYERS]
    return pd.DataFrame(rows, columns=["subject", "hemisphere", "roi", "method", "layer", "score"])


def group_gains(table, method, rois=utils.ROIS):
    """Per hemisphere and ROI: mean, SEM (ddof 1; NaN for one subject) and n of ``method``'s gain over subjects.

    Returns
    -------
    DataFrame with hemisphere, roi, mean, sem, n (ROIs in canonical order, those with n >= 1).
    """
    part = table[(table["method"] == method) & table["roi"].isin(rois) & np.isfinite(table["gain"])]
    stats = part.groupby(["hemisphere", "roi"])["gain"].agg(mean="mean", sem="sem", n="count").reset_index()
    stats["order"] = stats["roi"].map(utils.ROIS.index)
    return stats.sort_values(["hemisphere", "order"]).drop(columns="order").reset_index(drop=True)


def paired_values(table, method_x, method_y, column="gain"):
    """Per (subject, hemisphere, ROI) with both methods' ``column``: columns x, y, group, roi, subject, hemisphere."""
    keys = ["subject", "hemisphere", "roi"]
    x = table[table["method"] == method_x].set_index(keys)[column]
    y = table[table["method"] == method_y].set_index(keys)[column]
    both = pd.concat({"x": x, "y": y}, axis=1, join="inner").dropna().reset_index()
    return both.assign(group=both["roi"].map(utils.roi_group))


def load_voxel_counts(root):
    path = utils.results_dir(root) / "voxel_counts.csv"
    if not path.is_file():
        raise Missing(f"no {path}: make it with python generate_results.py --type voxel-counts")
    return pd.read_csv(path)


def row_label(hemisphere, roi):
    """The paper's row name of a (hemisphere, ROI): 'LH V1v'."""
    return f"{hemisphere.upper()} {roi}"


def hemisphere_rows(tables):
    """{hemisphere: DataFrame ROI x column} as one DataFrame with the paper's rows: each of the paper's
    ROIs present in either hemisphere, in canonical order, left then right ('LH V1v', 'RH V1v', ...);
    NaN where absent."""
    rois = [r for r in PAPER_ROIS if any(r in t.index for t in tables.values())]
    rows = {row_label(h, roi): (tables[h].loc[roi] if h in tables and roi in tables[h].index else pd.Series(dtype=float))
            for roi in rois for h in utils.HEMISPHERES}
    return pd.DataFrame(rows).T.reindex(list(rows)).astype(float)


def _subject_number_columns(matrix):
    """Columns 'subjX' renamed 'X', in subject order."""
    subjects = sorted(matrix.columns, key=lambda c: int(c[4:]))
    return matrix[subjects].rename(columns=lambda c: c[4:])


def transfer_both(root, protocol, min_voxels=utils.MIN_VOXELS):
    """``encoding_results.transfer_table`` of cl-tuned in both hemispheres (the paper's ROIs) under ``protocol``:
    'untuned-layer' for the cross-subject matrices (the authors'), 'per-method' for the scatter against
    the pooled models (whose results are per-method)."""
    table = encoding_results.transfer_table(root, "cl-tuned", utils.HEMISPHERES, PAPER_ROIS, protocol, min_voxels)
    if not (table["status"] == "fitted").any():
        raise Missing(f"no cl-tuned results of the {protocol} protocol of any subject: make them with python "
                      f"fit_encoding_models.py --method cl-tuned --protocol {protocol} --subj X, and --model-subj Y "
                      "for the cross-subject ones, then untuned for the same subjects")
    return table


def cs_matrix(transfer, rois):
    """Model subject x evaluation subject: over the (hemisphere, ROI) of ``rois`` present in every subject,
    the unweighted mean (``encoding_results.transfer_matrices``, the authors' aggregation) of the fraction
    of the evaluation subject's voxels whose test r with the model subject's CL model beats its untuned
    test r. ``transfer`` is ``transfer_both`` of the untuned-layer protocol for the authors' matrices.

    Returns None when no ROI of ``rois`` has a result."""
    keyed = transfer.assign(roi=transfer["hemisphere"] + " " + transfer["roi"])
    return encoding_results.transfer_matrices(keyed, [f"{h} {roi}" for h in utils.HEMISPHERES for roi in rois])[1]


def cs_vs_pooled(transfer, table, pooled):
    """Per (evaluation subject, hemisphere, ROI): x = % of its voxels above untuned (test r) with the other
    subjects' CL models, averaged over those models; y = the same % with the pooled model.

    Returns a DataFrame with subject, hemisphere, roi, x, y, group (both present only)."""
    cross = transfer[(transfer["status"] == "fitted") & (transfer["model_subj"] != transfer["target_subj"])]
    x = 100 * cross.groupby(["target_subj", "hemisphere", "roi"])["frac_improved"].mean()
    x.index.names = ["subject", "hemisphere", "roi"]
    y = table[table["method"] == pooled].set_index(["subject", "hemisphere", "roi"])["pct_improved"]
    both = pd.concat({"x": x, "y": y}, axis=1, join="inner").dropna().reset_index()
    return both.assign(group=both["roi"].map(utils.roi_group))


def _mi(root, method, epochs):
    try:
        return ru.mi_tables(root, method, epochs)
    except safe_io.UserError:
        kind = f"lower-bound-mi-{method}" if method in POOLED else "lower-bound-mi --subjects 1 2 3 4 5 6 7 8"
        raise Missing(f"no {method} MI bounds (e{int(epochs)}): make them with python generate_results.py "
                      f"--type {kind}") from None


def mi_pairs(root, pooled, epochs):
    """Per (subject, hemisphere, ROI): the MI bound (bits, post-hoc temperature) of the subject's CL model (x) and of the pooled model (y)."""
    specific, shared = _mi(root, "cl-tuned", epochs), _mi(root, pooled, epochs)
    rows = []
    for h in sorted(specific.keys() & shared.keys()):
        x, y = specific[h][0], shared[h][0]
        for roi in x.index.intersection(y.index):
            for col in x.columns.intersection(y.columns):
                if np.isfinite(x.loc[roi, col]) and np.isfinite(y.loc[roi, col]):
                    rows.append({"subject": int(col[4:]), "hemisphere": h, "roi": roi, "group": utils.roi_group(roi),
                                 "x": float(x.loc[roi, col]), "y": float(y.loc[roi, col])})
    if not rows:
        raise Missing(f"no (subject, ROI) has both a cl-tuned and a {pooled} MI bound: run python generate_results.py "
                      f"--type lower-bound-mi and --type lower-bound-mi-{pooled} on the same ROIs")
    return pd.DataFrame(rows)


def mi_by_size(root, pairs):
    """Per (hemisphere, ROI) of ``mi_pairs``: the mean over its subjects of the voxel count, of the
    subject-specific bound and of the pooled bound (columns hemisphere, roi, group, n_voxels, specific, pooled)."""
    sizes = [utils.roi_voxel_count(root, s, h, roi) for s, h, roi in zip(pairs["subject"], pairs["hemisphere"], pairs["roi"])]
    return (pairs.assign(n_voxels=sizes).groupby(["hemisphere", "roi", "group"])
            .agg(n_voxels=("n_voxels", "mean"), specific=("x", "mean"), pooled=("y", "mean")).reset_index())


def mi_matrix(root, epochs):
    """ROI-hemisphere x subject ('1'..'8', then 'Avg', the mean over the subjects with a value) of the
    CL models' MI bound (bits, post-hoc temperature)."""
    matrix = _subject_number_columns(hemisphere_rows({h: t.tuned for h, t in _mi(root, "cl-tuned", epochs).items()}))
    return matrix.assign(Avg=matrix.mean(axis=1))


def classification_matrix(root, dataset, epochs):
    """The paper's probe table: rows 'Untuned' then ROI-hemispheres; columns the subject-specific CL
    models '1'..'8', 'Avg' (their mean), 'Pooled Avg', 'Pooled Const' (empty where not probed) and
    'Untuned' (the untuned network's accuracy, in the 'Untuned' row only)."""
    try:
        specific = ru.classification_tables(root, dataset, "cl-tuned", epochs)
    except safe_io.UserError:
        raise Missing(f"no cl-tuned {dataset} probes (e{int(epochs)}): make them with python generate_results.py "
                      f"--type classification-task --dataset {dataset} --subjects 1 2 3 4 5 6 7 8") from None
    matrix = _subject_number_columns(hemisphere_rows(specific.tables))
    matrix = matrix.assign(Avg=matrix.mean(axis=1))
    for pooled in POOLED:
        try:
            column = hemisphere_rows(ru.classification_tables(root, dataset, pooled, epochs).tables)["pooled"]
        except safe_io.UserError:
            column = pd.Series(dtype=float)
        matrix[pooled.replace("-", " ").title()] = column.reindex(matrix.index)
    matrix["Untuned"] = np.nan
    untuned = pd.DataFrame({"Untuned": [specific.untuned]}, index=["Untuned"]).reindex(columns=matrix.columns)
    return pd.concat([untuned, matrix])


# --- Group figures ---------------------------------------------------------------------

def _subject_columns(subjects):
    return [utils.subj_dir(s) for s in subjects]


def _cell_text_colour(rgba):
    """Black text on light cells, white on dark ones (by the cell colour's luminance)."""
    r, g, b = rgba[:3]
    return "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"


def plot_value_matrix(matrix, title, label, stem, cmap="viridis", xlabel="", ylabel="ROI", fmt="{:.3f}"):
    """An annotated heatmap of a table (rows x columns), empty cells white; one colour scale for all cells.
    Returns the written paths."""
    plt = pyplot()
    values = matrix.to_numpy(dtype=float)
    colours = plt.get_cmap(cmap).with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(2.2 + 0.62 * matrix.shape[1], max(3.5, 1.4 + 0.2 * matrix.shape[0])), layout="constrained")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=colours, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color=_cell_text_colour(colours(im.norm(v))))
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=90)
    ax.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=label, shrink=0.5, aspect=30)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, stem)


def layer_matrix(layers, subj):
    """One subject's untuned encoding scores: the paper's ROI-hemisphere rows ('lh_V1v', 'rh_V1v', ...)
    x the 8 layers.

    Parameters
    ----------
    layers : DataFrame subject, hemisphere, roi, method, layer, score (``layer_table``).

    Returns
    -------
    DataFrame of scores; Missing when the subject has no untuned layer scores.
    """
    part = layers[(layers["method"] == "untuned") & (layers["subject"] == subj) & layers["roi"].isin(PAPER_ROIS)]
    if part.empty:
        raise Missing(f"no untuned layer scores of {utils.subj_dir(subj)}: make them with python fit_encoding_models.py "
                      f"--method untuned --subj {subj} --hemisphere H")
    wide = part.pivot_table(index=["roi", "hemisphere"], columns="layer", values="score").reindex(columns=utils.LAYERS)
    order = [(roi, h) for roi in utils.ROIS for h in utils.HEMISPHERES if (roi, h) in wide.index]
    return wide.reindex(order).set_axis([f"{h}_{roi}" for roi, h in order])


def plot_layer_matrix(matrix, title, stem):
    """The paper's layer table (``layer_matrix``), the colour scaled within each row, the best layer of
    each row boxed in red. Returns the written paths."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    values = matrix.to_numpy(dtype=float)
    low, high = np.nanmin(values, axis=1, keepdims=True), np.nanmax(values, axis=1, keepdims=True)
    scaled = (values - low) / np.where(high > low, high - low, 1.0)
    fig, ax = plt.subplots(figsize=(7, max(3.5, 1.4 + 0.2 * len(matrix))), layout="constrained")
    ax.imshow(scaled, cmap="Blues", vmin=-0.1, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6, color="w" if scaled[i, j] > 0.55 else "k")
    for i, j in enumerate(np.nanargmax(values, axis=1)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xticks(range(len(utils.LAYERS)), utils.LAYERS, rotation=90)
    ax.set_yticks(range(len(matrix)), matrix.index, fontsize=7)
    ax.set_xlabel("AlexNet layer")
    ax.set_ylabel("ROI")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, stem)


def plot_best_layers(table, stem):
    """ROI x subject matrix of the untuned network's best layer, one panel per hemisphere.

    Returns (paths, {hemisphere: DataFrame ROI x subject of layer names}).
    """
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    untuned = table[table["method"] == "untuned"]
    if untuned.empty:
        raise Missing("no untuned encoding results: make them with python fit_encoding_models.py --method untuned "
                      "--subj S --hemisphere H for each subject and hemisphere")
    subjects = sorted(untuned["subject"].unique())
    mats = {h: part.pivot(index="roi", columns="subject", values="best_layer")
            .reindex(index=[r for r in utils.ROIS if r in set(part["roi"])], columns=subjects)
            for h, part in untuned.groupby("hemisphere")}
    cmap = ListedColormap(plt.cm.tab10.colors[:len(utils.LAYERS)])
    fig, axes = plt.subplots(1, len(mats), figsize=(2.5 + 2.6 * len(mats) + 0.35 * len(subjects) * len(mats),
                                                    1.5 + 0.28 * max(len(m) for m in mats.values())),
                             squeeze=False, layout="constrained")
    for ax, (h, m) in zip(axes[0], mats.items()):
        codes = m.apply(lambda col: col.map(lambda v: utils.LAYERS.index(v) if isinstance(v, str) else np.nan))
        im = ax.imshow(codes.to_numpy(dtype=float), cmap=cmap, vmin=-0.5, vmax=len(utils.LAYERS) - 0.5, aspect="auto")
        ax.set_xticks(range(len(subjects)), _subject_columns(subjects), rotation=45)
        ax.set_yticks(range(len(m)), m.index)
        ax.set_title(HEMI_NAMES[h])
    bar = fig.colorbar(im, ax=list(axes[0]), ticks=range(len(utils.LAYERS)))
    bar.ax.set_yticklabels(utils.LAYERS)
    bar.set_label("best layer")
    fig.suptitle("Best untuned AlexNet layer per ROI and subject, by ROI mean 5-fold CV r (white: no result)")
    return save_figure(fig, stem), mats


def presence_matrix(counts):
    """The paper's presence table: voxel counts, rows the paper's ROIs that have a voxel in some subject, in
    both hemispheres ('LH V1v', 'RH V1v', ...), columns the subjects (0 where absent).

    Parameters
    ----------
    counts : DataFrame subject, hemisphere, roi, n_voxels (``results_utils.voxel_counts``).
    """
    part = counts[counts["roi"].isin(PAPER_ROIS)]
    present = [r for r in PAPER_ROIS if (part.loc[part["roi"] == r, "n_voxels"] > 0).any()]
    wide = part.pivot_table(index=["roi", "hemisphere"], columns="subject", values="n_voxels")
    order = [(roi, h) for roi in present for h in utils.HEMISPHERES]
    return (wide.reindex(index=order, columns=sorted(part["subject"].unique())).fillna(0).astype(int)
            .set_axis([row_label(h, r) for r, h in order]))


def plot_presence(matrix, stem, min_voxels=utils.MIN_VOXELS):
    """The paper's presence table (``presence_matrix``), each cell printing its voxel count: black where the ROI
    has at least utils.ANALYSIS_MIN_VOXELS (20) voxels, grey where it has ``min_voxels`` to 19 (fitted, but too
    small for the MI bound and the probes; the paper's 2024 figures left it out), white where it has fewer
    than ``min_voxels`` (absent). Returns the written paths."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    values = matrix.to_numpy()
    small = max(min_voxels, utils.ANALYSIS_MIN_VOXELS)
    level = (values >= min_voxels).astype(int) + (values >= small)
    colours = ["white", "0.62", "black"]
    fig, ax = plt.subplots(figsize=(2.6 + 0.55 * matrix.shape[1], max(3.5, 1.4 + 0.2 * len(matrix))), layout="constrained")
    ax.imshow(level, cmap=ListedColormap(colours), vmin=0, vmax=2, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if v > 0:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=5, color=("0.4", "k", "w")[level[i, j]])
    ax.set_xticks(range(matrix.shape[1]), [str(s) for s in matrix.columns])
    ax.set_xticks(np.arange(matrix.shape[1] + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(matrix) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.6", lw=0.3)
    ax.tick_params(which="minor", length=0)
    ax.set_yticks(range(len(matrix)), matrix.index, fontsize=7)
    ax.set_xlabel("Subject")
    ax.set_ylabel("ROI")
    labels = [f"Present (>= {small} voxels)", f"Not present (< {min_voxels} voxel{'s' * (min_voxels > 1)})"]
    handles = [Patch(fc="black"), Patch(fc="white", ec="0.6")]
    if small > min_voxels:
        labels.insert(1, f"Present, under {small} voxels:\nno MI bound or probe; left out\nby the paper's 2024 figures")
        handles.insert(1, Patch(fc=colours[1]))
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    ax.set_title("Presence of ROIs in each subject (numbers: voxels)", fontsize=10)
    return save_figure(fig, stem)


def plot_cs_matrix(frac, title, stem):
    """The paper's cross-subject matrix: model subject (rows) x evaluation subject (columns) of the
    average fraction of voxels improved over untuned (``cs_matrix``), each cell printed; the colour
    diverges at 0.5. Returns the written paths."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    values = frac.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    span = max(float(np.abs(finite - 0.5).max()) if len(finite) else 0.0, 0.05)
    norm = TwoSlopeNorm(0.5, 0.5 - span, 0.5 + span)
    cmap = plt.get_cmap("coolwarm").with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(5.6, 5), layout="constrained")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                color="k" if np.isnan(v) else _cell_text_colour(cmap(norm(v))))
    ax.set_xticks(range(frac.shape[1]), [str(s) for s in frac.columns])
    ax.set_yticks(range(frac.shape[0]), [str(s) for s in frac.index])
    ax.set_xlabel("Evaluation Subject")
    ax.set_ylabel("Model Subject")
    fig.colorbar(im, ax=ax, label="fraction of voxels above untuned (test r)", shrink=0.8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, stem)


def _scatter_by_group(ax, table, x, y, label="{name} (n={n})", **style):
    """One scatter per ROI group of ``table`` (column group), in the group's colour, labelled with its name."""
    for g in GROUP_NAMES:
        part = table[table["group"] == g]
        if len(part):
            ax.scatter(part[x], part[y], color=GROUP_COLOURS[g], label=label.format(name=GROUP_NAMES[g], n=len(part)), **style)


def plot_mi_by_size(stats, pooled, stem):
    """The paper's MI-by-size scatter: per (hemisphere, ROI), the mean MI bound over subjects against the
    mean voxel count (``mi_by_size``), subject-specific (dots) and pooled (stars), early and higher visual
    ROIs coloured. Returns the written paths."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    _scatter_by_group(ax, stats, "n_voxels", "specific", "{name}: subject-specific", s=14)
    _scatter_by_group(ax, stats, "n_voxels", "pooled", "{name}: " + pooled, s=30, marker="*", alpha=0.45)
    ax.set_xlabel("Average number of voxels (over the subjects)")
    ax.set_ylabel("MI lower bound estimate (bits)")
    ax.legend(fontsize=6, loc="best")
    ax.set_title(f"MI estimates, subject-specific vs pooled (h-{pooled.split('-')[1]})\n"
                 "mean over subjects per ROI-hemisphere (post-hoc temperature)", fontsize=9)
    return save_figure(fig, stem)


def plot_group_gains(stats, title, stem, ylabel):
    """Bars of the mean gain over subjects per ROI with SEM error bars and n above, one row per hemisphere.

    Returns (paths, stats).
    """
    plt = pyplot()
    hemis = list(dict.fromkeys(stats["hemisphere"]))
    n_rois = max(int((stats["hemisphere"] == h).sum()) for h in hemis)
    fig, axes = plt.subplots(len(hemis), 1, figsize=(max(7.0, 2.5 + 0.42 * n_rois), 0.6 + 2.9 * len(hemis)), squeeze=False,
                             layout="constrained")
    for ax, h in zip(axes[:, 0], hemis):
        part = stats[stats["hemisphere"] == h]
        x = np.arange(len(part))
        colours = [GROUP_COLOURS[utils.roi_group(r)] for r in part["roi"]]
        ax.bar(x, part["mean"], 0.7, yerr=part["sem"].fillna(0), color=colours, capsize=2, ecolor="k")
        top = (part["mean"] + part["sem"].fillna(0)).clip(lower=0)
        for xi, t, n in zip(x, top, part["n"]):
            ax.annotate(f"n={n}", (xi, t), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, part["roi"], rotation=60, ha="right", fontsize=8)
        ax.set_xlim(-0.6, max(len(part), 3) - 0.4)
        ax.set_ylabel(ylabel)
        ax.set_title(HEMI_NAMES[h], fontsize=9)
        ax.margins(y=0.15)
    handles = [plt.Rectangle((0, 0), 1, 1, color=GROUP_COLOURS[g]) for g in GROUP_NAMES]
    axes[0, 0].legend(handles, list(GROUP_NAMES.values()), fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, stem), stats


def plot_pairs(pairs, xlabel, ylabel, title, stem, zero_lines=True, limits=None):
    """Scatter of one point per (subject, hemisphere, ROI), coloured by ROI group, with the identity line;
    ``limits`` (low, high) fixes both axes (the paper's 0-100 % scatters).

    Returns (paths, pairs).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    _scatter_by_group(ax, pairs, "x", "y", s=18, edgecolors="k", linewidths=0.3)
    if limits:
        lo, hi = limits
        pad = 0.04 * (hi - lo)
        ax.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
    else:
        lo = float(min(pairs["x"].min(), pairs["y"].min()))
        hi = float(max(pairs["x"].max(), pairs["y"].max()))
        lo, hi = lo - 0.05 * (hi - lo or 1.0), hi + 0.05 * (hi - lo or 1.0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    if zero_lines:
        ax.axhline(0, color="0.6", lw=0.5)
        ax.axvline(0, color="0.6", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    above = int((pairs["y"] > pairs["x"]).sum())
    ax.set_title(f"{title}\n{above} of {len(pairs)} (subject, hemisphere, ROI) above y = x", fontsize=9)
    ax.legend(fontsize=7, loc="upper left" if limits else "best")
    return save_figure(fig, stem), pairs


def plot_group_means(table, title, stem, score_name):
    """Per ROI group (utils.ROI_GROUPS), the authors' group means (``encoding_results.group_means``) of each
    method's ROI mean r (left) and of each tuned method's % of voxels above untuned (right); bars: mean
    over subjects, error bars: SEM over subjects (ddof 1), one colour per method.

    Returns (paths, (means of r, means of %)).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    panels = ((table, "mean_r", f"group mean of the ROI mean {score_name}"),
              (table[table["method"] != "untuned"], "pct_improved", f"voxels above untuned (%, {score_name})"))
    out = []
    for ax, (part, column, ylabel) in zip(axes, panels):
        per_subject, means = encoding_results.group_means(part, column)
        methods = [m for m in utils.METHODS if m in means.columns]
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            sem = per_subject.groupby("group", sort=False)[method].sem().reindex(means.index)
            x = np.arange(len(means)) + (k - (len(methods) - 1) / 2) * width
            ax.bar(x, means[method], width, yerr=sem.fillna(0), capsize=2, color=METHOD_COLOURS[method], label=method)
        ax.set_xticks(range(len(means)), [f"{g}\n{n} subj.\n{r} ROI-hemis." for g, n, r in
                                          zip(means.index, means["n_subjects"], means["n_rois"])], fontsize=8)
        ax.set_ylabel(ylabel)
        if column == "mean_r":
            low = float(np.nanmin(means[methods].to_numpy()))
            ax.set_ylim(max(0.0, low - 0.05), None)
        else:
            ax.axhline(50, color="0.5", lw=0.6, ls="--")
        out.append(means)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7, title="method", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, stem), tuple(out)


def plot_scorecard(card, stem):
    """The reproduction scorecard's scatter: your ROI mean CV r (y) against the published one (x), one
    point per (subject, hemisphere, ROI, method), one colour per method, identity line.

    Returns the written paths.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5), layout="constrained")
    for method in utils.METHODS:
        part = card[card["method"] == method]
        if len(part):
            ax.scatter(part["mean_cv_r_published"], part["mean_cv_r_yours"], s=12, color=METHOD_COLOURS[method],
                       alpha=0.7, label=f"{method} ({len(part)}, {int(part['differs'].sum())} differ)")
    lo = float(min(card["mean_cv_r_published"].min(), card["mean_cv_r_yours"].min()))
    hi = float(max(card["mean_cv_r_published"].max(), card["mean_cv_r_yours"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xlabel("published: ROI mean 5-fold CV r")
    ax.set_ylabel("yours: ROI mean 5-fold CV r")
    ax.legend(fontsize=7, loc="upper left", title="method (results, differing)", title_fontsize=7)
    ax.set_title(f"Your encoding results vs the authors' published ones\n{len(card)} (subject, hemisphere, ROI, method); "
                 f"{published_results.PROTOCOL}", fontsize=8)
    return save_figure(fig, stem)


# --- Landscapes ------------------------------------------------------------------------

# The authors' keys of the ROI-group landscape, in colour order (see landscape_key).
LANDSCAPE_KEYS = ("Early-L", "Early-R", "Bodies", "Faces", "Places", "Words", "Anatomical")


def landscape_key(meta):
    """The authors' landscape key of a tuned model: Early-L or Early-R for an early ROI (by
    hemisphere), the category (Bodies, Faces, Places, Words) for a higher one, Anatomical for a stream."""
    group = utils.roi_group(meta["roi"])
    if group == "early":
        return f"Early-{utils.hemi_code(meta['hemisphere'])[0].upper()}"
    if group == "higher":
        return utils.ROI_CLASS[meta["roi"]].split("-")[1].capitalize()
    return "Anatomical"


def landscape_keys(metas):
    """Per model: (method, subject label, landscape_key; the method for models without an ROI) used to colour the landscapes."""
    out = []
    for m in metas:
        method = m["method"]
        subj = utils.subj_dir(m["subj"]) if m.get("subj") is not None else ("pooled" if method in POOLED else method)
        out.append((method, subj, landscape_key(m) if m.get("roi") else method))
    return out


def plot_landscape_by(land, colour_of, title, stem, keep=None):
    """A landscape scatter coloured by a category; ``colour_of`` maps model index -> (label, colour).

    ``keep`` (model index -> bool) hides models; untuned and oracle are always drawn as references.
    Returns (paths, {label: model indices drawn}).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 5), layout="constrained")
    xy = land["coords"]
    drawn = {}
    for i, m in enumerate(land["metas"]):
        if m["method"] in ("untuned", "oracle") or keep is None or keep(i):
            drawn.setdefault(colour_of(i), []).append(i)
    # Methods in METHOD_COLOURS order (untuned first); other keys in the order of their first model.
    order = lambda item: list(METHOD_COLOURS).index(item[0][0]) if item[0][0] in METHOD_COLOURS else len(METHOD_COLOURS)
    drawn = dict(sorted(drawn.items(), key=order))
    for (label, colour), idx in drawn.items():
        special = {"untuned": ("*", 260), "oracle": ("X", 140)}.get(label, ("o", 30))
        ax.scatter(xy[idx, 0], xy[idx, 1], color=colour, marker=special[0], s=special[1], edgecolors="k",
                   linewidths=0.3, label=f"{label} ({len(idx)})", zorder=3 if label in ("untuned", "oracle") else 2)
    kind = "InPCA" if land["method"] == "inpca" else "MDS"
    vals = land["eigenvalues"]
    ax.set_xlabel(f"{kind} 1 (eigenvalue {vals[0]:.3g})")
    ax.set_ylabel(f"{kind} 2 (eigenvalue {vals[1]:.3g})")
    ax.legend(fontsize=7, loc="best", title="key (models)", title_fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, stem), {label: idx for (label, _), idx in drawn.items()}


def landscape_figures(root, dataset, folder):
    """The overall, subject, pooled and higher landscapes of one dataset's saved predictions (one embedding)."""
    if not any((utils.classification_preds_dir(root) / dataset).glob("*.npz")):
        raise Missing(f"no {dataset} predictions: make them with python generate_results.py --type "
                      f"classification-task --dataset {dataset} (and the -pooled-avg/-const types)")
    land = ru.landscape(root, dataset)
    keys = landscape_keys(land["metas"])
    subjects = sorted({s for _, s, _ in keys if s.startswith("Subj")}, key=lambda s: int(s[4:]))
    subj_colours = {s: category_colour(k) for k, s in enumerate(subjects)}
    reference = lambda i: (keys[i][0], METHOD_COLOURS[keys[i][0]]) if keys[i][0] in ("untuned", "oracle") else None
    out = []
    out += plot_landscape_by(land, lambda i: (keys[i][0], METHOD_COLOURS[keys[i][0]]),
                             f"{dataset}: model landscape by method", folder / f"{dataset}_landscape_overall")[0]
    out += plot_landscape_by(land, lambda i: reference(i) or (keys[i][1], subj_colours[keys[i][1]]),
                             f"{dataset}: subject-specific models by subject", folder / f"{dataset}_landscape_subject",
                             keep=lambda i: keys[i][1] in subj_colours)[0]
    out += plot_landscape_by(land, lambda i: (keys[i][0], METHOD_COLOURS[keys[i][0]]),
                             f"{dataset}: CL models, subject-specific vs pooled", folder / f"{dataset}_landscape_pooled",
                             keep=lambda i: keys[i][0] in ("cl-tuned",) + POOLED)[0]
    key_colour = lambda i: (keys[i][2], category_colour(LANDSCAPE_KEYS.index(keys[i][2])))
    out += plot_landscape_by(land, lambda i: reference(i) or key_colour(i),
                             f"{dataset}: tuned models by ROI group", folder / f"{dataset}_landscape_higher")[0]
    return out


def category_colour(k):
    """The k-th categorical colour (tab10, then tab20's light ones, then tab20b's), 25 before they repeat."""
    plt = pyplot()
    colours = list(plt.cm.tab10.colors) + list(plt.cm.tab20.colors[1::2]) + list(plt.cm.tab20b.colors[::4])
    return colours[k % len(colours)]


# --- Cortical maps ---------------------------------------------------------------------

def fsaverage_rows(root, subj, hemisphere):
    """fsaverage vertex (0..163841) of each challenge-space vertex, shape (n_vertices,)."""
    return np.flatnonzero(utils.load_label_file(utils.fsaverage_mask_path(root, subj, hemisphere)))


FSAVERAGE5_NEAREST = Path(__file__).resolve().parent / "fsaverage" / "fsaverage5_nearest.npz"


@functools.cache
def fsaverage5_nearest():
    """The nearest fsaverage5 vertex of every fsaverage vertex, shape (163842,): itself below 10242 (fsaverage
    nests fsaverage5), pycortex's nearest-neighbour table on the sphere above (fsaverage/README.md)."""
    with np.load(FSAVERAGE5_NEAREST) as f:
        table = f["nearest"].astype(np.int64)
    return np.concatenate([np.arange(FSAVERAGE5_VERTICES), table])


def mesh_vertices(rows, n_mesh):
    """The vertex of a mesh (fsaverage5: ``n_mesh`` 10242, or fsaverage) on which each fsaverage vertex of ``rows``
    is drawn: itself on fsaverage, its nearest fsaverage5 vertex on fsaverage5."""
    return rows if n_mesh == utils.N_FSAVERAGE_VERTICES else fsaverage5_nearest()[rows]


def to_mesh(values, rows, n_mesh, categorical=False):
    """Challenge-space values (n_vertices,) on fsaverage5 (``n_mesh`` 10242) or fsaverage (163842), NaN where none.

    Parameters
    ----------
    values : (n_vertices,) values, NaN where nothing is drawn.
    rows : (n_vertices,) fsaverage vertex of each challenge-space vertex (``fsaverage_rows``).
    categorical : integer codes: a mesh vertex takes the most common code (ties: the smallest)
        instead of the mean.

    Returns
    -------
    (n_mesh,) array. On fsaverage each vertex keeps its value; on fsaverage5 each vertex takes
    the mean of the values of the vertices whose nearest fsaverage5 vertex it is.
    """
    finite = np.isfinite(values)
    target = mesh_vertices(rows[finite], n_mesh)
    values = values[finite]
    out = np.full(n_mesh, np.nan)
    if categorical:
        counts = np.zeros((n_mesh, int(values.max()) + 1 if len(values) else 1))
        np.add.at(counts, (target, values.astype(np.int64)), 1)
        has = counts.sum(axis=1) > 0
        out[has] = counts[has].argmax(axis=1)
    else:
        n = np.bincount(target, minlength=n_mesh)
        has = n > 0
        out[has] = np.bincount(target, values, minlength=n_mesh)[has] / n[has]
    return out


def vertex_values(results, hemisphere, n_vertices, value):
    """Per challenge-space vertex, the values of ``value(results, hemisphere, roi)`` -> (voxels, values) or None (skip the ROI).

    A vertex in several ROIs takes the value of the first ROI in canonical order; NaN outside every ROI.
    """
    out = np.full(n_vertices, np.nan)
    for roi in reversed(utils.ROIS):
        v = value(results, hemisphere, roi)
        if v is not None:
            out[v[0]] = v[1]
    return out


def score_of(method, score="test_r"):
    """``vertex_values`` value: (voxels, ``score`` per voxel: 'test_r' or 'cv_r') of ``method``."""
    def value(results, hemi, roi):
        r = results.get((method, hemi, roi))
        return None if r is None else (r["voxels"], r[score])
    return value


def gain_of(method, score="test_r"):
    """``vertex_values`` value: (voxels, ``score`` of ``method`` - ``score`` of untuned) where both fitted the same voxels."""
    def value(results, hemi, roi):
        r, u = results.get((method, hemi, roi)), results.get(("untuned", hemi, roi))
        if r is None or u is None or not np.array_equal(r["voxels"], u["voxels"]):
            return None
        return r["voxels"], r[score] - u[score]
    return value


def winner_of(methods, score="test_r"):
    """``vertex_values`` value: (voxels, index into ``methods`` of the highest ``score``) among the methods fitted on the ROI (two or more)."""
    def value(results, hemi, roi):
        fitted = [(k, results[m, hemi, roi]) for k, m in enumerate(methods) if (m, hemi, roi) in results]
        fitted = [(k, r) for k, r in fitted if np.array_equal(r["voxels"], fitted[0][1]["voxels"])]
        if len(fitted) < 2:
            return None
        scores = np.stack([r[score] for _, r in fitted])
        return fitted[0][1]["voxels"], np.array([k for k, _ in fitted])[np.argmax(scores, axis=0)]
    return value


def load_meshes(mesh="fsaverage5"):
    """Surfaces and sulcal depth of both hemispheres.

    Parameters
    ----------
    mesh : 'fsaverage5' (nilearn's packaged mesh, no download) or a FreeSurfer subject folder
        of the full fsaverage holding surf/{lh,rh}.{inflated,pial,sulc}.

    Returns
    -------
    dict hemi -> {'inflated': mesh, 'pial': mesh, 'sulc': (n,) array}, and n (vertices per hemisphere).
    """
    from nilearn import surface
    if mesh in ("", "fsaverage5"):
        from nilearn import datasets
        fs = datasets.fetch_surf_fsaverage("fsaverage5")
        files = {h: {"inflated": fs[f"infl_{side}"], "pial": fs[f"pial_{side}"], "sulc": fs[f"sulc_{side}"]}
                 for h, side in (("lh", "left"), ("rh", "right"))}
        n = FSAVERAGE5_VERTICES
    else:
        fix = "point --mesh at a FreeSurfer fsaverage folder (with surf/lh.inflated, ...) or use fsaverage5"
        files = {h: {k: str(safe_io.require_file(Path(mesh) / "surf" / f"{h}.{k}", fix)) for k in ("inflated", "pial", "sulc")}
                 for h in utils.HEMISPHERES}
        n = utils.N_FSAVERAGE_VERTICES
    out = {}
    for h, f in files.items():
        out[h] = {k: surface.load_surf_mesh(f[k]) for k in ("inflated", "pial")}
        out[h]["sulc"] = np.asarray(surface.load_surf_data(f["sulc"]), dtype=float)
        sizes = {len(out[h][k].coordinates) for k in ("inflated", "pial")} | {len(out[h]["sulc"])}
        if sizes != {n}:
            raise safe_io.UserError(f"the {h} surfaces of {mesh} have {sorted(sizes)} vertices, not {n}: "
                                  "give the full fsaverage (163842 vertices per hemisphere)")
    return out, n


def plot_cortical_map(maps, meshes, title, label, stem, cmap="RdBu_r", vmax=None, categories=None,
                      surfaces=SURFACES, views=VIEWS, caption=""):
    """Per-vertex values on the surfaces: rows = (surface), columns = (hemisphere, view).

    Parameters
    ----------
    maps : {hemi: (n_mesh,) values, NaN where nothing is drawn}, one or several rows of them:
        a list of (row label, maps) draws one row per entry on the inflated surface only.
    categories : {name: colour} for integer-coded maps (code k is the k-th name), else a
        continuous map centred at 0 with limits +-vmax (default: the 99th percentile of
        |value|; the colour bar's arrows mark the values beyond).

    Each face takes the mean of those of its three vertices that have a value (for
    categories, their most common code), so a vertex with a value colours its ring of faces.

    Returns the written paths.
    """
    plt = pyplot()
    from matplotlib.colors import ListedColormap, Normalize
    from nilearn import plotting
    rows = maps if isinstance(maps, list) else [(s, maps) for s in surfaces]
    hemis = [h for h in utils.HEMISPHERES if h in rows[0][1]]
    values = np.concatenate([m[h] for _, m in rows for h in hemis])
    if categories is not None:
        cmap = ListedColormap(list(categories.values()))
        norm = Normalize(-0.5, len(categories) - 0.5)
    else:
        finite = np.abs(values[np.isfinite(values)])
        vmax = vmax or (float(np.percentile(finite, 99)) if len(finite) else 0.0) or 1.0
        norm = Normalize(-vmax, vmax)
    cols = [(h, v) for h in hemis for v in views]
    height = 1.6 * len(rows) + 1.0
    fig = plt.figure(figsize=(1.9 * len(cols) + 1.2, height))
    top, bottom = 1 - 0.55 / height, 0.45 / height
    grid = fig.add_gridspec(len(rows), len(cols), left=0.06, right=0.9, top=top, bottom=bottom, wspace=0, hspace=0)
    for i, (row, m) in enumerate(rows):
        surface = row if row in SURFACES else "inflated"
        for j, (h, view) in enumerate(cols):
            ax = fig.add_subplot(grid[i, j], projection="3d")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of faces without any value
                plotting.plot_surf(meshes[h][surface], m[h], bg_map=meshes[h]["sulc"], hemi={"lh": "left", "rh": "right"}[h],
                                   view=view, cmap=cmap, vmin=norm.vmin, vmax=norm.vmax, colorbar=False, axes=ax,
                                   figure=fig, avg_method=_face_mode if categories is not None else "nanmean")
            ax.set_box_aspect(None, zoom=1.25)
            for c in ax.collections:
                c.set_rasterized(True)  # 20k+ polygons per panel: keep the PDF small
            if i == 0:
                ax.set_title(f"{h} {view}", fontsize=8, pad=0)
        fig.text(0.05, bottom + (len(rows) - i - 0.5) * (top - bottom) / len(rows), row, rotation=90, ha="right",
                 va="center", fontsize=8)
    cax = fig.add_axes([0.92, bottom + 0.15 * (top - bottom), 0.012, 0.7 * (top - bottom)])
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax,
                       extend="neither" if categories is not None else "both")
    if categories is not None:
        bar.set_ticks(range(len(categories)), labels=list(categories))
    bar.ax.tick_params(labelsize=7)
    bar.set_label(label, fontsize=8)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height)
    if caption:
        fig.text(0.5, 0.1 / height, caption, ha="center", va="bottom", fontsize=6.5, wrap=True)
    return save_figure(fig, stem)


def _face_mode(codes):
    """The most common finite code among a face's vertices (ties: the smallest); NaN if none."""
    codes = codes[np.isfinite(codes)]
    if not len(codes):
        return np.nan
    values, counts = np.unique(codes, return_counts=True)
    return values[np.argmax(counts)]


def subject_surface_maps(root, subj, results, n_mesh, value, categorical=False):
    """{hemi: (n_mesh,)} of ``vertex_values`` on the mesh (``to_mesh``), for the hemispheres with results."""
    out = {}
    for h in utils.HEMISPHERES:
        if any(k[1] == h for k in results):
            rows = fsaverage_rows(root, subj, h)
            out[h] = to_mesh(vertex_values(results, h, len(rows), value), rows, n_mesh, categorical)
    return out


def mesh_note(counts, n_mesh):
    """The caption's account of the vertices drawn: ``counts`` {hemi: (fitted vertices, mesh vertices they cover)}."""
    each = f" ({', '.join(f'{h}: {k} on {m}' for h, (k, m) in counts.items())})" if counts else ""
    if n_mesh == FSAVERAGE5_VERTICES:
        return f"every fitted vertex is averaged into its nearest fsaverage5 vertex{each}; {OVERLAP_NOTE}"
    return f"every fitted vertex is drawn on fsaverage{each}; {OVERLAP_NOTE}"


def covered(rows, voxels, n_mesh):
    """(number of challenge-space ``voxels``, number of mesh vertices they are drawn on); ``rows`` as ``to_mesh``'s."""
    return len(voxels), len(np.unique(mesh_vertices(rows[voxels], n_mesh)))


def cortical_figures(root, encoding, meshes=None, surfaces=SURFACES, views=VIEWS, folder=None, kind="all", score="test_r"):
    """Per subject: ``score`` ('test_r' or 'cv_r') of each method, gain of CL and pooled over untuned, the
    winning method; and the all-subjects CL-gain panel.

    ``meshes`` is ``load_meshes``'s result (default: fsaverage5). ``kind`` 'summary' draws only
    the CL gain and winner of each subject and the panel. Returns (paths, {name: maps drawn}).
    """
    meshes, n = meshes or load_meshes()
    folder = Path(folder or paper_dir(root)) / "cortical"
    name = SCORE_NAMES[score]
    paths, drawn = [], {}
    for subj, results in encoding.items():
        fitted = {h: np.unique(np.concatenate([r["voxels"] for k, r in results.items() if k[1] == h]))
                  for h in utils.HEMISPHERES if any(k[1] == h for k in results)}
        where = mesh_note({h: covered(fsaverage_rows(root, subj, h), v, n) for h, v in fitted.items()}, n)
        methods = [m for m in utils.METHODS if any(k[0] == m for k in results)]
        jobs = [(f"{score}_{m}", score_of(m, score), f"{utils.subj_dir(subj)}: {name} of {m}", f"{name} (Pearson)", None)
                for m in methods if kind == "all"]
        jobs += [(f"gain_{m}", gain_of(m, score), f"{utils.subj_dir(subj)}: gain of {m} over untuned",
                  f"{name} ({m}) -\n{name} (untuned)", None) for m in ("cl-tuned",) + POOLED
                 if m in methods and (kind == "all" or m == "cl-tuned")]
        if len(methods) > 1:
            jobs.append(("cortical_results_single_subj", winner_of(methods, score),
                         f"{utils.subj_dir(subj)}: method with the highest {name}", "best method",
                         {m: METHOD_COLOURS[m] for m in methods}))
        for stem_name, value, title, label, categories in jobs:
            maps = subject_surface_maps(root, subj, results, n, value, categorical=categories is not None)
            if not any(np.isfinite(m).any() for m in maps.values()):
                continue
            stem = folder / f"{utils.subj_dir(subj)}_{stem_name}"
            paths += plot_cortical_map(maps, meshes, title, label, stem, categories=categories, surfaces=surfaces,
                                       views=views, caption=where)
            drawn[stem.name] = maps
    panel = [(utils.subj_dir(s), subject_surface_maps(root, s, r, n, gain_of("cl-tuned", score))) for s, r in encoding.items()]
    panel = [(s, m) for s, m in panel if any(np.isfinite(v).any() for v in m.values())]
    if panel:
        hemis = set.intersection(*(set(m) for _, m in panel))
        panel = [(s, {h: m[h] for h in sorted(hemis)}) for s, m in panel]
        stem = folder / "all_subjects_panel"
        paths += plot_cortical_map(panel, meshes, "gain of cl-tuned over untuned, all subjects (inflated)",
                                   f"{name} (cl-tuned) -\n{name} (untuned)", stem, views=views,
                                   caption=mesh_note({}, n))
        drawn[stem.name] = dict(panel)
    return paths, drawn


KEY_VIEWS = ("lateral", "posterior", "medial")
# The colours of the paper's ROI key (read off the legend of the authors' cortical_results_key.png); aTL-faces,
# absent from their key, takes the pastel its neighbours' sequence skipped.
ROI_KEY_COLOURS = {
    "V1v": "#1f77b4", "V1d": "#aec7e8", "V2v": "#ffbb78", "V2d": "#2ca02c", "V3v": "#d62728", "V3d": "#ff9896",
    "hV4": "#c5b0d5", "EBA": "#8c564b", "FBA-1": "#e377c2", "FBA-2": "#f7b6d2", "mTL-bodies": "#c7c7c7",
    "OFA": "#bcbd22", "FFA-1": "#17becf", "FFA-2": "#9edae5", "mTL-faces": "#b3e2cd", "aTL-faces": "#f4cae4",
    "OPA": "#fdcdac", "PPA": "#cbd5e8", "RSC": "#e6f5c9", "OWFA": "#fff2ae", "VWFA-1": "#f1e2cc", "VWFA-2": "#cccccc",
    "mfs-words": "#7fc97f", "mTL-words": "#666666"}


def cortical_key(root, subj, meshes, folder):
    """The paper's ROI key (``cortical_results_key``): the pRF and category ROIs of ``subj``'s masks on the
    inflated and pial surfaces, lateral, posterior and medial views, one colour per ROI (the paper's).

    Returns (paths, {hemisphere: (n_mesh,) ROI index into the colour key, NaN outside every ROI}).
    """
    meshes, n = meshes
    rois = [r for r in PAPER_ROIS if any(utils.roi_voxel_count(root, subj, h, r) for h in utils.HEMISPHERES)]
    code = lambda _, h, roi: (utils.roi_voxel_indices(root, subj, h, roi), float(rois.index(roi))) if roi in rois else None
    maps, counts = {}, {}
    for h in utils.HEMISPHERES:
        rows = fsaverage_rows(root, subj, h)
        values = vertex_values(None, h, len(rows), code)
        maps[h] = to_mesh(values, rows, n, categorical=True)
        counts[h] = covered(rows, np.flatnonzero(np.isfinite(values)), n)
    colours = {roi: ROI_KEY_COLOURS[roi] for roi in rois}
    stem = Path(folder) / "cortical_results_key"
    return plot_cortical_map(maps, meshes, f"ROI key: the ROIs of {utils.subj_dir(subj)}", "ROI", stem, categories=colours,
                             views=KEY_VIEWS, caption=mesh_note(counts, n).replace("fitted", "ROI")), maps


# --- The index page ---------------------------------------------------------------------

_SUBJ = r"(?P<subj>Subj(?P<n>\d+))"
_PAPER = "results/figures/(?P<source>paper|published)/"
_CORTICAL = _PAPER + "cortical/" + _SUBJ
_SUMMARIES = "python generate_results.py --type summaries --subjects {n}  (also drawn by fit_encoding_models.py)"
# Every figure the scripts write: (section, regular expression of its path below ROOT, caption, command); the
# named groups fill the caption and the command. The first expression that matches a path gives its entry.
FIGURE_INDEX = [
    ("Encoding results of each subject", _SUBJ.join(("encoding_results/", r"/(?P<tag>[^/]+)/layer_scores_(?P<hemi>[lr]h)\.png")),
     "{subj} {hemi}, {tag}: the ROI mean 5-fold CV r of each AlexNet layer, the best layer of each ROI boxed",
     _SUMMARIES),
    ("Encoding results of each subject", _SUBJ.join(("encoding_results/", r"/methods_(?P<hemi>[lr]h)\.png")),
     "{subj} {hemi}: mean test r of each method (untuned first) per ROI; error bars: 25th-75th percentile over voxels",
     _SUMMARIES),
    ("Encoding results of each subject", _SUBJ.join(("encoding_results/", r"/scatter_(?P<tag>.+)_vs_untuned_(?P<hemi>[lr]h)\.png")),
     "{subj} {hemi}: per-voxel test r of {tag} against untuned, over the ROIs that have both",
     _SUMMARIES),
    ("Transfer across subjects",
     r"encoding_results/transfer_(?P<method>[a-z-]+?)(?P<layer>_untuned-layer)?_(?P<hemis>[lr]h(?:-rh)?)_(?P<group>[a-z]+)"
     r"(?:_(?P<aggregation>absent-zero|voxels))?\.png",
     "{method} models of each model subject on each target subject{layer_text}, {group} ROIs ({hemis}{aggregation_text}): "
     "mean test r and fraction of voxels above untuned",
     "python generate_results.py --type transfer-matrix --method {method}{protocol_flag}{aggregation_flag}"),
    ("Transfer to NOD", r"encoding_results/nod/nod_transfer\.png",
     "NOD: mean test r per visual area and method across subjects (SEM), NSD-tuned feature extractors",
     "python fit_encoding_models_nod.py"),
    ("Probes, MI bounds, salience and landscapes", r"results/figures/classification_(?P<dataset>[^_]+)_(?P<method>[^_]+)_e\d+\.png",
     "{dataset} classification accuracy of the fc7 probes of the {method} models, ROI x subject, coloured by the "
     "change from untuned", "python generate_results.py --type figures --dataset {dataset} --method {method}"),
    ("Probes, MI bounds, salience and landscapes", r"results/figures/mi_bound_(?P<method>[^_]+)_e\d+\.png",
     "InfoNCE MI lower bound (bits, post-hoc temperature) of the {method} models, ROI x subject",
     "python generate_results.py --type figures --method {method}"),
    ("Probes, MI bounds, salience and landscapes", r"results/figures/salience_(?P<dataset>[^_]+)_.*\.png",
     "Grad-CAM of the untuned and the tuned models on one {dataset} test image and its mirror",
     "python generate_results.py --type salience-maps --dataset {dataset}"),
    ("Probes, MI bounds, salience and landscapes", r"results/figures/landscape_(?P<dataset>[^_]+)_(?P<embedding>\w+)\.png",
     "model landscape of the {dataset} probe models ({embedding}), coloured by test accuracy",
     "the notebook feature_extraction_model_landscape_imagenet.ipynb"),
    ("The paper's figures", _PAPER + r"best_untuned_layers_matrix\.png",
     "untuned AlexNet: ROI mean 5-fold CV r of each ROI-hemisphere and layer, the best layer boxed", None),
    ("The paper's figures", _PAPER + r"roi_subj_presence_table\.png",
     "voxels of each ROI-hemisphere and subject: black present, grey under 20 voxels, white absent", None),
    ("The paper's figures", _PAPER + r"(?P<group>\w+)_group_cs_avgs_picture\.png",
     "cross-subject transfer, {group} ROIs: fraction of voxels above untuned (both at the untuned layer and alphas), "
     "model subject x evaluation subject", None),
    ("The paper's figures", _PAPER + r"cs_vs_pooled_(?P<h>\w+)_scatterplot\.png",
     "% of voxels above untuned: other subjects' CL models (x) against the pooled model h-{h} (y), per-method protocol",
     None),
    ("The paper's figures", _PAPER + r"lower_bound_mi_estimates_specific_vs_pooled_h(?P<h>\w+)\.png",
     "MI bound against ROI size, subject-specific CL models and the pooled model h-{h}", None),
    ("The paper's figures", _PAPER + r"mi_lower_bound_matrix\.png",
     "MI lower bound (bits) of the subject-specific CL models, ROI-hemisphere x subject", None),
    ("The paper's figures", _PAPER + r"(?P<dataset>[a-z0-9]+)_results_matrix\.png",
     "{dataset} fc7 probe accuracy of every model, ROI-hemisphere x model", None),
    ("The paper's figures", _PAPER + r"(?P<dataset>[a-z0-9]+)_landscape_(?P<key>\w+)\.png",
     "{dataset} model landscape (InPCA of the Bhattacharyya distances), coloured by {key}", None),
    ("The paper's figures", _PAPER + r"cortical_results_key\.png", "the ROI key of the cortical maps", None),
    ("This project's encoding figures", _PAPER + r"best_untuned_layer_per_subject\.png",
     "best untuned AlexNet layer per ROI and subject", None),
    ("This project's encoding figures", _PAPER + r"(?P<group>\w+)_group_cl_gain_per_roi\.png",
     "CL gain over untuned per ROI ({group} ROIs), mean over subjects with SEM", None),
    ("This project's encoding figures", _PAPER + r"cl_vs_(?P<pooled>[a-z-]+)_gain_scatterplot\.png",
     "gain over untuned per (subject, hemisphere, ROI): subject-specific CL (x) against {pooled} (y)", None),
    ("This project's encoding figures", _PAPER + r"cl_vs_untuned_scatterplot\.png",
     "ROI mean r per (subject, hemisphere, ROI): untuned (x) against cl-tuned (y)", None),
    ("This project's encoding figures", _PAPER + r"group_means_per_method\.png",
     "the authors' group means of each method's ROI mean r and % of voxels above untuned", None),
    ("This project's encoding figures", _PAPER + r"mi_specific_vs_pooled_h(?P<h>\w+)_pairs\.png",
     "MI bound per (subject, hemisphere, ROI): subject-specific CL model (x) against the pooled model h-{h} (y)", None),
    ("Cortical maps", _CORTICAL + r"_gain_(?P<method>[a-z-]+)\.png",
     "{subj}: per vertex, the gain of {method} over untuned (fsaverage5)", None),
    ("Cortical maps", _CORTICAL + r"_(?P<score>test_r|cv_r)_(?P<method>[a-z-]+)\.png",
     "{subj}: per vertex, the {score} of {method} (fsaverage5)", None),
    ("Cortical maps", _CORTICAL + r"_cortical_results_single_subj\.png",
     "{subj}: per vertex, the method with the highest r (untuned black)", None),
    ("Cortical maps", _PAPER + r"cortical/all_subjects_panel\.png", "the CL gain over untuned, one row per subject", None),
    ("Held against the published results", r"results/published_comparison/scorecard\.png",
     "your ROI mean CV r against the authors' published one, one point per (subject, hemisphere, ROI, method)",
     "python generate_results.py --type compare-published"),
]


# How the optional parts of a transfer figure's name read in its caption and command (the defaults: untuned-layer
# protocol, the authors' aggregation).
_DERIVED = {
    "layer": lambda v: {"layer_text": " at the untuned layer and alphas" if v else " (per-method protocol)",
                        "protocol_flag": "" if v else " --protocol per-method"},
    "aggregation": lambda v: {"aggregation_text": {"absent-zero": ", absent ROIs as 0", "voxels": ", pooled over voxels"}.get(v, ""),
                              "aggregation_flag": f" --transfer-aggregation {v}" if v else ""},
}


def figure_entry(relative):
    """(section, caption, command) of a figure's path below ROOT (posix), from FIGURE_INDEX; None if unknown."""
    for section, pattern, caption, command in FIGURE_INDEX:
        match = re.fullmatch(pattern, relative)
        if match:
            fields = {k: v or "" for k, v in match.groupdict().items()}
            for name, derive in _DERIVED.items():
                if name in fields:
                    fields.update(derive(fields[name]))
            if command is None:  # the paper figures
                command = "python generate_results.py --type paper-figures" + (
                    " --source published" if fields["source"] == "published" else "")
            return section, caption.format(**fields), command.format(**fields)
    return None


def write_index(root):
    """results/figures/index.html: every PNG under ROOT's encoding_results/ and results/, by section, each with
    its caption, the command that made it and a link to its PDF. Returns (path, {section: [figure paths]})."""
    import html
    from urllib.parse import quote
    root = Path(root)
    index = utils.results_dir(root) / "figures" / "index.html"
    sections = {section: [] for section, *_ in FIGURE_INDEX}
    sections["Other figures"] = []
    for folder in (root / "encoding_results", utils.results_dir(root)):
        for path in sorted(folder.rglob("*.png")):
            entry = figure_entry(path.relative_to(root).as_posix())
            section, caption, command = entry or ("Other figures", "", "")
            sections[section].append((path, caption, command))
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Figures of {html.escape(str(root.resolve().name))}"
             "</title><style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;vertical-align:top;"
             "width:46%;margin:1em}img{max-width:100%;border:1px solid #ddd}code{font-size:90%}</style></head><body>",
             "<h1>Figures</h1><p>Every figure under encoding_results/ and results/, with the command that made it.</p>"]
    for section, figs in sections.items():
        if not figs:
            continue
        parts.append(f"<h2>{html.escape(section)} ({len(figs)})</h2>")
        for path, caption, command in figs:
            src = quote(Path(os.path.relpath(path, index.parent)).as_posix())
            name = path.relative_to(root).as_posix()
            pdf = f" (<a href='{src[:-4]}.pdf'>PDF</a>)" if path.with_suffix(".pdf").is_file() else ""
            parts.append(f"<figure><a href='{src}'><img src='{src}' alt='{html.escape(name)}' loading='lazy'></a>"
                         f"<figcaption><b>{html.escape(name)}</b>{pdf}<br>{html.escape(caption)}<br>"
                         f"<code>{html.escape(command)}</code></figcaption></figure>")
    parts.append("</body></html>\n")
    safe_io.atomic_write_text("\n".join(parts), index)
    return index, {section: [p for p, *_ in figs] for section, figs in sections.items() if figs}


# --- Everything ------------------------------------------------------------------------

# What the published results lack; the figures made from it are drawn from ROOT's results only.
RESULTS_ONLY = "cross-subject transfer, MI bounds and classification probes"


def paper_figures(root, epochs=utils.DEFAULT_EPOCHS["cl-tuned"], mesh="fsaverage5", subjects=None, surfaces=SURFACES,
                  views=VIEWS, maps="all", source="results", min_voxels=utils.MIN_VOXELS):
    """Every paper figure whose inputs exist, under results/figures/paper/ (``source`` 'results': ROOT's
    saved results) or results/figures/published/ ('published': the authors' published results).

    ``maps``: 'all' cortical maps, 'summary' (per subject the CL gain and the winning method,
    and the all-subjects panel) or 'none'. ``min_voxels``: an ROI with fewer voxels counts as absent
    (presence table, cross-subject matrices).

    Returns
    -------
    paths : list of written files (PNG and PDF).
    skipped : list of one-line messages, each naming a skipped figure and the command that makes its inputs.
    """
    if maps not in utils.CORTICAL_MAPS:
        raise safe_io.UserError(f"unknown maps {maps!r}: use all, summary or none")
    if source not in SOURCES:
        raise safe_io.UserError(f"unknown source {source!r}: use {' or '.join(SOURCES)}")
    folder = paper_dir(root, source)
    meshes = load_meshes(mesh) if maps != "none" else None  # a bad mesh folder fails before any figure is drawn
    if source == "published":
        encoding = published_results.load_results(subjects=subjects)
        layers, counts, score = published_results.load_layer_scores(), published_results.voxel_counts(), "cv_r"
        where = f"the authors' published results ({published_results.PROTOCOL})"
    else:
        encoding = encoding_results.load_encoding(root, subjects)
        layers, counts, score = layer_table(encoding), None, "test_r"
        where = "your results (per-method protocol, test r; layer scores: 5-fold CV r)"
    table = encoding_table(encoding, score)
    paths, skipped = [], []

    def attempt(name, make, *args):
        try:
            paths.extend(make(*args))
        except Missing as e:
            skipped.append(f"skip {name}: {e}")

    with_untuned = layers.loc[layers["method"] == "untuned", "subject"]
    subject = int(with_untuned.min()) if len(with_untuned) else 1  # the paper shows Subj1's
    attempt("best_untuned_layers_matrix", lambda: plot_layer_matrix(
        layer_matrix(layers, subject), f"{utils.subj_dir(subject)}: encoding scores for each ROI and AlexNet layer\n"
        f"untuned AlexNet, ROI mean of the 5-fold CV r; colour scaled per row, best layer boxed\n{where}",
        folder / "best_untuned_layers_matrix"))
    attempt("roi_subj_presence_table", lambda: plot_presence(
        presence_matrix(load_voxel_counts(root) if counts is None else counts), folder / "roi_subj_presence_table",
        min_voxels))
    _encoding_extras(table, score, where, folder, attempt)
    if source == "results":
        _results_figures(root, table, epochs, min_voxels, folder, attempt)
    else:
        skipped.append(f"skip the figures of {RESULTS_ONLY}: the published results hold per-voxel encoding results only; "
                       "draw them from your results (--source results) once made (see the README's table of steps)")
    if maps != "none":
        attempt("cortical maps", _cortical_maps, root, table, encoding, meshes, surfaces, views, folder, maps, score)
        attempt("cortical_results_key", _cortical_key, root, table, encoding, meshes, folder)
    return paths, skipped


def _results_figures(root, table, epochs, min_voxels, folder, attempt):
    """The paper's figures made from the transfer results, MI bounds and probes under ROOT."""
    # Each protocol's results read once: the authors' matrices (untuned layer), the pooled scatters (per method).
    authors = functools.cache(lambda: transfer_both(root, "untuned-layer", min_voxels))
    per_method = functools.cache(lambda: transfer_both(root, "per-method", min_voxels))
    for group in ("all", "early", "higher"):  # the paper's three cross-subject figures
        rois = utils.ROI_GROUPS[group]
        attempt(f"{group}_group_cs_avgs_picture", _cs_figure, authors, group, rois, folder)
    for pooled in POOLED:
        h = pooled.split("-")[1]
        attempt(f"cs_vs_pooled_{h}_scatterplot", _cs_vs_pooled_figure, per_method, table, pooled, folder)
        attempt(f"lower_bound_mi_estimates_specific_vs_pooled_h{h}", _mi_size_figure, root, pooled, epochs, folder)
    attempt("mi_lower_bound_matrix", lambda: plot_value_matrix(
        mi_matrix(root, epochs), "MI lower bound estimates, subject-specific CL models\n"
        "InfoNCE bound on each subject's test split, post-hoc temperature", "MI lower bound (bits)",
        folder / "mi_lower_bound_matrix", cmap="Blues", xlabel="Subject"))
    for dataset in utils.CLASSIFICATION_DATASETS:
        attempt(f"{dataset}_results_matrix", lambda dataset=dataset: plot_value_matrix(
            classification_matrix(root, dataset, epochs), f"{dataset} test accuracies (fc7 linear probe)",
            "test accuracy", folder / f"{dataset}_results_matrix", xlabel="Model"))
        attempt(f"{dataset} landscapes", landscape_figures, root, dataset, folder)


def _require(table, method):
    """``table`` if it holds results of ``method`` (with a gain over untuned, for a tuned method), else Missing."""
    has = table["method"] == method
    if method != "untuned":
        has &= np.isfinite(table["gain"])
    if not has.any():
        what = "untuned (then cl-tuned, pooled-avg, pooled-const)" if method == "untuned" else method
        raise Missing(f"no {method} encoding results{'' if method == 'untuned' else ' with an untuned result on the same ROI'}: "
                      f"make them with python fit_encoding_models.py --method {what} --subj S --hemisphere H")
    return table


def _encoding_extras(table, score, where, folder, attempt):
    """The figures of the encoding results that the paper does not have: best layers per subject, CL
    gain per ROI, CL vs pooled gains, CL vs untuned, group means per method."""
    name = SCORE_NAMES[score]
    attempt("best_untuned_layer_per_subject", lambda: plot_best_layers(
        _require(table, "untuned"), folder / "best_untuned_layer_per_subject")[0])
    for group in ("all", "early", "higher"):
        rois = utils.ROI_GROUPS[group]
        attempt(f"{group}_group_cl_gain_per_roi", lambda group=group, rois=rois: plot_group_gains(
            _nonempty(group_gains(_require(table, "cl-tuned"), "cl-tuned", rois),
                      f"{group} ROI with cl-tuned and untuned results"),
            f"Subject-specific CL gain over untuned, {GROUP_NAMES.get(group, 'all')} ROIs\n"
            f"mean over the subjects with the ROI (n), SEM error bars; {where}",
            folder / f"{group}_group_cl_gain_per_roi", f"gain in mean {name}")[0])
    for pooled in POOLED:
        attempt(f"cl_vs_{pooled}_gain_scatterplot", lambda pooled=pooled: plot_pairs(
            _nonempty(paired_values(_require(table, pooled), "cl-tuned", pooled),
                      f"(subject, ROI) with cl-tuned and {pooled} results"),
            f"CL (subject-specific) gain in mean {name}", f"{pooled} gain in mean {name}",
            f"Gain over untuned: subject-specific CL vs {pooled}", folder / f"cl_vs_{pooled}_gain_scatterplot")[0])
    attempt("cl_vs_untuned_scatterplot", lambda: plot_pairs(
        _nonempty(paired_values(_require(table, "cl-tuned"), "untuned", "cl-tuned", "mean_r"),
                  "(subject, ROI) with cl-tuned and untuned results"),
        f"untuned: ROI mean {name}", f"cl-tuned: ROI mean {name}", f"CL-tuned vs untuned AlexNet\n{where}",
        folder / "cl_vs_untuned_scatterplot", zero_lines=False)[0])
    attempt("group_means_per_method", lambda: plot_group_means(
        _require(table, "cl-tuned"), "Group means per method (the authors' rule: ROI-hemispheres with every method, "
        f"mean per subject, then over subjects)\n{where}", folder / "group_means_per_method", name)[0])


def _nonempty(pairs, what):
    """``pairs`` if it has rows, else Missing naming ``what`` is needed."""
    if pairs.empty:
        raise Missing(f"no {what} on the same voxels: fit both with python fit_encoding_models.py")
    return pairs


def _cortical_maps(root, table, encoding, meshes, surfaces, views, folder, kind, score):
    _require(table, "untuned")
    if score == "cv_r":  # the published results: their voxels are placed with ROOT's masks
        encoding = published_results.place_on_masks(_with_masks(root, encoding), root)
    return cortical_figures(root, encoding, meshes, surfaces, views, folder, kind, score)[0]


def _with_masks(root, encoding):
    """The subjects of ``encoding`` whose ROI masks are under ROOT (to place voxels on the cortex), else Missing."""
    kept = {s: r for s, r in encoding.items() if utils.roi_masks_dir(root, s).is_dir()}
    if not kept:
        raise Missing(f"no ROI masks of these subjects under {Path(root) / 'roi_masks'}: the cortical maps place each "
                      "voxel with the Algonauts 2023 roi_masks; put them there (README, Data)")
    return kept


def _cortical_key(root, table, encoding, meshes, folder):
    """The ROI key that goes with the cortical maps (drawn when they are), of the first subject with masks."""
    _require(table, "untuned")
    return cortical_key(root, min(_with_masks(root, encoding)), meshes, folder)[0]


def _cs_figure(transfer, group, rois, folder):
    frac = cs_matrix(transfer(), rois)
    if frac is None:
        raise Missing(f"no cl-tuned result of a {group} ROI present in every subject: make them with python "
                      "fit_encoding_models.py --method cl-tuned --protocol untuned-layer --model-subj Y --rois ...")
    name = "all ROIs" if group == "all" else f"{group} group"
    return plot_cs_matrix(frac, f"Avg. cross-subject voxel improvement fraction vs. untuned, {name}\n"
                                "CL model of the model subject on the evaluation subject, at the untuned layer;\n"
                                "mean over the ROI-hemispheres present in every subject",
                          folder / f"{group}_group_cs_avgs_picture")


def _cs_vs_pooled_figure(transfer, table, pooled, folder):
    pairs = cs_vs_pooled(transfer(), _require(table, pooled), pooled)
    if pairs.empty:
        raise Missing(f"no (subject, ROI) has both cross-subject cl-tuned and {pooled} results: fit both with "
                      f"python fit_encoding_models.py --method cl-tuned --model-subj Y / --method {pooled} (per-method protocol)")
    h = pooled.split("-")[1]
    return plot_pairs(pairs, "Cross Subject: voxels improved (%)", f"Pooled ({'Avg' if h == 'avg' else 'Constant'}): "
                      "voxels improved (%)", "Cross subject and pooled voxels improved over untuned (test r)\n"
                      "x: mean over the other subjects' CL models; per-method protocol", folder / f"cs_vs_pooled_{h}_scatterplot",
                      zero_lines=False, limits=(0, 100))[0]


def _mi_size_figure(root, pooled, epochs, folder):
    h = pooled.split("-")[1]
    pairs = mi_pairs(root, pooled, epochs)
    paths = plot_mi_by_size(mi_by_size(root, pairs), pooled, folder / f"lower_bound_mi_estimates_specific_vs_pooled_h{h}")
    return paths + plot_pairs(pairs, "subject-specific CL model: MI bound (bits)", f"{pooled}: MI bound (bits)",
                              f"InfoNCE MI lower bound on the test split, subject-specific vs pooled (h-{h})",
                              folder / f"mi_specific_vs_pooled_h{h}_pairs", zero_lines=False)[0]
