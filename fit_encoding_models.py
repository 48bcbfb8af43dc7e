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
With --transfer-matrix nothing is fitted: the model-subject x target-subject matrices of
METHOD (mean test r, fraction of target voxels improved over untuned) are built from the
results that exist, as ROOT/encoding_results/transfer_<method>_<hemi>*.csv and .png/.pdf.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import encoding
import models
import utils

# --- Options ---
METHOD = "untuned"  # feature extractor: untuned, cl-tuned, reg-tuned, pooled-avg or pooled-const
SUBJ = 1  # subject whose fMRI is predicted
MODEL_SUBJ = None  # subject whose cl-/reg-tuned model extracts the features (None: SUBJ; another: transfer)
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
CL_EPOCHS = 30  # epochs in the cl-tuned checkpoint names
REG_EPOCHS = 75  # epochs in the reg-tuned checkpoint names
POOLED_EPOCHS = 30  # epochs in the pooled checkpoint names
BATCH_SIZE = 128  # images per forward pass
MIN_VOXELS = 20  # ROIs with fewer voxels are skipped and recorded as absent
OVERWRITE = False  # recompute ROIs whose results exist
TRANSFER_MATRIX = False  # only build the model-subject x target-subject matrices from existing results
# ---

PROTOCOLS = ("per-method", "untuned-layer")
TRANSFER_METHODS = ("cl-tuned", "reg-tuned")


def method_tag(method, subj, model_subj, protocol):
    """Folder name of a method's results: method [+ _from-SubjY] [+ _untuned-layer]."""
    tag = method
    if model_subj is not None and int(model_subj) != int(subj):
        tag += f"_from-{utils.subj_dir(model_subj)}"
    if protocol == "untuned-layer" and method != "untuned":
        tag += "_untuned-layer"
    return tag


def result_path(root, subj, tag, hemisphere, roi):
    """The .npz of one ROI; its .json (written last) marks it complete."""
    return utils.encoding_dir(root, subj) / tag / f"{utils.hemi_code(hemisphere)}_{roi}.npz"


def load_result(path):
    """One ROI's result: the JSON fields plus the arrays of the .npz (voxels, alphas, cv_r, test_r, ...)."""
    path = Path(path)
    out = json.loads(path.with_suffix(".json").read_text())
    with np.load(path) as f:
        out.update({k: f[k] for k in f.files})
    return out


def save_result(result, path):
    arrays = {k: np.asarray(result[k]) for k in ("voxels", "alphas", "alpha_index", "cv_r", "test_r")}
    with utils.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    utils.atomic_json_dump({k: v for k, v in result.items() if k not in arrays}, Path(path).with_suffix(".json"))


def check_options(opts):
    if opts.METHOD not in utils.METHODS:
        raise utils.UserError(f"unknown METHOD {opts.METHOD!r}: use one of {', '.join(utils.METHODS)}")
    if opts.PROTOCOL not in PROTOCOLS:
        raise utils.UserError(f"unknown PROTOCOL {opts.PROTOCOL!r}: use per-method or untuned-layer")
    for roi in opts.ROIS:
        utils.check_roi(roi)
    if list(opts.ALPHAS) != sorted(set(opts.ALPHAS)):
        raise utils.UserError(f"ALPHAS {opts.ALPHAS} must be strictly ascending: sort them")
    transfer = opts.MODEL_SUBJ is not None and int(opts.MODEL_SUBJ) != int(opts.SUBJ)
    if transfer and opts.METHOD not in TRANSFER_METHODS:
        raise utils.UserError(f"MODEL_SUBJ {opts.MODEL_SUBJ} is for cl-tuned or reg-tuned models only "
                              f"({opts.METHOD} is not tuned on one subject): drop --model-subj")


def method_epochs(opts, method):
    return {"untuned": 0, "cl-tuned": opts.CL_EPOCHS, "reg-tuned": opts.REG_EPOCHS}.get(method, opts.POOLED_EPOCHS)


def untuned_choice(root, subj, hemisphere, roi, voxels, alphas):
    """(best layer, per-voxel alpha index) chosen on the untuned network for the untuned-layer protocol."""
    path = result_path(root, subj, "untuned", hemisphere, roi)
    if not path.with_suffix(".json").is_file():
        raise utils.UserError(f"no untuned result at {path}: run python fit_encoding_models.py --method untuned "
                              f"--subj {subj} --hemisphere {utils.hemi_code(hemisphere)} --rois {roi} first")
    base = load_result(path)
    if not np.array_equal(base["voxels"], voxels) or base["alpha_grid"] != list(alphas):
        raise utils.UserError(f"untuned result {path} was fitted on other voxels or ALPHAS: "
                              "re-run the untuned method with --overwrite")
    return base["best_layer"], base["alpha_index"]


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

