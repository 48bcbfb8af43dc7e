"""Downstream analyses: classification probes, the InfoNCE MI bound, embeddings, the landscape, Grad-CAM.

``generate_results.py``, ``figures.py`` and the landscape notebook call these functions;
the encoding results themselves are read and written by encoding_results.py. In order:
numerics (plain arrays in, plain arrays out; bad arguments raise ValueError), loading
(datasets, saved predictions), then the tasks that ``generate_results.py`` runs (user
errors are safe_io.UserError).
"""

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torchvision.datasets as tvd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision import transforms
import encoding_results
import models
import options
import safe_io
import utils

# The classification probe's layer: ReLU(fc7) of AlexNet.
PROBE_LAYER = "classifier.5"
# Post-hoc temperatures of the MI bound: tau' = TEMPERATURE * beta.
TEMPERATURE = 0.3
BETAS = np.logspace(-2, 2, 1000)


class Embedding(NamedTuple):
    """Points of an embedding (n, n_components) and the eigenvalues (n_components,) of its axes."""
    coords: np.ndarray
    eigenvalues: np.ndarray


class DatasetImages(NamedTuple):
    """A classification dataset: uint8 images (n, S, S, 3), int64 labels (n,) and class names."""
    images: np.ndarray
    labels: np.ndarray
    classes: list


class Predictions(NamedTuple):
    """Saved test probabilities: model names, probs (n_models, n_test, n_classes), labels (n_test,), metas."""
    names: list
    probs: np.ndarray
    labels: np.ndarray
    metas: list


class ClassificationTables(NamedTuple):
    """Probe accuracies {hemisphere: DataFrame ROI x subject} and the untuned accuracy."""
    tables: dict
    untuned: float


class MITables(NamedTuple):
    """MI bounds of the tuned models and of their untuned references, each a DataFrame ROI x subject."""
    tuned: pd.DataFrame
    untuned: pd.DataFrame


# --- Numerics: landscape (Bhattacharyya distances and embeddings) ------------------

def bhattacharyya_distances(probs, chunk_size=64, device="cpu"):
    """Mean Bhattacharyya distance between every pair of models' class probabilities.

    d(u, v) = mean_n -log sum_c sqrt(p_u[n, c] p_v[n, c]). The samples are processed in
    blocks, each one batched matrix product, so memory stays at about
    n_models * chunk_size * (n_classes + n_models) float64 whatever the test-set size.

    Parameters
    ----------
    probs : array (n_models, n_samples, n_classes), rows summing to 1.
    chunk_size : int, samples per block.
    device : torch device of the computation.

    Returns
    -------
    distances : np.ndarray float64 (n_models, n_models), symmetric, non-negative, zero diagonal.
    """
    if np.ndim(probs) != 3:
        raise ValueError(f"probabilities have shape {np.shape(probs)}: expected (n_models, n_samples, n_classes)")
    n_models, n_samples, _ = np.shape(probs)
    total = torch.zeros(n_models, n_models, dtype=torch.float64, device=device)
    tiny = np.finfo(np.float64).tiny
    for start in range(0, n_samples, chunk_size):
        block = torch.as_tensor(np.asarray(probs[:, start:start + chunk_size]), dtype=torch.float64, device=device)
        if (block < 0).any() or not torch.isfinite(block).all():
            raise ValueError("probabilities must be finite and non-negative: pass predict_proba outputs")
        roots = block.sqrt().transpose(0, 1)
        coef = torch.bmm(roots, roots.transpose(1, 2))
        total -= torch.log(coef.clamp_min(tiny)).sum(0)
    out = (total / n_samples).cpu().numpy()
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
    Embedding of
    coords : np.ndarray (n, n_components), eigenvector * sqrt(|eigenvalue|).
    eigenvalues : np.ndarray (n_components,), signed, in the order of ``coords``.
    """
    vals, vecs = np.linalg.eigh(double_centre(distances))
    order = np.argsort(-np.abs(vals))[:n_components]
    return Embedding(vecs[:, order] * np.sqrt(np.abs(vals[order])), vals[order])


def classical_mds(distances, n_components=2):
    """Classical (Torgerson) MDS of a matrix of distances (squared inside).

    Returns
    -------
    Embedding of
    coords : np.ndarray (n, n_components), eigenvector * sqrt(max(eigenvalue, 0)).
    eigenvalues : np.ndarray (n_components,), the largest, in decreasing order.
    """
    vals, vecs = np.linalg.eigh(double_centre(np.asarray(distances, dtype=np.float64) ** 2))
    order = np.argsort(-vals)[:n_components]
    return Embedding(vecs[:, order] * np.sqrt(np.maximum(vals[order], 0.0)), vals[order])


def embed(distances, method="inpca", n_components=2):
    """``inpca`` or ``classical_mds`` (method 'mds') of a distance matrix."""
    if method == "inpca":
        return inpca(distances, n_components)
    if method == "mds":
        return classical_mds(distances, n_components)
    raise ValueError(f"unknown embedding {method!r}: use 'inpca' or 'mds'")


# --- Numerics: InfoNCE lower bound on mutual information ---------------------------

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
        raise ValueError(f"the MI bound needs K >= 2 matched pairs, got a similarity matrix of shape {tuple(cos.shape)}")
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
    dict with K, log_K, log2_K, nats, bits, scaled_nats, scaled_bits, best_beta, best_tau (floats / int).
    """
    cos = cosine_matrix(z_img, z_fmri)
    betas = np.union1d(np.asarray(betas, dtype=np.float64), [1.0])
    unscaled = float(infonce_bounds(cos, [temperature])[0])
    scaled = infonce_bounds(cos, temperature * betas)
    best = int(np.argmax(scaled))
    k = cos.shape[0]
    return {"K": int(k), "log_K": float(np.log(k)), "log2_K": float(np.log2(k)), "nats": unscaled, "bits": unscaled / np.log(2),
            "scaled_nats": float(scaled[best]), "scaled_bits": float(scaled[best] / np.log(2)),
            "best_beta": float(betas[best]), "best_tau": float(temperature * betas[best])}


