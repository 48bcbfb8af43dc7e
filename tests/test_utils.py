"""utils.py: splits and folds, dataset pairing, image cache, options, AlexNet loading, bad input."""

import ast
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic_data
import options
import safe_io
import utils

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One subject, 12 images of 16 px (read-only: copy before changing it)."""
    root = tmp_path_factory.mktemp("tiny")
    synthetic_data.write_algonauts_dataset(root, n_subjects=1, n_images=12, image_size=16, seed=1)
    return root


def copy_root(src, dst, skip=()):
    for name in ("roi_masks", "training_fmri", "training_images"):
        if name not in skip:
            shutil.copytree(Path(src) / name, Path(dst) / name)
    return Path(dst)


def user_error(fn, capsys):
    """Run ``fn`` the way a script's main runs: exit code 2 and one 'error: ...' line."""
    with pytest.raises(SystemExit) as e:
        options.cli(lambda argv: fn())()
    assert e.value.code == 2
    err = capsys.readouterr().err
    err = err[err.rindex("error: "):]  # progress bars may precede it
    assert err.count("\n") == 1
    return err


# --- ROI groups ----------------------------------------------------------------------------

def test_roi_groups_are_the_authors():
    """The lists of the authors' cs_heatmap_avgs, typed out here: early, higher, anatomical and all."""
    early = ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"]
    higher = ["EBA", "FBA-1", "FBA-2", "mTL-bodies", "OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces", "OPA",
              "PPA", "RSC", "OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"]
    anatomical = ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"]
    assert utils.ROI_GROUPS == {"all": early + higher + anatomical, "early": early, "higher": higher,
                                "anatomical": anatomical}
    assert [utils.roi_group(r) for r in ("hV4", "early", "mTL-words", "parietal")] == [
        "early", "anatomical", "higher", "anatomical"]


# --- Split and folds -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [9841, 240, 7])
def test_train_test_split(n):
    train, test = utils.train_test_split(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    assert len(train) == int(0.85 * n) and len(test) == n - int(0.85 * n)
    assert np.array_equal(np.concatenate([train, test]), perm)
    assert not set(train) & set(test) and set(train) | set(test) == set(range(n))
    again = utils.train_test_split(n)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


def test_cv_folds():
    train, test = utils.train_test_split(1000)
    folds = utils.cv_folds(train)
    v = int(0.2 * len(train))
    assert len(folds) == 5
    vals = [val for _, val in folds]
    for k, (fit, val) in enumerate(folds):
        assert np.array_equal(val, train[k * v:(k + 1) * v])
        assert len(fit) == len(train) - v
        assert not set(fit) & set(val) and set(fit) | set(val) == set(train)
        assert not set(test) & (set(fit) | set(val))
    assert len(set(np.concatenate(vals))) == 5 * v
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, utils.cv_folds(train)))
    with pytest.raises(safe_io.UserError, match="folds"):
        utils.cv_folds(train[:3])


def test_split_and_folds_identical_across_processes():
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import utils; "
            "tr, te = utils.train_test_split(777); "
            "print(json.dumps([tr.tolist(), te.tolist(), [v.tolist() for _, v in utils.cv_folds(tr)]]))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    train, test = utils.train_test_split(777)
    assert json.loads(out.stdout) == [train.tolist(), test.tolist(), [v.tolist() for _, v in utils.cv_folds(train)]]


# --- Dataset and cache ---------------------------------------------------------------------

