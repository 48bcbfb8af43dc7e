"""synthetic_data.py: layout, masks, determinism, planted pRF model and its noise level."""

import re

import numpy as np
import pytest
from PIL import Image

import synthetic_data
import utils

REQUIRED = ("V1v", "V2v", "V3v", "hV4", "EBA", "FFA-1", "PPA")


@pytest.fixture
def real_root(tmp_path, shared_masks):
    """A root whose roi_masks folder is the real masks."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "roi_masks").symlink_to(shared_masks)
    return tmp_path / "real"


def labels_of(root, subj, hemi):
    return {cls: utils.load_roi_mask(root, subj, hemi, cls) for cls in utils.ROI_CLASSES}


def test_layout_and_formats(synthetic_root, real_root):
    for subj in (1, 2):
        paths = utils.list_images(synthetic_root, subj)
        assert len(paths) == 240
        assert all(re.fullmatch(r"train-\d{4}_nsd-\d{5}\.png", p.name) for p in paths)
        assert [int(p.name[6:10]) for p in paths] == list(range(1, 241))
        nsd = [int(p.name[15:20]) for p in paths]
        assert nsd == sorted(nsd)
        with Image.open(paths[0]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
        for cls in utils.ROI_CLASSES:
            assert utils.load_roi_mapping(synthetic_root, subj, cls) == utils.load_roi_mapping(real_root, 1, cls)
        for hemi in utils.HEMISPHERES:
            fsavg = np.load(utils.fsaverage_mask_path(synthetic_root, subj, hemi))
            assert fsavg.shape == (utils.N_FSAVERAGE_VERTICES,) and set(np.unique(fsavg)) == {0, 1}
            n = int(fsavg.sum())
            for codes in labels_of(synthetic_root, subj, hemi).values():
                assert codes.dtype == np.int64 and codes.shape == (n,)
            fmri = np.load(utils.fmri_path(synthetic_root, subj, hemi))
            assert fmri.dtype == np.float32 and fmri.shape == (240, n)
            assert np.isfinite(fmri).all()


def test_shared_images_are_identical_across_subjects(synthetic_root):
    by_nsd = [{p.name[15:20]: p for p in utils.list_images(synthetic_root, s)} for s in (1, 2)]
    shared = sorted(set(by_nsd[0]) & set(by_nsd[1]))
    assert 60 <= len(shared) < 240
    for key in shared[:10]:
        a, b = (np.asarray(Image.open(d[key])) for d in by_nsd)
        assert np.array_equal(a, b)


def test_generated_masks(synthetic_root):
    sizes = {}
    for subj in (1, 2):
        for hemi in utils.HEMISPHERES:
            labels = labels_of(synthetic_root, subj, hemi)
            n = len(labels["streams"])
            assert 800 <= n <= 2000
            member = np.stack([labels[utils.ROI_CLASS[r]] == utils.ROI_CODE[r] for r in utils.ROIS], 1)
            sizes[subj, hemi] = member.sum(0)
            size = dict(zip(utils.ROIS, sizes[subj, hemi]))
            assert size["mTL-faces"] == 0
            assert 0 < size["mTL-words"] < 20
            assert all(size[r] >= 40 for r in REQUIRED)
            assert np.mean([(20 <= k <= 150) for k in size.values() if k]) > 0.8
            # ROIs of different classes overlap; those of one class cannot (one label per vertex).
            bodies = labels["floc-bodies"] > 0
            assert (bodies & (labels["floc-faces"] > 0)).any() and (bodies & (labels["streams"] > 0)).any()
            early = labels["streams"] == utils.ROI_CODE["early"]
            assert (early & (labels["prf-visualrois"] > 0)).sum() > 0.8 * early.sum()
    counts = np.array(list(sizes.values()))
    empty_somewhere = [r for j, r in enumerate(utils.ROIS) if (counts[:, j] == 0).any() and r != "mTL-faces"]
    assert empty_somewhere
    assert len({tuple(c) for c in counts}) == 4  # sizes differ by subject and hemisphere


def test_generated_rois_are_patches_where_the_real_ones_lie(synthetic_root):
    """Each ROI, as a cortical map draws it (a vertex shows its first ROI in canonical order), is one patch of
    fsaverage5 vertices: V1v at the ventral occipital pole, FFA-1 on the ventral surface (nilearn's mesh)."""
    from nilearn import datasets, surface
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    fs = datasets.fetch_surf_fsaverage("fsaverage5")
    for hemi, side in (("lh", "left"), ("rh", "right")):
        pial = surface.load_surf_mesh(fs[f"pial_{side}"])
        xyz, faces = np.asarray(pial.coordinates), np.asarray(pial.faces)
        for subj in (1, 2):
            rows = np.flatnonzero(np.load(utils.fsaverage_mask_path(synthetic_root, subj, hemi)))
            assert rows.max() < 10242  # fsaverage5's own vertices: drawn as they are
            labels = labels_of(synthetic_root, subj, hemi)
            first = np.full(len(rows), -1)
            for k, roi in reversed(list(enumerate(utils.ROIS))):
                first[labels[utils.ROI_CLASS[roi]] == utils.ROI_CODE[roi]] = k
            for k, roi in enumerate(utils.ROIS):
                patch = rows[first == k]
                if len(patch) < 20:  # a small ROI may be squeezed between earlier ones
                    continue
                edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
                edges = edges[np.isin(edges, patch).all(axis=1)]
                graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(10242, 10242))
                _, component = connected_components(graph, directed=False)
                assert np.bincount(component[patch]).max() >= 0.9 * len(patch), (subj, hemi, roi)
            v1v, ffa = rows[first == utils.ROIS.index("V1v")], rows[first == utils.ROIS.index("FFA-1")]
            assert xyz[v1v, 1].mean() < np.percentile(xyz[:, 1], 5) and xyz[v1v, 2].mean() < xyz[:, 2].mean()
            assert xyz[ffa, 2].mean() < np.percentile(xyz[:, 2], 25)


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(n_subjects=1, n_images=12, image_size=24)
    a = synthetic_data.write_algonauts_dataset(tmp_path / "a", seed=3, **kw)
    b = synthetic_data.write_algonauts_dataset(tmp_path / "b", seed=3, **kw)
    c = synthetic_data.write_algonauts_dataset(tmp_path / "c", seed=4, **kw)
    assert a == b and a != c
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 30
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert [p.name for p in utils.list_images(tmp_path / "a", 1)] != [p.name for p in utils.list_images(tmp_path / "c", 1)]


