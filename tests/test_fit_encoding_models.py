"""fit_encoding_models.py on the synthetic dataset (64 px, seeded random AlexNet, CPU)."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import conftest
import encoding
import encoding_results
import figures
import fit_encoding_models as fem
import generate_results
import utils
from conftest import save_untrained_checkpoint

FAST = ["--weights", "none", "--device", "cpu", "--image-size", "64", "--batch-size", "128"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_error(argv, capsys):
    return conftest.run_error(fem.main, argv, capsys)


def run_transfer_matrix(root, *argv):
    """generate_results --type transfer-matrix of cl-tuned, left hemisphere (unless ``argv`` says otherwise):
    (table, {group: (mean_r, frac, stem)})."""
    hemispheres = [] if "--hemispheres" in argv else ["--hemispheres", "left"]  # a list flag is given once
    return generate_results.main(["--root", str(root), "--type", "transfer-matrix", "--method", "cl-tuned",
                                  *hemispheres, *argv])


def untuned_reference(root, subj, hemi, roi, alexnet=None, n_components=encoding.N_COMPONENTS):
    """encode_roi run directly on the subject's data (the independent path the script must match)."""
    images = utils.subject_images(root, subj, 64)
    train, test = utils.train_test_split(len(images))
    voxels = utils.roi_voxel_indices(root, subj, hemi, roi)
    layers = encoding.layer_features(alexnet or utils.load_alexnet("none", 0), images, batch_size=128)
    return encoding.encode_roi(layers, utils.load_fmri(root, subj, hemi, voxels), train, test, utils.cv_folds(train),
                               n_components=n_components)


def save_cl_checkpoint(root, subj, hemi, roi, seed):
    """A seeded untrained CL checkpoint (1 epoch) with the meta the training script writes."""
    return save_untrained_checkpoint(root, "cl-tuned", subj, hemi, roi, epochs=1, seed=seed)[0]


def test_untuned_results_summaries_absent_rois_and_resume(root, capsys):
    argv = ["--root", str(root), "--rois", "V1v", "mTL-words", "EBA"] + FAST
    written = fem.main(argv + ["--min-voxels", "20"])
    out = capsys.readouterr().out
    # lh mTL-words has 10 voxels in Subj1: under MIN_VOXELS 20 (the 2024 figures), skipped with a line
    # and recorded as absent.
    assert written["mTL-words"] is None
    assert "skip mTL-words: 10 voxels in lh of Subj1 (fewer than MIN_VOXELS=20)" in out
    absent = json.loads((utils.encoding_dir(root, 1) / "absent_rois.json").read_text())
    assert absent == {"lh": {"mTL-words": 10}}
    assert not encoding_results.result_path(root, 1, "untuned", "lh", "mTL-words").exists()

    results = {}
    for roi in ("V1v", "EBA"):
        assert written[roi] == encoding_results.result_path(root, 1, "untuned", "lh", roi)
        r = results[roi] = encoding_results.load_result(written[roi])
        ref = untuned_reference(root, 1, "lh", roi)
        assert r["best_layer"] == ref["best_layer"]
        assert r["layer_scores"] == pytest.approx(ref["layer_scores"], abs=1e-10)
        np.testing.assert_allclose(r["cv_r"], ref["cv_r"], atol=1e-10)
        np.testing.assert_allclose(r["test_r"], ref["test_r"], atol=1e-10)
        np.testing.assert_array_equal(r["alphas"], ref["alphas"])
        np.testing.assert_array_equal(r["voxels"], utils.roi_voxel_indices(root, 1, "lh", roi))
        assert r["layer_scores"][r["best_layer"]] == max(r["layer_scores"].values())

    # Summaries match the per-ROI results.
    scores = pd.read_csv(utils.encoding_dir(root, 1) / "untuned" / "layer_scores.csv")
    assert list(scores["roi"]) == ["V1v", "EBA"]
    for _, row in scores.iterrows():
        r = results[row["roi"]]
        assert row["best_layer"] == r["best_layer"]
        np.testing.assert_allclose(row[utils.LAYERS].to_numpy(float), [r["layer_scores"][k] for k in utils.LAYERS])
    methods = pd.read_csv(utils.encoding_dir(root, 1) / "methods.csv")
    for _, row in methods.iterrows():
        r = results[row["roi"]]
        assert row["mean_cv_r"] == pytest.approx(r["cv_r"].mean()) and row["mean_test_r"] == pytest.approx(r["test_r"].mean())
        assert row["n_voxels"] == len(r["voxels"]) and np.isnan(row["pct_beats_untuned"])

    # Rerun: finished ROIs are skipped untouched; --overwrite refits them.
    before = written["EBA"].stat().st_mtime_ns
    again = fem.main(argv)
    assert again["EBA"] is None and f"skip EBA: {written['EBA']} exists" in capsys.readouterr().out
    assert written["EBA"].stat().st_mtime_ns == before
    fem.main(["--root", str(root), "--rois", "EBA", "--overwrite"] + FAST)
    assert written["EBA"].stat().st_mtime_ns != before
    # Refitted alone, EBA gets the numbers it got in the pass shared with V1v (to rounding).
    np.testing.assert_allclose(encoding_results.load_result(written["EBA"])["test_r"], results["EBA"]["test_r"], rtol=0, atol=1e-12)
    # With the default MIN_VOXELS (1, the authors' current code) the reruns above fitted mTL-words: no longer absent.
    words = encoding_results.result_path(root, 1, "untuned", "lh", "mTL-words")
    assert again["mTL-words"] == words and len(encoding_results.load_result(words)["voxels"]) == 10
    assert json.loads((utils.encoding_dir(root, 1) / "absent_rois.json").read_text()) == {"lh": {}}


