"""launch.py through submitit's debug and local executors, and demo.py in a tiny configuration."""

import os
import sys
from pathlib import Path

import pytest

import encoding_results
import launch
import models
import utils
from conftest import run_error

FAST = "--weights none --device cpu --image-size 64 --batch-size 128 --epochs 1"


def check_cl_checkpoint(root, subj, roi):
    path = utils.cl_model_path(root, subj, "lh", roi, 1)
    model, meta = models.load_checkpoint(path)
    voxels = utils.roi_voxel_indices(root, subj, "lh", roi)
    assert isinstance(model, models.CLModel) and model.n_voxels == len(voxels)
    assert (meta["method"], meta["subject"], meta["hemisphere"], meta["roi"]) == ("cl-tuned", subj, "lh", roi)
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
    # Untuned encoding: one job per subject and hemisphere with its non-empty ROIs.
    shared = launch.job_list(root, "fit_encoding_models.py", [1, 2], ["left"], ["V1v", "mTL-faces", "EBA"], True)
    assert shared == [(f"Subj{s} lh 2 ROIs", ["--root", str(root), "--subj", str(s), "--hemisphere", "lh",
                                                "--rois", "V1v", "EBA"]) for s in (1, 2)]
    assert launch.encoding_method(["--image-size", "64"]) == "untuned"
    assert launch.encoding_method(["--method", "cl-tuned"]) == launch.encoding_method(["--method=cl-tuned"]) == "cl-tuned"
    # rh FBA-2 has 33 voxels in Subj1 and none in Subj2; rh mTL-words 14 and 7: every ROI with a voxel gets a job.
    small = launch.job_list(root, "cl_model_training.py", [1, 2], ["right"], ["FBA-2", "mTL-words"])
    assert [label for label, _ in small] == ["Subj1 rh FBA-2", "Subj1 rh mTL-words", "Subj2 rh mTL-words"]
    assert [label for label, _ in launch.job_list(root, "pooled_model_training.py", [1, 2], ["right"],
                                                  ["mTL-words"])] == ["rh mTL-words"]


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
    (["--script", "train.py"], "--script train.py: allowed one of cl_model_training.py"),
    (["--rois", "V9"], "--rois V9: allowed one of V1v"),
    (["--cluster", "cloud"], "--cluster cloud: allowed one of slurm, local, debug"),
    (["--subjects", "one"], "--subjects one: allowed an integer between 1 and 8"),
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


# --- demo.py ---------------------------------------------------------------------------

