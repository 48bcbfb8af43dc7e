"""launch.py --plan paper: the whole paper in dependency order, resumed after a failure; the dry-run's
job counts on the real masks; the SLURM arrays and their dependencies (submitit's mocked SLURM);
a stopped local launcher cancels its jobs; bad launcher input is one line."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import encoding
import fit_encoding_models
import launch
import launch_plan
import utils
from conftest import REPO, link_inputs, run_error

FAST = ("--weights none --device cpu --image-size 64 --batch-size 64 --epochs 1 --cl-epochs 1 --reg-epochs 1 "
        "--pooled-epochs 1 --n-folds 2 --n-components 20")
PLAN = ["--plan", "paper", "--cluster", "debug", "--subjects", "1", "2", "--hemispheres", "left", "--rois", "V1v",
        "--args", FAST, "--stage-args", "figures=--maps none"]


def outputs(root):
    """{relative path: sha256} of every file the plan wrote (not the inputs, caches or job records); the
    training logs and checkpoints hold the epoch's seconds, so for those the tensors are hashed."""
    import torch
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] in ("training_images", "training_fmri", "roi_masks", "cache", "datasets",
                                                  "launch_logs") or path.name.endswith(".log.json"):
            continue
        if path.suffix == ".pt":
            state = torch.load(path, weights_only=True)["state_dict"]
            data = b"".join(state[k].numpy().tobytes() for k in sorted(state))
        else:
            data = path.read_bytes()
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


# The whole plan takes about 5 minutes on a loaded 2-core CPU (45 jobs), over the suite's budget:
# by default the test runs the stages that need no tuned model; RUN_FULL_PLAN=1 runs them all.
FULL = os.environ.get("RUN_FULL_PLAN") == "1"
STAGES = [] if FULL else ["--stages", "mappings", "untuned", "cl", "summaries"]
# What a failed untuned job (Subj2's) holds back: the stages that need it, and the stages that need those.
HELD = ["transfer", "summaries", "compare", "figures"]


def test_plan_runs_its_stages_and_a_rerun_after_a_failure_runs_only_what_is_missing(
        synthetic_root, shared_cache, tmp_path, capsys, monkeypatch, drawn):
    import demo
    root = link_inputs(tmp_path / "root", synthetic_root, shared_cache)
    demo.write_image_folder(root / "datasets" / "caltech256", 3, 8, size=32)
    argv = ["--root", str(root), *PLAN, *STAGES]
    opts, stages, jobs = plan_of(argv)
    labels = {name: [job.label for job, _ in jobs[name]] for name in stages}
    # Subj2's untuned encoding job raises: the stages that need it wait, the others run.
    calls = {"n": 0}
    real = encoding.encode_rois

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("planted failure")
        return real(*args, **kwargs)
    monkeypatch.setattr(encoding, "encode_rois", failing)
    err = run_error(launch.main, argv, capsys)
    assert "1 job(s) failed (untuned Subj2 lh" in err
    monkeypatch.setattr(encoding, "encode_rois", real)
    before = outputs(root)
    state = {name: {job.label: s for job, s, _, _ in rows} for name, rows in launch_plan.states(opts, stages, jobs).items()}
    assert state["untuned"] == {"Subj1 lh": "done", "Subj2 lh": "failed"}
    assert all(s == ("missing" if name in HELD else "done") for name in stages if name != "untuned"
               for s in state[name].values())
    # The status view names the failed job and the command that reruns the rest, and touches nothing.
    launch.main(argv + ["--status"])
    out = capsys.readouterr().out
    assert "untuned Subj2 lh: RuntimeError: planted failure (log: none)" in out and "to run what is missing" in out
    assert outputs(root) == before
    # The rerun runs exactly the failed job and the stages held back by it.
    ran = launch.main(argv)
    assert ran == {"untuned": ["Subj2 lh"], **{name: labels[name] for name in stages if name in HELD and labels[name]}}
    after = outputs(root)
    # What ran before the failure is unchanged (the summaries are rebuilt by every encoding job).
    assert {k: v for k, v in after.items() if k in before and "Subj2/untuned" not in k and k.endswith((".npz", ".pt"))} \
        == {k: v for k, v in before.items() if k.endswith((".npz", ".pt"))}
    expected = ["voxel_roi_mappings/Subj2/*.joblib", "cl_models/Subj2/*V1v*_e1.pt", "encoding_results/Subj2/untuned/lh_V1v.json",
                "encoding_results/Subj2/group_summary.csv"]
    if FULL:
        expected += ["baseline_models/nn_reg/Subj1/*.pt", "cl_models/lh_V1v_pooled_model_e1_hconst.pt",
                     "encoding_results/Subj2/pooled-const/lh_V1v.json",
                     "encoding_results/Subj1/cl-tuned_from-Subj2_untuned-layer/lh_V1v.json",
                     "results/mi_bounds/*pooled-const*", "classification_preds/caltech256/*", "results/embeddings/*",
                     "encoding_results/transfer_*", "results/voxel_counts.csv"]
        assert {"best_untuned_layers_matrix", "all_group_cs_avgs_picture", "mi_lower_bound_matrix",
                "caltech256_results_matrix"} <= set(drawn)
    for pattern in expected:
        assert list(root.glob(pattern)), pattern
    # The refitted job's result equals the same fit run on its own.
    own = link_inputs(tmp_path / "own", synthetic_root, shared_cache)
    fit_encoding_models.main(["--root", str(own), "--subj", "2", "--hemisphere", "lh", "--rois", "V1v",
                              "--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "64",
                              "--n-folds", "2", "--n-components", "20"])
    a, b = (np.load(r / "encoding_results/Subj2/untuned/lh_V1v.npz") for r in (own, root))
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    # Nothing is left to run.
    assert launch.main(argv) == {}


