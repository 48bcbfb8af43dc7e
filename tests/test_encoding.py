"""The encoding engine against sklearn, scipy and himalaya; planted layers; the test split kept out."""

import os
import socket
import subprocess

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge

import encoding
import utils

ALPHAS = np.logspace(-1, 7, 9)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_cv(x, y, folds, alphas, n_components):
    """sklearn PCA(svd_solver='full') + Ridge per alpha + scipy pearsonr per voxel: (n_alphas, V) fold-mean r."""
    out = np.zeros((len(alphas), y.shape[1]))
    for fit, val in folds:
        k = min(n_components, len(fit), x.shape[1])
        pca = PCA(k, svd_solver="full").fit(x[fit])
        z_fit, z_val = pca.transform(x[fit]), pca.transform(x[val])
        for a, alpha in enumerate(alphas):
            pred = Ridge(alpha=alpha).fit(z_fit, y[fit]).predict(z_val).reshape(len(val), -1)
            out[a] += [pearsonr(pred[:, v], y[val, v])[0] for v in range(y.shape[1])]
    return out / len(folds)


def reference_test_r(x, y, train, test, alpha_per_voxel, n_components):
    k = min(n_components, len(train), x.shape[1])
    pca = PCA(k, svd_solver="full").fit(x[train])
    z_train, z_test = pca.transform(x[train]), pca.transform(x[test])
    r = []
    for v, alpha in enumerate(alpha_per_voxel):
        pred = Ridge(alpha=alpha).fit(z_train, y[train, v]).predict(z_test)
        r.append(pearsonr(pred, y[test, v])[0])
    return np.array(r)


