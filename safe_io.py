"""The safeguards, kept out of the science: atomic writes and temporary files, writability,
safe loading of .npy arrays, mapping files and state dicts, non-finite checks, and the
check that a saved checkpoint or result was made with the requested settings.

A problem with the user's input is a ``UserError``: the scripts report it as one line
naming the path or value and the fix, and exit with code 2 (options.cli).
"""

import errno
import fnmatch
import glob
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


def require_dir(path, fix):
    """Raise a UserError naming ``path`` and ``fix`` unless ``path`` is a folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"missing folder {path}: {fix}")
    return path


def require_file(path, fix):
    """Raise a UserError naming ``path`` and ``fix`` unless ``path`` is a file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}: {fix}")
    return path


# --- Atomic writes and temporary files ------------------------------------------------

# Temporary files and folders are named <name>.tmp-<host>-<pid>-<random>..., so that a
# later run can tell a killed run's leftovers (process gone: removed) from a live run's.
TEMP_MARK = ".tmp-"
_TEMP_OWNER = re.compile(re.escape(TEMP_MARK) + r"(?P<host>[^-/]+)-(?P<pid>\d+)-")


def _host():
    return socket.gethostname().replace("-", "_")


def temp_prefix(name):
    """'<name>.tmp-<host>-<pid>-': the start of the name of a temporary file or folder of this process."""
    return f"{name}{TEMP_MARK}{_host()}-{os.getpid()}-"


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder, *patterns):
    """Remove the temporary files and folders in ``folder`` left by killed processes of this host.

    Only names made by temp_prefix count; those of live processes, and of other hosts
    (whose processes cannot be checked from here), are kept.

    Parameters
    ----------
    folder : path-like (a missing folder has nothing to remove).
    patterns : fnmatch patterns of the final names the temporaries stood for (default: any).

    Returns
    -------
    removed : sorted list of Path.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, removed = _host(), []
    for path in folder.iterdir():
        m = _TEMP_OWNER.search(path.name)
        if m is None or m["host"] != host or process_alive(int(m["pid"])):
            continue
        target = path.name[:m.start()].removeprefix(".")
        if patterns and not any(fnmatch.fnmatchcase(target, p) for p in patterns):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return sorted(removed)


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The temporary file is hidden and named by temp_prefix; it is created with mode 0666
    less the umask, so the output gets the user's usual permissions. A crash inside the
    block leaves ``path`` untouched and removes the temporary file; a killed run's
    leftovers for the same ``path`` are removed here. A full disk or quota (ENOSPC,
    EDQUOT) inside the block is a UserError naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, glob.escape(path.name))
    while True:
        tmp = path.parent / f".{temp_prefix(path.name)}{secrets.token_hex(4)}{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield str(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"cannot write {path} ({e.strerror}): free disk space under {path.parent} (or raise "
                        "your quota) and run again; finished outputs are kept and the rerun resumes") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _take_lock(path):
    """Create the lock file ``path`` holding '<host> <pid>' in one step (a hard link of a written file, which
    fails if ``path`` exists, also over NFS); returns None, or the owner (host, pid) of the existing lock."""
    tmp = path.parent / f".{temp_prefix(path.name)}{secrets.token_hex(4)}"
    tmp.write_text(f"{_host()} {os.getpid()}\n")
    try:
        os.link(tmp, path)
        return None
    except FileExistsError:
        try:
            host, pid = path.read_text().split()
            return host, int(pid)
        except FileNotFoundError:  # released meanwhile: the caller tries again
            return "", 0
        except (OSError, ValueError):
            return "an unknown host", 0
    finally:
        tmp.unlink()


@contextmanager
def exclusive(path, what):
    """Hold the lock file ``path`` for the block; it names this host and process.

    A lock held by a live process, or by one on another host (which cannot be checked from
    here), is a UserError naming it and ``what`` it guards; a lock left by a killed process
    of this host is taken over. The lock is removed when the block ends.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while (owner := _take_lock(path)) is not None:
        host, pid = owner
        if host == _host() and not process_alive(pid):
            path.unlink(missing_ok=True)  # left by a killed process
        elif host:
            raise UserError(f"{what} is in progress in process {pid} on {host} (lock {path}): wait for it to "
                            "finish, or use another --root; if no such run is going on, delete the lock")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def check_writable(*folders):
    """Raise a UserError unless every output folder exists and is writable, or can be created.

    Writes nothing: the nearest existing folder on the way must be a writable folder.
    """
    for folder in folders:
        folder = Path(folder)
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise UserError(f"cannot write to {folder}: {probe} is not a folder; choose another --root "
                            "or move that file away")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {folder}: {probe} is not writable by you; choose another --root "
                            "or fix its permissions")