# --- Numerics: classification probes and Grad-CAM ----------------------------------

def fit_probe(features, labels, train, test, n_classes):
    """StandardScaler + LogisticRegression(max_iter=5000) fitted on ``train``, scored on ``test``.

    Parameters
    ----------
    features : array (n, d). labels : int array (n,). train, test : row indices.
    n_classes : int, width of the returned probabilities (classes absent from train get 0).

    Returns
    -------
    dict with accuracy (float), probs (n_test, n_classes) float32, and the fitted head:
    mean, scale (d,), coef (n_seen, d), intercept (n_seen,), classes (n_seen,), all float32 / int64.
    """
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    pipe.fit(features[train], labels[train])
    probs = np.zeros((len(test), n_classes), dtype=np.float32)
    probs[:, pipe.classes_] = pipe.predict_proba(features[test])
    scaler, lr = pipe[0], pipe[1]
    coef, intercept = lr.coef_, lr.intercept_
    if len(lr.classes_) == 2:
        # sklearn keeps one row for two classes; the softmax of (-w, w) / 2 is the same model.
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    return {"accuracy": float(np.mean(pipe.predict(features[test]) == labels[test])), "probs": probs,
            "mean": scaler.mean_.astype(np.float32), "scale": scaler.scale_.astype(np.float32),
            "coef": coef.astype(np.float32), "intercept": intercept.astype(np.float32),
            "classes": lr.classes_.astype(np.int64)}


def probe_head(probe):
    """A torch Linear computing the probe's logits from raw fc7 features (scaler folded in)."""
    coef = torch.from_numpy(np.asarray(probe["coef"], dtype=np.float32))
    scale = torch.from_numpy(np.asarray(probe["scale"], dtype=np.float32))
    mean = torch.from_numpy(np.asarray(probe["mean"], dtype=np.float32))
    head = torch.nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        head.weight.copy_(coef / scale)
        head.bias.copy_(torch.from_numpy(np.asarray(probe["intercept"], dtype=np.float32)) - (coef / scale) @ mean)
    return head.eval()


def fc7(alexnet, x):
    """ReLU(fc7) of a torchvision AlexNet, differentiable: (B, 3, S, S) -> (B, 4096)."""
    return alexnet.classifier[:6](torch.flatten(alexnet.avgpool(alexnet.features(x)), 1))


def grad_cam(alexnet, head, x, target=None, layer="features.12"):
    """Grad-CAM (Selvaraju et al. 2017) of ``head(fc7(alexnet, x))`` at ``layer``.

    Parameters
    ----------
    head : module mapping fc7 features to class logits (see ``probe_head``).
    x : tensor (B, 3, S, S), normalised images.
    target : logit column per image (tensor (B,)); default the predicted class (salience_maps
        passes the true class, as the authors).

    Returns
    -------
    cam : tensor (B, S, S) in [0, 1]. target : tensor (B,).
    """
    acts = []
    handle = alexnet.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        with torch.enable_grad():
            logits = head(fc7(alexnet.eval(), x))
            target = logits.argmax(1) if target is None else torch.as_tensor(target).reshape(-1)
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts[0])
    finally:
        handle.remove()
    weights = grad.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * acts[0]).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None], target


# --- Loading: classification datasets ----------------------------------------------

def dataset_folder(root, name):
    """Where a classification dataset lives: ROOT/datasets/<name>."""
    return Path(root) / "datasets" / name


def dataset_samples(root, name):
    """The (path, label) samples and class names of a local classification dataset.

    caltech256 is an ImageFolder (class sub-folders); places365 is torchvision's
    Places365 validation split (small images); imagenet is torchvision's ImageNet
    validation split (devkit and val archive, or the prepared folder); sun397 is
    torchvision's SUN397. Nothing is downloaded.

    Returns
    -------
    samples : list of (str, int), in the dataset's own order.
    classes : list of str.
    """
    if name not in utils.CLASSIFICATION_DATASETS:
        raise safe_io.UserError(f"unknown dataset {name!r}: use one of {', '.join(utils.CLASSIFICATION_DATASETS)}")
    folder = safe_io.require_dir(dataset_folder(root, name), f"put the {name} dataset there (see README)")
    try:
        if name == "caltech256":
            ds = tvd.ImageFolder(folder)
            samples, classes = ds.samples, ds.classes
        elif name == "places365":
            ds = tvd.Places365(folder, split="val", small=True, download=False)
            samples, classes = ds.imgs, ds.classes
        elif name == "imagenet":
            ds = tvd.ImageNet(folder, split="val")
            samples, classes = ds.samples, [c[0] for c in ds.classes]
        else:
            ds = tvd.SUN397(folder, download=False)
            samples, classes = list(zip(map(str, ds._image_files), ds._labels)), ds.classes
    except (RuntimeError, FileNotFoundError) as e:
        raise safe_io.UserError(f"cannot read the {name} dataset in {folder} ({str(e).splitlines()[0]}): "
                              "place the files as the README shows") from None
    if not samples:
        raise safe_io.UserError(f"no images found in {folder}: place the {name} images there (see README)")
    return [(str(p), int(y)) for p, y in samples], list(classes)


