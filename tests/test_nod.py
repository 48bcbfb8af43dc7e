"""NOD: CIFTI I/O, run z-scoring, checks against events, labels, hemispheres, top-R2 selection, missing files."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.stats

import encoding_results
import nod_utils as nu
import safe_io
import utils
from conftest import run_error, save_untrained_checkpoint


def _write_run(nod, subj, session, run, data, n_left, names=None):
    """A cortex-only beta file and its events file, maps named after the stimuli (as in ds004496)."""
    stims = [f"imagenet/n{run:08d}/n{run:08d}_{session}{t}.JPEG" for t in range(len(data))]
    nu.write_cortex_dscalar(data, n_left, nu.beta_path(nod, subj, session, run),
                            map_names=names or [s.split("/")[-1] for s in stims])
    events = pd.DataFrame({"onset": 4.0 * np.arange(len(data)), "duration": 1.0,
                           "trial_type": np.arange(len(data)) % 7 + 1.0, "response_time": 0.5, "stim_file": stims})
    path = nu.events_path(nod, subj, session, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    events.to_csv(path, sep="\t", index=False)
    return nu.beta_path(nod, subj, session, run)


def test_cifti_round_trip_keeps_only_cortex(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((7, 11 + 13 + 5)).astype(np.float32)
    path = tmp_path / "x.dscalar.nii"
    names = [f"n0_{i}.JPEG" for i in range(7)]
    nu.write_cortex_dscalar(data, 11, path, n_subcortical=5, map_names=names, mesh_sizes=(14, 15))
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    structures = [(name, len(bm.vertex)) for name, _, bm in img.header.get_axis(1).iter_structures()]
    assert [s for s, _ in structures] == ["CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT",
                                          "CIFTI_STRUCTURE_THALAMUS_LEFT"]
    left = img.header.get_axis(1).vertex[:11]
    np.testing.assert_array_equal(left, [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13])  # a medial-wall gap
    cortex, n_left, read_names = nu.read_cortex_dscalar(path)
    assert n_left == 11 and read_names == names
    np.testing.assert_array_equal(cortex, data[:, :24])


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy on the constant vertex
def test_run_zscore_is_scipy_zscore_over_the_whole_block():
    block = np.array([[0.0, 2.0], [4.0, 6.0]])
    # Hand-computed: mean 3, population std sqrt(5).
    np.testing.assert_allclose(nu.zscore_runs(block, [2]), np.array([[-3, -1], [1, 3]]) / np.sqrt(5), rtol=1e-6)
    rng = np.random.default_rng(1)
    betas = rng.normal(3, 2, size=(30, 9)) * rng.uniform(0.5, 3, 9)
    betas[10:, 4] = 7.0  # constant within the second and third runs
    lengths = [10, 12, 8]
    starts = np.cumsum([0] + lengths)
    run = nu.zscore_runs(betas, lengths, "run")
    vertex = nu.zscore_runs(betas, lengths, "vertex")
    assert run.dtype == vertex.dtype == np.float32
    for a, b in zip(starts[:-1], starts[1:]):
        np.testing.assert_allclose(run[a:b], scipy.stats.zscore(betas[a:b], axis=None), rtol=1e-5, atol=1e-6)
        expected = np.nan_to_num(scipy.stats.zscore(betas[a:b], axis=0))  # constant vertex: scipy NaN, here 0
        np.testing.assert_allclose(vertex[a:b], expected, rtol=1e-5, atol=1e-6)
    assert (vertex[10:, 4] == 0).all() and not np.allclose(run[10:, 4], 0)
    np.testing.assert_array_equal(nu.zscore_runs(np.full((3, 2), 5.0), [3]), 0)


def test_betas_are_zscored_per_run_and_cached_per_normalisation(tmp_path):
    rng = np.random.default_rng(1)
    nod, raw = tmp_path / "nod", []
    for session in (1, 2):
        for run in (1, 2, 3):
            data = rng.normal(5 * run, 1 + session, size=(20, 9)).astype(np.float32) * rng.uniform(1, 4, 9)
            _write_run(nod, 1, session, run, data, 4)
            raw.append(data)
    args = dict(sessions=[1, 2], runs=[1, 2, 3])
    run = nu.load_betas(nod, 1, **args)
    vertex = nu.load_betas(nod, 1, zscore="vertex", **args)
    np.testing.assert_allclose(run, np.concatenate([scipy.stats.zscore(r.astype(np.float64), axis=None)
                                                    for r in raw]), atol=1e-5)
    np.testing.assert_allclose(vertex, np.concatenate([scipy.stats.zscore(r.astype(np.float64), axis=0)
                                                       for r in raw]), atol=1e-5)
    caches = {z: nu.beta_cache_path(nod, 1, zscore=z, **args) for z in ("run", "vertex")}
    assert caches["run"] != caches["vertex"] and all(p.is_file() for p in caches.values())
    assert "zscore-run" in caches["run"].name and "zscore-vertex" in caches["vertex"].name
    # The cache is what a second call returns while its inputs are unchanged; a raw file must be there.
    mtime = caches["run"].stat().st_mtime_ns
    np.testing.assert_array_equal(nu.load_betas(nod, 1, **args), run)
    assert caches["run"].stat().st_mtime_ns == mtime
    nu.beta_path(nod, 1, 1, 1).unlink()
    with pytest.raises(safe_io.UserError, match="datalad get derivatives/ciftify/sub-01/results/"
                                              "ses-imagenet01_task-imagenet_run-1/"):
        nu.load_betas(nod, 1, **args)
    with pytest.raises(safe_io.UserError, match="unknown ZSCORE 'session'"):
        nu.load_betas(nod, 1, zscore="session", **args)


def test_beta_maps_must_follow_the_events_and_be_finite(tmp_path):
    nod, data = tmp_path / "nod", np.random.default_rng(2).standard_normal((5, 10))
    _write_run(nod, 2, 1, 1, data, 4)
    names = [f"n00000002_1{t}.JPEG" for t in range(5)]
    names[2], names[3] = names[3], names[2]
    path = _write_run(nod, 2, 1, 2, data, 4, names=names)
    with pytest.raises(safe_io.UserError, match=f"map 2 of {path} is named 'n00000002_13.JPEG' but row 2 of .* "
                                              r"shows 'n00000002_12.JPEG' \(2 of 5 differ\)"):
        nu.load_betas(nod, 2, sessions=[1], runs=[1, 2])
    path = _write_run(nod, 2, 1, 2, data, 4)
    nu.write_cortex_dscalar(data[:4], 4, path, map_names=[f"n00000002_1{t}.JPEG" for t in range(4)])
    with pytest.raises(safe_io.UserError, match=f"{path} has 4 beta maps but .* lists 5 trials"):
        nu.load_betas(nod, 2, sessions=[1], runs=[1, 2])
    bad = data.copy()
    bad[3, 7] = np.nan
    path = _write_run(nod, 2, 1, 2, bad, 4)
    with pytest.raises(safe_io.UserError, match=f"{path} has a non-finite beta \\(nan\\) in map 3, cortical column 7"):
        nu.load_betas(nod, 2, sessions=[1], runs=[1, 2])


def test_mismatched_run_widths_are_a_user_error(tmp_path):
    nod = tmp_path / "nod"
    _write_run(nod, 2, 1, 1, np.random.default_rng(0).random((5, 10)), 4)
    _write_run(nod, 2, 1, 2, np.random.default_rng(1).random((5, 11)), 4)
    with pytest.raises(safe_io.UserError, match="cortical grayordinates"):
        nu.load_betas(nod, 2, sessions=[1], runs=[1, 2])


AREAS = ["V1", "MST", "V6", "V2", "V3", "V4", "V8", "4"]


def _write_support(nod, mmp, n_classes=10):
    """The three support files in their real formats (roilbl_mmp.csv with a non-UTF-8 header line)."""
    sup = nu.support_dir(nod)
    sup.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(sup / "MMP_mpmLR32k.mat", {"glasser_MMP": np.asarray(mmp)[None, :].astype(np.float64)})
    rows = "".join(f"L_{a}_ROI,R_{a}_ROI\n" for a in AREAS)
    (sup / "roilbl_mmp.csv").write_bytes(b"\xc3\xfb\xb3\xc6,\xc3\xfb\xb3\xc6\n" + rows.encode())
    pd.DataFrame({"classID": [f"n{i:08d}" for i in range(n_classes)], "superClassID": np.arange(n_classes) % 3 + 1,
                  "className": [f"c{i}" for i in range(n_classes)],
                  "superClassName": [f"s{i % 3}" for i in range(n_classes)]}).to_csv(sup / "superClassMapping.csv",
                                                                                   index=False)


def test_hemisphere_conventions_on_a_hand_made_atlas(tmp_path):
    # CORTEX_LEFT = the first 5 grayordinates, labelled 181.. as in the real MMP_mpmLR32k.mat,
    # except grayordinate 3, which carries label 1 (V1 numbered as a 'left' label).
    mmp = np.array([181, 184, 181, 1, 186, 1, 4, 1, 6, 181, 0])
    nod = tmp_path / "nod"
    _write_support(nod, mmp)
    assert [nu.mmp_area_index(nod)[a] for a in nu.NOD_ROIS] == [1, 4, 5, 6]
    lh = {roi: nu.roi_vertices(nod, roi, "left", 5).tolist() for roi in ("V1", "V2", "V4")}
    rh = {roi: nu.roi_vertices(nod, roi, "right", 5).tolist() for roi in ("V1", "V2", "V4")}
    assert lh == {"V1": [0, 2, 3], "V2": [1], "V4": [4]}
    assert rh == {"V1": [5, 7, 9], "V2": [6], "V4": [8]}
    # The authors' code: 'left' = labels 1..180 wherever they are, 'right' = 181..360.
    assert nu.roi_vertices(nod, "V1", "lh", 5, "authors").tolist() == [3, 5, 7]
    assert nu.roi_vertices(nod, "V1", "rh", 5, "authors").tolist() == [0, 2, 9]
    assert nu.roi_vertices(nod, "V4", "lh", 5, "authors").tolist() == [8]
    with pytest.raises(safe_io.UserError, match="unknown HCP-MMP area 'V9'"):
        nu.roi_vertices(nod, "V9", "left", 5)
    with pytest.raises(safe_io.UserError, match="unknown HEMISPHERE_CONVENTION 'nsd'"):
        nu.roi_vertices(nod, "V1", "left", 5, "nsd")


def test_top_vertices_are_the_authors_argsort_tail():
    r2 = np.array([0.1, 0.9, 0.3, 0.7, 0.5])
    # Candidates 0, 2, 3, 4 have R2 0.1, 0.3, 0.7, 0.5: the top two, in ascending R2, are 4 then 3.
    assert nu.top_vertices(r2, [0, 2, 3, 4], k=2).tolist() == [4, 3]
    assert nu.top_vertices(r2, [0, 2, 3, 4], k=9).tolist() == [0, 2, 4, 3]
    rng = np.random.default_rng(3)
    r2 = rng.integers(0, 4, 1000).astype(np.float32)  # many ties across the cut
    cand = np.sort(rng.choice(1000, 300, replace=False))
    authors = cand[np.argsort(r2[cand].astype(np.float64))[-50:]]
    np.testing.assert_array_equal(nu.top_vertices(r2, cand), authors)


def test_select_vertices_reproduces_the_authors_pipeline(tmp_path, capsys):
    rng = np.random.default_rng(4)
    n_left, n = 400, 800
    mmp = np.concatenate([rng.integers(181, 189, n_left), rng.integers(1, 9, n - n_left)])
    params = (rng.uniform(0, 100, size=(5, n + 4)) // 5).astype(np.float32)  # many ties
    params[3, rng.choice(n, 60, replace=False)] = np.nan
    nod = tmp_path / "nod"
    _write_support(nod, mmp)
    nu.write_cortex_dscalar(params, n_left, nu.prf_params_path(nod, 4), n_subcortical=4,
                            map_names=["ang", "ecc", "gain", "R2", "rfsize"])
    r2, left = nu.load_prf_r2(nod, 4)
    assert left == n_left and r2.dtype == np.float64
    np.testing.assert_array_equal(r2, np.nan_to_num(params[3, :n]))
    # The authors: r2 = get_fdata()[3, :59412]; NaN -> 0; np.argsort(r2[roi])[-50:], with 'L' = labels 1..180.
    full = np.asarray(nib.load(str(nu.prf_params_path(nod, 4))).get_fdata())[3, :n]
    for roi, area in zip(nu.NOD_ROIS, (1, 4, 5, 6)):
        for hemi, label in (("lh", area), ("rh", area + 180)):
            roi_idx = np.flatnonzero(mmp == label)
            authors = roi_idx[np.argsort(np.nan_to_num(full[roi_idx]))[-50:]]
            np.testing.assert_array_equal(nu.select_vertices(nod, 4, roi, hemi, convention="authors"), authors)
    # Anatomical: the left hemisphere is the CORTEX_LEFT block, whatever its label numbers.
    lh = nu.select_vertices(nod, 4, "V1", "lh")
    assert lh.max() < n_left and set(lh) <= set(np.flatnonzero(mmp == 181))
    assert set(nu.select_vertices(nod, 4, "V1", "rh")) == set(nu.select_vertices(nod, 4, "V1", "lh",
                                                                                   convention="authors"))
    params[3] = 0
    nu.write_cortex_dscalar(params, n_left, nu.prf_params_path(nod, 4), n_subcortical=4,
                            map_names=["a", "b", "c", "d", "e"])  # unnamed maps: R2 is map 3
    capsys.readouterr()
    top = nu.select_vertices(nod, 4, "V2", "lh")
    k = len(top)
    assert f"warning: sub-04 lh V2: {k} of the {k} selected vertices have pRF R2 <= 0" in capsys.readouterr().out
    nu.write_cortex_dscalar(params, n_left, nu.prf_params_path(nod, 4), n_subcortical=4,
                            map_names=["ang", "ecc", "R2", "gain", "x"])
    with pytest.raises(safe_io.UserError, match="names map 2 'R2' .* but R2 is read from map 3"):
        nu.load_prf_r2(nod, 4)


def test_labels_come_from_events_and_superclass_mapping(tmp_path):
    nod = tmp_path / "nod"
    _write_support(nod, np.ones(10, int), n_classes=10)
    rows = []
    for session, run in ((1, 1), (1, 2)):
        ev = pd.DataFrame({"onset": np.arange(4) * 2.0, "duration": 1.0,
                           "trial_type": [3.0, 10.0, 1.0, 3.0 + run], "response_time": [0.5, np.nan, 0.7, 0.8],
                           "stim_file": [f"imagenet/n{run:08d}/n{run:08d}_{i}.JPEG" for i in range(4)]})
        path = nu.events_path(nod, 6, session, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        ev.to_csv(path, sep="\t", index=False, na_rep="n/a")
        rows.append(ev)
    labels = nu.trial_labels(nod, 6, sessions=[1], runs=[1, 2])
    nu.save_labels(nod, 6, labels)
    events = pd.concat(rows, ignore_index=True)
    assert list(labels.columns) == ["class_id", "image_name", "superclass_id"]
    assert labels["class_id"].dtype == np.int64
    np.testing.assert_array_equal(labels["class_id"], events["trial_type"])
    np.testing.assert_array_equal(labels["superclass_id"], (events["trial_type"] - 1) % 3 + 1)
    saved = pd.read_csv(nu.label_csv_path(nod, 6))
    pd.testing.assert_frame_equal(saved, labels, check_dtype=False)
    assert nu.stimulus_path(nod, "imagenet/n1/x.JPEG") == nu.stimulus_path(nod, "n1/x.JPEG") \
        == nod / "stimuli" / "imagenet" / "n1" / "x.JPEG"
    rows[1].loc[2, "trial_type"] = 2.5
    rows[1].to_csv(nu.events_path(nod, 6, 1, 2), sep="\t", index=False)
    with pytest.raises(safe_io.UserError, match="trial_type 2.5 of sub-06 is not a class id in 1..10"):
        nu.trial_labels(nod, 6, sessions=[1], runs=[1, 2])


def test_synthetic_tree_has_the_structure_of_ds004496(tiny_nod):
    import re
    import synthetic_data
    nod = tiny_nod / "nod"
    mapping = pd.read_csv(nu.superclass_path(nod))
    assert list(mapping.columns) == ["classID", "superClassID", "className", "superClassName"]
    assert len(mapping) == 1000 and mapping["classID"].is_monotonic_increasing
    assert mapping["classID"].str.fullmatch(r"n\d{8}").all() and mapping["superClassID"].between(1, 30).all()
    for run in (1, 2):
        events = pd.read_csv(nu.events_path(nod, 1, 1, run), sep="\t")
        assert list(events.columns) == ["onset", "duration", "trial_type", "response_time", "stim_file"] \
            + (["response"] if run == 2 else [])
        assert events["trial_type"].dtype == events["onset"].dtype == events["response_time"].dtype == np.float64
        assert "n/a" in nu.events_path(nod, 1, 1, run).read_text()  # trials without a response
        wnids = [re.fullmatch(r"imagenet/(n\d{8})/\1_\d+\.JPEG", s).group(1) for s in events["stim_file"]]
        assert wnids == mapping["classID"].to_numpy()[events["trial_type"].astype(int) - 1].tolist()
        img = nib.load(str(nu.beta_path(nod, 1, 1, run)))
        assert img.get_data_dtype() == np.float32 and img.shape == (10, 600)
        assert [n for n, _, _ in img.header.get_axis(1).iter_structures()] == list(nu.CORTEX_STRUCTURES)
        assert list(img.header.get_axis(0).name) == [s.split("/")[-1] for s in events["stim_file"]]
    lines = nu.roi_labels_path(nod).read_text().splitlines()
    assert not lines[0].startswith("L_")
    assert lines[1:] == [f"L_{a}_ROI,R_{a}_ROI" for a in synthetic_data.NOD_MMP_AREAS]
    mmp = nu.load_mmp(nod)
    assert (mmp[:300] > 180).all() and ((mmp[300:] >= 1) & (mmp[300:] <= 180)).all()
    prf = nib.load(str(nu.prf_params_path(nod, 1)))
    assert list(prf.header.get_axis(0).name) == ["ang", "ecc", "gain", "R2", "rfsize"]
    r2, n_left = nu.load_prf_r2(nod, 1)
    truth = np.load(tiny_nod / "synthetic_truth" / "nod" / "sub-01_truth.npz")
    assert n_left == 300 and (r2[truth["planted"]] >= 30).all() and (r2[~truth["planted"]] < 10).all()


def test_left_hemisphere_is_the_cortex_left_block(tiny_nod):
    n_left = nu.read_cortex_dscalar(nu.beta_path(tiny_nod / "nod", 1, 1, 1))[1]
    data = nu.NODSubjectData(tiny_nod, 1, sessions=[1], runs=[1, 2], image_size=32)
    authors = nu.NODSubjectData(tiny_nod, 1, sessions=[1], runs=[1, 2], image_size=32,
                                hemisphere_convention="authors")
    truth = np.load(tiny_nod / "synthetic_truth" / "nod" / "sub-01_truth.npz")
    assert data.betas.shape == (20, 600) and data.images.shape == (20, 32, 32, 3)
    for run in (slice(0, 10), slice(10, 20)):  # one mean and one std per run block
        assert abs(float(np.mean(data.betas[run]))) < 1e-5 and float(np.std(data.betas[run])) == pytest.approx(1)
    for roi in nu.NOD_ROIS:
        lh, fmri = data.roi_fmri(roi, "left")
        rh, _ = data.roi_fmri(roi, "right")
        assert len(lh) == len(rh) == 50 and truth["planted"][np.concatenate([lh, rh])].all()
        assert lh.max() < n_left <= rh.min()
        np.testing.assert_array_equal(fmri, np.asarray(data.betas)[:, lh])
        # The authors' 'left' (labels 1..180) is the right cortex of these files, as of the real ones.
        np.testing.assert_array_equal(authors.roi_fmri(roi, "left")[0], rh)
        np.testing.assert_array_equal(authors.roi_fmri(roi, "right")[0], lh)


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
    with pytest.raises(safe_io.UserError) as err:
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
    results = {p.name: encoding_results.load_result(p) for p in (root / "encoding_results" / "nod").glob("sub-*/*.npz")}
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
    v1 = results["sub-01_lh_V1_untuned.npz"]
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


def test_tuned_model_of_an_nsd_subject_extracts_nod_features(nod_run, synthetic_root, tmp_path, capsys):
    import shutil
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
    # The checkpoint's meta as training writes it (on the NSD masks of the synthetic dataset); ROOT holds no NSD
    # masks, so only the trunk is checked.
    # A V2v model under the V1v name is refused before the betas are read, and nothing is written.
    save_untrained_checkpoint(synthetic_root, "cl-tuned", 2, "lh", "V2v", epochs=3, seed=1, path=expected)
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    err = run_error(script.main, args, capsys)
    assert f"checkpoint {expected} was made with roi='V2v', but this run asks for roi='V1v'" in err
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()) == before
    save_untrained_checkpoint(synthetic_root, "cl-tuned", 2, "lh", "V1v", epochs=3, seed=1, path=expected)
    table = script.main(args)
    cl = table[table["method"] == "cl-tuned"].iloc[0]
    assert (cl["nsd_roi"], cl["model_subj"], cl["n_voxels"]) == ("V1v", 2, 50)
    untuned = table[(table["method"] == "untuned") & (table["roi"] == "V1")].iloc[0]
    assert cl["mean_test_r"] != untuned["mean_test_r"]
    r_cl = encoding_results.load_result(encoding_results.nod_result_path(root, 1, "lh", "V1", "cl-tuned"))["test_r"]
    r_un = encoding_results.load_result(encoding_results.nod_result_path(root, 1, "lh", "V1", "untuned"))["test_r"]
    assert cl["pct_improved_over_untuned"] == pytest.approx(100 * np.mean(r_cl > r_un))


def test_results_record_their_settings_and_other_settings_are_refused(nod_run, capsys):
    import fit_encoding_models_nod as script
    root, table, _, results = nod_run
    assert nib.load(str(nu.beta_path(root / "nod", 1, 1, 4))).shape == (100, 1220)  # 100 maps per run
    assert {(r["zscore"], r["hemisphere_convention"]) for r in results.values()} == {("run", "anatomical")}
    assert set(zip(table["zscore"], table["hemisphere_convention"])) == {("run", "anatomical")}
    assert {r["engine_precision"] for r in results.values()} == {"fp64"}
    args = ["--root", str(root), "--subjects", "1", "--sessions", "1", "--runs", "1", "2", "3", "4",
            "--rois", "V1", "--hemispheres", "lh", "--methods", "untuned", "--weights", "none"]
    err = run_error(script.main, args + ["--zscore", "vertex"], capsys)
    assert str(encoding_results.nod_result_path(root, 1, "lh", "V1", "untuned")) in err and "--overwrite" in err
    assert "was made with zscore='run', but this run asks for zscore='vertex'" in err
    err = run_error(script.main, args + ["--image-size", "64", "--engine-precision", "mixed"], capsys)
    assert "was made with engine_precision='fp64', but this run asks for engine_precision='mixed'" in err
    err = run_error(script.main, args + ["--hemisphere-convention", "nsd"], capsys)
    assert "--hemisphere-convention nsd: allowed one of anatomical, authors" in err


def test_a_truncated_result_is_one_line_and_overwrite_repairs_it(nod_run, tmp_path, capsys):
    import shutil
    import fit_encoding_models_nod as script
    src, _, _, results = nod_run
    root = tmp_path / "root"
    shutil.copytree(src / "nod", root / "nod")
    shutil.copytree(src / "encoding_results", root / "encoding_results")
    path = encoding_results.nod_result_path(root, 1, "lh", "V1", "untuned")
    # The NSD format: plain arrays in the .npz (readable without pickle), the other fields in the .json.
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["alpha_index", "alphas", "cv_r", "test_r", "vertices"]
    assert json.loads(path.with_suffix(".json").read_text())["nsd_roi"] == "V1v"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    args = ["--root", str(root), "--subjects", "1", "--sessions", "1", "--runs", "1", "2", "3", "4",
            "--rois", "V1", "--hemispheres", "lh", "--methods", "untuned", "--weights", "none",
            "--image-size", "64", "--batch-size", "200"]
    err = run_error(script.main, args, capsys)
    assert f"cannot read the result {path}" in err and "--overwrite" in err
    script.main(args + ["--overwrite"])
    assert np.array_equal(encoding_results.load_result(path)["test_r"], results["sub-01_lh_V1_untuned.npz"]["test_r"])
