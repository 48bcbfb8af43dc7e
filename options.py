"""The options of a script: its ``# --- Options ---`` block of UPPER_CASE constants becomes
its command-line flags (``IMAGE_SIZE`` -> ``--image-size``), and its ``CHOICES`` and
``RANGES`` dicts restrict their values; everything is checked before any work.

Only the standard library is imported here, so ``--help`` answers at once; the scripts
load their heavy helpers with ``lazy_import``.
"""

import argparse
import ast
import functools
import importlib
import inspect
import io
import math
import sys
import time
import tokenize
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import safe_io


class _LazyModule:
    """Stands for a module until an attribute is first asked of it, then imports it (importlib)
    and forwards every attribute get and set to it.

    Unlike importlib's LazyLoader, nothing is put in sys.modules before the import, so code
    that walks sys.modules (warnings, inspect, pickle) can never leave the module half-run.
    """

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def _module(self):
        return importlib.import_module(object.__getattribute__(self, "_name"))

    def __getattr__(self, attr):
        return getattr(self._module(), attr)

    def __setattr__(self, attr, value):
        setattr(self._module(), attr, value)

    def __repr__(self):
        return f"<module {object.__getattribute__(self, '_name')!r}, imported on first use>"


def lazy_import(name):
    """The module ``name`` if it is imported already, else a stand-in that imports it on first use.

    Scripts load torch and the helpers that need it this way, so that parsing the
    options (and ``--help``) does not wait for them.
    """
    return sys.modules.get(name) or _LazyModule(name)


class Allowed(NamedTuple):
    """What an option allows beyond its type, declared in a script's RANGES dict.

    ``text`` is shown by --help and in errors; ``test(value, opts)`` -> bool sees the
    parsed options (``opts.ROOT``, ...). A list option is tested element by element,
    unless ``whole``. ``found(opts)``, if given, says in the error what the data hold.
    """
    text: str
    test: Callable
    whole: bool = False
    found: Callable = None


def at_least(low):
    return Allowed(f">= {low}", lambda value, opts: value >= low)


def above(low):
    return Allowed(f"> {low}", lambda value, opts: value > low)


def between(low, high):
    return Allowed(f"between {low} and {high}", lambda value, opts: low <= value <= high)


POSITIVE = above(0)
# torch seeds are unsigned 64-bit integers: a larger SEED would overflow inside torch.manual_seed.
SEED_RANGE = between(0, 2**64 - 1)


class Option(NamedTuple):
    """One option of a script: its type (``kind`` is the element type of a list) and help."""
    name: str
    kind: type
    is_list: bool
    optional: bool  # 'none' gives None
    help: str


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _annotation_type(node, where):
    """(kind, is_list, optional) of an annotation ``T``, ``list[T]`` or either ``| None``."""
    optional = (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)
                and isinstance(node.right, ast.Constant) and node.right.value is None)
    node = node.left if optional else node
    is_list = isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "list"
    node = node.slice if is_list else node
    if not (isinstance(node, ast.Name) and node.id in _KINDS):
        raise RuntimeError(f"{where}: annotate an option as T, list[T] or T | None, T one of {', '.join(_KINDS)}")
    return _KINDS[node.id], is_list, optional


def _value_type(value, where):
    """(kind, is_list, optional) of an option's value."""
    is_list = isinstance(value, (list, tuple))
    if is_list and not value or value is None:
        raise RuntimeError(f"{where}: annotate an empty-list or None default, e.g. SUBJECTS: list[int] = [] "
                           "or MAX_VOXELS: int | None = None")
    kind = type(value[0] if is_list else value)
    if kind not in _KINDS.values():
        raise RuntimeError(f"{where}: an option is a bool, int, float or str, or a list of one of them")
    return kind, is_list, False


@functools.cache
def _options_block(module):
    """The options of a script: the statements between ``# --- Options ---`` and the next ``# ---``.

    The block is parsed with ast, so an option may span several lines. Each statement
    must assign one UPPER_CASE name (``NAME = value`` or ``NAME: type = value``); anything
    else raises. The type comes from the annotation, else from the value; the help from
    the comments on the statement's lines.

    Returns
    -------
    options : list of Option, in block order.
    """
    source = inspect.getsource(module)
    where = getattr(module, "__file__", module.__name__)
    lines = [line.strip().lower() for line in source.splitlines()]
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("# --- options")) + 1
        end = next(i for i, line in enumerate(lines[start:], start) if line.startswith("# ---")) + 1
    except StopIteration:
        raise RuntimeError(f"{where} has no '# --- Options ---' block ending with a '# ---' line") from None
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    options = []
    for node in ast.parse(source).body:
        if node.end_lineno < start or node.lineno > end:
            continue
        target = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        line = f"{where}:{node.lineno}"
        if not (isinstance(target, ast.Name) and target.id.isupper() and start < node.lineno <= node.end_lineno < end):
            raise RuntimeError(f"{line}: the options block holds only assignments 'NAME = value' of UPPER_CASE names")
        if any(o.name == target.id for o in options):
            raise RuntimeError(f"{line}: option {target.id} is assigned twice")
        if isinstance(node, ast.AnnAssign):
            kind, is_list, optional = _annotation_type(node.annotation, line)
        else:
            kind, is_list, optional = _value_type(getattr(module, target.id), line)
        text = " ".join(comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments)
        options.append(Option(target.id, kind, is_list, optional, text))
    return options


