"""Write, for each subject and hemisphere, the ROI names of every challenge-space vertex.

Output: ROOT/voxel_roi_mappings/SubjX/subjX_{lh,rh}_voxel_roi_mappings.joblib, a list
with one entry per vertex; each entry is the list of ROI names (in the canonical order
of utils.ROIS) whose mask contains the vertex, empty for vertices in no ROI.

Usage: python generate_voxel_roi_mappings.py --root . [--subjects 1 2] [--overwrite]
"""

import sys
from pathlib import Path

import numpy as np
import options
import safe_io
import utils

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
SUBJECTS: list[int] = []  # subjects to process (empty: every SubjX folder under ROOT/roi_masks)
OVERWRITE = False  # rewrite mapping files that already exist
# ---
RANGES = {"SUBJECTS": utils.SUBJECT}


def roi_membership(root, subj, hemisphere):
    """Boolean matrix (n_vertices, 31): entry (v, j) is True when vertex v lies in utils.ROIS[j].

    Every class mask must have one label per vertex of the fsaverage mask.
    """
    n = utils.n_vertices(root, subj, hemisphere)
    member = np.zeros((n, len(utils.ROIS)), dtype=bool)
    for cls in utils.ROI_CLASSES:
        labels = utils.load_roi_mask(root, subj, hemisphere, cls)
        if labels.shape != (n,):
            raise safe_io.UserError(f"{utils.roi_mask_path(root, subj, hemisphere, cls)} has shape {labels.shape} "
                                  f"but the fsaverage mask has {n} vertices: use masks from the same download")
        mapping = utils.load_roi_mapping(root, subj, cls)
        for code, name in mapping.items():
            if name in utils.ROI_CLASS:
                member[:, utils.ROIS.index(name)] |= labels == code
    return member


def voxel_roi_lists(member):
    """List over vertices of the ROI names (canonical order) in each row of ``member`` (n, 31).

    Rows are grouped by their unique membership pattern, so only a few dozen name lists
    are built, then copied per vertex.
    """
    patterns, inverse = np.unique(member, axis=0, return_inverse=True)
    names = [[roi for roi, inside in zip(utils.ROIS, row) if inside] for row in patterns]
    return [list(names[i]) for i in inverse.ravel()]


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    members = check_inputs(opts)
    for (subj, hemi), member in options.progress(members.items(), "writing mappings", log="end"):
        path = utils.voxel_roi_mapping_path(opts.ROOT, subj, hemi)
        safe_io.atomic_joblib_dump(voxel_roi_lists(member), path)
        print(f"{path}: {len(member)} vertices, {int(member.any(1).sum())} in at least one ROI")


def check_inputs(opts):
    """The output folder and every mask of the mappings still to write, read before anything is
    written (finished mappings are skipped with a line); returns {(subject, hemisphere): membership}."""
    safe_io.check_writable(Path(opts.ROOT) / "voxel_roi_mappings")
    todo = pending(opts)
    for subj in opts.SUBJECTS or utils.find_subjects(opts.ROOT):
        for hemi in utils.HEMISPHERES:
            if (subj, hemi) not in todo:
                print(f"{utils.voxel_roi_mapping_path(opts.ROOT, subj, hemi)} exists: skipped (use --overwrite)")
    return {job: roi_membership(opts.ROOT, *job) for job in todo}


def pending(opts):
    """The (subject, hemisphere) whose mapping is still to write (all of them with OVERWRITE)."""
    return [(subj, hemi) for subj in opts.SUBJECTS or utils.find_subjects(opts.ROOT) for hemi in utils.HEMISPHERES
            if opts.OVERWRITE or not utils.voxel_roi_mapping_path(opts.ROOT, subj, hemi).exists()]


if __name__ == "__main__":
    main()
