"""The paper's figures from a small synthetic result set, and the cortical mapping on the real masks."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import encoding_results
import figures
import generate_results
import results_utils as ru
import safe_io
import utils
from conftest import run_error

ROIS = ["V1v", "hV4", "early", "EBA", "FFA-1"]
SUBJECTS = (1, 2, 3)
EPOCHS = 30


def _write_result(root, subj, tag, hemi, roi, test_r, best_layer="features.5", layer_scores=None):
    """A result as fit_encoding_models.py saves it; CV r is test r shifted by 0.05 (a transfer tag names its model subject)."""
    voxels = utils.roi_voxel_indices(root, subj, hemi, roi)
    n = len(voxels)
    model_subj = _model_subj(tag, subj)
    protocol = "untuned-layer" if tag.endswith("_untuned-layer") else "per-method"
    encoding_results.save_result({"voxels": voxels, "alphas": np.ones(n), "alpha_index": np.zeros(n, int),
                    "cv_r": test_r + 0.05, "test_r": test_r, "method": tag.split("_")[0], "hemisphere": hemi, "roi": roi,
                    "best_layer": best_layer, "model_subj": model_subj, "protocol": protocol,
                    "layer_scores": layer_scores or {layer: 0.0 for layer in utils.LAYERS}},
                   encoding_results.result_path(root, subj, tag, hemi, roi))


def _model_subj(tag, subj):
    """The model subject a result's tag names (cl-tuned_from-Subj2[_untuned-layer]), else its own subject."""
    return int(tag.split("_from-Subj")[1].split("_")[0]) if "_from-" in tag else subj


def _layer_scores(s, k, hemi):
    """Distinct untuned layer scores with a known best layer: utils.LAYERS[(s + k) % 8]."""
    best = (s + k) % 8
    return {layer: round(0.3 + 0.01 * k + (0.1 if i == best else 0.002 * i) + (0.001 if hemi == "rh" else 0), 4)
            for i, layer in enumerate(utils.LAYERS)}


@pytest.fixture(scope="module")
def results_root(tmp_path_factory, shared_masks):
    """Real masks of subjects 1-3; encoding results of 4 methods on 5 ROIs (subject 3 lacks FFA-1 and pooled-const),
    cross-subject cl-tuned results of every model subject on the others in both protocols, with other values
    in each (none on subject 3's FFA-1), MI bounds, voxel counts and caltech256 probes, with known values."""
    root = tmp_path_factory.mktemp("paper")
    (root / "roi_masks").mkdir()
    for s in SUBJECTS:
        os.symlink(shared_masks / utils.subj_dir(s), root / "roi_masks" / utils.subj_dir(s))
    rng = np.random.default_rng(0)
    for s in SUBJECTS:
        for h in utils.HEMISPHERES:
            for k, roi in enumerate(ROIS):
                if s == 3 and roi == "FFA-1":
                    continue
                n = utils.roi_voxel_count(root, s, h, roi)
                base = rng.uniform(0, 0.5, n)
                _write_result(root, s, "untuned", h, roi, base, utils.LAYERS[(s + k) % 8], _layer_scores(s, k, h))
                _write_result(root, s, "cl-tuned", h, roi, base + 0.01 * (k + 1) + rng.normal(0, 0.01, n))
                _write_result(root, s, "pooled-avg", h, roi, base + rng.normal(0.005, 0.01, n))
                if s != 3:
                    _write_result(root, s, "pooled-const", h, roi, base - 0.002 + rng.normal(0, 0.01, n))
                _write_result(root, s, "cl-tuned_untuned-layer", h, roi, base + rng.normal(0.003 * k, 0.01, n))
                for y in SUBJECTS:
                    if y != s:
                        for suffix in ("", "_untuned-layer"):
                            _write_result(root, s, f"cl-tuned_from-{utils.subj_dir(y)}{suffix}", h, roi,
                                          base + rng.normal(0.002 * y - 0.004 * k, 0.01, n))
    safe_io.atomic_write_text(ru.voxel_counts(root).to_csv(index=False), utils.results_dir(root) / "voxel_counts.csv")
    bound = lambda bits: {"scaled_bits": bits}
    for h in utils.HEMISPHERES:
        for s in SUBJECTS:
            safe_io.atomic_json_dump({"rois": {roi: {str(s): {"tuned": bound(1 + s + k), "untuned": bound(0.1)}}
                                             for k, roi in enumerate(ROIS)}},
                                   utils.results_dir(root) / "mi_bounds" / f"subj{s}_{h}_cl-tuned_e{EPOCHS}.json")
        safe_io.atomic_json_dump({"rois": {roi: {str(s): {"tuned": bound(0.5 + s), "untuned": bound(0.1)}
                                               for s in SUBJECTS} for roi in ROIS[:2]}},
                               utils.results_dir(root) / "mi_bounds" / f"{h}_pooled-avg_e{EPOCHS}.json")
    labels = rng.integers(0, 3, 20)
    probs = lambda: rng.dirichlet(np.ones(3), 20)
    ru.save_predictions(root, "caltech256", "untuned", {"probs": probs(), "accuracy": 0.5}, labels, {"method": "untuned"})
    for s in SUBJECTS[:2]:
        for roi in ("V1v", "EBA"):
            name = ru.model_name("cl-tuned", s, "lh", roi, EPOCHS)
            ru.save_predictions(root, "caltech256", name, {"probs": probs(), "accuracy": 0.6}, labels,
                                {"method": "cl-tuned", "subj": s, "hemisphere": "lh", "roi": roi})
        safe_io.atomic_json_dump({"untuned": 0.5, "rois": {"V1v": 0.6 + s / 100, "EBA": 0.55}},
                               utils.results_dir(root) / "classification" / "caltech256" / f"subj{s}_lh_cl-tuned_e{EPOCHS}.json")
    safe_io.atomic_json_dump({"untuned": 0.5, "rois": {"V1v": 0.7}},
                             utils.results_dir(root) / "classification" / "caltech256" / f"lh_pooled-avg_e{EPOCHS}.json")
    name = ru.model_name("pooled-avg", None, "lh", "V1v", EPOCHS)
    ru.save_predictions(root, "caltech256", name, {"probs": probs(), "accuracy": 0.6}, labels,
                        {"method": "pooled-avg", "subj": None, "hemisphere": "lh", "roi": "V1v"})
    return root


