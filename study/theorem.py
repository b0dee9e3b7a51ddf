"""`cli.py theorem`: Theorem 3.1 measured on trained FP32 runs (see records/mechanism.py for the estimators)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from quantizers.methods import FP32
from records.mechanism import (
    gradient_norm_term,
    hessian_trace,
    noise_loss_increase,
    quantization_noise_variances,
)
from records.splits import TRAIN, split_columns
from records.store import RESULTS_FILE, append_rows
from study.grid import StudyError
from study.layout import CELLS


def load_run(run_dir: Path):
    """(module, datamodule, config dict) of a finished run folder, rebuilt from its config and checkpoint."""
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    from callbacks.checkpoint_io import read_checkpoint
    from lightning_modules import ClassificationModule

    config_file, checkpoint = run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    if not config_file.is_file() or not checkpoint.is_file():
        raise StudyError(f"{run_dir} is not a finished run: it needs config.yaml and checkpoints/last.ckpt")
    position = read_checkpoint(checkpoint)  # a damaged or foreign file: one line naming it
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise StudyError(f"{config_file} is not a readable run config ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); restore the one the run's fit wrote") from None
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    datamodule = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    module = ClassificationModule.load_from_checkpoint(checkpoint, map_location="cpu")
    config["weights_at"] = {"epoch": position.get("epoch"), "step": position.get("global_step")}
    return module, datamodule, config


def fp32_runs(path: Path) -> list[Path]:
    if (path / "config.yaml").is_file():
        return [path]
    runs = sorted(p for p in (path / CELLS).glob("fp32-*") if (p / "config.yaml").is_file())
    if not runs:
        raise StudyError(f"no FP32 run under {path}: give a run folder or a study folder with finished fp32 cells")
    return runs


def check_runs(path: Path, bits_levels: list[int], images: int, samples: int, hessian_samples: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from callbacks.flatness import training_batches
    from quantizers import FLOAT_BITS, applied_spec

    for run_dir in fp32_runs(path):
        module, datamodule, config = load_run(run_dir)
        if applied_spec(module.net).quantized:
            raise StudyError(f"{run_dir} is a quantized run; Theorem 3.1 is checked on FP32 weights")
        datamodule.setup("fit")
        net = module.net.eval()
        batches = training_batches(datamodule, images, 128, torch.device("cpu"))
        table = Table(title=f"Theorem 3.1 on {run_dir.name}: loss increase under b-bit-sized weight noise")
        for column in ("bits", "mean sigma^2", "measured (MC)", "+- s.e.", "grad-norm term (Eq. 4)",
                       "0.5 sum sigma^2 tr(H)", "+- s.e."):
            table.add_column(column, justify="right")
        rows = []
        for bits in bits_levels:
            variances = quantization_noise_variances(net, bits)
            measured, measured_error = noise_loss_increase(net, batches, variances, samples)
            # per-sample Jacobians are the expensive part: at most one batch of images
            first_order = gradient_norm_term(net, batches[:1], variances)
            with torch.enable_grad():
                trace, trace_error = hessian_trace(net, batches, hessian_samples, weights=variances)
            second_order, second_error = 0.5 * trace, 0.5 * trace_error
            mean_variance = sum(variances.values()) / len(variances)
            table.add_row(str(bits), f"{mean_variance:.3g}", f"{measured:.4g}", f"{measured_error:.2g}",
                          f"{first_order:.4g}", f"{second_order:.4g}", f"{second_error:.2g}")
            values = {"theorem_noise_variance": mean_variance, "theorem_mc_increase": measured,
                      "theorem_mc_stderr": measured_error, "theorem_gradient_norm_term": first_order,
                      "theorem_hessian_term": second_order, "theorem_hessian_stderr": second_error}
            results = config.get("results") or {}
            identity = {"run": results.get("run") or run_dir.name, "study": results.get("study") or "",
                        "model": module.hparams.get("model"), "dataset": datamodule.name, "method": FP32,
                        "weight_bits": bits, "act_bits": FLOAT_BITS, "seed": config.get("seed_everything"),
                        **config["weights_at"], **split_columns(TRAIN)}
            rows += [{**identity, "metric": k, "value": v if math.isfinite(v) else float("nan")}
                     for k, v in values.items()]
        Console().print(table)
        store = Path((config.get("results") or {}).get("path") or run_dir / RESULTS_FILE)
        append_rows(store, rows)
        print(f"appended {len(rows)} rows to {store}")