def test_figures_show_the_saved_results(root):
    fem.main(["--root", str(root), "--rois", "V1v", "EBA"] + FAST)
    results = encoding_results.collect_results(root, 1)
    table = pd.read_csv(utils.encoding_dir(root, 1) / "untuned" / "layer_scores.csv")
    fig = figures.plot_layer_scores(table, root / "heat.png")
    image = fig.axes[0].images[0].get_array()
    for i, roi in enumerate(table["roi"]):
        r = results["untuned", "lh", roi]
        np.testing.assert_allclose(image[i], [r["layer_scores"][k] for k in utils.LAYERS])
        box, = [p for p in fig.axes[0].patches if p.get_y() == i - 0.5]
        assert box.get_x() + 0.5 == utils.LAYERS.index(r["best_layer"])
    assert (root / "heat.pdf").stat().st_size > 0

    methods = pd.read_csv(utils.encoding_dir(root, 1) / "methods.csv")
    fig = figures.plot_methods(methods, root / "bars.png")
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([results["untuned", "lh", roi]["test_r"].mean() for roi in ("V1v", "EBA")])


def test_missing_checkpoint_names_file_and_script(root, capsys):
    err = run_error(["--root", str(root), "--method", "cl-tuned", "--rois", "EBA", "--cl-epochs", "3"] + FAST, capsys)
    assert str(utils.cl_model_path(root, 1, "lh", "EBA", 3)) in err
    assert "cl_model_training.py --subj 1 --hemisphere lh --roi EBA --epochs 3" in err
    err = run_error(["--root", str(root), "--method", "pooled-avg", "--rois", "EBA"] + FAST, capsys)
    assert str(utils.pooled_model_path(root, "lh", "EBA", 30, "avg")) in err and "pooled_model_training.py" in err
    assert not (utils.encoding_dir(root, 1) / "cl-tuned").exists()


def test_untuned_layer_protocol_needs_and_reuses_untuned_choice(root, capsys):
    save_cl_checkpoint(root, 1, "lh", "EBA", seed=1)
    save_cl_checkpoint(root, 1, "lh", "V1v", seed=2)
    argv = ["--root", str(root), "--method", "cl-tuned", "--cl-epochs", "1", "--protocol", "untuned-layer"] + FAST
    err = run_error(argv + ["--rois", "EBA"], capsys)
    assert str(encoding_results.result_path(root, 1, "untuned", "lh", "EBA")) in err and "--method untuned" in err
    fem.main(["--root", str(root), "--rois", "EBA"] + FAST)
    # V1v has no untuned result: the run stops before it writes EBA's result or records
    # the absent mTL-words, so every input is checked before the first output.
    before = conftest.snapshot(root)
    err = run_error(argv + ["--rois", "EBA", "mTL-words", "V1v", "--min-voxels", "20"], capsys)
    assert f"no untuned result at {encoding_results.result_path(root, 1, 'untuned', 'lh', 'V1v')}" in err
    assert conftest.snapshot(root) == before
    written = fem.main(argv + ["--rois", "EBA"])
    assert written["EBA"] == encoding_results.result_path(root, 1, "cl-tuned_untuned-layer", "lh", "EBA")
    base, r = encoding_results.load_result(encoding_results.result_path(root, 1, "untuned", "lh", "EBA")), encoding_results.load_result(written["EBA"])
    assert r["best_layer"] == base["best_layer"] and r["protocol"] == "untuned-layer"
    np.testing.assert_array_equal(r["alpha_index"], base["alpha_index"])


