"""Downstream analyses: landscape distances and embeddings, MI bound, classification probes, pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import figures
import results_utils as ru
import safe_io
import utils
from conftest import run_error, save_untrained_checkpoint


def _random_probs(rng, n_models, n_samples, n_classes):
    logits = rng.normal(size=(n_models, n_samples, n_classes)) * 2
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


# --- Bhattacharyya distances -----------------------------------------------------------

def test_bhattacharyya_matches_direct_loop():
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, 7, 30, 5)
    probs[3] = probs[1]
    d = ru.bhattacharyya_distances(probs, chunk_size=7)
    direct = np.zeros((7, 7))
    for u in range(7):
        for v in range(7):
            direct[u, v] = np.mean([-np.log(sum(np.sqrt(probs[u, n, c] * probs[v, n, c]) for c in range(5)))
                                    for n in range(30)])
    np.testing.assert_allclose(d, direct, atol=1e-12)
    assert d[1, 3] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(d, d.T)
    assert d[0, 1] > 0.1


def test_bhattacharyya_handles_one_hot_and_rejects_bad_input():
    onehot = np.eye(3)[None, [0, 1, 2, 0]]
    other = np.full((1, 4, 3), 1 / 3)
    d = ru.bhattacharyya_distances(np.concatenate([onehot, other]))
    assert d[0, 1] == pytest.approx(-np.log(np.sqrt(1 / 3)))
    with pytest.raises(ValueError, match="shape"):
        ru.bhattacharyya_distances(np.ones((4, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        ru.bhattacharyya_distances(-other)


# --- Embeddings ------------------------------------------------------------------------

def _procrustes_error(a, b):
    """Residual of the best orthogonal map of b onto a (both centred)."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(b.T @ a)
    return np.abs(b @ (u @ vt) - a).max()


def test_inpca_and_mds_recover_a_planar_configuration():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 2)) * [3.0, 1.0]
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)
    coords, vals = ru.inpca(sq)
    assert _procrustes_error(x, coords) < 1e-9
    coords_mds, vals_mds = ru.classical_mds(np.sqrt(sq))
    assert _procrustes_error(x, coords_mds) < 1e-9
    np.testing.assert_allclose(vals, vals_mds)
    # Against a direct numpy eigendecomposition of the double-centred matrix.
    j = np.eye(12) - 1 / 12
    ref_vals = np.linalg.eigvalsh(-0.5 * j @ sq @ j)
    np.testing.assert_allclose(np.sort(vals), np.sort(ref_vals)[-2:], atol=1e-9)


def test_inpca_orders_by_absolute_eigenvalue():
    # A non-Euclidean "distance" whose double-centred matrix has a large negative eigenvalue.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 3))
    w = a @ np.diag([1.0, -5.0, 0.5]) @ a.T
    w = w - w.mean(0) - w.mean(1)[:, None] + w.mean()
    d = np.diag(w)[:, None] + np.diag(w)[None] - 2 * w
    coords, vals = ru.inpca(d, n_components=3)
    full = np.linalg.eigvalsh(ru.double_centre(d))
    np.testing.assert_allclose(vals, full[np.argsort(-np.abs(full))[:3]])
    assert vals[0] < 0 < vals[1]
    # The embedding reproduces the distances with the Minkowski signature.
    sig = np.sign(vals)
    rec = (((coords[:, None] - coords[None]) ** 2) * sig).sum(-1)
    np.testing.assert_allclose(rec, d, atol=1e-9)
    with pytest.raises(ValueError, match="inpca"):
        ru.embed(d, method="tsne")


# --- MI bound --------------------------------------------------------------------------