def collect_results(root, subj):
    """Every complete ROI result of a subject: dict (tag, hemisphere, roi) -> result."""
    out = {}
    for js in sorted(utils.encoding_dir(root, subj).glob("*/*.json")):
        npz = js.with_suffix(".npz")
        if npz.is_file():
            r = load_result(npz)
            out[js.parent.name, r["hemisphere"], r["roi"]] = r
    return out


def beats_untuned(result, untuned):
    """% of voxels whose test r beats the untuned one (NaN without a matching untuned result)."""
    if untuned is None or result["method"] == "untuned" or not np.array_equal(result["voxels"], untuned["voxels"]):
        return np.nan
    return 100 * float(np.mean(result["test_r"] > untuned["test_r"]))


def _save_figure(fig, path):
    """Save ``fig`` as PNG and PDF and close it; returns it (its artists stay inspectable)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    for suffix in (".png", ".pdf"):
        with utils.atomic_path(Path(path).with_suffix(suffix)) as tmp:
            fig.savefig(tmp, dpi=150, format=suffix[1:])
    plt.close(fig)
    return fig


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _roi_order(key):
    return utils.ROIS.index(key)


def plot_layer_scores(table, path):
    """ROI x layer heatmap of the CV scores with the best layer of each ROI boxed."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    scores = table[utils.LAYERS].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(utils.LAYERS), 1 + 0.3 * len(table)))
    im = ax.imshow(scores, aspect="auto", cmap="viridis")
    for i, best in enumerate(table["best_layer"]):
        ax.add_patch(Rectangle((utils.LAYERS.index(best) - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(utils.LAYERS)), utils.LAYERS, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), table["roi"])
    fig.colorbar(im, ax=ax, label="mean CV r")
    return _save_figure(fig, path)


def plot_methods(table, path):
    """Per ROI, one bar per method: mean test r."""
    plt = _pyplot()
    tags = list(dict.fromkeys(table["tag"]))
    rois = sorted(set(table["roi"]), key=_roi_order)
    width = 0.8 / len(tags)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(rois) * max(1, len(tags) / 2), 3.5))
    for k, tag in enumerate(tags):
        sub = table[table["tag"] == tag].set_index("roi").reindex(rois)
        ax.bar(np.arange(len(rois)) + (k - (len(tags) - 1) / 2) * width, sub["mean_test_r"], width, label=tag)
    ax.set_xticks(range(len(rois)), rois, rotation=45, ha="right")
    ax.set_ylabel("mean test r")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    return _save_figure(fig, path)


