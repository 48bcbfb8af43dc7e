"""The encoding engine: PCA + ridge over all alphas, per-voxel alpha choice, Pearson r.

Everything runs in torch on the device given (CPU or GPU), with one code path.

The protocol (the paper's, see README): for each layer and each of the 5 folds inside the training split,
PCA is fitted on the fold's training rows (k = min(1000, n_train, dims) components), ridge
with intercept is fitted on the PCA scores for all alphas, and Pearson r is measured per
voxel on the fold's validation rows. Per voxel the alpha with the best fold-mean r is kept
(ties go to the larger alpha); the layer score is the mean of that r over voxels, and the
best layer has the highest score. The model is then refitted on the whole training split at
the best layer with the chosen alphas, and scored on the test split.

Why it is fast and exact:
- PCA scores are orthogonal (Z^T Z = diag(lambda)), so ridge on them is diagonal: the
  coefficients for every alpha are B / (lambda + alpha) with B = Z^T (Y - mean Y), one
  matrix product for all alphas.
- Layers wider than the number of images are kept as n x n Gram matrices; PCA of a fold is
  then the eigendecomposition of the fold's centred Gram block (kernel PCA with a linear
  kernel), which gives exactly the scores of ordinary PCA. Narrow layers keep their features.
- Features of all layers come from one forward pass (utils.iter_features).
- The eigendecompositions dominate at full size. precision='mixed' does them in float32 and
  refines the top eigenvectors in float64 (top_eigenpairs), for GPUs whose float64 is slow;
  the Gram matrices, ridge and correlations stay float64. 'fp64', the default, is exact.
"""

import errno
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

import safe_io
import utils

ALPHAS = np.logspace(-1, 7, 9)
N_COMPONENTS = 1000
# Eigenvalues below this fraction of the largest are numerically zero (rank n_train - 1).
EIG_TOL = 1e-10
# The PCA eigensolvers: fp64 (exact) or mixed (float32 eigh refined in float64, for GPUs with slow float64).
# A float32 eigh leaves eigenvector i with errors of about eps32 * lam_1 / |lam_i - lam_j| along each
# eigenvector j. Mixed precision keeps the span of the top MIXED_SUBSPACE * k float32 eigenvectors,
# shrinks the errors from outside it (j > m) by lam_j / lam_i with each of MIXED_ITERATIONS float64
# subspace iterations, and removes those inside it by a float64 Rayleigh-Ritz step. One Rayleigh-Ritz
# step on 1.2 k vectors alone moved r by up to 6e-4 on power-law spectra as steep as lam_i ~ i^-1.8.
MIXED_SUBSPACE = 2
MIXED_ITERATIONS = 2
# Feature columns per block when building a Gram matrix or spilling features to disk.
GRAM_CHUNK = 4096
SPILL_PREFIX = "features-spill"


class LayerFeatures:
    """The features of one layer for every image, as rows or as their Gram matrix.

    Parameters
    ----------
    features : tensor (n, d), one row per image.
    keep_gram : bool or None; None keeps the Gram matrix when d > n.

    Attributes
    ----------
    n, dims : number of images and feature dimensions.
    x : tensor (n, d) float64, or None when only the Gram matrix is kept.
    k : tensor (n, n) float64 Gram matrix x x^T, or None.
    """

    def __init__(self, features, keep_gram=None):
        n, dims = features.shape
        chunks = (features[:, c:c + GRAM_CHUNK] for c in range(0, dims, GRAM_CHUNK))
        self._fill(chunks, n, dims, features.device, keep_gram)

    @classmethod
    def from_chunks(cls, chunks, n, dims, device="cpu", keep_gram=None):
        """Build from an iterable of column blocks (n, c) that together hold the ``dims`` columns in order.

        Only one block is held at a time besides the result, so the float32 features of a
        wide layer never need to be in memory whole.
        """
        obj = cls.__new__(cls)
        obj._fill(chunks, n, dims, torch.device(device), keep_gram)
        return obj

    def _fill(self, chunks, n, dims, device, keep_gram):
        self.n, self.dims = int(n), int(dims)
        keep_gram = self.dims > self.n if keep_gram is None else keep_gram
        self.x = self.k = None
        if keep_gram:
            self.k = torch.zeros(self.n, self.n, dtype=torch.float64, device=device)
            for block in chunks:
                f = torch.as_tensor(block).to(device=device, dtype=torch.float64)
                self.k.addmm_(f, f.T)
        else:
            self.x = torch.cat([torch.as_tensor(b).to(device=device, dtype=torch.float64) for b in chunks], 1)

    def gram(self, rows_a, rows_b):
        """Block (len(rows_a), len(rows_b)) of the Gram matrix."""
        if self.k is not None:
            return self.k[rows_a][:, rows_b]
        return self.x[rows_a] @ self.x[rows_b].T


