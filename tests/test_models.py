"""models.py on random tensors: the loss, the three models, checkpoints, the training loop."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models
import safe_io
import utils
from conftest import save_untrained_checkpoint


def test_info_nce_equals_direct_formula():
    g = torch.Generator().manual_seed(0)
    z_fmri, z_img = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    a, b = z_fmri.double().numpy(), z_img.double().numpy()
    s = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    e = np.exp(s / 0.3)
    expected = -np.mean([np.log(e[j, j] / e[:, j].sum()) for j in range(7)])
    assert models.info_nce_loss(z_fmri, z_img, 0.3).item() == pytest.approx(expected, rel=1e-5)
    # The sum runs over fMRI rows i for a fixed image j: swapping the arguments changes the value.
    assert models.info_nce_loss(z_img, z_fmri, 0.3).item() != pytest.approx(expected, rel=1e-5)


def test_info_nce_is_log_batch_for_unrelated_and_small_for_matched():
    g = torch.Generator().manual_seed(1)
    batch, dim = 512, 2048
    # Cosines of unrelated vectors have variance 1/dim, which adds about 1 / (2 dim 0.3^2) to log(batch).
    loss = models.info_nce_loss(torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g))
    assert loss.item() == pytest.approx(np.log(batch) + 1 / (2 * dim * 0.09), abs=0.01)
    z = torch.randn(batch, dim, generator=g)
    assert models.info_nce_loss(z, z).item() < np.log(batch) - 1.5


def test_info_nce_is_stable_at_tiny_temperature():
    g = torch.Generator().manual_seed(2)
    loss = models.info_nce_loss(torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), 1e-4)
    assert torch.isfinite(loss)


def test_cl_model_shapes_and_default_dims():
    model = models.CLModel(50, seed=0).eval()
    assert (model.h, model.z) == (40, 10)
    assert model.image_map.bias is None and model.fmri_map.bias is None and model.head[-1].bias is None
    assert [type(m).__name__ for m in model.head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert all(p.requires_grad for p in model.alexnet.parameters())
    x, y = torch.randn(3, 3, 64, 64), torch.randn(3, 50)
    z_img, z_fmri = model(x, y)
    assert z_img.shape == z_fmri.shape == (3, 10)
    # Both branches go through the same head.
    assert torch.allclose(z_fmri, model.head(model.fmri_map(y)))
    assert torch.allclose(z_img, model.head(model.image_map(model.alexnet(x))))


def test_models_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = models.CLModel(20, seed=0), models.CLModel(20, seed=0), models.CLModel(20, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.fmri_map.weight, b.fmri_map.weight)
    assert not torch.equal(a.fmri_map.weight, c.fmri_map.weight)


def test_pooled_model_routes_each_subject_through_its_own_map():
    model = models.PooledCLModel({1: 30, 2: 45}, h=20, seed=0).eval()
    assert model.z == 5 and set(model.fmri_maps) == {"Subj1", "Subj2"}
    assert model.fmri_maps["Subj1"].in_features == 30 and model.fmri_maps["Subj2"].in_features == 45
    y1, y2 = torch.randn(4, 30), torch.randn(4, 45)
    assert torch.allclose(model.embed_fmri(y1, 1), model.head(model.fmri_maps["Subj1"](y1)))
    assert torch.allclose(model.embed_fmri(y2, "Subj2"), model.head(model.fmri_maps["Subj2"](y2)))
    out1 = model.embed_fmri(y1, 1)
    with torch.no_grad():
        model.fmri_maps["Subj2"].weight.mul_(3)
    assert torch.equal(model.embed_fmri(y1, 1), out1)
    # A training step on subject 1 leaves subject 2's map without gradient.
    model.train()
    z_img, z_fmri = model(torch.randn(4, 3, 64, 64), y1, 1)
    models.info_nce_loss(z_fmri, z_img).backward()
    assert model.fmri_maps["Subj1"].weight.grad is not None
    assert model.fmri_maps["Subj2"].weight.grad is None


def test_regression_model_shape():
    model = models.RegressionModel(17, seed=0).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 17)
    assert model.readout.in_features == 1000


@pytest.mark.parametrize("meta", [
    {"method": "cl-tuned", "n_voxels": 24, "h": 19, "z": 4},
    {"method": "pooled-avg", "voxel_counts": {"1": 24, "3": 11}, "h": 16, "z": 4},
    {"method": "reg-tuned", "n_voxels": 24},
], ids=lambda meta: meta["method"])
def test_checkpoint_round_trip_restores_identical_outputs(tmp_path, meta):
    meta = dict(meta, weights="none", seed=3)
    model = models.build_model(meta)
    # Move BatchNorm running stats away from their initial values.
    model.train()
    with torch.no_grad():
        model.loss(torch.randn(6, 3, 64, 64), torch.randn(6, 24), 1)
    model.eval()
    path = tmp_path / "m.pt"
    models.save_checkpoint(model, meta, path)
    loaded, loaded_meta = models.load_checkpoint(path)
    assert type(loaded) is type(model) and loaded_meta == dict(meta, checksum=loaded_meta["checksum"])
    assert loaded_meta["checksum"] == safe_io.tensor_checksum(model.state_dict()) and not loaded.training
    x, y = torch.randn(3, 3, 64, 64), torch.randn(3, 24)
    with torch.no_grad():
        if meta["method"] == "reg-tuned":
            assert torch.equal(loaded(x), model(x))
        else:
            args = (x, y, 1) if meta["method"] == "pooled-avg" else (x, y)
            for a, b in zip(loaded(*args), model(*args)):
                assert torch.equal(a, b)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"}


@pytest.mark.parametrize("method, sizes, direct", [
    ("cl-tuned", {"n_voxels": 50, "h": 40, "z": 10}, lambda: models.CLModel(50, 40, 10, "none", 7)),
    ("pooled-avg", {"voxel_counts": {"1": 30, "2": 10}, "h": 20, "z": 5},
     lambda: models.PooledCLModel({1: 30, 2: 10}, 20, 5, "none", 7)),
    ("pooled-const", {"voxel_counts": {"2": 10}, "h": 24, "z": 6}, lambda: models.PooledCLModel({2: 10}, 24, 6, "none", 7)),
    ("reg-tuned", {"n_voxels": 50}, lambda: models.RegressionModel(50, "none", 7)),
])
def test_build_model_rebuilds_each_method_with_its_initial_weights(method, sizes, direct):
    meta = {"method": method, "roi": "V1v", "weights": "none", "seed": 7, **sizes}
    a, b = models.build_model(meta), direct()
    assert type(a) is type(b)
    # The recorded weights and seed: the same initial model, different from another seed's.
    assert a.state_dict().keys() == b.state_dict().keys()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    other = models.build_model({**meta, "seed": 8})
    assert not torch.equal(other.alexnet.features[0].weight, a.alexnet.features[0].weight)
    with pytest.raises(ValueError, match="unknown method 'gan': expected one of cl-tuned, reg-tuned"):
        models.build_model({**meta, "method": "gan"})
    with pytest.raises(ValueError, match="unknown method None"):
        models.build_model(sizes)
    with pytest.raises(ValueError, match=f"a {method} checkpoint's meta needs {', '.join(sizes)}"):
        models.build_model({"method": method})


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(safe_io.UserError, match="missing.pt not found"):
        models.load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(safe_io.UserError, match="corrupt.pt.*corrupt"):
        models.load_checkpoint(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(safe_io.UserError, match="other.pt is not a checkpoint of this project"):
        models.load_checkpoint(other)


def test_load_feature_alexnet(root):
    untuned, meta = models.load_feature_alexnet(root, "untuned", 1, "left", "V1v", 30, weights="none", seed=4)
    assert meta is None and torch.equal(untuned.features[0].weight, utils.load_alexnet("none", 4).features[0].weight)
    with pytest.raises(safe_io.UserError, match=r"subj1_lh_V1v_model_e30\.pt: make it with python cl_model_training"):
        models.load_feature_alexnet(root, "cl-tuned", 1, "left", "V1v", 30)
    with pytest.raises(safe_io.UserError, match="pooled_model_training.py --h-method avg"):
        models.load_feature_alexnet(root, "pooled-avg", 1, "left", "V1v", 30)
    model, _ = save_untrained_checkpoint(root, "reg-tuned", 2, "rh", "EBA", epochs=3, seed=9)
    path = utils.reg_model_path(root, 2, "rh", "EBA", 3)
    tuned, meta = models.load_feature_alexnet(root, "reg-tuned", 2, "right", "EBA", 3, image_size=64)
    assert meta["method"] == "reg-tuned" and not tuned.training
    assert torch.equal(tuned.features[0].weight, model.alexnet.features[0].weight)
    with pytest.raises(safe_io.UserError, match=f"checkpoint {path} was made with image_size=64, but this run asks "
                                              "for image_size=40"):
        models.load_feature_alexnet(root, "reg-tuned", 2, "right", "EBA", 3, image_size=40)
    # A meta without the voxels it was trained on cannot be checked against the masks.
    no_voxels = {k: v for k, v in meta.items() if k != "voxels"}
    with pytest.raises(safe_io.UserError, match=f"checkpoint {path} records no voxel indices, so it cannot be "
                                              "checked against the masks under --root: re-train it with --overwrite"):
        models.check_checkpoint(no_voxels, path, root, "reg-tuned", 2, "rh", "EBA")
    models.check_checkpoint(no_voxels, path, root, "reg-tuned", 2, "rh", "EBA", voxels=False)


def test_shard_covers_every_roi_exactly_once():
    for n in (1, 2, 3, 4, 7, 31, 40):
        parts = [utils.shard(utils.ROIS, f"{k}/{n}") for k in range(1, n + 1)]
        assert sorted(r for p in parts for r in p) == sorted(utils.ROIS)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert utils.shard(utils.ROIS, "2/4") == utils.shard(list(utils.ROIS), "2/4")
    for bad in ("0/4", "5/4", "2", "a/b"):
        with pytest.raises(safe_io.UserError, match="bad shard"):
            utils.shard(utils.ROIS, bad)


# --- The training loop on a tiny in-memory dataset -------------------------------------

def _planted_data(n=48, n_voxels=12, size=64, seed=0, subj=1):
    """Images made of 2 x 2 blocks of random colours, and fMRI that is a fixed linear map of them."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n, 2, 1, 2, 1, 3))
    images = np.broadcast_to(colours, (n, 2, size // 2, 2, size // 2, 3)).reshape(n, size, size, 3)
    fmri = (colours.reshape(n, 12) / 255 - 0.5) @ rng.standard_normal((12, n_voxels))
    train, test = utils.train_test_split(n)
    return SimpleNamespace(images=images.astype(np.uint8), fmri=fmri.astype(np.float32), train=train, test=test,
                           subj=subj)


def _train(tmp_path, model, data, name, **kw):
    meta = {"method": "test", "name": name}
    args = dict(epochs=3, lr=1e-3, batch_size=16, seed=0)
    args.update(kw)
    return models.train_model(model, data, tmp_path / f"{name}.pt", meta, **args)


def _heldout_bound(model, data):
    """InfoNCE bound log K - loss on all K held-out pairs, with the head's BatchNorm on batch statistics.

    BatchNorm uses the statistics of the held-out batch, as in training: with a randomly
    initialised AlexNet the image branch's activations are orders of magnitude smaller
    than the fMRI branch's, so the running statistics the shared head accumulates over
    both branches squash one of them to a constant in eval mode.
    """
    model = copy.deepcopy(model).eval()
    for m in model.head.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.train()
    with torch.no_grad():
        x, y = next(utils.iterate_batches(data.images, data.fmri, data.test, len(data.test), "cpu"))
        z_img, z_fmri = model.embed_images(x), model.embed_fmri(y)
    a, b = z_fmri.double().numpy(), z_img.double().numpy()
    c = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T / 0.3
    return np.mean(np.log(len(c)) + np.diag(c) - np.log(np.exp(c).sum(axis=0)))


def test_cl_training_lowers_train_loss_raises_heldout_bound_and_logs(tmp_path):
    data = [_planted_data(n=144, n_voxels=50)]
    # 64 held-out pairs rather than 15% of 144, so that the bound is less noisy.
    data[0].train, data[0].test = np.arange(80), np.arange(80, 144)
    model = models.CLModel(50, seed=0)
    before = _heldout_bound(model, data[0])
    trained, meta = _train(tmp_path, model, data, "cl", epochs=5)
    history = meta["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert _heldout_bound(trained, data[0]) > before + 0.15
    assert safe_io.load_state_dict_file(tmp_path / "cl.pt")["meta"]["history"] == history
    assert json.loads((tmp_path / "cl.log.json").read_text()) == history
    assert not models.partial_path(tmp_path / "cl.pt").exists()


def test_regression_training_lowers_train_loss_and_logs_test_mse(tmp_path):
    data = [_planted_data(n=64, n_voxels=50)]
    trained, meta = _train(tmp_path, models.RegressionModel(50, seed=0), data, "reg", epochs=2)
    history = meta["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    with torch.no_grad():
        x, y = next(utils.iterate_batches(data[0].images, data[0].fmri, data[0].test, 100, "cpu"))
        mse = torch.mean((trained(x) - y) ** 2).item()
    assert history[-1]["test_loss"] == pytest.approx(mse, rel=1e-5)


def _crash_in_epoch(monkeypatch, n):
    """Make the n-th epoch of the next runs raise KeyboardInterrupt; returns the real epoch function."""
    calls = []
    run_epoch = models._run_epoch

    def crashing(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return run_epoch(*args, **kw)

    monkeypatch.setattr(models, "_run_epoch", crashing)
    return run_epoch


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    data = [_planted_data(n=40)]
    full, _ = _train(tmp_path, models.CLModel(12, seed=0), data, "full", epochs=2)
    run_epoch = _crash_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, models.CLModel(12, seed=0), data, "resumed", epochs=2)
    assert models.partial_path(tmp_path / "resumed.pt").exists() and not (tmp_path / "resumed.pt").exists()
    monkeypatch.setattr(models, "_run_epoch", run_epoch)
    # Disturb the global RNG: the resumed run must restore its own.
    torch.manual_seed(999)
    resumed, meta = _train(tmp_path, models.CLModel(12, seed=0), data, "resumed", epochs=2)
    assert [row["epoch"] for row in meta["history"]] == [1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert not models.partial_path(tmp_path / "resumed.pt").exists()


def test_partial_state_from_other_settings_is_refused(tmp_path, monkeypatch):
    data = [_planted_data(n=40)]
    _crash_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, models.RegressionModel(12, seed=0), data, "p")
    with pytest.raises(safe_io.UserError, match=r"p.pt.partial was made with name='p', but this run asks for name='q'"):
        models.train_model(models.RegressionModel(12, seed=0), data, tmp_path / "p.pt", {"method": "test", "name": "q"},
                           epochs=3, lr=1e-3, batch_size=16)


def test_training_is_fp32_by_default_and_bf16_autocast_on_request(tmp_path):
    data = [_planted_data(n=40)]
    for precision, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = models.RegressionModel(12, seed=0)
        seen = []
        model.readout.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        _train(tmp_path, model, data, precision, epochs=1, **({} if precision == "fp32" else {"precision": "bf16"}))
        # Training steps and the held-out loss of the epoch all run in that precision.
        assert len(seen) > 2 and set(seen) == {want}