def check_free_space(target, n_bytes, what, fix=""):
    """A UserError naming ``what`` and ``target`` unless the folder of ``target`` has ``n_bytes`` free.

    Checked before reserving the space: a disk filled to the last block leaves no room even
    for the error message.
    """
    free = shutil.disk_usage(Path(target).parent).free
    if free < n_bytes:
        raise UserError(f"cannot write {what} {target}: it needs {n_bytes / 2**30:.2f} GiB but "
                        f"{free / 2**30:.2f} GiB are free there; free disk space{' ' + fix if fix else ''}")


def expand_vars(text, flag):
    """``text`` with its $NAME and ${NAME} replaced from the environment; an unset one is a UserError naming
    ``flag``. A value that itself holds '$' is fine."""
    unset = [m[1] or m[2] for m in re.finditer(r"\$(?:\{([^}]*)\}|(\w+))", text)
             if (m[1] or m[2]) not in os.environ]
    if unset:
        raise UserError(f"{flag} {text}: the environment variable {unset[0]} is not set here; set it, or give a folder")
    return os.path.expandvars(text)


def atomic_torch_save(obj, path):
    import torch
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            # torch's zip writer reports a failed write (a full disk, a quota) as a RuntimeError
            # about stream positions, without the OS error; the file system is the likely cause.
            if "inline_container" not in str(e):
                raise
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}, or over quota: torch could not write "
                                        "the file") from None


def atomic_np_save(array, path):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def atomic_joblib_dump(obj, path):
    import joblib
    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp)


def atomic_write_text(text, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_json_dump(obj, path):
    atomic_write_text(json.dumps(obj, indent=1, sort_keys=True), path)


# --- Reading files safely -------------------------------------------------------------

def _reason(e):
    """The first line of an exception's message, or its type when it has none."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_npy(path, fix="re-copy the file", mmap_mode=None):
    """A numeric .npy array (never a pickle); a truncated or corrupt file is a one-line UserError naming it."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"cannot read {path} as a numeric .npy array ({_reason(e)}): the file is truncated "
                        f"or corrupt; {fix}") from None
    if array.dtype.kind not in "biuf":
        raise UserError(f"{path} holds {array.dtype} values, not numbers: {fix}")
    return array


def read_json(path, fix, kind=dict):
    """The JSON value of ``path``, which must be a ``kind``; an empty, corrupt or other file is a UserError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path} as JSON ({_reason(e)}): the file is empty or corrupt; {fix}") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}: {fix}")
    return value


def read_csv(path, fix, columns=(), **kwargs):
    """pandas.read_csv of ``path`` (``kwargs`` passed on), which must have ``columns``; an empty, corrupt or
    other table is a UserError naming it."""
    import pandas as pd
    try:
        table = pd.read_csv(path, **kwargs)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"cannot read {path} as a table ({_reason(e)}): the file is empty or corrupt; {fix}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}: {fix}")
    return table


def cached_array(path, shape, dtype):
    """A derived cache ``path`` (.npy) memory-mapped read-only, or None when it is missing or damaged.

    A cache that cannot be read (a truncated file, a disk that filled up), or holds another
    dtype or shape (``shape`` None: any), is removed with a line, so that the caller
    rebuilds it: caches are safe to delete.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.dtype == np.dtype(dtype) and (shape is None or array.shape == tuple(shape)):
            return array
        reason = f"it holds {array.dtype} {array.shape}, not {np.dtype(dtype)}" + (f" {tuple(shape)}" if shape else "")
    except (ValueError, OSError, EOFError) as e:
        reason = _reason(e)
    import options  # options imports this module
    options.say(f"rebuilding the damaged cache {path} ({reason})")
    path.unlink()
    return None