def top_eigenpairs(a, k, precision="fp64"):
    """The ``k`` largest eigenpairs of a symmetric positive semi-definite matrix, numerically zero ones dropped.

    Parameters
    ----------
    a : tensor (size, size) float64, symmetric.
    k : int, at most size.
    precision : 'fp64': torch.linalg.eigh in float64. 'mixed': eigh of ``a`` in float32, its
        top m = MIXED_SUBSPACE * k eigenvectors refined in float64 (MIXED_ITERATIONS subspace
        iterations, then Rayleigh-Ritz). Where m > size / 2 the float64 work on m vectors would
        cost about as much as the float64 eigh, so the float64 eigh is used.

    Returns
    -------
    lam : tensor (k',) float64, eigenvalues in descending order; those below EIG_TOL times
        the largest are dropped, so k' <= k.
    vecs : tensor (size, k') float64, orthonormal eigenvectors.
    """
    if precision not in utils.ENGINE_PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r}: use one of {', '.join(utils.ENGINE_PRECISIONS)}")
    size = a.shape[0]
    m = MIXED_SUBSPACE * k
    if precision == "fp64" or 2 * m > size:
        lam, vecs = torch.linalg.eigh(a)
    else:
        _, approx = torch.linalg.eigh(a.float())
        # float32 eigenvectors are orthonormal to ~1e-7 only; each step re-orthonormalises in float64.
        q, _ = torch.linalg.qr(approx[:, size - m:].double())
        for _ in range(MIXED_ITERATIONS):
            q, _ = torch.linalg.qr(a @ q)
        lam, w = torch.linalg.eigh(q.T @ (a @ q))
        vecs = q @ w
    lam, vecs = lam.flip(0)[:k], vecs.flip(1)[:, :k]
    keep = lam > EIG_TOL * lam[0].clamp_min(1e-300)
    return lam[keep], vecs[:, keep]


def fit_pca(layer, fit_rows, eval_rows, n_components=N_COMPONENTS, precision="fp64"):
    """PCA fitted on ``fit_rows`` (exact with fp64); scores of the fit rows and of ``eval_rows``.

    Parameters
    ----------
    layer : LayerFeatures.
    fit_rows, eval_rows : 1-D long tensors of row indices.
    n_components : int, at most this many components (k = min(n_components, n_fit, dims)).
    precision : 'fp64' or 'mixed', the eigensolver (top_eigenpairs); everything else is float64.

    Returns
    -------
    z_fit : tensor (n_fit, k') float64, centred scores, z_fit^T z_fit = diag(lam).
    z_eval : tensor (n_eval, k') float64, scores of eval rows (centred with the fit mean).
    lam : tensor (k',) eigenvalues (sums of squares of the scores), descending; components
        with zero variance are dropped (they cannot change a ridge prediction), so k' <= k.
    """
    n_fit = len(fit_rows)
    k = min(n_components, n_fit, layer.dims)
    if layer.x is not None and layer.dims <= n_fit:
        x_fit = layer.x[fit_rows]
        mean = x_fit.mean(0, keepdim=True)
        xc = x_fit - mean
        lam, vecs = top_eigenpairs(xc.T @ xc, k, precision)
        return xc @ vecs, (layer.x[eval_rows] - mean) @ vecs, lam
    k_ff = layer.gram(fit_rows, fit_rows)
    k_ef = layer.gram(eval_rows, fit_rows)
    row_mean = k_ff.mean(0)
    total = row_mean.mean()
    kc_ff = k_ff - row_mean[None, :] - row_mean[:, None] + total
    kc_ef = k_ef - row_mean[None, :] - k_ef.mean(1, keepdim=True) + total
    lam, vecs = top_eigenpairs(kc_ff, k, precision)
    root = lam.sqrt()
    return vecs * root, (kc_ef @ vecs) / root, lam


