"""Bad input, second catalogue: each row is one line naming the file or value, exit code 2, no traceback.

Sections: inputs that gave a silently wrong saved result; inputs found only after the first
write (the project folder must be left as it was); inputs that gave a traceback. The
options (--seed, --device, --image-size, long path parts) are in test_options.py.
"""

import os
import re
import shutil
import struct
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cl_model_training
import encoding
import encoding_results
import fit_encoding_models as fem
import fit_encoding_models_nod as fem_nod
import generate_results
import models
import nod_utils as nu
import results_utils as ru
import safe_io
import utils
from conftest import link_inputs, refused, run_error, save_untrained_checkpoint
from test_bad_data import dead_pid

FIT = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "128", "--n-folds", "2",
       "--alphas", "1", "100", "--n-components", "10", "--cl-epochs", "1"]
TRAIN = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "64", "--epochs", "1",
         "--max-voxels", "30"]


@pytest.fixture
def project(synthetic_root, shared_cache, tmp_path):
    """A project folder with its own Subj1 images (to spoil); the other inputs and the image cache are shared."""
    root = link_inputs(tmp_path / "project", synthetic_root, shared_cache, ("training_fmri", "roi_masks"))
    shutil.copytree(utils.images_dir(synthetic_root, 1), utils.images_dir(root, 1))
    return root


