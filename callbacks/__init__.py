"""Lightning callbacks: quantization injection, flatness measures, and the writer of a run's files (which
`records` defines and reads)."""

from callbacks.quantization import QuantizationCallback
from callbacks.results import ResultsCallback

__all__ = ["QuantizationCallback", "ResultsCallback"]
