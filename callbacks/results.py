"""`ResultsCallback`: writes what the report reads, to the run directory.

- after every training epoch, one JSON line of epoch-level metrics in `<run dir>/metrics.jsonl` (the
  validation-loss curves and overfitting onset come from here, not from W&B, whose offline files are not
  reliably readable);
- after `test`, one results-store row per (split, metric) in `<run dir>/results.jsonl` (DESIGN.md schema).

Lightning's CSVLogger is not used for the first: a resumed run rewrites its header from the new process's
keys and duplicates the epochs replayed after the last checkpoint. Here readers keep the last line written
for each epoch, so a resumed run simply supersedes what it replays.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from quantizers import applied_spec
from study.metrics import CLEAN, corruption_means
from study.store import RESULTS_FILE, append_rows, locked, write_atomically

METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.npz"
FLOAT_BITS = 32  # how a float (unquantized) tensor's precision is recorded in a results row


def split_identity(name: str) -> tuple[str, str, int]:
    """'clean' -> ('test', 'clean', 0); 'gaussian_noise/3' -> ('test', 'gaussian_noise', 3);
    'train' (measures on training images) -> ('train', 'none', 0)."""
    if name == "train":
        return "train", "none", 0
    corruption, _, severity = name.partition("/")
    return "test", corruption, int(severity) if severity else 0


def run_identity(
    trainer: L.Trainer, pl_module: L.LightningModule, study: str, run: str,
    weights_at: tuple[int | None, int] | None = None,
) -> dict[str, Any]:
    """The columns of a results row that describe the run rather than the measurement.

    `weights_at` is the (epoch, global step) of the weights measured, as stored in the checkpoint they came
    from; without one, the trainer's current position (the live weights)."""
    epoch, step = weights_at if weights_at is not None else (trainer.current_epoch, trainer.global_step)
    spec = applied_spec(pl_module.net)
    seed = os.environ.get("PL_GLOBAL_SEED")
    datamodule = getattr(trainer, "datamodule", None)
    return {
        "run": run,
        "study": study,
        "model": pl_module.hparams.get("model", type(pl_module.net).__name__.lower()),
        "dataset": getattr(datamodule, "name", "unknown"),
        "method": spec.method,
        "weight_bits": spec.weight_bits if spec.quantized else FLOAT_BITS,
        "act_bits": spec.effective_act_bits or FLOAT_BITS,
        "seed": int(seed) if seed is not None else None,
        "epoch": epoch,
        "step": step,
    }


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    return float(value) if isinstance(value, int | float) else None


