"""Garbage in is never a result: non-finite data, diverged training, pickles, litter, corrupt files, permissions.

Each bad input must stop the script with exit code 2 and one line naming the file (no
traceback), and leave every file under the project folder as it was.
"""

import json
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cl_model_training
import encoding_results
import fit_encoding_models as fem
import generate_results
import generate_voxel_roi_mappings as gen
import models
import safe_io
import utils

TRAIN = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "64", "--epochs", "1"]
FIT = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "128", "--n-folds", "2",
       "--alphas", "1", "100", "--n-components", "10"]


@pytest.fixture
def own_root(synthetic_root, tmp_path):
    """A project folder with its own copies of the fMRI and masks (to spoil) and no image cache yet."""
    root = tmp_path / "project"
    for name in ("training_fmri", "roi_masks"):
        shutil.copytree(synthetic_root / name, root / name)
    os.symlink(synthetic_root / "training_images", root / "training_images")
    return root


def snapshot(root):
    """Every file and folder under ``root`` (links not followed) with its size and mtime."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(Path(folder) / name)
            out[os.path.relpath(Path(folder) / name, root)] = (st.st_size, st.st_mtime_ns)
    return out


def fails(main, argv, capsys, root):
    """Run a script that must stop with one error line and change nothing under ``root``; returns the line."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert snapshot(root) == before
    return err


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_nan_fmri_is_refused_by_encoding_and_training(own_root, capsys):
    path = utils.fmri_path(own_root, 1, "lh")
    fmri = np.load(path)
    v1v = utils.roi_voxel_indices(own_root, 1, "lh", "V1v")
    fmri[9, v1v[0]] = np.inf
    fmri[7, v1v[3]] = np.nan
    np.save(path, fmri)
    expected = f"{path} has a non-finite value (nan) at row 7, column {v1v[3]}"
    err = fails(fem.main, ["--root", str(own_root), "--rois", "V1v"] + FIT, capsys, own_root)
    assert expected in err
    err = fails(cl_model_training.main, ["--root", str(own_root), "--roi", "V1v"] + TRAIN, capsys, own_root)
    assert expected in err
    # Only the columns a script reads count: the ROI next door is clean.
    v2v = utils.roi_voxel_indices(own_root, 1, "lh", "V2v")
    np.testing.assert_array_equal(utils.load_fmri(own_root, 1, "lh", v2v), fmri[:, v2v])


def toy_data(n=24, n_voxels=30):
    rng = np.random.default_rng(0)
    return SimpleNamespace(subj=1, images=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
                           fmri=rng.standard_normal((n, n_voxels)).astype(np.float32),
                           train=np.arange(n - 4), test=np.arange(n - 4, n))