def plot_scatter(x, y, label, path):
    """Per-voxel test r of a method (y) against untuned (x), with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x, y, s=3, alpha=0.5)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("untuned test r")
    ax.set_ylabel(f"{label} test r")
    ax.set_title(f"{100 * np.mean(y > x):.1f}% of voxels above the line")
    return _save_figure(fig, path)


def write_summaries(root, subj):
    """Regenerate the subject's summary tables and figures from every result that exists.

    Returns
    -------
    methods : DataFrame, one row per (tag, hemisphere, ROI), as written to methods.csv.
    """
    out_dir = utils.encoding_dir(root, subj)
    results = collect_results(root, subj)
    rows = []
    for (tag, hemi, roi), r in sorted(results.items(), key=lambda kv: (kv[0][1], _roi_order(kv[0][2]), kv[0][0])):
        untuned = results.get(("untuned", hemi, roi))
        rows.append({"tag": tag, "method": r["method"], "model_subj": r["model_subj"], "protocol": r["protocol"],
                     "hemisphere": hemi, "roi": roi, "n_voxels": len(r["voxels"]), "best_layer": r["best_layer"],
                     "mean_cv_r": float(np.mean(r["cv_r"])), "mean_test_r": float(np.mean(r["test_r"])),
                     "pct_beats_untuned": beats_untuned(r, untuned),
                     **{layer: r["layer_scores"][layer] for layer in utils.LAYERS}})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    methods = table.drop(columns=utils.LAYERS)
    utils.atomic_write_text(methods.to_csv(index=False), out_dir / "methods.csv")
    for tag, sub in table.groupby("tag", sort=False):
        cols = ["hemisphere", "roi"] + utils.LAYERS + ["best_layer"]
        utils.atomic_write_text(sub[cols].to_csv(index=False), out_dir / tag / "layer_scores.csv")
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
    return methods


def transfer_matrices(root, method, hemisphere, rois):
    """Model-subject x target-subject matrices of ``method`` from the results that exist.

    Entry (A, B) pools the voxels of every ROI in ``rois`` fitted on target B with the model
    of subject A (A == B: the subject's own model). 'mean_r' is their mean test r;
    'frac_improved' the fraction of them whose test r beats B's untuned result (ROIs
    without an untuned result are left out of it).

    Returns
    -------
    long : DataFrame, one row per (ROI, model subject, target subject).
    mean_r, frac_improved : DataFrames indexed by model subject, columns target subject.
    """
    hemi = utils.hemi_code(hemisphere)
    rows = []
    for target in utils.find_subjects(root):
        for roi in rois:
            base = result_path(root, target, "untuned", hemi, roi)
            untuned = load_result(base) if base.with_suffix(".json").is_file() else None
            for model_subj in utils.find_subjects(root):
                path = result_path(root, target, method_tag(method, target, model_subj, "per-method"), hemi, roi)
                if not path.with_suffix(".json").is_file():
                    continue
                r = load_result(path)
                improved = (r["test_r"] > untuned["test_r"] if untuned is not None
                            and np.array_equal(untuned["voxels"], r["voxels"]) else None)
                rows.append({"roi": roi, "model_subj": model_subj, "target_subj": target,
                             "n_voxels": len(r["voxels"]), "sum_r": float(r["test_r"].sum()),
                             "n_compared": 0 if improved is None else len(improved),
                             "n_improved": 0 if improved is None else int(improved.sum())})
    long = pd.DataFrame(rows, columns=["roi", "model_subj", "target_subj", "n_voxels", "sum_r",
                                       "n_compared", "n_improved"])
    pooled = long.groupby(["model_subj", "target_subj"])[["n_voxels", "sum_r", "n_compared", "n_improved"]].sum()
    mean_r = (pooled["sum_r"] / pooled["n_voxels"]).unstack("target_subj")
    frac = (pooled["n_improved"] / pooled["n_compared"].where(pooled["n_compared"] > 0)).unstack("target_subj")
    long = long.assign(mean_test_r=long["sum_r"] / long["n_voxels"],
                       frac_improved=long["n_improved"] / long["n_compared"].where(long["n_compared"] > 0))
    return long.drop(columns=["sum_r"]), mean_r, frac


def plot_transfer(mean_r, frac, title, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, m, label in zip(axes, (mean_r, frac), ("mean test r", "fraction improved over untuned")):
        im = ax.imshow(m.to_numpy(dtype=float), cmap="viridis")
        ax.set_xticks(range(m.shape[1]), [utils.subj_dir(s) for s in m.columns], rotation=45)
        ax.set_yticks(range(m.shape[0]), [utils.subj_dir(s) for s in m.index])
        ax.set_xlabel("target subject")
        ax.set_ylabel("model subject")
        ax.set_title(f"{title}: {label}", fontsize=9)
        fig.colorbar(im, ax=ax)
    return _save_figure(fig, path)


def run_transfer_matrix(opts):
    if opts.METHOD not in TRANSFER_METHODS:
        raise utils.UserError(f"--transfer-matrix needs a subject-specific method, not {opts.METHOD!r}: "
                              "use --method cl-tuned or reg-tuned")
    hemi = utils.hemi_code(opts.HEMISPHERE)
    long, mean_r, frac = transfer_matrices(opts.ROOT, opts.METHOD, hemi, opts.ROIS)
    if long.empty:
        raise utils.UserError(f"no {opts.METHOD} results under {Path(opts.ROOT) / 'encoding_results'}: "
                              "fit some first (with --model-subj for transfer)")
    base = Path(opts.ROOT) / "encoding_results" / f"transfer_{opts.METHOD}_{hemi}"
    utils.atomic_write_text(long.to_csv(index=False), f"{base}.csv")
    utils.atomic_write_text(mean_r.to_csv(), f"{base}_mean_r.csv")
    utils.atomic_write_text(frac.to_csv(), f"{base}_frac_improved.csv")
    plot_transfer(mean_r, frac, f"{opts.METHOD} {hemi}", f"{base}.png")
    print(f"mean test r (rows: model subject, columns: target subject)\n{mean_r.round(3)}")
    return long, mean_r, frac


# --- Fitting ---------------------------------------------------------------------------

def pending_rois(opts, root, subj, hemi, tag):
    """The ROIs still to fit, as (roi, voxels, result path); absent and finished ones are skipped with a line."""
    pending = []
    for roi in opts.ROIS:
        voxels = utils.roi_voxel_indices(root, subj, hemi, roi)
        path = result_path(root, subj, tag, hemi, roi)
        if len(voxels) < opts.MIN_VOXELS:
            tqdm.write(f"skip {roi}: {len(voxels)} voxels in {hemi} of {utils.subj_dir(subj)} "
                       f"(fewer than MIN_VOXELS={opts.MIN_VOXELS}); recorded as absent")
            record_absent(root, subj, hemi, roi, len(voxels))
        elif path.with_suffix(".json").is_file() and not opts.OVERWRITE:
            tqdm.write(f"skip {roi}: {path} exists (use --overwrite to refit)")
        else:
            pending.append((roi, voxels, path))
    return pending


@utils.cli
def main(argv=None):
    opts = utils.parse_options(sys.modules[__name__], argv)
    check_options(opts)
    if opts.TRANSFER_MATRIX:
        return run_transfer_matrix(opts)
    root, subj, method, hemi = opts.ROOT, int(opts.SUBJ), opts.METHOD, utils.hemi_code(opts.HEMISPHERE)
    model_subj = subj if opts.MODEL_SUBJ is None else int(opts.MODEL_SUBJ)
    tag = method_tag(method, subj, model_subj, opts.PROTOCOL)
    device = utils.resolve_device(opts.DEVICE)
    timer = encoding.StageTimer(device)
    with timer("cache"):
        n_images = len(utils.subject_images(root, subj, opts.IMAGE_SIZE))
    train, test = utils.train_test_split(n_images)
    folds = utils.cv_folds(train, opts.N_FOLDS)
    pending = pending_rois(opts, root, subj, hemi, tag)
    written = {roi: None for roi in opts.ROIS}
    # The untuned network's features are the same for every ROI: one pass serves them all.
    # A tuned network belongs to one ROI: one pass each.
    passes = [pending] if method == "untuned" and pending else [[item] for item in pending]
    epochs = method_epochs(opts, method)
    for group in tqdm(passes, desc=f"{utils.subj_dir(subj)} {hemi} {tag}", disable=len(passes) < 2):
        voxels = np.unique(np.concatenate([v for _, v, _ in group]))
        fmri = utils.load_fmri(root, subj, hemi, voxels)
        utils.check_counts(n_images, fmri, str(utils.fmri_path(root, subj, hemi)))
        columns = {roi: np.searchsorted(voxels, v) for roi, v, _ in group}
        fixed = None
        if opts.PROTOCOL == "untuned-layer" and method != "untuned":
            fixed = {roi: untuned_choice(root, subj, hemi, roi, v, opts.ALPHAS) for roi, v, _ in group}
        alexnet, meta = models.load_feature_alexnet(root, method, model_subj, hemi, group[0][0], epochs,
                                                    opts.WEIGHTS, device, opts.SEED)
        images = utils.subject_images(root, subj, opts.IMAGE_SIZE)
        with encoding.FeatureSpill(alexnet, images, utils.cache_dir(root), device, opts.BATCH_SIZE,
                                   timer=timer) as spill:
            del images, alexnet  # the cache's pages and the network are not needed past the forward pass
            results = encoding.encode_rois(spill.layers(device), fmri, columns, train, test, folds, opts.ALPHAS,
                                           opts.N_COMPONENTS, fixed, device, timer=timer)
        for roi, roi_voxels, path in group:
            result = results[roi]
            if result["n_constant"]:
                tqdm.write(f"warning: {roi}: {result['n_constant']} constant voxel(s) on the training split; "
                           "their r is set to 0")
            result.update(
                method=method, subject=subj, model_subj=model_subj if method in TRANSFER_METHODS else None,
                hemisphere=hemi, roi=roi, protocol=opts.PROTOCOL, voxels=roi_voxels,
                alpha_grid=list(map(float, opts.ALPHAS)), n_components=opts.N_COMPONENTS, n_folds=opts.N_FOLDS,
                image_size=opts.IMAGE_SIZE, epochs=epochs,
                weights=opts.WEIGHTS if meta is None else meta.get("weights"),
                checkpoint=None if method == "untuned" else str(
                    utils.method_checkpoint_path(root, method, model_subj, hemi, roi, epochs)),
                mean_cv_r=float(np.mean(result["cv_r"])), mean_test_r=float(np.mean(result["test_r"])),
                code_version=utils.CODE_VERSION)
            with timer("write"):
                save_result(result, path)
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