def _independent_gains(root, method):
    """(subject, hemisphere, ROI) -> mean(test r of method - test r of untuned), read straight from the files."""
    out = {}
    for s in SUBJECTS:
        for h in utils.HEMISPHERES:
            for roi in ROIS:
                path = encoding_results.result_path(root, s, method, h, roi)
                if path.is_file():
                    with np.load(path) as a, np.load(encoding_results.result_path(root, s, "untuned", h, roi)) as b:
                        out[s, h, roi] = float(np.mean(a["test_r"]) - np.mean(b["test_r"]))
    return out


def test_group_tables_match_direct_computation(results_root):
    table = figures.encoding_table(encoding_results.load_encoding(results_root))
    gains = _independent_gains(results_root, "cl-tuned")
    stats_table = figures.group_gains(table, "cl-tuned", utils.ROI_GROUPS["early"])
    assert list(stats_table["roi"].unique()) == ["V1v", "hV4"]
    for _, row in stats_table.iterrows():
        values = [g for (s, h, roi), g in gains.items() if h == row["hemisphere"] and roi == row["roi"]]
        assert row["n"] == len(values) == 3
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row["sem"] == pytest.approx(stats.sem(values), abs=1e-12)
    higher = figures.group_gains(table, "cl-tuned", ["EBA", "FFA-1"]).set_index(["hemisphere", "roi"])
    assert higher.loc[("lh", "FFA-1"), "n"] == 2 and higher.loc[("lh", "EBA"), "n"] == 3
    pairs = figures.paired_values(table, "cl-tuned", "pooled-const")
    const = _independent_gains(results_root, "pooled-const")
    assert len(pairs) == len(const) == 2 * 2 * 5
    for _, row in pairs.iterrows():
        key = (row["subject"], row["hemisphere"], row["roi"])
        assert (row["x"], row["y"]) == pytest.approx((gains[key], const[key]), abs=1e-12)
        assert row["group"] == {"V1v": "early", "hV4": "early", "early": "anatomical"}.get(row["roi"], "higher")


def _frac_improved(root, target, tag, hemi, roi):
    """Fraction of the target's voxels whose test r with ``tag`` beats its untuned test r, read straight from the files."""
    with np.load(encoding_results.result_path(root, target, tag, hemi, roi)) as a, \
            np.load(encoding_results.result_path(root, target, "untuned", hemi, roi)) as b:
        return float(np.mean(a["test_r"] > b["test_r"]))


def _transfer_tag(model, target, protocol):
    tag = "cl-tuned" if model == target else f"cl-tuned_from-{utils.subj_dir(model)}"
    return tag + ("_untuned-layer" if protocol == "untuned-layer" else "")


