"""The whole paper as one plan of jobs for launch.py (``--plan paper``): the stages, their jobs and
dependencies, which jobs are done, and the status view.

Launcher code, like launch.py: it imports the scripts it runs, to parse each job's arguments
with the script's own options and to ask the script what it has left to do. A job of a stage
that makes models or encoding results is done when its script would skip all of it
(models.checkpoint_done, fit_encoding_models.pending, ...: the scripts' own checks, which
also refuse outputs made with other settings). The analysis stages (probes, MI bounds,
embeddings, summaries, figures) are done when their job of the plan finished after every
stage they need was complete; their scripts skip finished ROIs anyway. Each job's state
(queued, running, done, failed, with its log) is recorded under LOG_FOLDER/jobs/.
"""

import contextlib
import importlib
import io
import json
import shlex
import socket
import sys
from pathlib import Path
from typing import NamedTuple

import launch
import options
import safe_io
import utils


class Stage(NamedTuple):
    """One stage of the plan: its script, the stages it needs, whether its jobs need a GPU, what it does,
    how its done jobs are told ('outputs': the script's own check; 'finished': the plan's record),
    and, per job, the estimated hours on the development machine's CPU and the disk it writes (GB)."""
    script: str
    needs: tuple
    gpu: bool
    what: str
    done_by: str
    hours: float | None
    disk_gb: float


# Per-job figures measured at full size (9841 images, 224 px, real Subj1 lh masks) on the development
# machine, 2 CPU cores, no GPU (docs/speed.md, "Full-scale figures"): untuned encoding of a
# subject-hemisphere 85 min, a tuned ROI's encoding 75.5 min, a CL epoch 2.5 min (regression alike,
# pooled once per subject); disk from docs/cluster.md (mean checkpoint per job). None: not measured.
CPU_MACHINE = "the development machine's 2-core CPU (docs/speed.md); no GPU figure is measured yet"
STAGES = {
    "mappings": Stage("generate_voxel_roi_mappings.py", (), False, "voxel-ROI mappings of every subject",
                      "outputs", None, 0.0),
    "untuned": Stage("fit_encoding_models.py", (), True, "untuned encoding, per subject and hemisphere",
                     "outputs", 85 / 60, 0.01),
    "cl": Stage("cl_model_training.py", (), True, "CL training, per subject, hemisphere and ROI",
                "outputs", 30 * 2.5 / 60, 0.28),
    "reg": Stage("reg_model_training.py", (), True, "regression training, per subject, hemisphere and ROI",
                 "outputs", 75 * 2.5 / 60, 0.25),
    "pooled": Stage("pooled_model_training.py", (), True, "pooled CL training (h avg and const), per hemisphere and ROI",
                    "outputs", 30 * 2.5 * 8 / 60, 0.59),
    "tuned": Stage("fit_encoding_models.py", ("cl", "reg", "pooled"), True,
                   "encoding of the four tuned methods, per subject, hemisphere and ROI", "outputs", 75.5 / 60, 0.002),
    "transfer": Stage("fit_encoding_models.py", ("untuned", "cl"), True,
                      "cross-subject CL transfer (per-method and untuned-layer), per subject pair and hemisphere",
                      "outputs", None, 0.05),
    "nod": Stage("fit_encoding_models_nod.py", ("cl", "reg", "pooled"), True, "transfer to NOD (when ROOT/nod exists)",
                 "outputs", None, 0.01),
    "mi": Stage("generate_results.py", ("cl", "pooled"), True, "MI lower bounds, per subject; pooled ones",
                "finished", None, 0.0),
    "probes": Stage("generate_results.py", ("cl", "reg", "pooled"), True,
                    "classification probes on each dataset under ROOT/datasets", "finished", None, 0.01),
    "embeddings": Stage("generate_results.py", ("cl", "reg"), True, "embeddings and test fMRI, per subject",
                        "finished", None, 0.01),
    "summaries": Stage("generate_results.py", ("untuned", "tuned", "transfer"), False,
                       "encoding summaries and the transfer matrices", "finished", None, 0.0),
    "compare": Stage("generate_results.py", ("summaries",), False,
                     "your results against the published ones (when ROOT's masks are the Algonauts ones)",
                     "finished", None, 0.0),
    "figures": Stage("generate_results.py", ("summaries", "nod", "mi", "probes", "embeddings"), False,
                     "voxel counts, probe and MI heatmaps, the paper's figures (landscapes included)",
                     "finished", None, 0.05),
}
# Flags the plan sets for each job: in --args or --stage-args they would change every job's work.
PER_JOB_FLAGS = launch.PER_JOB_FLAGS + ("--method", "--type", "--model-subj", "--protocol", "--h-method")
TUNED = ("cl-tuned", "reg-tuned", "pooled-avg", "pooled-const")


