"""Benchmark the training input pipeline: the uint8 image cache versus a per-item PNG loader.

Measures, on one synthetic subject (written on first use):
- images/s delivered to the model (normalised tensors on the device, the best of PASSES
  shuffled passes over the training split) by the project's cached loader (utils.iterate_batches), the
  rate of its CPU part alone (gathering uint8 rows, all that stays on the CPU when the
  device is a GPU), and by the straightforward loader: a torch Dataset that opens, converts and resizes each PNG
  per item with torchvision transforms, batched by a DataLoader at the same batch size;
- model-only CL training steps/s (forward, backward and Adam step on one batch already on
  the device), and the time of full train_model epochs (loader, steps, held-out loss and
  resumable state) relative to model-only time for the same number of steps.
Prints the figures and their ratios and writes them to benchmarks/output/bench_training.json.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
import synthetic_data  # noqa: E402
import options  # noqa: E402
import safe_io  # noqa: E402
import utils  # noqa: E402

# --- Options ---
ROOT = "benchmarks/output/synthetic_bench"  # dataset folder (written if missing)
N_IMAGES = 300  # images of the synthetic subject
PNG_SIZE = 425  # side of the PNG files (NSD images are 425 x 425)
IMAGE_SIZE = 224  # side the images are resized to
BATCH_SIZE = 64  # images per batch, for both loaders and the model
LOADER_WORKERS = 2  # DataLoader worker processes of the per-item loader
ROI = "V1v"  # ROI whose voxels the CL model maps
PASSES = 2  # passes timed per loader (the best one counts)
N_STEPS = 3  # model-only steps timed (after one warm-up step)
EPOCHS = 1  # full train_model epochs timed
DEVICE = "auto"  # auto, cpu or cuda
PRECISION = "fp32"  # training arithmetic: fp32 (the default of the training scripts) or bf16
# ---


class PerItemDataset(torch.utils.data.Dataset):
    """The straightforward loader: each item opens its PNG and applies torchvision transforms."""

    def __init__(self, paths, fmri, image_size):
        from torchvision import transforms
        self.paths, self.fmri = paths, fmri
        self.transform = transforms.Compose([
            transforms.Resize((image_size, image_size)), transforms.ToTensor(),
            transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), torch.from_numpy(self.fmri[i])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(n, seconds):
    return n / seconds


def timed_pass(batches, device):
    """(images delivered, seconds) for one pass over an iterable of (x, y) device batches."""
    sync(device)
    t0 = time.perf_counter()
    n = 0
    for x, _ in batches:
        n += len(x)
    sync(device)
    return n, time.perf_counter() - t0


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    device = utils.resolve_device(opts.DEVICE)
    root = Path(opts.ROOT)
    if not (root / "training_images").is_dir():
        synthetic_data.write_algonauts_dataset(root, n_subjects=1, n_images=opts.N_IMAGES,
                                               image_size=opts.PNG_SIZE, seed=0)
    voxels = utils.roi_voxel_indices(root, 1, "lh", opts.ROI)
    shutil.rmtree(utils.cache_dir(root), ignore_errors=True)
    t0 = time.perf_counter()
    data = utils.SubjectData(root, 1, "lh", voxels, opts.IMAGE_SIZE)
    cache_s = time.perf_counter() - t0
    n_train = len(data.train)
    results = {"device": str(device), "n_train": n_train, "batch_size": opts.BATCH_SIZE,
               "image_size": opts.IMAGE_SIZE, "png_size": opts.PNG_SIZE, "cache_build_s_once": cache_s,
               "torch_threads": torch.get_num_threads()}

    generator = torch.Generator().manual_seed(0)
    results["cached_images_per_s"] = max(rate(*timed_pass(utils.iterate_batches(
        data.images, data.fmri, data.train, opts.BATCH_SIZE, device, shuffle=True, generator=generator), device))
        for _ in range(opts.PASSES))
    # On a GPU only the row gather stays on the CPU (normalisation runs on the device).
    order = data.train[torch.randperm(n_train, generator=generator).numpy()]
    t0 = time.perf_counter()
    for start in range(0, n_train, opts.BATCH_SIZE):
        np.ascontiguousarray(data.images[order[start:start + opts.BATCH_SIZE]])
    results["cached_uint8_rows_per_s"] = n_train / (time.perf_counter() - t0)

    subset = torch.utils.data.Subset(PerItemDataset(data.image_paths, data.fmri, opts.IMAGE_SIZE),
                                     data.train.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=opts.BATCH_SIZE, shuffle=True,
                                         num_workers=opts.LOADER_WORKERS, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    results["per_item_images_per_s"] = max(rate(*timed_pass(((x.to(device), y.to(device)) for x, y in loader), device))
                                           for _ in range(opts.PASSES))
    results["loader_ratio"] = results["cached_images_per_s"] / results["per_item_images_per_s"]

    model = models.CLModel(len(voxels), weights="none", seed=0).to(device).train()
    if device.type == "cuda":
        model.alexnet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    x, y = next(utils.iterate_batches(data.images, data.fmri, data.train, opts.BATCH_SIZE, device))

    def step():
        with utils.autocast(device, opts.PRECISION):
            loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(opts.N_STEPS):
        step()
    sync(device)
    step_s = (time.perf_counter() - t0) / opts.N_STEPS
    results["model_steps_per_s"] = 1 / step_s
    results["model_images_per_s"] = opts.BATCH_SIZE / step_s

    steps_per_epoch = sum(1 for start in range(0, n_train, opts.BATCH_SIZE) if n_train - start >= 2)
    with tempfile.TemporaryDirectory() as tmp:
        model = models.CLModel(len(voxels), weights="none", seed=0)
        _, meta = models.train_model(model, [data], Path(tmp) / "bench.pt", {"method": "cl-tuned"}, opts.EPOCHS, 1e-4,
                                     opts.BATCH_SIZE, device=device, precision=opts.PRECISION)
    epoch_s = float(np.mean([row["seconds"] for row in meta["history"]]))
    results["epoch_s"] = epoch_s
    results["model_only_epoch_s"] = steps_per_epoch * step_s
    results["epoch_over_model_only"] = epoch_s / (steps_per_epoch * step_s)

    for k, v in results.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    out = Path("benchmarks/output/bench_training.json")
    safe_io.atomic_json_dump(results, out)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
