"""Lightning callbacks: quantization injection, and the metrics-to-disk writer the report reads."""

from callbacks.quantization import QuantizationCallback
from callbacks.results import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    RESULTS_FILE,
    ResultsCallback,
    load_predictions,
    read_epoch_metrics,
)

__all__ = [
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "RESULTS_FILE",
    "QuantizationCallback",
    "ResultsCallback",
    "load_predictions",
    "read_epoch_metrics",
]
