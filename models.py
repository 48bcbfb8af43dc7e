"""Contrastive loss, the CL, pooled CL and regression models, the training loop, checkpoints.

The three tuned models share one AlexNet trunk (all weights trainable, 1000-d output)
and one training loop, ``train_model``: Adam, fp32 as the authors' (bf16 autocast as an
option), channels_last on CUDA, images read from the uint8 cache, per-epoch train and
held-out losses written to a log next to the checkpoint, and a resumable state saved after
every epoch so that a crashed run continues from its last finished epoch and ends with the
same weights.
"""

import glob
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
import options
import safe_io
import utils


# --- Loss ------------------------------------------------------------------------------

def info_nce_loss(z_fmri, z_img, temperature=0.3):
    """InfoNCE as in the paper: S_ij = cos(z_fmri_i, z_img_j), loss = -mean_j log(E_jj / sum_i E_ij).

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

    def embed_fmri(self, y, subj=None):
        """fMRI (B, n_voxels) -> embeddings (B, z); ``subj`` is ignored (one subject)."""
        return self.head(self.fmri_map(y))

    def forward(self, x, y):
        """Returns (z_img, z_fmri), each (B, z)."""
        return self.embed_images(x), self.embed_fmri(y)

    def loss(self, x, y, subj=None, temperature=0.3):
        """InfoNCE of one batch (float32 scalar)."""
        z_img, z_fmri = self(x, y)
        return info_nce_loss(z_fmri, z_img, temperature)


class PooledCLModel(nn.Module):
    """One AlexNet, image map and head; one fMRI map per subject (``fmri_maps['SubjX']``).

    Parameters
    ----------
    voxel_counts : dict subject (int) -> n_voxels of the ROI in that subject.
    h : int, hidden size (utils.H_CONST, or the mean voxel count over the subjects).
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

    def loss(self, x, y, subj, temperature=0.3):
        """InfoNCE of one batch of subject ``subj`` (float32 scalar)."""
        z_img, z_fmri = self(x, y, subj)
        return info_nce_loss(z_fmri, z_img, temperature)


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

    def loss(self, x, y, subj=None, temperature=None):
        """MSE of one batch (float32 scalar); ``subj`` and ``temperature`` are ignored."""
        return F.mse_loss(self(x).float(), y.float())


# --- The model a checkpoint's meta describes --------------------------------------------

def build_model(meta):
    """The untrained model that a checkpoint's meta describes, with its initial weights.

    meta['method'] picks the model: 'cl-tuned' a CLModel (sizes n_voxels, h, z),
    'reg-tuned' a RegressionModel (n_voxels), 'pooled-avg' and 'pooled-const' a
    PooledCLModel (voxel_counts {'subject': n}, h, z). Its AlexNet starts from
    meta['weights'] (default 'none') and every random layer from meta['seed'] (default 0),
    so the same meta always gives the same initial weights.

    Raises
    ------
    ValueError : unknown method, or a size missing.
    """
    method = meta.get("method")
    sizes = {"cl-tuned": ("n_voxels", "h", "z"), "reg-tuned": ("n_voxels",),
             "pooled-avg": ("voxel_counts", "h", "z"), "pooled-const": ("voxel_counts", "h", "z")}.get(method)
    if sizes is None:
        raise ValueError(f"unknown method {method!r}: expected one of cl-tuned, reg-tuned, pooled-avg, pooled-const")
    missing = [k for k in sizes if k not in meta]
    if missing:
        raise ValueError(f"a {method} checkpoint's meta needs {', '.join(missing)}")
    weights, seed = meta.get("weights", "none"), meta.get("seed", 0)
    if method == "cl-tuned":
        return CLModel(meta["n_voxels"], meta["h"], meta["z"], weights, seed)
    if method == "reg-tuned":
        return RegressionModel(meta["n_voxels"], weights, seed)
    return PooledCLModel({int(s): n for s, n in meta["voxel_counts"].items()}, meta["h"], meta["z"], weights, seed)


# --- Checkpoints -----------------------------------------------------------------------

class Checkpoint(NamedTuple):
    """A loaded checkpoint: the model and its meta."""
    model: nn.Module
    meta: dict


class CheckpointMeta(NamedTuple):
    """A checkpoint's path and meta (read without its weights)."""
    path: Path
    meta: dict


class FeatureNet(NamedTuple):
    """The AlexNet of a feature-extraction method and its checkpoint's meta (None for untuned)."""
    alexnet: nn.Module
    meta: dict


