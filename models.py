"""Contrastive loss, the CL, pooled CL and regression models, the training loop, checkpoints.

The three kinds of tuned model share one AlexNet trunk (all weights trainable, 1000-d
output) and one training loop, ``train_model``: Adam, bf16 autocast and channels_last on
CUDA, images read from the uint8 cache, per-epoch train and held-out losses written to a
log next to the checkpoint, and a resumable state saved after every epoch so that a
crashed run continues from its last finished epoch and ends with the same weights.
"""

import glob
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import utils

KINDS = ("cl", "pooled", "reg")
# h of the pooled "const" method: the largest ROI of the 8 NSD subjects (subj5 rh EBA).
H_CONST = 5741


# --- Loss ------------------------------------------------------------------------------

def info_nce_loss(z_fmri, z_img, temperature=0.3):
    """InfoNCE of DESIGN.md: S_ij = cos(z_fmri_i, z_img_j), loss = -mean_j log(E_jj / sum_i E_ij).

    Parameters
    ----------
    z_fmri, z_img : tensors (B, z), row i of both comes from the same image.
    temperature : float, E = exp(S / temperature).

    Returns
    -------
    loss : scalar tensor; log(B) for unrelated pairs, 0 at best.
    """
    s = F.normalize(z_fmri.float(), dim=1) @ F.normalize(z_img.float(), dim=1).T
    logits = s / temperature
    return (torch.logsumexp(logits, dim=0) - logits.diagonal()).mean()


# --- Models ----------------------------------------------------------------------------

def _head(h, z):
    """The projection head shared by both branches: [Linear + BatchNorm + ReLU] x 2 -> Linear(h, z)."""
    return nn.Sequential(
        nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
        nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
        nn.Linear(h, z, bias=False),
    )


