"""The error a user's quantization mistake raises: one line that names the fix."""

from user_errors import UserError


class QuantSpecError(UserError):
    """An invalid quantization spec, or one that does not fit the model or the checkpoint."""


def check_non_negative(values, quantizer, grid: str, fix: str) -> None:
    """Refuse to clip negative inputs silently where the module swap expected post-ReLU inputs.

    Standalone quantizers clip by definition; a swapped layer sets `expect_non_negative` so that a network
    with non-ReLU activations (SiLU, GELU) fails on its first batch instead of training a different model.
    """
    if not getattr(quantizer, "expect_non_negative", False):
        return
    low = float(values.detach().min())
    if low < 0:
        layer = getattr(quantizer, "layer_name", "") or "a layer"
        raise QuantSpecError(
            f"{layer} receives negative inputs (min {low:.3g}) but its activation quantizer uses {grid}, "
            f"which would clip them to 0; {fix}"
        )
