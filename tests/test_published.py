"""The authors' published results shipped in published/: reading them, the reproduction scorecard
(the published results against themselves and against perturbed copies), the authors' group means,
and the figures drawn from them with no data present."""

import numpy as np
import pandas as pd
import pytest

import encoding_results
import figures
import generate_results
import published_results as pr
import results_utils as ru
import safe_io
import utils
from conftest import REPO, run_error

KEYS = ["subject", "hemisphere", "roi", "method"]
# What the authors' files gave when they were extracted (published/README.md): the 'all' group means
# and the share of ROI-hemispheres where cl-tuned's mean beats untuned's.
EXTRACTED_ALL = {"untuned": 0.3662, "cl-tuned": 0.3858, "reg-tuned": 0.3811, "pooled-avg": 0.3896, "pooled-const": 0.3904}
EARLY = ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"]
HIGHER = ["EBA", "FBA-1", "FBA-2", "mTL-bodies", "OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces", "OPA", "PPA", "RSC",
          "OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"]


@pytest.fixture(scope="module")
def subset():
    """The published per-voxel results of subjects 1 and 2."""
    return pr.load_results(subjects=[1, 2])


def _raw_summary():
    return pd.read_csv(REPO / "published" / pr.SUMMARY_FILE)


def test_published_files_read_as_the_projects_results(subset):
    summary = pr.load_summary()
    assert len(summary) == 1558 and list(summary["method"].unique()) == utils.METHODS
    with np.load(REPO / "published" / pr.VOXELS_FILE) as arrays:  # np.load refuses pickles by default
        assert len(arrays.files) == 2 * len(summary)
    raw = _raw_summary().set_index(KEYS)
    for subj, results in subset.items():
        for (method, h, roi), r in results.items():
            row = raw.loc[(subj, h, roi, pr.AUTHORS_NAMES[method])]
            assert len(r["cv_r"]) == len(r["alphas"]) == len(r["voxels"]) == row["n_voxels"]
            assert r["cv_r"].mean() == pytest.approx(row["mean_cv_r"], abs=1e-6) and r["best_layer"] == row["best_layer"]
    layers = pr.load_layer_scores()
    best = layers.loc[layers.groupby(KEYS)["score"].idxmax()].set_index(KEYS)["layer"]
    assert (best == summary.set_index(KEYS)["best_layer"].reindex(best.index)).all()


def test_published_results_against_themselves(subset):
    card = pr.scorecard(subset, subset, 0.02)
    assert len(card) == sum(len(r) for r in subset.values())
    assert (card["difference"] == 0).all() and (card["rms_difference"] == 0).all() and not card["differs"].any()
    np.testing.assert_allclose(card["voxel_corr"], 1.0, atol=1e-9)
    assert (card["best_layer_yours"] == card["best_layer_published"]).all()
    pct = _raw_summary().assign(method=lambda t: t["method"].map(pr.METHOD_NAMES)).set_index(KEYS)["pct_voxels_above_untuned"]
    mine = card.set_index(KEYS)["pct_above_untuned_yours"]
    np.testing.assert_allclose(mine, pct.reindex(mine.index), atol=1e-3)  # the CSV rounds to 3 decimals
    assert card.query("method == 'untuned'")["pct_above_untuned_yours"].isna().all()


def test_a_perturbed_copy_is_flagged_in_the_right_rows(subset):
    copy = {s: {k: dict(r) for k, r in results.items()} for s, results in subset.items()}
    shifted, noisy = (1, ("cl-tuned", "lh", "V1v")), (2, ("reg-tuned", "rh", "EBA"))
    copy[shifted[0]][shifted[1]]["cv_r"] = subset[shifted[0]][shifted[1]]["cv_r"] + 0.05
    noise = np.random.default_rng(0).normal(0, 0.05, len(subset[noisy[0]][noisy[1]]["cv_r"]))
    copy[noisy[0]][noisy[1]]["cv_r"] = subset[noisy[0]][noisy[1]]["cv_r"] + (noise - noise.mean())
    card = pr.scorecard(copy, subset, 0.02).set_index(KEYS)
    as_key = lambda s, k: (s, k[1], k[2], k[0])
    assert list(card.index[card["differs"]]) == [as_key(*shifted)]
    row = card.loc[as_key(*shifted)]
    assert row["difference"] == pytest.approx(0.05, abs=1e-6) and row["rms_difference"] == pytest.approx(0.05, abs=1e-6)
    assert row["voxel_corr"] == pytest.approx(1.0, abs=1e-6)
    row = card.loc[as_key(*noisy)]
    assert abs(row["difference"]) < 1e-6 and row["voxel_corr"] < 0.99
    assert row["rms_difference"] == pytest.approx(np.std(noise), rel=1e-3)
    assert row["pct_above_untuned_yours"] != row["pct_above_untuned_published"]
    others = card.drop(index=[as_key(*shifted), as_key(*noisy)])
    assert (others["difference"] == 0).all() and (others["rms_difference"] == 0).all()