def test_subject_data_pairs_each_image_with_its_fmri_row(tmp_path, tiny):
    """Image k (sorted names) is a flat colour coding k, and fMRI row k holds k: they must meet."""
    root = copy_root(tiny, tmp_path, skip=("training_images", "training_fmri"))
    folder = utils.images_dir(root, 1)
    folder.mkdir(parents=True)
    n, width = 12, utils.n_vertices(root, 1, "lh")
    for k in reversed(range(1, n + 1)):  # written in reverse, so creation order is not row order
        Image.new("RGB", (20, 20), (20 * k, 255 - 20 * k, 7)).save(folder / f"train-{k:04d}_nsd-{100 * k + 3:05d}.png")
    fmri = np.repeat(np.arange(1, n + 1, dtype=np.float32)[:, None], width, 1)
    fmri[:, 1] = np.arange(n)[::-1]
    utils.fmri_path(root, 1, "lh").parent.mkdir(parents=True)
    np.save(utils.fmri_path(root, 1, "lh"), fmri)
    data = utils.SubjectData(root, 1, "left", voxels=[0, 1], image_size=8)
    assert len(data) == n and data.images.shape == (n, 8, 8, 3) and data.fmri.shape == (n, 2)
    for i in range(n):
        k = int(data.fmri[i, 0])
        assert k == i + 1 and data.fmri[i, 1] == n - 1 - i
        assert (data.images[i, ..., 0] == 20 * k).all() and (data.images[i, ..., 1] == 255 - 20 * k).all()
    assert np.array_equal(data.voxels, [0, 1])
    assert np.array_equal(data.train, utils.train_test_split(n)[0])


def test_cache_equals_torchvision_resize(synthetic_root, tmp_path):
    from torchvision import transforms
    paths = utils.list_images(synthetic_root, 1)[:20]
    for size in (40, 224):
        cache = utils.image_cache(paths, size, tmp_path)
        direct = np.stack([np.asarray(transforms.Resize((size, size))(Image.open(p).convert("RGB"))) for p in paths])
        assert cache.dtype == np.uint8 and np.array_equal(cache, direct)