def make_data(n, d, n_voxels, seed=0):
    """Features with a decaying spectrum and responses = a linear map of them + noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * (1.0 / np.arange(1, d + 1) ** 0.5) + rng.standard_normal(d)
    y = x @ rng.standard_normal((d, n_voxels)) * 0.3 + rng.standard_normal((n, n_voxels)) + 2.0
    return x, y


@pytest.fixture
def eigh_dtypes(monkeypatch):
    """The dtypes of the matrices given to torch.linalg.eigh during the test, in call order."""
    dtypes, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kwargs: dtypes.append(a.dtype) or eigh(a, *args, **kwargs))
    return dtypes


# mixed_acts: whether the mixed solver really refines (the refined 2k vectors are at most half the
# fold's matrix); elsewhere it is the float64 eigh, and the case checks that fallback.
@pytest.mark.parametrize("precision", utils.ENGINE_PRECISIONS)
@pytest.mark.parametrize("n, d, n_voxels, n_components, keep_gram, mixed_acts", [
    (60, 200, 7, 1000, None, False),   # n < d: Gram path, k = n_fit
    (60, 200, 1, 10, None, True),      # Gram path, truncated PCA, one voxel
    (150, 300, 40, 12, None, True),    # Gram path, truncated, many voxels (10 batches of 4)
    (150, 30, 80, 1000, None, False),  # n > d: covariance path, many voxels (20 batches of 4)
    (150, 30, 5, 12, True, True),      # n > d with the Gram matrix forced
    (150, 30, 5, 12, False, False),    # covariance path, truncated
    (150, 60, 80, 12, False, True),    # covariance path, truncated, many voxels
])
def test_cv_and_test_r_match_sklearn_pca_ridge_and_scipy(n, d, n_voxels, n_components, keep_gram, mixed_acts,
                                                         precision, eigh_dtypes):
    x, y = make_data(n, d, n_voxels)
    train, test = utils.train_test_split(n)
    folds = utils.cv_folds(train)
    layer = encoding.LayerFeatures(torch.from_numpy(x), keep_gram)
    assert (layer.k is not None) == (d > n if keep_gram is None else keep_gram)
    yt = torch.from_numpy(y)
    r = encoding.cv_scores(layer, yt, folds, ALPHAS, n_components, voxel_batch=4, precision=precision).numpy()
    np.testing.assert_allclose(r, reference_cv(x, y, folds, ALPHAS, n_components), atol=1e-4)

    index, best = encoding.choose_alphas(torch.from_numpy(r), ALPHAS)
    all_test_r = encoding.validation_scores(layer, yt, train, test, ALPHAS, n_components, voxel_batch=4,
                                            precision=precision)
    test_r = all_test_r.gather(0, index[None]).squeeze(0).numpy()
    expected = reference_test_r(x, y, train, test, ALPHAS[index.numpy()], n_components)
    np.testing.assert_allclose(test_r, expected, atol=1e-4)
    assert (torch.float32 in eigh_dtypes) == (precision == "mixed" and mixed_acts)


def test_top_eigenpairs_fp64_is_plain_eigh_and_mixed_matches_it(eigh_dtypes):
    x, _ = make_data(300, 600, 1)
    xc = torch.from_numpy(x - x.mean(0))
    a = xc @ xc.T
    full_lam, full_vecs = torch.linalg.eigh(a)
    # fp64: the float64 eigh, largest first, bit for bit (the engine's results before mixed existed).
    lam, vecs = encoding.top_eigenpairs(a, 40)
    assert torch.equal(lam, full_lam.flip(0)[:40]) and torch.equal(vecs, full_vecs.flip(1)[:, :40])
    # mixed: float32 eigh refined in float64 gives the same eigenpairs to float64 accuracy.
    eigh_dtypes.clear()
    lam_m, vecs_m = encoding.top_eigenpairs(a, 40, "mixed")
    assert eigh_dtypes == [torch.float32, torch.float64]
    assert lam_m.dtype == vecs_m.dtype == torch.float64
    torch.testing.assert_close(lam_m, lam, rtol=1e-12, atol=0)
    torch.testing.assert_close(vecs_m.T @ vecs_m, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-13)
    # Eigenvalue errors are second order in the eigenvector errors, residuals first order.
    assert ((a @ vecs_m - vecs_m * lam_m).norm(dim=0) / lam_m).max() < 1e-6
    # 2k = 200 refined vectors would be over half the matrix: the float64 eigh, bit for bit.
    eigh_dtypes.clear()
    lam_f, vecs_f = encoding.top_eigenpairs(a, 100, "mixed")
    assert eigh_dtypes == [torch.float64]
    assert torch.equal(lam_f, full_lam.flip(0)[:100]) and torch.equal(vecs_f, full_vecs.flip(1)[:, :100])
    with pytest.raises(ValueError, match="unknown engine precision 'fp32': use one of fp64, mixed"):
        encoding.top_eigenpairs(a, 40, "fp32")


def test_cv_best_scores_match_himalaya_ridgecv():
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score
    set_backend("numpy")
    x, y = make_data(200, 40, 25, seed=1)
    train, _ = utils.train_test_split(len(x))
    folds = utils.cv_folds(train)
    # himalaya sees only the training rows; the same folds, re-indexed into them.
    pos = {row: i for i, row in enumerate(train)}
    cv = [(np.array([pos[i] for i in fit]), np.array([pos[i] for i in val])) for fit, val in folds]
    model = RidgeCV(alphas=ALPHAS, fit_intercept=True, cv=cv,
                    solver_params=dict(score_func=correlation_score, local_alpha=True)).fit(x[train], y[train])
    # With all components kept, PCA is a rotation of the centred features, so ridge on
    # the scores is ridge on the features.
    layer = encoding.LayerFeatures(torch.from_numpy(x))
    r = encoding.cv_scores(layer, torch.from_numpy(y), folds, ALPHAS, 1000)
    _, best = encoding.choose_alphas(r, ALPHAS)
    np.testing.assert_allclose(best.numpy(), np.asarray(model.cv_scores_), atol=1e-6)
    # Where one alpha is clearly best, both pick it.
    top2 = np.sort(r.numpy(), axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-6
    assert clear.sum() > 20
    index, _ = encoding.choose_alphas(r, ALPHAS)
    np.testing.assert_allclose(ALPHAS[index.numpy()][clear], np.asarray(model.best_alphas_)[clear], rtol=1e-6)


def test_choose_alphas_ties_go_to_the_larger_alpha():
    r = torch.tensor([[0.1, 0.5, 0.2, 0.0],
                      [0.3, 0.5, 0.2, 0.0],
                      [0.3, 0.4, 0.1, 0.0]], dtype=torch.float64)
    index, best = encoding.choose_alphas(r, [1.0, 10.0, 100.0])
    assert index.tolist() == [2, 1, 1, 2]
    assert best.tolist() == [0.3, 0.5, 0.2, 0.0]
    with pytest.raises(ValueError):
        encoding.choose_alphas(r, [1.0, 100.0, 10.0])


def test_constant_voxel_has_r_zero_never_nan():
    x, y = make_data(100, 20, 4)
    y[:, 2] = 3.0
    train, test = utils.train_test_split(len(x))
    layers = {"a": encoding.LayerFeatures(torch.from_numpy(x))}
    res = encoding.encode_roi(layers, y, train, test, utils.cv_folds(train))
    assert res["n_constant"] == 1
    assert res["cv_r"][2] == 0 and res["test_r"][2] == 0
    assert np.isfinite(res["cv_r"]).all() and np.isfinite(res["test_r"]).all()
    assert (res["cv_r"][[0, 1, 3]] != 0).all()


@pytest.fixture(scope="module")
def seeded_layers(synthetic_root):
    """Subject 1's synthetic images at 64 px through a seeded random AlexNet, every layer."""
    images = utils.subject_images(synthetic_root, 1, 64)
    alexnet = utils.load_alexnet("none", seed=0)
    feats = utils.extract_features(alexnet, images, batch_size=128)
    return feats, encoding.layer_features(alexnet, images, batch_size=128)