def test_group_means_follow_the_authors_rule():
    # Independent: pandas straight on the CSV, the authors' method names and ROI lists.
    wide = _raw_summary().pivot_table(index=["subject", "hemisphere", "roi"], columns="method", values="mean_cv_r").dropna()
    _, means = encoding_results.group_means(pr.load_summary(), "mean_cv_r")
    for group, rois in (("all", EARLY + HIGHER), ("early", EARLY), ("higher", HIGHER)):
        part = wide[wide.index.get_level_values("roi").isin(rois)]
        expected = part.groupby(level="subject").mean().mean()
        for theirs, ours in pr.METHOD_NAMES.items():
            assert means.loc[group, ours] == pytest.approx(expected[theirs], abs=1e-12)
        assert means.loc[group, "n_rois"] == len(part) and means.loc[group, "n_subjects"] == 8
    for method, value in EXTRACTED_ALL.items():
        assert means.loc["all", method] == pytest.approx(value, abs=5e-5)
    card = pr.load_summary().rename(columns={"mean_cv_r": "mean_cv_r_published"})
    share = 100 * (wide["cl-tuned"] > wide["untuned"]).mean()
    assert pr.share_above_untuned(card, "mean_cv_r_published") == pytest.approx(share) and round(share) == 93


def test_compare_published_prints_the_verdict_and_the_readme_table(tmp_path, capsys):
    card, means = generate_results.main(["--root", str(tmp_path), "--type", "compare-published", "--source", "published"])
    out = capsys.readouterr().out
    assert "1558 (subject, hemisphere, ROI, method) in both" in out and "voxel counts equal in all" in out
    assert "cl-tuned above untuned in 93% of ROI-hemispheres (yours); published 93%." in out
    assert "verdict: reproduced within 0.02 (mean CV r) in every compared result" in out
    folder = tmp_path / "results" / "published_comparison"
    saved = pd.read_csv(folder / "scorecard.csv")
    assert len(saved) == 1558 and (saved["difference"] == 0).all() and not saved["differs"].any()
    assert (folder / "scorecard.png").is_file() and (means["difference"] == 0).all()
    # The README's table of the published group means is the one the tool prints.
    table = pr.markdown_table(means, "published")
    assert table in out and table in (REPO / "README.md").read_text()


def _save_yours(root, method, hemi, roi, cv_r):
    n = len(cv_r)
    encoding_results.save_result({"voxels": np.arange(n), "alphas": np.ones(n), "alpha_index": np.zeros(n, int),
                                  "cv_r": cv_r, "test_r": cv_r, "method": method, "hemisphere": hemi, "roi": roi,
                                  "best_layer": "features.7", "layer_scores": {layer: 0.0 for layer in utils.LAYERS}},
                                 encoding_results.result_path(root, 1, method, hemi, roi))


def _write_v1v_mask(root, n_voxels):
    """Subject 1's prf-visualrois masks under ``root`` with lh V1v = the first ``n_voxels`` vertices."""
    folder = root / "roi_masks" / "Subj1"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "mapping_prf-visualrois.npy", {0: "Unknown", **{i + 1: r for i, r in enumerate(utils.ROI_GROUPS["early"])}})
    labels = np.zeros(1000, dtype=np.int32)
    labels[:n_voxels] = 1
    np.save(folder / "lh.prf-visualrois_challenge_space.npy", labels)


