"""Trace every LSQ weight step at every optimizer update of short from-scratch fits (docs/lsq_step.md).

    python benchmarks/lsq_step_trace.py --bits 2 --seeds 0,1,2,3                 # the default step rate
    python benchmarks/lsq_step_trace.py --bits 8 --seeds 0,1,2,3 --quantizer_lr_scale 1   # the old behaviour

Each run is `cli.py fit` of the demo's config (its 12-epoch schedule: the same milestones) stopped after
`--steps` updates, in this process, with W&B off and no test. One line per run: the classifier's step at the
first and last update, its extremes, and the largest growth / shrinkage of any weight step relative to its first
value; the per-update trace goes to `--out/<run>.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class StepTrace(L.Callback):
    """Appends, after every optimizer update, each LSQ weight step (mean over channels) and its gradient."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.path.write_text("")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from quantizers import LSQQuantizer

        row = {"step": trainer.global_step, "loss": float(outputs["loss"])}
        for name, module in pl_module.net.named_modules():
            if isinstance(module, LSQQuantizer) and not module.activation:
                row[name] = float(module.step.detach().mean())
                row[f"{name}.grad"] = None if module.step.grad is None else float(module.step.grad.mean())
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [k for k in rows[0] if k != "step" and k != "loss" and not k.endswith(".grad")]
    ratios = {k: [r[k] / rows[0][k] for r in rows] for k in steps}
    fc = [r["fc.weight_quantizer"] for r in rows]
    up = max(steps, key=lambda k: max(ratios[k]))
    down = min(steps, key=lambda k: min(ratios[k]))
    return (f"fc step {fc[0]:.4f} -> {fc[-1]:.4f} (max {max(fc):.4f}, min {min(fc):.5f}); largest growth "
            f"{max(ratios[up]):.1f}x ({up}), largest shrinkage {min(ratios[down]):.3f}x ({down}); "
            f"last training loss {rows[-1]['loss']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--quantizer_lr_scale", type=float, default=None, help="default: the spec's")
    parser.add_argument("--out", default=None, help="folder of the traces (default: a temporary folder)")
    options = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    os.chdir(ROOT)
    from cli import main as cli_main

    out = Path(options.out or tempfile.mkdtemp(prefix="lsq-step-trace-"))
    out.mkdir(parents=True, exist_ok=True)
    scale = [] if options.quantizer_lr_scale is None else ["--quantization.quantizer_lr_scale",
                                                          str(options.quantizer_lr_scale)]
    for seed in (int(s) for s in options.seeds.split(",")):
        name = f"w{options.bits}-seed{seed}"
        code = cli_main([
            "fit", "--config", "configs/digits_resnet20_fp32.yaml", "--trainer.max_epochs", "12",
            "--trainer.max_steps", str(options.steps), "--quantization.method", "lsq",
            "--quantization.weight_bits", str(options.bits), "--seed_everything", str(seed), *scale,
            "--trainer.default_root_dir", str(out / name), "--test_after_fit", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--flatness.enabled", "false", "--trainer.callbacks+=lsq_step_trace.StepTrace",
            "--trainer.callbacks.path", str(out / f"{name}.jsonl")])
        print(f"{name}: exit {code}; {summary(out / f'{name}.jsonl')}", flush=True)


if __name__ == "__main__":
    main()
