"""A run that trained to a dead model is recorded as collapsed, not scored: its clean accuracy at chance level,
or a quantized layer whose weights all sit on one level (an LSQ step grown past every weight).

Its loss stays finite, so the divergence check never fires; left alone, the report would score a constant
classifier and call it "more robust" (it loses nothing under corruption because it has nothing to lose).
"""

from __future__ import annotations

from torch import nn

from quantizers.health import COLLAPSED_LEVEL_SHARE, collapsed_layers
from records.measures import CHANCE_METRIC, IMAGES_METRIC, chance_bound
from records.splits import CLEAN


def collapse_reasons(net: nn.Module, results: dict[str, dict[str, float]]) -> tuple[list[str], int]:
    """(why the tested model is collapsed, one phrase each; how many of its quantized layers are), ([], 0) if alive."""
    reasons = []
    clean = results.get(CLEAN, {})
    if {"accuracy", CHANCE_METRIC, IMAGES_METRIC} <= clean.keys():
        bound = chance_bound(clean[CHANCE_METRIC], int(clean[IMAGES_METRIC]))
        if clean["accuracy"] <= bound:
            reasons.append(f"clean accuracy {clean['accuracy']:.2f} % is at chance level (the largest class is "
                           f"{clean['chance']:.2f} % of {int(clean['images'])} images; bound {bound:.2f} %)")
    layers = collapsed_layers(net)
    if layers:
        named = ", ".join(f"{name} ({100 * share:.1f} %)" for name, share in list(layers.items())[:4])
        more = f" and {len(layers) - 4} more" if len(layers) > 4 else ""
        reasons.append(f"{len(layers)} quantized layer(s) with >= {100 * COLLAPSED_LEVEL_SHARE:.0f} % of their "
                       f"weights on one level: {named}{more}")
    return reasons, len(layers)
