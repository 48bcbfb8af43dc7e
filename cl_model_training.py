"""Fine-tune AlexNet with the contrastive (InfoNCE) loss on the fMRI of one subject's ROI.

Writes cl_models/SubjX/subjX_{lh,rh}_<ROI>_model_e<EPOCHS>.pt and, next to it, the
per-epoch train and held-out losses (<name>.log.json). An interrupted run resumes from
its last finished epoch when started again with the same options.
"""

import sys

import options
import utils

# The heavy helpers load on first use, so that --help answers at once.
models = options.lazy_import("models")

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
SUBJ = 1  # subject whose fMRI tunes the model
HEMISPHERE = "left"  # left or right
ROI = "V1v"  # one of the 31 ROI names
BATCH_SIZE = 1024  # image-fMRI pairs per step
EPOCHS = utils.DEFAULT_EPOCHS["cl-tuned"]  # passes over the 85% training split
LR = 1e-4  # Adam learning rate
TEMPERATURE = 0.3  # InfoNCE temperature
WEIGHTS = "imagenet"  # starting AlexNet: imagenet, none (seeded random) or a state-dict file
DEVICE = "auto"  # auto, cpu or cuda
SEED = 0  # seeds the initialisation, batch order and dropout
IMAGE_SIZE = 224  # images are squash-resized to IMAGE_SIZE x IMAGE_SIZE
PRECISION = "fp32"  # training arithmetic: fp32 (the authors') or bf16 (autocast; faster on a GPU)
MAX_VOXELS: int | None = None  # keep at most this many voxels of the ROI (seeded random subset); None keeps all
MIN_VOXELS = utils.MIN_VOXELS  # ROIs with fewer voxels are not trained (1, the authors' current code; 20 reproduces the paper's 2024 figures)
OVERWRITE = False  # re-train even if the checkpoint exists
# ---
CHOICES = {"HEMISPHERE": utils.HEMISPHERE_NAMES, "PRECISION": utils.PRECISIONS, "ROI": utils.ROIS}
# Training skips one-row batches (BatchNorm needs two rows), so batch size 1, like 0 epochs,
# would save an untrained model.
RANGES = {"SUBJ": utils.SUBJECT, "BATCH_SIZE": options.at_least(2), "EPOCHS": options.at_least(1),
          "LR": options.POSITIVE, "TEMPERATURE": options.POSITIVE, "SEED": options.SEED_RANGE,
          "IMAGE_SIZE": utils.ALEXNET_INPUT, "MAX_VOXELS": options.at_least(1), "MIN_VOXELS": options.at_least(1)}


def train(opts, roi, skip_small=False):
    """Train the CL model of ``roi`` with the options ``opts``; returns its path, or None if skipped."""
    return models.train_roi(opts, roi, "cl-tuned", skip_small)


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    return train(opts, opts.ROI)


if __name__ == "__main__":
    main()