def first_nonfinite(array, chunk_rows=1024):
    """(row, column) of the first NaN or Inf of a 2-D array in row order, or None if all are finite.

    Works in blocks of rows, so a memory-mapped file needs no full-size temporary.
    """
    for start in range(0, array.shape[0], chunk_rows):
        finite = np.isfinite(array[start:start + chunk_rows])
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            return start + int(row), int(col)
    return None


# A pickled mapping (np.save of a dict) needs only these: numpy's array and scalar
# re-constructors, ndarray and dtype; builtin dicts, ints and strings need no global.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.int64(0).__reduce__()[0]
_MAPPING_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT, ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR, ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
}


class _MappingUnpickler(pickle.Unpickler):
    """Unpickles only what a saved dict of ints and strings needs; anything else could run code."""

    def find_class(self, module, name):
        if (module, name) not in _MAPPING_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which could run code")
        return _MAPPING_GLOBALS[module, name]


def load_mapping_file(path):
    """The dict code (int) -> ROI name (str) of an Algonauts ``mapping_<class>.npy``, read without running code.

    The file is a pickled 0-d object array; it is unpickled with only numpy's array
    re-constructors allowed, so a file that would run code is refused with one line.
    """
    fix = "re-copy the Algonauts roi_masks folder (mapping files hold a dict of ROI codes to names)"
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                raise ValueError("it is not a .npy file")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f".npy format version {version}")
            shape, _, dtype = readers[version](f)
            if shape != () or dtype != object:
                raise ValueError(f"a {dtype} array of shape {shape}")
            mapping = _MappingUnpickler(f).load().item()
        if not isinstance(mapping, dict):
            raise ValueError(f"a pickled {type(mapping).__name__}")
        return {int(k): str(v) for k, v in mapping.items()}
    except Exception as e:
        raise UserError(f"refusing {path}: not a mapping file ({_reason(e)}); {fix}") from None


# --- Images --------------------------------------------------------------------------------

# Algonauts image names: row i of the fMRI (0-based) is the image numbered i + 1.
ALGONAUTS_IMAGE = re.compile(r"train-(\d+)_nsd-(\d+)\.png")


def check_image_numbers(paths):
    """Raise a UserError naming the first image (sorted order) that is not ``train-<row + 1>_nsd-<id>.png``.

    The fMRI rows follow the image numbers, so a gap, a number out of order or a name in
    other case (``TRAIN-0005_...PNG`` sorts first) would pair every later row with the
    wrong image.
    """
    for row, path in enumerate(paths):
        m = ALGONAUTS_IMAGE.fullmatch(Path(path).name)
        if m is None:
            raise UserError(f"image {path} is not named like train-0001_nsd-00013.png (in lower case): the numbers "
                            "in the names give the fMRI rows; restore the Algonauts name or remove the file")
        if int(m[1]) != row + 1:
            raise UserError(f"image {path} is image {row + 1} in name order but is numbered {int(m[1])}: the "
                            f"images must be numbered 1..{len(paths)} without gaps, so that fMRI row i is image i; "
                            "restore the missing or extra images of the Algonauts folder")


@contextmanager
def _open_image(path):
    """PIL's Image.open, with every way a file can fail to be a picture as one UserError naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F"):
                raise UserError(f"image {path} has 32-bit pixels (PIL mode {im.mode}) of unknown range: "
                                "save it as an 8-bit RGB image")
            yield im
    except Image.DecompressionBombError as e:
        raise UserError(f"refusing image {path}: {_reason(e).split(', could be')[0]} (a decompression bomb?); "
                        "replace it by a smaller image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({_reason(e)}): replace or remove the file") from None


def check_image_files(paths):
    """Open every image's header: a missing file (a dangling or looping link), a file that is not a picture,
    a decompression bomb or a pixel format of unknown range is a UserError naming it. Decodes no pixels."""
    for path in paths:
        with _open_image(path):
            pass


def read_image(path):
    """An image file as an RGB PIL image, with one-line UserErrors (see check_image_files).

    16-bit greyscale (PIL mode I;16, a 16-bit PNG) is scaled to 8 bits: PIL's own
    conversion clips it, so that it comes out solid white.
    """
    from PIL import Image
    with _open_image(path) as im:
        if im.mode.startswith("I;16"):
            grey = np.asarray(im).astype(np.uint32)
            return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGB")


# --- State dicts -----------------------------------------------------------------------

def load_state_dict_file(path, what="weights", mmap=False):
    """torch.load(path, weights_only=True) with a one-line UserError for missing or corrupt files.

    With ``mmap`` the tensors are memory-mapped from the file instead of read into memory.
    """
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} not found: check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"cannot load {what} file {path} ({type(e).__name__}): the file is corrupt, "
                        "re-create or re-download it") from None


def nonfinite_tensor(state):
    """Name of the first floating-point tensor of a state dict that holds NaN or Inf, or None."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not tensor.isfinite().all():
            return name
    return None