class Job(NamedTuple):
    stage: str
    label: str
    argv: list  # the script's whole argv, pass-through arguments included


class Layout(NamedTuple):
    """What the plan covers: root, subjects, hemisphere codes, and the ROIs present (at least MIN_VOXELS
    voxels) in each (subject, hemisphere)."""
    root: str
    subjects: list
    hemis: list
    present: dict


def layout(opts, min_voxels):
    subjects = opts.SUBJECTS or utils.find_subjects(opts.ROOT)
    hemis = [utils.hemi_code(h) for h in opts.HEMISPHERES]
    rois = opts.ROIS or utils.ROIS
    present = {(s, h): [roi for roi in rois if utils.roi_voxel_count(opts.ROOT, s, h, roi) >= min_voxels]
               for s in subjects for h in hemis}
    return Layout(str(opts.ROOT), subjects, hemis, present)


def datasets(root):
    """The classification datasets present under ROOT/datasets."""
    return [name for name in utils.CLASSIFICATION_DATASETS if (Path(root) / "datasets" / name).is_dir()]


def stage_jobs(name, lay, stages=tuple(STAGES)):
    """The (label, argv without --root and pass-through) of every job of one stage (the transfer
    matrices only when the transfer stage is among ``stages``, the stages planned)."""
    subjects, hemis, present = lay.subjects, lay.hemis, lay.present
    per_roi = [(s, h, roi) for s in subjects for h in hemis for roi in present[(s, h)]]
    everyone = ["--subjects", *map(str, subjects)]
    if name == "mappings":
        return [("all subjects", everyone)]
    if name == "untuned":
        return [(f"{utils.subj_dir(s)} {h}", ["--subj", str(s), "--hemisphere", h, "--method", "untuned",
                                             "--rois", *present[(s, h)]]) for s in subjects for h in hemis if present[(s, h)]]
    if name in ("cl", "reg"):
        return [(f"{utils.subj_dir(s)} {h} {roi}", ["--subj", str(s), "--hemisphere", h, "--roi", roi])
                for s, h, roi in per_roi]
    if name == "pooled":
        return [(f"{h} {roi} h{m}", ["--hemisphere", h, "--roi", roi, "--h-method", m, *everyone])
                for h in hemis for roi in utils.ROIS if any(roi in present[(s, h)] for s in subjects)
                for m in ("avg", "const")]
    if name == "tuned":
        return [(f"{utils.subj_dir(s)} {h} {roi} {m}", ["--subj", str(s), "--hemisphere", h, "--method", m, "--rois", roi])
                for m in TUNED for s, h, roi in per_roi]
    if name == "transfer":
        # The untuned-layer matrices' diagonal is the subject's own model at the untuned layer (the
        # per-method one is the tuned stage's result).
        return [(f"{utils.subj_dir(t)} from {utils.subj_dir(m)} {h} {p}",
                 ["--subj", str(t), "--model-subj", str(m), "--hemisphere", h, "--method", "cl-tuned", "--protocol", p,
                  "--rois", *common])
                for p in utils.PROTOCOLS for t in subjects for m in subjects if m != t or p == "untuned-layer"
                for h in hemis for common in [[roi for roi in present[(t, h)] if roi in present[(m, h)]]] if common]
    if name == "nod":
        return [("NOD", [])] if (Path(lay.root) / "nod").is_dir() else []
    hemispheres = ["--hemispheres", *hemis]
    if name == "mi":
        return ([(f"{utils.subj_dir(s)} cl-tuned", ["--type", "lower-bound-mi", "--subjects", str(s), *hemispheres])
                 for s in subjects]
                + [(m, ["--type", f"lower-bound-mi-{m}", *everyone, *hemispheres]) for m in TUNED[2:]])
    if name == "probes":
        return [(f"{d} {label}", ["--type", kind, "--dataset", d, *args, *hemispheres]) for d in datasets(lay.root)
                for label, kind, args in
                [(f"{utils.subj_dir(s)} {m}", "classification-task", ["--method", m, "--subjects", str(s)])
                 for m in TUNED[:2] for s in subjects]
                + [(m, f"classification-task-{m}", everyone) for m in TUNED[2:]]]
    if name == "embeddings":
        return ([(f"{utils.subj_dir(s)} {m}", ["--type", "save-embeddings", "--method", m, "--subjects", str(s),
                                               *hemispheres]) for m in ("untuned",) + TUNED[:2] for s in subjects]
                + [("test fMRI", ["--type", "save-test-fmri-responses", *everyone, *hemispheres])])
    if name == "summaries":
        return [("summaries", ["--type", "summaries", *everyone]),
                *[(f"transfer matrix {p}", ["--type", "transfer-matrix", "--method", "cl-tuned", "--protocol", p,
                                            *everyone, *hemispheres]) for p in utils.PROTOCOLS if "transfer" in stages]]
    if name == "compare":
        return [("compare-published", ["--type", "compare-published", *everyone])] if published_masks(lay) else []
    if name == "figures":
        return ([("voxel counts", ["--type", "voxel-counts", *everyone])]
                + [(f"{d} {m} heatmaps", ["--type", "figures", "--dataset", d, "--method", m])
                   for d in datasets(lay.root) for m in ("cl-tuned", "pooled-avg")]
                + [("paper figures", ["--type", "paper-figures", *everyone])])
    raise KeyError(name)


