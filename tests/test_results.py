"""Downstream analyses: landscape distances and embeddings, MI bound, classification probes, pipeline."""

import numpy as np
import pytest
import torch

import results_utils as ru
import utils


def _random_probs(rng, n_models, n_samples, n_classes):
    logits = rng.normal(size=(n_models, n_samples, n_classes)) * 2
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


# --- Bhattacharyya distances -----------------------------------------------------------

def test_bhattacharyya_matches_direct_loop():
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, 7, 30, 5)
    probs[3] = probs[1]
    d = ru.bhattacharyya_distances(probs, chunk_size=3)
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
    with pytest.raises(utils.UserError, match="shape"):
        ru.bhattacharyya_distances(np.ones((4, 3)))
    with pytest.raises(utils.UserError, match="non-negative"):
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
    with pytest.raises(utils.UserError, match="inpca"):
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
    with pytest.raises(utils.UserError, match="K >= 2"):
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
    images, labels, classes = ru.dataset_images(tmp_path, "caltech256", image_size=64, workers=0)
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
    with pytest.raises(utils.UserError, match=str(tmp_path / "datasets" / "places365")):
        ru.dataset_samples(tmp_path, "places365")
    with pytest.raises(utils.UserError, match="caltech256, places365"):
        ru.dataset_samples(tmp_path, "cifar10")
    (tmp_path / "datasets" / "sun397").mkdir(parents=True)
    with pytest.raises(utils.UserError, match="sun397"):
        ru.dataset_samples(tmp_path, "sun397")


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
