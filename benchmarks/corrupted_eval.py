"""Is evaluating on corrupted CIFAR splits bound by the model or by data loading? Measured side by side.

    python benchmarks/corrupted_eval.py [--images 2000] [--splits 5] [--batch-size 500]

Three throughputs in images/s for ResNet20 in eval mode, on the same images:
  model only     forward passes over tensors already in memory (the ceiling);
  cached splits  the real test path: DataLoader over memory-mapped .npy corrupted splits (written once by
                 `cli.py corrupt`), batch normalisation, forward;
  on the fly     the same, corrupting each batch as it is loaded (no cache).
The ratio cached / model-only says how much of the model's speed the data path leaves. The projection for
all 95 splits of the 10,000-image CIFAR-10 test set uses the cached rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.base import ArrayImageDataset, keep_batch  # noqa: E402
from datamodules.corruptions import CORRUPTIONS  # noqa: E402
from datamodules.corruptions.splits import CorruptionCache, OnTheFlyCorruption  # noqa: E402
from lightning_modules.models import build_model  # noqa: E402

MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
STD = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)


def test_images(count: int) -> tuple[np.ndarray, str]:
    archive = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if archive.exists():
        import io
        import tarfile

        from PIL import Image

        images = []
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and "test/" in member.name and len(images) < count:
                    images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                if len(images) == count:
                    break
        return np.stack(images), "real CIFAR-10 test images"
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), "random images"


@torch.inference_mode()
def evaluate(model, loader) -> int:
    seen = 0
    for images, _labels in loader:
        model((images.float() / 255 - MEAN) / STD).argmax(1)
        seen += len(images)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--splits", type=int, default=5, help="corrupted splits timed (severity 3 of the first N)")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    clean, source = test_images(args.images)
    labels = np.zeros(len(clean), dtype=np.int64)
    splits = [(name, 3) for name in CORRUPTIONS[: args.splits]]
    model = build_model("resnet20", 10).eval()
    print(f"ResNet20 eval, batch {args.batch_size}, {len(clean)} {source}, {len(splits)} splits, "
          f"{torch.get_num_threads()} threads")

    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=keep_batch)

    tensors = [torch.from_numpy(clean[i:i + args.batch_size]).permute(0, 3, 1, 2)
               for i in range(0, len(clean), args.batch_size)]
    evaluate(model, [(t, None) for t in tensors])  # warm-up
    start = time.perf_counter()
    seen = sum(evaluate(model, [(t, None) for t in tensors]) for _ in splits)
    model_only = seen / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as folder:
        cache = CorruptionCache(folder, clean, "cifar", seed=0)
        cache.generate(splits, workers=1)
        start = time.perf_counter()
        seen = sum(evaluate(model, loader(ArrayImageDataset(cache.load(c, s), labels))) for c, s in splits)
        cached = seen / (time.perf_counter() - start)

    start = time.perf_counter()
    seen = sum(evaluate(model, loader(ArrayImageDataset(clean, labels, OnTheFlyCorruption(c, s, "cifar", 0))))
               for c, s in splits)
    on_the_fly = seen / (time.perf_counter() - start)

    print(f"\n{'path':16s}{'images/s':>12s}{'x model only':>14s}")
    for name, rate in (("model only", model_only), ("cached splits", cached), ("on the fly", on_the_fly)):
        print(f"{name:16s}{rate:12,.0f}{rate / model_only:14.2f}")
    print(f"\nall 95 splits of the 10,000-image CIFAR-10 test set from the cache: {950_000 / cached / 60:.1f} min "
          f"(model alone: {950_000 / model_only / 60:.1f} min)")


if __name__ == "__main__":
    main()
