"""Images per second the classification DataModule delivers to the training step, next to the step itself.

    python benchmarks/loader.py                       # CIFAR-sized synthetic uint8 data, batch 128
    python benchmarks/loader.py --device-resident     # the same batches indexed from a device-resident copy

The loader figure is what Lightning's training loop receives: the training DataLoader (the resumable
sampler, one numpy fancy-index per batch), the transfer to the device, random crop + flip and normalisation
(`on_after_batch_transfer`), no model. The step figure is one ResNet20 SGD step (forward, loss, backward,
optimizer) on such a batch. Both are measured side by side, interleaved round by round; the target is a
loader at least 20x faster than the step, so data never limit training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import ClassifierStep  # noqa: E402  (benchmarks/, the script's own folder)

from datamodules.base import ImageClassificationDataModule  # noqa: E402
from quantizers import QuantSpec  # noqa: E402

TARGET = 20.0


class SyntheticCIFAR(ImageClassificationDataModule):
    """CIFAR-10's shapes (50,000 train / 10,000 test uint8 32x32x3) with random content."""

    name = "synthetic-cifar"
    num_classes = 10

    def __init__(self, train_size: int, **kwargs) -> None:
        self.size = train_size
        super().__init__(**kwargs)

    def load(self):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (self.size + 1000, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, self.size + 1000)
        return images[: self.size], labels[: self.size], images[self.size :], labels[self.size :]


class LoaderTimer:
    """Batches through the DataModule's training loader and its on-device batch transform."""

    def __init__(self, data: ImageClassificationDataModule, device: str) -> None:
        self.data, self.device = data, torch.device(device)
        self.iterator = iter(())

    def next_batch(self):
        batch = next(self.iterator, None)
        if batch is None:
            self.iterator = iter(self.data.train_dataloader())
            batch = next(self.iterator)
        images, labels = (t.to(self.device, non_blocking=True) for t in batch)
        return self.data.on_after_batch_transfer((images, labels), 0)

    def time_batches(self, batches: int) -> float:
        start = time.perf_counter()
        for _ in range(batches):
            images, _ = self.next_batch()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / batches


def measure(args) -> dict[str, float]:
    """Images/s of the loader and of each step; returns them for callers (device_check)."""
    data = SyntheticCIFAR(args.train_size, batch_size=args.batch_size, val_size=1000,
                          device_resident=args.device_resident)
    # the two things on_after_batch_transfer and the loader read from a Trainer
    data.trainer = SimpleNamespace(training=True, strategy=SimpleNamespace(root_device=torch.device(args.device)),
                                   fit_loop=SimpleNamespace(restarting=False), world_size=1)
    data.setup("fit")
    loader = LoaderTimer(data, args.device)
    batch = loader.next_batch()
    steps = {name: ClassifierStep(args.model, spec, batch, args.device, warmup_steps=1) for name, spec in
             (("fp32", QuantSpec()), ("lsq W4A4", QuantSpec(method="lsq", weight_bits=4)))}
    samples: dict[str, list[float]] = {"loader": [], **{name: [] for name in steps}}
    for _ in range(args.rounds):
        samples["loader"].append(loader.time_batches(args.batches))
        for name, step in steps.items():
            samples[name].append(step.time_steps(args.steps))
    return {name: args.batch_size / statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40, help="loader batches per round")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device-resident", action="store_true")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    residence = "device-resident" if args.device_resident else "host-resident"
    print(f"{args.model}, batch {args.batch_size}, {where}, {residence} data, torch {torch.__version__}")
    rates = measure(args)
    print(f"\n{'what':34s}{'images/s':>12s}{'loader x':>10s}")
    for name, rate in rates.items():
        label = "DataModule (augment, normalise)" if name == "loader" else f"{args.model} {name} train step"
        print(f"{label:34s}{rate:12,.0f}{rates['loader'] / rate:10.1f}")
    slowest_margin = rates["loader"] / rates["fp32"]
    verdict = "meets" if slowest_margin >= TARGET else "misses"
    print(f"\nloader is {slowest_margin:.1f}x the FP32 step: {verdict} the target {TARGET:.0f}x")


if __name__ == "__main__":
    main()
