"""Regression fine-tuning (reg_model_training.py) for every ROI of one subject and hemisphere.

ROIs with fewer than MIN_VOXELS voxels (empty ones included) are skipped with a line,
finished checkpoints are skipped unless --overwrite, and --shard K/N runs only the K-th of N parts of the ROI list
(one part per task of a SLURM job array).
"""

import sys

import options
import utils
from reg_model_training import RANGES, train

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
SUBJ = 1  # subject whose fMRI tunes the models
HEMISPHERE = "left"  # left or right
ROIS: list[str] = []  # ROI names to train; empty means all 31
SHARD = "1/1"  # K/N: train only the K-th of N round-robin parts of the ROI list
BATCH_SIZE = 1024  # image-fMRI pairs per step
EPOCHS = utils.DEFAULT_EPOCHS["reg-tuned"]  # passes over the 85% training split
LR = 2.5e-5  # Adam learning rate
WEIGHTS = "imagenet"  # starting AlexNet: imagenet, none (seeded random) or a state-dict file
DEVICE = "auto"  # auto, cpu or cuda
SEED = 0  # seeds the initialisation, batch order and dropout
IMAGE_SIZE = 224  # images are squash-resized to IMAGE_SIZE x IMAGE_SIZE
PRECISION = "fp32"  # training arithmetic: fp32 (the authors') or bf16 (autocast; faster on a GPU)
MAX_VOXELS: int | None = None  # keep at most this many voxels per ROI (seeded random subset); None keeps all
MIN_VOXELS = utils.MIN_VOXELS  # ROIs with fewer voxels are not trained (1, the authors' current code; 20 reproduces the paper's 2024 figures)
OVERWRITE = False  # re-train ROIs whose checkpoint exists
# ---
CHOICES = {"HEMISPHERE": utils.HEMISPHERE_NAMES, "PRECISION": utils.PRECISIONS, "ROIS": utils.ROIS}


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    rois = utils.shard(opts.ROIS or utils.ROIS, opts.SHARD)
    return [train(opts, roi, skip_small=True) for roi in options.progress(rois, "ROIs")]


if __name__ == "__main__":
    main()
