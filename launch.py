"""Run one job per (subject, hemisphere, ROI) of a script, or the whole paper, on SLURM (or here) through submitit.

One script (SCRIPT): cl_model_training.py, reg_model_training.py, pooled_model_training.py
(one job per hemisphere and ROI, pooled over SUBJECTS) and fit_encoding_models.py (one ROI per
job for the tuned methods; one job per subject and hemisphere for the untuned method, whose one
pass serves all its ROIs). Each job imports the script and calls its main() with --root, the
job's subject, hemisphere and ROI(s), then ARGS and everything after `--`:

    python launch.py --script cl_model_training.py --subjects 1 2 --rois V1v EBA -- --epochs 30
    python launch.py --script fit_encoding_models.py --args "--method cl-tuned" --cluster local

The whole paper (PLAN paper): every stage, from the voxel-ROI mappings to the paper's figures,
in dependency order (launch_plan.py), leaving out the jobs whose outputs exist; DRY_RUN prints
the plan, STATUS what is done, failed, missing or running:

    python launch.py --plan paper --dry-run
    python launch.py --plan paper --partition gpu -- --weights imagenet
    python launch.py --plan paper --status

On SLURM all jobs of a script (of a stage) go in one job array (at most ARRAY_PARALLELISM
running at once). ROIs with fewer than MIN_VOXELS voxels (utils.MIN_VOXELS, 1; a
`--min-voxels N` among the jobs' arguments sets it) for a subject and hemisphere get no job.
The pass-through arguments are checked with each script's own options before any job is
submitted. The launcher waits for the jobs, prints one status line per job, and exits
non-zero if any failed; stopped (Ctrl-C, SIGTERM), it cancels its local jobs. submitit is
needed only here: `pip install submitit`.
"""

import argparse
import contextlib
import importlib
import os
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path


import options
import safe_io
import utils

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
PLAN = ""  # '' (one SCRIPT's jobs) or paper (every stage of the paper, in dependency order; see launch_plan.py)
SCRIPT = "cl_model_training.py"  # without PLAN: cl_model_training.py, reg_model_training.py, pooled_model_training.py or fit_encoding_models.py
SUBJECTS: list[int] = []  # subjects; empty means every roi_masks/SubjX (pooled: the subjects pooled over)
HEMISPHERES = ["left", "right"]  # hemispheres
ROIS: list[str] = []  # ROI names; empty means all 31 (ROIs under MIN_VOXELS voxels for a subject and hemisphere are skipped)
ARGS = ""  # more arguments for every job's script, e.g. "--epochs 30 --weights imagenet" (or give them after --); with PLAN, each flag goes to the stages whose script has it
STAGES: list[str] = []  # with PLAN: the stages to run (empty: all; launch_plan.STAGES)
STAGE_ARGS: list[str] = []  # with PLAN: more arguments for one stage's jobs, STAGE=ARGS, e.g. "cl=--batch-size 512"
DRY_RUN = False  # with PLAN: print the jobs, per stage (count, dependencies, estimated hours and disk) and run nothing
STATUS = False  # with PLAN: print what is done, failed, missing or running under ROOT and the command that runs the rest; touches nothing
CLUSTER = "slurm"  # slurm (sbatch job arrays), local (subprocesses on this machine; a PLAN runs one job after another) or debug (in this process, in turn)
PARTITION = ""  # SLURM partition (empty: the cluster's default)
TIME = 240  # minutes per job before it is stopped
GPUS = 1  # GPUs per job (a PLAN's CPU stages, mappings, summaries and figures, get none)
CPUS = 8  # CPUs per job
MEM_GB = 32  # memory per job, GiB
ARRAY_PARALLELISM = 32  # SLURM: at most this many jobs of an array run at once
MAX_ARRAY = 1000  # SLURM: at most this many jobs per array (the cluster's MaxArraySize); a larger stage is split
LOG_FOLDER = "launch_logs"  # submitit's job files and logs, and each job's state (jobs/), under ROOT
WAIT = True  # wait for the jobs and print their status (False: submit and return)
# ---
CHOICES = {"PLAN": ["", "paper"],
           "SCRIPT": ["cl_model_training.py", "reg_model_training.py", "pooled_model_training.py",
                      "fit_encoding_models.py"],
           "HEMISPHERES": utils.HEMISPHERE_NAMES, "ROIS": utils.ROIS, "CLUSTER": ["slurm", "local", "debug"]}
RANGES = {"SUBJECTS": utils.SUBJECT, "HEMISPHERES": utils.HEMISPHERE_LIST, "TIME": options.at_least(1),
          "GPUS": options.at_least(0), "CPUS": options.at_least(1), "MEM_GB": options.at_least(1),
          "ARRAY_PARALLELISM": options.at_least(1), "MAX_ARRAY": options.at_least(1)}