def ridge_predictions(z_fit, z_eval, lam, y_fit, alphas):
    """Ridge with intercept on PCA scores, for every alpha at once.

    Parameters
    ----------
    z_fit : tensor (n_fit, k), centred PCA scores with z_fit^T z_fit = diag(lam).
    z_eval : tensor (n_eval, k).
    lam : tensor (k,).
    y_fit : tensor (n_fit, V).
    alphas : sequence of n_alphas floats.

    Returns
    -------
    pred : tensor (n_alphas, n_eval, V), the predictions of sklearn's
        Ridge(alpha, fit_intercept=True) fitted on (z_fit, y_fit), for each alpha.
    """
    y_mean = y_fit.mean(0, keepdim=True)
    b = z_fit.T @ (y_fit - y_mean)
    alphas = torch.as_tensor(np.asarray(alphas, dtype=np.float64), dtype=lam.dtype, device=lam.device)
    scale = 1.0 / (lam[None, :] + alphas[:, None])
    return torch.stack([(z_eval * s) @ b for s in scale]) + y_mean


def pearson_r(pred, y):
    """Pearson r per column between ``pred`` (..., n, V) and ``y`` (n, V).

    Returns
    -------
    r : tensor (..., V). Where either side is constant, r = 0 (never NaN).
    """
    pc = pred - pred.mean(-2, keepdim=True)
    yc = y - y.mean(-2, keepdim=True)
    num = (pc * yc).sum(-2)
    den = (pc.square().sum(-2) * yc.square().sum(-2)).sqrt()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def choose_alphas(fold_mean_r, alphas):
    """Per voxel, the alpha with the highest fold-mean r; ties go to the larger alpha.

    Parameters
    ----------
    fold_mean_r : tensor (n_alphas, V), alphas in ascending order.
    alphas : sequence of n_alphas floats, ascending.

    Returns
    -------
    index : long tensor (V,), index into ``alphas``.
    best_r : tensor (V,), the fold-mean r at that alpha.
    """
    if np.any(np.diff(np.asarray(alphas)) <= 0):
        raise ValueError("alphas must be strictly ascending")
    reversed_index = fold_mean_r.flip(0).argmax(0)
    index = len(alphas) - 1 - reversed_index
    return index, fold_mean_r.gather(0, index[None]).squeeze(0)


def validation_scores(layer, y, fit_rows, eval_rows, alphas=ALPHAS, n_components=N_COMPONENTS,
                      voxel_batch=4096, timer=None, precision="fp64"):
    """PCA + ridge fitted on ``fit_rows``; r of every voxel on ``eval_rows``, for every alpha.

    Parameters
    ----------
    layer : LayerFeatures.
    y : tensor (n, V) float64, fMRI of every image (only the given rows are read).
    fit_rows, eval_rows : index arrays.
    timer : StageTimer or None; times the 'pca' and 'ridge' stages.
    precision : 'fp64' or 'mixed', the PCA eigensolver (top_eigenpairs).

    Returns
    -------
    r : tensor (n_alphas, V).
    """
    dev = y.device
    fit_rows = torch.as_tensor(fit_rows, device=dev)
    eval_rows = torch.as_tensor(eval_rows, device=dev)
    with _stage(timer, "pca"):
        z_fit, z_eval, lam = fit_pca(layer, fit_rows, eval_rows, n_components, precision)
    out = torch.empty(len(alphas), y.shape[1], dtype=y.dtype, device=dev)
    with _stage(timer, "ridge"):
        for v0 in range(0, y.shape[1], voxel_batch):
            cols = slice(v0, v0 + voxel_batch)
            pred = ridge_predictions(z_fit, z_eval, lam, y[fit_rows, cols], alphas)
            out[:, cols] = pearson_r(pred, y[eval_rows, cols])
    return out


