"""Benchmark the encoding pipeline against the straightforward reference protocol.

On one ROI of a synthetic subject (written on first use) and a seeded random AlexNet:
- project: one forward pass through all eight layers (encoding.layer_features), then
  encoding.encode_roi (PCA + ridge for all alphas in torch, vectorised r);
- reference: for every layer and fold, the fold's images passed through AlexNet again up to
  that layer, sklearn PCA(svd_solver='full'), one sklearn Ridge per alpha and a scipy
  pearsonr loop over voxels; the same per-voxel alpha choice (ties to the larger alpha),
  then a refit on the training split at the best layer (features extracted again).
Each runs in its own process, which reports its wall time and peak resident memory
(ru_maxrss). Reported: the speed ratio, both peak memories, the largest |difference in
mean r| per layer (and of the test r), and how the project's time grows with the number of
images and of voxels. The 'precision' part runs the engine on the same features in both
precisions (utils.ENGINE_PRECISIONS), fp64 then mixed, for each of PRECISION_COMPONENTS,
and reports side by side the PCA stage and whole-ROI times, their ratios and the largest
per-voxel differences of CV r and test r. Writes benchmarks/output/bench_encoding.json.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import encoding  # noqa: E402
import synthetic_data  # noqa: E402
import options  # noqa: E402
import safe_io  # noqa: E402
import utils  # noqa: E402

# --- Options ---
ROOT = "benchmarks/output/synthetic_encoding"  # dataset folder (written if missing)
N_DATASET = 2000  # images of the synthetic subject (the largest size timed)
PNG_SIZE = 224  # side of the PNG files
IMAGE_SIZE = 128  # side the images are resized to (224 is the protocol; 128 keeps the reference run short on a CPU)
N_IMAGES = 250  # images of the project-vs-reference comparison (the first rows of the subject)
ROI = "EBA"  # ROI of the comparison (lh of Subj1)
SCALE_IMAGES = [500, 1000, 2000]  # image counts of the project's scaling runs
SCALE_VOXELS = [100, 1000, 5741]  # voxel counts of the project's scaling runs (at the first image count)
BATCH_SIZE = 100  # images per forward pass
THREADS = 1  # torch and BLAS threads of both pipelines (oversubscribed BLAS threads distort timings on a shared CPU)
PRECISION_IMAGES = 2000  # images of the precision comparison (the first rows of the subject)
PRECISION_COMPONENTS = [1000, 200]  # PCA components of the precision comparison: the protocol's, and 200, which is to the 1360-row folds of 2000 images what 1000 is to the 6692 of the full size (mixed refines only where 2 x components <= half the fold)
PRECISION_LAYERS = list(utils.LAYERS)  # layers of the precision comparison
PARTS = ["project", "reference", "scale-images", "scale-voxels", "precision"]  # parts that --part all measures
PART = "all"  # all, or one child run: project, reference, scale-images, scale-voxels, precision
# ---
PART_NAMES = ["project", "reference", "scale-images", "scale-voxels", "precision"]
CHOICES = {"PRECISION_LAYERS": utils.LAYERS, "PARTS": PART_NAMES, "PART": ["all"] + PART_NAMES}


def ensure_dataset(opts):
    root = Path(opts.ROOT)
    if not utils.fmri_path(root, 1, "lh").is_file():
        synthetic_data.write_algonauts_dataset(root, n_subjects=1, n_images=opts.N_DATASET,
                                               image_size=opts.PNG_SIZE, seed=0)
    return root


def subset(opts, n, voxels=None):
    """The first ``n`` images (uint8) and the ROI's fMRI rows, with the split and folds of ``n`` rows."""
    root = Path(opts.ROOT)
    images = utils.subject_images(root, 1, opts.IMAGE_SIZE)[:n]
    if voxels is None:
        voxels = utils.roi_voxel_indices(root, 1, "lh", opts.ROI)
    fmri = utils.load_fmri(root, 1, "lh", voxels)[:n]
    train, test = utils.train_test_split(n)
    return images, fmri, train, test, utils.cv_folds(train)


