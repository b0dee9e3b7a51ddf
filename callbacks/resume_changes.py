"""Resuming never changes a run silently.

`fit --ckpt_path` compares the config being run with the run it continues: the model's hyperparameters and
the quantization spec the checkpoint carries, and everything else from the `config.yaml` beside it (the run
folder's). Keys fall in four kinds:

- ignored: where and how a run is shown or stored, never what it trains (progress bar, logger, workers, the
  results store, the run folder, the accelerator);
- recorded: allowed without asking, printed and appended to `resume-changes.yaml`: the run's length
  (`trainer.max_epochs` extends a run), how often and on what it is validated and tested, where its data lies;
- asked: any other difference (learning rate, data module, batch size, precision, ...) refuses the resume
  unless `--resume_changes allow`, which honours the new values (the optimizer's learning rate, momentum and
  weight decay are set after the checkpoint's are restored) and records them;
- fixed: what a resume cannot change at all (the architecture and quantization the weights belong to, the
  seed whose random state the checkpoint continues): always refused.

`config.yaml` is rewritten on every resume to describe the config being run; `resume-changes.yaml` keeps what
it said before, so the folder never describes a run other than the one its checkpoints hold.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from quantizers import CHECKPOINT_KEY, QuantSpec
from user_errors import UserError

CHANGES_FILE = "resume-changes.yaml"

# Keys that never change what a run trains or tests: where its files and rows go, how it is shown and logged, how
# many processes load data or make the corrupted splits and where they are cached, where it runs, and one command's
# own options. A study cell's identity leaves out exactly these (study/identity.py).
BOOKKEEPING = (
    "config", "ckpt_path", "weights_only", "resume_changes", "results", "results.*",
    "trainer.default_root_dir", "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "trainer.profiler", "trainer.enable_checkpointing", "trainer.num_sanity_val_steps",
    "trainer.accelerator",
    "data.init_args.num_workers", "data.init_args.download",
    "data.init_args.corrupted_test.cache_dir", "data.init_args.corrupted_test.workers",
    "data.init_args.corrupted_test.verify_md5",
    "quantization.log_every_n_epochs",
)
# A resume also ignores what only changes how the run is tested or how fast it computes (a study cell does not:
# it is tested as its config says).
IGNORED = (
    *BOOKKEEPING, "test_after_fit",
    "trainer.limit_test_batches", "trainer.limit_predict_batches", "trainer.detect_anomaly",
    "trainer.benchmark", "trainer.deterministic", "trainer.inference_mode", "trainer.enable_autolog_hparams",
    "trainer.model_registry", "trainer.plugins", "trainer.barebones", "trainer.fast_dev_run",
    "data.init_args.eval_batch_size", "data.init_args.device_resident",
    "data.init_args.corrupted_test.release_root", "model.init_args.num_classes",
)
RECORDED = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.min_epochs", "trainer.min_steps",
    "trainer.limit_val_batches", "trainer.val_check_interval", "trainer.check_val_every_n_epoch", "trainer.callbacks",
    "data.init_args.root", "data.init_args.dataset_name", "data.init_args.test_subset", "data.init_args.val_subset",
    "data.init_args.test_sets", "data.init_args.corrupted_test.*", "flatness", "flatness.*",
    "model.init_args.compile", "model.init_args.channels_last",
    "model.init_args.conf_threshold", "model.init_args.iou_threshold", "model.init_args.max_det",
)
# key pattern -> why a resume cannot honour a new value
FIXED = {
    "model.class_path": "the checkpoint's weights belong to its model",
    "model.init_args.model": "the checkpoint's weights belong to its model",
    "model.init_args.ema": "the checkpoint's weights belong to its model",
    "model.init_args.optimizer": "the optimizer state restored is the checkpoint's",
    "model.init_args.pretrained": "the weights come from the checkpoint",
    "optimizer": "the optimizer state restored is the checkpoint's",
    "optimizer.*": "the optimizer state restored is the checkpoint's",
    "lr_scheduler": "the scheduler state restored is the checkpoint's",
    "lr_scheduler.*": "the scheduler state restored is the checkpoint's",
    "quantization.*": "the checkpoint's weights and quantizers are {spec}",
    "seed_everything": "the checkpoint's random state continues, whatever the seed",
}
SHOWN = 4  # differences named in a refusal before "and N more"
UNSET = object()


class ResumeRefused(UserError):
    """A resume whose config differs from its checkpoint's run, or a fit into a folder that holds a run."""


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any
    kind: str  # "recorded", "asked" or "fixed"

    def describe(self) -> str:
        return f"{self.key} (checkpoint {_show(self.before)}, now {_show(self.after)})"


