"""The encoding engine: PCA + ridge over all alphas, per-voxel alpha choice, Pearson r.

Everything runs in torch on the device given (CPU or GPU), with one code path.

The protocol (DESIGN.md): for each layer and each of the 5 folds inside the training split,
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
"""

import numpy as np
import torch

import utils

ALPHAS = np.logspace(-1, 7, 9)
N_COMPONENTS = 1000
# Eigenvalues below this fraction of the largest are numerically zero (rank n_train - 1).
EIG_TOL = 1e-10


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
        self.n, self.dims = features.shape
        keep_gram = self.dims > self.n if keep_gram is None else keep_gram
        if keep_gram:
            # Column chunks keep the float64 copy small for wide layers (features.7: 64896 dims).
            self.x = None
            self.k = torch.zeros(self.n, self.n, dtype=torch.float64, device=features.device)
            for c in range(0, self.dims, 4096):
                f = features[:, c:c + 4096].to(torch.float64)
                self.k.addmm_(f, f.T)
        else:
            self.x, self.k = features.to(torch.float64), None

    @classmethod
    def from_gram(cls, gram, dims):
        obj = cls.__new__(cls)
        obj.n, obj.dims, obj.x, obj.k = gram.shape[0], int(dims), None, gram.to(torch.float64)
        return obj

    def gram(self, rows_a, rows_b):
        """Block (len(rows_a), len(rows_b)) of the Gram matrix."""
        if self.k is not None:
            return self.k[rows_a][:, rows_b]
        return self.x[rows_a] @ self.x[rows_b].T