def test_paper_figures_from_saved_results(results_root, drawn):
    paths, skipped = figures.paper_figures(results_root, EPOCHS, maps="none")
    folder = figures.paper_dir(results_root)
    names = {p.name for p in paths}
    paper = ("best_untuned_layers_matrix", "roi_subj_presence_table", "all_group_cs_avgs_picture",
             "early_group_cs_avgs_picture", "higher_group_cs_avgs_picture", "cs_vs_pooled_avg_scatterplot",
             "cs_vs_pooled_const_scatterplot", "lower_bound_mi_estimates_specific_vs_pooled_havg",
             "mi_lower_bound_matrix", "caltech256_results_matrix", "caltech256_landscape_overall",
             "caltech256_landscape_subject", "caltech256_landscape_pooled", "caltech256_landscape_higher")
    extras = ("best_untuned_layer_per_subject", "all_group_cl_gain_per_roi", "early_group_cl_gain_per_roi",
              "higher_group_cl_gain_per_roi", "cl_vs_pooled-avg_gain_scatterplot", "cl_vs_pooled-const_gain_scatterplot",
              "cl_vs_untuned_scatterplot", "group_means_per_method", "mi_specific_vs_pooled_havg_pairs")
    for stem in paper + extras:
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert all(p.parent == folder for p in paths)
    # Each skipped figure is one line naming the command that makes its inputs.
    assert len(skipped) == 1 + 3 * 2
    assert any("lower_bound_mi_estimates_specific_vs_pooled_hconst" in m and "--type lower-bound-mi-pooled-const" in m
               for m in skipped)
    assert any(m.startswith("skip imagenet_results_matrix") and "--dataset imagenet" in m for m in skipped)
    assert all("\n" not in m and "python " in m for m in skipped)

    # The paper's rows and columns: ROI-hemispheres of the pRF and category ROIs (no stream), left then right.
    paper_rows = [f"{h}_{roi}" for roi in ("V1v", "hV4", "EBA", "FFA-1") for h in utils.HEMISPHERES]
    title, xlabel, ylabel, xticks, yticks, _ = drawn["best_untuned_layers_matrix"][0]
    assert (xlabel, ylabel, xticks, yticks) == ("AlexNet layer", "ROI", utils.LAYERS, paper_rows) and "Subj1" in title
    title, xlabel, ylabel, xticks, yticks, _ = drawn["roi_subj_presence_table"][0]
    present = ru.voxel_counts(results_root).query("n_voxels > 0")["roi"]
    assert (xlabel, ylabel, xticks) == ("Subject", "ROI", ["1", "2", "3"])
    assert yticks == [f"{h.upper()} {roi}" for roi in utils.ROI_GROUPS["early"] + utils.ROI_GROUPS["higher"] if roi in set(present) for h in utils.HEMISPHERES]
    for group in ("all", "early", "higher"):
        title, xlabel, ylabel, xticks, yticks, _ = drawn[f"{group}_group_cs_avgs_picture"][0]
        assert (xlabel, ylabel, xticks, yticks) == ("Evaluation Subject", "Model Subject", ["1", "2", "3"], ["1", "2", "3"])
        assert "improvement" in title and ("all ROIs" if group == "all" else f"{group} group") in title
    for h in ("avg", "const"):
        title, xlabel, ylabel, *_, xlim = drawn[f"cs_vs_pooled_{h}_scatterplot"][0]
        assert xlabel.startswith("Cross Subject") and ylabel.startswith(f"Pooled ({'Avg' if h == 'avg' else 'Constant'})")
        assert xlim == (-4, 104) and "voxels improved" in xlabel
    title, xlabel, ylabel, xticks, yticks, _ = drawn["mi_lower_bound_matrix"][0]
    assert (xlabel, ylabel, xticks) == ("Subject", "ROI", ["1", "2", "3", "Avg"])
    assert yticks == [f"{h.upper()} {roi}" for roi in ("V1v", "hV4", "EBA", "FFA-1") for h in utils.HEMISPHERES]
    title, xlabel, ylabel, xticks, yticks, _ = drawn["caltech256_results_matrix"][0]
    assert (xlabel, xticks) == ("Model", ["1", "2", "Avg", "Pooled Avg", "Pooled Const", "Untuned"])
    assert yticks == ["Untuned", "LH V1v", "RH V1v", "LH EBA", "RH EBA"]
    title, xlabel, ylabel, *_ = drawn["lower_bound_mi_estimates_specific_vs_pooled_havg"][0]
    assert xlabel.startswith("Average number of voxels") and ylabel == "MI lower bound estimate (bits)"