def plan_of(argv):
    """(opts, stages, jobs) of a launch.py --plan command line, as launch.main builds them."""
    opts = launch.options.parse_options(launch, argv)
    return (opts, *launch_plan.build(opts, launch.pass_through(opts, argv)))


def test_dry_run_counts_the_jobs_of_the_real_masks(shared_masks, tmp_path, capsys):
    masks = REPO.parent / "shared" / "algonauts_roi_masks"  # ../shared/algonauts_roi_masks, relative to the repository
    assert masks.resolve() == shared_masks.resolve()
    (tmp_path / "roi_masks").symlink_to(masks)
    ran = launch.main(["--root", str(tmp_path), "--plan", "paper", "--dry-run", "--stages", "mappings", "untuned", "cl",
                       "reg", "pooled", "tuned", "transfer", "summaries"])
    assert ran == {}
    out = capsys.readouterr().out
    rows = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[1:]
            if line.split() and line.split()[0] in launch_plan.STAGES}
    assert "estimates from per-job figures measured at full size on the development machine's 2-core CPU" in out
    # Counted here from the mask files themselves: a vertex of an ROI carries one of the ROI's codes.
    present = {}
    for s in range(1, 9):
        for h in ("lh", "rh"):
            for roi, cls in utils.ROI_CLASS.items():
                mapping = np.load(masks / f"Subj{s}" / f"mapping_{cls}.npy", allow_pickle=True).item()
                codes = [c for c, name in mapping.items() if name == roi]
                labels = np.load(masks / f"Subj{s}" / f"{h}.{cls}_challenge_space.npy")
                if np.isin(labels, codes).sum() >= 1:
                    present.setdefault((s, h), set()).add(roi)
    triples = sum(len(v) for v in present.values())
    pairs = {(h, roi) for (s, h), rois in present.items() for roi in rois}
    # Per-method: every ordered pair of other subjects; untuned-layer: each subject's own model too.
    transfer = sum(1 for t in range(1, 9) for m in range(1, 9) if m != t for h in ("lh", "rh")
                   if present[(t, h)] & present[(m, h)])
    own = sum(1 for t in range(1, 9) for h in ("lh", "rh") if present[(t, h)])
    assert triples == 424 and len(pairs) == 57  # docs/cluster.md's counts
    assert rows == {"mappings": 1, "untuned": 16, "cl": triples, "reg": triples, "pooled": 2 * len(pairs),
                    "tuned": 4 * triples, "transfer": 2 * transfer + own, "summaries": 3}
    assert not (tmp_path / "launch_logs").exists()


def test_slurm_plan_submits_one_array_per_stage_held_by_its_dependencies(root, capsys, monkeypatch):
    from submitit.core import test_core
    from submitit.slurm import slurm
    mock = test_core.MockedSubprocess(known_cmds=["srun", "sbatch"])
    with mock.context():
        ran = launch.main(["--root", str(root), "--plan", "paper", "--cluster", "slurm", "--wait", "false",
                           "--subjects", "1", "2", "--hemispheres", "left", "--rois", "V1v", "EBA", "--args", FAST])
    slurm.SlurmJob.watcher.clear()
    # One sbatch file per stage, in stage order; the mock numbers the arrays 12, 13, ...
    scripts = sorted((root / "launch_logs").glob("*submission_file*.sh"), key=lambda p: p.stat().st_mtime_ns)
    ids = {}
    for job_id, (name, labels) in zip(range(12, 100), ran.items()):
        text = next(p.read_text() for p in scripts if f"--job-name=paper-{name}\n" in p.read_text())
        # submitit submits a single job as a plain job, several as one array.
        assert (f"#SBATCH --array=0-{len(labels) - 1}%{min(32, len(labels))}" in text) == (len(labels) > 1)
        assert ("#SBATCH --gpus-per-node=1" in text) == launch_plan.STAGES[name].gpu
        needs = sorted(ids[n] for n in launch_plan.STAGES[name].needs if n in ids)
        assert (f"#SBATCH --dependency=afterok:{':'.join(needs)}" in text) == bool(needs), name
        ids[name] = str(job_id)
    assert list(ran) == ["mappings", "untuned", "cl", "reg", "pooled", "tuned", "transfer", "mi", "embeddings",
                         "summaries", "figures"]
    assert len(ran["tuned"]) == 4 * 2 * 2 and len(ran["pooled"]) == 2 * 2
    # Queued jobs count as running in the status view; nothing has run.
    with mock.context():
        launch.main(["--root", str(root), "--plan", "paper", "--subjects", "1", "2", "--hemispheres", "left",
                     "--rois", "V1v", "EBA", "--args", FAST, "--status"])
    out = capsys.readouterr().out
    assert any(line.split()[:5] == ["tuned", "0", "0", "0", "16"] for line in out.splitlines())
    assert not (root / "cl_models").exists()
    # Launched again while they are queued, the plan refuses rather than submit them twice.
    with mock.context():
        err = run_error(launch.main, ["--root", str(root), "--plan", "paper", "--subjects", "1", "2", "--hemispheres",
                                      "left", "--rois", "V1v", "EBA", "--args", FAST], capsys)
    slurm.SlurmJob.watcher.clear()
    assert "jobs of this plan are still queued or running (see --status)" in err