def run_project(images, fmri, train, test, folds, opts):
    alexnet = utils.load_alexnet("none", seed=0)
    t0 = time.perf_counter()
    layers = encoding.layer_features(alexnet, images, batch_size=opts.BATCH_SIZE)
    t1 = time.perf_counter()
    res = encoding.encode_roi(layers, fmri, train, test, folds)
    t2 = time.perf_counter()
    return res, t1 - t0, t2 - t1


def reference_features(alexnet, images, rows, layer, batch_size):
    """Features of one layer for ``rows``, by a fresh forward pass (the straightforward way)."""
    return utils.extract_features(alexnet, images, batch_size, layers=[layer], indices=rows)[layer].astype(np.float64)


def reference_protocol(images, fmri, train, test, folds, alphas, batch_size):
    """sklearn PCA + Ridge per alpha + pearsonr loop, features re-extracted per layer and fold."""
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    def fit_predict(x_fit, y_fit, x_eval, alpha_of_voxel):
        pca = PCA(min(1000, *x_fit.shape), svd_solver="full").fit(x_fit)
        z_fit, z_eval = pca.transform(x_fit), pca.transform(x_eval)
        preds = {a: Ridge(alpha=a).fit(z_fit, y_fit).predict(z_eval).reshape(len(x_eval), -1)
                 for a in np.unique(alpha_of_voxel)}
        return np.column_stack([preds[a][:, v] for v, a in enumerate(alpha_of_voxel)])

    def safe_r(a, b):
        return 0.0 if a.std() == 0 or b.std() == 0 else pearsonr(a, b)[0]

    alexnet = utils.load_alexnet("none", seed=0)
    n_vox = fmri.shape[1]
    scores, choice = {}, {}
    for layer in utils.LAYERS:
        r = np.zeros((len(alphas), n_vox))
        for fit, val in folds:
            x_fit = reference_features(alexnet, images, fit, layer, batch_size)
            x_val = reference_features(alexnet, images, val, layer, batch_size)
            for a, alpha in enumerate(alphas):
                pred = fit_predict(x_fit, fmri[fit], x_val, np.full(n_vox, alpha))
                r[a] += [safe_r(pred[:, v], fmri[val, v]) for v in range(n_vox)]
        r /= len(folds)
        index = len(alphas) - 1 - np.argmax(r[::-1], axis=0)
        choice[layer] = index
        scores[layer] = float(r[index, np.arange(n_vox)].mean())
    best = max(scores, key=scores.get)
    x_train = reference_features(alexnet, images, train, best, batch_size)
    x_test = reference_features(alexnet, images, test, best, batch_size)
    pred = fit_predict(x_train, fmri[train], x_test, np.asarray(alphas)[choice[best]])
    test_r = np.array([safe_r(pred[:, v], fmri[test, v]) for v in range(n_vox)])
    return {"layer_scores": scores, "best_layer": best, "test_r": test_r}