def crop_transform(image_size=224):
    """Resize(256) + CenterCrop(224), scaled to ``image_size`` (the probe protocol)."""
    return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)])


def decode_cropped(path, image_size):
    """Decode one image as RGB with ``crop_transform``: uint8 (image_size, image_size, 3)."""
    return np.asarray(crop_transform(image_size)(safe_io.read_image(path)), dtype=np.uint8)


def dataset_images(root, name, image_size=224, workers=None):
    """Decode and crop a classification dataset once into a memory-mapped uint8 cache.

    The cache (under ROOT/cache) is keyed by the file names, sizes, mtimes and image size.

    Returns
    -------
    DatasetImages of
    images : np.memmap uint8 (n, image_size, image_size, 3).
    labels : np.ndarray int64 (n,).
    classes : list of str.
    """
    samples, classes = dataset_samples(root, name)
    paths = [p for p, _ in samples]
    labels = np.array([y for _, y in samples], dtype=np.int64)
    images = utils.image_cache(paths, image_size, utils.cache_dir(root), name=f"{name}_crop",
                               workers=workers, decode=decode_cropped)
    return DatasetImages(images, labels, classes)


# --- Loading: model names, saved predictions and summaries -------------------------

def model_name(method, subj=None, hemisphere=None, roi=None, epochs=None):
    """File stem naming one feature extractor: 'untuned', 'subj1_lh_V1v_cl-tuned_e30', 'lh_V1v_pooled-avg_e30'."""
    if method == "untuned":
        return "untuned"
    h = utils.hemi_code(hemisphere)
    if method.startswith("pooled"):
        return f"{h}_{roi}_{method}_e{int(epochs)}"
    return f"subj{int(subj)}_{h}_{roi}_{method}_e{int(epochs)}"


def summary_stem(method, subj, hemisphere, epochs):
    """Stem of a per-ROI summary file of one method (pooled models have no subject)."""
    h = utils.hemi_code(hemisphere)
    if method.startswith("pooled"):
        return f"{h}_{method}_e{int(epochs)}"
    return f"subj{int(subj)}_{h}_{method}_e{int(epochs)}"


def preds_path(root, dataset, name):
    return utils.classification_preds_dir(root) / dataset / f"{name}.npz"


def probe_path(root, dataset, name):
    return utils.results_dir(root) / "classification" / dataset / "probes" / f"{name}.npz"


