"""launch.py --plan paper: the whole paper in dependency order, resumed after a failure; the dry-run's
job counts on the real masks; the SLURM arrays and their dependencies (submitit's mocked SLURM);
a stopped local launcher cancels its jobs; bad launcher input is one line."""

import hashlib
import json
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