def test_mi_bound_matches_direct_formula_and_is_at_most_log_k():
    rng = np.random.default_rng(3)
    k = 40
    z_fmri = rng.normal(size=(k, 6))
    z_img = z_fmri + rng.normal(size=(k, 6)) * 0.5
    out = ru.mi_lower_bound(z_img, z_fmri)
    cos = np.array([[z_img[i] @ z_fmri[j] / np.linalg.norm(z_img[i]) / np.linalg.norm(z_fmri[j])
                     for j in range(k)] for i in range(k)])
    c = cos / 0.3
    direct = np.mean([np.log(np.exp(c[i, i]) / (np.exp(c[i]).sum() / k)) for i in range(k)])
    assert out["nats"] == pytest.approx(direct, rel=1e-10)
    assert out["bits"] == pytest.approx(direct / np.log(2), rel=1e-10)
    assert out["K"] == k and out["log_K"] == pytest.approx(np.log(k))
    assert 0 < out["nats"] <= np.log(k)
    # Perfectly matched, well separated embeddings approach but never exceed log K.
    eye = np.eye(k)
    perfect = ru.mi_lower_bound(eye, eye)
    assert np.log(k) - 0.01 < perfect["scaled_nats"] <= np.log(k)


def test_post_hoc_scaling_never_lowers_the_bound():
    rng = np.random.default_rng(4)
    for trial in range(5):
        k = 30
        z_fmri = rng.normal(size=(k, 4))
        z_img = z_fmri * trial / 4 + rng.normal(size=(k, 4))
        out = ru.mi_lower_bound(z_img, z_fmri)
        assert out["scaled_nats"] >= out["nats"]
        grid = ru.infonce_bounds(ru.cosine_matrix(z_img, z_fmri), 0.3 * ru.BETAS, chunk_size=7)
        assert out["scaled_nats"] == pytest.approx(max(grid.max(), out["nats"]))
        assert (grid <= np.log(k) + 1e-12).all()
    with pytest.raises(ValueError, match="K >= 2"):
        ru.mi_lower_bound(np.ones((1, 3)), np.ones((1, 3)))


