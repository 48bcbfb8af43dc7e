"""Demo: write a small synthetic Algonauts dataset and build its voxel-to-ROI mappings.

Runs on a CPU in seconds: `make demo` (or `python demo.py`). The dataset goes to
DEMO_ROOT; the planted ground truth is under DEMO_ROOT/synthetic_truth.
"""

import sys

import numpy as np

import generate_voxel_roi_mappings
import synthetic_data
import utils

# --- Options ---
DEMO_ROOT = "demo_data"  # folder the synthetic dataset and all outputs go to
SUBJECTS = 2  # number of synthetic subjects
IMAGES = 300  # images per subject
IMAGE_SIZE = 64  # side of the synthetic images, in pixels (small keeps the CPU time low)
SEED = 0  # seed of the synthetic dataset
SNR = 1.0  # median signal-to-noise ratio of the planted responses
OVERWRITE = False  # regenerate the dataset and mappings even if they exist
# ---


@utils.cli
def main(argv=None):
    opts = utils.parse_options(sys.modules[__name__], argv)
    root = opts.DEMO_ROOT
    overwrite = ["--overwrite"] if opts.OVERWRITE else []
    synthetic_data.main(["--root", root, "--subjects", str(opts.SUBJECTS), "--images", str(opts.IMAGES),
                         "--image-size", str(opts.IMAGE_SIZE), "--seed", str(opts.SEED), "--snr", str(opts.SNR)]
                        + overwrite)
    generate_voxel_roi_mappings.main(["--root", root] + overwrite)

    print(f"\n{'subject':8} {'hemi':4} {'vertices':>8} {'ROIs':>4} {'pRF':>5} {'r(noise-free)':>13}")
    for subj in range(1, opts.SUBJECTS + 1):
        for hemi in utils.HEMISPHERES:
            fmri = utils.load_fmri(root, subj, hemi)
            truth = synthetic_data.load_truth(root, subj, hemi)
            r = synthetic_data.column_correlation(fmri, truth["noise_free"])
            n_rois = sum(utils.roi_voxel_count(root, subj, hemi, roi) > 0 for roi in utils.ROIS)
            prf = truth["kind"] == synthetic_data.KIND_PRF
            print(f"{utils.subj_dir(subj):8} {hemi:4} {fmri.shape[1]:8d} {n_rois:4d} {int(prf.sum()):5d} "
                  f"{np.mean(r[prf]):13.3f}")
    print("r(noise-free): mean correlation of the pRF vertices' fMRI with their planted noise-free response")


if __name__ == "__main__":
    main()
