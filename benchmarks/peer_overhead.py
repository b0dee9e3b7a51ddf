"""Eager training-step cost of LSQ fake quantization in qreg and in its peers, side by side in one run.

    python benchmarks/peer_overhead.py                      # ResNet20, batch 128, W4A4, 5 interleaved rounds
    pip install brevitas                                    # optional: Brevitas is timed when it imports

The same ResNet20, quantized by qreg's module swap at W4A4 (first and last layer at 8 bits), with each layer's
weight and input quantizers then replaced by a peer's learned-step fake-quantizer of the same bit width and
signedness:
- torch.ao: `_LearnableFakeQuantize` (LSQ, with its gradient scaling), observer off after the first batch;
- Brevitas: `QuantIdentity` with its learned per-tensor float scale (`Int8ActPerTensorFloat` /
  `Uint8ActPerTensorFloat` at the bit width), statistics collected on the first batch only.
Each is timed as `fakequant_overhead.py` times qreg (one SGD step on a fixed random batch, the DataModules'
channels_last layout), interleaved round by round, medians, ratios against FP32 of the same run. Peers are
optional: one that does not import is reported as such, not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import TimedTrainingStep, classifier_images  # noqa: E402  (benchmarks/, the script's own folder)

from lightning_modules.models import build_model  # noqa: E402
from quantizers import LSQQuantizer, QuantSpec, quantize_model  # noqa: E402

SPEC = QuantSpec(method="lsq", weight_bits=4)


def _torch_ao(quantizer: LSQQuantizer) -> nn.Module:
    from torch.ao.quantization import MinMaxObserver
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    low, high = -quantizer.q_neg, quantizer.q_pos
    dtype = torch.qint8 if quantizer.signed else torch.quint8
    return _LearnableFakeQuantize(MinMaxObserver, quant_min=low, quant_max=high, use_grad_scaling=True, dtype=dtype,
                                  qscheme=torch.per_tensor_symmetric if quantizer.signed else torch.per_tensor_affine)


def _brevitas(quantizer: LSQQuantizer) -> nn.Module:
    from brevitas.nn import QuantIdentity
    from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

    kind = Int8ActPerTensorFloat if quantizer.signed else Uint8ActPerTensorFloat
    return QuantIdentity(act_quant=kind.let(collect_stats_steps=1), bit_width=quantizer.bits,
                         return_quant_tensor=False)


PEERS = {"torch.ao": _torch_ao, "brevitas": _brevitas}


class PeerStep(TimedTrainingStep):
    """ResNet20 with qreg's LSQ quantizers, or each replaced by `peer`'s; fp32 when `quantized` is False."""

    def __init__(self, batch: tuple, quantized: bool, peer=None) -> None:
        torch.manual_seed(0)
        self.model = build_model("resnet20", 10)
        if quantized:
            quantize_model(self.model, SPEC)
        if peer is not None:
            for layer in self.model.modules():
                for slot in ("weight_quantizer", "input_quantizer"):
                    if isinstance(getattr(layer, slot, None), LSQQuantizer):
                        setattr(layer, slot, peer(getattr(layer, slot)))
        self.model.train()
        self.images, self.labels = batch
        self.device = "cpu"
        with torch.no_grad():
            self.model(self.images)  # first batch: qreg's, Brevitas's steps from statistics; torch.ao's observers
        for module in self.model.modules():
            if hasattr(module, "enable_param_learning"):
                module.enable_param_learning()  # torch.ao: observer off, scale learned from here on
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(3):
            self.step()

    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(self.images), self.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    batch = (classifier_images(args.batch_size, generator, "cpu"),
             torch.randint(0, 10, (args.batch_size,), generator=generator))
    print(f"ResNet20 {SPEC.describe()}, batch {args.batch_size}, eager, CPU {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    trainees = {"fp32": PeerStep(batch, quantized=False), "qreg lsq": PeerStep(batch, quantized=True)}
    for name, peer in PEERS.items():
        try:
            trainees[f"{name} lsq"] = PeerStep(batch, quantized=True, peer=peer)
        except ImportError as error:
            print(f"  {name}: not timed ({error})")
    samples: dict[str, list[float]] = {name: [] for name in trainees}
    for _ in range(args.rounds):
        for name, trainee in trainees.items():
            samples[name].append(trainee.time_steps(args.steps))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    print(f"\n{'':12s}{'ms/step':>10s}{'x fp32':>9s}")
    for name, median in medians.items():
        print(f"{name:12s}{1000 * median:10.1f}{median / medians['fp32']:9.2f}")


if __name__ == "__main__":
    main()