def test_paper_figure_values(results_root):
    encoding = encoding_results.load_encoding(results_root)
    matrix = figures.layer_matrix(figures.layer_table(encoding), 1)
    for k, roi in enumerate(ROIS):
        if roi in (utils.ROI_GROUPS["early"] + utils.ROI_GROUPS["higher"]):
            assert matrix.loc[f"rh_{roi}"].to_dict() == _layer_scores(1, k, "rh")
            assert matrix.loc[f"rh_{roi}"].idxmax() == utils.LAYERS[(1 + k) % 8]
    counts = figures.presence_matrix(ru.voxel_counts(results_root))
    assert counts.loc["LH V1v", 1] == 710 and counts.loc["LH FBA-2", 1] == 0
    assert counts.loc["RH EBA", 2] == utils.roi_voxel_count(results_root, 2, "rh", "EBA")

    # Cross-subject matrices (the authors': untuned-layer protocol, the diagonal the subject's own model at the
    # untuned layer): the mean over ROI-hemispheres of the fraction improved, from the files.
    transfer = figures.transfer_both(results_root, "untuned-layer")
    early = figures.cs_matrix(transfer, utils.ROI_GROUPS["early"])
    for model in SUBJECTS:
        for target in SUBJECTS:
            expected = np.mean([_frac_improved(results_root, target, _transfer_tag(model, target, "untuned-layer"), h, roi)
                                for h in utils.HEMISPHERES for roi in ("V1v", "hV4")])
            assert early.loc[model, target] == pytest.approx(expected, abs=1e-12)
    higher = figures.cs_matrix(transfer, utils.ROI_GROUPS["higher"])
    assert higher[3].isna().all() and higher.loc[:, [1, 2]].notna().all().all()  # no transfer on subject 3's FFA-1

    # Pooled vs cross subject (per-method protocol, as the pooled results): x the mean over the other
    # subjects' models, y the pooled model, both in %.
    table = figures.encoding_table(encoding)
    transfer = figures.transfer_both(results_root, "per-method")
    pairs = figures.cs_vs_pooled(transfer, table, "pooled-avg").set_index(["subject", "hemisphere", "roi"])
    assert len(pairs) == 2 * (2 * 4 + 3) and "early" not in pairs.index.get_level_values("roi")
    for (s, h, roi), row in pairs.iterrows():
        others = [_frac_improved(results_root, s, _transfer_tag(y, s, "per-method"), h, roi) for y in SUBJECTS if y != s]
        assert row["x"] == pytest.approx(100 * np.mean(others), abs=1e-9)
        assert row["y"] == pytest.approx(100 * _frac_improved(results_root, s, "pooled-avg", h, roi), abs=1e-9)

    mi = figures.mi_matrix(results_root, EPOCHS)
    assert mi.loc["LH hV4", "2"] == 1 + 2 + 1 and mi.loc["RH FFA-1", "Avg"] == pytest.approx(np.mean([1 + s + 4 for s in SUBJECTS]))
    probes = figures.classification_matrix(results_root, "caltech256", EPOCHS)
    assert probes.loc["LH V1v", "2"] == 0.62 and probes.loc["LH V1v", "Avg"] == pytest.approx(0.615)
    assert probes.loc["LH V1v", "Pooled Avg"] == 0.7 and probes["Pooled Const"].isna().all()
    assert probes.loc["Untuned", "Untuned"] == 0.5 and probes.loc["Untuned"].drop("Untuned").isna().all()
    assert probes["Untuned"].drop("Untuned").isna().all() and probes.loc["RH V1v"].isna().all()
    by_size = figures.mi_by_size(results_root, figures.mi_pairs(results_root, "pooled-avg", EPOCHS))
    row = by_size.set_index(["hemisphere", "roi"]).loc[("lh", "hV4")]
    assert row["n_voxels"] == pytest.approx(np.mean([utils.roi_voxel_count(results_root, s, "lh", "hV4") for s in SUBJECTS]))
    assert (row["specific"], row["pooled"]) == pytest.approx((np.mean([2 + s for s in SUBJECTS]), 2.5))


def test_drawn_values(results_root, tmp_path):
    table = figures.encoding_table(encoding_results.load_encoding(results_root))
    _, layers = figures.plot_best_layers(table, tmp_path / "layers")
    for s in SUBJECTS:
        with open(encoding_results.result_path(results_root, s, "untuned", "rh", "hV4").with_suffix(".json")) as f:
            assert layers["rh"].loc["hV4", s] == json.load(f)["best_layer"]
    assert pd.isna(layers["lh"].loc["FFA-1", 3])
    pairs = figures.mi_pairs(results_root, "pooled-avg", EPOCHS)
    assert len(pairs) == 2 * 2 * 3
    row = pairs[(pairs["subject"] == 2) & (pairs["hemisphere"] == "rh") & (pairs["roi"] == "hV4")].iloc[0]
    assert (row["x"], row["y"]) == (1 + 2 + 1, 0.5 + 2)
    land = ru.landscape(results_root, "caltech256")
    keys = figures.landscape_keys(land["metas"])
    _, drawn = figures.plot_landscape_by(land, lambda i: (keys[i][1], "k"), "t", tmp_path / "land",
                                         keep=lambda i: keys[i][1].startswith("Subj"))
    assert {k: sorted(land["names"][i] for i in v) for k, v in drawn.items()} == {
        "Subj1": ["subj1_lh_EBA_cl-tuned_e30", "subj1_lh_V1v_cl-tuned_e30"],
        "Subj2": ["subj2_lh_EBA_cl-tuned_e30", "subj2_lh_V1v_cl-tuned_e30"], "untuned": ["untuned"], "oracle": ["oracle"]}
    # The authors' keys: early models by hemisphere, higher ones by category.
    assert {land["names"][i]: k[2] for i, k in enumerate(keys)} == {
        "untuned": "untuned", "oracle": "oracle", "subj1_lh_V1v_cl-tuned_e30": "Early-L",
        "subj2_lh_V1v_cl-tuned_e30": "Early-L", "subj1_lh_EBA_cl-tuned_e30": "Bodies",
        "subj2_lh_EBA_cl-tuned_e30": "Bodies", ru.model_name("pooled-avg", None, "lh", "V1v", EPOCHS): "Early-L"}
    assert [figures.landscape_key({"roi": roi, "hemisphere": h}) for roi, h in (
        ("hV4", "rh"), ("FFA-1", "lh"), ("PPA", "rh"), ("VWFA-1", "lh"), ("ventral", "rh"))] == [
        "Early-R", "Faces", "Places", "Words", "Anatomical"]