# The flags the launcher sets for each job of one SCRIPT: given again in the pass-through
# arguments, they would run another subject, hemisphere or ROI under every job's name.
PER_JOB_FLAGS = ("--root", "--subj", "--subjects", "--hemisphere", "--hemispheres", "--roi", "--rois", "--shard")


# --- One job ---------------------------------------------------------------------------

def state_path(root, log_folder, group, label):
    """The JSON file recording the state of one job (queued, running, done, failed), under LOG_FOLDER/jobs."""
    name = "".join(c if c.isalnum() or c in "-." else "_" for c in label)
    return Path(root) / log_folder / "jobs" / group / f"{name}.json"


def write_state(path, state, **fields):
    """Record a job's state with the process that writes it (host and pid tell a live job from a killed one)."""
    safe_io.atomic_json_dump({"state": state, "host": socket.gethostname(), "pid": os.getpid(), **fields}, path)


def job_environment():
    """(job id, log file) of the submitit job this process runs, or (None, None) in the launcher's
    own process (the debug executor), which has neither."""
    import submitit
    try:
        env = submitit.JobEnvironment()
        return str(env.job_id), str(env.paths.stderr)
    except (KeyError, RuntimeError):
        return None, None


def run_job(script, argv, state=None):
    """The body of one job: ``script``'s main(argv), in this process; its state is recorded at ``state``
    (running, then done or failed, with the job id and log file).

    The undecorated main is called, so a UserError reaches submitit as the job's error
    (and its log) instead of ending the worker with SystemExit.
    """
    job_id, log = job_environment()
    record = dict(argv=argv, job_id=job_id, log=log)
    if state is not None:
        write_state(state, "running", **record)
    try:
        module = importlib.import_module(Path(script).stem)
        result = module.main.__wrapped__(argv)
    except BaseException as error:
        if state is not None:
            write_state(state, "failed", error=failure_line(error), **record)
        raise
    if state is not None:
        write_state(state, "done", **record)
    return str(result) if isinstance(result, Path) else result


def job_list(root, script, subjects, hemispheres, rois, shared_pass=False, min_voxels=utils.MIN_VOXELS):
    """The (label, argv) of every job, leaving out ROIs with fewer than ``min_voxels`` voxels.

    Parameters
    ----------
    shared_pass : bool, fit_encoding_models.py only: one job per subject and hemisphere
        holding all its ROIs with voxels (the untuned method, whose features are the same for
        every ROI) instead of one job per ROI.
    min_voxels : the jobs' MIN_VOXELS (utils.MIN_VOXELS unless the pass-through arguments set it).

    Returns
    -------
    jobs : list of (str, list of str); the argv holds --root and the job's subject,
        hemisphere and ROI flags, in the script's own option names.
    """
    jobs = []
    for hemi in (utils.hemi_code(h) for h in hemispheres):
        counts = {roi: {s: utils.roi_voxel_count(root, s, hemi, roi) for s in subjects} for roi in rois}
        if script == "fit_encoding_models.py" and shared_pass:
            for s in subjects:
                present = [roi for roi in rois if counts[roi][s] >= min_voxels]
                if present:
                    jobs.append((f"{utils.subj_dir(s)} {hemi} {len(present)} ROIs",
                                 ["--root", str(root), "--subj", str(s), "--hemisphere", hemi, "--rois", *present]))
            continue
        for roi in rois:
            if script == "pooled_model_training.py":
                if any(n >= min_voxels for n in counts[roi].values()):
                    jobs.append((f"{hemi} {roi}", ["--root", str(root), "--hemisphere", hemi, "--roi", roi,
                                                   "--subjects", *map(str, subjects)]))
                continue
            flag = "--rois" if script == "fit_encoding_models.py" else "--roi"
            jobs += [(f"{utils.subj_dir(s)} {hemi} {roi}",
                      ["--root", str(root), "--subj", str(s), "--hemisphere", hemi, flag, roi])
                     for s, n in counts[roi].items() if n >= min_voxels]
    return jobs


def encoding_method(args):
    """The --method among a fit_encoding_models.py job's arguments (its default when absent)."""
    import fit_encoding_models
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--method", default=fit_encoding_models.METHOD)
    return parser.parse_known_args(args)[0].method


# --- The pass-through arguments ---------------------------------------------------------

