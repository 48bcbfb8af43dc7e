"""NOD: CIFTI I/O, run-wise z-scoring, labels, HCP-MMP ROIs, top-R2 selection, missing files."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

import nod_utils as nu
import utils


def _write_run(nod, subj, session, run, data, n_left, n_sub=3):
    path = nu.beta_path(nod, subj, session, run)
    nu.write_cortex_dscalar(data, n_left, path, n_subcortical=n_sub)
    return path


def test_cifti_round_trip_keeps_only_cortex(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((7, 11 + 13 + 5)).astype(np.float32)
    path = tmp_path / "x.dscalar.nii"
    nu.write_cortex_dscalar(data, 11, path, n_subcortical=5)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    names = [name for name, _, _ in img.header.get_axis(1).iter_structures()]
    assert names == ["CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT", "CIFTI_STRUCTURE_THALAMUS_LEFT"]
    cortex, n_left = nu.read_cortex_dscalar(path)
    assert n_left == 11
    np.testing.assert_array_equal(cortex, data[:, :24])


def test_betas_are_zscored_within_each_run_and_cached(tmp_path):
    rng = np.random.default_rng(1)
    nod, raw = tmp_path / "nod", []
    for session in (1, 2):
        for run in (1, 2, 3):
            data = rng.normal(5 * run, 1 + session, size=(20, 9 + 3)).astype(np.float32)
            data[:, 2] = 4.0  # a constant vertex: z = 0, never NaN
            _write_run(nod, 1, session, run, data, 4)
            raw.append(data[:, :9])
    betas = nu.load_betas(nod, 1, sessions=[1, 2], runs=[1, 2, 3])
    expected = np.concatenate([(r - r.mean(0)) / np.where(r.std(0) > 0, r.std(0), np.inf) for r in raw])
    np.testing.assert_allclose(betas, expected, atol=1e-5)
    assert not np.isnan(betas).any() and (betas[:, 2] == 0).all()
    np.testing.assert_allclose(betas[:20].std(0)[[0, 1, 3]], 1, atol=1e-5)
    # The cache is what a second call returns, even after the raw files are gone.
    for session in (1, 2):
        for run in (1, 2, 3):
            nu.beta_path(nod, 1, session, run).unlink()
    np.testing.assert_array_equal(nu.load_betas(nod, 1, sessions=[1, 2], runs=[1, 2, 3]), betas)
    with pytest.raises(utils.UserError, match="datalad get derivatives/ciftify/sub-01/results/"
                                              "ses-imagenet01_task-imagenet_run-1/"):
        nu.load_betas(nod, 1, sessions=[1, 2], runs=[1, 2, 3], overwrite=True)


def test_mismatched_run_widths_are_a_user_error(tmp_path):
    nod = tmp_path / "nod"
    _write_run(nod, 2, 1, 1, np.ones((5, 10)), 4)
    _write_run(nod, 2, 1, 2, np.ones((5, 11)), 4)
    with pytest.raises(utils.UserError, match="cortical grayordinates"):
        nu.load_betas(nod, 2, sessions=[1], runs=[1, 2])


def _write_support(nod, mmp, n_classes=10):
    sup = nu.support_dir(nod)
    sup.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(sup / "MMP_mpmLR32k.mat", {"glasser_MMP": mmp[None, :].astype(np.float64)})
    areas = ["V1", "MST", "V6", "V2", "V3", "V4", "V8", "4"]
    rows = [f"L_{a}_ROI" for a in areas] + [f"R_{a}_ROI" for a in areas]
    (sup / "roilbl_mmp.csv").write_text("name\n" + "\n".join(rows) + "\n")
    pd.DataFrame({"className": [f"c{i}" for i in range(n_classes)],
                  "superClassID": np.arange(n_classes) % 3 + 1}).to_csv(sup / "superClassMapping.csv", index=False)


def test_left_right_mmp_labels_map_to_rois(tmp_path):
    rng = np.random.default_rng(2)
    mmp = np.concatenate([rng.integers(1, 9, 300), rng.integers(181, 189, 300)])
    nod = tmp_path / "nod"
    _write_support(nod, mmp)
    index = nu.mmp_area_index(nod)
    assert [index[a] for a in nu.NOD_ROIS] == [1, 4, 5, 6]
    for roi, left in zip(nu.NOD_ROIS, (1, 4, 5, 6)):
        lh, rh = nu.roi_vertices(nod, roi, "left"), nu.roi_vertices(nod, roi, "right")
        np.testing.assert_array_equal(lh, np.flatnonzero(mmp == left))
        np.testing.assert_array_equal(rh, np.flatnonzero(mmp == left + 180))
        assert lh.max() < 300 <= rh.min()
    with pytest.raises(utils.UserError, match="unknown HCP-MMP area 'V9'"):
        nu.roi_vertices(nod, "V9", "left")


def test_top_vertices_by_prf_r2_match_a_direct_argsort(tmp_path):
    rng = np.random.default_rng(3)
    n_left, n = 400, 800
    mmp = np.concatenate([rng.integers(1, 9, n_left), rng.integers(181, 189, n - n_left)])
    params = rng.uniform(0, 1, size=(5, n + 4)).astype(np.float32)
    params[3, rng.choice(n, 60, replace=False)] = np.nan
    params[3, :40] = 0.5  # ties
    nod = tmp_path / "nod"
    _write_support(nod, mmp)
    nu.write_cortex_dscalar(params, n_left, nu.prf_params_path(nod, 4), n_subcortical=4)
    r2 = nu.load_prf_r2(nod, 4)
    np.testing.assert_array_equal(r2, np.nan_to_num(params[3, :n]))
    for roi in nu.NOD_ROIS:
        for hemi, offset in (("lh", 0), ("rh", 180)):
            cand = np.flatnonzero(mmp == nu.mmp_area_index(nod)[roi] + offset)
            direct = cand[np.argsort(-np.nan_to_num(params[3, cand]), kind="stable")[:50]]
            np.testing.assert_array_equal(nu.select_vertices(nod, 4, roi, hemi), direct)


def test_labels_come_from_events_and_superclass_mapping(tmp_path):
    nod = tmp_path / "nod"
    _write_support(nod, np.ones(10, int), n_classes=10)
    rows = []
    for session, run in ((1, 1), (1, 2)):
        ev = pd.DataFrame({"onset": np.arange(4) * 2.0, "duration": 1.0,
                           "trial_type": [3, 10, 1, 3 + run],
                           "stim_file": [f"n{run:08d}/n{run:08d}_{i}.JPEG" for i in range(4)]})
        path = nu.events_path(nod, 6, session, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        ev.to_csv(path, sep="\t", index=False)
        rows.append(ev)
    labels = nu.build_labels(nod, 6, sessions=[1], runs=[1, 2])
    events = pd.concat(rows, ignore_index=True)
    assert list(labels.columns) == ["class_id", "image_name", "superclass_id"]
    np.testing.assert_array_equal(labels["class_id"], events["trial_type"])
    np.testing.assert_array_equal(labels["superclass_id"], (events["trial_type"] - 1) % 3 + 1)
    saved = pd.read_csv(nu.label_csv_path(nod, 6))
    pd.testing.assert_frame_equal(saved, labels)
    assert nu.stimulus_path(nod, "imagenet/n1/x.JPEG") == nu.stimulus_path(nod, "n1/x.JPEG") \
        == nod / "stimuli" / "imagenet" / "n1" / "x.JPEG"


@pytest.fixture(scope="module")
def tiny_nod(tmp_path_factory):
    """A tiny synthetic NOD tree: 1 subject, 2 runs of 10 trials, 32 px images."""
    import synthetic_data
    root = tmp_path_factory.mktemp("tiny_nod")
    synthetic_data.write_nod_dataset(root, n_subjects=1, n_runs=2, n_trials=10, image_size=32,
                                     n_vertices=(300, 300), n_subcortical=5, roi_size=60, n_planted=55)
    return root


def test_synthetic_tree_loads_with_planted_top_vertices(tiny_nod):
    data = nu.NODSubjectData(tiny_nod, 1, sessions=[1], runs=[1, 2], image_size=32)
    truth = np.load(tiny_nod / "synthetic_truth" / "nod" / "sub-01_truth.npz")
    assert data.betas.shape == (20, 600) and data.images.shape == (20, 32, 32, 3)
    np.testing.assert_allclose(data.betas[:10].mean(0), 0, atol=1e-5)
    for roi in nu.NOD_ROIS:
        for hemi in ("lh", "rh"):
            vertices, fmri = data.roi_fmri(roi, hemi)
            assert len(vertices) == 50 and truth["planted"][vertices].all()
            np.testing.assert_array_equal(fmri, np.asarray(data.betas)[:, vertices])


def _fetch(nod, rel):
    return f"cd {nod} && datalad get {rel}"


@pytest.mark.parametrize("which", ["beta", "events", "prf", "stimulus", "mmp", "roilbl", "superclass"])
def test_each_missing_file_names_its_path_and_how_to_fetch_it(tiny_nod, tmp_path, which):
    import shutil
    root = tmp_path / "root"
    shutil.copytree(tiny_nod / "nod", root / "nod", ignore=shutil.ignore_patterns("*_imagenet-*"))
    nod = root / "nod"
    first_stim = pd.read_csv(nu.events_path(nod, 1, 1, 2), sep="\t")["stim_file"][3]
    path = {"beta": nu.beta_path(nod, 1, 1, 2), "events": nu.events_path(nod, 1, 1, 2),
            "prf": nu.prf_params_path(nod, 1), "stimulus": nu.stimulus_path(nod, first_stim),
            "mmp": nu.mmp_path(nod), "roilbl": nu.roi_labels_path(nod),
            "superclass": nu.superclass_path(nod)}[which]
    path.unlink()
    with pytest.raises(utils.UserError) as err:
        nu.NODSubjectData(root, 1, sessions=[1], runs=[1, 2], image_size=32).roi_fmri("V1", "lh")
    message = str(err.value)
    assert str(path) in message
    if which in ("mmp", "roilbl", "superclass"):
        assert nu.SUPPORT_URL in message
    else:
        assert f"datalad clone {nu.DATASET_URL} {nod}" in message
        assert _fetch(nod, path.relative_to(nod)) in message


# --- fit_encoding_models_nod.py --------------------------------------------------------

@pytest.fixture(scope="module")
def nod_run(tmp_path_factory):
    """A synthetic NOD tree (1 subject, 400 trials of 64 px) with untuned results for V1 and V4."""
    import joblib
    import synthetic_data
    import fit_encoding_models_nod as script
    import encoding
    root = tmp_path_factory.mktemp("nod_run")
    synthetic_data.write_nod_dataset(root, n_subjects=1, n_runs=4, image_size=64, seed=0, snr=1.0)
    calls, fit = [], encoding.encode_roi

    def spy(layers, fmri, train, test, folds, *args, **kwargs):
        calls.append(folds)
        return fit(layers, fmri, train, test, folds, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(encoding, "encode_roi", spy)
    try:
        table = script.main(["--root", str(root), "--subjects", "1", "--sessions", "1", "--runs", "1", "2", "3", "4",
                             "--rois", "V1", "V4", "--hemispheres", "lh", "--methods", "untuned",
                             "--weights", "none", "--image-size", "64", "--batch-size", "200"])
    finally:
        mp.undo()
    results = {p.name: joblib.load(p) for p in (root / "encoding_results" / "nod").glob("sub-*/*.joblib")}
    return root, table, calls, results


def test_script_uses_five_distinct_folds_covering_train(nod_run):
    root, _, calls, _ = nod_run
    data = nu.NODSubjectData(root, 1, sessions=[1], runs=[1, 2, 3, 4], image_size=64)
    assert len(calls) == 2
    for folds in calls:
        assert len(folds) == 5
        vals = [set(val.tolist()) for _, val in folds]
        assert all(len(v) == 68 for v in vals) and len(set.union(*vals)) == 340
        assert set.union(*vals) == set(data.train.tolist()) and not set.union(*vals) & set(data.test.tolist())
        for fit, val in folds:
            assert sorted(np.concatenate([fit, val]).tolist()) == sorted(data.train.tolist())


def test_planted_prf_responses_are_recovered(nod_run):
    import encoding
    root, table, _, results = nod_run
    truth = np.load(root / "synthetic_truth" / "nod" / "sub-01_truth.npz")
    v1 = results["sub-01_lh_V1_untuned.joblib"]
    assert truth["planted"][v1["vertices"]].all()
    # Noise-only control: the same features and protocol on unplanted vertices.
    data = nu.NODSubjectData(root, 1, sessions=[1], runs=[1, 2, 3, 4], image_size=64)
    noise = np.flatnonzero(~truth["planted"])[:50]
    feats = utils.extract_features(utils.load_alexnet("none"), data.images, 200)
    control = encoding.encode_roi(feats, np.ascontiguousarray(data.betas[:, noise]), data.train, data.test,
                                  utils.cv_folds(data.train, 5))
    ceiling = np.sqrt(1.0 / 2.0)  # snr 1: corr(fMRI, signal) = sqrt(snr / (1 + snr))
    assert np.mean(v1["test_r"]) > 0.35 * ceiling
    assert np.mean(v1["test_r"]) > np.mean(control["test_r"]) + 0.2
    assert abs(np.mean(control["test_r"])) < 0.1
    row = table[(table["roi"] == "V1") & (table["method"] == "untuned")].iloc[0]
    assert row["mean_test_r"] == pytest.approx(np.mean(v1["test_r"]))
    assert row["mean_cv_r"] == pytest.approx(np.mean(v1["cv_r"]))
    saved = pd.read_csv(root / "encoding_results" / "nod" / "summary.csv")
    assert len(saved) == 2 and (root / "encoding_results" / "nod" / "nod_transfer.pdf").stat().st_size > 0


def test_tuned_model_of_an_nsd_subject_extracts_nod_features(nod_run, tmp_path, capsys):
    import shutil
    import models
    import fit_encoding_models_nod as script
    src, _, _, _ = nod_run
    root = tmp_path / "root"
    shutil.copytree(src / "nod", root / "nod")
    shutil.copytree(src / "encoding_results", root / "encoding_results")
    args = ["--root", str(root), "--subjects", "1", "--sessions", "1", "--runs", "1", "2", "3", "4",
            "--rois", "V1", "--hemispheres", "lh", "--methods", "untuned", "cl-tuned", "--weights", "none",
            "--image-size", "64", "--batch-size", "200", "--model-subj", "2", "--cl-epochs", "3"]
    with pytest.raises(SystemExit) as e:
        script.main(args)
    assert e.value.code == 2
    expected = utils.cl_model_path(root, 2, "lh", "V1v", 3)
    assert f"no cl-tuned checkpoint at {expected}" in capsys.readouterr().err
    model = models.CLModel(20, weights="none", seed=1)
    models.save_checkpoint(model, {"kind": "cl", "n_voxels": 20, "h": model.h, "z": model.z, "subject": 2,
                                   "hemisphere": "lh", "roi": "V1v", "weights": "none"}, expected)
    table = script.main(args)
    cl = table[table["method"] == "cl-tuned"].iloc[0]
    assert (cl["nsd_roi"], cl["model_subj"], cl["n_voxels"]) == ("V1v", 2, 50)
    untuned = table[(table["method"] == "untuned") & (table["roi"] == "V1")].iloc[0]
    assert cl["mean_test_r"] != untuned["mean_test_r"]
    import joblib
    r_cl = joblib.load(script.result_path(root, 1, "lh", "V1", "cl-tuned"))["test_r"]
    r_un = joblib.load(script.result_path(root, 1, "lh", "V1", "untuned"))["test_r"]
    assert cl["pct_improved_over_untuned"] == pytest.approx(100 * np.mean(r_cl > r_un))