CHECKPOINT_FIX = "delete it and re-train it (--overwrite)"


def save_checkpoint(model, meta, path):
    """Atomically write {"state_dict": CPU tensors, "meta": plain-Python dict} to ``path``; the meta gets
    'checksum', the safe_io.tensor_checksum of the state dict, verified whenever the checkpoint is read."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    safe_io.atomic_torch_save({"state_dict": state, "meta": dict(meta, checksum=safe_io.tensor_checksum(state))},
                              path)


def _read_checked(path, device):
    """(model, state dict, meta) of a checkpoint file, every check passed (see verify_checkpoint); the model,
    built on ``device`` from the meta (untrained), is the one the state dict must fit."""
    path = Path(path)
    if not path.is_file():
        raise safe_io.UserError(f"checkpoint {path} not found: train it first with the matching "
                                "*_model_training.py script (see README)")
    ckpt = safe_io.load_state_dict_file(path, "checkpoint", mmap=True)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) and "state_dict" in ckpt):
        raise safe_io.UserError(f"{path} is not a checkpoint of this project: {CHECKPOINT_FIX}")
    state, meta = ckpt["state_dict"], ckpt["meta"]
    safe_io.check_checksum(path, state, meta.get("checksum"), CHECKPOINT_FIX)
    try:
        # The state dict replaces every weight, so no initial weights are loaded.
        with torch.device(device):
            model = build_model(dict(meta, weights="none"))
    except ValueError as e:
        raise safe_io.UserError(f"{path} is not a checkpoint of this project ({e}): {CHECKPOINT_FIX}") from None
    safe_io.check_state_dict(path, state, model.state_dict(), f"it does not match its meta; {CHECKPOINT_FIX}")
    bad = safe_io.nonfinite_tensor(state)
    if bad is not None:
        raise safe_io.UserError(f"{path} holds non-finite weights ({bad}): the training diverged; "
                                "delete it and re-train with a lower --lr")
    return model, state, meta


def verify_checkpoint(path):
    """The meta of a checkpoint whose file is sound, read whole but loaded into no model: its checksum, and the
    names, shapes, dtypes (floating point) and finiteness of its tensors against the model its meta describes
    (built on torch's meta device, which takes no memory). Every failure is a UserError naming ``path``."""
    return _read_checked(path, "meta")[2]


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by save_checkpoint, after the checks of verify_checkpoint.

    Returns
    -------
    Checkpoint of
    model : CLModel, PooledCLModel or RegressionModel (from meta['method']) on ``device``, eval mode.
    meta : dict.
    """
    model, state, meta = _read_checked(path, "cpu")
    model.load_state_dict(state)
    return Checkpoint(model.to(device).eval(), meta)


def read_meta(path):
    """The meta of a checkpoint, read without loading its weights into memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]
    except Exception as e:
        raise safe_io.UserError(f"cannot read checkpoint {path} ({type(e).__name__}): "
                              "delete it, or re-train with --overwrite") from None


def checkpoint_voxels(meta):
    """{subject: voxel indices (int64)} a checkpoint was trained on (one subject, or the pooled ones)."""
    voxels = meta["voxels"]
    if isinstance(voxels, dict):
        return {int(s): np.asarray(v, dtype=np.int64) for s, v in voxels.items()}
    return {int(meta["subject"]): np.asarray(voxels, dtype=np.int64)}


def check_checkpoint(meta, path, root, method, subj, hemisphere, roi, image_size=None, voxels=True):
    """Raise a UserError unless a checkpoint's meta is that of the model the run asks for.

    Checked in order: method (a pooled method's h method included), subject (not for
    pooled models; ``subj`` is the subject the model was tuned on), hemisphere, ROI, image
    size (when given) and, with ``voxels``, the voxel indices that the masks under ``root``
    give for the recorded subjects, MAX_VOXELS and seed.
    """
    requested = {"method": method}
    if not method.startswith("pooled"):
        requested["subject"] = int(subj)
    requested.update(hemisphere=utils.hemi_code(hemisphere), roi=roi)
    if image_size is not None:
        requested["image_size"] = int(image_size)
    fix = "train the model for this request (see README), or change the options to match it"
    safe_io.check_same_settings(f"checkpoint {path}", meta, requested, fix)
    if voxels:
        if "voxels" not in meta:
            raise safe_io.UserError(f"checkpoint {path} records no voxel indices, so it cannot be checked against "
                                    "the masks under --root: re-train it with --overwrite")
        stored = checkpoint_voxels(meta)
        expected = {s: select_voxels(utils.roi_voxel_indices(root, s, hemisphere, roi), meta.get("max_voxels"),
                                     meta.get("seed", 0)) for s in stored}
        safe_io.check_same_settings(f"checkpoint {path}", {"voxels": stored}, {"voxels": expected},
                                  "the masks under --root changed since training: re-train it with --overwrite")