def bomb_png(path, side=20000):
    """A PNG header announcing side x side pixels (more than PIL's limit): a decompression bomb, 57 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


# --- Inputs that gave a silently wrong saved result ---------------------------------------

@pytest.mark.parametrize("spoil, first_bad", [
    ("gap", "train-0006_"), ("out of order", "train-0011_"), ("case", "TRAIN-0005_"), ("nsd id", "train-0005_")])
def test_image_numbers_must_be_1_to_n_in_row_order(project, capsys, spoil, first_bad):
    # Each once shifted every later fMRI row onto the wrong image: mean test r 0.224 fell to -0.063, saved.
    paths = utils.list_images(project, 1)
    if spoil == "gap":
        paths[4].unlink()
    elif spoil == "out of order":  # an unpadded number sorts after train-0240
        paths[9].rename(paths[9].with_name(paths[9].name.replace("train-0010", "train-10")))
    elif spoil == "case":
        paths[4].rename(paths[4].with_name(paths[4].name.replace("train", "TRAIN").replace(".png", ".PNG")))
    else:  # the NSD id must parse too
        paths[4].rename(paths[4].with_name(paths[4].name.replace("_nsd-", "_nsd-x")))
    err = refused(fem.main, ["--root", str(project), "--rois", "V1v"] + FIT, project, capsys)
    bad = next(p for p in utils.images_dir(project, 1).iterdir() if p.name.startswith(first_bad))
    assert err.startswith(f"error: image {bad} ")


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    # PIL's convert('RGB') clips 16-bit grey: the image was solid white.
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    decoded = utils.decode_image(tmp_path / "i16.png", 64)
    expected = np.round(grey / 257).astype(np.uint8)
    assert np.abs(decoded.astype(int) - expected[..., None]).max() <= 1
    assert decoded.min() == 0 and decoded.max() == 255
    # 32-bit integer or float pixels have no known range: refused, not guessed.
    for mode, array in (("I", grey.astype(np.int32) * 1000), ("F", grey.astype(np.float32) / 65535)):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(array).save(path, format="TIFF")
        assert Image.open(path).mode == mode
        with pytest.raises(safe_io.UserError, match=f"image {path} has 32-bit pixels \\(PIL mode {mode}\\)"):
            utils.decode_image(path, 64)


@pytest.fixture(scope="module")
def tuned_root(synthetic_root, shared_cache, tmp_path_factory):
    """A project folder with a V1v cl-tuned checkpoint (the V2v one is each test's own)."""
    root = link_inputs(tmp_path_factory.mktemp("tuned"), synthetic_root, shared_cache)
    save_untrained_checkpoint(root, "cl-tuned", 1, "lh", "V1v")
    return root


def overwrite_in_largest_tensor(path, n_bytes=65536):
    """Overwrite ``n_bytes`` in the middle of the largest tensor of a torch file with finite floats (bit rot)."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        f.write(np.full(n_bytes // 4, 0.01, np.float32).tobytes())


@pytest.mark.parametrize("damage", ["bit rot", "wrong shape", "no checksum"])
def test_a_damaged_later_checkpoint_stops_the_run_before_any_result(tuned_root, capsys, damage):
    # Bit rot was used silently (test r 0.222 -> 0.195, saved); a wrong shape stopped the run only
    # after the V1v result was written.
    path = utils.cl_model_path(tuned_root, 1, "lh", "V2v", 1)
    _, meta = save_untrained_checkpoint(tuned_root, "cl-tuned", 1, "lh", "V2v")
    if damage == "bit rot":
        overwrite_in_largest_tensor(path)
        message = f"{path} is damaged: its tensors differ from the checksum recorded when it was saved"
    elif damage == "wrong shape":
        models.save_checkpoint(models.build_model(dict(meta, n_voxels=meta["n_voxels"] + 1)), meta, path)
        message = (f"{path} holds fmri_map.weight of shape ({meta['h']}, {meta['n_voxels'] + 1}), but the model "
                   f"needs ({meta['h']}, {meta['n_voxels']})")
    else:  # made before checksums were recorded
        ckpt = torch.load(path, weights_only=True)
        del ckpt["meta"]["checksum"]
        torch.save(ckpt, path)
        message = f"{path} records no checksum of its tensors"
    err = refused(fem.main, ["--root", str(tuned_root), "--method", "cl-tuned", "--rois", "V1v", "V2v"] + FIT,
                  tuned_root, capsys)
    assert message in err and "re-train" in err


def test_weights_that_are_not_floats_are_refused(project, tmp_path, capsys):
    # An int32 state dict was cast to float silently and gave r = 0 "results".
    state = {k: torch.zeros(v.shape, dtype=torch.int32) for k, v in utils.load_alexnet("none").state_dict().items()}
    weights = tmp_path / "int.pth"
    torch.save(state, weights)
    argv = ["--root", str(project), "--rois", "V1v", "mTL-faces"] + FIT + ["--weights", str(weights)]
    err = refused(fem.main, argv, project, capsys)
    assert f"{weights} holds features.0.weight as int32 values: weights must be floating point" in err


class Killed(BaseException):
    """Stands for a SIGKILL: nothing of the run's own clean-up catches it."""


def test_a_result_torn_between_its_two_files_is_fitted_again(root, monkeypatch, capsys):
    # Killed between the .npz and the .json of an --overwrite refit, the old .json marked the new .npz
    # complete, under the old settings.
    argv = ["--root", str(root), "--rois", "V1v"] + FIT
    fem.main(argv)
    path = encoding_results.result_path(root, 1, "untuned", "lh", "V1v")
    write_json = safe_io.atomic_json_dump

    def killed_before_the_json(obj, target):
        if str(target).endswith("lh_V1v.json"):
            raise Killed
        write_json(obj, target)

    monkeypatch.setattr(safe_io, "atomic_json_dump", killed_before_the_json)
    other = list(argv)
    other[other.index("--alphas") + 1:other.index("--alphas") + 3] = ["10", "1000"]
    with pytest.raises(Killed):
        fem.main(other + ["--overwrite"])
    monkeypatch.undo()
    assert path.is_file() and not encoding_results.result_complete(path)
    capsys.readouterr()
    fem.main(argv)
    assert "skip V1v" not in capsys.readouterr().out
    result = encoding_results.load_result(path)
    assert result["alpha_grid"] == [1.0, 100.0] and set(result["alphas"]) <= {1.0, 100.0}


@pytest.mark.parametrize("spoil, message", [
    ("voxels", "was fitted on other voxels ({n}) than the masks under {root} give for Subj1 lh V1v ({n})"),
    ("nan", "holds NaN, Inf or non-numbers in test_r"),
    ("shape", "holds cv_r of shape ({m},), not one value for each of its voxels"),
    ("layer", "names the layer 'fc7', not one of AlexNet's features.2"),
])
def test_a_result_that_is_not_whole_or_not_of_these_masks_is_refused(root, capsys, spoil, message):
    # Was drawn in the paper figures and summaries (indices on the wrong vertices), or a NaN in group_summary.csv.
    voxels = utils.roi_voxel_indices(root, 1, "lh", "V1v")
    n = len(voxels)
    result = {"voxels": voxels, "alphas": np.ones(n), "alpha_index": np.zeros(n, int), "cv_r": np.full(n, 0.1),
              "test_r": np.full(n, 0.1), "method": "untuned", "subject": 1, "hemisphere": "lh", "roi": "V1v",
              "model_subj": None, "protocol": "per-method", "best_layer": "features.2",
              "layer_scores": {layer: 0.1 for layer in utils.LAYERS}}
    if spoil == "voxels":  # another ROI set's indices
        result["voxels"] = voxels + 1
    elif spoil == "nan":
        result["test_r"][3] = np.nan
    elif spoil == "shape":
        result["cv_r"] = result["cv_r"][1:]
    else:
        result["best_layer"] = "fc7"
    path = encoding_results.result_path(root, 1, "untuned", "lh", "V1v")
    encoding_results.save_result(result, path)
    err = refused(generate_results.main, ["--root", str(root), "--type", "summaries", "--subjects", "1"], root, capsys)
    assert err.startswith(f"error: the result {path} ") and message.format(n=n, m=n - 1, root=root) in err


def test_nod_beta_cache_follows_its_inputs_and_overwrite_rebuilds_it(tiny_nods):
    # The cache was keyed by (zscore, sessions, runs) only: changed betas were ignored, even with --overwrite.
    nod = tiny_nods / "nod"
    first = np.array(nu.load_betas(nod, 1, [1], [1, 2]))
    path = nu.beta_path(nod, 1, 1, 2)
    data, n_left, names = nu.read_cortex_dscalar(path)
    data[:, :100] = np.random.default_rng(5).standard_normal((len(data), 100))
    nu.write_cortex_dscalar(data, n_left, path, map_names=names)
    changed = np.array(nu.load_betas(nod, 1, [1], [1, 2]))
    np.testing.assert_array_equal(changed[:10], first[:10])
    np.testing.assert_allclose(changed[10:], nu.zscore_runs(data, [len(data)]), rtol=1e-6)
    assert len(list(nu.support_dir(nod).glob("sub-01_imagenet-beta_zscore-run_*.npy"))) == 1  # the stale one is gone
    # A change that keeps the file's size and mtime is seen with --overwrite.
    stat = path.stat()
    nu.write_cortex_dscalar(data * 2 + 1, n_left, path, map_names=names)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    cache = nu.beta_cache_path(nod, 1, [1], [1, 2])
    mtime = cache.stat().st_mtime_ns
    nu.load_betas(nod, 1, [1], [1, 2])
    assert cache.stat().st_mtime_ns == mtime
    nu.load_betas(nod, 1, [1], [1, 2], overwrite=True)
    assert cache.stat().st_mtime_ns != mtime


def test_two_trainings_of_one_roi_never_replace_each_other(root, capsys, monkeypatch):
    # Started together with other settings, both printed 'saved' and the file held only the second.
    argv = ["--root", str(root), "--roi", "V1v"] + TRAIN
    path = utils.cl_model_path(root, 1, "lh", "V1v", 1)
    lock = models.lock_path(path)
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{safe_io._host()} {os.getpid()}\n")  # a live run holds it
    err = refused(cl_model_training.main, argv, root, capsys)
    assert f"training of {path.name} is in progress in process {os.getpid()}" in err and str(lock) in err
    # Another run finished this ROI with other settings while this one read its data: refused, kept.
    lock.unlink()
    real = utils.SubjectData

    def other_run_finishes(*args, **kwargs):
        save_untrained_checkpoint(root, "cl-tuned", 1, "lh", "V1v", seed=7)
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "SubjectData", other_run_finishes)
    err = run_error(cl_model_training.main, argv, capsys)
    assert f"{path} was made with seed=7, but this run asks for seed=0" in err
    assert models.read_meta(path)["seed"] == 7 and not lock.exists()
    monkeypatch.undo()
    # A lock left by a killed run of this host is taken over.
    path.unlink()
    lock.write_text(f"{safe_io._host()} {dead_pid()}\n")
    assert cl_model_training.main(argv) == path and not lock.exists()


