"""Lightning callbacks: quantization injection, and the metrics-to-disk writer the report reads."""

from callbacks.quantization import QuantizationCallback
from callbacks.results import METRICS_FILE, RESULTS_FILE, ResultsCallback, read_epoch_metrics

__all__ = ["METRICS_FILE", "RESULTS_FILE", "QuantizationCallback", "ResultsCallback", "read_epoch_metrics"]
