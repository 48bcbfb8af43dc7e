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


# --- Classification datasets -----------------------------------------------------------

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
    import torchvision.datasets as tvd
    if name not in DATASETS:
        raise utils.UserError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    folder = utils.require_dir(dataset_folder(root, name), f"put the {name} dataset there (see README)")
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
        raise utils.UserError(f"cannot read the {name} dataset in {folder} ({str(e).splitlines()[0]}): "
                              "place the files as the README shows") from None
    if not samples:
        raise utils.UserError(f"no images found in {folder}: place the {name} images there (see README)")
    return [(str(p), int(y)) for p, y in samples], list(classes)


def crop_transform(image_size=224):
    """Resize(256) + CenterCrop(224), scaled to ``image_size`` (the probe protocol)."""
    from torchvision import transforms
    return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)])


class _CroppedImages(torch.utils.data.Dataset):
    def __init__(self, paths, image_size):
        self.paths, self.transform = paths, crop_transform(image_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                return torch.from_numpy(np.asarray(self.transform(im.convert("RGB")), dtype=np.uint8).copy())
        except (OSError, SyntaxError, ValueError) as e:
            raise utils.UserError(f"cannot read image {self.paths[i]} ({e}): replace or remove the file") from None


def dataset_images(root, name, image_size=224, workers=2):
    """Decode and crop a classification dataset once into a memory-mapped uint8 cache.

    Returns
    -------
    images : np.memmap uint8 (n, image_size, image_size, 3).
    labels : np.ndarray int64 (n,).
    classes : list of str.
    """
    samples, classes = dataset_samples(root, name)
    paths = [p for p, _ in samples]
    labels = np.array([y for _, y in samples], dtype=np.int64)
    key = utils._cache_key(paths, image_size)
    target = utils.cache_dir(root) / f"{name}_crop_s{image_size}_{key}.npy"
    if not target.exists():
        for old in utils.cache_dir(root).glob(f"{name}_crop_s{image_size}_*.npy"):
            old.unlink()
        loader = torch.utils.data.DataLoader(_CroppedImages(paths, image_size), batch_size=64, num_workers=workers)
        with utils.atomic_path(target) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size, 3))
            start = 0
            for batch in tqdm(loader, desc=f"caching {name}", leave=False):
                out[start:start + len(batch)] = batch.numpy()
                start += len(batch)
            out.flush()
            del out
    return np.load(target, mmap_mode="r"), labels, classes


# --- Classification probes -------------------------------------------------------------

def probe_features(alexnet, images, device="cpu", batch_size=256):
    """ReLU(fc7) features of every image: float32 (n, 4096)."""
    return utils.extract_features(alexnet, images, batch_size, device, layers=[PROBE_LAYER])[PROBE_LAYER]


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
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
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