# --- Inputs found only after the first write ------------------------------------------------

@pytest.mark.parametrize("spoil", ["weights", "bomb image", "dangling link", "absent_rois.json",
                                   "group summary of another subject"])
def test_fit_checks_every_input_before_the_first_write(synthetic_root, tmp_path, capsys, spoil):
    # absent_rois.json (mTL-faces is empty in lh of Subj1) and the image cache were written first.
    root = tmp_path / "project"
    shutil.copytree(utils.images_dir(synthetic_root, 1), utils.images_dir(root, 1))
    for name in ("training_fmri", "roi_masks"):
        os.symlink(synthetic_root / name, root / name)
    argv = ["--root", str(root), "--rois", "V1v", "mTL-faces"] + FIT
    images = utils.images_dir(root, 1)
    if spoil == "weights":
        bad = tmp_path / "weights.pth"
        bad.write_bytes(b"not a state dict")
        argv += ["--weights", str(bad)]
        message = f"cannot load AlexNet weights file {bad}"
    elif spoil == "bomb image":
        bad = next(images.glob("train-0007_*"))
        bomb_png(bad)
        message = f"refusing image {bad}: Image size (400000000 pixels) exceeds limit"
    elif spoil == "dangling link":
        bad = next(images.glob("train-0007_*"))
        bad.unlink()
        bad.symlink_to(tmp_path / "gone.png")
        message = f"cannot read image {bad} ([Errno 2] No such file or directory"
    elif spoil == "absent_rois.json":
        bad = encoding_results.absent_path(root, 1)
        bad.parent.mkdir(parents=True)
        bad.write_text("")
        message = f"cannot read {bad} as JSON (Expecting value: line 1 column 1 (char 0)): the file is empty or corrupt"
    else:
        bad = utils.encoding_dir(root, 2) / "group_summary.csv"
        bad.parent.mkdir(parents=True)
        pd.DataFrame({"subject": [1], "group": ["all"], "score": ["test_r"]}).to_csv(bad, index=False)
        message = f"{bad} holds summaries of subject 1, not of Subj2"
    err = refused(fem.main, argv, root, capsys)
    assert message in err
    assert not (root / "cache").exists()