def split_args(text, flag="--args"):
    """The words of a pass-through argument string, as a shell splits them; an unbalanced quote is a UserError."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise safe_io.UserError(f"{flag} {text!r}: {e}; balance its quotes") from None


def flag_name(word):
    """'--epochs' of '--epochs' or '--epochs=3'."""
    return word.split("=", 1)[0]


def flag_groups(words, where):
    """The pass-through words as [flag, values...] groups; a value before any flag, or a flag given
    twice (the script would keep only the last), is a UserError naming ``where``."""
    groups = []
    for word in words:
        if word.startswith("--"):
            if any(flag_name(g[0]) == flag_name(word) for g in groups):
                raise safe_io.UserError(f"{flag_name(word)} is given twice in {where}: give it once")
            groups.append([word])
        elif not groups:
            raise safe_io.UserError(f"{where}: {word!r} comes before any --flag; give the jobs' options as --flag VALUE")
        else:
            groups[-1].append(word)
    return groups


def refuse_per_job_flags(groups, per_job, where):
    """A UserError for a flag among the pass-through arguments that the launcher sets for each job."""
    for group in groups:
        if flag_name(group[0]) in per_job:
            raise safe_io.UserError(f"{flag_name(group[0])} in {where} would be given to every job, whose own "
                                    f"{flag_name(group[0])} the launcher sets: use the launcher's --subjects, "
                                    "--hemispheres and --rois instead")


def pass_through(opts, argv):
    """The jobs' pass-through words: ARGS then everything after `--`, checked (quotes, repeated flags,
    ARGS given twice)."""
    head = argv[:argv.index("--")] if "--" in argv else argv
    if sum(flag_name(word) == "--args" for word in head) > 1:
        raise safe_io.UserError("--args is given twice: give all the jobs' arguments in one --args (or after --)")
    words = split_args(opts.ARGS) + (argv[argv.index("--") + 1:] if "--" in argv else [])
    flag_groups(words, "the jobs' arguments (--args and after --)")
    return words


def min_voxels_of(words, default=utils.MIN_VOXELS):
    """The MIN_VOXELS the jobs run with: a --min-voxels among their arguments, else ``default``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--min-voxels", type=int, default=default)
    return parser.parse_known_args(words)[0].min_voxels


def check_job_args(script, argv):
    """Parse one job's argv with the script's own options, so a bad value stops the launcher before any
    job is submitted (not in every job); returns the parsed options."""
    try:
        return options.parse_options(importlib.import_module(Path(script).stem), argv)
    except safe_io.UserError as e:
        raise safe_io.UserError(f"{script} would refuse its jobs' arguments: {e}") from None


# --- Submitting and waiting -------------------------------------------------------------

def submitit_module(cluster):
    """submitit, after checking that it is installed and, for ``cluster`` slurm, that SLURM is here."""
    try:
        import submitit
    except ImportError:
        raise safe_io.UserError("launch.py needs submitit, which is not installed: pip install submitit") from None
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise safe_io.UserError("--cluster slurm, but SLURM's sbatch is not on this machine's PATH: run on the "
                                "cluster's login node, or use --cluster local (jobs here) or debug (in this process)")
    return submitit


def executor(opts, name, n_jobs, gpus=None, dependency=None):
    """A submitit AutoExecutor for CLUSTER with the job resources of ``opts`` (``gpus``: GPUS unless given),
    named ``name``, held until the SLURM jobs ``dependency`` (ids) have finished well."""
    submitit = submitit_module(opts.CLUSTER)
    ex = submitit.AutoExecutor(folder=Path(opts.ROOT) / opts.LOG_FOLDER, cluster=opts.CLUSTER)
    # Jobs import the scripts by name wherever they start. Local jobs inherit this process's
    # environment: a setup line would start them under a shell, which does not pass on the
    # signal that cancels them.
    here = str(Path(__file__).resolve().parent)
    if here not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    setup = [f"export PYTHONPATH={shlex.quote(here)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    params = dict(name=name, timeout_min=opts.TIME, gpus_per_node=opts.GPUS if gpus is None else gpus,
                  cpus_per_task=opts.CPUS, mem_gb=opts.MEM_GB, tasks_per_node=1, nodes=1,
                  slurm_array_parallelism=min(opts.ARRAY_PARALLELISM, n_jobs), slurm_setup=setup)
    if dependency:
        # A job whose inputs failed is cancelled rather than left pending forever.
        params.update(slurm_dependency="afterok:" + ":".join(sorted(set(dependency))),
                      slurm_additional_parameters={"kill-on-invalid-dep": "yes"})
    if opts.PARTITION:
        params["slurm_partition"] = opts.PARTITION
    ex.update_parameters(**params)
    return ex