def cv_scores(layer, y, folds, alphas=ALPHAS, n_components=N_COMPONENTS, voxel_batch=4096, timer=None,
              precision="fp64"):
    """Fold-mean validation r for every alpha and voxel of one layer.

    Parameters
    ----------
    layer : LayerFeatures.
    y : tensor (n, V) float64, fMRI of every image (only fold rows are read).
    folds : list of (fit_rows, val_rows) index arrays (utils.cv_folds).
    precision : 'fp64' or 'mixed', the PCA eigensolver (top_eigenpairs).

    Returns
    -------
    r : tensor (n_alphas, V), the mean over folds of the validation r.
    """
    total = sum(validation_scores(layer, y, fit, val, alphas, n_components, voxel_batch, timer, precision)
                for fit, val in folds)
    return total / len(folds)


def constant_voxels(y, rows, voxel_batch=4096):
    """Mask (V,) of the voxels that are constant over ``rows`` (their r is 0 by convention)."""
    rows = torch.as_tensor(rows, device=y.device)
    return torch.cat([y[rows, v0:v0 + voxel_batch].std(0) == 0 for v0 in range(0, y.shape[1], voxel_batch)])


def encode_rois(layers, fmri, roi_columns, train, test, folds, alphas=ALPHAS, n_components=N_COMPONENTS,
                fixed=None, device="cpu", voxel_batch=4096, timer=None, precision="fp64"):
    """The whole encoding protocol for several ROIs whose features are the same, in one pass.

    Each layer is scored once for all the voxels (columns of ``fmri``): the fold-mean
    validation r and the test r (PCA + ridge refitted on all of ``train``) for every alpha.
    Each ROI then chooses, from its own voxels only, every voxel's alpha (best fold-mean r)
    and its best layer (best mean over its voxels), and takes the test r of that layer and
    alpha. A voxel's numbers do not depend on the other voxels, so every ROI's result is the
    one it gets when fitted alone; the PCA of each (layer, fold) and of the refit is computed
    once for all ROIs instead of once per ROI.

    Parameters
    ----------
    layers : dict layer name -> LayerFeatures or array (n, d) (all images, in fMRI row order),
        or an iterable of (name, layer) pairs, consumed one layer at a time (with a generator
        such as FeatureSpill.layers only one layer is in memory).
    fmri : array (n, V), responses of every image for the union of the ROIs' voxels.
    roi_columns : dict ROI -> int array of its columns in ``fmri`` (ROIs may share columns).
    train, test : index arrays; folds : list of (fit, val) index arrays inside ``train``.
    fixed : None, or dict ROI -> (layer, alpha_index (V_roi,)): reuse a layer and per-voxel
        alphas chosen elsewhere (the 'untuned-layer' protocol); CV scores are still reported.
    timer : StageTimer or None; times the 'pca' and 'ridge' stages.
    precision : 'fp64' (exact) or 'mixed' (float32 eigendecompositions refined in float64;
        see top_eigenpairs), the PCA eigensolver.

    Returns
    -------
    dict ROI -> dict with 'layer_scores' {layer: mean over voxels of the best fold-mean r},
    'best_layer', 'alphas' (V_roi,) chosen alpha values, 'alpha_index' (V_roi,), 'cv_r' (V_roi,)
    at the best layer, 'test_r' (V_roi,), 'n_constant' (voxels constant on train, r = 0).
    Arrays numpy.
    """
    device = torch.device(device)
    y = torch.as_tensor(np.asarray(fmri), dtype=torch.float64, device=device)
    alphas = np.asarray(alphas, dtype=np.float64)
    fixed = fixed or {}
    cv, tested = {}, {}
    for name, layer in (layers.items() if isinstance(layers, dict) else layers):
        layer = as_layer_features(layer, device)
        cv[name] = cv_scores(layer, y, folds, alphas, n_components, voxel_batch, timer, precision)
        tested[name] = validation_scores(layer, y, train, test, alphas, n_components, voxel_batch, timer, precision)
        del layer  # a generator builds the next layer only after this one is freed
    constant = constant_voxels(y, train, voxel_batch)
    out = {}
    for roi, cols in roi_columns.items():
        cols = torch.as_tensor(np.asarray(cols), device=device)
        choice = {name: choose_alphas(r[:, cols], alphas) for name, r in cv.items()}
        scores = {name: float(best_r.mean()) for name, (_, best_r) in choice.items()}
        if roi in fixed:
            best, index = fixed[roi][0], torch.as_tensor(np.asarray(fixed[roi][1]), device=device)
        else:
            best = max(scores, key=scores.get)
            index = choice[best][0]
        pick = index[None]
        out[roi] = {
            "layer_scores": scores, "best_layer": best,
            "alpha_index": index.cpu().numpy(), "alphas": alphas[index.cpu().numpy()],
            "cv_r": cv[best][:, cols].gather(0, pick).squeeze(0).cpu().numpy(),
            "test_r": tested[best][:, cols].gather(0, pick).squeeze(0).cpu().numpy(),
            "n_constant": int(constant[cols].sum()),
        }
    return out