def test_a_nan_loss_stops_training_and_keeps_the_last_good_epoch(tmp_path, monkeypatch):
    real, steps = models.CLModel.loss, []

    def loss_nan_from_epoch_2(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        if model.training:
            steps.append(1)
            if len(steps) > 2:  # 20 train rows in batches of 10: two steps per epoch
                return out * float("nan")
        return out

    monkeypatch.setattr(models.CLModel, "loss", loss_nan_from_epoch_2)
    path = tmp_path / "m.pt"
    with pytest.raises(safe_io.UserError) as exc:
        models.train_model(models.CLModel(30), [toy_data()], path, {"name": "toy"}, epochs=3, lr=1e-4, batch_size=10)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "m.pt diverged: loss nan at epoch 2, step 1; likely the learning rate 0.0001 is too high or the " \
           "temperature 0.3 too low; no checkpoint written" in msg
    assert f"{models.partial_path(path)} keeps epoch 1" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.log.json", "m.pt.partial"]
    state = safe_io.load_state_dict_file(models.partial_path(path))
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [row["epoch"] for row in json.loads(models.log_path(path).read_text())] == [1]


@pytest.mark.parametrize("method, lr, temperature, cause", [
    ("cl-tuned", 1e-4, 0.0, "temperature 0 too low"),
    ("reg-tuned", 1e12, 0.3, "learning rate 1e+12 is too high; no checkpoint"),
])
def test_a_really_diverging_run_saves_nothing(tmp_path, method, lr, temperature, cause):
    model = models.CLModel(30) if method == "cl-tuned" else models.RegressionModel(30)
    path = tmp_path / "m.pt"
    with pytest.raises(safe_io.UserError, match="diverged") as exc:
        models.train_model(model, [toy_data()], path, {"name": "toy"}, epochs=3, lr=lr, batch_size=10,
                           temperature=temperature)
    assert cause in str(exc.value) and "\n" not in str(exc.value)
    assert not path.exists()
    # A loss that is NaN from the first step leaves no state at all.
    if method == "cl-tuned":
        assert "at epoch 1, step 1" in str(exc.value) and "no training state was kept" in str(exc.value)
        assert list(tmp_path.iterdir()) == []


def test_a_diverged_checkpoint_is_refused(tmp_path):
    model = models.CLModel(30)
    with torch.no_grad():
        model.head[0].weight[2, 5] = float("nan")
    path = tmp_path / "m.pt"
    models.save_checkpoint(model, {"method": "cl-tuned", "n_voxels": 30, "h": model.h, "z": model.z}, path)
    with pytest.raises(safe_io.UserError, match=f"{path} holds non-finite weights \\(head.0.weight\\)"):
        models.load_checkpoint(path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["pickle", "npy"])
def test_a_mapping_file_never_runs_code(own_root, tmp_path, capsys, form):
    marker = tmp_path / "marker"
    path = utils.roi_mapping_path(own_root, 1, "prf-visualrois")
    if form == "pickle":
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    else:
        np.save(path, np.array({1: RunsCode(marker)}, dtype=object), allow_pickle=True)
    err = fails(gen.main, ["--root", str(own_root), "--subjects", "1"], capsys, own_root)
    assert not marker.exists()
    assert f"refusing {path}: not a mapping file" in err
    if form == "npy":
        assert "posix.system, which could run code" in err


def test_the_real_mapping_files_still_load(shared_masks):
    for folder in sorted(shared_masks.iterdir()):
        for path in sorted(folder.glob("mapping_*.npy")):
            mapping = safe_io.load_mapping_file(path)
            assert mapping == {int(k): v for k, v in np.load(path, allow_pickle=True).item().items()}
            assert mapping[0] == "Unknown" and len(mapping) > 1


def test_a_run_removes_killed_runs_temporaries_and_keeps_live_ones(own_root):
    host, dead, live = socket.gethostname().replace("-", "_"), dead_pid(), os.getpid()
    ckpt = utils.cl_model_path(own_root, 1, "lh", "V1v", 1)
    cache = utils.cache_dir(own_root)
    ckpt.parent.mkdir(parents=True)
    cache.mkdir()
    partial = models.partial_path(ckpt).name
    left = {ckpt.parent / f".{partial}.tmp-{host}-{dead}-0a1b.partial": False,
            ckpt.parent / f".{partial}.tmp-{host}-{live}-2c3d.partial": True,
            ckpt.parent / f".{ckpt.name}.tmp-{host}-{dead}-4e5f.pt": False,
            ckpt.parent / f".{partial}.tmp-otherhost-{dead}-6a7b.partial": True,
            cache / f".Subj1_s64_0123456789abcdef.npy.tmp-{host}-{dead}-8c9d.npy": False,
            cache / f".Subj1_s64_0123456789abcdef.npy.tmp-{host}-{live}-0e1f.npy": True}
    for path in left:
        path.write_bytes(b"0" * 64)
    cl_model_training.main(["--root", str(own_root), "--roi", "V1v", "--max-voxels", "30"] + TRAIN)
    assert {path: path.exists() for path in left} == left
    assert ckpt.is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_users_umask(own_root, umask):
    old = os.umask(umask)
    try:
        gen.main(["--root", str(own_root), "--subjects", "1"])
        safe_io.atomic_json_dump({"a": 1}, own_root / "results" / "x.json")
    finally:
        os.umask(old)
    written = list((own_root / "voxel_roi_mappings" / "Subj1").iterdir()) + [own_root / "results" / "x.json"]
    assert len(written) == 3
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o666 & ~umask}


@pytest.mark.parametrize("blocked", ["cl_models", "encoding_results", "results"])
def test_an_unwritable_output_folder_fails_before_any_work(own_root, capsys, blocked):
    # A file where the output folder should be: fails for root too (which ignores permissions).
    (own_root / blocked).write_text("not a folder")
    main, argv = {"cl_models": (cl_model_training.main, ["--roi", "V1v"] + TRAIN),
                  "encoding_results": (fem.main, ["--rois", "V1v"] + FIT),
                  "results": (generate_results.main, ["--type", "voxel-counts"])}[blocked]
    err = fails(main, ["--root", str(own_root)] + argv, capsys, own_root)
    assert f"cannot write to {own_root / blocked}" in err and f"{own_root / blocked} is not a folder" in err


@pytest.mark.parametrize("name", ["lh.floc-faces_challenge_space.npy", "mapping_floc-faces.npy",
                                  "lh.all-vertices_fsaverage_space.npy"])
def test_a_truncated_mask_file_is_one_line(own_root, capsys, name):
    path = utils.roi_masks_dir(own_root, 1) / name
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    err = fails(gen.main, ["--root", str(own_root), "--subjects", "1"], capsys, own_root)
    assert str(path) in err
    assert ("not a mapping file" if name.startswith("mapping") else "the file is truncated or corrupt") in err