def published_masks(lay):
    """Whether ROOT's masks are the ones of the authors' published results (same voxel count in every
    subject, hemisphere and ROI they hold): the comparison means nothing with other masks."""
    import published_results
    counts = published_results.voxel_counts()
    counts = counts[counts["subject"].isin(lay.subjects) & (counts["n_voxels"] > 0)]  # 0: not published
    return len(counts) > 0 and all(utils.roi_voxel_count(lay.root, row.subject, row.hemisphere, row.roi) == row.n_voxels
                                   for row in counts.itertuples())


# --- Pass-through arguments -------------------------------------------------------------

def stage_args(opts, words, stages):
    """{stage: the pass-through words of its jobs}: each flag of ``words`` (--args and after --) goes to
    the stages whose script has it (a flag that no stage's script has is a UserError), then the stage's
    own STAGE_ARGS ('stage=ARGS'). A flag the plan sets per job is refused."""
    groups = launch.flag_groups(words, "the jobs' arguments (--args and after --)")
    launch.refuse_per_job_flags(groups, PER_JOB_FLAGS, "the jobs' arguments")
    known = {name: options.flags(script_module(STAGES[name].script)) for name in stages}
    for group in groups:
        if not any(launch.flag_name(group[0]) in flags for flags in known.values()):
            raise safe_io.UserError(f"{launch.flag_name(group[0])} in the jobs' arguments is an option of no script "
                                    f"of the stages {', '.join(stages)}: check its spelling in each script's --help")
    out = {name: [w for g in groups if launch.flag_name(g[0]) in known[name] for w in g] for name in stages}
    for item in opts.STAGE_ARGS:
        name, sep, text = item.partition("=")
        if not sep or name not in STAGES:
            raise safe_io.UserError(f"--stage-args {item!r}: write STAGE=ARGS with STAGE one of {', '.join(STAGES)}")
        own = launch.split_args(text, f"--stage-args {name}=")
        own_groups = launch.flag_groups(own, f"--stage-args {name}=")
        launch.refuse_per_job_flags(own_groups, PER_JOB_FLAGS, f"--stage-args {name}=")
        if name in out:
            # The stage's own value of a flag replaces the common one.
            mine = {launch.flag_name(g[0]) for g in own_groups}
            out[name] = [w for g in launch.flag_groups(out[name], name) if launch.flag_name(g[0]) not in mine
                         for w in g] + own
    return out


def script_module(script):
    """The module of a script, e.g. fit_encoding_models of 'fit_encoding_models.py'."""
    return importlib.import_module(Path(script).stem)


# --- Building the plan and telling what is done -----------------------------------------