def encode_roi(layers, fmri, train, test, folds, alphas=ALPHAS, n_components=N_COMPONENTS,
               fixed_layer=None, fixed_alpha_index=None, device="cpu", voxel_batch=4096, precision="fp64"):
    """The whole encoding protocol for one ROI: encode_rois with all of ``fmri``'s columns.

    Independent of the dataset: NSD (fit_encoding_models.py) and NOD (fit_encoding_models_nod.py)
    both use it with their own rows, folds and features.

    Parameters
    ----------
    layers, train, test, folds, alphas, n_components, precision : as encode_rois.
    fmri : array (n, V), responses of every image.
    fixed_layer, fixed_alpha_index : reuse a layer and per-voxel alphas chosen elsewhere (the
        'untuned-layer' protocol); the CV scores are still computed and reported.

    Returns
    -------
    dict, the result of encode_rois for this ROI.
    """
    columns = np.arange(np.shape(fmri)[1])
    fixed = None if fixed_layer is None else {"roi": (fixed_layer, fixed_alpha_index)}
    return encode_rois(layers, fmri, {"roi": columns}, train, test, folds, alphas, n_components,
                       fixed, device, voxel_batch, precision=precision)["roi"]


def as_layer_features(layer, device="cpu"):
    """A LayerFeatures as it is, or an array or tensor (n, d) moved to ``device`` and wrapped."""
    return layer if isinstance(layer, LayerFeatures) else LayerFeatures(torch.as_tensor(layer, device=device))


def layer_features(alexnet, images, device="cpu", batch_size=128, layers=utils.LAYERS, keep_gram=None):
    """One forward pass over all images; each layer as LayerFeatures on ``device``, all in memory.

    For small data (tests, NOD runs); the float32 features of all layers are held at once.
    FeatureSpill keeps one layer at a time for full-size subjects.
    """
    feats = utils.extract_features(alexnet, images, batch_size, device, layers)
    out = {}
    for name in layers:
        out[name] = LayerFeatures(torch.from_numpy(feats.pop(name)).to(device), keep_gram)
    return out


class StageTimer:
    """Wall-clock seconds spent in named stages; CUDA work is synchronised at each stage boundary.

    Use as ``with timer("gram"): ...``; ``str(timer)`` is the one-line summary
    'cache 1.2 s, forward 3.4 s, ...' in the order the stages first ran.
    """

    def __init__(self, device="cpu"):
        self.seconds = {}
        self._cuda = torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, stage):
        if self._cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def __str__(self):
        return ", ".join(f"{stage} {s:.1f} s" for stage, s in self.seconds.items())


def _stage(timer, stage):
    return nullcontext() if timer is None else timer(stage)


