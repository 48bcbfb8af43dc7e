"""Pooled contrastive fine-tuning (pooled_model_training.py) for every ROI of one hemisphere.

ROIs with fewer than MIN_VOXELS voxels in every subject are skipped with a line, finished
checkpoints are skipped unless --overwrite, and --shard K/N runs only the K-th of N parts of the ROI list
(one part per task of a SLURM job array).
"""

import sys

import options
import utils
from pooled_model_training import RANGES, train

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
HEMISPHERE = "left"  # left or right
ROIS: list[str] = []  # ROI names to train; empty means all 31
SHARD = "1/1"  # K/N: train only the K-th of N round-robin parts of the ROI list
SUBJECTS: list[int] = []  # candidate subjects; empty means all under roi_masks (those where an ROI has fewer than MIN_VOXELS voxels are left out)
H_METHOD = "const"  # const (h = H_CONST) or avg (h = mean voxel count over the subjects)
H_CONST = utils.H_CONST  # h of the const method: the largest ROI of the NSD subjects (subj5 rh EBA)
BATCH_SIZE = 1024  # image-fMRI pairs per step
EPOCHS = utils.DEFAULT_EPOCHS["pooled-avg"]  # passes over each subject's 85% training split
LR = 1e-4  # Adam learning rate
TEMPERATURE = 0.3  # InfoNCE temperature
WEIGHTS = "imagenet"  # starting AlexNet: imagenet, none (seeded random) or a state-dict file
DEVICE = "auto"  # auto, cpu or cuda
SEED = 0  # seeds the initialisation, batch order and dropout
IMAGE_SIZE = 224  # images are squash-resized to IMAGE_SIZE x IMAGE_SIZE
PRECISION = "fp32"  # training arithmetic: fp32 (the authors') or bf16 (autocast; faster on a GPU)
MAX_VOXELS: int | None = None  # keep at most this many voxels per subject (seeded random subset); None keeps all
MIN_VOXELS = utils.MIN_VOXELS  # subjects where the ROI has fewer voxels are left out (1, the authors'; 20: the paper's 2024 figures)
OVERWRITE = False  # re-train ROIs whose checkpoint exists
# ---
CHOICES = {"HEMISPHERE": utils.HEMISPHERE_NAMES, "PRECISION": utils.PRECISIONS, "ROIS": utils.ROIS, "H_METHOD": ["const", "avg"]}


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    rois = utils.shard(opts.ROIS or utils.ROIS, opts.SHARD)
    return [train(opts, roi, skip_small=True) for roi in options.progress(rois, "ROIs")]


if __name__ == "__main__":
    main()
