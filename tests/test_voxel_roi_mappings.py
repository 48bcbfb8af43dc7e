"""generate_voxel_roi_mappings.py on the real masks and on synthetic ones."""

import shutil

import joblib
import numpy as np
import pytest

import generate_voxel_roi_mappings as gen
import utils


def root_with_masks(tmp_path, masks):
    root = tmp_path / "root"
    root.mkdir()
    (root / "roi_masks").symlink_to(masks)
    return root


def direct_mapping(masks, subj, hemi):
    """The expected mapping, read ROI by ROI straight from the files."""
    folder = masks / f"Subj{subj}"
    n = int(np.load(folder / f"{hemi}.all-vertices_fsaverage_space.npy").sum())
    expected = [[] for _ in range(n)]
    for roi in utils.ROIS:
        cls = utils.ROI_CLASS[roi]
        mapping = np.load(folder / f"mapping_{cls}.npy", allow_pickle=True).item()
        labels = np.load(folder / f"{hemi}.{cls}_challenge_space.npy")
        for v in np.flatnonzero(labels == [k for k, name in mapping.items() if name == roi][0]):
            expected[v].append(roi)
    return expected


def test_real_masks_facts(tmp_path, shared_masks):
    root = root_with_masks(tmp_path, shared_masks)
    assert utils.roi_voxel_count(root, 1, "left", "V1v") == 710
    assert utils.roi_voxel_count(root, 1, "lh", "EBA") == 2837
    assert utils.roi_voxel_count(root, 5, "right", "EBA") == 5741
    assert utils.n_vertices(root, 6, "lh") == 18978
    assert utils.n_vertices(root, 1, "lh") == 19004
    assert utils.find_subjects(root) == list(range(1, 9))
    for subj in range(1, 9):
        for hemi in utils.HEMISPHERES:
            assert utils.roi_voxel_count(root, subj, hemi, "mTL-faces") == 0


def test_mapping_agrees_with_direct_computation_on_real_masks(tmp_path, shared_masks, capsys):
    root = root_with_masks(tmp_path, shared_masks)
    gen.main(["--root", str(root), "--subjects", "1", "5", "6"])
    assert sorted(p.name for p in (root / "voxel_roi_mappings").iterdir()) == ["Subj1", "Subj5", "Subj6"]
    for subj in (1, 5, 6):
        for hemi in utils.HEMISPHERES:
            mapping = joblib.load(utils.voxel_roi_mapping_path(root, subj, hemi))
            assert mapping == direct_mapping(shared_masks, subj, hemi)
    mapping = joblib.load(utils.voxel_roi_mapping_path(root, 5, "rh"))
    assert sum("EBA" in rois for rois in mapping) == 5741
    assert all(rois == sorted(rois, key=utils.ROIS.index) for rois in mapping)


def test_all_subjects_skip_and_overwrite(tmp_path, synthetic_root, capsys):
    root = root_with_masks(tmp_path, synthetic_root / "roi_masks")
    gen.main(["--root", str(root)])
    path = utils.voxel_roi_mapping_path(root, 2, "rh")
    assert joblib.load(path) == direct_mapping(synthetic_root / "roi_masks", 2, "rh")
    assert len(list((root / "voxel_roi_mappings").rglob("*.joblib"))) == 4
    joblib.dump(["stale"], path)
    capsys.readouterr()
    gen.main(["--root", str(root)])
    assert "skipped" in capsys.readouterr().out and joblib.load(path) == ["stale"]
    gen.main(["--root", str(root), "--overwrite"])
    assert joblib.load(path) == direct_mapping(synthetic_root / "roi_masks", 2, "rh")


def run_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gen.main(argv)
    assert e.value.code == 2
    # Progress bars may precede the one-line error on stderr.
    err = capsys.readouterr().err
    err = err[err.rindex("error: "):]
    assert err.count("\n") == 1
    return err


def test_missing_root(tmp_path, capsys):
    err = run_error(["--root", str(tmp_path / "nowhere")], capsys)
    assert str(tmp_path / "nowhere" / "roi_masks") in err and "README" in err


def test_missing_subject_folder(tmp_path, synthetic_root, capsys):
    root = root_with_masks(tmp_path, synthetic_root / "roi_masks")
    err = run_error(["--root", str(root), "--subjects", "1", "7"], capsys)
    assert f"--subjects 7: allowed an integer between 1 and 8 with a folder roi_masks/SubjX under --root " \
           f"({root / 'roi_masks'} holds Subj1, Subj2)" in err
    assert not (root / "voxel_roi_mappings").exists()


def test_missing_mapping_file_writes_nothing(tmp_path, synthetic_root, capsys):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root / "roi_masks", root / "roi_masks")
    (root / "roi_masks" / "Subj2" / "mapping_floc-faces.npy").unlink()
    err = run_error(["--root", str(root)], capsys)
    assert "mapping_floc-faces.npy" in err
    assert not (root / "voxel_roi_mappings").exists()


def test_mask_length_mismatch(tmp_path, synthetic_root, capsys):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root / "roi_masks", root / "roi_masks")
    path = utils.roi_mask_path(root, 1, "lh", "streams")
    np.save(path, np.load(path)[:-3])
    err = run_error(["--root", str(root)], capsys)
    assert str(path) in err
    assert not (root / "voxel_roi_mappings").exists()