def test_prf_vertices_correlate_with_their_noise_free_response_as_snr_predicts(synthetic_root):
    n = 240
    for subj in (1, 2):
        for hemi in utils.HEMISPHERES:
            truth = synthetic_data.load_truth(synthetic_root, subj, hemi)
            fmri = utils.load_fmri(synthetic_root, subj, hemi)
            noise_free = truth["noise_free"]
            assert np.allclose(noise_free.mean(0), 0, atol=1e-5) and np.allclose(noise_free.var(0), 1, atol=1e-4)
            prf = truth["kind"] == synthetic_data.KIND_PRF
            assert prf.sum() > 300
            r = np.array([np.corrcoef(fmri[:, v], noise_free[:, v])[0, 1] for v in np.flatnonzero(prf)])
            expected = np.sqrt(truth["snr"][prf] / (1 + truth["snr"][prf]))
            # The sampling s.d. of r is about (1 - rho^2) / sqrt(n).
            z = (r - expected) / ((1 - expected ** 2) / np.sqrt(n))
            assert np.abs(z).max() < 5
            assert abs(np.mean(r - expected)) < 0.01
            # SNR varies per vertex, so r should track it.
            assert np.corrcoef(r, expected)[0, 1] > 0.8


def test_prf_parameters_are_retinotopic(synthetic_root):
    for subj in (1, 2):
        for hemi, side in (("lh", 1), ("rh", -1)):
            truth = synthetic_data.load_truth(synthetic_root, subj, hemi)
            prf = truth["kind"] == synthetic_data.KIND_PRF
            assert (np.sign(truth["x"][prf]) == side).all()
            assert np.isnan(truth["x"][~prf]).all() and (truth["channel"][~prf] == -1).all()
            codes = utils.load_roi_mask(synthetic_root, subj, hemi, "prf-visualrois")
            assert (truth["y"][codes == utils.ROI_CODE["V1v"]] > 0).all()
            assert (truth["y"][codes == utils.ROI_CODE["V1d"]] < 0).all()
            assert set(np.unique(truth["sf"][prf])) <= set(synthetic_data.SFS)