def _seeded(seed, build):
    """Call ``build()`` under ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def default_dims(n_voxels):
    """(h, z) = (int(0.8 n_vox), int(0.2 n_vox)), at least 1 each so tiny ROIs still build."""
    return max(1, int(0.8 * n_voxels)), max(1, int(0.2 * n_voxels))


class CLModel(nn.Module):
    """AlexNet -> Linear(1000, h) and fMRI -> Linear(n_voxels, h), then one shared head to z dims.

    Parameters
    ----------
    n_voxels : int, width of the fMRI input.
    h, z : int, hidden and embedding sizes; default int(0.8 n_voxels) and int(0.2 n_voxels).
    weights : AlexNet weights, as for utils.load_alexnet ('imagenet', 'none' or a path).
    seed : int, seeds every random initialisation.
    """

    def __init__(self, n_voxels, h=None, z=None, weights="none", seed=0):
        super().__init__()
        dh, dz = default_dims(n_voxels)
        self.n_voxels, self.h, self.z = int(n_voxels), int(h or dh), int(z or dz)
        self.alexnet = utils.load_alexnet(weights, seed)
        self.image_map, self.fmri_map, self.head = _seeded(seed, lambda: (
            nn.Linear(1000, self.h, bias=False), nn.Linear(self.n_voxels, self.h, bias=False),
            _head(self.h, self.z)))

    def embed_images(self, x):
        """Normalised images (B, 3, S, S) -> embeddings (B, z)."""
        return self.head(self.image_map(self.alexnet(x)))

    def embed_fmri(self, y):
        """fMRI (B, n_voxels) -> embeddings (B, z)."""
        return self.head(self.fmri_map(y))

    def forward(self, x, y):
        """Returns (z_img, z_fmri), each (B, z)."""
        return self.embed_images(x), self.embed_fmri(y)


class PooledCLModel(nn.Module):
    """One AlexNet, image map and head; one fMRI map per subject (``fmri_maps['SubjX']``).

    Parameters
    ----------
    voxel_counts : dict subject (int) -> n_voxels of the ROI in that subject.
    h : int, hidden size (H_CONST, or the mean voxel count over the subjects).
    z : int, embedding size; default int(0.25 h).
    weights, seed : as for CLModel.
    """

    def __init__(self, voxel_counts, h, z=None, weights="none", seed=0):
        super().__init__()
        self.voxel_counts = {int(s): int(n) for s, n in voxel_counts.items()}
        self.h = int(h)
        self.z = int(z or max(1, int(0.25 * self.h)))
        self.alexnet = utils.load_alexnet(weights, seed)
        self.image_map, self.fmri_maps, self.head = _seeded(seed, lambda: (
            nn.Linear(1000, self.h, bias=False),
            nn.ModuleDict({utils.subj_dir(s): nn.Linear(n, self.h, bias=False)
                           for s, n in sorted(self.voxel_counts.items())}),
            _head(self.h, self.z)))

    def embed_images(self, x):
        """Normalised images (B, 3, S, S) -> embeddings (B, z)."""
        return self.head(self.image_map(self.alexnet(x)))

    def embed_fmri(self, y, subj):
        """fMRI (B, n_voxels of ``subj``) of subject ``subj`` (int or 'SubjX') -> embeddings (B, z)."""
        key = subj if isinstance(subj, str) else utils.subj_dir(subj)
        return self.head(self.fmri_maps[key](y))

    def forward(self, x, y, subj):
        """Returns (z_img, z_fmri), each (B, z)."""
        return self.embed_images(x), self.embed_fmri(y, subj)


class RegressionModel(nn.Module):
    """AlexNet -> Linear(1000, n_voxels), trained with MSE (the regression baseline)."""

    def __init__(self, n_voxels, weights="none", seed=0):
        super().__init__()
        self.n_voxels = int(n_voxels)
        self.alexnet = utils.load_alexnet(weights, seed)
        self.readout = _seeded(seed, lambda: nn.Linear(1000, self.n_voxels))

    def forward(self, x):
        """Normalised images (B, 3, S, S) -> predicted fMRI (B, n_voxels)."""
        return self.readout(self.alexnet(x))


def batch_loss(model, x, y, subj=None, temperature=0.3):
    """The training loss of any of the three models on one batch (float32 scalar)."""
    if isinstance(model, RegressionModel):
        return F.mse_loss(model(x).float(), y.float())
    z_img, z_fmri = model(x, y, subj) if isinstance(model, PooledCLModel) else model(x, y)
    return info_nce_loss(z_fmri, z_img, temperature)


# --- Checkpoints -----------------------------------------------------------------------

def save_checkpoint(model, meta, path):
    """Atomically write {"state_dict": CPU tensors, "meta": plain-Python dict} to ``path``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    utils.atomic_torch_save({"state_dict": state, "meta": meta}, path)