def _requested_checkpoint(root, method, subj, hemisphere, roi, epochs, image_size, voxels):
    """The path of a tuned method's checkpoint whose meta, read without its weights, is that of the request
    (parameters as ``tuned_meta``)."""
    path = utils.method_checkpoint_path(root, method, subj, hemisphere, roi, epochs)
    if not path.is_file():
        subj_flag = "" if method.startswith("pooled") else f" --subj {int(subj)}"
        raise safe_io.UserError(
            f"no {method} checkpoint at {path}: make it with python {utils.METHOD_SCRIPTS[method]}"
            f"{subj_flag} --hemisphere {utils.hemi_code(hemisphere)} --roi {roi} --epochs {int(epochs)}")
    check_checkpoint(read_meta(path), path, root, method, subj, hemisphere, roi, image_size, voxels)
    return path


def tuned_meta(root, method, subj, hemisphere, roi, epochs, image_size=None, voxels=True):
    """The meta of a tuned method's checkpoint, checked against the request, and the file verified whole
    (``verify_checkpoint``) without loading a model: what a run checks before its first write.

    Parameters
    ----------
    method : a tuned method of utils.METHODS; the file is utils.method_checkpoint_path.
    subj : the subject the model was tuned on (ignored by the pooled methods).
    image_size : the image size of the run (None: not checked, the caller uses the checkpoint's).
    voxels : check the recorded voxels against the masks under ``root`` (``check_checkpoint``).

    Returns
    -------
    CheckpointMeta of path (the checkpoint) and meta (dict).
    """
    path = _requested_checkpoint(root, method, subj, hemisphere, roi, epochs, image_size, voxels)
    return CheckpointMeta(path, verify_checkpoint(path))


def load_tuned(root, method, subj, hemisphere, roi, epochs, device="cpu", image_size=None, voxels=True):
    """The checkpoint of a tuned method, checked against the request (parameters as ``tuned_meta``).

    Returns
    -------
    Checkpoint (model on ``device`` in eval mode, meta).
    """
    return load_checkpoint(_requested_checkpoint(root, method, subj, hemisphere, roi, epochs, image_size, voxels),
                           device)


def load_feature_alexnet(root, method, subj, hemisphere, roi, epochs, weights="imagenet", device="cpu", seed=0,
                         image_size=None, voxels=True):
    """The AlexNet of a feature-extraction method, in eval mode on ``device``.

    Parameters
    ----------
    method : one of utils.METHODS. 'untuned' is utils.load_alexnet(weights, seed); the
        others read the trunk of the checkpoint that ``load_tuned`` finds and checks.
    subj : the subject the model was tuned on (ignored by the pooled methods).
    image_size, voxels : as for ``load_tuned``.

    Returns
    -------
    FeatureNet of
    alexnet : torchvision AlexNet.
    meta : the checkpoint's meta, or None for 'untuned'.
    """
    if method == "untuned":
        return FeatureNet(utils.load_alexnet(weights, seed).to(device).eval(), None)
    model, meta = load_tuned(root, method, subj, hemisphere, roi, epochs, device, image_size, voxels)
    return FeatureNet(model.alexnet.eval(), meta)


# --- Training --------------------------------------------------------------------------

def partial_path(checkpoint):
    """The resumable state of an unfinished run: <checkpoint>.partial."""
    return Path(str(checkpoint) + ".partial")