@pytest.mark.parametrize("argv, message", [
    (["--args", "--roi V2v"], "--roi in the jobs' arguments would be given to every job"),
    (["--args", "--subj 2", "--rois", "V1v"], "--subj in the jobs' arguments would be given to every job"),
    (["--args", "--epochs 1", "--args", "--lr 1"], "--args is given twice"),
    (["--args", "--epochs 1", "--", "--epochs", "2"], "--epochs is given twice in the jobs' arguments"),
    (["--rois", "V1v", "--rois", "V2v"], "--rois is given twice"),
    (["--rois"], "--rois has no value"),
    (["--subjects", "1", "1"], "--subjects 1 1: 1 is given twice"),
    (["--hemispheres", "left", "lh"], "--hemispheres left lh: allowed hemispheres among left, right, lh, rh, each"),
    (["--args", "--weights 'none"], "--args \"--weights 'none\": No closing quotation; balance its quotes"),
    (["--rois", "V1v", "--args", "--epochs 0"], "cl_model_training.py would refuse its jobs' arguments: --epochs 0: "
                                                "allowed an integer >= 1"),
    (["--plan", "paper", "--args", "--epochz 1"], "--epochz in the jobs' arguments is an option of no script"),
    (["--plan", "paper", "--stage-args", "cl=--method untuned"], "--method in --stage-args cl= would be given"),
    (["--plan", "paper", "--stages", "figs"], "--stages figs: allowed mappings"),
    (["--dry-run"], "belong to a plan: add --plan paper"),
])
def test_launch_bad_input_is_one_line_before_any_job(root, capsys, argv, message):
    err = run_error(launch.main, ["--root", str(root), "--cluster", "debug", *argv], capsys)
    assert message in err and err.count("\n") == 1
    assert not (root / "launch_logs").exists() and not (root / "cl_models").exists()


def test_slurm_absent_is_one_line(root, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(root))
    err = run_error(launch.main, ["--root", str(root), "--rois", "V1v"], capsys)
    assert "--cluster slurm, but SLURM's sbatch is not on this machine's PATH" in err and err.count("\n") == 1


def test_min_voxels_among_the_jobs_arguments_sets_the_job_list(root, capsys):
    # rh mTL-words has 14 voxels in Subj1 and 7 in Subj2: --min-voxels 10 leaves Subj2 out.
    launch.main(["--root", str(root), "--cluster", "debug", "--hemispheres", "right", "--rois", "mTL-words",
                 "--wait", "false", "--args", "--min-voxels 10 " + " ".join(FAST.split()[:10])])
    out = capsys.readouterr().out
    assert "submitted 1 cl_model_training.py jobs to debug (in this process)" in out
    assert "logs" not in out and not list((root / "launch_logs").glob("*log*"))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stopped_local_launcher_cancels_its_jobs(root, tmp_path, stop):
    # A long training job (many epochs) runs in a submitit worker; stopping the launcher must end it.
    cmd = [sys.executable, str(REPO / "launch.py"), "--root", str(root), "--cluster", "local", "--subjects", "1",
           "--hemispheres", "left", "--rois", "V1v", "--gpus", "0", "--cpus", "1", "--time", "5",
           "--args", "--weights none --device cpu --image-size 64 --batch-size 64 --epochs 500"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = launch.state_path(root, "launch_logs", "cl_model_training", "Subj1 lh V1v")
    worker = None
    try:
        for _ in range(600):
            record = launch_plan.read_state(state)
            if record.get("state") == "running":
                worker = record["pid"]
                break
            time.sleep(0.1)
        assert worker is not None
        launcher.send_signal(stop)
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 2 and "stopped: cancelled the launched jobs still running" in err
        for _ in range(300):
            if not launch_plan.safe_io.process_alive(worker):
                break
            time.sleep(0.1)
        assert not launch_plan.safe_io.process_alive(worker)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if worker is not None and launch_plan.safe_io.process_alive(worker):
            os.kill(worker, signal.SIGKILL)