def build_model(meta, weights="none"):
    """An untrained model of the class and sizes that ``meta`` describes."""
    kind = meta.get("kind")
    if kind == "cl":
        return CLModel(meta["n_voxels"], meta["h"], meta["z"], weights=weights)
    if kind == "pooled":
        return PooledCLModel({int(s): n for s, n in meta["voxel_counts"].items()}, meta["h"], meta["z"],
                             weights=weights)
    if kind == "reg":
        return RegressionModel(meta["n_voxels"], weights=weights)
    raise ValueError(f"unknown model kind {kind!r}: expected one of {KINDS}")


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by save_checkpoint.

    Returns
    -------
    model : CLModel, PooledCLModel or RegressionModel (from meta['kind']) on ``device``, eval mode.
    meta : dict.
    """
    path = Path(path)
    if not path.is_file():
        raise utils.UserError(f"checkpoint {path} not found: train it first with the matching "
                              "*_model_training.py script (see README)")
    ckpt = utils.load_state_dict_file(path, "checkpoint")
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) and "state_dict" in ckpt
            and ckpt["meta"].get("kind") in KINDS):
        raise utils.UserError(f"{path} is not a checkpoint of this project: delete it and re-train")
    meta = ckpt["meta"]
    model = build_model(meta)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise utils.UserError(f"{path} does not match its meta ({str(e).splitlines()[0]}): "
                              "delete it and re-train") from None
    bad = utils.nonfinite_tensor(model.state_dict())
    if bad is not None:
        raise utils.UserError(f"{path} holds non-finite weights ({bad}): the training diverged; "
                              "delete it and re-train with a lower --lr")
    return model.to(device).eval(), meta


def check_voxel_count(meta, subj, n_voxels, path):
    """Raise a UserError naming both counts unless the checkpoint fits ``n_voxels`` of ``subj``."""
    expected = meta["voxel_counts"].get(str(int(subj))) if meta["kind"] == "pooled" else meta["n_voxels"]
    if expected != n_voxels:
        raise utils.UserError(
            f"checkpoint {path} was trained on {expected} voxels of {utils.subj_dir(subj)} "
            f"{meta['hemisphere']} {meta['roi']}, but the data have {n_voxels}: "
            "use the same masks and MAX_VOXELS, or re-train with --overwrite")


def load_feature_alexnet(root, method, subj, hemisphere, roi, epochs, weights="imagenet", device="cpu", seed=0):
    """The AlexNet of a feature-extraction method, in eval mode on ``device``.

    Parameters
    ----------
    method : one of utils.METHODS. 'untuned' is utils.load_alexnet(weights, seed); the
        others read the trunk of the checkpoint at utils.method_checkpoint_path.
    subj : the subject the model was tuned on (ignored by the pooled methods).

    Returns
    -------
    alexnet : torchvision AlexNet.
    meta : the checkpoint's meta, or None for 'untuned'.
    """
    if method == "untuned":
        return utils.load_alexnet(weights, seed).to(device).eval(), None
    path = utils.method_checkpoint_path(root, method, subj, hemisphere, roi, epochs)
    if not path.is_file():
        subj_flag = "" if method.startswith("pooled") else f" --subj {int(subj)}"
        raise utils.UserError(
            f"no {method} checkpoint at {path}: make it with python {utils.METHOD_SCRIPTS[method]}"
            f"{subj_flag} --hemisphere {utils.hemi_code(hemisphere)} --roi {roi} --epochs {int(epochs)}")
    model, meta = load_checkpoint(path, device)
    return model.alexnet.eval(), meta


# --- Training --------------------------------------------------------------------------

def partial_path(checkpoint):
    """The resumable state of an unfinished run: <checkpoint>.partial."""
    return Path(str(checkpoint) + ".partial")


def log_path(checkpoint):
    """The per-epoch loss log next to a checkpoint: <name>.log.json."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".log.json")


def _prefetch(iterator, depth=2):
    """Run ``iterator`` in a background thread, ``depth`` items ahead of the consumer.

    Reading cache rows (numpy releases the GIL) then overlaps the model's step.
    """
    q = queue.Queue(depth)
    done = object()

    def produce():
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _subject_key(model, data):
    return utils.subj_dir(data.subj) if isinstance(model, PooledCLModel) else None


class _Diverged(Exception):
    """Raised inside an epoch when the loss or the weights stop being finite: (what, where)."""


