"""`Quantizer`: what every fake quantizer tells the code around it, so that code never names a quantizer class.

The optimizer groups and the quantizer logging (`swap.py`), `torch.compile` (`compiling.py`), the callbacks, the
detector's EMA copy and the exporters (`deploy/`) read a quantizer only through these members:

    learned_parameters       its trained parameters and their optimizer treatment (class attribute)
    ready                    False while a first-training-batch initialisation is still to come
    mark_ready()             count the current state as initialised (a test that set it by hand, an EMA copy)
    integer_grid(weight)     the integer grid its forward pass computes on (None: float at inference)
    packing_facts(weight)    float facts beyond its state that rebuilding packed weights needs
    weight_from_integers()   float weights that it quantizes onto given integers (the packed loader)

A method whose quantizer derives from `Quantizer` (or `DataInitializedQuantizer`, for a scale set from data)
and overrides what applies to it needs nothing else but its `register` call (`quantizers.methods`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from quantizers.grid import IntegerGrid, NoIntegerGrid


@dataclass(frozen=True)
class LearnedParameter:
    """A quantizer parameter trained beside the network.

    Args:
        attribute: the quantizer's attribute holding the nn.Parameter (its state_dict name, its logged name).
        group: the name of its optimizer group (one group per name, shared by every quantizer that names it).
        decay_field: the QuantSpec field holding the group's weight decay.
        lr_scale_field: the QuantSpec field holding the group's learning-rate multiplier (None: the network's).
    """

    attribute: str
    group: str
    decay_field: str
    lr_scale_field: str | None = None


class Quantizer(nn.Module):
    """Base of every fake quantizer: the defaults suit a stateless quantizer with nothing to export."""

    learned_parameters: ClassVar[tuple[LearnedParameter, ...]] = ()

    @property
    def ready(self) -> bool:
        """Whether no first-training-batch initialisation (or check) is left to run: read by the compile switch,
        the callbacks' warnings and the EMA copy, never by the forward pass."""
        return True

    def mark_ready(self) -> None:
        """Count the quantizer's current state as initialised, without looking at data."""

    def integer_grid(self, weight: torch.Tensor | None = None) -> IntegerGrid | None:
        """The grid of the eval-mode forward pass, exactly: its scale is the tensor that forward pass uses.

        `weight`: the layer's float weight, for a weight quantizer whose grid depends on it (None for an input
        quantizer). Returns None where the tensor stays float at inference; raises NoIntegerGrid where there is
        no grid to state (a method without export, a scale never initialised).
        """
        raise NoIntegerGrid(f"{type(self).__name__} states no integer grid, so it cannot be exported")

    def packing_facts(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float tensors, beyond the state_dict, that `weight_from_integers` needs (packed with the codes)."""
        return {}

    def weight_from_integers(self, integers: torch.Tensor, facts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float weights that this quantizer (its state loaded) puts on `integers` exactly.

        The default suits a grid that needs no weight: `integer * scale` divides back to the integer.
        """
        grid = self.integer_grid()
        if grid is None:
            raise NoIntegerGrid(f"{type(self).__name__} keeps weights in float: there are no integers to load")
        return integers.float() * grid.broadcast_scale(integers.dim())


class DataInitializedQuantizer(Quantizer):
    """A quantizer whose scale is set from data: from the weight when it is built, or from its first training
    batch (an activation quantizer, which passes its input through until then).

    `initialized` is a buffer, so a checkpoint says whether the scale was set; `_initialized` is its host-side
    mirror, which the forward pass reads so that it costs no device sync per call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False

    @property
    def ready(self) -> bool:
        return self._initialized

    @torch.no_grad()
    def mark_ready(self) -> None:
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)


def quantizers_in(net: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(name, quantizer) for every `Quantizer` in `net`, in module order."""
    return ((name, m) for name, m in net.named_modules() if isinstance(m, Quantizer))


def unready_quantizers(net: nn.Module) -> list[str]:
    """Names of `net`'s quantizers whose first-training-batch initialisation has not run."""
    return [name for name, quantizer in quantizers_in(net) if not quantizer.ready]