def test_demo_tiny_run_reports_what_it_saved(tmp_path, capsys):
    import json

    import numpy as np

    import demo
    import figures
    import results_utils as ru
    root, output = tmp_path / "demo_data", tmp_path / "demo_output"
    argv = ["--root", str(root), "--output", str(output), "--images", "120", "--rois", "V1v", "--epochs", "1",
            "--classes", "3", "--class-images", "12", "--device", "cpu"]
    table = demo.main(argv)
    out = capsys.readouterr().out
    # No ImageNet file in the test's torch cache: seeded random weights, said so.
    assert "notice: no ImageNet AlexNet weights" in out and "weights none" in out
    # Every number of the summary is the saved result.
    test_r = {m: encoding_results.load_result(encoding_results.result_path(root, 1, m, "lh", "V1v"))["test_r"] for m in demo.METHODS}
    assert len(test_r["untuned"]) == utils.roi_voxel_count(root, 1, "lh", "V1v") == table.loc["V1v", "voxels"]
    for method, column in demo.METHODS.items():
        assert table.loc["V1v", column] == pytest.approx(test_r[method].mean(), abs=1e-12)
    improved = 100 * (test_r["cl-tuned"] > test_r["untuned"]).mean()
    assert table.loc["V1v", "CL > untuned %"] == pytest.approx(improved)
    mi = json.loads((utils.results_dir(root) / "mi_bounds" / "subj1_lh_cl-tuned_e1.json").read_text())
    bound = mi["rois"]["V1v"]["1"]
    assert table.loc["V1v", "MI CL bits"] == bound["tuned"]["scaled_bits"]
    assert table.loc["V1v", "MI untuned bits"] == bound["untuned"]["scaled_bits"]
    # The printed summary is OUTPUT/summary.md, a Markdown table of the same numbers.
    summary = (output / "summary.md").read_text()
    assert summary in out
    row = next(line.strip("| ").split(" | ") for line in summary.splitlines() if line.startswith("| V1v |"))
    assert row[2:5] == [f"{test_r[m].mean():.3f}" for m in ("untuned", "cl-tuned", "reg-tuned")]
    assert row[-2] == f"{bound['tuned']['scaled_bits']:.3f}"
    verdict = "beats" if test_r["cl-tuned"].mean() > test_r["untuned"].mean() else "does not beat"
    assert f"V1v (planted pRFs): CL {verdict} untuned, mean test r {test_r['cl-tuned'].mean():.3f}" in summary
    assert "of wall time (every step run) on " in summary
    # --update-docs puts it into the demo block of README.md and docs/demo.md; here into copies. The
    # README's block has this table's columns (its numbers come from the full demo: make demo-docs).
    for name in demo.DOCS:
        text = (Path(demo.__file__).parent / name).read_text()
        block = text.split(demo.DOC_BLOCK[0])[1].split(demo.DOC_BLOCK[1])[0]
        header = next(line for line in summary.splitlines() if line.startswith("| ROI |"))
        assert header in block.splitlines()
        updated = demo.replace_block(text, summary)
        assert updated.replace(summary, block.lstrip("\n")) == text
    with pytest.raises(ValueError, match="no single demo summary block"):
        demo.replace_block("no block here", summary)
    # The probes saw the synthetic ImageFolder: 3 classes, the 15% split of 36 images.
    names, probs, labels, _ = ru.load_predictions(root, "caltech256")
    samples, classes = ru.dataset_samples(root, "caltech256")
    test = utils.train_test_split(len(samples))[1]
    assert len(classes) == 3 and probs.shape == (4, 6, 3) and labels.tolist() == [samples[i][1] for i in test]
    assert {"untuned", "subj1_lh_V1v_cl-tuned_e1", "subj1_lh_V1v_reg-tuned_e1", "lh_V1v_pooled-avg_e1"} == set(names)
    # Every figure written under the results folders is in OUTPUT, the notebook's landscape included.
    written = [p for d in (utils.results_dir(root), root / "encoding_results") for p in d.rglob("*")
               if p.suffix in (".png", ".pdf")]
    copies = {p.name: p.read_bytes() for p in output.iterdir() if p.suffix in (".png", ".pdf")}
    assert len(copies) == len(written) and sorted(copies.values()) == sorted(p.read_bytes() for p in written)
    assert {"landscape_caltech256_inpca.png", "Subj1_cl-tuned_layer_scores_lh.png", "Subj2_untuned_layer_scores_lh.png",
            "paper_early_group_cs_avgs_picture.png", "paper_early_group_cl_gain_per_roi.png",
            "paper_cortical_results_key.png", "paper_cortical_Subj2_gain_cl-tuned.png",
            "paper_cortical_all_subjects_panel.png", "paper_roi_subj_presence_table.png"} <= set(copies)
    # The group figure averages the CL gain of both subjects.
    gains = [np.mean(encoding_results.load_result(encoding_results.result_path(root, s, "cl-tuned", "lh", "V1v"))["test_r"]
                     - encoding_results.load_result(encoding_results.result_path(root, s, "untuned", "lh", "V1v"))["test_r"]) for s in (1, 2)]
    stats = figures.group_gains(figures.encoding_table(encoding_results.load_encoding(root)), "cl-tuned", ["V1v"])
    assert stats["n"].tolist() == [2] and stats["mean"].iloc[0] == pytest.approx(np.mean(gains), abs=1e-12)


def test_update_docs_rewrites_only_the_demo_blocks_and_the_landscape(tmp_path):
    import shutil

    import demo
    repo = Path(demo.__file__).parent
    for name in demo.DOCS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, tmp_path / name)
    output = tmp_path / "demo_output"
    output.mkdir()
    (output / demo.DOC_FIGURE[0]).write_bytes(b"a new landscape")
    summary = "**Subj1 lh**: a run\n\n| ROI | voxels |\n|---|---|\n| V1v | 3 |\n\n- 1 figures in demo_output/\n"
    written = demo.update_docs(summary, output, tmp_path)
    assert written == [tmp_path / name for name in demo.DOCS] + [tmp_path / demo.DOC_FIGURE[1]]
    assert (tmp_path / demo.DOC_FIGURE[1]).read_bytes() == b"a new landscape"
    for name in demo.DOCS:
        old, new = (repo / name).read_text(), (tmp_path / name).read_text()
        start, end = demo.DOC_BLOCK
        assert new.split(start)[0] == old.split(start)[0] and new.split(end)[1] == old.split(end)[1]
        assert new.split(start)[1].split(end)[0] == "\n" + summary
    # A file without its block is refused before anything is written.
    (tmp_path / demo.DOCS[1]).write_text("no block")
    before = (tmp_path / demo.DOCS[0]).read_text()
    with pytest.raises(ValueError, match="no single demo summary block"):
        demo.update_docs("other", output, tmp_path)
    assert (tmp_path / demo.DOCS[0]).read_text() == before