def _show(value: Any) -> str:
    if value is UNSET:
        return "unset"
    text = json.dumps(value, default=str) if value is None or isinstance(value, list | dict | bool) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(key: str) -> str | None:
    def matches(patterns) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    if matches(IGNORED):
        return None
    if matches(FIXED):
        return "fixed"
    return "recorded" if matches(RECORDED) else "asked"


def _plain(value: Any) -> Any:
    """Tuples as lists, mappings as dicts, paths as strings: how a YAML config holds them."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


LEAF_MAPS = ("layer_bits",)  # options whose value is a mapping of the user's (compared whole)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in LEAF_MAPS:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def previous_config(run_config: dict[str, Any] | None, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """The resolved config of the run a checkpoint belongs to, flattened: its `config.yaml`, with the model's
    hyperparameters and the quantization spec taken from the checkpoint itself (they are what its weights are)."""
    config = dict(run_config or {})
    if checkpoint is not None:
        hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k != "_instantiator"}
        if hparams:
            class_path = hparams.pop("_class_path", None)
            model = dict(config.get("model") or {})
            if class_path is not None:
                model["class_path"] = class_path
            model["init_args"] = hparams
            config["model"] = model
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is not None:
            spec = QuantSpec.from_dict(stored)
            quantization = dict(config.get("quantization") or {})
            quantization.update(spec.to_dict() if spec.quantized else {"method": spec.method})
            config["quantization"] = quantization
    return flatten(_plain(config))


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[Change]:
    """The differences that matter, in config order; a changed class hides the differences of its arguments."""
    # a changed class (or quantization method) hides the differences of its arguments (or other fields)
    hidden = [f"{section}.init_args." for section in ("model", "data")
              if f"{section}.class_path" in before and before[f"{section}.class_path"] != after.get(
                  f"{section}.class_path")]
    method = before.get("quantization.method")
    if method is not None and (method != after.get("quantization.method") or not _quantized(method)):
        hidden.append("quantization.")  # a float model's other spec fields say nothing either
    # Keys only one side has: the checkpoint's model and spec count whole; config.yaml keys count only where both
    # have them (one from an older qreg has fewer; without a config.yaml beside the checkpoint there is none).
    carried = ("model.", "quantization.")
    keys = [k for k in after if k in before or k.startswith(carried)]
    keys += [k for k in before if k not in after and k.startswith(carried)]
    changes = []
    for key in keys:
        kind = _kind(key)
        if kind is None or (key.startswith(tuple(hidden)) and key != "quantization.method"):
            continue
        old, new = before.get(key, UNSET), after.get(key, UNSET)
        if not _same(old, new):
            changes.append(Change(key, old, new, kind))
    return changes


def _quantized(method: str) -> bool:
    try:
        return QuantSpec(method=method).quantized
    except Exception:  # noqa: BLE001 (an unknown method is refused elsewhere)
        return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # 1 == 1.0, but true is not 1


def _listed(changes: list[Change]) -> str:
    named = "; ".join(c.describe() for c in changes[:SHOWN])
    return named + (f"; and {len(changes) - SHOWN} more" if len(changes) > SHOWN else "")


def check(changes: list[Change], allow: bool, ckpt_path: str, spec: str, record: Path) -> list[Change]:
    """Refuse a resume that changes the run (one line naming the keys); return the changes it goes on with."""
    fixed = [c for c in changes if c.kind == "fixed"]
    asked = [c for c in changes if c.kind == "asked"]
    if fixed:
        reasons = sorted({next(r for p, r in FIXED.items() if fnmatch.fnmatchcase(c.key, p)) for c in fixed})
        others = f" (it also changes {_listed(asked)})" if asked else ""
        raise ResumeRefused(
            f"resuming {ckpt_path} with {_listed(fixed)}: a resume cannot change this, "
            f"{'; '.join(reasons).format(spec=spec)}{others}; resume with the checkpoint's values, or train a new "
            "run in a new folder")
    if asked and not allow:
        raise ResumeRefused(
            f"resuming {ckpt_path} with a config that changes the run: {_listed(asked)}; resume with the "
            f"checkpoint's values, or add --resume_changes allow to continue with the new ones (recorded in {record})")
    return changes


def say(line: str) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"qreg: resume: {line}", file=sys.stderr, flush=True)


class ResumeChanges(L.Callback):
    """Records a resume's accepted changes in the run folder and makes the restored optimizer follow them."""

    def __init__(self, changes: list[Change], record: Path, ckpt_path: str, epoch: int | None, step: int | None,
                 allowed: bool) -> None:
        self.changes, self.record, self.ckpt_path = changes, record, ckpt_path
        self.epoch, self.step, self.allowed = epoch, step, allowed
        self._written = False

    def setup(self, trainer, pl_module, stage) -> None:
        if getattr(stage, "value", stage) != "fit" or self._written or not self.changes:
            return
        self._written = True
        if trainer.is_global_zero:
            append_record(self.record, {
                "resumed": time.strftime("%Y-%m-%d %H:%M:%S"),
                "checkpoint": str(Path(self.ckpt_path).absolute()),
                "epoch": self.epoch, "global_step": self.step,
                "accepted_by": "--resume_changes allow" if self.allowed else "allowed without asking",
                "changes": {c.key: {"checkpoint": None if c.before is UNSET else c.before,
                                    "now": None if c.after is UNSET else c.after} for c in self.changes},
            })

    def on_train_start(self, trainer, pl_module) -> None:
        model_keys = {c.key.rsplit(".", 1)[-1] for c in self.changes if c.key.startswith("model.init_args.")}
        extended = any(c.key == "trainer.max_epochs" for c in self.changes)
        if not model_keys and not extended:
            return
        from lightning.pytorch.core.optimizer import _configure_optimizers

        fresh, schedulers, _ = _configure_optimizers(pl_module.configure_optimizers())
        schedulers = [s["scheduler"] if isinstance(s, dict) else s for s in schedulers]
        if model_keys:
            _follow(trainer, fresh, schedulers, model_keys)
            groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
            values = {k: sorted({g[k] for g in groups if k in g and not isinstance(g[k], tuple)})
                      for k in ("initial_lr", "lr", "momentum", "weight_decay")}
            shown = ", ".join(f"{'lr' if k == 'initial_lr' else 'current lr' if k == 'lr' else k} "
                              f"{'/'.join(f'{v:.4g}' for v in vs)}" for k, vs in values.items() if vs)
            say(f"optimizer restored from the checkpoint, then set to the new values: {shown}")
        if extended:
            _note_schedule(trainer, schedulers)


