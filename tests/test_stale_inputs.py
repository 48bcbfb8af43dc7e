"""A checkpoint or result made with other settings, or for another use, is refused: exit code 2, one line,
nothing written. Checkpoints here are untrained, with the meta training writes."""

import os
import shutil

import numpy as np
import pytest

import cl_model_training
import encoding_results
import fit_encoding_models as fem
import generate_results
import models
import pooled_model_training
import reg_model_training
import options
import utils
from conftest import link_inputs, refused, save_untrained_checkpoint

TRAIN = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "64", "--epochs", "1"]
FIT = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "128", "--cl-epochs", "1",
       "--reg-epochs", "1", "--pooled-epochs", "1"]
RESULTS = ["--subjects", "1", "--hemispheres", "left", "--epochs", "1", "--weights", "none", "--device", "cpu",
           "--image-size", "64"]


# --- An existing checkpoint made with other settings -------------------------------

@pytest.mark.parametrize("main, argv, message", [
    (cl_model_training.main, ["--image-size", "72"], "image_size=64, but this run asks for image_size=72"),
    (cl_model_training.main, ["--lr", "0.001"], "lr=0.0001, but this run asks for lr=0.001"),
    (cl_model_training.main, ["--weights", "imagenet"], "weights='none', but this run asks for weights='imagenet'"),
    (cl_model_training.main, ["--seed", "3"], "seed=0, but this run asks for seed=3"),
    (cl_model_training.main, ["--max-voxels", "30"], "but this run asks for n_voxels=30"),
    (cl_model_training.main, ["--precision", "bf16"], "precision='fp32', but this run asks for precision='bf16'"),
    (reg_model_training.main, ["--batch-size", "32"], "lr=0.0001, but this run asks for lr=2.5e-05"),
    (pooled_model_training.main, ["--h-method", "avg", "--subjects", "1"],
     "subjects=[1, 2], but this run asks for subjects=[1]"),
])
def test_checkpoint_with_other_settings_is_not_reused(root, capsys, main, argv, message):
    method = {cl_model_training.main: "cl-tuned", reg_model_training.main: "reg-tuned",
              pooled_model_training.main: "pooled-avg"}[main]
    save_untrained_checkpoint(root, method, 1, "lh", "V1v", subjects=[1, 2] if method == "pooled-avg" else None)
    err = refused(main, ["--root", str(root), "--roi", "V1v"] + TRAIN + argv, root, capsys)
    path = utils.method_checkpoint_path(root, method, 1, "lh", "V1v", 1)
    assert err.startswith(f"error: {path} was made with ") and message in err and "--overwrite" in err


def test_checkpoint_of_another_format_version_is_not_reused(root, capsys, monkeypatch):
    save_untrained_checkpoint(root, "cl-tuned", 1, "lh", "V1v")
    monkeypatch.setattr(utils, "FORMAT_VERSION", utils.FORMAT_VERSION + 1)
    err = refused(cl_model_training.main, ["--root", str(root), "--roi", "V1v"] + TRAIN, root, capsys)
    assert f"format_version={utils.FORMAT_VERSION - 1}, but this run asks for format_version={utils.FORMAT_VERSION}" in err


def test_checkpoints_record_the_whole_config(root):
    argv = ["--root", str(root), "--subj", "2", "--hemisphere", "right", "--roi", "EBA"] + TRAIN + ["--lr", "0.001"]
    path = reg_model_training.main(argv)
    meta = models.read_meta(path)
    assert meta["config"] == options.run_config(options.parse_options(reg_model_training, argv))
    assert meta["config"]["LR"] == 0.001 and meta["config"]["ROOT"] == str(root) and meta["config"]["SUBJ"] == 2
    # The recorded method, sizes, weights and seed rebuild the trained architecture.
    model, _ = models.load_checkpoint(path)
    n_voxels = utils.roi_voxel_count(root, 2, "rh", "EBA")
    assert (meta["method"], meta["n_voxels"], meta["weights"], meta["seed"]) == ("reg-tuned", n_voxels, "none", 0)
    assert type(models.build_model(meta)) is models.RegressionModel
    assert model.readout.out_features == meta["n_voxels"] == len(meta["voxels"])


# --- An existing encoding result made with other settings --------------------------

@pytest.fixture(scope="module")
def fitted(synthetic_root, shared_cache, tmp_path_factory):
    """An untuned V1v result of Subj1 lh made by the script."""
    root = link_inputs(tmp_path_factory.mktemp("fitted"), synthetic_root, shared_cache)
    argv = ["--root", str(root), "--rois", "V1v"] + FIT
    fem.main(argv)
    return root, argv


@pytest.mark.parametrize("extra, message", [
    (["--alphas", "1", "10"], "alpha_grid=[9 values: 0.1, 1.0, 10.0, ...], but this run asks for alpha_grid=[1.0, 10.0]"),
    (["--n-folds", "3"], "n_folds=5, but this run asks for n_folds=3"),
    (["--image-size", "72"], "image_size=64, but this run asks for image_size=72"),
    (["--seed", "1"], "seed=0, but this run asks for seed=1"),
    (["--feature-precision", "bf16"], "feature_precision='fp32', but this run asks for feature_precision='bf16'"),
    (["--engine-precision", "mixed"], "engine_precision='fp64', but this run asks for engine_precision='mixed'"),
])
def test_result_with_other_settings_is_not_reused(fitted, capsys, extra, message):
    root, argv = fitted
    err = refused(fem.main, argv + extra, root, capsys)
    path = encoding_results.result_path(root, 1, "untuned", "lh", "V1v")
    assert err.startswith(f"error: {path} was made with ") and message in err and "--overwrite" in err


