"""`ResultsCallback`: writes what the report reads, to the run directory, through `records`.

- after every training epoch, one line of epoch-level metrics in `<run dir>/metrics.jsonl` (the validation-loss
  curves and overfitting onset come from here, not from W&B, whose offline files are not reliably readable),
  with the learning rate of every optimizer group as the epoch trained with it;
- after `test`, one results-store row per (split, metric) in `<run dir>/results.jsonl` and the per-image
  correctness of every split in `<run dir>/predictions.npz`.

What it needs from the task module is the `TaskModule` contract (lightning_modules/task.py): `net`,
`test_results` and `test_predictions`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from callbacks.collapse import collapse_reasons
from quantizers import applied_spec
from records.measures import COLLAPSED_LAYERS_METRIC, COLLAPSED_METRIC, corruption_means, detection_summary
from records.run_files import METRICS_FILE, PREDICTIONS_FILE, append_epoch_metrics, save_predictions
from records.splits import CLEAN, TRAIN, split_columns, split_identity
from records.store import RESULTS_FILE, append_rows

LR_MONITOR_PREFIX = "lr-"  # Lightning's LearningRateMonitor columns (for W&B); metrics.jsonl has its own


def run_identity(
    trainer: L.Trainer, pl_module: L.LightningModule, study: str, run: str,
    weights_at: tuple[int | None, int] | None = None,
) -> dict[str, Any]:
    """The columns of a results row that describe the run rather than the measurement.

    `weights_at` is the (epoch, global step) of the weights measured, as stored in the checkpoint they came
    from; without one, the trainer's current position (the live weights)."""
    epoch, step = weights_at if weights_at is not None else (trainer.current_epoch, trainer.global_step)
    spec = applied_spec(pl_module.net)
    weight_bits, act_bits = spec.recorded_bits
    seed = os.environ.get("PL_GLOBAL_SEED")
    datamodule = getattr(trainer, "datamodule", None)
    return {
        "run": run,
        "study": study,
        "model": pl_module.hparams.get("model", type(pl_module.net).__name__.lower()),
        "dataset": getattr(datamodule, "name", "unknown"),
        "method": spec.method,
        "weight_bits": weight_bits,
        "act_bits": act_bits,
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
        self._epoch_lrs: dict[str, float] = {}  # the learning rates this epoch's last step trained with

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores a checkpoint after setup: a test that loads none measures the live weights.
        self._weights_at = None
        # The TaskModule contract: callbacks that add to test_results run their on_test_end before this one.
        after = trainer.callbacks[trainer.callbacks.index(self) + 1:] if self in trainer.callbacks else []
        late = [type(c).__name__ for c in after if getattr(c, "adds_test_results", False)]
        if late:
            raise ValueError(f"{', '.join(late)} must come before ResultsCallback in the trainer's callbacks, or "
                             "its test results are written after the results rows")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._weights_at = (checkpoint.get("epoch"), int(checkpoint.get("global_step", 0)))

    def results_path(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / RESULTS_FILE

    def run_name(self, trainer: L.Trainer) -> str:
        return self.run or Path(trainer.default_root_dir).resolve().name

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # The rates this step uses: after a per-step schedule has set them (detection's warm-up, in the module's
        # on_train_batch_start) and before Lightning steps an epoch-interval scheduler, which it does before
        # on_train_batch_end of an epoch's last batch (so reading at epoch end gives the next epoch's rate).
        groups = optimizer.param_groups
        self._epoch_lrs = {"lr": float(groups[0]["lr"])}
        if len(groups) > 1:
            self._epoch_lrs.update({f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(groups)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step, **self._epoch_lrs}
        for name, value in sorted(trainer.callback_metrics.items()):
            number = _scalar(value)
            if number is not None and not name.startswith(LR_MONITOR_PREFIX):
                row[name] = number if math.isfinite(number) else repr(number)
        append_epoch_metrics(Path(trainer.default_root_dir) / METRICS_FILE, row)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A diverged run is a result too: the report shows it, and a study does not retry it.
        from lightning_modules.divergence import TrainingDiverged

        if isinstance(exception, TrainingDiverged) and trainer.is_global_zero:
            # the step the loss first went non-finite (the check that raised may come a few steps later)
            step = trainer.global_step if exception.step is None else exception.step
            identity = run_identity(trainer, pl_module, self.study, self.run_name(trainer))
            append_rows(self.results_path(trainer), [{**identity, **split_columns(TRAIN), "metric": "diverged",
                                                      "value": float(step)}])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results: dict[str, dict[str, float]] = getattr(pl_module, "test_results", {})
        identity = run_identity(trainer, pl_module, self.study, self.run_name(trainer), self._weights_at)
        rows = []
        for split_name, metrics in results.items():
            rows += [{**identity, **split_columns(split_name), "metric": metric, "value": value}
                     for metric, value in metrics.items()]
        reasons, layers = collapse_reasons(pl_module.net, results)
        if reasons:
            clean = {**identity, **split_columns(CLEAN)}
            rows += [{**clean, "metric": COLLAPSED_METRIC, "value": 1.0},
                     {**clean, "metric": COLLAPSED_LAYERS_METRIC, "value": float(layers)}]
        append_rows(self.results_path(trainer), rows)
        predictions = getattr(pl_module, "test_predictions", None)
        if predictions:
            save_predictions(Path(trainer.default_root_dir) / PREDICTIONS_FILE, predictions)
        accuracy = {name: m["accuracy"] for name, m in results.items()
                    if "accuracy" in m and split_identity(name)[0] == "test"}
        # 'resnet20 lsq W4A4', 'resnet20 dorefa W4', 'resnet20 fp32': the spec's own label
        described = f"{identity['model']} {applied_spec(pl_module.net).describe()}"
        if accuracy:
            print_accuracy_table(accuracy, title=f"{described} test accuracy (%)")
            log_wandb_table(trainer, results)
        map50 = {name: m["map50"] for name, m in results.items() if "map50" in m}
        if map50 and not accuracy:  # detection: the same table in mAP50, then P / mPC / rPC
            print_accuracy_table(map50, title=f"{described} test mAP50 (%)")
            print_detection_summary(map50)
            log_wandb_table(trainer, results)
        if reasons:
            print(f"qreg: collapsed: {identity['run']} ({described}): {'; '.join(reasons)}; recorded as collapsed, it "
                  "is kept out of every delta, Eq. 5 and robustness measure", file=sys.stderr, flush=True)


def print_detection_summary(map50: dict[str, float]) -> None:
    """P (clean mAP50), mPC (mean over the 15 benchmark corruptions) and rPC = mPC / P, as Pascal-C reports."""
    summary = detection_summary(map50)
    parts = [f"P {summary['P']:.2f}"] if "P" in summary else []
    if "mPC" in summary:
        parts.append(f"mPC {summary['mPC']:.2f}")
    if "rPC" in summary:
        parts.append(f"rPC {summary['rPC']:.1f} %")
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