def test_transfer_uses_the_model_subjects_checkpoint_and_fills_the_matrix(root, capsys):
    model = save_cl_checkpoint(root, 2, "lh", "EBA", seed=1)
    save_cl_checkpoint(root, 1, "lh", "EBA", seed=2)
    common = ["--root", str(root), "--rois", "EBA"] + FAST
    cl = ["--method", "cl-tuned", "--cl-epochs", "1"]
    fem.main(common)
    transfer = fem.main(common + cl + ["--model-subj", "2"])["EBA"]
    own = fem.main(common + cl)["EBA"]
    assert transfer == encoding_results.result_path(root, 1, "cl-tuned_from-Subj2", "lh", "EBA")
    r = encoding_results.load_result(transfer)
    assert r["model_subj"] == 2 and r["subject"] == 1
    assert r["checkpoint"] == str(utils.cl_model_path(root, 2, "lh", "EBA", 1))
    # Subject 2's trunk applied to subject 1's images and fMRI.
    ref = untuned_reference(root, 1, "lh", "EBA", alexnet=model.alexnet.eval())
    np.testing.assert_allclose(r["test_r"], ref["test_r"], atol=1e-10)
    untuned = encoding_results.load_result(encoding_results.result_path(root, 1, "untuned", "lh", "EBA"))
    assert not np.allclose(r["test_r"], untuned["test_r"])

    methods = pd.read_csv(utils.encoding_dir(root, 1) / "methods.csv").set_index("tag")
    assert set(methods.index) == {"untuned", "cl-tuned", "cl-tuned_from-Subj2"}
    assert methods.loc["cl-tuned_from-Subj2", "pct_beats_untuned"] == pytest.approx(
        100 * np.mean(r["test_r"] > untuned["test_r"]))
    assert (utils.encoding_dir(root, 1) / "scatter_cl-tuned_from-Subj2_vs_untuned_lh.pdf").is_file()
    fig = figures.plot_scatter(untuned["test_r"], r["test_r"], "cl-tuned", root / "scatter.png")
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), np.column_stack([untuned["test_r"], r["test_r"]]))
    assert f"{methods.loc['cl-tuned_from-Subj2', 'pct_beats_untuned']:.1f}%" in fig.axes[0].get_title()

    table, matrices = run_transfer_matrix(root, "--rois", "EBA", "V1v", "--protocol", "per-method")
    # V1v has no result at all, so the 'all' group is EBA alone; 'early' (V1v) has no matrix.
    assert set(matrices) == {"all", "higher"}
    mean_r, frac, _ = matrices["all"]
    own_r = encoding_results.load_result(own)
    assert mean_r.loc[2, 1] == pytest.approx(r["test_r"].mean())
    assert mean_r.loc[1, 1] == pytest.approx(own_r["test_r"].mean())
    assert frac.loc[2, 1] == pytest.approx(np.mean(r["test_r"] > untuned["test_r"]))
    assert list(mean_r.index) == [1, 2] and list(mean_r.columns) == [1] and not mean_r.isna().any().any()
    saved = pd.read_csv(root / "encoding_results" / "transfer_cl-tuned_lh_all_mean_r.csv", index_col=0)
    np.testing.assert_allclose(saved.to_numpy(), mean_r.to_numpy())
    assert list(table["status"]) == ["fitted", "fitted", "missing", "missing"]
    assert (root / "encoding_results" / "transfer_cl-tuned_lh_all.png").is_file()
    err = conftest.run_error(generate_results.main, ["--root", str(root), "--type", "transfer-matrix",
                                                      "--method", "untuned"], capsys)
    assert "--method cl-tuned or reg-tuned" in err