def _tensors(state, prefix=""):
    """(name, tensor) of every tensor in a nested structure of dicts, lists and tuples, in name order."""
    import torch
    if torch.is_tensor(state):
        return [(prefix, state)]
    if isinstance(state, dict):
        items = sorted((str(k), v) for k, v in state.items())
    elif isinstance(state, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(state)]
    else:
        return []
    return [pair for k, v in items for pair in _tensors(v, f"{prefix}/{k}" if prefix else k)]


def tensor_checksum(state):
    """'sha256:<hex>' over the names, dtypes, shapes and bytes of every tensor of ``state`` (a state dict, or
    any nesting of dicts and lists), in name order, so that any changed value changes it.

    About 0.9 GB/s on one core: 0.4 s for a 326 MB checkpoint (docs/safeguards.md).
    """
    import torch
    digest = hashlib.sha256()
    for name, tensor in _tensors(state):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def check_checksum(path, state, recorded, fix):
    """Raise a UserError unless ``recorded`` is the tensor_checksum of ``state``, read from ``path``."""
    if recorded is None:
        raise UserError(f"{path} records no checksum of its tensors (it was made before checksums were "
                        f"recorded), so damage to it cannot be detected: {fix}")
    if tensor_checksum(state) != recorded:
        raise UserError(f"{path} is damaged: its tensors differ from the checksum recorded when it was saved "
                        f"(bit rot, or a file changed or copied in part): {fix}")


def check_state_dict(path, state, expected, fix):
    """Raise a UserError unless the state dict ``state`` read from ``path`` fits the model whose state dict
    is ``expected``: the same names and shapes, and floating-point tensors where the model's are (load_state_dict
    would cast int weights silently). NaN and Inf are the caller's to check (nonfinite_tensor): the fix differs."""
    import torch
    if not (isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())):
        raise UserError(f"{path} is not a state dict (a dict of tensors): {fix}")
    missing, extra = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected tensor {extra[0]}"
        raise UserError(f"{path} {what} ({len(missing)} missing, {len(extra)} unexpected): {fix}")
    for name, want in expected.items():
        have = state[name]
        if have.shape != want.shape:
            raise UserError(f"{path} holds {name} of shape {tuple(have.shape)}, but the model needs "
                            f"{tuple(want.shape)}: {fix}")
        if want.is_floating_point() and not have.is_floating_point():
            raise UserError(f"{path} holds {name} as {str(have.dtype).removeprefix('torch.')} values: weights "
                            f"must be floating point; {fix}")


# --- Saved settings ----------------------------------------------------------------------

def _plain(value):
    """Arrays, tuples and numpy scalars as plain Python values, so saved and requested settings compare equal."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _show_setting(value):
    """A setting for a one-line message; long lists are summarised."""
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} values: {', '.join(map(str, value[:3]))}, ...]"
    if isinstance(value, dict) and len(str(value)) > 80:
        return "{" + ", ".join(f"{k}: {_show_setting(v)}" for k, v in value.items()) + "}"
    return repr(value)


NOT_RECORDED = "not recorded"


def check_same_settings(path, stored, requested, fix="use --overwrite to replace it, or another --root"):
    """Raise a UserError naming the first setting of ``requested`` that ``stored`` records otherwise.

    Parameters
    ----------
    path : the existing checkpoint or result.
    stored : dict, the settings it records (its meta).
    requested : dict, the settings of this run that matter, in the order to check them.
    fix : the end of the message.
    """
    for key, want in requested.items():
        have = _plain(stored.get(key, NOT_RECORDED))
        if have != _plain(want):
            raise UserError(f"{path} was made with {key}={_show_setting(have)}, "
                            f"but this run asks for {key}={_show_setting(_plain(want))}: {fix}")