def planted_fmri(feats, layer, train, n_voxels=30, n_pcs=30, snr=1.0, seed=0):
    """Responses = a random map of the top n_pcs principal directions of ``layer`` + noise of known SNR.

    Returns the noisy fMRI (n, V) and the noise-free signal (n, V), unit variance per voxel.
    """
    rng = np.random.default_rng(seed)
    x = feats[layer].astype(np.float64)
    x -= x[train].mean(0)
    _, _, vt = np.linalg.svd(x[train], full_matrices=False)
    signal = x @ vt[:n_pcs].T @ rng.standard_normal((n_pcs, n_voxels))
    signal = (signal - signal.mean(0)) / signal.std(0)
    return signal * np.sqrt(snr) + rng.standard_normal(signal.shape), signal


def test_planted_layer_is_selected_and_test_r_nears_the_ceiling(seeded_layers):
    feats, layers = seeded_layers
    n = len(feats["features.2"])
    train, test = utils.train_test_split(n)
    fmri, signal = planted_fmri(feats, "features.2", train)
    res = encoding.encode_roi(layers, fmri, train, test, utils.cv_folds(train))
    assert res["best_layer"] == "features.2"
    assert res["layer_scores"]["features.2"] == max(res["layer_scores"].values())
    # The ceiling: the test r of the noise-free signal itself (about sqrt(snr / (1 + snr))).
    ceiling = np.mean([pearsonr(signal[test, v], fmri[test, v])[0] for v in range(fmri.shape[1])])
    assert 0.6 < ceiling < 0.8
    assert 0.9 * ceiling < res["test_r"].mean() <= ceiling + 0.02


def test_mixed_precision_keeps_the_planted_layer_and_every_alpha(seeded_layers, eigh_dtypes):
    feats, layers = seeded_layers
    n = len(feats["features.2"])
    train, test = utils.train_test_split(n)
    folds = utils.cv_folds(train)
    fmri, _ = planted_fmri(feats, "features.2", train)
    # 30 components of 164-row folds: the mixed solver refines (with 1000 it would be the fp64 eigh).
    exact = encoding.encode_roi(layers, fmri, train, test, folds, n_components=30)
    eigh_dtypes.clear()
    mixed = encoding.encode_roi(layers, fmri, train, test, folds, n_components=30, precision="mixed")
    assert eigh_dtypes.count(torch.float32) == len(layers) * (len(folds) + 1)
    assert mixed["best_layer"] == exact["best_layer"] == "features.2"
    np.testing.assert_array_equal(mixed["alpha_index"], exact["alpha_index"])
    # Here the refined eigenvectors move r by about 3e-9; unrefined float32 ones would move it by 3e-7.
    assert mixed["layer_scores"] == pytest.approx(exact["layer_scores"], rel=0, abs=1e-7)
    for key in ("cv_r", "test_r"):
        np.testing.assert_allclose(mixed[key], exact[key], rtol=0, atol=1e-7)


def test_changing_test_fmri_leaves_every_cv_output_unchanged(seeded_layers):
    feats, layers = seeded_layers
    n = len(feats["features.2"])
    train, test = utils.train_test_split(n)
    folds = utils.cv_folds(train)
    fmri, _ = planted_fmri(feats, "features.7", train, n_voxels=12)
    changed = fmri.copy()
    changed[test] = np.random.default_rng(1).standard_normal((len(test), fmri.shape[1]))
    layers = {k: layers[k] for k in ("features.5", "features.7", "classifier.2")}
    a = encoding.encode_roi(layers, fmri, train, test, folds)
    b = encoding.encode_roi(layers, changed, train, test, folds)
    assert a["layer_scores"] == b["layer_scores"] and a["best_layer"] == b["best_layer"]
    for key in ("alpha_index", "alphas", "cv_r"):
        np.testing.assert_array_equal(a[key], b[key])
    assert np.abs(a["test_r"] - b["test_r"]).min() > 0