def test_missing_inputs_are_skipped_with_the_command(tmp_path, shared_masks, capsys):
    (tmp_path / "roi_masks").mkdir()
    os.symlink(shared_masks / "Subj1", tmp_path / "roi_masks" / "Subj1")
    err = run_error(generate_results.main, ["--root", str(tmp_path), "--type", "paper-figures",
                                            "--mesh", str(tmp_path / "nowhere")], capsys)
    assert str(tmp_path / "nowhere" / "surf" / "lh.inflated") in err and "--mesh" in err
    assert "--maps some: allowed one of all, summary, none" in run_error(generate_results.main, ["--root", str(tmp_path), "--type", "paper-figures",
                                                                      "--maps", "some"], capsys)
    assert not (tmp_path / "results").exists()
    paths = generate_results.main(["--root", str(tmp_path), "--type", "paper-figures"])
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skip ")]
    assert paths == []
    # 10 paper figures, 4 per dataset (results matrix, landscapes), 8 of the project's own, the maps and their key.
    assert len(skipped) == 10 + 2 * len(utils.CLASSIFICATION_DATASETS) + 8 + 2
    assert any(m.startswith("skip all_group_cs_avgs_picture") and "--model-subj" in m for m in skipped)
    assert any(m.startswith("skip cortical_results_key") for m in skipped)
    assert any(m.startswith("skip roi_subj_presence_table") and "--type voxel-counts" in m for m in skipped)
    assert any(m.startswith("skip cortical maps") and "fit_encoding_models.py --method untuned" in m for m in skipped)
    assert not (tmp_path / "results").exists()


# --- Cortical mapping --------------------------------------------------------------------

@pytest.fixture(scope="module")
def masks_root(tmp_path_factory, shared_masks):
    root = tmp_path_factory.mktemp("masks")
    os.symlink(shared_masks, root / "roi_masks")
    return root


def _nearest():
    """fsaverage vertex -> nearest fsaverage5 vertex, read from the shipped table (entry i: vertex 10242 + i)."""
    with np.load(figures.FSAVERAGE5_NEAREST) as f:
        return np.concatenate([np.arange(10242), f["nearest"]])


def _mean_by_vertex(values, vertices):
    """{mesh vertex: mean of the finite values drawn onto it}, by pandas (independent of to_mesh)."""
    keep = np.isfinite(values)
    return pd.Series(values[keep]).groupby(vertices[keep]).mean()


def _mode_by_vertex(codes, vertices):
    """{mesh vertex: most common finite code, ties the smallest}, by pandas."""
    keep = np.isfinite(codes)
    frame = pd.DataFrame({"v": vertices[keep], "c": codes[keep]})
    counts = frame.groupby(["v", "c"]).size().reset_index(name="n").sort_values(["v", "n", "c"], ascending=[True, False, True])
    return counts.drop_duplicates("v").set_index("v")["c"]


def test_fsaverage5_table_is_a_nearest_vertex_partition(masks_root):
    """pycortex's table: each fsaverage5 vertex gets about 163842 / 10242 = 16 fsaverage vertices, and on nilearn's
    fsaverage5 sphere every vertex V1v's fsaverage vertices reach lies within one edge of V1v's own fsaverage5 vertices."""
    from nilearn import datasets, surface
    nearest = _nearest()
    assert len(nearest) == utils.N_FSAVERAGE_VERTICES and nearest.max() == 10241
    cells = np.bincount(nearest, minlength=10242)
    assert cells.min() >= 12 and cells.max() <= 19 and np.median(cells) == 16
    fs = datasets.fetch_surf_fsaverage("fsaverage5")
    for h, side in (("lh", "left"), ("rh", "right")):
        sphere = surface.load_surf_mesh(fs[f"sphere_{side}"])
        xyz, faces = np.asarray(sphere.coordinates), np.asarray(sphere.faces)
        edge = np.median(np.linalg.norm(xyz[faces[:, 0]] - xyz[faces[:, 1]], axis=1))
        rows = figures.fsaverage_rows(masks_root, 1, h)[utils.roi_voxel_indices(masks_root, 1, h, "V1v")]
        own, reached = rows[rows < 10242], np.unique(nearest[rows])
        gap = np.linalg.norm(xyz[reached][:, None] - xyz[own][None], axis=2).min(axis=1)
        assert set(own) <= set(reached) and gap.max() < 1.15 * edge