def flags(module):
    """The command-line flags of a script's options, e.g. {'--root', '--image-size', ...}."""
    return {_flag(o.name) for o in _options_block(module)}


def _show(value):
    """A value as the command line writes it."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(_show, value)) or "(empty)"
    if isinstance(value, float):
        return f"{value:g}"
    return "''" if value == "" else "none" if value is None else str(value)


def _allowed_text(option, choices, allowed):
    """What an option (each element of a list) allows, in words."""
    if allowed is not None and allowed.whole:
        text = allowed.text
    elif choices is not None:
        text = "one of " + ", ".join(map(_show, choices))
    else:
        noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[option.kind]
        text = noun if allowed is None else f"{noun} {allowed.text}"
    return text + (" or none" if option.optional else "")


def _convert(option, text, allowed_text):
    """A flag's text in the option's type; anything else is a UserError naming flag, value and what is allowed."""
    if option.optional and text.lower() == "none":
        return None
    try:
        value = _BOOLS[text.lower()] if option.kind is bool else option.kind(text)
    except (KeyError, ValueError):
        value = None
    if value is None or option.kind is float and not math.isfinite(value):
        raise safe_io.UserError(f"{_flag(option.name)} {text}: allowed {allowed_text}")
    return value


def _flag(name):
    return "--" + name.lower().replace("_", "-")


def _check_distinct(option, values):
    """A UserError if a list flag names one value twice (``--subjects 1 1`` would run subject 1 twice)."""
    seen = set()
    for value in values:
        if value in seen:
            raise safe_io.UserError(f"{_flag(option.name)} {_show(values)}: {_show(value)} is given twice; "
                                    "give each value once")
        seen.add(value)


# The longest file or folder name that Linux and macOS file systems allow, in bytes.
NAME_MAX = 255


def _check_name_lengths(option, value):
    """A UserError unless every /-separated part of a string option (a path, maybe) fits in NAME_MAX bytes:
    a longer one fails deep inside the first file operation."""
    if option.kind is not str or value is None:
        return
    for text in value if option.is_list else [value]:
        part = max(text.split("/"), key=lambda p: len(p.encode()))
        if len(part.encode()) > NAME_MAX:
            raise safe_io.UserError(f"{_flag(option.name)} {text[:40]}...: its part {part[:20]}... is "
                                    f"{len(part.encode())} bytes long, more than the {NAME_MAX} a file or "
                                    "folder name may have; use a shorter name")


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, but a newline in an option's help starts a new line."""

    def _split_lines(self, text, width):
        split = super()._split_lines
        return [line for part in text.split("\n") for line in split(part, width)]


class _Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, missing value) are one-line UserErrors."""

    def error(self, message):
        raise safe_io.UserError(f"{message}: see python {self.prog} --help")


class _ListFlag(argparse.Action):
    """A list flag given once, with at least one value: argparse would keep only the last of
    two (``--rois V1v --rois V2v`` fits V2v alone) and take a bare ``--rois`` as no ROI at all."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            raise safe_io.UserError(f"{option_string} is given twice: give all its values after one {option_string}")
        if not values:
            raise safe_io.UserError(f"{option_string} has no value: name at least one, or leave the flag out "
                                    "for its default")
        setattr(namespace, self.dest, values)