def lock_path(checkpoint):
    """The lock of a running training: .<checkpoint name>.lock (safe_io.exclusive)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f".{checkpoint.name}.lock")


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


class _Diverged(Exception):
    """Raised inside an epoch when the loss or the weights stop being finite: (what, where)."""


def _run_epoch(model, optimizer, datasets, batch_size, device, generator, temperature, precision="fp32"):
    """One pass over the train rows of every dataset in turn, in ``precision``; returns per-dataset mean losses.

    A non-finite loss raises _Diverged before the step that would spread it to the weights.
    """
    model.train()
    losses = []
    for data in datasets:
        total, count = 0.0, 0
        batches = utils.iterate_batches(data.images, data.fmri, data.train, batch_size, device,
                                        shuffle=True, generator=generator)
        bar = options.progress(_prefetch(batches), f"train {utils.subj_dir(data.subj)}",
                               total=-(-len(data.train) // batch_size), log=None)
        for step, (x, y) in enumerate(bar, 1):
            # BatchNorm cannot train on one row, and InfoNCE of one pair carries no signal.
            if len(x) < 2:
                continue
            with utils.autocast(device, precision):
                loss = model.loss(x, y, data.subj, temperature)
            value = loss.item()
            if not np.isfinite(value):
                where = f"step {step}" + (f" of {utils.subj_dir(data.subj)}" if len(datasets) > 1 else "")
                raise _Diverged(f"loss {value}", where)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{value:.4f}")
        losses.append(total / max(count, 1))
    return losses


@torch.no_grad()
def evaluate(model, datasets, batch_size, device, temperature=0.3, split="test", precision="fp32"):
    """Mean loss per dataset on its ``split`` rows, in eval mode, in batches of ``batch_size`` and in ``precision``."""
    model.eval()
    losses = []
    for data in datasets:
        rows = getattr(data, split)
        total = 0.0
        for x, y in utils.iterate_batches(data.images, data.fmri, rows, batch_size, device):
            with utils.autocast(device, precision):
                total += model.loss(x, y, data.subj, temperature).item() * len(x)
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
    state = safe_io.load_state_dict_file(partial, "partial training state")
    fix = "pass --overwrite to start again"
    if not isinstance(state, dict):
        raise safe_io.UserError(f"{partial} is not a partial training state of this project: {fix}")
    safe_io.check_checksum(partial, {k: v for k, v in state.items() if k != "checksum"}, state.get("checksum"), fix)
    safe_io.check_same_settings(f"unfinished run {partial}", state.get("meta", {}), training_settings(meta),
                              "rerun with the same options, or pass --overwrite to start again")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], generator, device)
    options.say(f"resuming {checkpoint} after epoch {state['epoch']}")
    return state["epoch"], state["history"]


def _save_partial(state, path):
    """Write a resumable state with the checksum of its tensors (weights, Adam moments, RNG states), which
    _resume verifies."""
    safe_io.atomic_torch_save(dict(state, checksum=safe_io.tensor_checksum(state)), path)


def _divergence_error(model, checkpoint, epoch, what, where, lr, temperature):
    """The one-line UserError of a run stopped by a non-finite loss or weights at ``epoch`` (1-based)."""
    cause = f"the learning rate {lr:g} is too high"
    if not isinstance(model, RegressionModel):
        cause += f" or the temperature {temperature:g} too low"
    partial = partial_path(checkpoint)
    kept = f"{partial} keeps epoch {epoch - 1}" if partial.exists() else "no training state was kept"
    return safe_io.UserError(f"training of {Path(checkpoint).name} diverged: {what} at epoch {epoch}, {where}; "
                           f"likely {cause}; no checkpoint written, {kept}: change the settings and rerun "
                           "with --overwrite")


def train_model(model, datasets, checkpoint, meta, epochs, lr, batch_size, temperature=0.3, device="cpu",
                seed=0, overwrite=False, precision="fp32"):
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
    temperature : InfoNCE temperature (CL and pooled; a regression model ignores it).
    device : torch.device or str.
    seed : seeds the batch order and dropout.
    overwrite : discard an existing partial state instead of resuming it.
    precision : 'fp32' (the authors') or 'bf16' (autocast on any device; faster on a GPU).

    Returns
    -------
    model : the trained model, on ``device``, in eval mode.
    meta : ``meta`` plus 'history', the per-epoch losses.
    """
    device = torch.device(device)
    checkpoint = Path(checkpoint)
    safe_io.remove_stale_temps(checkpoint.parent, *(glob.escape(p.name) for p in
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
        bar = options.progress(range(start, epochs), Path(checkpoint).stem, total=epochs, initial=start)
        for epoch in bar:
            t0 = time.perf_counter()
            try:
                train_losses = _run_epoch(model, optimizer, datasets, batch_size, device, generator, temperature,
                                          precision)
                bad = safe_io.nonfinite_tensor(model.state_dict())
                if bad is not None:
                    raise _Diverged(f"non-finite weights ({bad})", "after its last step")
            except _Diverged as e:
                if saving is not None:
                    saving.result()
                raise _divergence_error(model, checkpoint, epoch + 1, *e.args, lr, temperature) from None
            test_losses = evaluate(model, datasets, batch_size, device, temperature, precision=precision)
            history.append(_history_row(epoch + 1, datasets, train_losses, test_losses, time.perf_counter() - t0))
            bar.set_postfix(train_loss=f"{history[-1]['train_loss']:.4f}", test_loss=f"{history[-1]['test_loss']:.4f}")
            state = _cpu_copy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "epoch": epoch + 1, "rng": _rng_state(generator, device),
                               "history": history, "meta": meta})
            if saving is not None:
                saving.result()
            saving = writer.submit(_save_partial, state, partial_path(checkpoint))
            safe_io.atomic_write_text(json.dumps(history, indent=1), log_path(checkpoint))
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