@pytest.fixture
def tiny_nods(tiny_nod, tmp_path):
    """A copy of the tiny NOD tree, to spoil."""
    root = tmp_path / "root"
    shutil.copytree(tiny_nod / "nod", root / "nod")
    return root


NOD = ["--sessions", "1", "--runs", "1", "2", "--rois", "V1", "--hemispheres", "lh", "--methods", "untuned",
       "--weights", "none", "--image-size", "64", "--n-folds", "2", "--n-components", "5", "--device", "cpu"]


@pytest.mark.parametrize("spoil", ["inf beta", "extra events row", "missing run", "weights", "stimulus outside",
                                   "corrupt events"])
def test_nod_checks_every_subject_before_the_first_write(tiny_nods, tmp_path, capsys, spoil):
    # Label CSVs, beta and image caches and sub-01's results were written before sub-02's fault was found.
    nod = tiny_nods / "nod"
    argv = ["--root", str(tiny_nods), "--subjects", "1", "2"] + NOD
    events = nu.events_path(nod, 2, 1, 2)
    if spoil == "inf beta":
        path = nu.beta_path(nod, 2, 1, 2)
        data, n_left, names = nu.read_cortex_dscalar(path)
        data[3, 7] = np.inf
        nu.write_cortex_dscalar(data, n_left, path, map_names=names)
        message = f"{path} has a non-finite beta (inf) in map 3, cortical column 7"
    elif spoil == "extra events row":
        table = pd.read_csv(events, sep="\t")
        pd.concat([table, table.tail(1)]).to_csv(events, sep="\t", index=False)
        message = f"{nu.beta_path(nod, 2, 1, 2)} has 10 beta maps but {events} lists 11 trials"
    elif spoil == "missing run":
        nu.beta_path(nod, 2, 1, 2).unlink()
        message = f"missing NOD file {nu.beta_path(nod, 2, 1, 2)}"
    elif spoil == "weights":
        bad = tmp_path / "w.pth"
        torch.save({"features.0.weight": torch.zeros(3)}, bad)
        argv += ["--weights", str(bad)]
        message = f"{bad} lacks features.0.bias"
    elif spoil == "stimulus outside":
        table = pd.read_csv(events, sep="\t")
        table.loc[4, "stim_file"] = "imagenet/../../../secret.JPEG"
        table.to_csv(events, sep="\t", index=False)
        message = f"row 4 of {events} names the stimulus 'imagenet/../../../secret.JPEG', outside {nod / 'stimuli'}"
    else:
        events.write_bytes(b"\x00\xff\xfe garbage")
        message = f"cannot read {events} as a table"
    err = refused(fem_nod.main, argv, tiny_nods, capsys)
    assert message in err
    assert not (tiny_nods / "cache").exists()