@pytest.mark.parametrize("subj", [1, 5])
def test_every_fitted_vertex_is_drawn_on_fsaverage5(masks_root, subj):
    nearest = _nearest()
    rng = np.random.default_rng(subj)
    for h in utils.HEMISPHERES:
        mask = np.load(utils.fsaverage_mask_path(masks_root, subj, h))
        rows = figures.fsaverage_rows(masks_root, subj, h)
        for cls in ("prf-visualrois", "floc-faces"):
            labels = np.load(utils.roi_mask_path(masks_root, subj, h, cls))
            mapping = np.load(utils.roi_mapping_path(masks_root, subj, cls), allow_pickle=True).item()
            # Independent: scatter the labels into fsaverage space and take the fsaverage vertices of each ROI.
            fs_labels = np.zeros(len(mask), dtype=np.int64)
            fs_labels[mask.astype(bool)] = labels
            for code, roi in mapping.items():
                if code == 0 or not (labels == code).any():
                    continue
                values = np.where(labels == code, rng.normal(size=len(labels)), np.nan)
                drawn = figures.to_mesh(values, rows, figures.FSAVERAGE5_VERTICES)
                fs_values = np.full(len(mask), np.nan)
                fs_values[mask.astype(bool)] = values
                expected = _mean_by_vertex(fs_values, nearest[np.arange(len(mask))])
                assert np.array_equal(np.flatnonzero(np.isfinite(drawn)), expected.index)
                np.testing.assert_allclose(drawn[expected.index], expected.to_numpy())
                assert set(np.flatnonzero(fs_labels[:10242] == code)) <= set(expected.index)
                if subj == 1 and h == "lh" and roi == "V1v":
                    # 710 fsaverage vertices: 47 are fsaverage5's own, all 710 together cover 57.
                    assert (fs_labels == code).sum() == 710 and (fs_labels[:10242] == code).sum() == 47
                    assert len(expected) == 57


def test_v1v_on_the_ventral_occipital_pole_and_ffa_ventral(masks_root):
    meshes, n = figures.load_meshes("fsaverage5")
    assert n == 10242
    for subj in (1, 2):
        for h in utils.HEMISPHERES:
            xyz = meshes[h]["pial"].coordinates
            rows = figures.fsaverage_rows(masks_root, subj, h)
            for roi in ("V1v", "FFA-1"):
                values = np.zeros(len(rows))
                values[utils.roi_voxel_indices(masks_root, subj, h, roi)] = 1
                on = figures.to_mesh(values, rows, n) == 1
                assert on.sum() > 5
                assert xyz[on, 2].mean() < xyz[:, 2].mean()
                if roi == "V1v":
                    assert xyz[on, 1].mean() < np.percentile(xyz[:, 1], 5)


def test_cortical_maps_draw_the_saved_values(results_root):
    encoding = encoding_results.load_encoding(results_root, [1])
    paths, drawn = figures.cortical_figures(results_root, encoding, surfaces=("inflated",), views=("ventral",),
                                            kind="summary")
    assert {p.name for p in paths} == {f"{stem}.{ext}" for ext in ("png", "pdf") for stem in (
        "Subj1_gain_cl-tuned", "Subj1_cortical_results_single_subj", "all_subjects_panel")}
    rows = np.flatnonzero(np.load(utils.fsaverage_mask_path(results_root, 1, "lh")))
    where = _nearest()[rows]
    # Independent: paint each ROI's saved values in reverse canonical order (a vertex keeps its first ROI's),
    # then average the vertices of each fsaverage5 vertex (the winner: their most common method).
    gain, test_r, winner = (np.full(len(rows), np.nan) for _ in range(3))
    for roi in reversed(ROIS):
        loaded = {m: encoding_results.load_result(encoding_results.result_path(results_root, 1, m, "lh", roi))
                  for m in utils.METHODS if encoding_results.result_path(results_root, 1, m, "lh", roi).is_file()}
        v = loaded["untuned"]["voxels"]
        gain[v] = loaded["cl-tuned"]["test_r"] - loaded["untuned"]["test_r"]
        test_r[v] = loaded["pooled-const"]["test_r"]
        methods = [m for m in utils.METHODS if m in loaded]
        winner[v] = np.argmax([loaded[m]["test_r"] for m in methods], axis=0)
    expected = _mean_by_vertex(gain, where)
    for got in (drawn["Subj1_gain_cl-tuned"]["lh"], drawn["all_subjects_panel"]["Subj1"]["lh"]):
        assert np.array_equal(np.flatnonzero(np.isfinite(got)), expected.index)
        np.testing.assert_allclose(got[expected.index], expected.to_numpy())
    # Subject 1 has the same four methods on every ROI: the winner is an index among them.
    mode = _mode_by_vertex(winner, where)
    np.testing.assert_array_equal(drawn["Subj1_cortical_results_single_subj"]["lh"][mode.index], mode.to_numpy())
    got = figures.subject_surface_maps(results_root, 1, encoding[1], 10242, figures.score_of("pooled-const"))["lh"]
    expected = _mean_by_vertex(test_r, where)
    assert np.array_equal(np.flatnonzero(np.isfinite(got)), expected.index)
    np.testing.assert_allclose(got[expected.index], expected.to_numpy())