# --- Classification probes -------------------------------------------------------------

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_colour_folder(folder, per_class=20, seed=0):
    """An ImageFolder of solid colours (with brightness jitter and noise), 80 x 60 px."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            im = np.clip(np.array(rgb) * rng.uniform(0.7, 1.1) + rng.normal(0, 12, size=(60, 80, 3)), 0, 255)
            Image.fromarray(im.astype(np.uint8)).save(folder / name / f"{i:03d}.png")


def test_probe_separates_solid_colours(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from torchvision import transforms
    from PIL import Image
    write_colour_folder(tmp_path / "datasets" / "caltech256")
    images, labels, classes = ru.dataset_images(tmp_path, "caltech256", image_size=64)
    assert classes == sorted(COLOURS) and images.shape == (60, 64, 64, 3)
    alexnet = utils.load_alexnet("none", seed=0)
    feats = ru.probe_features(alexnet, images)
    # Independent path: torchvision transforms on PIL, then AlexNet up to ReLU(fc7).
    samples, _ = ru.dataset_samples(tmp_path, "caltech256")
    tf = transforms.Compose([transforms.Resize(73), transforms.CenterCrop(64), transforms.ToTensor(),
                             transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in samples[::7]])
    with torch.no_grad():
        ref = alexnet.classifier[:6](torch.flatten(alexnet.avgpool(alexnet.features(x)), 1)).numpy()
    np.testing.assert_allclose(feats[::7], ref, atol=2e-4, rtol=1e-3)
    train, test = utils.train_test_split(60)
    probe = ru.fit_probe(feats, labels, train, test, len(classes))
    assert probe["accuracy"] == 1.0
    scaler = StandardScaler().fit(feats[train])
    lr = LogisticRegression(max_iter=5000).fit(scaler.transform(feats[train]), labels[train])
    np.testing.assert_allclose(probe["probs"], lr.predict_proba(scaler.transform(feats[test])), atol=1e-6)
    # The torch head built from the saved probe reproduces its probabilities.
    logits = ru.probe_head(probe)(torch.from_numpy(feats[test]))
    np.testing.assert_allclose(torch.softmax(logits, 1).detach().numpy(), probe["probs"], atol=1e-4)


def test_missing_or_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(safe_io.UserError, match=str(tmp_path / "datasets" / "places365")):
        ru.dataset_samples(tmp_path, "places365")
    with pytest.raises(safe_io.UserError, match="caltech256, places365"):
        ru.dataset_samples(tmp_path, "cifar10")
    (tmp_path / "datasets" / "sun397").mkdir(parents=True)
    with pytest.raises(safe_io.UserError, match="sun397"):
        ru.dataset_samples(tmp_path, "sun397")
    write_colour_folder(tmp_path / "datasets" / "caltech256", per_class=2)
    bad = tmp_path / "datasets" / "caltech256" / "red" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(safe_io.UserError, match=f"cannot read image {bad}"):
        ru.dataset_images(tmp_path, "caltech256", image_size=32)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_grad_cam_matches_a_direct_computation():
    torch.manual_seed(0)
    alexnet = utils.load_alexnet("none", seed=0)
    head = torch.nn.Linear(4096, 3)
    x = torch.randn(2, 3, 224, 224)
    _, predicted = ru.grad_cam(alexnet, head, x)
    target = torch.tensor([1, 1])  # a class whose CAM is not all zero for this random network
    cam, _ = ru.grad_cam(alexnet, head, x, target)
    assert all(p.grad is None for p in alexnet.parameters())
    # Without hooks: differentiate with respect to the output of features.12 directly.
    a = alexnet.features(x).detach().requires_grad_()
    logits = head(alexnet.classifier[:6](torch.flatten(alexnet.avgpool(a), 1)))
    assert torch.equal(predicted, logits.argmax(1))
    logits.gather(1, target[:, None]).sum().backward()
    ref = torch.relu((a.grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    ref = torch.nn.functional.interpolate(ref, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    ref = ref / ref.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(cam, ref, atol=1e-5, rtol=1e-4)
    assert cam.min() >= 0 and cam.flatten(1).amax(1).allclose(torch.ones(2)) and cam.std() > 0.05


# --- The generate_results.py pipeline on a synthetic dataset ---------------------------

BASE = ["--subjects", "1", "--epochs", "1", "--weights", "none", "--image-size", "64", "--device", "cpu",
        "--batch-size", "64"]


def pipeline_rois(root, n=2):
    """The first ``n`` ROIs with at least 8 voxels in both hemispheres of subjects 1 and 2."""
    ok = [r for r in utils.ROIS
          if all(utils.roi_voxel_count(root, s, h, r) >= 8 for s in (1, 2) for h in ("lh", "rh"))]
    return ok[:n]


def write_checkpoints(root, rois, epochs=1):
    """Seeded, untrained CL models (subject 1, both hemispheres), a regression and a pooled-avg model (lh, rois[0])."""
    for h in ("lh", "rh"):
        for roi in rois:
            save_untrained_checkpoint(root, "cl-tuned", 1, h, roi, epochs, seed=1)
    save_untrained_checkpoint(root, "reg-tuned", 1, "lh", rois[0], epochs, seed=1)
    save_untrained_checkpoint(root, "pooled-avg", None, "lh", rois[0], epochs, seed=1, subjects=[1, 2])


@pytest.fixture(scope="module")
def pipeline_root(synthetic_root, tmp_path_factory):
    import shutil
    root = tmp_path_factory.mktemp("results_pipeline")
    for d in ("training_fmri", "training_images", "roi_masks"):
        shutil.copytree(synthetic_root / d, root / d)
    write_colour_folder(root / "datasets" / "caltech256", per_class=14)
    write_checkpoints(root, pipeline_rois(root))
    return root


def run(argv, root):
    import generate_results
    generate_results.main(["--root", str(root), *argv])


def test_classification_task_saves_probes_and_resumes(pipeline_root, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    root, rois = pipeline_root, pipeline_rois(pipeline_root)
    run(["--type", "classification-task", "--dataset", "caltech256", *BASE], root)
    run(["--type", "classification-task-pooled-avg", "--dataset", "caltech256", "--hemispheres", "left", *BASE], root)
    folder = utils.results_dir(root) / "classification" / "caltech256"
    summary = json.loads((folder / "subj1_lh_cl-tuned_e1.json").read_text())
    assert set(summary["rois"]) == set(rois)
    # The untuned probe equals sklearn on independently extracted features.
    images, labels, _ = ru.dataset_images(root, "caltech256", 64)
    feats = utils.extract_features(utils.load_alexnet("none", 0), images, layers=["classifier.5"])["classifier.5"]
    train, test = utils.train_test_split(len(labels))
    scaler = StandardScaler().fit(feats[train])
    lr = LogisticRegression(max_iter=5000).fit(scaler.transform(feats[train]), labels[train])
    names, probs, saved_labels, metas = ru.load_predictions(root, "caltech256")
    assert sorted(names) == sorted(["untuned", "lh_%s_pooled-avg_e1" % rois[0]]
                                   + [f"subj1_{h}_{r}_cl-tuned_e1" for h in ("lh", "rh") for r in rois])
    u = names.index("untuned")
    np.testing.assert_allclose(probs[u], lr.predict_proba(scaler.transform(feats[test])), atol=1e-5)
    np.testing.assert_array_equal(saved_labels, labels[test])
    assert summary["untuned"] == metas[u]["accuracy"] == pytest.approx(lr.score(scaler.transform(feats[test]), labels[test]))
    for roi in rois:
        assert summary["rois"][roi] == metas[names.index(f"subj1_lh_{roi}_cl-tuned_e1")]["accuracy"]
    # A rerun skips every finished model; other untuned weights refit the untuned probe only.
    fitted, fit = [], ru.fit_probe
    monkeypatch.setattr(ru, "fit_probe", lambda *a: fitted.append(1) or fit(*a))
    run(["--type", "classification-task", "--dataset", "caltech256", *BASE], root)
    assert fitted == []
    weights = root / "other_weights.pt"
    torch.save(utils.load_alexnet("none", seed=5).state_dict(), weights)
    run(["--type", "classification-task", "--dataset", "caltech256", *BASE, "--weights", str(weights)], root)
    assert fitted == [1] and ru.load_predictions(root, "caltech256", ["untuned"])[3][0]["weights"] == "other_weights"
    run(["--type", "classification-task", "--dataset", "caltech256", *BASE], root)
    assert fitted == [1, 1]
    # Heatmaps read back the same numbers.
    tables, untuned = ru.classification_tables(root, "caltech256", "cl-tuned", 1)
    assert untuned == summary["untuned"] and list(tables["lh"]["subj1"]) == [summary["rois"][r] for r in rois]


def test_mi_bound_task_matches_direct_computation(pipeline_root, capsys):
    import models
    root, rois = pipeline_root, pipeline_rois(pipeline_root)
    run(["--type", "lower-bound-mi", *BASE], root)
    printed = capsys.readouterr().out
    run(["--type", "lower-bound-mi-pooled-avg", "--hemispheres", "left", *BASE], root)
    summary = json.loads((utils.results_dir(root) / "mi_bounds" / "subj1_rh_cl-tuned_e1.json").read_text())
    model, meta = models.load_checkpoint(utils.cl_model_path(root, 1, "rh", rois[1], 1))
    data = utils.SubjectData(root, 1, "rh", np.array(meta["voxels"]), 64)
    test = np.sort(data.test)
    with torch.no_grad():
        z_img = model.embed_images(utils.normalize_images(data.images[test])).numpy()
        z_fmri = model.embed_fmri(torch.from_numpy(data.fmri[test])).numpy()
    cos = (z_img / np.linalg.norm(z_img, axis=1, keepdims=True)) @ (z_fmri / np.linalg.norm(z_fmri, axis=1, keepdims=True)).T
    c = cos / 0.3
    direct = np.mean(np.diag(c) - np.log(np.exp(c).mean(1)))
    res = summary["rois"][rois[1]]["1"]
    assert res["tuned"]["nats"] == pytest.approx(direct, rel=1e-5, abs=1e-6)
    assert res["tuned"]["K"] == len(test)
    # The printed bits are the JSON's unscaled bits (nats / ln 2), the scaled bound labelled as such.
    assert res["tuned"]["bits"] == pytest.approx(res["tuned"]["nats"] / np.log(2))
    assert (f"subj1 rh {rois[1]}: {res['tuned']['bits']:.3f} bits, {res['tuned']['scaled_bits']:.3f} after "
            "temperature scaling") in printed
    # These checkpoints are untrained, so the rebuilt untuned reference must give the same bound.
    assert res["untuned"]["nats"] == pytest.approx(res["tuned"]["nats"], abs=1e-9)
    pooled = json.loads((utils.results_dir(root) / "mi_bounds" / "lh_pooled-avg_e1.json").read_text())
    assert set(pooled["rois"][rois[0]]) == {"1", "2"}
    for res in pooled["rois"][rois[0]].values():
        assert res["tuned"]["scaled_nats"] >= res["tuned"]["nats"] and res["tuned"]["scaled_nats"] <= res["tuned"]["log_K"]
    mi = ru.mi_tables(root, "cl-tuned", 1)
    assert mi["rh"][0].loc[rois[1], "subj1"] == summary["rois"][rois[1]]["1"]["tuned"]["scaled_bits"]


def notebook_text(nb):
    """Everything the executed notebook's code cells printed."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_landscape_notebook_without_predictions_says_what_to_run(tmp_path):
    # What `pytest --nbmake` runs in a fresh checkout: a ROOT without probe predictions.
    import nbformat
    nb = nbformat.read(Path(demo.__file__).with_name("feature_extraction_model_landscape_imagenet.ipynb"), 4)
    assert 'ROOT = "."' in nb.cells[1].source and 'DATASET = "imagenet"' in nb.cells[1].source
    text = notebook_text(demo.run_notebook(tmp_path, "imagenet"))
    assert f"No probe predictions in {tmp_path / 'classification_preds' / 'imagenet'}, so nothing to draw" in text
    assert f"generate_results.py --root {tmp_path} --type classification-task --dataset imagenet" in text
    assert not (tmp_path / "results").exists()


