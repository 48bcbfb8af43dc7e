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

Outputs under ROOT/encoding_results/nod/: sub-XX/sub-XX_<hemi>_<area>_<method>.joblib
(written after each one; reruns skip them unless --overwrite, and refuse results made
with another ZSCORE or HEMISPHERE_CONVENTION), summary.csv and the
figure nod_transfer.png / .pdf (mean test r per area and method across subjects).
"""

import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import encoding
import models
import nod_utils
import utils

# --- Options ---
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
CL_EPOCHS = 30  # epochs in the cl-tuned checkpoint names
REG_EPOCHS = 75  # epochs in the reg-tuned checkpoint names
POOLED_EPOCHS = 30  # epochs in the pooled checkpoint names
WEIGHTS = "imagenet"  # AlexNet weights of the untuned method: imagenet, none (seeded random) or a path
SEED = 0  # seed of the random AlexNet when WEIGHTS is none
ALPHAS = [0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7]  # ridge penalties
N_COMPONENTS = 1000  # PCA components (at most the fold's train size and the layer size)
N_FOLDS = 5  # cross-validation folds inside the train split
IMAGE_SIZE = 224  # images are squash-resized to IMAGE_SIZE x IMAGE_SIZE
BATCH_SIZE = 256  # images per forward pass
DEVICE = "auto"  # auto, cpu or cuda
OVERWRITE = False  # recompute results that exist
# ---
CHOICES = {"ROIS": nod_utils.NOD_ROIS, "HEMISPHERES": utils.HEMISPHERE_NAMES,
           "HEMISPHERE_CONVENTION": nod_utils.HEMISPHERE_CONVENTIONS, "ZSCORE": nod_utils.ZSCORES,
           "METHODS": utils.METHODS, "NSD_STREAM": list(nod_utils.NSD_ROI)}
# The NSD models are read from --root, which need not hold the NSD data (roi_masks).
RANGES = {"SUBJECTS": utils.at_least(1), "SESSIONS": utils.at_least(1), "RUNS": utils.at_least(1),
          "N_VOXELS": utils.at_least(1), "MODEL_SUBJ": utils.between(1, utils.N_SUBJECTS),
          "CL_EPOCHS": utils.at_least(1), "REG_EPOCHS": utils.at_least(1), "POOLED_EPOCHS": utils.at_least(1),
          "SEED": utils.at_least(0), "ALPHAS": utils.ALPHA_GRID, "N_COMPONENTS": utils.at_least(1),
          "N_FOLDS": utils.at_least(2), "IMAGE_SIZE": utils.ALEXNET_INPUT, "BATCH_SIZE": utils.at_least(1)}


def output_dir(root):
    return Path(root) / "encoding_results" / "nod"


def result_path(root, subj, hemisphere, roi, method):
    sub = nod_utils.sub_name(subj)
    return output_dir(root) / sub / f"{sub}_{utils.hemi_code(hemisphere)}_{roi}_{method}.joblib"


def method_epochs(opts, method):
    return {"untuned": 0, "cl-tuned": opts.CL_EPOCHS, "reg-tuned": opts.REG_EPOCHS}.get(method, opts.POOLED_EPOCHS)


def settings(opts):
    """The options that change the data a result was fitted on (recorded in each result)."""
    return {"zscore": opts.ZSCORE, "hemisphere_convention": opts.HEMISPHERE_CONVENTION}


def pending(opts, subj, hemi, roi, method):
    """Whether a result must be fitted; an existing one made with other settings is an error."""
    import joblib
    path = result_path(opts.ROOT, subj, hemi, roi, method)
    if opts.OVERWRITE or not path.exists():
        return True
    saved = joblib.load(path)
    made = {k: saved.get(k) for k in settings(opts)}
    if made != settings(opts):
        raise utils.UserError(f"{path} was made with {made}, not {settings(opts)}: rerun with --overwrite, or "
                              "write these settings under another --root")
    return False


def summary_table(root):
    """One row per saved result: subject, hemisphere, area, method, best layer, mean CV r,
    mean test r and % of vertices whose test r beats untuned (NaN without an untuned result)."""
    import joblib
    import pandas as pd
    results = {}
    for path in sorted(output_dir(root).glob("sub-*/sub-*_*.joblib")):
        r = joblib.load(path)
        results[r["subject"], r["hemisphere"], r["roi"], r["method"]] = r
    rows = []
    for (subj, hemi, roi, method), r in sorted(results.items(), key=lambda kv: (
            kv[0][0], kv[0][1], nod_utils.NOD_ROIS.index(kv[0][2]), utils.METHODS.index(kv[0][3]))):
        base = results.get((subj, hemi, roi, "untuned"))
        improved = np.nan if base is None else 100 * float(np.mean(r["test_r"] > base["test_r"]))
        rows.append({"subject": subj, "hemisphere": hemi, "roi": roi, "method": method,
                     "nsd_roi": r["nsd_roi"], "model_subj": r["model_subj"], "n_voxels": len(r["vertices"]),
                     "zscore": r.get("zscore"), "hemisphere_convention": r.get("hemisphere_convention"),
                     "best_layer": r["best_layer"], "mean_cv_r": float(np.mean(r["cv_r"])),
                     "mean_test_r": float(np.mean(r["test_r"])), "pct_improved_over_untuned": improved})
    return pd.DataFrame(rows)


def plot_summary(table, path):
    """Mean test r per area and method across subjects (bars, SEM), one panel per hemisphere; PNG and PDF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    for suffix in (".png", ".pdf"):
        with utils.atomic_path(Path(path).with_suffix(suffix)) as tmp:
            fig.savefig(tmp, dpi=150)
    plt.close(fig)