def test_the_image_cache_checks_free_space_before_reserving_it(synthetic_root, tmp_path, monkeypatch):
    # --image-size 100000 asked posix_fallocate for 6 TB: the disk filled, and the error line could not be written.
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    monkeypatch.setattr(os, "posix_fallocate", lambda *args: pytest.fail("reserved the space"))
    with pytest.raises(safe_io.UserError, match=r"cannot write the image cache .*Subj1_s64_\w+\.npy: it needs "
                                              r"0\.00 GiB but 0\.00 GiB are free there; free disk space or lower "
                                              "--image-size"):
        utils.image_cache(utils.list_images(synthetic_root, 1), 64, tmp_path, name="Subj1")


# --- Inputs that gave a traceback -------------------------------------------------------------

def test_a_truncated_image_cache_is_rebuilt(synthetic_root, tmp_path, capsys):
    paths = utils.list_images(synthetic_root, 1)[:30]
    first = np.array(utils.image_cache(paths, 16, tmp_path))
    (cache,) = tmp_path.glob("images_s16_*.npy")
    cache.write_bytes(cache.read_bytes()[:5000])
    capsys.readouterr()
    np.testing.assert_array_equal(utils.image_cache(paths, 16, tmp_path), first)
    assert f"rebuilding the damaged cache {cache}" in capsys.readouterr().out


def test_a_deleted_feature_spill_is_one_line(root, monkeypatch, capsys):
    # ROOT/cache, where the feature spill lives, deleted during a pass.
    real = encoding.encode_rois

    def cache_deleted(layers, *args, **kwargs):
        for spill in utils.cache_dir(root).glob(f"{encoding.SPILL_PREFIX}*"):
            shutil.rmtree(spill)
        return real(layers, *args, **kwargs)

    monkeypatch.setattr(encoding, "encode_rois", cache_deleted)
    err = run_error(fem.main, ["--root", str(root), "--rois", "V1v"] + FIT, capsys).strip()
    assert "\n" not in err and f"the feature spill {utils.cache_dir(root)}" in err and "is gone" in err


@pytest.mark.parametrize("content, message", [
    ("", "cannot read SUMMARY as JSON (Expecting value"),
    ("{\"rois\": {\"V1v\": {\"1\": [1, 2]}}}", "SUMMARY is not a mi summary of this project"),
    ("[1, 2]", "SUMMARY holds a JSON list, not a dict"),
])
def test_a_corrupt_mi_bound_summary_is_one_line(tmp_path, content, message):
    path = utils.results_dir(tmp_path) / "mi_bounds" / "subj1_lh_cl-tuned_e1.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(safe_io.UserError) as e:
        ru.mi_tables(tmp_path, "cl-tuned", 1)
    assert message.replace("SUMMARY", str(path)) in str(e.value) and "--overwrite" in str(e.value)