def test_prf_position_is_recoverable_from_the_images(synthetic_root):
    """A grid search over positions finds each planted pRF centre from images and noise-free responses."""
    images = np.stack([np.asarray(Image.open(p)) for p in utils.list_images(synthetic_root, 1)])
    energy, _ = synthetic_data.image_features(images)
    truth = synthetic_data.load_truth(synthetic_root, 1, "lh")
    prf = np.flatnonzero(truth["kind"] == synthetic_data.KIND_PRF)[::40]
    gx, gy = synthetic_data._grid_coords()
    errors = []
    for v in prf:
        local = np.sqrt(energy[:, truth["channel"][v]])  # (n_images, GRID * GRID), field of one pixel
        r = synthetic_data.column_correlation(local, np.repeat(truth["noise_free"][:, v:v + 1], local.shape[1], 1))
        best = np.argmax(r)
        errors.append(np.hypot(gx.ravel()[best] - truth["x"][v], gy.ravel()[best] - truth["y"][v]))
    assert np.median(errors) < 0.25


def test_real_masks_subset(tmp_path, real_root, shared_masks):
    out = tmp_path / "out"
    summary = synthetic_data.write_algonauts_dataset(out, n_subjects=1, n_images=8, image_size=16,
                                                     masks_from=shared_masks, max_vertices=1500)
    for hemi in utils.HEMISPHERES:
        assert summary[1][hemi]["n_vertices"] == 1500
        real_fs = np.flatnonzero(np.load(utils.fsaverage_mask_path(real_root, 1, hemi)))
        out_fs = np.flatnonzero(np.load(utils.fsaverage_mask_path(out, 1, hemi)))
        assert np.isin(out_fs, real_fs).all()
        keep = np.searchsorted(real_fs, out_fs)
        for cls in utils.ROI_CLASSES:
            real = utils.load_roi_mask(real_root, 1, hemi, cls)
            kept = utils.load_roi_mask(out, 1, hemi, cls)
            assert np.array_equal(kept, real[keep])
            assert set(np.unique(kept)) == set(np.unique(real))  # no non-empty ROI lost
        assert np.load(utils.fmri_path(out, 1, hemi)).shape == (8, 1500)


def test_cli_writes_then_skips(tmp_path, capsys):
    args = ["--root", str(tmp_path), "--subjects", "1", "--images", "6", "--image-size", "16", "--seed", "1"]
    summary = synthetic_data.main(args)
    assert summary[1]["lh"]["n_vertices"] == len(utils.load_roi_mask(tmp_path, 1, "lh", "streams"))
    before = utils.fmri_path(tmp_path, 1, "lh").stat().st_mtime_ns
    assert synthetic_data.main(args) is None
    assert "skipped" in capsys.readouterr().out
    assert utils.fmri_path(tmp_path, 1, "lh").stat().st_mtime_ns == before


@pytest.mark.parametrize("args, message", [
    (["--masks-from", "no/such/masks"], "no/such/masks"),
    (["--snr", "0"], "--snr 0: allowed a number > 0"),
    (["--images", "0"], "--images 0: allowed an integer >= 1"),
    (["--image-size", "4"], "--image-size 4: allowed an integer >= 8"),
])
def test_cli_bad_input(tmp_path, capsys, args, message):
    root = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        synthetic_data.main(["--root", str(root), "--subjects", "1", "--images", "4", "--image-size", "16"] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    err = err[err.rindex("error: "):]
    assert err.count("\n") == 1 and message in err
    assert not root.exists()