def _follow(trainer, fresh, schedulers, keys: set[str]) -> None:
    """Give the restored optimizer (momentum buffers kept) the hyperparameters of a freshly configured one, at
    the schedule's current point; a MultiStepLR gets new milestones or gamma when they changed."""
    from torch.optim.lr_scheduler import MultiStepLR

    for restored, new in zip(trainer.optimizers, fresh, strict=False):
        if len(restored.param_groups) != len(new.param_groups):
            say(f"not honoured: the optimizer has {len(new.param_groups)} parameter groups now, "
                f"{len(restored.param_groups)} in the checkpoint; it keeps the checkpoint's values")
            continue
        for group, fresh_group in zip(restored.param_groups, new.param_groups, strict=True):
            for key in ("momentum", "weight_decay", "betas", "dampening", "nesterov", "eps"):
                if key in fresh_group and key in group:
                    group[key] = fresh_group[key]
            base = fresh_group.get("initial_lr", fresh_group["lr"])
            if group.get("initial_lr"):  # a scheduler drives it: keep the decay it reached
                group["lr"] = base * group["lr"] / group["initial_lr"]
                group["initial_lr"] = base
            else:
                group["lr"] = base
    for config, new in zip(trainer.lr_scheduler_configs, schedulers, strict=False):
        scheduler = config.scheduler
        groups = scheduler.optimizer.param_groups
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
        if isinstance(scheduler, MultiStepLR) and isinstance(new, MultiStepLR) and keys & {"milestones", "gamma"}:
            if "milestones" in keys:
                scheduler.milestones = new.milestones
            if "gamma" in keys:
                scheduler.gamma = new.gamma
            passed = sum(n for m, n in scheduler.milestones.items() if m <= scheduler.last_epoch)
            for group in groups:
                group["lr"] = group["initial_lr"] * scheduler.gamma ** passed
        scheduler._last_lr = [g["lr"] for g in groups]


def _note_schedule(trainer, schedulers) -> None:
    from torch.optim.lr_scheduler import MultiStepLR

    for config, new in zip(trainer.lr_scheduler_configs, schedulers, strict=False):
        kept = config.scheduler
        if isinstance(kept, MultiStepLR) and isinstance(new, MultiStepLR) and kept.milestones != new.milestones:
            say(f"the learning-rate schedule continues the checkpoint's (milestones at epochs "
                f"{', '.join(map(str, sorted(kept.milestones)))}), not the one max_epochs {trainer.max_epochs} would "
                f"give ({', '.join(map(str, sorted(new.milestones)))})")


def append_record(path: Path, entry: dict[str, Any]) -> None:
    from records.store import write_atomically

    entries = []
    if path.is_file():
        entries = yaml.safe_load(path.read_text()) or []
    entries.append(_plain(entry))
    header = "# Every resume that continued this run with a config other than its checkpoint's (qreg fit --ckpt_path)\n"
    write_atomically(path, (header + yaml.safe_dump(entries, sort_keys=False)).encode())
