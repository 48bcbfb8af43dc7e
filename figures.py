"""Every figure, drawn from saved results: the scripts' figures, the paper's group figures, landscapes and cortical maps.

``save_figure`` writes each one (PNG and PDF, atomically). Everything here reads what the scripts saved (encoding results, voxel counts, MI bounds,
classification probes and predictions) and draws; nothing is fitted. ``paper_figures``
builds every figure that has its inputs and names, for each one that has not, the command
that makes them. ``generate_results.py --type paper-figures`` calls it.

ROI groups are the authors' (utils.ROI_GROUPS): 'early' the prf-visualrois class (V1v..hV4),
'higher' the floc classes, 'anatomical' the streams.

Cortical maps use nilearn's packaged fsaverage5 mesh (no download). fsaverage nests
fsaverage5: the first 10242 of fsaverage's 163842 vertices per hemisphere are fsaverage5's.
Challenge-space vertex i is fsaverage vertex ``np.flatnonzero(all-vertices mask)[i]``, so
the vertices below 10242 are drawn on fsaverage5, and all of them on a full fsaverage mesh.
"""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import encoding_results
import nod_utils
import results_utils as ru
import safe_io
import utils

GROUP_NAMES = {"early": "early visual (V1v..hV4)", "higher": "higher (floc ROIs)", "anatomical": "anatomical (streams)"}
FSAVERAGE5_VERTICES = 10242
SURFACES = ("inflated", "pial")
VIEWS = ("lateral", "medial", "ventral")
POOLED = ("pooled-avg", "pooled-const")
HEMI_NAMES = {"lh": "left hemisphere", "rh": "right hemisphere"}
# Categorical colours of methods, subjects and ROI groups (tab10 order).
METHOD_COLOURS = dict(zip(utils.METHODS + ["oracle"], ("#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "k")))
GROUP_COLOURS = {"early": "#ff7f0e", "higher": "#1f77b4", "anatomical": "#2ca02c"}
OVERLAP_NOTE = ("where a vertex lies in several ROIs, the value of the first ROI in canonical order "
                "(prf-visualrois, floc-bodies, -faces, -places, -words, then streams) is drawn")


class Missing(Exception):
    """A figure's inputs are absent; the message names the command that makes them."""


def paper_dir(root):
    return utils.results_dir(root) / "figures" / "paper"


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
        ax.set_xticks(range(t.shape[1]), t.columns, rotation=45)
        ax.set_yticks(range(len(t)), t.index)
        ax.set_title({"lh": "left hemisphere", "rh": "right hemisphere"}[h])
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
            ax.scatter(xy[idx, 0], xy[idx, 1], marker=marker, s=size, c="red" if special == "untuned" else "k",
                       edgecolors="k", zorder=3)
            legend.append(Line2D([], [], marker=marker, ls="", color="red" if special == "untuned" else "k",
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


def plot_layer_scores(table, path):
    """ROI x layer heatmap of the CV scores with the best layer of each ROI boxed; returns the figure."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    scores = table[utils.LAYERS].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(utils.LAYERS), 1 + 0.3 * len(table)))
    im = ax.imshow(scores, aspect="auto", cmap="viridis")
    for i, best in enumerate(table["best_layer"]):
        ax.add_patch(Rectangle((utils.LAYERS.index(best) - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(utils.LAYERS)), utils.LAYERS, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), table["roi"])
    fig.colorbar(im, ax=ax, label="mean CV r")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_methods(table, path):
    """Per ROI, one bar per method: mean test r."""
    plt = pyplot()
    tags = list(dict.fromkeys(table["tag"]))
    rois = sorted(set(table["roi"]), key=utils.ROIS.index)
    width = 0.8 / len(tags)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(rois) * max(1, len(tags) / 2), 3.5))
    for k, tag in enumerate(tags):
        sub = table[table["tag"] == tag].set_index("roi").reindex(rois)
        ax.bar(np.arange(len(rois)) + (k - (len(tags) - 1) / 2) * width, sub["mean_test_r"], width, label=tag)
    ax.set_xticks(range(len(rois)), rois, rotation=45, ha="right")
    ax.set_ylabel("mean test r")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_scatter(x, y, label, path):
    """Per-voxel test r of a method (y) against untuned (x), with the identity line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x, y, s=3, alpha=0.5)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("untuned test r")
    ax.set_ylabel(f"{label} test r")
    ax.set_title(f"{100 * np.mean(y > x):.1f}% of voxels above the line")
    fig.tight_layout()
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
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def summary_figures(root, subj, table, results):
    """The subject's figures of ``encoding_results.write_summaries``: per method tag and hemisphere the
    ROI x layer scores, per hemisphere the methods per ROI and, per tuned tag, its per-voxel test r
    against untuned."""
    out_dir = utils.encoding_dir(root, subj)
    for tag, sub in table.groupby("tag", sort=False):
        for hemi, part in sub.groupby("hemisphere"):
            plot_layer_scores(part, out_dir / tag / f"layer_scores_{hemi}.png")
    for hemi, part in table.groupby("hemisphere"):
        plot_methods(part, out_dir / f"methods_{hemi}.png")
        for tag in dict.fromkeys(part["tag"]):
            pairs = [(results["untuned", hemi, roi], results[tag, hemi, roi]) for roi in part["roi"].unique()
                     if tag != "untuned" and (tag, hemi, roi) in results and ("untuned", hemi, roi) in results]
            pairs = [(u, r) for u, r in pairs if np.array_equal(u["voxels"], r["voxels"])]
            if pairs:
                plot_scatter(np.concatenate([u["test_r"] for u, _ in pairs]),
                             np.concatenate([r["test_r"] for _, r in pairs]), tag,
                             out_dir / f"scatter_{tag}_vs_untuned_{hemi}.png")


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
            ax.bar(x, stats["mean"], width, yerr=stats["sem"].fillna(0), label=method, capsize=2)
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

    Writes results/figures/salience_<dataset>_[subjX_]<roi>_<method>_e<E>_img<i>.png/.pdf; returns the paths.
    """
    who = "" if method.startswith("pooled") else f"subj{int(subj)}_"
    stem = utils.results_dir(root) / "figures" / f"salience_{dataset}_{who}{roi}_{method}_e{int(epochs)}_img{image_index}"
    return plot_salience(maps.image, maps.cams, maps.titles, stem,
                         f"Grad-CAM at features.12 for the true class: {maps.class_name}")


# --- Tables from the saved results -----------------------------------------------------

def load_encoding(root, subjects=None):
    """{subject: collect_results dict} of the subjects with encoding results (own model, per-method protocol)."""
    out = {}
    for subj in subjects or utils.find_subjects(root):
        results = {k: r for k, r in encoding_results.collect_results(root, subj).items() if k[0] in utils.METHODS}
        if results:
            out[int(subj)] = results
    return out


def encoding_table(encoding):
    """One row per (subject, hemisphere, ROI, method) of ``load_encoding``'s results.

    gain is the mean over the ROI's voxels of (test r of the method - test r of untuned),
    NaN without an untuned result on the same voxels.

    Returns
    -------
    DataFrame with subject, hemisphere, roi, group, method, n_voxels, best_layer, mean_test_r, gain.
    """
    rows = []
    for subj, results in encoding.items():
        for (method, hemi, roi), r in results.items():
            u = results.get(("untuned", hemi, roi))
            same = u is not None and np.array_equal(u["voxels"], r["voxels"])
            rows.append({"subject": subj, "hemisphere": hemi, "roi": roi, "group": utils.roi_group(roi),
                         "method": method, "n_voxels": len(r["voxels"]), "best_layer": r["best_layer"],
                         "mean_test_r": float(np.mean(r["test_r"])),
                         "gain": float(np.mean(r["test_r"] - u["test_r"])) if same else np.nan})
    return pd.DataFrame(rows, columns=["subject", "hemisphere", "roi", "group", "method", "n_voxels",
                                       "best_layer", "mean_test_r", "gain"]).astype({"mean_test_r": float, "gain": float})


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


def paired_gains(table, method_x, method_y):
    """Per (subject, hemisphere, ROI) with both methods' gains: columns x, y, group, roi, subject, hemisphere."""
    keys = ["subject", "hemisphere", "roi"]
    x = table[table["method"] == method_x].set_index(keys)["gain"]
    y = table[table["method"] == method_y].set_index(keys)["gain"]
    both = pd.concat({"x": x, "y": y}, axis=1, join="inner").dropna().reset_index()
    return both.assign(group=both["roi"].map(utils.roi_group))


def load_voxel_counts(root):
    path = utils.results_dir(root) / "voxel_counts.csv"
    if not path.is_file():
        raise Missing(f"no {path}: make it with python generate_results.py --type voxel-counts")
    return pd.read_csv(path)


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


# --- Group figures ---------------------------------------------------------------------

def _subject_columns(subjects):
    return [utils.subj_dir(s) for s in subjects]


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
    bar.set_label("best layer of the untuned AlexNet (5-fold CV r)")
    fig.suptitle("Best untuned AlexNet layer per ROI and subject (white: no result)")
    return save_figure(fig, stem), mats


def plot_presence(counts, stem):
    """ROI x subject voxel counts, one panel per hemisphere; absent ROIs (0 voxels) grey.

    Returns (paths, {hemisphere: DataFrame ROI x subject of counts}).
    """
    plt = pyplot()
    from matplotlib.colors import LogNorm
    subjects = sorted(counts["subject"].unique())
    mats = {h: part.pivot(index="roi", columns="subject", values="n_voxels").reindex(index=utils.ROIS, columns=subjects)
            for h, part in counts.groupby("hemisphere")}
    top = max(float(m.to_numpy().max()) for m in mats.values())
    cmap = plt.cm.viridis.with_extremes(bad="0.85")
    fig, axes = plt.subplots(1, len(mats), figsize=(3 + 1.2 * len(subjects) * len(mats), 1.5 + 0.28 * len(utils.ROIS)),
                             squeeze=False, layout="constrained")
    for ax, (h, m) in zip(axes[0], mats.items()):
        values = m.to_numpy(dtype=float)
        im = ax.imshow(np.where(values > 0, values, np.nan), cmap=cmap, norm=LogNorm(1, max(top, 10)), aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{int(v)}" if v > 0 else "absent", ha="center", va="center", fontsize=6,
                    color="k" if v <= 0 or v > top ** 0.6 else "w")
        ax.set_xticks(range(len(subjects)), _subject_columns(subjects), rotation=45)
        ax.set_yticks(range(len(m)), m.index)
        ax.set_title(HEMI_NAMES[h])
    fig.colorbar(im, ax=list(axes[0]), label="voxels (vertices) in the ROI, log scale")
    fig.suptitle("ROI presence and size per subject and hemisphere")
    return save_figure(fig, stem), mats


def plot_group_gains(stats, title, stem):
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
        ax.set_ylabel("gain in mean test r")
        ax.set_title(HEMI_NAMES[h], fontsize=9)
        ax.margins(y=0.15)
    handles = [plt.Rectangle((0, 0), 1, 1, color=GROUP_COLOURS[g]) for g in GROUP_NAMES]
    axes[0, 0].legend(handles, list(GROUP_NAMES.values()), fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, stem), stats


def plot_pairs(pairs, xlabel, ylabel, title, stem, zero_lines=True):
    """Scatter of one point per (subject, hemisphere, ROI), coloured by ROI group, with the identity line.

    Returns (paths, pairs).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    for g in GROUP_NAMES:
        part = pairs[pairs["group"] == g]
        if len(part):
            ax.scatter(part["x"], part["y"], s=18, color=GROUP_COLOURS[g], edgecolors="k", linewidths=0.3,
                       label=f"{GROUP_NAMES[g]} (n={len(part)})")
    lo = float(min(pairs["x"].min(), pairs["y"].min()))
    hi = float(max(pairs["x"].max(), pairs["y"].max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="y = x")
    if zero_lines:
        ax.axhline(0, color="0.6", lw=0.5)
        ax.axvline(0, color="0.6", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    above = int((pairs["y"] > pairs["x"]).sum())
    ax.set_title(f"{title}\n{above} of {len(pairs)} (subject, hemisphere, ROI) above y = x", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, stem), pairs


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
    """The k-th categorical colour (tab10, then tab20)."""
    plt = pyplot()
    colours = list(plt.cm.tab10.colors) + list(plt.cm.tab20.colors[1::2])
    return colours[k % len(colours)]


# --- Cortical maps ---------------------------------------------------------------------

def fsaverage_rows(root, subj, hemisphere):
    """fsaverage vertex (0..163841) of each challenge-space vertex, shape (n_vertices,)."""
    return np.flatnonzero(utils.load_label_file(utils.fsaverage_mask_path(root, subj, hemisphere)))


def to_mesh(values, rows, n_mesh):
    """Challenge-space values (n_vertices,) on a mesh of ``n_mesh`` fsaverage-nested vertices, NaN elsewhere.

    fsaverage5 (10242) keeps the vertices whose fsaverage index is below 10242; fsaverage keeps all.
    """
    out = np.full(n_mesh, np.nan)
    keep = rows < n_mesh
    out[rows[keep]] = values[keep]
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


def test_r_of(method):
    """``vertex_values`` value: (voxels, test r) of ``method``."""
    def value(results, hemi, roi):
        r = results.get((method, hemi, roi))
        return None if r is None else (r["voxels"], r["test_r"])
    return value


def gain_of(method):
    """``vertex_values`` value: (voxels, test r of ``method`` - test r of untuned) where both fitted the same voxels."""
    def value(results, hemi, roi):
        r, u = results.get((method, hemi, roi)), results.get(("untuned", hemi, roi))
        if r is None or u is None or not np.array_equal(r["voxels"], u["voxels"]):
            return None
        return r["voxels"], r["test_r"] - u["test_r"]
    return value


def winner_of(methods):
    """``vertex_values`` value: (voxels, index into ``methods`` of the highest test r) among the methods fitted on the ROI (two or more)."""
    def value(results, hemi, roi):
        fitted = [(k, results[m, hemi, roi]) for k, m in enumerate(methods) if (m, hemi, roi) in results]
        fitted = [(k, r) for k, r in fitted if np.array_equal(r["voxels"], fitted[0][1]["voxels"])]
        if len(fitted) < 2:
            return None
        scores = np.stack([r["test_r"] for _, r in fitted])
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


def subject_surface_maps(root, subj, results, n_mesh, value):
    """{hemi: (n_mesh,)} of ``vertex_values`` on the mesh, for the hemispheres with results."""
    out = {}
    for h in utils.HEMISPHERES:
        if any(k[1] == h for k in results):
            rows = fsaverage_rows(root, subj, h)
            out[h] = to_mesh(vertex_values(results, h, len(rows), value), rows, n_mesh)
    return out


def cortical_figures(root, encoding, meshes=None, surfaces=SURFACES, views=VIEWS, folder=None, kind="all"):
    """Per subject: test r of each method, gain of CL and pooled over untuned, the winning method; and the all-subjects CL-gain panel.

    ``meshes`` is ``load_meshes``'s result (default: fsaverage5). ``kind`` 'summary' draws only
    the CL gain and winner of each subject and the panel. Returns (paths, {name: maps drawn}).
    """
    meshes, n = meshes or load_meshes()
    folder = Path(folder or paper_dir(root)) / "cortical"
    surface = "fsaverage5" if n == FSAVERAGE5_VERTICES else "fsaverage"
    paths, drawn = [], {}
    for subj, results in encoding.items():
        fitted = {h: np.unique(np.concatenate([r["voxels"] for k, r in results.items() if k[1] == h]))
                  for h in utils.HEMISPHERES if any(k[1] == h for k in results)}
        shown = {h: int((fsaverage_rows(root, subj, h)[v] < n).sum()) for h, v in fitted.items()}
        where = (f"{', '.join(f'{h}: {shown[h]} of {len(v)}' for h, v in fitted.items())} fitted vertices lie on "
                 f"{surface} and are drawn; {OVERLAP_NOTE}")
        methods = [m for m in utils.METHODS if any(k[0] == m for k in results)]
        jobs = [(f"test_r_{m}", test_r_of(m), f"{utils.subj_dir(subj)}: test r of {m}", "test r (Pearson)", None)
                for m in methods if kind == "all"]
        jobs += [(f"gain_{m}", gain_of(m), f"{utils.subj_dir(subj)}: gain of {m} over untuned",
                  f"test r ({m}) - test r (untuned)", None) for m in ("cl-tuned",) + POOLED
                 if m in methods and (kind == "all" or m == "cl-tuned")]
        if len(methods) > 1:
            jobs.append(("cortical_results_single_subj", winner_of(methods),
                         f"{utils.subj_dir(subj)}: method with the highest test r", "best method",
                         {m: METHOD_COLOURS[m] for m in methods}))
        for name, value, title, label, categories in jobs:
            maps = subject_surface_maps(root, subj, results, n, value)
            if not any(np.isfinite(m).any() for m in maps.values()):
                continue
            stem = folder / f"subj{subj}_{name}"
            paths += plot_cortical_map(maps, meshes, title, label, stem, categories=categories, surfaces=surfaces,
                                       views=views, caption=where)
            drawn[stem.name] = maps
    panel = [(utils.subj_dir(s), subject_surface_maps(root, s, r, n, gain_of("cl-tuned"))) for s, r in encoding.items()]
    panel = [(s, m) for s, m in panel if any(np.isfinite(v).any() for v in m.values())]
    if panel:
        hemis = set.intersection(*(set(m) for _, m in panel))
        panel = [(s, {h: m[h] for h in sorted(hemis)}) for s, m in panel]
        stem = folder / "all_subjects_panel"
        paths += plot_cortical_map(panel, meshes, "gain of cl-tuned over untuned, all subjects (inflated)",
                                   "test r (cl-tuned) - test r (untuned)", stem, views=views,
                                   caption=f"the fitted vertices that lie on {surface} are drawn; {OVERLAP_NOTE}")
        drawn[stem.name] = dict(panel)
    return paths, drawn


# --- Everything ------------------------------------------------------------------------

def paper_figures(root, epochs=utils.DEFAULT_EPOCHS["cl-tuned"], mesh="fsaverage5", subjects=None, surfaces=SURFACES, views=VIEWS, maps="all"):
    """Every paper figure whose inputs exist, under results/figures/paper/.

    ``maps``: 'all' cortical maps, 'summary' (per subject the CL gain and the winning method,
    and the all-subjects panel) or 'none'.

    Returns
    -------
    paths : list of written files (PNG and PDF).
    skipped : list of one-line messages, each naming a skipped figure and the command that makes its inputs.
    """
    if maps not in utils.CORTICAL_MAPS:
        raise safe_io.UserError(f"unknown maps {maps!r}: use all, summary or none")
    folder = paper_dir(root)
    meshes = load_meshes(mesh) if maps != "none" else None  # a bad mesh folder fails before any figure is drawn
    encoding = load_encoding(root, subjects)
    table = encoding_table(encoding)
    paths, skipped = [], []

    def attempt(name, make, *args):
        try:
            paths.extend(make(*args))
        except Missing as e:
            skipped.append(f"skip {name}: {e}")

    attempt("best_untuned_layers_matrix", lambda: plot_best_layers(table, folder / "best_untuned_layers_matrix")[0])
    attempt("roi_subj_presence_table", lambda: plot_presence(load_voxel_counts(root), folder / "roi_subj_presence_table")[0])
    for group in ("all", "early", "higher"):
        attempt(f"{group}_group_cs_avgs_picture", _group_figure, table, group, utils.ROI_GROUPS[group], folder)
    for pooled in POOLED:
        h = pooled.split("-")[1]
        attempt(f"cs_vs_pooled_{h}_scatterplot", _pooled_gain_figure, table, pooled, folder)
        attempt(f"lower_bound_mi_estimates_specific_vs_pooled_h{h}", lambda pooled=pooled, h=h: plot_pairs(
            mi_pairs(root, pooled, epochs), "subject-specific CL model: MI bound (bits)", f"{pooled}: MI bound (bits)",
            f"InfoNCE MI lower bound on the test split, subject-specific vs pooled (h-{h})",
            folder / f"lower_bound_mi_estimates_specific_vs_pooled_h{h}", zero_lines=False)[0])
    attempt("mi_lower_bound_matrix", _mi_matrix, root, epochs, folder)
    for dataset in utils.CLASSIFICATION_DATASETS:
        attempt(f"{dataset}_results_matrix", _classification_matrix, root, dataset, epochs, folder)
        attempt(f"{dataset} landscapes", landscape_figures, root, dataset, folder)
    if maps != "none":
        attempt("cortical maps", _cortical_maps, root, table, encoding, meshes, surfaces, views, folder, maps)
    return paths, skipped


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


def _cortical_maps(root, table, encoding, meshes, surfaces, views, folder, kind):
    _require(table, "untuned")
    return cortical_figures(root, encoding, meshes, surfaces, views, folder, kind)[0]


def _group_figure(table, group, rois, folder):
    stats = group_gains(_require(table, "cl-tuned"), "cl-tuned", rois)
    if stats.empty:
        raise Missing(f"no cl-tuned result of a {group} ROI: make them with python fit_encoding_models.py "
                      "--method cl-tuned --rois ...")
    where = "all" if group == "all" else GROUP_NAMES[group]
    return plot_group_gains(stats, f"Subject-specific CL gain over untuned, {where} ROIs\n"
                                   "mean over the subjects with the ROI (n), SEM error bars",
                            folder / f"{group}_group_cs_avgs_picture")[0]


def _pooled_gain_figure(table, pooled, folder):
    pairs = paired_gains(_require(_require(table, "cl-tuned"), pooled), "cl-tuned", pooled)
    if pairs.empty:
        raise Missing(f"no (subject, ROI) has both cl-tuned and {pooled} results: fit both with "
                      f"python fit_encoding_models.py --method cl-tuned / --method {pooled} on the same ROIs")
    h = pooled.split("-")[1]
    return plot_pairs(pairs, "CL (subject-specific) gain in mean test r", f"{pooled} gain in mean test r",
                      f"Gain over untuned: subject-specific CL vs pooled (h-{h})",
                      folder / f"cs_vs_pooled_{h}_scatterplot")[0]


def _mi_matrix(root, epochs, folder):
    mi = _mi(root, "cl-tuned", epochs)
    return plot_roi_heatmaps({h: t for h, (t, _) in mi.items()}, {h: u for h, (_, u) in mi.items()},
                                "InfoNCE MI lower bound (bits, post-hoc temperature), subject-specific CL models",
                                "bits", folder / "mi_lower_bound_matrix")


def _classification_matrix(root, dataset, epochs, folder):
    try:
        tables, untuned = ru.classification_tables(root, dataset, "cl-tuned", epochs)
    except safe_io.UserError:
        raise Missing(f"no cl-tuned {dataset} probes (e{int(epochs)}): make them with python generate_results.py "
                      f"--type classification-task --dataset {dataset} --subjects 1 2 3 4 5 6 7 8") from None
    return plot_roi_heatmaps(tables, {h: untuned for h in tables},
                                f"{dataset} classification accuracy (fc7 probe), CL models (untuned: {untuned:.3f})",
                                "accuracy", folder / f"{dataset}_results_matrix")