def test_cortical_key_colours_each_vertex_by_its_first_roi(masks_root, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(figures, "plot_cortical_map", lambda maps, meshes, title, label, stem, **kw: calls.append(kw) or [stem])
    _, maps = figures.cortical_key(masks_root, 1, figures.load_meshes("fsaverage5"), tmp_path)
    rois = [r for r in (utils.ROI_GROUPS["early"] + utils.ROI_GROUPS["higher"]) if any(utils.roi_voxel_count(masks_root, 1, h, r) for h in utils.HEMISPHERES)]
    assert list(calls[0]["categories"]) == rois and calls[0]["views"] == ("lateral", "posterior", "medial")
    assert "averaged into its nearest fsaverage5 vertex (lh: " in calls[0]["caption"]
    for h in utils.HEMISPHERES:
        rows = figures.fsaverage_rows(masks_root, 1, h)
        # Independent: paint the ROIs in reverse canonical order, so the first ROI of a vertex wins; then the
        # most common ROI of the vertices of each fsaverage5 vertex.
        codes = np.full(len(rows), np.nan)
        for k in reversed(range(len(rois))):
            codes[utils.roi_voxel_indices(masks_root, 1, h, rois[k])] = k
        mode = _mode_by_vertex(codes, _nearest()[rows])
        assert np.array_equal(np.flatnonzero(np.isfinite(maps[h])), mode.index)
        np.testing.assert_array_equal(maps[h][mode.index], mode.to_numpy())
        v1v = rows[utils.roi_voxel_indices(masks_root, 1, h, "V1v")]
        assert (maps[h][v1v[v1v < 10242]] == 0).mean() > 0.8


def test_full_fsaverage_mesh_folder(tmp_path):
    import nibabel as nib
    n = utils.N_FSAVERAGE_VERTICES
    rng = np.random.default_rng(0)
    (tmp_path / "surf").mkdir()
    for h in utils.HEMISPHERES:
        for k in ("inflated", "pial"):
            nib.freesurfer.write_geometry(str(tmp_path / "surf" / f"{h}.{k}"), rng.normal(size=(n, 3)),
                                          np.array([[0, 1, 2], [1, 2, 3]], dtype=np.int32))
        nib.freesurfer.write_morph_data(str(tmp_path / "surf" / f"{h}.sulc"), rng.normal(size=n).astype(np.float32))
    meshes, m = figures.load_meshes(str(tmp_path))
    assert m == n and len(meshes["rh"]["pial"].coordinates) == n
    rows = np.array([5, 10241, 10242, 163841])
    np.testing.assert_array_equal(figures.to_mesh(np.arange(4.0), rows, m)[rows], np.arange(4.0))
    assert np.isfinite(figures.to_mesh(np.arange(4.0), rows, m)).sum() == 4
    os.remove(tmp_path / "surf" / "lh.sulc")
    with pytest.raises(safe_io.UserError, match="lh.sulc"):
        figures.load_meshes(str(tmp_path))


# --- The results table and the index page ----------------------------------------------

def test_results_table_holds_every_saved_result(results_root, tmp_path, capsys):
    generate_results.main(["--root", str(results_root), "--type", "results-table", "--subjects", "1", "2", "3"])
    assert "results of 3 subject(s)" in capsys.readouterr().out
    table = pd.read_csv(utils.results_dir(results_root) / "encoding_results.csv")
    assert list(table.columns) == encoding_results.RESULTS_TABLE_COLUMNS
    files = sorted(utils.encoding_dir(results_root, 1).parent.glob("Subj*/*/*.npz"))
    # Subjects 1, 2: 5 ROIs x 9 tags (4 methods, cl-tuned at the untuned layer, 2 transfers of each protocol);
    # subject 3: 4 ROIs (no FFA-1) x 8 (no pooled-const).
    assert len(table) == len(files) == 2 * (2 * 5 * 9 + 4 * 8)
    rows = table.set_index(["subject", "tag", "hemisphere", "roi"])
    for path in files:
        subj, tag, (hemi, roi) = int(path.parts[-3][4:]), path.parent.name, path.stem.split("_", 1)
        row = rows.loc[(subj, tag, hemi, roi)]
        with np.load(path) as a, np.load(path.parent.parent / "untuned" / path.name) as u:
            assert row["n_voxels"] == len(a["voxels"]) == utils.roi_voxel_count(results_root, subj, hemi, roi)
            assert row["mean_test_r"] == pytest.approx(a["test_r"].mean(), abs=1e-12)
            assert row["mean_cv_r"] == pytest.approx(a["test_r"].mean() + 0.05, abs=1e-12)
            assert row["method"] == tag.split("_")[0]
            assert row["protocol"] == ("untuned-layer" if tag.endswith("_untuned-layer") else "per-method")
            assert row["model_subj"] == _model_subj(tag, subj)
            if tag == "untuned":
                assert np.isnan(row["gain_test_r"]) and np.isnan(row["pct_beats_untuned"])
            else:
                assert row["gain_test_r"] == pytest.approx(a["test_r"].mean() - u["test_r"].mean(), abs=1e-12)
                assert row["gain_cv_r"] == pytest.approx(row["gain_test_r"], abs=1e-12)
                assert row["pct_beats_untuned"] == pytest.approx(100 * np.mean(a["test_r"] > u["test_r"]), abs=1e-9)
    empty = tmp_path / "empty"
    (empty / "roi_masks").mkdir(parents=True)
    os.symlink(results_root / "roi_masks" / "Subj1", empty / "roi_masks" / "Subj1")
    err = run_error(generate_results.main, ["--root", str(empty), "--type", "results-table", "--subjects", "1"], capsys)
    assert "no encoding results of subjects 1" in err and "fit_encoding_models.py" in err
    assert not (empty / "results" / "encoding_results.csv").exists()


# Paths the scripts write (one of each kind) and what the index must say of them.
INDEXED = {
    "encoding_results/Subj2/cl-tuned_from-Subj1/layer_scores_rh.png":
        ("Encoding results of each subject", "Subj2 rh, cl-tuned_from-Subj1:", "--type summaries --subjects 2"),
    "encoding_results/Subj1/methods_lh.png": ("Encoding results of each subject", "Subj1 lh:", "--subjects 1"),
    "encoding_results/Subj1/scatter_pooled-avg_vs_untuned_lh.png":
        ("Encoding results of each subject", "test r of pooled-avg against untuned", "--type summaries --subjects 1"),
    "encoding_results/transfer_cl-tuned_untuned-layer_lh-rh_early.png":
        ("Transfer across subjects", "untuned layer and alphas, early ROIs (lh-rh)", "--method cl-tuned"),
    "encoding_results/transfer_reg-tuned_lh_higher_absent-zero.png":
        ("Transfer across subjects", "higher ROIs (lh, absent ROIs as 0)",
         "--method reg-tuned --protocol per-method --transfer-aggregation absent-zero"),
    "encoding_results/nod/nod_transfer.png": ("Transfer to NOD", "NOD", "fit_encoding_models_nod.py"),
    "results/figures/classification_caltech256_cl-tuned_e30.png":
        ("Probes, MI bounds, salience and landscapes", "caltech256", "--type figures --dataset caltech256"),
    "results/figures/landscape_imagenet_inpca.png": ("Probes, MI bounds, salience and landscapes", "(inpca)", ".ipynb"),
    "results/figures/paper/roi_subj_presence_table.png": ("The paper's figures", "grey under 20", "--type paper-figures"),
    "results/figures/published/cortical/Subj3_cv_r_reg-tuned.png":
        ("Cortical maps", "Subj3: per vertex, the cv_r of reg-tuned", "--type paper-figures --source published"),
    "results/figures/paper/cortical/Subj1_cortical_results_single_subj.png": ("Cortical maps", "Subj1", "paper-figures"),
    "results/published_comparison/scorecard.png": ("Held against the published results", "published", "compare-published"),
    "results/figures/mystery plot.png": ("Other figures", "", ""),
}


@pytest.fixture(scope="module")
def indexed_root(tmp_path_factory):
    """A project folder holding a small PNG (and its PDF) at each path of INDEXED, and the index of them."""
    from PIL import Image
    root = tmp_path_factory.mktemp("index")
    (root / "roi_masks" / "Subj1").mkdir(parents=True)  # every project folder has them (SUBJECTS is checked)
    for k, name in enumerate(INDEXED):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4 + k, 3), (k, 0, 0)).save(root / name)
        (root / name).with_suffix(".pdf").write_bytes(b"%PDF")
    generate_results.main(["--root", str(root), "--type", "index"])
    return root