def test_constant_voxel_gets_r_zero_and_a_warning(synthetic_root, tmp_path, capsys):
    for name in ("training_images", "roi_masks"):
        os.symlink(synthetic_root / name, tmp_path / name)
    shutil.copytree(synthetic_root / "training_fmri", tmp_path / "training_fmri")
    voxels = utils.roi_voxel_indices(tmp_path, 1, "lh", "EBA")
    path = utils.fmri_path(tmp_path, 1, "lh")
    fmri = np.load(path)
    fmri[:, voxels[[3, 7]]] = 1.5
    np.save(path, fmri)
    written = fem.main(["--root", str(tmp_path), "--rois", "EBA"] + FAST)
    assert "warning: EBA: 2 constant voxel(s) on the training split; their r is set to 0" in capsys.readouterr().out
    r = encoding_results.load_result(written["EBA"])
    assert r["n_constant"] == 2
    assert (r["cv_r"][[3, 7]] == 0).all() and (r["test_r"][[3, 7]] == 0).all()
    assert np.isfinite(r["test_r"]).all() and np.count_nonzero(r["test_r"]) == len(voxels) - 2


def test_untuned_pass_is_shared_by_overlapping_rois_and_resumes_per_roi(root, tmp_path_factory, monkeypatch, capsys):
    v1v, early = (utils.roi_voxel_indices(root, 1, "lh", r) for r in ("V1v", "early"))
    assert np.intersect1d(v1v, early).size > 0  # the case where sharing could go wrong
    calls = []
    fit_pca = encoding.fit_pca
    monkeypatch.setattr(encoding, "fit_pca", lambda *a, **k: calls.append(1) or fit_pca(*a, **k))
    written = fem.main(["--root", str(root), "--rois", "V1v", "early", "EBA"] + FAST)
    # One PCA per (layer, fold) and one refit per layer, for the three ROIs together.
    assert len(calls) == len(utils.LAYERS) * (5 + 1)

    # Each ROI fitted alone, by the script in another root, gives the same numbers.
    for roi in ("V1v", "early", "EBA"):
        alone = tmp_path_factory.mktemp(f"alone_{roi}")
        for name in ("training_images", "training_fmri", "roi_masks", "cache"):
            os.symlink(root / name, alone / name)
        ref = encoding_results.load_result(fem.main(["--root", str(alone), "--rois", roi] + FAST)[roi])
        r = encoding_results.load_result(written[roi])
        assert r["best_layer"] == ref["best_layer"]
        assert r["layer_scores"] == pytest.approx(ref["layer_scores"], abs=1e-10)
        np.testing.assert_array_equal(r["alpha_index"], ref["alpha_index"])
        np.testing.assert_allclose(r["cv_r"], ref["cv_r"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(r["test_r"], ref["test_r"], rtol=0, atol=1e-10)
    capsys.readouterr()

    # A run killed before early's result was written: the rerun fits early only.
    kept = {roi: written[roi].stat().st_mtime_ns for roi in ("V1v", "EBA")}
    before = encoding_results.load_result(written["early"])
    written["early"].unlink()
    written["early"].with_suffix(".json").unlink()
    calls.clear()
    again = fem.main(["--root", str(root), "--rois", "V1v", "early", "EBA"] + FAST)
    out = capsys.readouterr().out
    assert again["V1v"] is None and again["EBA"] is None and again["early"] == written["early"]
    assert "skip V1v" in out and "skip EBA" in out and "early: best layer" in out
    assert {roi: written[roi].stat().st_mtime_ns for roi in ("V1v", "EBA")} == kept
    np.testing.assert_allclose(encoding_results.load_result(written["early"])["test_r"], before["test_r"], rtol=0, atol=1e-10)
    assert len(calls) == len(utils.LAYERS) * (5 + 1)
    assert not list((root / "cache").glob(f"{encoding.SPILL_PREFIX}-*"))


def fake_result(root, subj, tag, hemi, roi, test_r, cv_r=None):
    """Save a result with chosen per-voxel r on the ROI's real voxels (the summaries read nothing else)."""
    voxels = utils.roi_voxel_indices(root, subj, hemi, roi)
    test_r = np.broadcast_to(np.asarray(test_r, dtype=float), voxels.shape).copy()
    cv_r = test_r if cv_r is None else np.broadcast_to(np.asarray(cv_r, dtype=float), voxels.shape).copy()
    method = tag.split("_")[0]
    encoding_results.save_result({"voxels": voxels, "alphas": np.ones(len(voxels)), "alpha_index": np.zeros(len(voxels), int),
                    "cv_r": cv_r, "test_r": test_r, "method": method, "subject": subj, "hemisphere": hemi,
                    "roi": roi, "model_subj": None, "protocol": "per-method", "best_layer": "features.2",
                    "layer_scores": {layer: 0.0 for layer in utils.LAYERS}},
                   encoding_results.result_path(root, subj, tag, hemi, roi))


def test_transfer_absent_zero_option_counts_absent_rois_as_zero(root):
    # lh FBA-2 is empty in Subj2: absent whenever Subj2 is the target or the model subject.
    nE, nF = (utils.roi_voxel_count(root, 1, "lh", r) for r in ("EBA", "FBA-2"))
    for target in (1, 2):
        fake_result(root, target, "untuned", "lh", "EBA", 0.0)
    fake_result(root, 1, "untuned", "lh", "FBA-2", 0.0)
    half = np.where(np.arange(nE) < nE // 2, 0.5, -0.5)  # improves over untuned on nE // 2 voxels
    fake_result(root, 1, "cl-tuned", "lh", "EBA", 0.2)
    fake_result(root, 1, "cl-tuned", "lh", "FBA-2", 0.4)
    fake_result(root, 1, "cl-tuned_from-Subj2", "lh", "EBA", half)  # mean 0 (nE is even)
    fake_result(root, 2, "cl-tuned_from-Subj1", "lh", "EBA", 0.3)
    fake_result(root, 2, "cl-tuned", "lh", "EBA", 0.1)
    base = ["--rois", "EBA", "FBA-2", "--protocol", "per-method"]
    table, matrices = run_transfer_matrix(root, *base, "--transfer-aggregation", "absent-zero")
    status = table.set_index(["roi", "model_subj", "target_subj"])["status"]
    assert status["FBA-2", 2, 1] == status["FBA-2", 1, 2] == status["FBA-2", 2, 2] == "absent"
    mean_r, frac, _ = matrices["higher"]
    # Rows: model subject, columns: target subject; each entry (EBA + FBA-2) / 2 with absent = 0.
    np.testing.assert_allclose(mean_r.loc[[1, 2], [1, 2]].to_numpy(),
                               [[(0.2 + 0.4) / 2, 0.3 / 2], [0.0 / 2, 0.1 / 2]], atol=1e-12)
    np.testing.assert_allclose(frac.loc[[1, 2], [1, 2]].to_numpy(),
                               [[1.0, 0.5], [(nE // 2 / nE) / 2, 0.5]], atol=1e-12)
    assert matrices["all"][0].equals(mean_r) and "early" not in matrices
    saved = pd.read_csv(root / "encoding_results" / "transfer_cl-tuned_lh_higher_absent-zero_mean_r.csv", index_col=0)
    np.testing.assert_allclose(saved.to_numpy(), mean_r.to_numpy())
    # The default (the authors'): FBA-2 is not present in every subject, so EBA alone.
    _, authors = run_transfer_matrix(root, *base)
    np.testing.assert_allclose(authors["higher"][0].loc[[1, 2], [1, 2]].to_numpy(), [[0.2, 0.3], [0.0, 0.1]], atol=1e-12)

    # The voxel-pooled option: absent ROIs add no voxels.
    _, pooled = run_transfer_matrix(root, *base, "--transfer-aggregation", "voxels")
    np.testing.assert_allclose(pooled["higher"][0].loc[[1, 2], [1, 2]].to_numpy(),
                               [[(0.2 * nE + 0.4 * nF) / (nE + nF), 0.3], [0.0, 0.1]], atol=1e-12)
    assert (root / "encoding_results" / "transfer_cl-tuned_lh_higher_voxels_mean_r.csv").is_file()

    # A present ROI that was never fitted makes its entries unknown instead of silently 0.
    fake_result(root, 1, "cl-tuned", "lh", "aTL-faces", 0.6)
    _, matrices = run_transfer_matrix(root, "--rois", "EBA", "aTL-faces", "--protocol", "per-method")
    m = matrices["higher"][0]
    assert m.loc[1, 1] == pytest.approx((0.2 + 0.6) / 2) and np.isnan(m.loc[2, 1]) and np.isnan(m.loc[1, 2])
    fig = figures.plot_transfer(m, matrices["higher"][1], "t", root / "t.png")
    assert [t.get_text() for t in fig.axes[0].texts] == [f"{(0.2 + 0.6) / 2:.3f}", "n/a", "n/a", "n/a"]


def test_transfer_matrix_is_the_authors_fraction_over_rois_present_in_every_subject(synthetic_root, tmp_path):
    """Three subjects, both hemispheres, the untuned-layer results; lh OFA is missing in Subj3."""
    masks = tmp_path / "roi_masks"
    masks.mkdir()
    for s in (1, 2):
        os.symlink(synthetic_root / "roi_masks" / f"Subj{s}", masks / f"Subj{s}")
    shutil.copytree(synthetic_root / "roi_masks" / "Subj1", masks / "Subj3")
    faces = masks / "Subj3" / "lh.floc-faces_challenge_space.npy"
    labels = np.load(faces)
    mapping = np.load(masks / "Subj3" / "mapping_floc-faces.npy", allow_pickle=True).item()
    labels[labels == next(code for code, name in mapping.items() if name == "OFA")] = 0
    np.save(faces, labels)
    pairs = [("lh", "EBA"), ("rh", "EBA"), ("lh", "OFA"), ("lh", "ventral")]
    subjects = (1, 2, 3)
    frac = {}  # (hemisphere, roi) -> 3 x 3 fraction of improved voxels, computed from the planted values
    for k, (hemi, roi) in enumerate(pairs):
        frac[hemi, roi] = np.zeros((3, 3))
        for t in subjects:
            n = utils.roi_voxel_count(tmp_path, t, hemi, roi)
            if n == 0:
                continue
            untuned = np.linspace(-0.2, 0.4, n)
            fake_result(tmp_path, t, "untuned", hemi, roi, untuned)
            for m in subjects:
                if utils.roi_voxel_count(tmp_path, m, hemi, roi) == 0:
                    continue
                r = untuned + np.where(np.arange(n) % (m + t + k) < 2, 0.05, -0.05)
                fake_result(tmp_path, t, encoding_results.method_tag("cl-tuned", t, m, "untuned-layer"), hemi, roi, r)
                frac[hemi, roi][m - 1, t - 1] = np.mean(r > untuned)
        # Per-method results with other values: the default protocol must not read them.
        fake_result(tmp_path, 1, "cl-tuned", hemi, roi, 0.9)
    table, matrices = run_transfer_matrix(tmp_path, "--hemispheres", "left", "right", "--rois", "EBA", "OFA", "ventral")
    status = table.set_index(["hemisphere", "roi", "model_subj", "target_subj"])["status"]
    assert status["lh", "OFA", 3, 1] == status["lh", "OFA", 1, 3] == "absent" and status["lh", "OFA", 2, 1] == "fitted"
    expected = {"higher": [("lh", "EBA"), ("rh", "EBA")], "anatomical": [("lh", "ventral")],
                "all": [("lh", "EBA"), ("rh", "EBA"), ("lh", "ventral")]}
    assert set(matrices) == set(expected)
    for group, members in expected.items():
        _, got, stem = matrices[group]
        np.testing.assert_allclose(got.loc[list(subjects), list(subjects)].to_numpy(),
                                   np.mean([frac[p] for p in members], axis=0), atol=1e-12)
        assert stem.endswith(f"transfer_cl-tuned_untuned-layer_lh-rh_{group}")
    # The option of the authors' older matrices: every ROI, lh OFA counting 0 where Subj3 is involved.
    _, zero = run_transfer_matrix(tmp_path, "--hemispheres", "left", "right", "--rois", "EBA", "OFA",
                                  "--transfer-aggregation", "absent-zero")
    np.testing.assert_allclose(zero["higher"][1].loc[list(subjects), list(subjects)].to_numpy(),
                               np.mean([frac["lh", "EBA"], frac["rh", "EBA"], frac["lh", "OFA"]], axis=0), atol=1e-12)


def test_group_summary_averages_rois_without_weights(root):
    # lh EBA and lh FBA-2 have all three methods; lh V1v only untuned, so it is left out.
    nE = utils.roi_voxel_count(root, 1, "lh", "EBA")
    first = np.arange(nE) < 3
    fake_result(root, 1, "untuned", "lh", "EBA", 0.1, cv_r=0.2)
    fake_result(root, 1, "cl-tuned", "lh", "EBA", np.where(first, 0.3, 0.0), cv_r=0.3)
    fake_result(root, 1, "reg-tuned", "lh", "EBA", 0.2, cv_r=0.1)
    fake_result(root, 1, "untuned", "lh", "FBA-2", 0.5, cv_r=0.5)
    fake_result(root, 1, "cl-tuned", "lh", "FBA-2", 0.6, cv_r=0.4)
    fake_result(root, 1, "reg-tuned", "lh", "FBA-2", 0.7, cv_r=0.3)
    fake_result(root, 1, "untuned", "lh", "V1v", 0.9)
    generate_results.main(["--root", str(root), "--type", "summaries", "--subjects", "1"])
    assert (utils.encoding_dir(root, 1) / "methods_lh.png").is_file()
    table = pd.read_csv(utils.encoding_dir(root, 1) / "group_summary.csv").set_index(["group", "score"])
    test = table.loc["higher", "test_r"]
    assert test["n_rois"] == 2
    assert test["mean_untuned"] == pytest.approx((0.1 + 0.5) / 2)
    assert test["mean_cl-tuned"] == pytest.approx((0.3 * 3 / nE + 0.6) / 2)
    assert test["pct_cl-tuned_gt_untuned"] == pytest.approx(100 * (3 / nE + 1) / 2)
    assert test["pct_cl-tuned_gt_reg-tuned"] == pytest.approx(100 * (3 / nE + 0) / 2)
    assert np.isnan(test["mean_pooled-avg"]) and np.isnan(test["pct_pooled-avg_gt_cl-tuned"])
    cv = table.loc["higher", "cv_r"]
    assert cv["mean_cl-tuned"] == pytest.approx(0.35) and cv["pct_cl-tuned_gt_untuned"] == pytest.approx(50)
    assert cv["pct_cl-tuned_gt_reg-tuned"] == pytest.approx(100)
    assert table.loc["early", "test_r"]["n_rois"] == 0 and table.loc["all", "test_r"]["n_rois"] == 2
    assert table.loc["all", "test_r"]["note"].startswith("unbiased") and table.loc["all", "cv_r"]["note"].startswith("optimistic")
    every = pd.read_csv(root / "encoding_results" / "group_summary.csv")
    assert list(every["subject"].unique()) == [1] and len(every) == 2 * len(utils.ROI_GROUPS)


def test_feature_precision_is_recorded_and_checked(root, capsys):
    r = encoding_results.load_result(fem.main(["--root", str(root), "--rois", "EBA"] + FAST)["EBA"])
    assert r["feature_precision"] == "fp32"
    err = run_error(["--root", str(root), "--rois", "V1v", "--feature-precision", "fp16"] + FAST, capsys)
    assert "--feature-precision fp16: allowed one of fp32, bf16" in err
    assert not encoding_results.result_path(root, 1, "untuned", "lh", "V1v").exists()


def test_engine_precision_reaches_the_engine_and_is_recorded(root, capsys, monkeypatch):
    used, top = [], encoding.top_eigenpairs
    monkeypatch.setattr(encoding, "top_eigenpairs", lambda a, k, precision="fp64": used.append(precision) or top(a, k, precision))
    # 30 components of 164-row folds: the mixed solver refines instead of falling back to fp64.
    argv = ["--root", str(root), "--rois", "EBA", "--n-components", "30"] + FAST
    r = encoding_results.load_result(fem.main(argv + ["--engine-precision", "mixed"])["EBA"])
    assert used == ["mixed"] * len(utils.LAYERS) * (5 + 1)
    assert r["engine_precision"] == "mixed" and r["config"]["ENGINE_PRECISION"] == "mixed"
    exact = untuned_reference(root, 1, "lh", "EBA", n_components=30)
    assert r["best_layer"] == exact["best_layer"]
    np.testing.assert_array_equal(r["alpha_index"], exact["alpha_index"])
    for key in ("cv_r", "test_r"):
        np.testing.assert_allclose(r[key], exact[key], rtol=0, atol=1e-7)
    err = run_error(["--root", str(root), "--rois", "V1v", "--engine-precision", "fp32"] + FAST, capsys)
    assert "--engine-precision fp32: allowed one of fp64, mixed" in err
    assert not encoding_results.result_path(root, 1, "untuned", "lh", "V1v").exists()


def test_features_spill_to_the_scratch_folder_with_its_variables_expanded(root, tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "node_local"
    monkeypatch.setenv("FEM_TEST_SCRATCH", str(scratch))
    spills, enter = [], encoding.FeatureSpill.__enter__

    def spy(self):
        out = enter(self)
        spills.append(self.path)
        assert {p.name.rsplit(".", 2)[0] for p in self.path.iterdir()} == set(utils.LAYERS)
        return out

    monkeypatch.setattr(encoding.FeatureSpill, "__enter__", spy)
    argv = ["--root", str(root), "--rois", "V1v"] + FAST
    fem.main(argv + ["--scratch", "$FEM_TEST_SCRATCH/spill"])
    assert len(spills) == 1 and spills[0].parent == scratch / "spill" and not spills[0].exists()
    assert not list(utils.cache_dir(root).glob("features-spill*"))
    path = encoding_results.result_path(root, 1, "untuned", "lh", "V1v")
    spilled = encoding_results.load_result(path)
    fem.main(argv + ["--overwrite"])
    assert spills[1].parent == utils.cache_dir(root)
    np.testing.assert_array_equal(encoding_results.load_result(path)["test_r"], spilled["test_r"])
    err = run_error(argv + ["--overwrite", "--scratch", "$FEM_TEST_UNSET/spill"], capsys)
    assert "--scratch $FEM_TEST_UNSET/spill: the environment variable FEM_TEST_UNSET is not set here" in err


def test_on_pure_noise_test_r_is_near_zero_while_cv_r_is_selected_upward(tmp_path):
    # 80 images with fMRI of pure Gaussian noise: no feature predicts any voxel. The test r of
    # the refitted model is then a null correlation over the n_test = 12 held-out images, with
    # standard deviation sigma_test = 1/sqrt(n_test - 1) per voxel, independent across voxels
    # (each voxel's test noise is its own): a mean over V voxels lies within 4 sigma_test/sqrt(V)
    # of 0 but once in 16,000. CV r is the fold-mean r at the layer and per-voxel alpha chosen on
    # those same folds; at a fixed layer and alpha its mean would be null too, with
    # sigma_cv = 1/sqrt(n_folds (n_val - 1)) per voxel, but the choice among 8 layers x 9 alphas
    # lifts it beyond 3 sigma_cv/sqrt(V) in each ROI (0.06-0.09 here, as on the real masks).
    # The 7 streams are disjoint and hold 1148 voxels.
    import synthetic_data
    synthetic_data.write_algonauts_dataset(tmp_path, n_subjects=1, n_images=80, image_size=64, seed=0)
    path = utils.fmri_path(tmp_path, 1, "lh")
    np.save(path, np.random.default_rng(0).standard_normal(np.load(path).shape).astype(np.float32))
    rois = utils.ROI_CLASSES["streams"]
    saved = fem.main(["--root", str(tmp_path), "--rois", *rois] + FAST)
    train, test = utils.train_test_split(80)
    n_val = len(utils.cv_folds(train)[0][1])
    sigma_test, sigma_cv = 1 / np.sqrt(len(test) - 1), 1 / np.sqrt(5 * (n_val - 1))
    results = [encoding_results.load_result(saved[roi]) for roi in rois]
    for r in results:
        assert abs(r["test_r"].mean()) < 4 * sigma_test / np.sqrt(len(r["voxels"]))
        assert r["cv_r"].mean() > max(r["test_r"].mean(), 3 * sigma_cv / np.sqrt(len(r["voxels"])))
    test_r, cv_r = (np.concatenate([r[score] for r in results]) for score in ("test_r", "cv_r"))
    assert len(test_r) == 1148 and abs(test_r.mean()) < 4 * sigma_test / np.sqrt(1148)
    assert cv_r.mean() > 4 * sigma_cv / np.sqrt(1148)