def build(opts, words):
    """Every job of the chosen stages, with its parsed options (each job's argv checked by its script's options).

    Returns
    -------
    stages : list of stage names, in dependency order.
    jobs : {stage: [(Job, opts)]}.
    """
    stages = opts.STAGES or list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise safe_io.UserError(f"--stages {' '.join(unknown)}: allowed {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    extra = stage_args(opts, words, stages)
    lay = layout(opts, launch.min_voxels_of(words))
    jobs = {}
    for name in stages:
        script = STAGES[name].script
        jobs[name] = [(Job(name, label, argv), launch.check_job_args(script, argv))
                      for label, own in stage_jobs(name, lay, stages) for argv in [["--root", lay.root, *own, *extra[name]]]]
    return stages, jobs


def outputs_done(name, job_opts):
    """Whether the script of stage ``name`` would find nothing left to do (its own checks)."""
    if name == "mappings":
        return not script_module("generate_voxel_roi_mappings.py").pending(job_opts)
    if name in ("cl", "reg", "pooled"):
        import models
        method = {"cl": "cl-tuned", "reg": "reg-tuned", "pooled": f"pooled-{getattr(job_opts, 'H_METHOD', '')}"}[name]
        return models.checkpoint_done(job_opts, job_opts.ROI, method)
    if name in ("untuned", "tuned", "transfer"):
        return not script_module("fit_encoding_models.py").pending(job_opts)
    if name == "nod":
        todo = script_module("fit_encoding_models_nod.py").todo_results(job_opts)
        return not any(rois for areas in todo.values() for rois in areas.values())
    raise KeyError(name)


def read_state(path):
    """A job's recorded state, or {} (none, or unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def alive(record):
    """Whether the process of a queued or running record may still run: on this host, its pid (the job's,
    or the local launcher's while queued) exists; a SLURM job, or one on another host, cannot be told from
    here, so it counts as alive."""
    if record.get("cluster") == "slurm" or record.get("host") != socket.gethostname():
        return True
    return isinstance(record.get("pid"), int) and safe_io.process_alive(record["pid"])


def states(opts, stages, jobs):
    """{stage: [(job, state)]}, state one of done, failed, running, missing (the job's record kept in
    ``record``). Quiet: the scripts' skip lines are swallowed."""
    out, complete = {}, {}
    for name in stages:
        rows = []
        for job, job_opts in jobs[name]:
            path = launch.state_path(opts.ROOT, opts.LOG_FOLDER, name, job.label)
            record = read_state(path)
            if STAGES[name].done_by == "outputs":
                with contextlib.redirect_stdout(io.StringIO()):
                    done = outputs_done(name, job_opts)
            else:
                needs_done = all(complete.get(n, True) for n in STAGES[name].needs)
                done = needs_done and record.get("state") == "done" and record.get("argv") == job.argv
            if done:
                state = "done"
            elif record.get("state") == "failed" and record.get("argv") == job.argv:
                state = "failed"
            elif record.get("state") in ("queued", "running") and record.get("argv") == job.argv and alive(record):
                state = "running"
            else:
                state = "missing"
            rows.append((job, state, record, path))
        complete[name] = all(state == "done" for _, state, _, _ in rows)
        out[name] = rows
    return out


# --- The three views: dry run, status, run ---------------------------------------------

def rerun_command(argv):
    """The one command that runs what is missing: this plan again, without --status."""
    return "python launch.py " + " ".join(shlex.quote(w) for w in argv if w != "--status")


def job_hours(stage, job):
    """Estimated hours of one job: the stage's per-job figure; a transfer job fits its ROIs one pass each,
    at the figure of a tuned ROI."""
    if stage != "transfer":
        return STAGES[stage].hours
    after = job.argv[job.argv.index("--rois") + 1:]
    return STAGES["tuned"].hours * next((i for i, w in enumerate(after) if w.startswith("--")), len(after))


def print_dry_run(stages, table):
    print(f"{'stage':11} {'jobs':>6} {'to run':>7}  {'needs':34} {'GPU':3}  {'hours':>8}  {'disk GB':>8}  what")
    total_h, total_gb = 0.0, 0.0
    for name in stages:
        st, rows = STAGES[name], table[name]
        todo = [job for job, state, _, _ in rows if state != "done"]
        measured = st.hours is not None or name == "transfer"
        h = sum(job_hours(name, job) for job in todo) if measured else 0.0
        gb = len(todo) * st.disk_gb
        total_h += h
        total_gb += gb
        print(f"{name:11} {len(rows):6d} {len(todo):7d}  {','.join(st.needs) or '-':34} {'yes' if st.gpu else 'no':3}  "
              f"{f'{h:8.0f}' if measured else '       ?'}  {gb:8.1f}  {st.what}")
    print(f"estimated: {total_h:.0f} hours of the measured stages, {total_gb:.0f} GB of new outputs; estimates from "
          f"per-job figures measured at full size on {CPU_MACHINE}; '?' is not measured; a GPU is much faster")


def print_status(stages, table, command):
    print(f"{'stage':11} {'done':>6} {'failed':>7} {'missing':>8} {'running':>8}")
    failed = []
    for name in stages:
        counts = {k: 0 for k in ("done", "failed", "missing", "running")}
        for job, state, record, _ in table[name]:
            counts[state] += 1
            if state == "failed":
                failed.append(f"  {name} {job.label}: {record.get('error', '')} (log: {record.get('log') or 'none'})")
        print(f"{name:11} {counts['done']:6d} {counts['failed']:7d} {counts['missing']:8d} {counts['running']:8d}")
    if failed:
        print("failed jobs:\n" + "\n".join(failed))
    if any(state in ("failed", "missing") for name in stages for _, state, _, _ in table[name]):
        print(f"to run what is missing or failed: {command}")
    else:
        print("nothing is missing")


def main(opts, words, argv=None):
    """Build the plan, then print it (DRY_RUN), its status (STATUS) or run what is not done.

    Returns
    -------
    {stage: [labels of the jobs submitted]} (empty for DRY_RUN and STATUS).
    """
    stages, jobs = build(opts, words)
    table = states(opts, stages, jobs)
    command = rerun_command(sys.argv[1:] if argv is None else argv)
    if opts.DRY_RUN:
        print_dry_run(stages, table)
        return {}
    if opts.STATUS:
        print_status(stages, table, command)
        return {}
    return run(opts, stages, table)


def run(opts, stages, table):
    """Run every job of the plan that is not done: on SLURM one array per stage (split at MAX_ARRAY), held
    by dependencies on the arrays of the stages it needs; locally one job after another in stage order,
    holding back the stages that need a stage with a failed job. Returns {stage: [labels of the jobs run]}."""
    running = sum(state == "running" for name in stages for _, state, _, _ in table[name])
    if running:
        raise safe_io.UserError(f"{running} jobs of this plan are still queued or running (see --status): wait for "
                                "them (or cancel them) before launching the plan again, so that no job runs twice")
    pending = {name: [(job, path) for job, state, _, path in table[name] if state != "done"] for name in stages}
    for name in stages:
        for _, path in pending[name] if STAGES[name].done_by == "finished" else []:
            path.unlink(missing_ok=True)  # a finished record of an earlier run must not count once its inputs change
    if opts.CLUSTER == "slurm":
        return submit_arrays(opts, stages, pending)
    return run_in_turn(opts, stages, pending)


def submit_arrays(opts, stages, pending):
    """Submit each stage's ``pending`` (job, state path) as SLURM arrays held by the arrays of the stages it needs."""
    ids = {}
    for name in stages:
        ids[name] = []
        todo = pending[name]
        if not todo:
            continue
        needs = [i for n in STAGES[name].needs for i in ids.get(n, [])]
        for start in range(0, len(todo), opts.MAX_ARRAY):
            chunk = todo[start:start + opts.MAX_ARRAY]
            ex = launch.executor(opts, f"paper-{name}", len(chunk), None if STAGES[name].gpu else 0, needs)
            jobs = launch.submit(ex, [(STAGES[name].script, job.argv) for job, _ in chunk], [p for _, p in chunk])
            ids[name] += [str(j.job_id).split("_")[0] for j in jobs[:1]]
        waits = [n for n in STAGES[name].needs if ids.get(n)]
        print(f"submitted {len(todo)} {name} jobs to slurm" + (f", held until {', '.join(waits)} finish" if waits else ""))
    print(f"logs and job states under {Path(opts.ROOT) / opts.LOG_FOLDER}; see them with "
          f"python launch.py --plan paper --status --root {shlex.quote(str(opts.ROOT))}")
    return {name: [job.label for job, _ in pending[name]] for name in stages if pending[name]}


def run_in_turn(opts, stages, pending):
    """Run each stage's ``pending`` (job, state path) here, one job after another (local or debug executor)."""
    ran, failed, blocked = {}, [], set()
    submitted = []
    with launch.cancel_on_stop(submitted, opts.CLUSTER):
        for name in stages:
            if not pending[name]:
                continue
            if blocked & set(STAGES[name].needs):
                print(f"{name}: not run, it needs {', '.join(sorted(blocked & set(STAGES[name].needs)))}, "
                      "which did not finish")
                blocked.add(name)
                continue
            print(f"{name}: {len(pending[name])} jobs, one after another{launch.where_logs(opts)}")
            for job, path in pending[name]:
                ex = launch.executor(opts, f"paper-{name}", 1, None if STAGES[name].gpu else 0)
                (handle,) = launch.submit(ex, [(STAGES[name].script, job.argv)], [path])
                submitted.append(handle)
                ran.setdefault(name, []).append(job.label)
                if launch.report(handle, f"{name} {job.label}"):
                    failed.append(f"{name} {job.label}")
                    blocked.add(name)
    if failed:
        raise safe_io.UserError(f"{len(failed)} job(s) failed ({failed[0]}, ...): see the lines above; launch the "
                                "same command again to run what is missing")
    return ran