def test_fixed_layer_and_alphas_are_used_for_the_refit(seeded_layers):
    feats, layers = seeded_layers
    n = len(feats["features.2"])
    train, test = utils.train_test_split(n)
    folds = utils.cv_folds(train)
    fmri, _ = planted_fmri(feats, "features.2", train, n_voxels=5)
    fixed = np.array([0, 8, 4, 4, 2])
    layers = {k: layers[k] for k in ("features.2", "classifier.6")}
    res = encoding.encode_roi(layers, fmri, train, test, folds, fixed_layer="classifier.6", fixed_alpha_index=fixed)
    assert res["best_layer"] == "classifier.6"
    np.testing.assert_array_equal(res["alpha_index"], fixed)
    x = feats["classifier.6"].astype(np.float64)
    np.testing.assert_allclose(res["test_r"], reference_test_r(x, fmri, train, test, ALPHAS[fixed], 1000), atol=1e-4)
    all_r = encoding.cv_scores(layers["classifier.6"], torch.from_numpy(fmri), folds).numpy()
    np.testing.assert_allclose(res["cv_r"], all_r[fixed, np.arange(5)])


def test_feature_spill_rebuilds_each_layer_exactly_and_cleans_up(tmp_path):
    alexnet = utils.load_alexnet("none", 0)
    images = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    in_memory = encoding.layer_features(alexnet, images, batch_size=16)
    timer = encoding.StageTimer()
    with encoding.FeatureSpill(alexnet, images, tmp_path, batch_size=16, timer=timer) as spill:
        assert spill.path.parent == tmp_path and spill.path.name.startswith(encoding.SPILL_PREFIX)
        names = []
        for name, layer in spill.layers():
            names.append(name)
            ref = in_memory[name]
            assert (layer.k is None) == (ref.k is None) and layer.dims == ref.dims
            got, want = (layer.k, ref.k) if ref.k is not None else (layer.x, ref.x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert names == utils.LAYERS
    assert not spill.path.exists()
    assert set(timer.seconds) == {"forward", "gram"}


def test_stale_spills_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{encoding.SPILL_PREFIX}.tmp-{host}-{dead.pid}-abc"
    live = tmp_path / f"{encoding.SPILL_PREFIX}.tmp-{host}-{os.getpid()}-def"
    other_host = tmp_path / f"{encoding.SPILL_PREFIX}.tmp-otherhost-{dead.pid}-ghi"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "features.2.0.f32").write_bytes(b"0" * 16)
    with encoding.FeatureSpill(utils.load_alexnet("none"), np.zeros((2, 64, 64, 3), np.uint8), tmp_path,
                               layers=["classifier.6"]) as spill:
        assert spill.path.name.startswith(f"{encoding.SPILL_PREFIX}.tmp-{host}-{os.getpid()}-")
    assert not stale.exists() and live.exists() and other_host.exists() and not spill.path.exists()


def test_encode_rois_equals_encode_roi_per_roi_with_overlap():
    x, y = make_data(120, 300, 9)
    train, test = utils.train_test_split(120)
    folds = utils.cv_folds(train)
    layers = {"wide": x, "narrow": x[:, :40]}
    columns = {"a": np.array([0, 1, 2, 3, 4]), "b": np.array([3, 4, 5, 6, 7, 8])}
    fixed_alphas = np.arange(6) % len(ALPHAS)
    together = encoding.encode_rois(layers, y, columns, train, test, folds, ALPHAS, 50,
                                    fixed={"b": ("narrow", fixed_alphas)})
    alone_a = encoding.encode_roi(layers, y[:, columns["a"]], train, test, folds, ALPHAS, 50)
    alone_b = encoding.encode_roi(layers, y[:, columns["b"]], train, test, folds, ALPHAS, 50,
                                  fixed_layer="narrow", fixed_alpha_index=fixed_alphas)
    for got, want in ((together["a"], alone_a), (together["b"], alone_b)):
        assert got["best_layer"] == want["best_layer"]
        assert got["layer_scores"] == pytest.approx(want["layer_scores"], abs=1e-12)
        np.testing.assert_array_equal(got["alpha_index"], want["alpha_index"])
        for key in ("cv_r", "test_r"):
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(together["b"]["alpha_index"], fixed_alphas)
