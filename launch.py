"""Run one job per (subject, hemisphere, ROI) of a script on SLURM (or here) through submitit.

Scripts: cl_model_training.py, reg_model_training.py, pooled_model_training.py (one job
per hemisphere and ROI, pooled over SUBJECTS) and fit_encoding_models.py (one ROI per job
for the tuned methods; one job per subject and hemisphere for the untuned method, whose one
pass serves all its ROIs). Each job imports the script and calls its main() with --root,
the job's subject, hemisphere and ROI(s), then ARGS and everything after `--`:

    python launch.py --script cl_model_training.py --subjects 1 2 --rois V1v EBA -- --epochs 30
    python launch.py --script fit_encoding_models.py --args "--method cl-tuned" --cluster local

On SLURM all jobs go in one job array (at most ARRAY_PARALLELISM running at once).
ROIs with fewer than utils.MIN_VOXELS (20) voxels for a subject and hemisphere get no job.
The launcher waits for the jobs, prints one status line per job, and exits non-zero if any
failed. submitit is needed only here: `pip install submitit`.
"""

import argparse
import importlib
import shlex
import sys
from pathlib import Path

from tqdm.auto import tqdm

import options
import safe_io
import utils

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
SCRIPT = "cl_model_training.py"  # cl_model_training.py, reg_model_training.py, pooled_model_training.py or fit_encoding_models.py
SUBJECTS: list[int] = []  # subjects; empty means every roi_masks/SubjX (pooled: the subjects pooled over)
HEMISPHERES = ["left", "right"]  # hemispheres
ROIS: list[str] = []  # ROI names; empty means all 31 (ROIs under MIN_VOXELS = 20 voxels for a subject and hemisphere are skipped)
ARGS = ""  # more arguments for every job's script, e.g. "--epochs 30 --weights imagenet" (or give them after --)
CLUSTER = "slurm"  # slurm (sbatch job array), local (subprocesses on this machine) or debug (in this process, in turn)
PARTITION = ""  # SLURM partition (empty: the cluster's default)
TIME = 240  # minutes per job before it is stopped
GPUS = 1  # GPUs per job
CPUS = 8  # CPUs per job
MEM_GB = 32  # memory per job, GiB
ARRAY_PARALLELISM = 32  # SLURM: at most this many jobs of the array run at once
LOG_FOLDER = "launch_logs"  # submitit's job files and logs, under ROOT
WAIT = True  # wait for the jobs and print their status (False: submit and return)
# ---
CHOICES = {"SCRIPT": ["cl_model_training.py", "reg_model_training.py", "pooled_model_training.py",
                      "fit_encoding_models.py"],
           "HEMISPHERES": utils.HEMISPHERE_NAMES, "ROIS": utils.ROIS, "CLUSTER": ["slurm", "local", "debug"]}
RANGES = {"SUBJECTS": utils.SUBJECT, "TIME": options.at_least(1), "GPUS": options.at_least(0), "CPUS": options.at_least(1),
          "MEM_GB": options.at_least(1), "ARRAY_PARALLELISM": options.at_least(1)}


def run_job(script, argv):
    """The body of one job: ``script``'s main(argv), in this process.

    The undecorated main is called, so a UserError reaches submitit as the job's error
    (and its log) instead of ending the worker with SystemExit.
    """
    module = importlib.import_module(Path(script).stem)
    result = module.main.__wrapped__(argv)
    return str(result) if isinstance(result, Path) else result