def compare_precisions(opts):
    """The engine in every precision on the same features, for each of PRECISION_COMPONENTS.

    Returns
    -------
    dict n_components -> {precision: {'pca_s', 'roi_s'}, 'pca_ratio', 'roi_ratio' (fp64 time over
    mixed time), 'max_abs_diff_cv_r', 'max_abs_diff_test_r' (over voxels, mixed against fp64),
    'max_abs_diff_layer_score', 'same_best_layer', 'same_alphas', 'loadavg' (1-min load before and
    after)}.
    """
    images, fmri, train, test, folds = subset(opts, opts.PRECISION_IMAGES)
    layers = encoding.layer_features(utils.load_alexnet("none", seed=0), images, batch_size=opts.BATCH_SIZE,
                                     layers=opts.PRECISION_LAYERS)
    columns = {"roi": np.arange(fmri.shape[1])}
    # LAPACK's first calls in a process are slower: warm both solvers up so that neither pays for it.
    warm = torch.from_numpy(np.cov(np.random.default_rng(0).standard_normal((200, 400))))
    for precision in utils.ENGINE_PRECISIONS:
        encoding.top_eigenpairs(warm, 20, precision)
    out = {}
    for k in opts.PRECISION_COMPONENTS:
        times, res = {}, {}
        load = [os.getloadavg()[0]]
        for precision in utils.ENGINE_PRECISIONS:
            timer = encoding.StageTimer()
            t0 = time.perf_counter()
            res[precision] = encoding.encode_rois(layers, fmri, columns, train, test, folds, n_components=k,
                                                  timer=timer, precision=precision)["roi"]
            times[precision] = {"pca_s": timer.seconds["pca"], "roi_s": time.perf_counter() - t0}
        load.append(os.getloadavg()[0])
        exact, mixed = res["fp64"], res["mixed"]
        out[k] = {**times, "pca_ratio": times["fp64"]["pca_s"] / times["mixed"]["pca_s"],
                  "roi_ratio": times["fp64"]["roi_s"] / times["mixed"]["roi_s"],
                  "max_abs_diff_cv_r": float(np.abs(exact["cv_r"] - mixed["cv_r"]).max()),
                  "max_abs_diff_test_r": float(np.abs(exact["test_r"] - mixed["test_r"]).max()),
                  "max_abs_diff_layer_score": max(abs(exact["layer_scores"][n] - mixed["layer_scores"][n])
                                                  for n in exact["layer_scores"]),
                  "same_best_layer": exact["best_layer"] == mixed["best_layer"],
                  "same_alphas": bool(np.array_equal(exact["alpha_index"], mixed["alpha_index"])), "loadavg": load}
    return {"n_images": opts.PRECISION_IMAGES, "n_fold_rows": len(folds[0][0]), "n_voxels": fmri.shape[1],
            "by_components": out}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(opts):
    """One measured run in this process; prints a JSON line."""
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(opts.THREADS)
    threadpool_limits(opts.THREADS)
    if opts.PART == "project":
        data = subset(opts, opts.N_IMAGES)
        t0 = time.perf_counter()
        res, t_feat, t_fit = run_project(*data, opts)
        out = {"seconds": time.perf_counter() - t0, "features_s": t_feat, "fit_s": t_fit,
               "layer_scores": res["layer_scores"], "best_layer": res["best_layer"],
               "mean_test_r": float(res["test_r"].mean()), "n_voxels": data[1].shape[1]}
    elif opts.PART == "reference":
        data = subset(opts, opts.N_IMAGES)
        t0 = time.perf_counter()
        res = reference_protocol(*data, encoding.ALPHAS, opts.BATCH_SIZE)
        out = {"seconds": time.perf_counter() - t0, "layer_scores": res["layer_scores"],
               "best_layer": res["best_layer"], "mean_test_r": float(res["test_r"].mean())}
    elif opts.PART == "scale-images":
        out = {}
        for n in opts.SCALE_IMAGES:
            _, t_feat, t_fit = run_project(*subset(opts, n), opts)
            out[n] = {"features_s": t_feat, "fit_s": t_fit}
    elif opts.PART == "scale-voxels":
        n_hemi = utils.n_vertices(opts.ROOT, 1, "lh")
        out = {}
        alexnet = utils.load_alexnet("none", seed=0)
        images, _, train, test, folds = subset(opts, opts.SCALE_IMAGES[0], np.arange(1))
        layers = encoding.layer_features(alexnet, images, batch_size=opts.BATCH_SIZE)
        for v in opts.SCALE_VOXELS:
            _, fmri, _, _, _ = subset(opts, opts.SCALE_IMAGES[0], np.arange(v) % n_hemi)
            fmri = fmri + np.random.default_rng(0).standard_normal(fmri.shape).astype(np.float32)
            t0 = time.perf_counter()
            encoding.encode_roi(layers, fmri, train, test, folds)
            out[v] = {"fit_s": time.perf_counter() - t0}
    elif opts.PART == "precision":
        out = compare_precisions(opts)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