def test_figures_salience_and_landscape_notebook(pipeline_root, monkeypatch):
    root, rois = pipeline_root, pipeline_rois(pipeline_root)
    run(["--type", "classification-task", "--dataset", "caltech256", *BASE], root)
    run(["--type", "classification-task-pooled-avg", "--dataset", "caltech256", "--hemispheres", "left", *BASE], root)
    run(["--type", "lower-bound-mi", *BASE], root)
    run(["--type", "lower-bound-mi-pooled-avg", "--hemispheres", "left", *BASE], root)
    run(["--type", "figures", "--dataset", "caltech256", "--epochs", "1"], root)
    run(["--type", "figures", "--dataset", "caltech256", "--epochs", "1", "--method", "pooled-avg"], root)
    mi = ru.mi_tables(root, "pooled-avg", 1)
    assert list(mi) == ["lh"] and list(mi["lh"][0].columns) == ["subj1", "subj2"]
    panels, plot = [], figures.plot_salience
    monkeypatch.setattr(figures, "plot_salience", lambda *a: panels.append(a) or plot(*a))
    run(["--type", "salience-maps", "--dataset", "caltech256", "--rois", rois[0], "--image-index", "3", *BASE], root)
    # Rows: untuned, lh, rh; each the Grad-CAM of the image's true class (the authors' target).
    image, cams, titles, _, suptitle = panels[0]
    images, labels, classes = ru.dataset_images(root, "caltech256", 64)
    label = labels[utils.train_test_split(len(labels))[1][3]]
    assert titles == ["untuned", f"lh {rois[0]} cl-tuned", f"rh {rois[0]} cl-tuned"] and classes[label] in suptitle
    with np.load(ru.probe_path(root, "caltech256", "untuned")) as z:
        probe = {k: z[k] for k in z.files}
    x = utils.normalize_images(np.stack([image, image[:, ::-1]]))
    column = int(np.flatnonzero(probe["classes"] == label)[0])
    ref, _ = ru.grad_cam(utils.load_alexnet("none", 0), ru.probe_head(probe), x, torch.tensor([column, column]))
    np.testing.assert_allclose(cams[0], ref.numpy(), atol=1e-6)
    folder = utils.results_dir(root) / "figures"
    assert {p.name for p in folder.iterdir()} >= {
        "classification_caltech256_cl-tuned_e1.png", "mi_bound_cl-tuned_e1.pdf", "mi_bound_pooled-avg_e1.png",
        "classification_caltech256_pooled-avg_e1.png",
        f"salience_caltech256_Subj1_{rois[0]}_cl-tuned_e1_img3.png"}
    # The notebook, run headless on these outputs with injected parameters.
    text = notebook_text(demo.run_notebook(root, "caltech256"))
    n_models = len(list((utils.classification_preds_dir(root) / "caltech256").glob("*.npz")))
    assert f"{n_models + 1} models (oracle included)" in text
    assert (folder / "landscape_caltech256_inpca.png").is_file() and (folder / "landscape_caltech256_inpca.pdf").is_file()
    # The oracle point: its distance to a model is mean_n -log sqrt(p_model[n, true class]).
    land = ru.landscape(root, "caltech256")
    _, probs, labels, _ = ru.load_predictions(root, "caltech256")
    direct = -np.log(np.sqrt(probs[:, np.arange(len(labels)), labels].astype(np.float64))).mean(1)
    np.testing.assert_allclose(land["distances"][-1, :-1], direct, rtol=1e-10)
    assert land["names"][-1] == "oracle" and land["coords"].shape == (n_models + 1, 2)