class FeatureSpill:
    """Every layer's float32 features of all images, on disk in column blocks, read back one layer at a time.

    At full size (9841 images at 224 px) the eight layers hold about 8 GB of float32
    features; a wide layer's Gram matrix needs only one block of columns at a time, so the
    features go to disk during the forward pass and each layer is rebuilt from its blocks
    when the engine reaches it (peak: one Gram matrix plus one block, instead of everything).

    Use as a context manager: entering runs the forward pass into a folder
    ``<folder>/features-spill.tmp-<host>-<pid>-*`` (safe_io.temp_prefix); leaving removes it.
    Folders of runs on this host whose process is gone (killed) are removed on entry; those
    of live runs are kept.

    Parameters
    ----------
    alexnet : torchvision AlexNet (or a tuned model's ``alexnet``).
    images : uint8 array (n, S, S, 3), e.g. the image cache.
    folder : path-like, where the spill folder is made (the project's cache folder).
    device, batch_size, layers, precision : as utils.iter_features (precision 'fp32', the
        authors', or 'bf16' autocast on CUDA).
    timer : StageTimer or None; times the 'forward' stage here and 'gram' in layers().
    """

    def __init__(self, alexnet, images, folder, device="cpu", batch_size=128, layers=utils.LAYERS, timer=None,
                 precision="fp32"):
        self.alexnet, self.images, self.folder = alexnet, images, Path(folder)
        self.device, self.batch_size, self.names, self.timer = device, batch_size, list(layers), timer
        self.precision = precision
        self.n, self.dims, self.path = len(images), {}, None

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        safe_io.remove_stale_temps(self.folder, SPILL_PREFIX)
        self.path = Path(tempfile.mkdtemp(prefix=safe_io.temp_prefix(SPILL_PREFIX), dir=self.folder))
        try:
            with _stage(self.timer, "forward"):
                self._write()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.alexnet = self.images = None  # the caller may free them: the features are on disk
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)

    def _block_path(self, name, j):
        return self.path / f"{name}.{j}.f32"

    def _write(self):
        files = {}
        try:
            for _, feats in utils.iter_features(self.alexnet, self.images, self.batch_size, self.device, self.names,
                                                  precision=self.precision):
                for name, v in feats.items():
                    v = v.cpu().numpy()
                    if name not in files:
                        self.dims[name] = v.shape[1]
                        files[name] = [open(self._block_path(name, j), "wb")
                                       for j in range(-(-v.shape[1] // GRAM_CHUNK))]
                    for j, f in enumerate(files[name]):
                        f.write(np.ascontiguousarray(v[:, j * GRAM_CHUNK:(j + 1) * GRAM_CHUNK]).tobytes())
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise self._gone(e) from None
            gb = self.n * sum(utils.layer_dims(self.images.shape[1]).values()) * 4 / 2**30
            raise safe_io.UserError(f"cannot write the features to {self.path} ({e.strerror or e}): "
                                  f"this run needs about {gb:.1f} GB free there") from None
        finally:
            for f in (f for fs in files.values() for f in fs):
                f.close()

    def _gone(self, error):
        """The UserError of a spill folder removed while the run reads or writes it."""
        return safe_io.UserError(f"the feature spill {self.path} is gone ({error.strerror}): was {self.folder} "
                                 "deleted during the run? Rerun; finished ROIs are kept")

    def _block(self, name, j):
        try:
            return torch.from_numpy(np.fromfile(self._block_path(name, j), dtype=np.float32).reshape(self.n, -1))
        except OSError as e:
            raise self._gone(e) from None

    def layers(self, device="cpu", keep_gram=None):
        """Yield (layer name, LayerFeatures on ``device``), building each layer only when asked."""
        for name in self.names:
            dims = self.dims[name]
            blocks = (self._block(name, j) for j in range(-(-dims // GRAM_CHUNK)))
            with _stage(self.timer, "gram"):
                layer = LayerFeatures.from_chunks(blocks, self.n, dims, device, keep_gram)
            yield name, layer
            del layer