def _run_epoch(model, optimizer, datasets, batch_size, device, generator, temperature):
    """One pass over the train rows of every dataset in turn; returns per-dataset mean losses.

    A non-finite loss raises _Diverged before the step that would spread it to the weights.
    """
    model.train()
    losses = []
    for data in datasets:
        subj = _subject_key(model, data)
        total, count = 0.0, 0
        batches = utils.iterate_batches(data.images, data.fmri, data.train, batch_size, device,
                                        shuffle=True, generator=generator)
        bar = tqdm(_prefetch(batches), total=-(-len(data.train) // batch_size), leave=False,
                   desc=f"train {utils.subj_dir(data.subj)}")
        for step, (x, y) in enumerate(bar, 1):
            # BatchNorm cannot train on one row, and InfoNCE of one pair carries no signal.
            if len(x) < 2:
                continue
            with utils.autocast(device):
                loss = batch_loss(model, x, y, subj, temperature)
            value = loss.item()
            if not np.isfinite(value):
                raise _Diverged(f"loss {value}", f"step {step}" + (f" of {subj}" if subj else ""))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{value:.4f}")
        losses.append(total / max(count, 1))
    return losses


@torch.no_grad()
def evaluate(model, datasets, batch_size, device, temperature=0.3, split="test"):
    """Mean loss per dataset on its ``split`` rows, in eval mode and in batches of ``batch_size``."""
    model.eval()
    losses = []
    for data in datasets:
        subj = _subject_key(model, data)
        rows = getattr(data, split)
        total = 0.0
        for x, y in utils.iterate_batches(data.images, data.fmri, rows, batch_size, device):
            with utils.autocast(device):
                total += batch_loss(model, x, y, subj, temperature).item() * len(x)
        losses.append(total / max(len(rows), 1))
    return losses


def _history_row(epoch, datasets, train_losses, test_losses, seconds):
    row = {"epoch": epoch, "seconds": round(seconds, 3),
           "train_loss": float(np.average(train_losses, weights=[len(d.train) for d in datasets])),
           "test_loss": float(np.average(test_losses, weights=[len(d.test) for d in datasets]))}
    if len(datasets) > 1:
        for d, tr, te in zip(datasets, train_losses, test_losses):
            row[f"train_loss_{utils.subj_dir(d.subj)}"] = tr
            row[f"test_loss_{utils.subj_dir(d.subj)}"] = te
    return row


def _cpu_copy(state):
    """A deep copy of a nested state whose tensors are cloned to the CPU (safe to save while training goes on)."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(v) for v in state)
    return state


def _rng_state(generator, device):
    state = {"shuffle": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, generator, device):
    generator.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _resume(model, optimizer, generator, meta, checkpoint, device, overwrite):
    """Load <checkpoint>.partial into the run if it exists; returns (next epoch, history)."""
    partial = partial_path(checkpoint)
    if not partial.exists():
        return 0, []
    if overwrite:
        partial.unlink()
        return 0, []
    state = utils.load_state_dict_file(partial, "partial training state")
    if state.get("meta") != meta:
        differ = sorted(k for k in set(meta) | set(state.get("meta", {}))
                        if meta.get(k) != state.get("meta", {}).get(k))
        raise utils.UserError(f"unfinished run {partial} was started with other settings ({', '.join(differ)}): "
                              "rerun with the same options, or pass --overwrite to start again")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], generator, device)
    tqdm.write(f"resuming {checkpoint} after epoch {state['epoch']}")
    return state["epoch"], state["history"]


def _divergence_error(model, checkpoint, epoch, what, where, lr, temperature):
    """The one-line UserError of a run stopped by a non-finite loss or weights at ``epoch`` (1-based)."""
    cause = f"the learning rate {lr:g} is too high"
    if not isinstance(model, RegressionModel):
        cause += f" or the temperature {temperature:g} too low"
    partial = partial_path(checkpoint)
    kept = f"{partial} keeps epoch {epoch - 1}" if partial.exists() else "no training state was kept"
    return utils.UserError(f"training of {Path(checkpoint).name} diverged: {what} at epoch {epoch}, {where}; "
                           f"likely {cause}; no checkpoint written, {kept}: change the settings and rerun "
                           "with --overwrite")


def train_model(model, datasets, checkpoint, meta, epochs, lr, batch_size, temperature=0.3, device="cpu",
                seed=0, overwrite=False):
    """Train a CL, pooled CL or regression model and save it as a checkpoint.

    Each epoch runs the datasets one after another (the subjects of a pooled model, in the
    given order), each over its own shuffled train rows; then the loss on every test split
    is computed for the log only. After each epoch the model, optimiser, epoch and RNG
    states go atomically to <checkpoint>.partial, so an interrupted run restarted with the
    same arguments continues where it stopped and ends with the same weights. A non-finite
    loss or weights stop the run with a UserError: no checkpoint is written, and the
    partial state of the last good epoch stays. Temporaries of killed runs for this
    checkpoint, its partial state and its log are removed first.

    Parameters
    ----------
    model : CLModel, PooledCLModel or RegressionModel.
    datasets : list of utils.SubjectData (or any object with images, fmri, train, test
        and subj): one for CL and regression, one per subject for a pooled model.
    checkpoint : path of the final checkpoint; the log goes to log_path(checkpoint).
    meta : dict of plain Python values describing the run (saved in the checkpoint, and
        compared with the partial state before resuming).
    epochs, lr, batch_size : Adam's schedule.
    temperature : InfoNCE temperature (CL and pooled).
    device : torch.device or str.
    seed : seeds the batch order and dropout.
    overwrite : discard an existing partial state instead of resuming it.

    Returns
    -------
    model : the trained model, on ``device``, in eval mode.
    meta : ``meta`` plus 'history', the per-epoch losses.
    """
    device = torch.device(device)
    checkpoint = Path(checkpoint)
    utils.remove_stale_temps(checkpoint.parent, *(glob.escape(p.name) for p in
                                                  (checkpoint, partial_path(checkpoint), log_path(checkpoint))))
    model.to(device)
    if device.type == "cuda":
        model.alexnet.to(memory_format=torch.channels_last)
    # The fused kernel is several times faster than the default, on the CPU too.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    generator = torch.Generator().manual_seed(seed)
    # The partial state (weights and Adam moments, ~0.7 GB) is written by a background
    # thread while the next epoch runs; leaving the block waits for the write in flight.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ThreadPoolExecutor(1) as writer:
        torch.manual_seed(seed)
        start, history = _resume(model, optimizer, generator, meta, checkpoint, device, overwrite)
        saving = None
        for epoch in tqdm(range(start, epochs), initial=start, total=epochs, desc=Path(checkpoint).stem):
            t0 = time.perf_counter()
            try:
                train_losses = _run_epoch(model, optimizer, datasets, batch_size, device, generator, temperature)
                bad = utils.nonfinite_tensor(model.state_dict())
                if bad is not None:
                    raise _Diverged(f"non-finite weights ({bad})", "after its last step")
            except _Diverged as e:
                if saving is not None:
                    saving.result()
                raise _divergence_error(model, checkpoint, epoch + 1, *e.args, lr, temperature) from None
            test_losses = evaluate(model, datasets, batch_size, device, temperature)
            history.append(_history_row(epoch + 1, datasets, train_losses, test_losses, time.perf_counter() - t0))
            state = _cpu_copy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "epoch": epoch + 1, "rng": _rng_state(generator, device),
                               "history": history, "meta": meta})
            if saving is not None:
                saving.result()
            saving = writer.submit(utils.atomic_torch_save, state, partial_path(checkpoint))
            utils.atomic_write_text(json.dumps(history, indent=1), log_path(checkpoint))
        if saving is not None:
            saving.result()
    meta = dict(meta, history=history)
    save_checkpoint(model, meta, checkpoint)
    partial_path(checkpoint).unlink(missing_ok=True)
    return model.eval(), meta


# --- One ROI, as the training scripts run it -------------------------------------------

def select_voxels(indices, max_voxels=None, seed=0):
    """At most ``max_voxels`` of ``indices``: a seeded random subset, kept in index order."""
    indices = np.asarray(indices, dtype=np.int64)
    if max_voxels is None or len(indices) <= max_voxels:
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, int(max_voxels), replace=False))


def read_meta(path):
    """The meta of a checkpoint, read without loading its weights into memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]
    except Exception as e:
        raise utils.UserError(f"cannot read checkpoint {path} ({type(e).__name__}): "
                              "delete it, or re-train with --overwrite") from None