def test_index_lists_every_figure_with_its_caption_and_command(indexed_root):
    index = utils.results_dir(indexed_root) / "figures" / "index.html"
    page = index.read_text()
    _, sections = figures.write_index(indexed_root)
    assert {p.relative_to(indexed_root).as_posix() for ps in sections.values() for p in ps} == set(INDEXED)
    for name, (section, caption, command) in INDEXED.items():
        assert f"<b>{name}</b>" in page
        got = figures.figure_entry(name)
        if section == "Other figures":
            assert got is None
            continue
        assert got[0] == section and caption in got[1] and command in got[2]
        assert f"{got[1]}<br><code>{got[2]}</code>".replace("'", "&#x27;") in page
    assert page.index("Encoding results of each subject") < page.index("Cortical maps") < page.index("Other figures")


def _srcs(html_text):
    import re
    return re.findall(r"<img[^>]* src=\"?'?([^\"' >]+)", html_text)


def test_index_in_a_headless_browser(indexed_root, tmp_path):
    """Chromium parses the page: its DOM lists one <img> per figure, each resolving to the figure's PNG."""
    import shutil
    import subprocess
    from urllib.parse import unquote, urljoin
    from urllib.request import url2pathname
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    index = utils.results_dir(indexed_root) / "figures" / "index.html"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=60, check=True).stdout
    srcs = _srcs(dom)
    assert len(srcs) == len(INDEXED)
    found = {Path(url2pathname(unquote(urljoin(index.as_uri(), s)[len("file://"):]))).resolve() for s in srcs}
    assert found == {(indexed_root / name).resolve() for name in INDEXED}