def save_predictions(root, dataset, name, probe, labels, meta):
    """Write a model's test probabilities, labels, accuracy and meta (plain strings / numbers)."""
    with safe_io.atomic_path(preds_path(root, dataset, name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, probs=probe["probs"], labels=labels, accuracy=probe["accuracy"], meta=json.dumps(meta))


def load_predictions(root, dataset, names=None):
    """Every saved model's test probabilities for a dataset (or those in ``names``).

    Returns
    -------
    Predictions of
    names : list of str (sorted, 'untuned' included when present).
    probs : np.ndarray float32 (n_models, n_test, n_classes).
    labels : np.ndarray int64 (n_test,).
    metas : list of dict, each with 'accuracy' added.
    """
    folder = safe_io.require_dir(utils.classification_preds_dir(root) / dataset,
                               f"run generate_results.py --type classification-task --dataset {dataset} first")
    files = sorted(folder.glob("*.npz")) if names is None else [preds_path(root, dataset, n) for n in names]
    if not files:
        raise safe_io.UserError(f"no saved predictions in {folder}: run generate_results.py --type classification-task first")
    probs, metas, labels = [], [], None
    for f in files:
        with np.load(safe_io.require_file(f, "run generate_results.py --type classification-task for that model")) as z:
            if labels is not None and not np.array_equal(z["labels"], labels):
                raise safe_io.UserError(f"{f} was scored on other test images than {files[0]}: rerun with --overwrite")
            labels = z["labels"]
            probs.append(z["probs"])
            metas.append({**json.loads(str(z["meta"])), "accuracy": float(z["accuracy"])})
    return Predictions([f.stem for f in files], np.stack(probs), labels, metas)


def _summary_files(folder, method, epochs):
    """{hemisphere: [(column, path)]} of the per-subject (or pooled) summaries of a method."""
    out = {}
    for h in utils.HEMISPHERES:
        if method.startswith("pooled"):
            files = [("pooled", folder / f"{h}_{method}_e{int(epochs)}.json")]
        else:
            files = [(f"subj{p.name.split('_')[0][4:]}", p)
                     for p in sorted(folder.glob(f"subj*_{h}_{method}_e{int(epochs)}.json"))]
        files = [(c, p) for c, p in files if p.is_file()]
        if files:
            out[h] = sorted(files, key=lambda cp: (len(cp[0]), cp[0]))
    return out


SUMMARY_FIX = "delete it, or rerun that --type with --overwrite"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_bounds(result):
    """Whether ``result`` is {'tuned': bound, 'untuned': bound}, each a dict of numbers with 'scaled_bits'."""
    return isinstance(result, dict) and all(isinstance(result.get(m), dict) and "scaled_bits" in result[m]
                                            and all(map(_is_number, result[m].values())) for m in ("tuned", "untuned"))


def read_summary(path, kind):
    """A per-ROI summary JSON, checked: 'classification' ({'untuned': accuracy, 'rois': {roi: accuracy}}, as
    classification_task writes it) or 'mi' ({'rois': {roi: {subject: {'tuned': bound, 'untuned': bound}}}},
    bound as mi_lower_bound, as mi_task writes it). An empty or corrupt file, or another structure, is a
    UserError naming it."""
    summary = safe_io.read_json(path, SUMMARY_FIX)
    rois = summary.get("rois")
    if kind == "classification":
        valid = (_is_number(summary.get("untuned")) and isinstance(rois, dict)
                 and all(_is_number(v) for v in rois.values()))
    else:
        valid = isinstance(rois, dict) and all(isinstance(per_subj, dict) and all(map(_is_bounds, per_subj.values()))
                                               for per_subj in rois.values())
    if not valid or not set(rois) <= set(utils.ROIS):
        raise safe_io.UserError(f"{path} is not a {kind} summary of this project: {SUMMARY_FIX}")
    return summary


def _roi_table(columns):
    """DataFrame (ROIs in canonical order, present ones only) x columns from {column: {roi: value}}."""
    table = pd.DataFrame(columns, dtype=float)
    return table.reindex([r for r in utils.ROIS if r in table.index])


def classification_tables(root, dataset, method, epochs):
    """ClassificationTables: accuracy tables {hemisphere: DataFrame ROI x subject} and the untuned accuracy."""
    files = _summary_files(utils.results_dir(root) / "classification" / dataset, method, epochs)
    if not files:
        raise safe_io.UserError(f"no {method} classification results for {dataset} under {utils.results_dir(root)}: "
                              "run generate_results.py --type classification-task first")
    tables, untuned = {}, None
    for h, cols in files.items():
        summaries = {c: read_summary(p, "classification") for c, p in cols}
        untuned = next(iter(summaries.values()))["untuned"]
        tables[h] = _roi_table({c: s["rois"] for c, s in summaries.items()})
    return ClassificationTables(tables, untuned)


def mi_tables(root, method, epochs, value="scaled_bits"):
    """MI-bound tables {hemisphere: MITables(tuned, untuned)}, each a DataFrame ROI x subject of ``value``."""
    files = _summary_files(utils.results_dir(root) / "mi_bounds", method, epochs)
    if not files:
        raise safe_io.UserError(f"no {method} MI bounds under {utils.results_dir(root) / 'mi_bounds'}: "
                              "run generate_results.py --type lower-bound-mi first")
    tables = {}
    for h, cols in files.items():
        tuned, untuned = {}, {}
        for _, p in cols:
            for roi, per_subj in read_summary(p, "mi")["rois"].items():
                for s, res in per_subj.items():
                    tuned.setdefault(f"subj{s}", {})[roi] = res["tuned"][value]
                    untuned.setdefault(f"subj{s}", {})[roi] = res["untuned"][value]
        tables[h] = MITables(_roi_table(tuned), _roi_table(untuned))
    return tables


# --- Loading: voxel counts ---------------------------------------------------------

def voxel_counts(root, subjects=None):
    """Voxel count of every (subject, hemisphere, ROI): a pandas DataFrame with columns
    subject, hemisphere, roi, roi_class, n_voxels (0 for an ROI absent in a subject)."""
    rows = []
    for subj in subjects or utils.find_subjects(root):
        for h in utils.HEMISPHERES:
            for roi in utils.ROIS:
                rows.append({"subject": int(subj), "hemisphere": h, "roi": roi, "roi_class": utils.ROI_CLASS[roi],
                             "n_voxels": utils.roi_voxel_count(root, subj, h, roi)})
    return pd.DataFrame(rows)


# --- Tasks run by generate_results.py: classification ------------------------------

def large_enough(root, method, subj, hemisphere, roi, min_voxels=utils.MIN_VOXELS):
    """Whether an ROI is analysed: at least ``min_voxels`` voxels in the subject (pooled models:
    always, as the authors' probes of them)."""
    return method.startswith("pooled") or utils.roi_voxel_count(root, subj, hemisphere, roi) >= min_voxels


def select_rois(root, method, subj, hemisphere, rois, epochs, min_voxels=utils.MIN_VOXELS, image_size=None,
                flag="--min-voxels"):
    """The ROIs to process: ``rois`` as given (each must have a checkpoint and at least ``min_voxels``
    voxels), or every ROI with a checkpoint and at least ``min_voxels`` voxels (the authors' filter).

    Every chosen ROI's checkpoint is checked against the request (models.tuned_meta; ``image_size``
    None: the task uses the checkpoint's) before the task does any work. ``flag`` names the
    threshold's option in the error.
    """
    if method not in utils.METHOD_SCRIPTS:
        raise safe_io.UserError(f"method {method!r} has no per-ROI checkpoints: use one of {', '.join(utils.METHOD_SCRIPTS)}")
    if rois:
        for roi in rois:
            path = utils.method_checkpoint_path(root, method, subj, hemisphere, utils.check_roi(roi), epochs)
            safe_io.require_file(path, f"make it with python {utils.METHOD_SCRIPTS[method]}")
            if not large_enough(root, method, subj, hemisphere, roi, min_voxels):
                raise safe_io.UserError(f"ROI {roi} has fewer than {min_voxels} voxels in "
                                      f"{utils.hemi_code(hemisphere)} of {utils.subj_dir(subj)}: "
                                      f"drop it or lower {flag}")
        found = list(rois)
    else:
        found = [r for r in utils.ROIS
                 if utils.method_checkpoint_path(root, method, subj, hemisphere, r, epochs).is_file()
                 and large_enough(root, method, subj, hemisphere, r, min_voxels)]
    if not found:
        example = utils.method_checkpoint_path(root, method, subj, hemisphere, "V1v", epochs)
        raise safe_io.UserError(f"no {method} checkpoints like {example}: train them with {utils.METHOD_SCRIPTS[method]}")
    for roi in found:
        models.tuned_meta(root, method, subj, hemisphere, roi, epochs, image_size)
    return found


def _load_summary(path, kind, overwrite):
    """The summary to continue (read_summary), or an empty one with ``overwrite`` or none yet."""
    if path.is_file() and not overwrite:
        return read_summary(path, kind)
    return {"rois": {}}


def _weights_tag(weights, seed):
    w = str(weights)
    if w.lower() == "none":
        return f"none-seed{seed}"
    return w.lower() if w.lower() == "imagenet" else Path(w).stem


def probe_features(alexnet, images, device="cpu", batch_size=256, precision="fp32"):
    """ReLU(fc7) features of every image: float32 (n, 4096)."""
    return utils.extract_features(alexnet, images, batch_size, device, layers=[PROBE_LAYER],
                                  precision=precision)[PROBE_LAYER]


def untuned_features(root, dataset, images, weights, seed, device, batch_size, precision="fp32"):
    """fc7 features of the untuned AlexNet, computed once per dataset, image size, weights and precision."""
    tag = _weights_tag(weights, seed) + ("" if precision == "fp32" else f"-{precision}")
    path = Path(images.filename).with_name(f"{Path(images.filename).stem}_untuned-{tag}_fc7.npy")
    cached = safe_io.cached_array(path, (len(images), utils.LAYER_DIMS[PROBE_LAYER]), np.float32)
    if cached is not None:
        return cached
    alexnet = utils.load_alexnet(weights, seed)
    safe_io.atomic_np_save(probe_features(alexnet, images, device, batch_size, precision), path)
    return np.load(path, mmap_mode="r")


def _score_model(root, dataset, name, feats, labels, train, test, n_classes, meta):
    probe = fit_probe(feats, labels, train, test, n_classes)
    with safe_io.atomic_path(probe_path(root, dataset, name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: probe[k] for k in ("mean", "scale", "coef", "intercept", "classes")})
    save_predictions(root, dataset, name, probe, labels[test], meta)
    return probe["accuracy"]


def classification_task(root, dataset, method, subj, hemisphere, rois, epochs, weights="imagenet",
                        device="cpu", image_size=224, batch_size=256, seed=0, overwrite=False,
                        precision="fp32", min_voxels=utils.ANALYSIS_MIN_VOXELS):
    """Probe accuracy of the untuned AlexNet and of one tuned model per ROI on a dataset.

    ROIs come from ``select_rois`` (at least ``min_voxels`` voxels, the authors' 20; pooled
    models: every ROI they were trained on); features are extracted
    in ``precision`` (fp32, the authors', or bf16). The untuned probe is refitted only when
    its saved weights, image size or precision differ.
    Writes classification_preds/<dataset>/<model>.npz per model, the probes under
    results/classification/<dataset>/probes/, and results/classification/<dataset>/<summary>.json
    ({'untuned': acc, 'rois': {roi: acc}}) after each ROI; finished ROIs are skipped
    unless ``overwrite``.

    Returns
    -------
    summary : dict.
    """
    rois = select_rois(root, method, subj, hemisphere, rois, epochs, min_voxels, image_size, "--analysis-min-voxels")
    images, labels, classes = dataset_images(root, dataset, image_size)
    train, test = utils.train_test_split(len(labels))
    out = utils.results_dir(root) / "classification" / dataset / f"{summary_stem(method, subj, hemisphere, epochs)}.json"
    summary = _load_summary(out, "classification", overwrite)
    untuned_meta = {"method": "untuned", "weights": _weights_tag(weights, seed), "image_size": image_size,
                    "precision": precision}
    saved = load_predictions(root, dataset, ["untuned"]).metas[0] if preds_path(root, dataset, "untuned").is_file() else {}
    if overwrite or {k: saved.get(k) for k in untuned_meta} != untuned_meta:
        feats = untuned_features(root, dataset, images, weights, seed, device, batch_size, precision)
        saved["accuracy"] = _score_model(root, dataset, "untuned", feats, labels, train, test, len(classes), untuned_meta)
    summary["untuned"] = saved["accuracy"]
    for roi in options.progress(rois, f"classification {dataset}"):
        name = model_name(method, subj, hemisphere, roi, epochs)
        if roi in summary["rois"] and preds_path(root, dataset, name).is_file() and not overwrite:
            continue
        alexnet, _ = models.load_feature_alexnet(root, method, subj, hemisphere, roi, epochs, weights=weights,
                                                 device=device, seed=seed, image_size=image_size)
        feats = probe_features(alexnet, images, device, batch_size, precision)
        meta = {"method": method, "subj": None if method.startswith("pooled") else int(subj),
                "hemisphere": utils.hemi_code(hemisphere), "roi": roi, "epochs": int(epochs), "image_size": image_size,
                "precision": precision}
        summary["rois"][roi] = _score_model(root, dataset, name, feats, labels, train, test, len(classes), meta)
        safe_io.atomic_json_dump(summary, out)
    safe_io.atomic_json_dump(summary, out)
    return summary


# --- Tasks: MI bound ---------------------------------------------------------------

@torch.no_grad()
def embed_pairs(model, data, indices, device="cpu", batch_size=256, subj=None, precision="fp32"):
    """Image and fMRI embeddings of rows ``indices`` of a SubjectData, in increasing row order.

    ``subj`` selects the fMRI map of a pooled model (a CL model ignores it); ``precision`` fp32 (the
    authors') or bf16.
    Returns two float32 arrays (n, z).
    """
    model = model.to(device).eval()
    z_img, z_fmri = [], []
    for x, y in utils.iterate_batches(data.images, data.fmri, np.sort(indices), batch_size, device):
        with utils.autocast(device, precision):
            z_img.append(model.embed_images(x).float().cpu())
            z_fmri.append(model.embed_fmri(y, subj).float().cpu())
    return torch.cat(z_img).numpy(), torch.cat(z_fmri).numpy()


def mi_task(root, method, subj, hemisphere, rois, epochs, device="cpu", batch_size=256, overwrite=False,
            precision="fp32", min_voxels=utils.ANALYSIS_MIN_VOXELS):
    """InfoNCE MI bound on each subject's test split, for the tuned model and for the same model before tuning.

    The untuned reference is the checkpoint's architecture built afresh with its
    weights and seed: the untuned AlexNet with the initial maps and head. As in the
    authors' code, the bound's subject needs ``min_voxels`` voxels (20): smaller ROIs, and
    a pooled model's smaller subjects, are left out. Writes
    results/mi_bounds/<summary>.json ({'rois': {roi: {subject: {'tuned': bound,
    'untuned': bound}}}}, bound as ``mi_lower_bound``) after each ROI.

    Returns
    -------
    summary : dict.
    """
    if method not in ("cl-tuned", "pooled-avg", "pooled-const"):
        raise safe_io.UserError(f"the MI bound needs an fMRI embedding, which {method} models lack: "
                              "use --method cl-tuned or a lower-bound-mi-pooled-* type")
    rois = select_rois(root, method, subj, hemisphere, rois, epochs, min_voxels, flag="--analysis-min-voxels")
    out = utils.results_dir(root) / "mi_bounds" / f"{summary_stem(method, subj, hemisphere, epochs)}.json"
    summary = _load_summary(out, "mi", overwrite)
    for roi in options.progress(rois, "MI bound"):
        if roi in summary["rois"] and not overwrite:
            continue
        model, meta = models.load_tuned(root, method, subj, hemisphere, roi, epochs, device)
        reference = models.build_model(meta)
        trained_on = models.checkpoint_voxels(meta)
        result = {}
        for s, voxels in trained_on.items():
            if meta["method"].startswith("pooled") and utils.roi_voxel_count(root, s, hemisphere, roi) < min_voxels:
                continue
            data = utils.SubjectData(root, s, hemisphere, voxels, meta["image_size"])
            try:
                result[str(s)] = {name: mi_lower_bound(*embed_pairs(m, data, data.test, device, batch_size, s,
                                                                    precision))
                                  for name, m in (("tuned", model), ("untuned", reference))}
            except ValueError as e:
                raise safe_io.UserError(f"{utils.subj_dir(s)}: {e}: use a dataset with more test images") from None
        summary["rois"][roi] = result
        safe_io.atomic_json_dump(summary, out)
    safe_io.atomic_json_dump(summary, out)
    return summary


# --- Tasks: embeddings, test fMRI, random ROIs -------------------------------------

def best_encoding_layer(root, method, subj, hemisphere, roi):
    """The best layer fit_encoding_models.py chose for a method on its own subject and ROI."""
    path = encoding_results.result_path(root, subj, method, hemisphere, roi).with_suffix(".json")
    fix = f"run fit_encoding_models.py --method {method} --subj {int(subj)} first"
    layer = safe_io.read_json(safe_io.require_file(path, fix), fix).get("best_layer")
    if layer not in utils.LAYERS:
        raise safe_io.UserError(f"{path} records no best layer (the ROI was absent or too small): choose --embedding-layer")
    return layer


def _model_outputs(forward, images, rows, batch_size=256, device="cpu", precision="fp32"):
    """``forward`` of the normalised images ``rows`` (in that order): float32 (len(rows), d)."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            x = utils.normalize_images(np.ascontiguousarray(images[rows[start:start + batch_size]]), device)
            with utils.autocast(device, precision):
                chunks.append(forward(x).float().cpu())
    return torch.cat(chunks).numpy()


def split_rows(n_images, split="test"):
    """Rows of a subject's images in an export: the test split in split order (the authors'), or all, sorted."""
    if split not in utils.EMBEDDING_SPLITS:
        raise safe_io.UserError(f"unknown split {split!r}: use test (the authors') or all")
    return utils.train_test_split(n_images)[1] if split == "test" else np.arange(n_images)


def save_embeddings(root, method, subj, hemisphere, rois, epochs, layer=PROBE_LAYER, split="test", weights="imagenet",
                    device="cpu", image_size=224, batch_size=256, seed=0, overwrite=False, precision="fp32",
                    min_voxels=utils.MIN_VOXELS):
    """Embeddings of a subject's images, one float32 (n_rows, d) .npy per model, with the NSD ids of the rows.

    The default is the authors' export: fc7 (``classifier.5``, after ReLU) of the test
    split, in split order, so that row i matches row i of ``save_test_fmri``. ``layer``
    may also be '' (the model's own output: CL image embedding, regression prediction,
    untuned fc8), 'best' (the layer fit_encoding_models.py chose for that model and ROI)
    or any of utils.LAYERS; ``split`` 'all' takes every image in sorted file order (the
    fMRI row order). Files: results/embeddings/<model>_<layer or 'output'>_<split>.npy
    (the untuned model is 'subjX_untuned') and results/embeddings/subjX_<split>_nsd_ids.npy.
    Returns the paths written or found, the ids file first.
    """
    if method not in ("untuned", "cl-tuned", "reg-tuned"):
        raise safe_io.UserError(f"save-embeddings takes --method untuned, cl-tuned or reg-tuned, not {method!r}")
    if layer and layer != "best" and layer not in utils.LAYERS:
        raise safe_io.UserError(f"unknown layer {layer!r}: use '' (the model output), 'best' or one of {', '.join(utils.LAYERS)}")
    if layer == "best" and method == "untuned":
        raise safe_io.UserError("--embedding-layer best needs an ROI's encoding result: use it with cl-tuned or reg-tuned")
    todo = [None] if method == "untuned" else select_rois(root, method, subj, hemisphere, rois, epochs, min_voxels,
                                                          image_size)
    layers = [best_encoding_layer(root, method, subj, hemisphere, roi) if layer == "best" else layer for roi in todo]
    paths = utils.list_images(root, subj)
    rows = split_rows(len(paths), split)
    images = utils.subject_images(root, subj, image_size)
    folder = utils.results_dir(root) / "embeddings"
    out = [folder / f"subj{int(subj)}_{split}_nsd_ids.npy"]
    safe_io.atomic_np_save(utils.nsd_ids(paths)[rows], out[0])
    for roi, roi_layer in zip(options.progress(todo, "embeddings"), layers):
        name = f"subj{int(subj)}_untuned" if roi is None else model_name(method, subj, hemisphere, roi, epochs)
        path = folder / f"{name}_{roi_layer or 'output'}_{split}.npy"
        out.append(path)
        if path.is_file() and not overwrite:
            continue
        if roi is None:
            model = alexnet = utils.load_alexnet(weights, seed)
        else:
            model, _ = models.load_tuned(root, method, subj, hemisphere, roi, epochs, device, image_size)
            alexnet = model.alexnet
        if roi_layer:
            emb = utils.extract_features(alexnet, images, batch_size, device, [roi_layer], rows, precision)[roi_layer]
        else:
            model = model.to(device).eval()
            emb = _model_outputs(model.embed_images if method == "cl-tuned" else model, images, rows,
                                 batch_size, device, precision)
        safe_io.atomic_np_save(emb.astype(np.float32), path)
    return out


def save_test_fmri(root, subjects, hemispheres, rois, overwrite=False, min_voxels=utils.MIN_VOXELS):
    """The test-split fMRI of each ROI (rows in test-split order), with the test indices and NSD ids.

    Rows line up with ``save_embeddings``'s default (test split) export. Files:
    results/test_fmri/subjX_<h>_<roi>.npy (n_test, n_voxels), results/test_fmri/subjX_test_indices.npy
    and subjX_test_nsd_ids.npy. ``rois`` empty means every ROI with at least ``min_voxels`` voxels.
    Every input (images, ROI sizes, fMRI files and their NaN or Inf) of every subject and
    hemisphere is checked before the first file is written. Returns the paths written or found.
    """
    folder = utils.results_dir(root) / "test_fmri"
    jobs = []
    for subj in subjects:
        image_paths = utils.list_images(root, subj)
        ids = utils.nsd_ids(image_paths)
        for hemisphere in hemispheres:
            h = utils.hemi_code(hemisphere)
            todo = {}
            for roi in rois or utils.ROIS:
                voxels = utils.roi_voxel_indices(root, subj, h, roi)
                if len(voxels) < min_voxels:
                    if rois:
                        raise safe_io.UserError(f"ROI {roi} has {len(voxels)} voxels in {h} of {utils.subj_dir(subj)}, "
                                              f"fewer than MIN_VOXELS={min_voxels}: choose a larger ROI or lower "
                                              "--min-voxels")
                    continue
                todo[folder / f"subj{int(subj)}_{h}_{roi}.npy"] = voxels
            pending = {p: v for p, v in todo.items() if overwrite or not p.is_file()}
            if pending:
                _test_fmri(root, subj, h, pending, len(image_paths))
            jobs.append((subj, h, ids, todo, pending))
    paths = []
    for subj, h, ids, todo, pending in jobs:
        test = split_rows(len(ids), "test")
        index_paths = [folder / f"subj{int(subj)}_test_indices.npy", folder / f"subj{int(subj)}_test_nsd_ids.npy"]
        safe_io.atomic_np_save(test, index_paths[0])
        safe_io.atomic_np_save(ids[test], index_paths[1])
        fmri = _test_fmri(root, subj, h, pending, len(ids)) if pending else {}
        for path, values in fmri.items():
            safe_io.atomic_np_save(values[test], path)
        paths += index_paths + list(todo)
    return paths


def _test_fmri(root, subj, hemisphere, columns, n_images):
    """dict key -> fMRI (n_images, len(voxels)) of each ``columns`` key's voxels, from one checked read."""
    voxels = np.unique(np.concatenate(list(columns.values())))
    fmri = utils.load_fmri(root, subj, hemisphere, voxels)
    utils.check_counts(n_images, fmri, str(utils.fmri_path(root, subj, hemisphere)))
    return {key: fmri[:, np.searchsorted(voxels, v)] for key, v in columns.items()}


