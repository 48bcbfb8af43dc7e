"""Contrastive fine-tuning of one AlexNet pooled over the subjects that have an ROI.

One image map and head are shared; each subject with at least MIN_VOXELS voxels in the ROI
has its own fMRI map, and each epoch runs the subjects one after another in increasing
order. h is 5741 (H_METHOD const) or the mean voxel count (avg); z = int(0.25 h). Writes
cl_models/{lh,rh}_<ROI>_pooled_model_e<EPOCHS>_h{const,avg}.pt (the per-subject voxel
counts and voxels are in its meta) and the per-epoch losses (<name>.log.json).
"""

import sys

import options
import utils

# The heavy helpers load on first use, so that --help answers at once.
models = options.lazy_import("models")

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
HEMISPHERE = "left"  # left or right
ROI = "V1v"  # one of the 31 ROI names
SUBJECTS: list[int] = []  # candidate subjects; empty means all under roi_masks (those where the ROI has fewer than MIN_VOXELS voxels are left out)
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
OVERWRITE = False  # re-train even if the checkpoint exists
# ---
CHOICES = {"HEMISPHERE": utils.HEMISPHERE_NAMES, "PRECISION": utils.PRECISIONS, "ROI": utils.ROIS, "H_METHOD": ["const", "avg"]}
# Training skips one-row batches (BatchNorm needs two rows), so batch size 1, like 0 epochs,
# would save an untrained model.
RANGES = {"SUBJECTS": utils.SUBJECT, "H_CONST": options.at_least(1), "BATCH_SIZE": options.at_least(2),
          "EPOCHS": options.at_least(1), "LR": options.POSITIVE, "TEMPERATURE": options.POSITIVE, "SEED": options.SEED_RANGE,
          "IMAGE_SIZE": utils.ALEXNET_INPUT, "MAX_VOXELS": options.at_least(1), "MIN_VOXELS": options.at_least(1)}


def train(opts, roi, skip_small=False):
    """Train the pooled model of ``roi`` with the options ``opts``; returns its path, or None if skipped."""
    return models.train_roi(opts, roi, f"pooled-{opts.H_METHOD}", skip_small)


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    return train(opts, opts.ROI)


if __name__ == "__main__":
    main()