def test_cache_is_reused_and_rebuilt_when_the_image_list_changes(synthetic_root, tmp_path):
    root = tmp_path
    shutil.copytree(utils.images_dir(synthetic_root, 1), utils.images_dir(root, 1))
    paths = utils.list_images(root, 1)
    first = utils.subject_images(root, 1, 16)
    files = list(utils.cache_dir(root).glob("*.npy"))
    assert len(files) == 1 and len(first) == 240
    mtime = files[0].stat().st_mtime_ns
    assert np.array_equal(utils.subject_images(root, 1, 16), first)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not rebuilt

    paths[-1].unlink()
    fewer = utils.subject_images(root, 1, 16)
    assert len(fewer) == 239 and np.array_equal(fewer, first[:239])
    Image.open(paths[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[0])
    os.utime(paths[0], ns=(mtime + 10 ** 9, mtime + 10 ** 9))
    changed = utils.subject_images(root, 1, 16)
    assert not np.array_equal(changed[0], first[0])
    assert np.array_equal(changed[0], utils.decode_image(paths[0], 16))
    assert len(list(utils.cache_dir(root).glob("*.npy"))) == 1  # the stale caches were removed


def test_a_full_disk_is_one_line_before_any_image_is_written(synthetic_root, tmp_path, monkeypatch):
    # Writing into the memory map of a sparse file on a full disk is a SIGBUS that kills the
    # process; the blocks are reserved first, so a full disk is an error naming the cache.
    import errno

    def full(fd, offset, length):
        assert os.fstat(fd).st_size == length == 240 * 16 * 16 * 3 + 128
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    decoded = []
    with pytest.raises(safe_io.UserError, match=r"cannot write the image cache .*images_s16_\w+\.npy "
                                              r"\(No space left on device\): it needs 0\.00 GiB free"):
        utils.image_cache(utils.list_images(synthetic_root, 1), 16, tmp_path,
                          decode=lambda p, s: decoded.append(p))
    assert decoded == [] and list(tmp_path.iterdir()) == []


# --- Options -------------------------------------------------------------------------------

OPTIONS_SCRIPT = '''"""A test script with every kind of option.

More text that is not the description.
"""
import sys

# --- Options ---
ROOT = "."  # project folder
SUBJ = 1  # subject number
LR = 1e-4  # learning rate
HEMISPHERE = "left"  # left or right
ROIS = [  # ROIs to run,
    "V1v",  # over several lines
    "V2v",
]
EPOCHS_LIST = [1, 2]  # integer list
SUBJECTS: list[int] = []  # subjects (empty: all)
OVERWRITE = False  # rewrite outputs
MAX_VOXELS: int | None = None  # cap on voxels
EPOCHS = 3  # passes (with a "#" in a string: "#")
# ---
NOT_AN_OPTION = 3
CHOICES = {"HEMISPHERE": ["left", "right"]}
RANGES = {"LR": options.POSITIVE, "EPOCHS": options.at_least(1)}
'''


def options_module(tmp_path, source=OPTIONS_SCRIPT):
    path = tmp_path / "script_with_options.py"
    path.write_text(source)
    module = types.ModuleType("script_with_options")
    module.__file__ = str(path)
    module.options = options
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def test_parse_options_defaults_and_types(tmp_path):
    module = options_module(tmp_path)
    opts = options.parse_options(module, [])
    assert vars(opts) == {"ROOT": ".", "SUBJ": 1, "LR": 1e-4, "HEMISPHERE": "left", "ROIS": ["V1v", "V2v"],
                          "EPOCHS_LIST": [1, 2], "SUBJECTS": [], "OVERWRITE": False, "MAX_VOXELS": None, "EPOCHS": 3}
    opts = options.parse_options(module, [
        "--root", "data", "--subj", "3", "--lr", "0.01", "--hemisphere", "right", "--rois", "V1v", "hV4", "EBA",
        "--epochs-list", "3,4", "--subjects", "2", "5", "--overwrite", "--max-voxels", "50", "--epochs", "7"])
    assert vars(opts) == {"ROOT": "data", "SUBJ": 3, "LR": 0.01, "HEMISPHERE": "right", "ROIS": ["V1v", "hV4", "EBA"],
                          "EPOCHS_LIST": [3, 4], "SUBJECTS": [2, 5], "OVERWRITE": True, "MAX_VOXELS": 50, "EPOCHS": 7}
    assert type(opts.SUBJ) is int and type(opts.LR) is float
    assert options.parse_options(module, ["--rois", "V1v,V3v", "--overwrite", "false"]).ROIS == ["V1v", "V3v"]
    assert options.parse_options(module, ["--overwrite", "false"]).OVERWRITE is False
    assert options.parse_options(module, ["--max-voxels", "none"]).MAX_VOXELS is None
    # The defaults are copies: a script that changes its opts leaves the module's constants alone.
    options.parse_options(module, []).ROIS.append("EBA")
    assert module.ROIS == ["V1v", "V2v"]


def test_parse_options_help_and_errors(tmp_path, capsys):
    module = options_module(tmp_path)
    with pytest.raises(SystemExit) as e:
        options.parse_options(module, ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "A test script with every kind of option." in out and "More text" not in out
    for flag, comment in [("--subj", "subject number"), ("--lr", "learning rate"), ("--overwrite", "rewrite outputs"),
                          ("--rois", "ROIs to run, over several lines"), ("--max-voxels", "cap on voxels"),
                          ("--epochs", 'passes (with a "#" in a string: "#")'), ("--root", "project folder")]:
        assert flag in out and comment in out
    assert "(default: left; allowed: one of left, right)" in out
    assert "(default: 0.0001; allowed: a number > 0)" in out and "(default: 3; allowed: an integer >= 1)" in out
    assert "--not-an-option" not in out
    for bad, line in [(["--subj", "x"], "--subj x: allowed an integer"),
                      (["--lr", "fast"], "--lr fast: allowed a number > 0"),
                      (["--lr", "nan"], "--lr nan: allowed a number > 0"),
                      (["--lr", "0"], "--lr 0: allowed a number > 0"),
                      (["--overwrite", "maybe"], "--overwrite maybe: allowed true or false"),
                      (["--subjects", "1", "two"], "--subjects two: allowed an integer"),
                      (["--max-voxels", "1.5"], "--max-voxels 1.5: allowed an integer or none"),
                      (["--hemisphere", "up"], "--hemisphere up: allowed one of left, right"),
                      (["--unknown", "1"], "unrecognized arguments: --unknown 1: see python script_with_options.py"),
                      (["--subj"], "argument --subj: expected one argument")]:
        assert user_error(lambda: options.parse_options(module, bad), capsys).startswith("error: " + line)


@pytest.mark.parametrize("statement", [
    "print('hello')", "if True:\n    X = 1", "lower = 1", "A, B = 1, 2", "A = B = 1", "SUBJ = 2  # twice",
    "X: int", "EMPTY = []  # no element type", "NOTHING = None  # no type", "X: dict = {}", "X = {1: 2}",
])
def test_options_block_holds_only_typed_assignments(tmp_path, statement):
    source = OPTIONS_SCRIPT.replace("# ---\nNOT_AN", statement + "\n# ---\nNOT_AN")
    with pytest.raises(RuntimeError, match=r"script_with_options.py:\d+: "):
        options.parse_options(options_module(tmp_path, source), [])


def test_options_block_declares_root(tmp_path):
    source = OPTIONS_SCRIPT.replace('ROOT = "."  # project folder\n', "")
    with pytest.raises(RuntimeError, match="declares no ROOT"):
        options.parse_options(options_module(tmp_path, source), [])


def test_choices_and_ranges_name_options(tmp_path):
    source = OPTIONS_SCRIPT.replace('"EPOCHS": options.at_least(1)', '"EPOCH": options.at_least(1)')
    with pytest.raises(RuntimeError, match="EPOCH, not options"):
        options.parse_options(options_module(tmp_path, source), [])


SCRIPTS = ["cl_model_training", "cl_model_training_all_rois", "reg_model_training", "reg_model_training_all_rois",
           "pooled_model_training", "pooled_model_training_all_rois", "fit_encoding_models", "fit_encoding_models_nod",
           "generate_results", "generate_voxel_roi_mappings", "launch", "synthetic_data", "demo"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_defaults_parse_and_pass_their_checks(name, tiny):
    module = importlib.import_module(name)
    names = [o.name for o in options._options_block(module)]
    opts = options.parse_options(module, ["--root", str(tiny)])
    assert "ROOT" in names and list(vars(opts)) == names
    assert all(getattr(opts, name) == getattr(module, name) for name in names if name != "ROOT")


def opts_reads(function):
    """The names X of the ``opts.X`` that ``function`` reads."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "opts"}


# The options that models.train_roi reads only for the other methods: those a single-ROI script leaves out.
OTHER_METHODS_OPTIONS = {"cl_model_training": {"SUBJECTS", "H_CONST"},
                         "reg_model_training": {"SUBJECTS", "H_CONST", "TEMPERATURE"},
                         "pooled_model_training": {"SUBJ"}}


@pytest.mark.parametrize("twin", [name for name in SCRIPTS if name.endswith("_all_rois")])
def test_all_rois_twin_defines_every_option_its_train_reads(twin):
    """A script's train is one call of models.train_roi: both scripts of a method define what that call reads."""
    import models
    single = importlib.import_module(twin.replace("_all_rois", ""))
    defined = {o.name for o in options._options_block(single)}
    by_models = opts_reads(models.train_roi) | opts_reads(models.plan_roi)
    assert by_models - defined == OTHER_METHODS_OPTIONS[single.__name__]
    read = opts_reads(single.train) | by_models - OTHER_METHODS_OPTIONS[single.__name__]
    assert len(read) > 10
    assert read <= defined
    assert read <= {o.name for o in options._options_block(importlib.import_module(twin))}


def test_smallest_alexnet_input():
    """MIN_IMAGE_SIZE is the smallest side for which every one of LAYERS has an output."""
    dims = utils.layer_dims(utils.MIN_IMAGE_SIZE)
    assert set(dims) == set(utils.LAYERS) and dims["features.12"] == 256
    with pytest.raises(RuntimeError, match="too small"):
        utils.layer_dims(utils.MIN_IMAGE_SIZE - 1)


# --- AlexNet -------------------------------------------------------------------------------

def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_features_are_fp32_by_default_and_bf16_on_request():
    alexnet = utils.load_alexnet("none", seed=0)
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    layers = ["features.5", "classifier.5"]
    rows = np.array([4, 0, 2])
    with torch.no_grad():
        direct = alexnet.features(utils.normalize_images(images[rows]))
        fc7 = alexnet.classifier[:6](torch.flatten(alexnet.avgpool(direct), 1))
    fp32 = utils.extract_features(alexnet, images, batch_size=2, layers=layers, indices=rows)
    # No autocast: the same numbers as a plain float32 forward pass, rows in the order asked for.
    np.testing.assert_allclose(fp32["classifier.5"], fc7.numpy(), rtol=1e-5, atol=1e-6)
    bf16 = utils.extract_features(alexnet, images, batch_size=2, layers=layers, indices=rows, precision="bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = alexnet.features[:6](utils.normalize_images(images[rows])).float().flatten(1)
    np.testing.assert_array_equal(bf16["features.5"], ref.numpy())
    # bf16 keeps 8 significant bits: close to fp32, but not equal.
    err = np.abs(bf16["features.5"] - fp32["features.5"]).max() / np.abs(fp32["features.5"]).max()
    assert 0 < err < 0.05
    with pytest.raises(safe_io.UserError, match="unknown precision 'fp16'"):
        utils.extract_features(alexnet, images, layers=layers, precision="fp16")


def test_nsd_ids_from_file_names():
    np.testing.assert_array_equal(utils.nsd_ids(["a/train-0001_nsd-00013.png", "train-0002_nsd-72999.png"]),
                                  [13, 72999])
    with pytest.raises(safe_io.UserError, match="img_7.png has no NSD id"):
        utils.nsd_ids(["img_7.png"])


def test_load_alexnet_none_is_seeded():
    a, b, c = utils.load_alexnet("none", seed=0), utils.load_alexnet("none", seed=0), utils.load_alexnet("none", seed=1)
    assert same_weights(a, b) and not same_weights(a, c)
    assert not a.training


def test_load_alexnet_from_a_path_and_from_the_imagenet_cache(tmp_path):
    reference = utils.load_alexnet("none", seed=5)
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    assert same_weights(utils.load_alexnet(str(path)), reference)

    cached = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert utils.imagenet_weights_path() == cached
    with pytest.raises(safe_io.UserError) as e:
        utils.load_alexnet("imagenet")
    assert str(cached) in str(e.value) and utils.IMAGENET_WEIGHTS_URL in str(e.value)
    cached.parent.mkdir(parents=True)
    shutil.copy(path, cached)
    assert same_weights(utils.load_alexnet("imagenet"), reference)


def test_load_alexnet_bad_files(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert str(missing) in user_error(lambda: utils.load_alexnet(str(missing)), capsys)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    err = user_error(lambda: utils.load_alexnet(str(corrupt)), capsys)
    assert str(corrupt) in err and "corrupt" in err
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    assert "not an AlexNet state dict" in user_error(lambda: utils.load_alexnet(str(wrong)), capsys)


# --- Bad input -----------------------------------------------------------------------------

def test_missing_root_and_subfolders(tmp_path, tiny, capsys):
    err = user_error(lambda: utils.SubjectData(tmp_path / "nowhere", 1, "left"), capsys)
    assert str(utils.images_dir(tmp_path / "nowhere", 1)) in err and "README" in err
    for missing, path in [("training_fmri", utils.fmri_path(tmp_path / "a", 1, "lh")),
                          ("roi_masks", utils.fsaverage_mask_path(tmp_path / "a", 1, "lh"))]:
        root = copy_root(tiny, tmp_path / "a", skip=(missing,))
        assert str(path) in user_error(lambda: utils.SubjectData(root, 1, "left", image_size=8), capsys)
        assert not utils.cache_dir(root).exists()
        shutil.rmtree(root)


@pytest.mark.parametrize("change, message", [
    (lambda f: f[:-1], "11 rows but there are 12 images"),
    (lambda f: f[:, 0], "expected 2-D"),
    (lambda f: np.concatenate([f, f[:, :1]], 1), "columns"),
])
def test_bad_fmri(tmp_path, tiny, capsys, change, message):
    root = copy_root(tiny, tmp_path)
    path = utils.fmri_path(root, 1, "rh")
    np.save(path, change(np.load(path)))
    err = user_error(lambda: utils.SubjectData(root, 1, "right", image_size=8), capsys)
    assert str(path) in err and message in err
    assert not utils.cache_dir(root).exists()


def test_unknown_roi_and_hemisphere(tiny, capsys):
    err = user_error(lambda: utils.roi_voxel_indices(tiny, 1, "lh", "V9"), capsys)
    assert "'V9'" in err and all(roi in err for roi in utils.ROIS)
    err = user_error(lambda: utils.load_fmri(tiny, 1, "up"), capsys)
    assert "'up'" in err and "left" in err and "right" in err
    assert utils.hemi_code("Left") == "lh" and utils.hemi_code("rh") == "rh"


def test_unreadable_image(tmp_path, tiny, capsys):
    root = copy_root(tiny, tmp_path)
    bad = utils.list_images(root, 1)[4]
    bad.write_bytes(b"\x89PNG broken")
    err = user_error(lambda: utils.subject_images(root, 1, 8), capsys)
    assert str(bad) in err
    assert not list(utils.cache_dir(root).iterdir())  # no cache, no temporary file


def test_missing_mapping_file(tmp_path, tiny, capsys):
    root = copy_root(tiny, tmp_path)
    path = utils.roi_mapping_path(root, 1, "floc-places")
    path.unlink()
    assert str(path) in user_error(lambda: utils.roi_voxel_indices(root, 1, "lh", "PPA"), capsys)


def test_method_epochs_reads_each_methods_option_and_refuses_unknown_methods():
    opts = types.SimpleNamespace(CL_EPOCHS=3, REG_EPOCHS=7, POOLED_EPOCHS=11)
    assert [utils.method_epochs(opts, m) for m in utils.METHODS] == [0, 3, 7, 11, 11]
    with pytest.raises(ValueError, match="unknown method 'pooled'"):
        utils.method_epochs(opts, "pooled")


def test_lazy_import_imports_on_first_use_and_stays_out_of_sys_modules_until_then(tmp_path, monkeypatch):
    # Modules that walk sys.modules (warnings, inspect) must never meet a half-imported helper.
    (tmp_path / "lazy_probe_module.py").write_text("import json\nVALUE = 3\nLATE = json.dumps([1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = options.lazy_import("lazy_probe_module")
    assert "lazy_probe_module" not in sys.modules
    [getattr(m, "__file__", None) for m in list(sys.modules.values())]
    assert "lazy_probe_module" not in sys.modules
    assert lazy.VALUE == 3 and sys.modules["lazy_probe_module"].LATE == "[1]"
    lazy.VALUE = 4
    assert sys.modules["lazy_probe_module"].VALUE == 4
    assert options.lazy_import("lazy_probe_module") is sys.modules["lazy_probe_module"]
    monkeypatch.delitem(sys.modules, "lazy_probe_module")