def random_rois(counts, n=30, seed=0, min_voxels=utils.ANALYSIS_MIN_VOXELS):
    """``n`` distinct (subject, hemisphere, ROI) rows drawn at random among ROIs with more than ``min_voxels``.

    The authors draw 30 among the ROIs with more than 20 voxels (for their hyper-parameter search).

    Parameters
    ----------
    counts : DataFrame from ``voxel_counts``.

    Returns
    -------
    DataFrame, the chosen rows in the order drawn.
    """
    pool = counts[counts["n_voxels"] > min_voxels].reset_index(drop=True)
    if n > len(pool):
        raise safe_io.UserError(f"asked for {n} random ROIs but only {len(pool)} have more than {min_voxels} voxels: "
                              "ask for fewer")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    return pool.iloc[pick].reset_index(drop=True)


# --- Tasks: landscape and Grad-CAM -------------------------------------------------

def landscape(root, dataset, names=None, method="inpca", oracle=True, chunk_size=64, device="cpu"):
    """Bhattacharyya distances between saved models' test probabilities, embedded in 2-D.

    Parameters
    ----------
    names : model names to use (default: every saved model of ``dataset``).
    method : 'inpca' or 'mds'.
    oracle : add the one-hot distribution of the true labels as a model named 'oracle'.
    chunk_size, device : as for ``bhattacharyya_distances``.

    Returns
    -------
    dict with names, metas (list of dict), distances (M, M), coords (M, 2), eigenvalues (2,).
    """
    names, probs, labels, metas = load_predictions(root, dataset, names)
    if oracle:
        probs = np.concatenate([probs, np.eye(probs.shape[2], dtype=probs.dtype)[labels][None]])
        names, metas = names + ["oracle"], metas + [{"method": "oracle", "accuracy": 1.0}]
    try:
        distances = bhattacharyya_distances(probs, chunk_size, device)
        coords, eigenvalues = embed(distances, method)
    except ValueError as e:
        raise safe_io.UserError(f"landscape of {dataset}: {e}") from None
    return {"names": names, "metas": metas, "distances": distances, "coords": coords,
            "eigenvalues": eigenvalues, "method": method}