# Meta entries that describe the run but not the model: two runs that differ only there
# make the same checkpoint (the options whole, the loss log, MAX_VOXELS, whose effect is
# the recorded voxels, and the checksum of the file).
NOT_SETTINGS = ("config", "history", "max_voxels", "checksum")


def training_settings(meta):
    """The entries of a checkpoint's meta that must agree for a checkpoint or unfinished run to be reused."""
    return {k: v for k, v in meta.items() if k not in NOT_SETTINGS}


class RoiPlan(NamedTuple):
    """What train_roi is about to train: the checkpoint's path and the meta to save with it."""
    path: Path
    meta: dict


def plan_roi(opts, roi, method, skip_small=False):
    """The checkpoint path and meta of the model of ``method`` for one ROI, as train_roi saves it.

    Parameters
    ----------
    opts : the options of the method's training script (the ones train_roi lists).
    roi : ROI name.
    method : 'cl-tuned', 'reg-tuned', 'pooled-avg' or 'pooled-const'.
    skip_small : print a line and return None for an ROI with fewer than MIN_VOXELS voxels
        (in every subject) instead of raising.

    Returns
    -------
    RoiPlan of the two below, or None when ``skip_small`` skips the ROI.
    path : utils.method_checkpoint_path of the method.
    meta : dict of plain Python values: method, subject (pooled: subjects), hemisphere, roi,
        image_size, epochs, lr, batch_size, temperature (not for reg-tuned), precision, max_voxels,
        weights, seed, the model's sizes (see build_model), voxels (pooled: per subject,
        keyed by the subject number as a string), format_version and config (the options
        whole, options.run_config).
    """
    pooled = method.startswith("pooled")
    roi, hemi, min_voxels = utils.check_roi(roi), utils.hemi_code(opts.HEMISPHERE), opts.MIN_VOXELS
    subjects = sorted(int(s) for s in opts.SUBJECTS or utils.find_subjects(opts.ROOT)) if pooled else [int(opts.SUBJ)]
    indices = {s: utils.roi_voxel_indices(opts.ROOT, s, hemi, roi) for s in subjects}
    voxels = {s: select_voxels(v, opts.MAX_VOXELS, opts.SEED) for s, v in indices.items() if len(v) >= min_voxels}
    if not voxels:
        where = ", ".join(utils.subj_dir(s) for s in subjects)
        counts = ", ".join(str(len(v)) for v in indices.values())
        if not any(len(v) for v in indices.values()):
            if skip_small:
                options.say(f"skip {roi}: empty in {hemi} of {where}")
                return None
            raise safe_io.UserError(f"ROI {roi} is empty in {hemi} of {where}: choose an ROI with voxels there "
                                  "(the *_all_rois scripts skip empty ROIs)")
        if skip_small:
            options.say(f"skip {roi}: {counts} voxels in {hemi} of {where} (fewer than MIN_VOXELS={min_voxels})")
            return None
        raise safe_io.UserError(f"ROI {roi} has {counts} voxels in {hemi} of {where}, fewer than MIN_VOXELS={min_voxels}: "
                              "choose a larger ROI or lower --min-voxels")
    for s, v in indices.items():
        if pooled and 0 < len(v) < min_voxels:
            options.say(f"{roi}: {utils.subj_dir(s)} left out "
                        f"({len(v)} voxels in {hemi}, fewer than MIN_VOXELS={min_voxels})")
    meta = {"method": method}
    if pooled:
        meta["subjects"] = list(voxels)
    else:
        meta["subject"] = subjects[0]
    meta.update(hemisphere=hemi, roi=roi, image_size=int(opts.IMAGE_SIZE), epochs=int(opts.EPOCHS), lr=float(opts.LR),
                batch_size=int(opts.BATCH_SIZE))
    if method != "reg-tuned":
        meta["temperature"] = float(opts.TEMPERATURE)
    meta["precision"] = utils.check_precision(opts.PRECISION)
    meta.update(max_voxels=opts.MAX_VOXELS, weights=str(opts.WEIGHTS), seed=int(opts.SEED))
    counts = {s: len(v) for s, v in voxels.items()}
    if pooled:
        h = opts.H_CONST if method == "pooled-const" else int(np.mean(list(counts.values())))
        meta.update(voxel_counts={str(s): n for s, n in counts.items()}, h=int(h), z=max(1, int(0.25 * h)),
                    voxels={str(s): v.tolist() for s, v in voxels.items()})
    else:
        (n,) = counts.values()
        meta["n_voxels"] = n
        if method == "cl-tuned":
            meta["h"], meta["z"] = default_dims(n)
        meta["voxels"] = voxels[subjects[0]].tolist()
    meta.update(format_version=utils.FORMAT_VERSION, config=options.run_config(opts))
    return RoiPlan(utils.method_checkpoint_path(opts.ROOT, method, subjects[0], hemi, roi, opts.EPOCHS), meta)