def test_results_record_the_whole_config(fitted, capsys):
    root, argv = fitted
    r = encoding_results.load_result(encoding_results.result_path(root, 1, "untuned", "lh", "V1v"))
    assert r["config"] == options.run_config(options.parse_options(fem, argv))
    assert r["config"]["ROIS"] == ["V1v"] and r["config"]["IMAGE_SIZE"] == 64
    # Equal settings: skipped as before.
    assert fem.main(argv) == {"V1v": None} and "skip V1v" in capsys.readouterr().out


# --- A checkpoint is checked against what it is used for ---------------------------

def copy_checkpoint(root, method, subj, hemi, roi, to_method, to_hemi, to_roi):
    """Save a checkpoint of (method, subj, hemi, roi) and copy it to the file name of (to_method, to_hemi, to_roi)."""
    save_untrained_checkpoint(root, method, subj, hemi, roi)
    src = utils.method_checkpoint_path(root, method, subj, hemi, roi, 1)
    dst = utils.method_checkpoint_path(root, to_method, subj, to_hemi, to_roi, 1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


MISUSED = [
    (("cl-tuned", "lh", "EBA"), "roi='EBA', but this run asks for roi='V1v'"),
    (("cl-tuned", "rh", "V1v"), "hemisphere='rh', but this run asks for hemisphere='lh'"),
    (("reg-tuned", "lh", "V1v"), "method='reg-tuned', but this run asks for method='cl-tuned'"),
]


@pytest.mark.parametrize("source, message", MISUSED)
def test_encoding_refuses_a_checkpoint_made_for_something_else(root, capsys, source, message):
    path = copy_checkpoint(root, source[0], 1, source[1], source[2], "cl-tuned", "lh", "V1v")
    err = refused(fem.main, ["--root", str(root), "--method", "cl-tuned", "--rois", "V1v"] + FIT, root, capsys)
    assert err.startswith(f"error: checkpoint {path} was made with ") and message in err


@pytest.mark.parametrize("source, message", MISUSED)
def test_mi_bound_refuses_a_checkpoint_made_for_something_else(root, capsys, source, message):
    # Before: exit 0 with rh voxel indices applied to lh fMRI, or KeyError 'h' for a regression checkpoint.
    path = copy_checkpoint(root, source[0], 1, source[1], source[2], "cl-tuned", "lh", "V1v")
    err = refused(generate_results.main, ["--root", str(root), "--type", "lower-bound-mi", "--rois", "V1v"] + RESULTS,
                  root, capsys)
    assert err.startswith(f"error: checkpoint {path} was made with ") and message in err


@pytest.mark.parametrize("argv", [["--type", "classification-task"], ["--type", "save-embeddings"]])
def test_other_tasks_refuse_a_checkpoint_made_for_another_roi(root, capsys, argv):
    copy_checkpoint(root, "cl-tuned", 1, "lh", "EBA", "cl-tuned", "lh", "V1v")
    err = refused(generate_results.main, ["--root", str(root), "--rois", "V1v"] + argv + RESULTS, root, capsys)
    assert "roi='EBA', but this run asks for roi='V1v'" in err


@pytest.mark.parametrize("main, argv", [
    (fem.main, ["--method", "cl-tuned", "--rois", "V1v"] + FIT),
    (generate_results.main, ["--type", "save-embeddings", "--rois", "V1v"] + RESULTS),
])
def test_checkpoint_trained_at_another_image_size_is_refused(root, capsys, main, argv):
    save_untrained_checkpoint(root, "cl-tuned", 1, "lh", "V1v", image_size=64)
    err = refused(main, ["--root", str(root)] + argv + ["--image-size", "72"], root, capsys)
    assert "image_size=64, but this run asks for image_size=72" in err


def test_checkpoint_of_another_voxel_set_is_refused(synthetic_root, shared_cache, tmp_path, capsys):
    for name in ("training_images", "training_fmri"):
        os.symlink(synthetic_root / name, tmp_path / name)
    os.symlink(shared_cache, tmp_path / "cache")
    shutil.copytree(synthetic_root / "roi_masks", tmp_path / "roi_masks")
    save_untrained_checkpoint(tmp_path, "cl-tuned", 1, "lh", "V1v")
    path = utils.cl_model_path(tmp_path, 1, "lh", "V1v", 1)
    # The masks change after training: V1v loses its first vertex.
    mask_path = utils.roi_mask_path(tmp_path, 1, "lh", "prf-visualrois")
    mask = np.load(mask_path)
    mask[utils.roi_voxel_indices(tmp_path, 1, "lh", "V1v")[0]] = 0
    np.save(mask_path, mask)
    err = refused(fem.main, ["--root", str(tmp_path), "--method", "cl-tuned", "--rois", "V1v"] + FIT, tmp_path, capsys)
    assert err.startswith(f"error: checkpoint {path} was made with voxels=") and "masks under --root changed" in err
