"""Downstream analyses: classification probes, the InfoNCE MI bound, embeddings, the landscape, figures.

``generate_results.py`` and the landscape notebook call these functions; the numerical
ones (Bhattacharyya distances, InPCA / MDS, the MI bound) take and return plain arrays.
"""

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import utils

DATASETS = ("caltech256", "places365", "imagenet", "sun397")
# The classification probe's layer: ReLU(fc7) of AlexNet.
PROBE_LAYER = "classifier.5"
# Post-hoc temperatures of the MI bound: tau' = TEMPERATURE * beta.
TEMPERATURE = 0.3
BETAS = np.logspace(-2, 2, 1000)


# --- Landscape: Bhattacharyya distances and embeddings ---------------------------------

def bhattacharyya_distances(probs, chunk_size=16):
    """Mean Bhattacharyya distance between every pair of models' class probabilities.

    d(u, v) = mean_n -log sum_c sqrt(p_u[n, c] p_v[n, c]).

    Parameters
    ----------
    probs : array (n_models, n_samples, n_classes), rows summing to 1.
    chunk_size : int, models per block; memory is chunk_size * n_models * n_samples floats.

    Returns
    -------
    distances : np.ndarray float64 (n_models, n_models), symmetric, non-negative.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise utils.UserError(f"probabilities have shape {probs.shape}: expected (n_models, n_samples, n_classes)")
    if (probs < 0).any() or not np.isfinite(probs).all():
        raise utils.UserError("probabilities must be finite and non-negative: pass predict_proba outputs")
    roots = torch.from_numpy(np.sqrt(probs))
    n = len(probs)
    out = np.empty((n, n))
    tiny = np.finfo(np.float64).tiny
    for start in range(0, n, chunk_size):
        coef = torch.einsum("inc,jnc->ijn", roots[start:start + chunk_size], roots)
        out[start:start + chunk_size] = (-torch.log(coef.clamp_min(tiny))).mean(-1).numpy()
    # Rounding leaves |d| ~ 1e-16 on the diagonal and tiny asymmetries; both are exact in theory.
    out = np.maximum((out + out.T) / 2, 0.0)
    np.fill_diagonal(out, 0.0)
    return out


def double_centre(a):
    """-1/2 J a J with J = I - 11^T / n: the Gram matrix of a matrix of squared distances."""
    a = np.asarray(a, dtype=np.float64)
    return -0.5 * (a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True) + a.mean())


def inpca(distances, n_components=2):
    """Intensive PCA (Quinn et al. 2019): embed a matrix of Bhattacharyya distances.

    The distances play the role of squared distances: W = -1/2 J D J is
    eigendecomposed and its components are ordered by |eigenvalue|; a negative
    eigenvalue is a time-like (Minkowski) direction.

    Parameters
    ----------
    distances : array (n, n), symmetric.
    n_components : int.

    Returns
    -------
    coords : np.ndarray (n, n_components), eigenvector * sqrt(|eigenvalue|).
    eigenvalues : np.ndarray (n_components,), signed, in the order of ``coords``.
    """
    vals, vecs = np.linalg.eigh(double_centre(distances))
    order = np.argsort(-np.abs(vals))[:n_components]
    return vecs[:, order] * np.sqrt(np.abs(vals[order])), vals[order]


def classical_mds(distances, n_components=2):
    """Classical (Torgerson) MDS of a matrix of distances (squared inside).

    Returns
    -------
    coords : np.ndarray (n, n_components), eigenvector * sqrt(max(eigenvalue, 0)).
    eigenvalues : np.ndarray (n_components,), the largest, in decreasing order.
    """
    vals, vecs = np.linalg.eigh(double_centre(np.asarray(distances, dtype=np.float64) ** 2))
    order = np.argsort(-vals)[:n_components]
    return vecs[:, order] * np.sqrt(np.maximum(vals[order], 0.0)), vals[order]


def embed(distances, method="inpca", n_components=2):
    """``inpca`` or ``classical_mds`` (method 'mds') of a distance matrix."""
    if method == "inpca":
        return inpca(distances, n_components)
    if method == "mds":
        return classical_mds(distances, n_components)
    raise utils.UserError(f"unknown embedding {method!r}: use 'inpca' or 'mds'")


# --- InfoNCE lower bound on mutual information -----------------------------------------

def cosine_matrix(z_img, z_fmri):
    """Cosine similarities (K, K) between image embeddings (rows) and fMRI embeddings (columns)."""
    a = torch.nn.functional.normalize(torch.as_tensor(z_img, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(z_fmri, dtype=torch.float64), dim=1)
    return a @ b.T


def infonce_bounds(cos, taus, chunk_size=None):
    """InfoNCE bound in nats for each temperature, vectorised over ``taus``.

    I >= mean_i log(e^{c_ii} / ((1/K) sum_j e^{c_ij})), c_ij = cos_ij / tau.

    Parameters
    ----------
    cos : tensor (K, K), image i against fMRI j.
    taus : array (T,).
    chunk_size : temperatures per block (default: about 2^24 floats per block).

    Returns
    -------
    bounds : np.ndarray float64 (T,), each at most log K.
    """
    cos = torch.as_tensor(cos, dtype=torch.float64)
    k = cos.shape[0]
    if cos.ndim != 2 or cos.shape[1] != k or k < 2:
        raise utils.UserError(f"the MI bound needs K >= 2 matched pairs, got a similarity matrix of shape {tuple(cos.shape)}")
    inv = 1.0 / torch.as_tensor(np.asarray(taus, dtype=np.float64).reshape(-1))
    chunk_size = chunk_size or max(1, 2 ** 24 // (k * k))
    diag = torch.diagonal(cos)
    out = []
    for start in range(0, len(inv), chunk_size):
        c = cos[None] * inv[start:start + chunk_size, None, None]
        out.append(((diag[None] * inv[start:start + chunk_size, None]) - torch.logsumexp(c, dim=2)).mean(1))
    return (torch.cat(out) + np.log(k)).numpy()


def mi_lower_bound(z_img, z_fmri, temperature=TEMPERATURE, betas=BETAS):
    """The InfoNCE MI bound on matched test pairs, unscaled and with post-hoc temperature scaling.

    The scaled bound is the best over tau' = temperature * beta for beta in ``betas`` and
    beta = 1, so it is never below the unscaled one.

    Parameters
    ----------
    z_img, z_fmri : arrays (K, z), row i of both comes from test image i.

    Returns
    -------
    dict with K, log_K, nats, bits, scaled_nats, scaled_bits, best_beta, best_tau (floats / int).
    """
    cos = cosine_matrix(z_img, z_fmri)
    betas = np.union1d(np.asarray(betas, dtype=np.float64), [1.0])
    unscaled = float(infonce_bounds(cos, [temperature])[0])
    scaled = infonce_bounds(cos, temperature * betas)
    best = int(np.argmax(scaled))
    k = cos.shape[0]
    return {"K": int(k), "log_K": float(np.log(k)), "nats": unscaled, "bits": unscaled / np.log(2),
            "scaled_nats": float(scaled[best]), "scaled_bits": float(scaled[best] / np.log(2)),
            "best_beta": float(betas[best]), "best_tau": float(temperature * betas[best])}
