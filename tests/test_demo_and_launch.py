"""launch.py through submitit's debug and local executors, and demo.py in a tiny configuration."""

import os
import sys

import pytest

import launch
import models
import utils

FAST = "--weights none --device cpu --image-size 64 --batch-size 128 --epochs 1"


@pytest.fixture
def root(synthetic_root, tmp_path):
    """A fresh project folder whose inputs link to the shared synthetic dataset (outputs stay here)."""
    for name in ("training_images", "training_fmri", "roi_masks"):
        os.symlink(synthetic_root / name, tmp_path / name)
    return tmp_path


def run_error(main, argv, capsys):
    """Run a script that must fail with a user error; returns its stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def check_cl_checkpoint(root, subj, roi):
    path = utils.cl_model_path(root, subj, "lh", roi, 1)
    model, meta = models.load_checkpoint(path)
    voxels = utils.roi_voxel_indices(root, subj, "lh", roi)
    assert isinstance(model, models.CLModel) and model.n_voxels == len(voxels)
    assert (meta["kind"], meta["subject"], meta["hemisphere"], meta["roi"]) == ("cl", subj, "lh", roi)
    assert (meta["n_voxels"], meta["voxels"], meta["epochs"], meta["image_size"]) == (len(voxels), voxels.tolist(), 1, 64)
    return path


def test_launch_debug_runs_one_job_per_non_empty_roi(root, capsys):
    # mTL-faces is empty in the left hemisphere of both synthetic subjects: no job for it.
    assert utils.roi_voxel_count(root, 1, "lh", "mTL-faces") == utils.roi_voxel_count(root, 2, "lh", "mTL-faces") == 0
    jobs = launch.main(["--root", str(root), "--cluster", "debug", "--hemispheres", "left",
                        "--rois", "V1v", "mTL-faces", "--args", FAST])
    assert len(jobs) == 2
    out = capsys.readouterr().out
    for subj in (1, 2):
        path = check_cl_checkpoint(root, subj, "V1v")
        assert f"Subj{subj} lh V1v" in out and f"done: {path}" in out
    assert "mTL-faces" not in out and not list((root / "cl_models").rglob("*mTL-faces*"))
    # The job list itself, for the other scripts' flags.
    pooled = launch.job_list(root, "pooled_model_training.py", [1, 2], ["left"], ["V1v", "mTL-faces"])
    assert pooled == [("lh V1v", ["--root", str(root), "--hemisphere", "lh", "--roi", "V1v", "--subjects", "1", "2"])]
    fit = launch.job_list(root, "fit_encoding_models.py", [2], ["right"], ["EBA"])
    assert fit == [("Subj2 rh EBA", ["--root", str(root), "--subj", "2", "--hemisphere", "rh", "--rois", "EBA"])]


def test_launch_local_reports_a_failed_job_and_exits_non_zero(root, capsys, tmp_path):
    # A corrupt checkpoint makes the V2v job fail inside its subprocess; the V1v job succeeds.
    bad = utils.cl_model_path(root, 1, "lh", "V2v", 1)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    # Started elsewhere, the jobs still find the scripts.
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        err = run_error(launch.main, ["--root", str(root), "--cluster", "local", "--subjects", "1", "--hemispheres",
                                      "left", "--rois", "V1v", "V2v", "--gpus", "0", "--cpus", "1", "--time", "5",
                                      "--", *FAST.split()], capsys)
    finally:
        os.chdir(cwd)
    assert "1 of 2 cl_model_training.py jobs failed" in err and str(root / "launch_logs") in err
    check_cl_checkpoint(root, 1, "V1v")
    logs = sorted((root / "launch_logs").glob("*_log.err"))
    assert len(logs) == 2 and any(f"cannot read checkpoint {bad}" in p.read_text() for p in logs)


def test_launch_debug_failed_job_line_names_the_error(root, capsys):
    bad = utils.cl_model_path(root, 2, "lh", "V2v", 1)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        launch.main(["--root", str(root), "--cluster", "debug", "--subjects", "2", "--hemispheres", "left",
                     "--rois", "V2v", "--", *FAST.split()])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    line, = [line for line in captured.out.splitlines() if "Subj2 lh V2v" in line]
    assert f"FAILED: UserError: cannot read checkpoint {bad}" in line
    assert "error: 1 of 1 cl_model_training.py jobs failed" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--script", "train.py"], "unknown --script 'train.py': use one of cl_model_training.py"),
    (["--rois", "V9"], "unknown ROI 'V9'"),
    (["--cluster", "cloud"], "unknown --cluster 'cloud': use one of slurm, local, debug"),
    (["--subjects", "one"], "bad --subjects"),
    (["--subjects", "1", "--hemispheres", "left", "--rois", "mTL-faces"], "no job to run"),
])
def test_launch_bad_input_is_one_line(root, capsys, argv, message):
    err = run_error(launch.main, ["--root", str(root), "--cluster", "debug", *argv], capsys)
    assert message in err


def test_launch_without_submitit_says_how_to_install(root, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    err = run_error(launch.main, ["--root", str(root), "--cluster", "debug", "--rois", "V1v"], capsys)
    assert "pip install submitit" in err
    assert not (root / "cl_models").exists()