def fit_method(opts, data, folds, device, subj, hemi, method, todo, cache):
    """Fit every area in ``todo`` with one method's features, extracting each AlexNet's features once.

    ``cache`` holds the last features as {key: features}; the untuned ones serve every
    area and hemisphere, a tuned model's only its own NSD ROI and hemisphere.
    """
    streams = nod_utils.NSD_ROI[opts.NSD_STREAM]
    for roi in todo:
        nsd_roi = streams[roi]
        alexnet, meta = models.load_feature_alexnet(opts.ROOT, method, opts.MODEL_SUBJ, hemi, nsd_roi,
                                                    method_epochs(opts, method), opts.WEIGHTS, device, opts.SEED)
        key = (method,) if method == "untuned" else (method, hemi, nsd_roi)
        if key not in cache:
            cache.clear()
            cache[key] = encoding.layer_features(alexnet, data.images, device, opts.BATCH_SIZE)
        vertices, fmri = data.roi_fmri(roi, hemi, opts.N_VOXELS)
        result = encoding.encode_roi(cache[key], fmri, data.train, data.test, folds, opts.ALPHAS,
                                     opts.N_COMPONENTS, device=device)
        if result["n_constant"]:
            tqdm.write(f"warning: {roi}: {result['n_constant']} constant vertex(es) on the training split; "
                       "their r is set to 0")
        result.update(subject=subj, hemisphere=hemi, roi=roi, method=method, nsd_roi=nsd_roi,
                      model_subj=opts.MODEL_SUBJ if method in ("cl-tuned", "reg-tuned") else None,
                      vertices=vertices, weights=opts.WEIGHTS if meta is None else meta.get("weights"),
                      **settings(opts))
        utils.atomic_joblib_dump(result, result_path(opts.ROOT, subj, hemi, roi, method))
        print(f"{nod_utils.sub_name(subj)} {hemi} {roi} {method}: best layer {result['best_layer']}, "
              f"mean CV r {np.mean(result['cv_r']):.3f}, mean test r {np.mean(result['test_r']):.3f}")


@utils.cli
def main(argv=None):
    opts = utils.parse_options(sys.modules[__name__], argv)
    hemis = [utils.hemi_code(h) for h in opts.HEMISPHERES]
    device = utils.resolve_device(opts.DEVICE)
    utils.check_writable(output_dir(opts.ROOT), utils.cache_dir(opts.ROOT))
    for subj in tqdm(opts.SUBJECTS, desc="NOD subjects"):
        jobs = {(method, hemi): [roi for roi in opts.ROIS if pending(opts, subj, hemi, roi, method)]
                for method in opts.METHODS for hemi in hemis}
        if not any(jobs.values()):
            print(f"{nod_utils.sub_name(subj)}: all results exist, skipped (use --overwrite)")
            continue
        data = nod_utils.NODSubjectData(opts.ROOT, subj, opts.NOD_ROOT, opts.SESSIONS, opts.RUNS, opts.IMAGE_SIZE,
                                        opts.ZSCORE, opts.HEMISPHERE_CONVENTION)
        folds, cache = utils.cv_folds(data.train, opts.N_FOLDS), {}
        for (method, hemi), todo in jobs.items():
            if todo:
                fit_method(opts, data, folds, device, subj, hemi, method, todo, cache)
    table = summary_table(opts.ROOT)
    if not table.empty:
        other = (table["zscore"] != opts.ZSCORE) | (table["hemisphere_convention"] != opts.HEMISPHERE_CONVENTION)
        if other.any():
            print(f"{int(other.sum())} result(s) under {output_dir(opts.ROOT)} made with other ZSCORE or "
                  "HEMISPHERE_CONVENTION settings are left out of the summary")
        table = table[~other].reset_index(drop=True)
    if table.empty:
        raise utils.UserError(f"no NOD results under {output_dir(opts.ROOT)}: check SUBJECTS and METHODS")
    utils.atomic_write_text(table.to_csv(index=False), output_dir(opts.ROOT) / "summary.csv")
    plot_summary(table, output_dir(opts.ROOT) / "nod_transfer.png")
    print(table.groupby(["hemisphere", "roi", "method"], sort=False)[["mean_cv_r", "mean_test_r"]].mean().round(3))
    return table


if __name__ == "__main__":
    main()