# --- Model names and saved predictions -------------------------------------------------

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
    with utils.atomic_path(preds_path(root, dataset, name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, probs=probe["probs"], labels=labels, accuracy=probe["accuracy"], meta=json.dumps(meta))


def load_predictions(root, dataset, names=None):
    """Every saved model's test probabilities for a dataset (or those in ``names``).

    Returns
    -------
    names : list of str (sorted, 'untuned' included when present).
    probs : np.ndarray float64 (n_models, n_test, n_classes).
    labels : np.ndarray int64 (n_test,).
    metas : list of dict, each with 'accuracy' added.
    """
    folder = utils.require_dir(utils.classification_preds_dir(root) / dataset,
                               f"run generate_results.py --type classification-task --dataset {dataset} first")
    files = sorted(folder.glob("*.npz")) if names is None else [preds_path(root, dataset, n) for n in names]
    if not files:
        raise utils.UserError(f"no saved predictions in {folder}: run generate_results.py --type classification-task first")
    probs, metas, labels = [], [], None
    for f in files:
        with np.load(utils.require_file(f, "run generate_results.py --type classification-task for that model")) as z:
            if labels is not None and not np.array_equal(z["labels"], labels):
                raise utils.UserError(f"{f} was scored on other test images than {files[0]}: rerun with --overwrite")
            labels = z["labels"]
            probs.append(z["probs"].astype(np.float64))
            metas.append({**json.loads(str(z["meta"])), "accuracy": float(z["accuracy"])})
    return [f.stem for f in files], np.stack(probs), labels, metas


# --- Tasks run by generate_results.py --------------------------------------------------

def select_rois(root, method, subj, hemisphere, rois, epochs):
    """The ROIs to process: ``rois`` as given (checked), or every ROI whose checkpoint exists."""
    if rois:
        return [utils.check_roi(r) for r in rois]
    found = [r for r in utils.ROIS if utils.method_checkpoint_path(root, method, subj, hemisphere, r, epochs).is_file()]
    if not found:
        example = utils.method_checkpoint_path(root, method, subj, hemisphere, "V1v", epochs)
        raise utils.UserError(f"no {method} checkpoints like {example}: train them with {utils.METHOD_SCRIPTS[method]}")
    return found


def _load_summary(path, overwrite):
    if path.is_file() and not overwrite:
        return json.loads(path.read_text())
    return {"rois": {}}


def _weights_tag(weights, seed):
    w = str(weights)
    if w.lower() == "none":
        return f"none-seed{seed}"
    return w.lower() if w.lower() == "imagenet" else Path(w).stem


def untuned_features(root, dataset, images, weights, seed, device, batch_size):
    """fc7 features of the untuned AlexNet, computed once per dataset, image size and weights."""
    path = Path(images.filename).with_name(f"{Path(images.filename).stem}_untuned-{_weights_tag(weights, seed)}_fc7.npy")
    if path.is_file():
        return np.load(path, mmap_mode="r")
    alexnet = utils.load_alexnet(weights, seed)
    utils.atomic_np_save(probe_features(alexnet, images, device, batch_size), path)
    return np.load(path, mmap_mode="r")


def _score_model(root, dataset, name, feats, labels, train, test, n_classes, meta, save_probe):
    probe = fit_probe(feats, labels, train, test, n_classes)
    if save_probe:
        with utils.atomic_path(probe_path(root, dataset, name)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: probe[k] for k in ("mean", "scale", "coef", "intercept", "classes")})
    save_predictions(root, dataset, name, probe, labels[test], meta)
    return probe["accuracy"]


def classification_task(root, dataset, method, subj, hemisphere, rois, epochs, weights="imagenet",
                        device="cpu", image_size=224, batch_size=256, seed=0, overwrite=False, save_probes=True):
    """Probe accuracy of the untuned AlexNet and of one tuned model per ROI on a dataset.

    Writes classification_preds/<dataset>/<model>.npz per model, the probes under
    results/classification/<dataset>/probes/, and results/classification/<dataset>/<summary>.json
    ({'untuned': acc, 'rois': {roi: acc}}) after each ROI; finished ROIs are skipped
    unless ``overwrite``.

    Returns
    -------
    summary : dict.
    """
    import models
    rois = select_rois(root, method, subj, hemisphere, rois, epochs)
    images, labels, classes = dataset_images(root, dataset, image_size)
    train, test = utils.train_test_split(len(labels))
    out = utils.results_dir(root) / "classification" / dataset / f"{summary_stem(method, subj, hemisphere, epochs)}.json"
    summary = _load_summary(out, overwrite)
    if overwrite or not preds_path(root, dataset, "untuned").is_file():
        feats = untuned_features(root, dataset, images, weights, seed, device, batch_size)
        _score_model(root, dataset, "untuned", feats, labels, train, test, len(classes),
                     {"method": "untuned", "weights": str(weights), "image_size": image_size}, save_probes)
    with np.load(preds_path(root, dataset, "untuned")) as z:
        summary["untuned"] = float(z["accuracy"])
    for roi in tqdm(rois, desc=f"classification {dataset}"):
        name = model_name(method, subj, hemisphere, roi, epochs)
        if roi in summary["rois"] and preds_path(root, dataset, name).is_file() and not overwrite:
            continue
        alexnet, _ = models.load_feature_alexnet(root, method, subj, hemisphere, roi, epochs, weights=weights,
                                                 device=device, seed=seed)
        feats = probe_features(alexnet, images, device, batch_size)
        meta = {"method": method, "subj": None if method.startswith("pooled") else int(subj),
                "hemisphere": utils.hemi_code(hemisphere), "roi": roi, "epochs": int(epochs), "image_size": image_size}
        summary["rois"][roi] = _score_model(root, dataset, name, feats, labels, train, test, len(classes), meta,
                                            save_probes)
        utils.atomic_json_dump(summary, out)
    utils.atomic_json_dump(summary, out)
    return summary