def fit_pca(layer, fit_rows, eval_rows, n_components=N_COMPONENTS):
    """Exact PCA fitted on ``fit_rows``; scores of the fit rows and of ``eval_rows``.

    Parameters
    ----------
    layer : LayerFeatures.
    fit_rows, eval_rows : 1-D long tensors of row indices.
    n_components : int, at most this many components (k = min(n_components, n_fit, dims)).

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
        lam, vecs = torch.linalg.eigh(xc.T @ xc)
        lam, vecs = lam.flip(0)[:k], vecs.flip(1)[:, :k]
        keep = lam > EIG_TOL * lam[0].clamp_min(1e-300)
        lam, vecs = lam[keep], vecs[:, keep]
        return xc @ vecs, (layer.x[eval_rows] - mean) @ vecs, lam
    k_ff = layer.gram(fit_rows, fit_rows)
    k_ef = layer.gram(eval_rows, fit_rows)
    row_mean = k_ff.mean(0)
    total = row_mean.mean()
    kc_ff = k_ff - row_mean[None, :] - row_mean[:, None] + total
    kc_ef = k_ef - row_mean[None, :] - k_ef.mean(1, keepdim=True) + total
    lam, vecs = torch.linalg.eigh(kc_ff)
    lam, vecs = lam.flip(0)[:k], vecs.flip(1)[:, :k]
    keep = lam > EIG_TOL * lam[0].clamp_min(1e-300)
    lam, vecs = lam[keep], vecs[:, keep]
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


def cv_scores(layer, y, folds, alphas=ALPHAS, n_components=N_COMPONENTS, voxel_batch=4096):
    """Fold-mean validation r for every alpha and voxel of one layer.

    Parameters
    ----------
    layer : LayerFeatures.
    y : tensor (n, V) float64, fMRI of every image (only fold rows are read).
    folds : list of (fit_rows, val_rows) index arrays (utils.cv_folds).

    Returns
    -------
    r : tensor (n_alphas, V), the mean over folds of the validation r.
    """
    dev = y.device
    total = torch.zeros(len(alphas), y.shape[1], dtype=y.dtype, device=dev)
    for fit_rows, val_rows in folds:
        fit_rows = torch.as_tensor(fit_rows, device=dev)
        val_rows = torch.as_tensor(val_rows, device=dev)
        z_fit, z_val, lam = fit_pca(layer, fit_rows, val_rows, n_components)
        for v0 in range(0, y.shape[1], voxel_batch):
            cols = slice(v0, v0 + voxel_batch)
            pred = ridge_predictions(z_fit, z_val, lam, y[fit_rows, cols], alphas)
            total[:, cols] += pearson_r(pred, y[val_rows, cols])
    return total / len(folds)


def refit_and_test(layer, y, train, test, alpha_index, alphas=ALPHAS, n_components=N_COMPONENTS,
                   voxel_batch=4096):
    """Refit PCA + ridge on ``train`` with each voxel's alpha; r per voxel on ``test``.

    Returns
    -------
    test_r : tensor (V,).
    """
    dev = y.device
    train = torch.as_tensor(train, device=dev)
    test = torch.as_tensor(test, device=dev)
    z_fit, z_test, lam = fit_pca(layer, train, test, n_components)
    out = torch.empty(y.shape[1], dtype=y.dtype, device=dev)
    for v0 in range(0, y.shape[1], voxel_batch):
        cols = slice(v0, v0 + voxel_batch)
        pred = ridge_predictions(z_fit, z_test, lam, y[train, cols], alphas)
        pick = alpha_index[cols]
        pred = pred.gather(0, pick[None, None, :].expand(1, pred.shape[1], -1)).squeeze(0)
        out[cols] = pearson_r(pred, y[test, cols])
    return out


def constant_voxels(y, rows):
    """Number of voxels that are constant over ``rows`` (their r is 0 by convention)."""
    return int((y[torch.as_tensor(rows, device=y.device)].std(0) == 0).sum())


def encode_roi(layers, fmri, train, test, folds, alphas=ALPHAS, n_components=N_COMPONENTS,
               fixed_layer=None, fixed_alpha_index=None, device="cpu", voxel_batch=4096):
    """The whole encoding protocol for one ROI.

    Independent of the dataset: NSD (fit_encoding_models.py) and NOD (fit_encoding_models_nod.py)
    both call it with their own rows, folds and features.

    Parameters
    ----------
    layers : dict layer name -> LayerFeatures, or -> array (n, d) as from utils.extract_features
        (all images, in fMRI row order); arrays are wrapped by as_layer_features.
    fmri : array (n, V), responses of every image.
    train, test : index arrays; folds : list of (fit, val) index arrays inside ``train``.
    fixed_layer, fixed_alpha_index : reuse a layer and per-voxel alphas chosen elsewhere (the
        'untuned-layer' protocol); the CV scores are still computed and reported.

    Returns
    -------
    dict with 'layer_scores' {layer: mean over voxels of the best fold-mean r},
    'best_layer', 'alphas' (V,) chosen alpha values, 'alpha_index' (V,), 'cv_r' (V,) at the
    best layer, 'test_r' (V,), 'n_constant' (voxels constant on train, r = 0). Arrays numpy.
    """
    device = torch.device(device)
    layers = as_layer_features(layers, device)
    y = torch.as_tensor(np.asarray(fmri), dtype=torch.float64, device=device)
    alphas = np.asarray(alphas, dtype=np.float64)
    scores, choice = {}, {}
    for name, layer in layers.items():
        r = cv_scores(layer, y, folds, alphas, n_components, voxel_batch)
        index, best_r = choose_alphas(r, alphas)
        scores[name] = float(best_r.mean())
        choice[name] = (index, best_r, r)
    best = max(scores, key=scores.get) if fixed_layer is None else fixed_layer
    index, best_r, all_r = choice[best]
    if fixed_alpha_index is not None:
        index = torch.as_tensor(np.asarray(fixed_alpha_index), device=device)
        best_r = all_r.gather(0, index[None]).squeeze(0)
    test_r = refit_and_test(layers[best], y, train, test, index, alphas, n_components, voxel_batch)
    return {
        "layer_scores": scores, "best_layer": best,
        "alpha_index": index.cpu().numpy(), "alphas": alphas[index.cpu().numpy()],
        "cv_r": best_r.cpu().numpy(), "test_r": test_r.cpu().numpy(),
        "n_constant": constant_voxels(y, train),
    }


def as_layer_features(layers, device="cpu"):
    """dict layer -> LayerFeatures; arrays or tensors (n, d) are moved to ``device`` and wrapped."""
    return {name: f if isinstance(f, LayerFeatures) else LayerFeatures(torch.as_tensor(f, device=device))
            for name, f in layers.items()}


def layer_features(alexnet, images, device="cpu", batch_size=128, layers=utils.LAYERS, keep_gram=None):
    """One forward pass over all images; each layer as LayerFeatures on ``device``.

    Wide layers are turned into Gram matrices one at a time, so the peak memory is the
    float32 features of all layers plus one Gram matrix.
    """
    feats = utils.extract_features(alexnet, images, batch_size, device, layers)
    out = {}
    for name in layers:
        out[name] = LayerFeatures(torch.from_numpy(feats.pop(name)).to(device), keep_gram)
    return out