def test_fmri_side_outputs(pipeline_root):
    import models
    import pandas as pd
    root, rois = pipeline_root, pipeline_rois(pipeline_root)
    run(["--type", "voxel-counts"], root)
    counts = pd.read_csv(utils.results_dir(root) / "voxel_counts.csv")
    assert len(counts) == 2 * 2 * 31
    for row in counts.sample(12, random_state=0).itertuples():
        assert row.n_voxels == utils.roi_voxel_count(root, row.subject, row.hemisphere, row.roi)
    run(["--type", "save-test-fmri-responses", "--hemispheres", "left", "--rois", *rois], root)
    _, test = utils.train_test_split(len(utils.list_images(root, 1)))
    saved = np.load(utils.results_dir(root) / "test_fmri" / f"subj1_lh_{rois[0]}.npy")
    np.testing.assert_array_equal(saved, utils.load_fmri(root, 1, "lh", utils.roi_voxel_indices(root, 1, "lh", rois[0]))[test])
    # Without --subjects, every subject under roi_masks, as every other script.
    saved = np.load(utils.results_dir(root) / "test_fmri" / f"subj2_lh_{rois[0]}.npy")
    np.testing.assert_array_equal(saved, utils.load_fmri(root, 2, "lh", utils.roi_voxel_indices(root, 2, "lh", rois[0]))[test])
    # The default export is the authors': fc7 of the test split in split order, row for row with the test fMRI.
    run(["--type", "save-embeddings", "--hemispheres", "right", *BASE], root)
    folder = utils.results_dir(root) / "embeddings"
    emb = np.load(folder / f"subj1_rh_{rois[0]}_cl-tuned_e1_classifier.5_test.npy")
    model, _ = models.load_checkpoint(utils.cl_model_path(root, 1, "rh", rois[0], 1))
    images = utils.subject_images(root, 1, 64)
    ref = utils.extract_features(model.alexnet, images, layers=["classifier.5"])["classifier.5"][test]
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    ids = np.load(folder / "subj1_test_nsd_ids.npy")
    np.testing.assert_array_equal(ids, np.load(utils.results_dir(root) / "test_fmri" / "subj1_test_nsd_ids.npy"))
    names = [p.name for p in utils.list_images(root, 1)]
    assert [f"_nsd-{i:05d}.png" in names[t] for i, t in zip(ids, test)] == [True] * len(test)
    assert len(emb) == len(saved) == len(ids)
    # The model output of every image, in sorted file order (the fMRI rows).
    run(["--type", "save-embeddings", "--hemispheres", "right", "--embedding-layer", "", "--embedding-split", "all",
         *BASE], root)
    emb = np.load(folder / f"subj1_rh_{rois[0]}_cl-tuned_e1_output_all.npy")
    with torch.no_grad():
        np.testing.assert_allclose(emb[:20], model.embed_images(utils.normalize_images(np.array(images[:20]))).numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.load(folder / "subj1_all_nsd_ids.npy"), utils.nsd_ids(utils.list_images(root, 1)))
    run(["--type", "save-embeddings", "--method", "reg-tuned", "--hemispheres", "left", "--embedding-layer", "",
         "--embedding-split", "all", *BASE], root)
    emb = np.load(folder / f"subj1_lh_{rois[0]}_reg-tuned_e1_output_all.npy")
    model, _ = models.load_checkpoint(utils.reg_model_path(root, 1, "lh", rois[0], 1))
    with torch.no_grad():
        np.testing.assert_allclose(emb[-20:], model(utils.normalize_images(np.array(images[-20:]))).numpy(), atol=1e-5)
    assert emb.shape == (len(images), utils.roi_voxel_count(root, 1, "lh", rois[0]))
    # 'best' reads the layer fit_encoding_models.py chose for this model and ROI.
    safe_io.atomic_json_dump({"best_layer": "features.9"}, utils.encoding_dir(root, 1) / "cl-tuned" / f"rh_{rois[1]}.json")
    run(["--type", "save-embeddings", "--hemispheres", "right", "--rois", rois[1], "--embedding-layer", "best", *BASE], root)
    emb = np.load(folder / f"subj1_rh_{rois[1]}_cl-tuned_e1_features.9_test.npy")
    model, _ = models.load_checkpoint(utils.cl_model_path(root, 1, "rh", rois[1], 1))
    ref = utils.extract_features(model.alexnet, images, layers=["features.9"], indices=test[:10])["features.9"]
    np.testing.assert_allclose(emb[:10], ref, atol=1e-5)
    run(["--type", "save-embeddings", "--method", "untuned", "--embedding-layer", "features.5", *BASE], root)
    emb = np.load(folder / "subj1_untuned_features.5_test.npy")
    assert emb.shape == (len(test), utils.layer_dims(64)["features.5"])
    # The authors' random ROIs: 30 by default, among ROIs with more than 20 voxels.
    run(["--type", "random-rois-list"], root)
    first = pd.read_csv(utils.results_dir(root) / "random_rois_n30_seed0.csv")
    np.testing.assert_array_equal(first, ru.random_rois(ru.voxel_counts(root), 30, seed=0))
    assert len(first) == 30 and (first["n_voxels"] > 20).all()
    assert not first.duplicated(["subject", "hemisphere", "roi"]).any()