def test_your_results_against_the_published_and_a_voxel_count_mismatch(tmp_path, subset, capsys):
    _write_v1v_mask(tmp_path, 710)
    for method in utils.METHODS:
        _save_yours(tmp_path, method, "lh", "V1v", subset[1][method, "lh", "V1v"]["cv_r"])
    card, means = generate_results.main(["--root", str(tmp_path), "--type", "compare-published"])
    assert list(card["method"]) == utils.METHODS and (card["difference"] == 0).all()
    assert list(means.query("group == 'early'")["yours"]) == pytest.approx(
        [subset[1][m, "lh", "V1v"]["cv_r"].mean() for m in utils.METHODS])
    assert "best layer the same in 1 of 5" in capsys.readouterr().out
    # Masks (and results) of another ROI set: 700 voxels where the published result has 710.
    for method in utils.METHODS:
        for suffix in (".npz", ".json"):
            encoding_results.result_path(tmp_path, 1, method, "lh", "V1v").with_suffix(suffix).unlink()
    _write_v1v_mask(tmp_path, 700)
    _save_yours(tmp_path, "cl-tuned", "lh", "V1v", np.full(700, 0.3))
    err = run_error(generate_results.main, ["--root", str(tmp_path), "--type", "compare-published", "--overwrite"], capsys)
    assert err.count("\n") == 1
    assert "subj1 lh V1v cl-tuned: 700 voxels here, 710 published" in err and "wrong masks" in err


def test_paper_figures_from_the_published_results_alone(tmp_path, drawn):
    paths, skipped = figures.paper_figures(tmp_path, subjects=[1, 2], source="published", maps="none")
    assert {p.parent for p in paths} == {figures.paper_dir(tmp_path, "published")}
    assert {p.name for p in paths} >= {f"{stem}.png" for stem in (
        "best_untuned_layers_matrix", "roi_subj_presence_table", "group_means_per_method", "cl_vs_untuned_scatterplot",
        "all_group_cl_gain_per_roi", "cl_vs_pooled-avg_gain_scatterplot", "best_untuned_layer_per_subject")}
    assert len(skipped) == 1 and "cross-subject transfer, MI bounds and classification probes" in skipped[0]
    summary = _raw_summary()
    subj1 = summary[(summary["subject"] == 1) & (summary["method"] == "untuned")]
    present = set(zip(subj1["hemisphere"], subj1["roi"]))
    title, xlabel, ylabel, xticks, yticks, _ = drawn["best_untuned_layers_matrix"][0]
    assert yticks == [f"{h}_{roi}" for roi in (utils.ROI_GROUPS["early"] + utils.ROI_GROUPS["higher"]) for h in utils.HEMISPHERES if (h, roi) in present]
    assert xticks == utils.LAYERS and "Subj1" in title and "2025 protocol" in title
    matrix = figures.layer_matrix(pr.load_layer_scores(), 1)
    assert matrix.loc["lh_V1v", "features.5"] == 0.499298 and matrix.loc["lh_V1v"].idxmax() == "features.5"
    title, xlabel, ylabel, xticks, yticks, _ = drawn["roi_subj_presence_table"][0]
    rois = [r for r in (utils.ROI_GROUPS["early"] + utils.ROI_GROUPS["higher"]) if r in set(summary["roi"])]
    assert xticks == [str(s) for s in range(1, 9)] and yticks == [f"{h.upper()} {r}" for r in rois for h in utils.HEMISPHERES]
    counts = figures.presence_matrix(pr.voxel_counts())
    expected = summary.drop_duplicates(["subject", "hemisphere", "roi"]).pivot_table(
        index=["hemisphere", "roi"], columns="subject", values="n_voxels")
    for label, row in counts.iterrows():
        h, roi = label.split(" ")
        want = expected.loc[(h.lower(), roi)] if (h.lower(), roi) in expected.index else pd.Series(dtype=float)
        assert list(row) == [int(want.get(s, 0)) if pd.notna(want.get(s, 0)) else 0 for s in range(1, 9)]


def test_published_voxels_sit_on_the_real_masks(shared_masks, tmp_path):
    (tmp_path / "roi_masks").symlink_to(shared_masks)
    counts = pr.voxel_counts().query("roi in @utils.ROI_GROUPS['early'] or roi in @utils.ROI_GROUPS['higher']").set_index(["subject", "hemisphere", "roi"])["n_voxels"]
    real = ru.voxel_counts(tmp_path).set_index(["subject", "hemisphere", "roi"])["n_voxels"]
    assert (counts == real.reindex(counts.index)).all()
    one = pr.load_results(subjects=[1])
    placed = pr.place_on_masks(one, tmp_path)
    assert np.array_equal(placed[1]["cl-tuned", "lh", "V1v"]["voxels"], utils.roi_voxel_indices(tmp_path, 1, "lh", "V1v"))
    one[1]["untuned", "rh", "EBA"] = {**one[1]["untuned", "rh", "EBA"], "voxels": np.arange(10)}
    with pytest.raises(safe_io.UserError, match="gives EBA 3400 voxels, the published results 10"):
        pr.place_on_masks(one, tmp_path)
