"""`QuantizationCallback`: injects fake-quant into the LightningModule's `net` before the optimizer exists.

Lightning's order is setup -> configure_model -> checkpoint restore -> strategy setup (DDP wrap,
configure_optimizers) -> on_fit_start. Swapping layers in `setup` is the latest point at which new
parameters (LSQ steps, PACT alphas) still reach the optimizer and DDP; `on_fit_start` would be too late and
never runs for `test`. The spec is written into every checkpoint, and the module re-applies it on load.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from quantizers import (
    CHECKPOINT_KEY,
    QuantSpec,
    QuantSpecError,
    applied_spec,
    plan_layers,
    quantize_model,
    quantized_layers,
    quantizer_state,
    unready_quantizers,
    weight_quantization_noise,
)


def _network(pl_module: L.LightningModule) -> nn.Module:
    net = getattr(pl_module, "net", None)
    if not isinstance(net, nn.Module):
        raise QuantSpecError(
            f"{type(pl_module).__name__} has no `net` module for the quantization callback to quantize"
        )
    return net


class QuantizationCallback(L.Callback):
    """Applies a quantization spec to the model and logs the quantizers' state.

    Configured in its own `quantization:` section of the config; its fields are those of `QuantSpec`.

    Args:
        log_every_n_epochs: how often to log step sizes, alphas and weight quantization noise.
        **spec_fields: the fields of `quantizers.QuantSpec` (method, weight_bits, act_bits, ...).
    """

    def __init__(self, log_every_n_epochs: int = 1, **spec_fields: Any) -> None:
        super().__init__()
        self.spec = QuantSpec(**spec_fields)
        self.log_every_n_epochs = max(1, int(log_every_n_epochs))
        self._checked_first_batch = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        net = _network(pl_module)
        if self.spec.quantized and applied_spec(net) != self.spec:
            plans = plan_layers(net, self.spec)
            quantize_model(net, self.spec)
            kept = [p.name for p in plans if p.weight_bits != self.spec.weight_bits]
            rank_zero_info(
                f"quantization: {self.spec.describe()} on {len(plans)} layers"
                + (f"; other precision: {', '.join(kept)}" if kept else "")
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Quantizers initialise on the first training batch (LSQ activation steps); any left over never saw an input.
        if self._checked_first_batch:
            return
        self._checked_first_batch = True
        missing = unready_quantizers(_network(pl_module))
        if missing:
            rank_zero_warn(f"quantizers never reached by a training batch: {', '.join(missing)}")

    def on_test_start(self, trainer, pl_module) -> None:
        missing = unready_quantizers(_network(pl_module))
        if missing:
            rank_zero_warn(
                f"testing with {len(missing)} quantizers that never saw a training batch (an LSQ activation "
                "quantizer passes its input through in float until then): pass --ckpt_path of a trained model"
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        net = _network(pl_module)
        if not applied_spec(net).quantized or trainer.current_epoch % self.log_every_n_epochs:
            return
        metrics = {f"quant/{name}": value for name, value in quantizer_state(net).items()}
        noise = weight_quantization_noise(net)
        for name, (mean_square, predicted) in noise.items():
            metrics[f"quant_noise/{name}"] = mean_square
            metrics[f"quant_noise_ratio/{name}"] = mean_square / predicted
        if noise:
            metrics["quant_noise/mean"] = sum(v for v, _ in noise.values()) / len(noise)
        # DDP keeps every rank's weights and quantizers in step, so the mean over ranks is each rank's value:
        # sync_dist says so to Lightning (which otherwise warns once per key that rank 0's value is unreduced).
        pl_module.log_dict(metrics, on_epoch=True, sync_dist=True)
        # each layer's weight bits, for metrics.jsonl only (the report keeps the first/last layers, held at
        # their own precision, off the noise-against-bits plot); a constant is no use as a logger curve
        layers = quantized_layers(net).items()
        bits = {f"quant_bits/{name}": float(layer.weight_quantizer.bits) for name, layer in layers
                if getattr(layer.weight_quantizer, "bits", None) is not None}
        if bits:
            pl_module.log_dict(bits, on_epoch=True, sync_dist=True, logger=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Under DDP, check that every rank ends with the same quantizer state (steps, alphas, init flags)."""
        net = _network(pl_module)
        if trainer.world_size < 2 or not applied_spec(net).quantized:
            return
        state = torch.cat([t.detach().float().flatten() for name, t in net.state_dict().items()
                           if "quantizer" in name] or [torch.zeros(1)]).to(pl_module.device)
        gathered = pl_module.all_gather(state)
        difference = (gathered - gathered[0]).abs().max().item()
        if difference == 0:
            rank_zero_info(f"quantization: quantizer state identical on {trainer.world_size} ranks "
                           f"({state.numel()} values)")
        else:
            rank_zero_warn(f"quantization: quantizer state differs across ranks (max difference {difference:.3g})")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = applied_spec(_network(pl_module)).to_dict()