def test_random_rois_need_more_than_min_voxels():
    import pandas as pd
    counts = pd.DataFrame({"subject": [1, 1, 2, 2], "hemisphere": "lh", "roi": ["V1v", "EBA", "V1v", "EBA"],
                           "n_voxels": [20, 21, 5, 40]})
    chosen = ru.random_rois(counts, 2, seed=0)
    assert sorted(chosen["n_voxels"]) == [21, 40]
    with pytest.raises(safe_io.UserError, match="only 2 have more than 20 voxels"):
        ru.random_rois(counts, 3)


def test_probes_and_mi_need_20_voxels_but_exports_take_every_roi(root, capsys):
    # lh mTL-words has 10 voxels in Subj1: exported by default (MIN_VOXELS 1, the authors'), but neither
    # probed nor bounded (ANALYSIS_MIN_VOXELS 20, the authors').
    import generate_results
    for roi in ("V1v", "mTL-words"):
        save_untrained_checkpoint(root, "cl-tuned", 1, "lh", roi)
    assert ru.select_rois(root, "cl-tuned", 1, "lh", [], 1) == ["V1v", "mTL-words"]
    assert ru.select_rois(root, "cl-tuned", 1, "lh", [], 1, min_voxels=20) == ["V1v"]
    for kind in ("lower-bound-mi", "classification-task"):
        err = run_error(generate_results.main, ["--root", str(root), "--type", kind, "--rois", "mTL-words",
                                                "--hemispheres", "left", *BASE], capsys)
        assert "ROI mTL-words has fewer than 20 voxels in lh of Subj1: drop it or lower --analysis-min-voxels" in err
    run(["--type", "save-embeddings", "--rois", "mTL-words", "--hemispheres", "left", *BASE], root)
    name = ru.model_name("cl-tuned", 1, "lh", "mTL-words", 1)
    emb = np.load(utils.results_dir(root) / "embeddings" / f"{name}_classifier.5_test.npy")
    assert emb.shape == (len(utils.train_test_split(240)[1]), 4096)
    saved = {p.stem for p in ru.save_test_fmri(root, [1], ["lh"], [])}
    assert {"subj1_lh_V1v", "subj1_lh_mTL-words"} <= saved
    saved = {p.stem for p in ru.save_test_fmri(root, [1], ["lh"], [], overwrite=True, min_voxels=20)}
    assert "subj1_lh_V1v" in saved and "subj1_lh_mTL-words" not in saved