def save_predictions(path: Path, correct: dict[str, Any]) -> None:
    """Per-image correctness by split, bit-packed: what the report's paired bootstrap resamples."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    arrays = {name.replace("/", "__"): np.packbits(np.asarray(v, dtype=bool)) for name, v in correct.items()}
    sizes = {f"size__{key}": np.array(len(v)) for key, v in zip(arrays, correct.values(), strict=True)}
    np.savez_compressed(buffer, **arrays, **sizes)
    write_atomically(path, buffer.getvalue())


def load_predictions(path: str | Path) -> dict[str, Any]:
    """The inverse of save_predictions: split name -> bool array."""
    import numpy as np

    with np.load(path) as data:
        return {
            key.replace("__", "/"): np.unpackbits(data[key])[: int(data[f"size__{key}"])].astype(bool)
            for key in data.files if not key.startswith("size__")
        }


def read_epoch_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics file, one per epoch (the last line written wins), sorted by epoch."""
    by_epoch: dict[int, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


class ResultsCallback(L.Callback):
    """Writes per-epoch metrics and test results to disk (rank 0 only).

    Args:
        path: the results store (JSON lines); default `<trainer.default_root_dir>/results.jsonl`.
        study: the study this run belongs to ("" for a standalone run).
        run: the run's name; default the name of `trainer.default_root_dir`.
    """

    def __init__(self, path: str | None = None, study: str = "", run: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.study = study
        self.run = run
        self._weights_at: tuple[int | None, int] | None = None  # (epoch, step) of the checkpoint tested

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores a checkpoint after setup: a test that loads none measures the live weights.
        self._weights_at = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._weights_at = (checkpoint.get("epoch"), int(checkpoint.get("global_step", 0)))

    def results_path(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / RESULTS_FILE

    def run_name(self, trainer: L.Trainer) -> str:
        return self.run or Path(trainer.default_root_dir).resolve().name

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        if trainer.optimizers:
            row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        for name, value in sorted(trainer.callback_metrics.items()):
            number = _scalar(value)
            if number is not None:
                row[name] = number if math.isfinite(number) else repr(number)
        path = Path(trainer.default_root_dir) / METRICS_FILE
        with locked(path):
            existing = path.read_bytes() if path.exists() else b""
            write_atomically(path, existing + (json.dumps(row) + "\n").encode())

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A diverged run is a result too: the report shows it, and a study does not retry it.
        from lightning_modules.divergence import TrainingDiverged

        if isinstance(exception, TrainingDiverged) and trainer.is_global_zero:
            identity = run_identity(trainer, pl_module, self.study, self.run_name(trainer))
            append_rows(self.results_path(trainer), [{**identity, "split": "train", "corruption": "none",
                                                      "severity": 0, "metric": "diverged",
                                                      "value": float(trainer.global_step)}])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results: dict[str, dict[str, float]] = getattr(pl_module, "test_results", {})
        identity = run_identity(trainer, pl_module, self.study, self.run_name(trainer), self._weights_at)
        rows = []
        for split_name, metrics in results.items():
            split, corruption, severity = split_identity(split_name)
            for metric, value in metrics.items():
                rows.append({**identity, "split": split, "corruption": corruption, "severity": severity,
                             "metric": metric, "value": value})
        append_rows(self.results_path(trainer), rows)
        predictions = getattr(pl_module, "test_predictions", None)
        if predictions:
            save_predictions(Path(trainer.default_root_dir) / PREDICTIONS_FILE, predictions)
        accuracy = {name: m["accuracy"] for name, m in results.items()
                    if "accuracy" in m and split_identity(name)[0] == "test"}
        if accuracy:
            print_accuracy_table(accuracy, title=f"{identity['model']} {identity['method']} "
                                 f"W{identity['weight_bits']}A{identity['act_bits']} test accuracy (%)")
            log_wandb_table(trainer, results)
        map50 = {name: m["map50"] for name, m in results.items() if "map50" in m}
        if map50 and not accuracy:  # detection: the same table in mAP50, then P / mPC / rPC
            print_accuracy_table(map50, title=f"{identity['model']} {identity['method']} "
                                 f"W{identity['weight_bits']}A{identity['act_bits']} test mAP50 (%)")
            print_detection_summary(map50)
            log_wandb_table(trainer, results)


def print_detection_summary(map50: dict[str, float]) -> None:
    """P (clean mAP50), mPC (mean over the 15 benchmark corruptions) and rPC = mPC / P, as Pascal-C reports."""
    from datamodules.corruptions import BENCHMARK_CORRUPTIONS

    benchmark = [v for name, v in map50.items() if name.partition("/")[0] in BENCHMARK_CORRUPTIONS]
    parts = [f"P {map50[CLEAN]:.2f}"] if CLEAN in map50 else []
    if benchmark:
        mpc = sum(benchmark) / len(benchmark)
        parts.append(f"mPC {mpc:.2f} ({len(benchmark)} splits)")
        if map50.get(CLEAN):
            parts.append(f"rPC {100 * mpc / map50[CLEAN]:.1f} %")
    if parts:
        print("detection robustness: " + ", ".join(parts))


def print_accuracy_table(accuracy: dict[str, float], title: str) -> None:
    """Clean accuracy, then one row per corruption: its five severities and their mean."""
    from rich.console import Console
    from rich.table import Table

    by_corruption: dict[str, dict[int, float]] = {}
    for name, value in accuracy.items():
        _, corruption, severity = split_identity(name)
        by_corruption.setdefault(corruption, {})[severity] = value
    severities = sorted({s for per in by_corruption.values() for s in per if s})
    table = Table(title=title)
    table.add_column("split")
    for severity in severities:
        table.add_column(f"s{severity}", justify="right")
    table.add_column("mean", justify="right")
    means = corruption_means(accuracy)
    if CLEAN in accuracy:
        table.add_row(CLEAN, *[""] * len(severities), f"{accuracy[CLEAN]:.2f}")
    for corruption, per in by_corruption.items():
        if corruption != CLEAN:
            cells = [f"{per[s]:.2f}" if s in per else "" for s in severities]
            table.add_row(corruption, *cells, f"{means[corruption]:.2f}")
    if "corrupted" in means:
        table.add_row("all corrupted", *[""] * len(severities), f"{means['corrupted']:.2f}")
    Console().print(table)


def log_wandb_table(trainer: L.Trainer, results: dict[str, dict[str, float]]) -> None:
    """Per-(corruption, severity) metrics as one wandb.Table (scalars are logged by the module)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            metrics = sorted({m for values in results.values() for m in values})
            data = [[*split_identity(name), *(values.get(m) for m in metrics)] for name, values in results.items()]
            logger.log_table(key="test/splits", columns=["split", "corruption", "severity", *metrics], data=data)