def where_logs(opts):
    """' (logs: FOLDER)', or for the debug executor, which writes no logs, ' (in this process)'."""
    return " (in this process)" if opts.CLUSTER == "debug" else f" (logs: {Path(opts.ROOT) / opts.LOG_FOLDER})"


def submit(ex, jobs, states):
    """Submit (script, argv) ``jobs`` as one array; each job's state file says 'queued' until the job starts."""
    for (_, argv), state in zip(jobs, states):
        write_state(state, "queued", argv=argv, cluster=ex.cluster)
    with ex.batch():
        return [ex.submit(run_job, script, argv, str(state)) for (script, argv), state in zip(jobs, states)]


class Stopped(Exception):
    """The launcher received SIGTERM."""


@contextlib.contextmanager
def cancel_on_stop(jobs, cluster):
    """While waiting: Ctrl-C or SIGTERM cancels ``jobs`` (a list, filled as they are submitted) that run
    here (local), then ends the launcher with a UserError. SLURM jobs outlive their launcher, as sbatch jobs do."""
    def stop(signum, frame):
        raise Stopped
    previous = signal.signal(signal.SIGTERM, stop) if cluster == "local" else None
    try:
        yield
    except (KeyboardInterrupt, Stopped):
        if cluster != "local":
            raise
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
        raise safe_io.UserError(f"stopped: cancelled the launched jobs still running; launch again to resume") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def report(job, label):
    """Wait for one job and print its status line; returns whether it failed."""
    error = job.exception()
    if error is None:
        result = job.result()
        options.say(f"{job.job_id:>14}  {label:22} done" + (f": {result}" if isinstance(result, str) else ""))
        return False
    options.say(f"{job.job_id:>14}  {label:22} FAILED: {failure_line(error)}")
    return True


def failure_line(error):
    """One line saying why a job failed, e.g. 'UserError: ROI ... is empty ...'.

    submitit's FailedJobError (local and SLURM jobs) holds the job's traceback, whose last
    line names the error; a debug job's error is the exception itself.
    """
    text = str(error)
    if "\n----------------------\n" in text:
        lines = [line.strip() for line in text.split("\n----------------------\n")[1].splitlines() if line.strip()]
        return lines[-1] if lines else type(error).__name__
    return f"{type(error).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


@options.cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = options.parse_options(sys.modules[__name__], argv[:argv.index("--")] if "--" in argv else argv)
    words = pass_through(opts, argv)
    if opts.PLAN:
        import launch_plan
        return launch_plan.main(opts, words, argv)
    if opts.STAGES or opts.STAGE_ARGS or opts.DRY_RUN or opts.STATUS:
        raise safe_io.UserError("--stages, --stage-args, --dry-run and --status belong to a plan: add --plan paper")
    refuse_per_job_flags(flag_groups(words, "the jobs' arguments"), PER_JOB_FLAGS, "the jobs' arguments")
    subjects = opts.SUBJECTS or utils.find_subjects(opts.ROOT)
    rois = opts.ROIS or utils.ROIS
    shared_pass = opts.SCRIPT == "fit_encoding_models.py" and encoding_method(words) == "untuned"
    min_voxels = min_voxels_of(words)
    jobs = job_list(opts.ROOT, opts.SCRIPT, subjects, opts.HEMISPHERES, rois, shared_pass, min_voxels)
    if not jobs:
        raise safe_io.UserError(f"no job to run: the ROIs {', '.join(rois)} have fewer than {min_voxels} voxels "
                                f"for subjects {subjects} in {', '.join(opts.HEMISPHERES)}; choose other ROIs or subjects")
    for _, job_argv in jobs:
        check_job_args(opts.SCRIPT, job_argv + words)
    ex = executor(opts, Path(opts.SCRIPT).stem, len(jobs))
    states = [state_path(opts.ROOT, opts.LOG_FOLDER, Path(opts.SCRIPT).stem, label) for label, _ in jobs]
    submitted = submit(ex, [(opts.SCRIPT, job_argv + words) for _, job_argv in jobs], states)
    print(f"submitted {len(submitted)} {opts.SCRIPT} jobs to {opts.CLUSTER}{where_logs(opts)}")
    if not opts.WAIT:
        return submitted
    with cancel_on_stop(submitted, opts.CLUSTER):
        failed = sum(report(job, label) for (label, _), job in options.progress(list(zip(jobs, submitted)), "jobs"))
    if failed:
        raise safe_io.UserError(f"{failed} of {len(jobs)} {opts.SCRIPT} jobs failed: see the lines above and "
                                f"their logs in {Path(opts.ROOT) / opts.LOG_FOLDER}")
    return submitted


if __name__ == "__main__":
    main()