def model_path(kind, root, subjects, hemisphere, roi, epochs, h_method=None):
    """Where train_roi writes a model of ``kind`` (pooled models are not per subject)."""
    if kind == "cl":
        return utils.cl_model_path(root, subjects[0], hemisphere, roi, epochs)
    if kind == "reg":
        return utils.reg_model_path(root, subjects[0], hemisphere, roi, epochs)
    return utils.pooled_model_path(root, hemisphere, roi, epochs, h_method)


def train_roi(kind, root, roi, hemisphere, subjects, epochs, lr, batch_size, temperature=0.3,
              weights="imagenet", device="auto", seed=0, image_size=224, max_voxels=None,
              h_method="const", h_const=H_CONST, overwrite=False, skip_small=False, min_voxels=utils.MIN_VOXELS):
    """Train and save one model of ``kind`` ('cl', 'reg' or 'pooled') for one ROI.

    Parameters
    ----------
    subjects : list of int. CL and regression: one subject. Pooled: the candidate
        subjects; those where the ROI has fewer than ``min_voxels`` voxels are left out,
        the rest run in sorted order.
    max_voxels : keep at most this many voxels per subject (select_voxels); None keeps all.
    h_method, h_const : pooled only; h = h_const ('const') or the mean voxel count ('avg').
    skip_small : print a line and return None for an ROI with fewer than ``min_voxels``
        voxels (in every subject) instead of raising.
    min_voxels : the authors' threshold (utils.MIN_VOXELS), applied before ``max_voxels``.
    Other parameters as for train_model.

    Returns
    -------
    path : the checkpoint written, or None when skipped (ROI too small, or the checkpoint
        exists and ``overwrite`` is False).
    """
    roi, hemi = utils.check_roi(roi), utils.hemi_code(hemisphere)
    device = utils.resolve_device(device)
    subjects = sorted(int(s) for s in subjects)
    path = model_path(kind, root, subjects, hemi, roi, epochs, h_method)
    indices = {s: utils.roi_voxel_indices(root, s, hemi, roi) for s in subjects}
    voxels = {s: select_voxels(v, max_voxels, seed) for s, v in indices.items() if len(v) >= min_voxels}
    if not voxels:
        where = ", ".join(utils.subj_dir(s) for s in subjects)
        counts = ", ".join(str(len(v)) for v in indices.values())
        if not any(len(v) for v in indices.values()):
            if skip_small:
                tqdm.write(f"skip {roi}: empty in {hemi} of {where}")
                return None
            raise utils.UserError(f"ROI {roi} is empty in {hemi} of {where}: choose an ROI with voxels there "
                                  "(the *_all_rois scripts skip empty ROIs)")
        if skip_small:
            tqdm.write(f"skip {roi}: {counts} voxels in {hemi} of {where} (fewer than MIN_VOXELS={min_voxels})")
            return None
        raise utils.UserError(f"ROI {roi} has {counts} voxels in {hemi} of {where}, fewer than MIN_VOXELS={min_voxels}: "
                              "choose a larger ROI (the authors skip ROIs under 20 voxels) or lower --min-voxels")
    for s, v in indices.items():
        if 0 < len(v) < min_voxels and kind == "pooled":
            tqdm.write(f"{roi}: {utils.subj_dir(s)} left out "
                       f"({len(v)} voxels in {hemi}, fewer than MIN_VOXELS={min_voxels})")
    if path.exists() and not overwrite:
        meta = read_meta(path)
        for s, v in voxels.items():
            check_voxel_count(meta, s, len(v), path)
        tqdm.write(f"skip {roi}: {path} exists (use --overwrite to re-train)")
        return None

    utils.check_writable(path.parent, utils.cache_dir(root))
    meta = {"kind": kind, "roi": roi, "hemisphere": hemi, "epochs": int(epochs), "lr": float(lr),
            "batch_size": int(batch_size), "seed": int(seed), "weights": str(weights),
            "image_size": int(image_size), "max_voxels": max_voxels, "code_version": utils.CODE_VERSION}
    if kind == "pooled":
        counts = {s: len(v) for s, v in voxels.items()}
        h = h_const if h_method == "const" else int(np.mean(list(counts.values())))
        model = PooledCLModel(counts, h, weights=weights, seed=seed)
        meta.update(subjects=list(voxels), voxel_counts={str(s): n for s, n in counts.items()},
                    voxels={str(s): v.tolist() for s, v in voxels.items()}, h_method=h_method,
                    h=model.h, z=model.z, temperature=float(temperature))
    else:
        (s, v), = voxels.items()
        model = (CLModel(len(v), weights=weights, seed=seed) if kind == "cl"
                 else RegressionModel(len(v), weights=weights, seed=seed))
        meta.update(subject=s, n_voxels=len(v), voxels=v.tolist())
        if kind == "cl":
            meta.update(h=model.h, z=model.z, temperature=float(temperature))
    datasets = [utils.SubjectData(root, s, hemi, v, image_size) for s, v in voxels.items()]
    train_model(model, datasets, path, meta, epochs, lr, batch_size, temperature, device, seed, overwrite)
    tqdm.write(f"saved {path}")
    return path
