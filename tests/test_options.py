"""Every option is checked before any work: one line naming the option, the value and what is allowed.

One case per kind of option (ranges, choices, types, subjects). Each bad value must stop
the script with exit code 2 and a single stderr line, before anything under the root is
written.
"""

import pytest
import torch

import cl_model_training
import fit_encoding_models
import generate_results
import pooled_model_training
import reg_model_training
import synthetic_data
import utils
from conftest import snapshot


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Two subjects of 12 images: option errors come before any data is read, so this is enough."""
    root = tmp_path_factory.mktemp("options")
    synthetic_data.write_algonauts_dataset(root, n_subjects=2, n_images=12, image_size=16, seed=0)
    return root


ALEXNET = "allowed an integer between 63 (the smallest input of AlexNet's eight layers) and 1024"
LONG = "x" * 300
ALPHAS = "allowed positive numbers in strictly ascending order, at least one"
TRAIN = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "64", "--epochs", "1"]
FIT = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--rois", "V1v"]


@pytest.mark.parametrize("main, argv, line", [
    (cl_model_training.main, TRAIN + ["--temperature", "0"], "--temperature 0: allowed a number > 0"),
    (cl_model_training.main, TRAIN + ["--epochs", "0"], "--epochs 0: allowed an integer >= 1"),
    (reg_model_training.main, TRAIN + ["--epochs", "-2"], "--epochs -2: allowed an integer >= 1"),
    (cl_model_training.main, TRAIN + ["--batch-size", "0"], "--batch-size 0: allowed an integer >= 2"),
    (pooled_model_training.main, TRAIN + ["--batch-size", "1"], "--batch-size 1: allowed an integer >= 2"),
    (reg_model_training.main, TRAIN + ["--lr", "-1"], "--lr -1: allowed a number > 0"),
    (cl_model_training.main, TRAIN + ["--lr", "inf"], "--lr inf: allowed a number > 0"),
    (cl_model_training.main, TRAIN + ["--image-size", "0"], "--image-size 0: " + ALEXNET),
    (fit_encoding_models.main, FIT + ["--image-size", "40"], "--image-size 40: " + ALEXNET),
    # Was a 6 TB posix_fallocate for the image cache, which filled the disk.
    (fit_encoding_models.main, FIT + ["--image-size", "100000"], "--image-size 100000: " + ALEXNET),
    # Was an OverflowError inside torch.manual_seed.
    (cl_model_training.main, TRAIN + ["--seed", str(2**64)],
     f"--seed {2**64}: allowed an integer between 0 and {2**64 - 1}"),
    # Were tracebacks: torch's meta device made empty networks, and mps is missing here.
    (fit_encoding_models.main, FIT + ["--device", "meta"], "unknown device 'meta': use auto, cpu, cuda, cuda:N or mps"),
    pytest.param(fit_encoding_models.main, FIT + ["--device", "mps"],
                 "device 'mps' asked for but MPS is not available here: use --device cpu (or auto)",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    # Was an OSError (File name too long) from the first file operation.
    (fit_encoding_models.main, FIT + ["--scratch", f"/tmp/{LONG}/features"],
     f"--scratch /tmp/{LONG[:35]}...: its part {LONG[:20]}... is 300 bytes long, more than the 255 a file or folder "
     "name may have; use a shorter name"),
    (fit_encoding_models.main, FIT + ["--n-folds", "0"], "--n-folds 0: allowed an integer >= 2"),
    (fit_encoding_models.main, FIT + ["--n-folds", "1"], "--n-folds 1: allowed an integer >= 2"),
    (fit_encoding_models.main, FIT + ["--n-components", "0"], "--n-components 0: allowed an integer >= 1"),
    (fit_encoding_models.main, FIT + ["--alphas"], "--alphas has no value: name at least one, or leave the flag out "
     "for its default"),
    # A list flag is given once, each value once: argparse keeps the last of two flags, and a
    # repeated value (left and lh are one hemisphere) runs the same work twice.
    (fit_encoding_models.main, FIT + ["--rois", "V2v"], "--rois is given twice: give all its values after one --rois"),
    (pooled_model_training.main, TRAIN + ["--subjects"], "--subjects has no value: name at least one, or leave the "
     "flag out for its default"),
    (generate_results.main, ["--type", "voxel-counts", "--subjects", "1", "2", "1"],
     "--subjects 1 2 1: 1 is given twice; give each value once"),
    (generate_results.main, ["--type", "voxel-counts", "--hemispheres", "left", "lh"],
     "--hemispheres left lh: allowed hemispheres among left, right, lh, rh, each hemisphere once"),
    (generate_results.main, ["--type", "voxel-counts", "--hemispheres", "up"],
     "--hemispheres up: allowed hemispheres among left, right, lh, rh, each hemisphere once"),
    (fit_encoding_models.main, FIT + ["--alphas", "-1", "1"], "--alphas -1 1: " + ALPHAS),
    (fit_encoding_models.main, FIT + ["--alphas", "10", "1"], "--alphas 10 1: " + ALPHAS),
    (cl_model_training.main, TRAIN + ["--max-voxels", "abc"], "--max-voxels abc: allowed an integer >= 1 or none"),
    (generate_results.main, ["--type", "random-rois-list", "--n-random-rois", "-3"],
     "--n-random-rois -3: allowed an integer >= 1"),
    (generate_results.main, ["--type", "voxel-counts", "--subjects", "9"],
     "--subjects 9: allowed an integer between 1 and 8 with a folder roi_masks/SubjX under --root, or with "
     "--source published any of 1-8 (ROOT/roi_masks holds Subj1, Subj2)"),
    (cl_model_training.main, TRAIN + ["--subj", "3"],
     "--subj 3: allowed an integer between 1 and 8 with a folder roi_masks/SubjX under --root"
     " (ROOT/roi_masks holds Subj1, Subj2)"),
    (synthetic_data.main, ["--subjects", "0"], "--subjects 0: allowed an integer >= 1"),
    (generate_results.main, ["--type", "histogram"],
     "--type histogram: allowed one of summaries, transfer-matrix, classification-task, classification-task-pooled-avg, "
     "classification-task-pooled-const, lower-bound-mi, lower-bound-mi-pooled-avg, lower-bound-mi-pooled-const, "
     "voxel-counts, save-embeddings, save-test-fmri-responses, random-rois-list, "
     "figures, salience-maps, paper-figures, compare-published, results-table, index"),
    (fit_encoding_models.main, FIT + ["--method", "tuned"], "--method tuned: allowed one of " + ", ".join(utils.METHODS)),
    (cl_model_training.main, TRAIN + ["--hemisphere", "up"], "--hemisphere up: allowed one of left, right, lh, rh"),
])
def test_bad_option_is_one_line_before_any_work(small_root, capsys, main, argv, line):
    before = snapshot(small_root)
    with pytest.raises(SystemExit) as exc:
        main(["--root", str(small_root)] + argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {line}\n".replace("ROOT", str(small_root))
    assert "Traceback" not in captured.out
    assert snapshot(small_root) == before