class Salience(NamedTuple):
    """Grad-CAM maps of one test image: uint8 image (S, S, 3), cams (n_models, 2, S, S) for the image and its
    mirror, one title per model, and the class name."""
    image: np.ndarray
    cams: np.ndarray
    titles: list
    class_name: str


def salience_maps(root, dataset, method, subj, roi, image_index, epochs, weights="imagenet", device="cpu",
                  image_size=224, seed=0):
    """Grad-CAM at features.12 of the untuned AlexNet and of the left- and right-hemisphere models of an
    ROI, on a test image and its mirror, for the image's true class (the authors' target).

    The class scores come from each model's saved probe (``classification_task``);
    ``figures.salience_figure`` draws the result.

    Returns
    -------
    Salience.
    """
    images, labels, classes = dataset_images(root, dataset, image_size)
    _, test = utils.train_test_split(len(labels))
    if not 0 <= image_index < len(test):
        raise safe_io.UserError(f"image index {image_index} is outside the {len(test)} test images of {dataset}: "
                              f"use 0 to {len(test) - 1}")
    image = np.ascontiguousarray(images[test[image_index]])
    label = int(labels[test[image_index]])
    x = utils.normalize_images(np.stack([image, image[:, ::-1]]), device)
    fix = f"run generate_results.py --type classification-task --dataset {dataset} for that model first"
    cams, titles = [], []
    for h in (None,) + utils.HEMISPHERES:
        name = "untuned" if h is None else model_name(method, subj, h, roi, epochs)
        with np.load(safe_io.require_file(probe_path(root, dataset, name), fix)) as z:
            probe = {k: z[k] for k in z.files}
        column = np.flatnonzero(probe["classes"] == label)
        if not len(column):
            raise safe_io.UserError(f"the probe of {name} saw no training image of class {classes[label]!r}: "
                                  "choose another --image-index")
        if h is None:
            alexnet = utils.load_alexnet(weights, seed).to(device)
        else:
            alexnet, _ = models.load_feature_alexnet(root, method, subj, h, roi, epochs, weights, device, seed,
                                                     image_size)
        cam, _ = grad_cam(alexnet, probe_head(probe).to(device), x, torch.full((2,), int(column[0]), device=device))
        cams.append(cam.cpu().numpy())
        titles.append("untuned" if h is None else f"{h} {roi} {method}")
    return Salience(image, np.stack(cams), titles, classes[label])