@pytest.mark.parametrize("argv, message", [
    (["--type", "histogram"], "--type histogram: allowed one of summaries, transfer-matrix, classification-task, "),
    (["--type", "classification-task", "--dataset", "places365", *BASE], "datasets/places365"),
    (["--type", "classification-task", "--dataset", "caltech256", "--rois", "hV4", *BASE], "cl_model_training.py"),
    (["--type", "lower-bound-mi", "--method", "reg-tuned", *BASE], "fMRI embedding"),
    (["--type", "lower-bound-mi", "--rois", "V9", *BASE], "--rois V9: allowed one of V1v"),
    (["--type", "classification-task", "--method", "untuned", *BASE], "no per-ROI checkpoints"),
    (["--type", "salience-maps", "--rois", "V1v", "V2v", *BASE], "one subject and one ROI"),
    (["--type", "save-embeddings", "--embedding-layer", "conv9", *BASE], "--embedding-layer conv9: allowed one of features.2"),
    (["--type", "random-rois-list", "--n-random-rois", "1000"], "ask for fewer"),
    (["--type", "save-embeddings", "--embedding-layer", "best", "--hemispheres", "left", *BASE],
     "run fit_encoding_models.py --method cl-tuned --subj 1 first"),
])
def test_bad_input_is_one_line_and_exit_2(pipeline_root, capsys, argv, message):
    before = sorted(p for p in pipeline_root.rglob("*") if p.is_file())
    with pytest.raises(SystemExit) as exc:
        run(argv, pipeline_root)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    after = sorted(p for p in pipeline_root.rglob("*") if p.is_file())
    assert after == before