def job_list(root, script, subjects, hemispheres, rois, shared_pass=False):
    """The (label, argv) of every job, leaving out ROIs with fewer than utils.MIN_VOXELS voxels.

    Parameters
    ----------
    shared_pass : bool, fit_encoding_models.py only: one job per subject and hemisphere
        holding all its non-empty ROIs (the untuned method, whose features are the same for
        every ROI) instead of one job per ROI.

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
                present = [roi for roi in rois if counts[roi][s] >= utils.MIN_VOXELS]
                if present:
                    jobs.append((f"{utils.subj_dir(s)} {hemi} {len(present)} ROIs",
                                 ["--root", str(root), "--subj", str(s), "--hemisphere", hemi, "--rois", *present]))
            continue
        for roi in rois:
            if script == "pooled_model_training.py":
                if any(n >= utils.MIN_VOXELS for n in counts[roi].values()):
                    jobs.append((f"{hemi} {roi}", ["--root", str(root), "--hemisphere", hemi, "--roi", roi,
                                                   "--subjects", *map(str, subjects)]))
                continue
            flag = "--rois" if script == "fit_encoding_models.py" else "--roi"
            jobs += [(f"{utils.subj_dir(s)} {hemi} {roi}",
                      ["--root", str(root), "--subj", str(s), "--hemisphere", hemi, flag, roi])
                     for s, n in counts[roi].items() if n >= utils.MIN_VOXELS]
    return jobs


def encoding_method(args):
    """The --method among a fit_encoding_models.py job's arguments (its default when absent)."""
    import fit_encoding_models
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--method", default=fit_encoding_models.METHOD)
    return parser.parse_known_args(args)[0].method


def executor(opts, n_jobs):
    """A submitit AutoExecutor for CLUSTER with the job resources of ``opts``."""
    try:
        import submitit
    except ImportError:
        raise safe_io.UserError("launch.py needs submitit, which is not installed: pip install submitit") from None
    ex = submitit.AutoExecutor(folder=Path(opts.ROOT) / opts.LOG_FOLDER, cluster=opts.CLUSTER)
    # Jobs import the scripts by name wherever they start.
    setup = [f"export PYTHONPATH={shlex.quote(str(Path(__file__).resolve().parent))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    params = dict(name=Path(opts.SCRIPT).stem, timeout_min=opts.TIME, gpus_per_node=opts.GPUS,
                  cpus_per_task=opts.CPUS, mem_gb=opts.MEM_GB, tasks_per_node=1, nodes=1,
                  slurm_array_parallelism=min(opts.ARRAY_PARALLELISM, n_jobs), slurm_setup=setup, local_setup=setup)
    if opts.PARTITION:
        params["slurm_partition"] = opts.PARTITION
    ex.update_parameters(**params)
    return ex


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
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = options.parse_options(sys.modules[__name__], argv[:argv.index("--")] if "--" in argv else argv)
    subjects = opts.SUBJECTS or utils.find_subjects(opts.ROOT)
    rois = opts.ROIS or utils.ROIS
    extra = shlex.split(opts.ARGS) + extra
    shared_pass = opts.SCRIPT == "fit_encoding_models.py" and encoding_method(extra) == "untuned"
    jobs = job_list(opts.ROOT, opts.SCRIPT, subjects, opts.HEMISPHERES, rois, shared_pass)
    if not jobs:
        raise safe_io.UserError(f"no job to run: the ROIs {', '.join(rois)} have fewer than {utils.MIN_VOXELS} voxels "
                              f"for subjects {subjects} in {', '.join(opts.HEMISPHERES)}; choose other ROIs or subjects")
    ex = executor(opts, len(jobs))
    with ex.batch():
        submitted = [ex.submit(run_job, opts.SCRIPT, job_argv + extra) for _, job_argv in jobs]
    print(f"submitted {len(submitted)} {opts.SCRIPT} jobs to {opts.CLUSTER} (logs: {ex.folder})")
    if not opts.WAIT:
        return submitted
    failed = 0
    for (label, _), job in tqdm(list(zip(jobs, submitted)), desc="jobs"):
        error = job.exception()
        if error is None:
            result = job.result()
            tqdm.write(f"{job.job_id:>14}  {label:22} done" + (f": {result}" if isinstance(result, str) else ""))
        else:
            failed += 1
            tqdm.write(f"{job.job_id:>14}  {label:22} FAILED: {failure_line(error)}")
    if failed:
        raise safe_io.UserError(f"{failed} of {len(jobs)} {opts.SCRIPT} jobs failed: see the lines above and "
                              f"their logs in {ex.folder}")
    return submitted


if __name__ == "__main__":
    main()