def train_roi(opts, roi, method, skip_small=False):
    """Train and save the model of ``method`` for one ROI with the options of its training script.

    Parameters
    ----------
    opts : the script's parsed options. Every method reads ROOT, HEMISPHERE, EPOCHS, LR,
        BATCH_SIZE, WEIGHTS, DEVICE, SEED (initialisation and batch order), IMAGE_SIZE, PRECISION,
        MAX_VOXELS (keep at most this many voxels per subject, select_voxels; None keeps
        all), MIN_VOXELS (applied before MAX_VOXELS; the authors' 1 by default) and OVERWRITE
        (discard an existing checkpoint or unfinished run). CL and regression read SUBJ;
        the pooled methods read SUBJECTS (the candidate subjects, empty for all under
        ROOT; those where the ROI has fewer than MIN_VOXELS voxels are left out, the rest
        run in sorted order) and, for pooled-const, H_CONST (h; pooled-avg: the mean voxel
        count). CL and pooled read TEMPERATURE.
    roi, method, skip_small : as for plan_roi.

    Returns
    -------
    path : the checkpoint written, or None when skipped (ROI too small, or the checkpoint
        exists with the same settings and OVERWRITE is False; other settings are an error).
    """
    device = utils.resolve_device(opts.DEVICE)
    plan = plan_roi(opts, roi, method, skip_small)
    if plan is None:
        return None
    path, meta = plan
    if _finished(path, meta, opts.OVERWRITE):
        return None
    safe_io.check_writable(path.parent, utils.cache_dir(opts.ROOT))
    datasets = [utils.SubjectData(opts.ROOT, s, meta["hemisphere"], v, meta["image_size"])
                for s, v in checkpoint_voxels(meta).items()]
    model = build_model(meta)
    # Another run of this ROI (other settings, maybe) must neither train beside this one nor have
    # finished meanwhile: a checkpoint is replaced only with --overwrite.
    with safe_io.exclusive(lock_path(path), f"training of {path.name}"):
        if _finished(path, meta, opts.OVERWRITE):
            return None
        train_model(model, datasets, path, meta, meta["epochs"], meta["lr"], meta["batch_size"],
                    meta.get("temperature"), device, meta["seed"], opts.OVERWRITE, meta["precision"])
    options.say(f"saved {path}")
    return path


def checkpoint_done(opts, roi, method):
    """Whether train_roi(opts, roi, method) has nothing left to do: the checkpoint exists with these
    settings (one of other settings is a UserError), or the ROI is too small to train."""
    plan = plan_roi(opts, roi, method, skip_small=True)
    return plan is None or _finished(plan.path, plan.meta, opts.OVERWRITE)


def _finished(path, meta, overwrite):
    """Whether the checkpoint ``path`` exists with the settings of ``meta`` (a line says it is skipped);
    False when it is missing or ``overwrite``. One of other settings is a UserError."""
    if overwrite or not path.exists():
        return False
    safe_io.check_same_settings(path, read_meta(path), training_settings(meta),
                                "use --overwrite to re-train it, or another --root")
    options.say(f"skip {meta['roi']}: {path} exists (use --overwrite to re-train)")
    return True