@pytest.mark.parametrize("bad", ["strings", "objects"])
def test_an_fmri_file_of_strings_is_one_line(own_root, capsys, bad):
    path = utils.fmri_path(own_root, 1, "lh")
    fmri = np.load(path)
    np.save(path, fmri.astype(str) if bad == "strings" else fmri.astype(object), allow_pickle=True)
    err = fails(fem.main, ["--root", str(own_root), "--rois", "V1v"] + FIT, capsys, own_root)
    assert str(path) in err and ("values, not numbers" if bad == "strings" else "truncated or corrupt") in err


def test_a_truncated_result_names_the_file_and_overwrite_repairs_it(own_root, capsys):
    path = encoding_results.result_path(own_root, 1, "untuned", "lh", "V1v")
    voxels = utils.roi_voxel_indices(own_root, 1, "lh", "V1v")
    encoding_results.save_result({"voxels": voxels, "alphas": np.ones(len(voxels)), "alpha_index": np.zeros(len(voxels), int),
                     "cv_r": np.zeros(len(voxels)), "test_r": np.zeros(len(voxels)), "hemisphere": "lh",
                     "roi": "V1v"}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    err = fails(fem.main, ["--root", str(own_root), "--rois", "V2v"] + FIT, capsys, own_root)
    assert f"cannot read the result {path}" in err and "--overwrite" in err
    fem.main(["--root", str(own_root), "--rois", "V1v", "--overwrite"] + FIT)
    assert len(encoding_results.load_result(path)["test_r"]) == len(voxels)


def test_save_test_fmri_checks_every_roi_before_writing(own_root, capsys):
    err = fails(generate_results.main, ["--root", str(own_root), "--type", "save-test-fmri-responses",
                                        "--rois", "V1v", "mTL-faces"], capsys, own_root)
    assert "ROI mTL-faces has 0 voxels in lh of Subj1" in err


def test_a_full_disk_inside_atomic_path_is_one_line_and_leaves_nothing(tmp_path):
    import errno
    out = tmp_path / "out.npy"
    with pytest.raises(safe_io.UserError, match=rf"cannot write {out} \(Disk quota exceeded\): free disk space "
                                              rf"under {tmp_path} \(or raise your quota\)"):
        with safe_io.atomic_path(out) as tmp:
            open(tmp, "wb").write(b"half")
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(PermissionError):  # other OS errors are not about space: they pass unchanged
        with safe_io.atomic_path(out):
            raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


def test_training_on_a_full_disk_stops_with_one_line(root, tmp_path):
    # A real full file system: a 1 MB tmpfs over cl_models, in a private mount namespace.
    models_dir = root / "cl_models"
    models_dir.mkdir()
    try:
        probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "none", str(models_dir)],
                               capture_output=True).returncode
    except FileNotFoundError:
        probe = None
    if probe != 0:
        pytest.skip("mounting a tmpfs in a private namespace (unshare -rm) is not allowed here")
    train = " ".join(["--root", str(root), "--roi", "V1v", *TRAIN])
    script = (f"mount -t tmpfs -o size=1m none {models_dir} && "
              f"{sys.executable} cl_model_training.py {train}; echo rc=$?; ls -A {models_dir}/Subj1")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    err = proc.stderr.strip().splitlines()[-1]
    checkpoint = utils.cl_model_path(root, 1, "lh", "V1v", 1)
    partial = models.partial_path(checkpoint)
    assert err.startswith(f"error: cannot write {partial} (No space left on device, or over quota: torch could "
                          f"not write the file): free disk space under {partial.parent}")
    assert "Traceback" not in proc.stderr
    # Exit code 2, and only the per-epoch log is on the full disk: no checkpoint, no temporary.
    assert proc.stdout.split("rc=")[1].split() == ["2", models.log_path(checkpoint).name]


def test_a_process_killed_while_writing_leaves_a_temporary_the_next_write_removes(tmp_path):
    out = tmp_path / "out.npy"
    code = ("import os, sys, safe_io\n"
            f"with safe_io.atomic_path({str(out)!r}) as tmp:\n"
            "    open(tmp, 'wb').write(b'half')\n"
            "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".out.npy.tmp-") and left.name.endswith(".npy")
    safe_io.atomic_np_save(np.arange(3), out)
    assert [p.name for p in tmp_path.iterdir()] == ["out.npy"]
    np.testing.assert_array_equal(np.load(out), np.arange(3))


def test_nan_weights_and_features_are_refused(tmp_path):
    alexnet = utils.load_alexnet("none")
    with torch.no_grad():
        alexnet.features[0].weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "w.pt"
    torch.save(alexnet.state_dict(), path)
    with pytest.raises(safe_io.UserError, match=f"AlexNet weights {path} hold NaN or Inf \\(features.0.weight\\)"):
        utils.load_alexnet(path)
    with pytest.raises(safe_io.UserError, match=r"layer features.2 are non-finite \(nan\) at image row 0, column 0:"):
        utils.extract_features(alexnet, np.zeros((3, 64, 64, 3), np.uint8))