def parse_options(module, argv=None):
    """Command-line flags built from a script's ``# --- Options ---`` block, checked before any work.

    Each UPPER_CASE constant becomes a flag (``IMAGE_SIZE`` -> ``--image-size``) whose
    default is the constant and whose help is its comment (every block declares ROOT,
    the project folder, so every script has ``--root``). Lists take several values (``--rois V1v V2v`` or
    ``--rois V1v,V2v``); ``none`` gives None where the type allows it (``T | None``).
    The script's ``CHOICES`` dict (option -> allowed names, or a dict name -> what it does, which
    --help shows one a line) and ``RANGES`` dict (option -> Allowed) restrict the values; --help lists them, and a value outside them (flag or
    constant) is a UserError ``--option VALUE: allowed ...``.

    Returns
    -------
    opts : SimpleNamespace with one UPPER_CASE attribute per option.
    """
    if isinstance(module, str):
        module = sys.modules[module]
    options = _options_block(module)
    if "ROOT" not in [o.name for o in options]:
        raise RuntimeError(f"{module.__file__}: the options block declares no ROOT (the project folder)")
    choices, ranges = getattr(module, "CHOICES", {}), getattr(module, "RANGES", {})
    undeclared = (set(choices) | set(ranges)) - {o.name for o in options}
    if undeclared:
        raise RuntimeError(f"{module.__name__}: CHOICES or RANGES name {', '.join(sorted(undeclared))}, not options")
    doc = (module.__doc__ or "").strip().splitlines()
    parser = _Parser(prog=Path(module.__file__).name, description=doc[0] if doc else None, formatter_class=_Formatter)
    allowed = {o.name: _allowed_text(o, choices.get(o.name), ranges.get(o.name)) for o in options}
    for o in options:
        default = getattr(module, o.name)
        restricted = o.name in choices or o.name in ranges
        described = isinstance(choices.get(o.name), dict)  # each choice with what it does, one a line
        allowed_here = "one of those below" if described else allowed[o.name]
        text = f"{o.help} (default: {_show(default)}" + (f"; allowed: {allowed_here})" if restricted else ")")
        if described:
            text += "".join(f"\n{name}: {what}" for name, what in choices[o.name].items())
        kwargs = (dict(nargs="*", metavar="V", action=_ListFlag) if o.is_list else
                  dict(nargs="?", const="true", metavar="BOOL") if o.kind is bool else
                  dict(metavar=o.kind.__name__.upper()))
        parser.add_argument(_flag(o.name), dest=o.name, default=None, help=text.replace("%", "%%"), **kwargs)
    args = parser.parse_args(argv)
    values = {}
    for o in options:
        raw = getattr(args, o.name)
        if raw is None:
            default = getattr(module, o.name)
            values[o.name] = list(default) if o.is_list else default
        elif o.is_list:
            values[o.name] = [_convert(o, t, allowed[o.name]) for token in raw for t in token.split(",") if t]
            _check_distinct(o, values[o.name])
        else:
            values[o.name] = _convert(o, raw, allowed[o.name])
    for o in options:
        _check_name_lengths(o, values[o.name])
    opts = SimpleNamespace(**values)
    for o in options:
        check, names, value = ranges.get(o.name), choices.get(o.name), values[o.name]
        for item in value if o.is_list else [value]:
            if item is not None and names is not None and item not in names:
                raise safe_io.UserError(f"{_flag(o.name)} {_show(item)}: allowed {allowed[o.name]}")
        for item in [value] if not o.is_list or check is not None and check.whole else value:
            if item is not None and check is not None and not check.test(item, opts):
                found = f" ({check.found(opts)})" if check.found else ""
                raise safe_io.UserError(f"{_flag(o.name)} {_show(item)}: allowed {allowed[o.name]}{found}")
    return opts


def cli(main):
    """Decorate a script's ``main(argv=None)``: a UserError becomes one line and exit code 2."""
    def wrapped(argv=None):
        try:
            return main(argv)
        except safe_io.UserError as e:
            say(f"error: {e}", file=sys.stderr)  # clears a progress bar left open by the error
            raise SystemExit(2) from None
    wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__ = main.__name__, main.__doc__, main
    return wrapped


class _Lines:
    """progress() off a terminal: plain lines on stdout, each written once (no redraws)."""

    def __init__(self, iterable, desc, total, initial, log):
        self.iterable, self.desc, self.log, self.postfix = iterable, desc, log, ""
        self.total = len(iterable) + initial if total is None and hasattr(iterable, "__len__") else total
        self.initial = initial

    def set_postfix(self, **values):
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def __iter__(self):
        start, done = time.perf_counter(), self.initial
        of = f"/{self.total}" if self.total is not None else ""
        for item in self.iterable:
            yield item
            done += 1
            if self.log == "each":
                print(f"{self.desc}: {done}{of} ({time.perf_counter() - start:.1f} s{self.postfix})",
                      flush=True)
        if self.log == "end":
            print(f"{self.desc}: {done - self.initial} done ({time.perf_counter() - start:.1f} s{self.postfix})",
                  flush=True)


def progress(iterable, desc, total=None, initial=0, log="each"):
    """Progress over ``iterable``: a tqdm bar on a terminal, plain lines elsewhere.

    A bar redraws itself with carriage returns and cursor moves, which fill a SLURM log or a
    CI log with thousands of fragments; so when stderr (where the bar is drawn) is not a
    terminal, nothing is redrawn: plain lines go to stdout with the scripts' other lines, and
    stderr keeps only the error line of a failed run.

    Parameters
    ----------
    iterable : the items; ``total`` is its length where it has none, ``initial`` the items
        already done before it (a resumed run).
    desc : str, the bar's label and the lines' prefix.
    log : off a terminal, 'each' writes one line per item ("desc: 3/30 (12.4 s, loss=0.51)":
        epochs, ROIs, subjects), 'end' one line when the loop ends (a stage: caching images,
        extracting features), None nothing (steps inside an epoch). On a terminal, the bar of
        a loop logged 'each' stays when it ends; the others are cleared.

    Returns
    -------
    An iterable of the same items, with ``set_postfix(**values)`` as tqdm's.
    """
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=log == "each")
    return _Lines(iterable, desc, total, initial, log)


def say(text, file=None):
    """Print one line (to ``file``, default stdout) without breaking a progress bar drawn on the terminal."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        tqdm.write(text, file=file)
    else:
        print(text, file=file or sys.stdout, flush=True)


def run_config(opts):
    """The run's options whole, as plain JSON values: what checkpoints and results record as 'config'."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in vars(opts).items()}