def run_child(part, argv):
    cmd = [sys.executable, __file__, "--part", part] + argv
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_precisions(p):
    """Print the precision comparison side by side."""
    print(f"engine precisions on the same features: {p['n_images']} images ({p['n_fold_rows']}-row folds), "
          f"{p['n_voxels']} voxels")
    print(f"  {'components':>10}  {'PCA fp64':>9} {'PCA mixed':>9} {'ratio':>5}  {'ROI fp64':>9} {'ROI mixed':>9} "
          f"{'ratio':>5}  {'max|dCV r|':>10} {'max|dtest r|':>12}  same layer, alphas  load")
    for k, c in p["by_components"].items():
        print(f"  {k:>10}  {c['fp64']['pca_s']:8.1f}s {c['mixed']['pca_s']:8.1f}s {c['pca_ratio']:5.2f}  "
              f"{c['fp64']['roi_s']:8.1f}s {c['mixed']['roi_s']:8.1f}s {c['roi_ratio']:5.2f}  "
              f"{c['max_abs_diff_cv_r']:10.1e} {c['max_abs_diff_test_r']:12.1e}  {str(c['same_best_layer']):5s} "
              f"{str(c['same_alphas']):5s}        {c['loadavg'][0]:.1f}-{c['loadavg'][1]:.1f}")


def main(argv=None):
    import bench_encoding
    opts = options.parse_options(bench_encoding, argv)
    if opts.PART != "all":
        return child(opts)
    ensure_dataset(opts)
    utils.subject_images(opts.ROOT, 1, opts.IMAGE_SIZE)
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {part: run_child(part, passed) for part in opts.PARTS}
    summary = {"n_images": opts.N_IMAGES, "image_size": opts.IMAGE_SIZE, "roi": opts.ROI, "threads": opts.THREADS,
               **results}
    print(f"images at {opts.IMAGE_SIZE} px, {opts.ROI}, {opts.THREADS} torch/BLAS thread(s)")
    if "project" in results and "reference" in results:
        proj, ref = results["project"], results["reference"]
        diffs = {k: abs(proj["layer_scores"][k] - ref["layer_scores"][k]) for k in utils.LAYERS}
        summary.update({
            "n_voxels": proj["n_voxels"], "speed_ratio": ref["seconds"] / proj["seconds"],
            "max_abs_diff_mean_cv_r": max(diffs.values()), "abs_diff_mean_cv_r_per_layer": diffs,
            "abs_diff_mean_test_r": abs(proj["mean_test_r"] - ref["mean_test_r"]),
            "same_best_layer": proj["best_layer"] == ref["best_layer"]})
        print(f"{opts.N_IMAGES} images: project {proj['seconds']:8.1f} s (features {proj['features_s']:.1f} s, fit {proj['fit_s']:.1f} s), "
              f"peak RSS {proj['peak_rss_mib']:.0f} MiB, {proj['n_voxels']} voxels")
        print(f"{opts.N_IMAGES} images: reference {ref['seconds']:8.1f} s, peak RSS {ref['peak_rss_mib']:.0f} MiB")
        print(f"speed ratio {summary['speed_ratio']:.1f}x; max |diff mean CV r| over layers "
              f"{summary['max_abs_diff_mean_cv_r']:.2e}; |diff mean test r| {summary['abs_diff_mean_test_r']:.2e}; "
              f"same best layer: {summary['same_best_layer']}")
        for layer, d in diffs.items():
            print(f"  {layer:13s} project {proj['layer_scores'][layer]:.4f} reference {ref['layer_scores'][layer]:.4f} "
                  f"|diff| {d:.1e}")
    for n, t in results.get("scale-images", {}).items():
        if n == "peak_rss_mib":
            continue
        print(f"  {n:>5} images: features {t['features_s']:.1f} s, fit {t['fit_s']:.1f} s")
    for v, t in results.get("scale-voxels", {}).items():
        if v == "peak_rss_mib":
            continue
        print(f"  {v:>5} voxels: fit {t['fit_s']:.1f} s")
    if "precision" in results:
        report_precisions(results["precision"])
    safe_io.atomic_json_dump(summary, Path(opts.ROOT).parent / "bench_encoding.json")
    return summary


if __name__ == "__main__":
    main()
