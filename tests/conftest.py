"""Shared fixtures. Tests import the scripts and helpers from the repository root."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_MASKS = REPO.parent / "shared" / "algonauts_roi_masks"
sys.path.insert(0, str(REPO))

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_torch_downloads(tmp_path, monkeypatch):
    """Point the torch cache at an empty folder so no test can find or fetch real weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic Algonauts dataset: 2 subjects, 240 images of 64 x 64, generated masks.

    Shared by many tests: treat it as read-only (write outputs under another root, or copy).
    """
    import synthetic_data
    root = tmp_path_factory.mktemp("synthetic")
    synthetic_data.write_algonauts_dataset(root, n_subjects=2, n_images=240, image_size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def shared_masks():
    if not SHARED_MASKS.is_dir():
        pytest.skip(f"real masks not found at {SHARED_MASKS}")
    return SHARED_MASKS


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One image-cache folder for every test root (caches are keyed by their image list)."""
    return tmp_path_factory.mktemp("cache")


def link_inputs(root, synthetic_root, shared_cache, names=("training_images", "training_fmri", "roi_masks")):
    """Make ``root`` a project folder whose inputs ``names`` and image cache link to the shared ones; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.symlink(synthetic_root / name, root / name)
    os.symlink(shared_cache, root / "cache")
    return root


@pytest.fixture
def root(synthetic_root, shared_cache, tmp_path):
    """A fresh project folder whose inputs link to the shared synthetic dataset (outputs stay here)."""
    return link_inputs(tmp_path, synthetic_root, shared_cache)


@pytest.fixture(scope="session")
def tiny_nod(tmp_path_factory):
    """A tiny synthetic NOD tree: 2 subjects, 2 runs of 10 trials, 32 px images (copy it to change it)."""
    import synthetic_data
    root = tmp_path_factory.mktemp("tiny_nod")
    synthetic_data.write_nod_dataset(root, n_subjects=2, n_runs=2, n_trials=10, image_size=32,
                                     n_vertices=(300, 300), n_subcortical=5, roi_size=60, n_planted=55)
    return root


def run_error(main, argv, capsys):
    """Run a script's main that must fail with a user error; returns its stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def refused(main, argv, root, capsys):
    """Run a script that must refuse its input; checks the single line and that no file changed. Returns it."""
    before = snapshot(root)
    err = run_error(main, argv, capsys).strip()
    assert err.count("\n") == 0
    assert snapshot(root) == before
    return err


@pytest.fixture(scope="module")
def one_thread():
    """One torch and BLAS thread: small decompositions slow down many-fold on a busy shared CPU."""
    from threadpoolctl import threadpool_limits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def save_untrained_checkpoint(root, method, subj, hemisphere, roi, epochs=1, seed=0, image_size=64, subjects=None,
                              path=None):
    """A seeded untrained checkpoint of a tuned method, with the meta its training script writes: models.plan_roi
    on the script's options (lr 1e-4, batch size 64, weights none, MIN_VOXELS 1).

    ``subjects``: the candidate subjects of a pooled method. ``path``: save it there instead
    of the training script's path. Returns (model, meta).
    """
    import importlib

    import models
    import options
    import utils
    script = importlib.import_module(utils.METHOD_SCRIPTS[method].split(".py")[0])
    argv = ["--root", str(root), "--hemisphere", hemisphere, "--roi", roi, "--epochs", str(epochs), "--lr", "1e-4",
            "--batch-size", "64", "--weights", "none", "--seed", str(seed), "--image-size", str(image_size),
            "--min-voxels", "1"]
    if method.startswith("pooled"):
        argv += ["--h-method", method.split("-")[1], "--subjects", *map(str, subjects or [subj])]
    else:
        argv += ["--subj", str(subj)]
    plan = models.plan_roi(options.parse_options(script, argv), roi, method)
    model = models.build_model(plan.meta)
    models.save_checkpoint(model, plan.meta, path or plan.path)
    return model, plan.meta


def snapshot(root):
    """{relative path: (size, mtime_ns)} of every file under ``root`` (links followed, except the image cache
    and dangling ones)."""
    out = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not (folder == str(root) and d == "cache")]
        for name in files:
            path = Path(folder) / name
            st = path.stat() if path.exists() else path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def drawn(monkeypatch):
    """{figure name: [(title, xlabel, ylabel, x tick labels, y tick labels, x limits) per axes]} of every
    figure given to figures.save_figure during the test. The figures are built but not written (saving
    is most of their time; save_figure is tested with every other figure), and the paths are returned."""
    import matplotlib.pyplot as plt

    import figures
    out = {}

    def record(fig, stem):
        texts = lambda labels: [t.get_text() for t in labels]
        stem = Path(stem)
        out[stem.name] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), texts(ax.get_xticklabels()),
                           texts(ax.get_yticklabels()), ax.get_xlim()) for ax in fig.axes]
        plt.close(fig)
        return [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    monkeypatch.setattr(figures, "save_figure", record)
    return out