def test_a_corrupt_superclass_mapping_is_one_line(tiny_nods):
    path = nu.superclass_path(tiny_nods / "nod")
    path.write_text("")
    with pytest.raises(safe_io.UserError, match=f"cannot read {path} as a table .*download superClassMapping"):
        nu.trial_labels(tiny_nods / "nod", 1, [1], [1, 2])


def test_an_infinite_prf_r2_is_refused(tiny_nods):
    # +Inf won the top-50 selection silently.
    nod = tiny_nods / "nod"
    path = nu.prf_params_path(nod, 1)
    params, n_left, names = nu.read_cortex_dscalar(path)
    params[3, 17] = np.inf
    nu.write_cortex_dscalar(params, n_left, path, map_names=names)
    with pytest.raises(safe_io.UserError, match=f"{path} has an infinite pRF R2 \\(inf\\) at cortical vertex 17"):
        nu.select_vertices(nod, 1, "V1", "lh")


def test_a_scratch_variable_whose_value_holds_a_dollar_is_set(monkeypatch):
    # Was called unset, because '$' was still in the expanded path.
    monkeypatch.setenv("JOB_SCRATCH", "/scratch/a$b")
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    assert safe_io.expand_vars("$JOB_SCRATCH/features", "--scratch") == "/scratch/a$b/features"
    with pytest.raises(safe_io.UserError, match=re.escape("--scratch ${NOT_SET_HERE}/x: the environment variable "
                                                        "NOT_SET_HERE is not set here")):
        safe_io.expand_vars("${NOT_SET_HERE}/x", "--scratch")


def test_the_classification_path_reads_bad_files_as_one_line(tmp_path, capsys):
    from test_results import write_colour_folder
    folder = ru.dataset_folder(tmp_path, "caltech256")
    write_colour_folder(folder, per_class=2)
    images = ru.dataset_images(tmp_path, "caltech256", 64).images
    # A truncated fc7 cache is rebuilt.
    feats = np.array(ru.untuned_features(tmp_path, "caltech256", images, "none", 0, "cpu", 8))
    (cache,) = utils.cache_dir(tmp_path).glob("*_fc7.npy")
    cache.write_bytes(cache.read_bytes()[:1000])
    np.testing.assert_array_equal(ru.untuned_features(tmp_path, "caltech256", images, "none", 0, "cpu", 8), feats)
    # A corrupt accuracy summary.
    summary = utils.results_dir(tmp_path) / "classification" / "caltech256" / "subj1_lh_cl-tuned_e1.json"
    summary.parent.mkdir(parents=True)
    summary.write_text("{\"untuned\": 0.5, \"rois\"")
    with pytest.raises(safe_io.UserError, match=f"cannot read {summary} as JSON"):
        ru.classification_tables(tmp_path, "caltech256", "cl-tuned", 1)
    # A decompression bomb, and a dangling link, among the images.
    bomb = folder / "red" / "bomb.png"
    bomb_png(bomb)
    with pytest.raises(safe_io.UserError, match=f"refusing image {bomb}: .*decompression bomb"):
        ru.dataset_images(tmp_path, "caltech256", 64)
    bomb.unlink()
    link = folder / "red" / "link.png"
    link.symlink_to(link)  # a loop
    with pytest.raises(safe_io.UserError, match=f"cannot read {link} \\(Too many levels of symbolic links"):
        ru.dataset_images(tmp_path, "caltech256", 64)
    link.unlink()
    link.symlink_to(tmp_path / "gone.png")  # dangling
    with pytest.raises(safe_io.UserError, match=f"cannot read {link} \\(No such file or directory"):
        ru.dataset_images(tmp_path, "caltech256", 64)
