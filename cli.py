"""qreg's only entry point.

    python cli.py fit  --config configs/digits_resnet20_lsq4.yaml
    python cli.py test --config configs/digits_resnet20_lsq4.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt
    python cli.py corrupt --data configs/data/digits.yaml --cache_dir corrupted/
    python cli.py corruption-grid image.png --out grid.png

fit / validate / test / predict go through LightningCLI; the other commands are plain jsonargparse CLIs that
never build a Trainer. A user's mistake (bad config key, unknown method, bits out of range, missing dataset,
unknown corruption) ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

# Imported for their side effect too: LightningCLI resolves short class names (DigitsDataModule,
# ClassificationModule) among the subclasses already imported.
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from callbacks import QuantizationCallback, ResultsCallback
from callbacks.checkpoint import RunCheckpoint
from callbacks.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    check_checkpoint_task,
    read_checkpoint,
    task_module_class,
)
from callbacks.flatness import FlatnessCallback
from callbacks.resume_changes import ResumeRefused, continued_in_place, resumed_run_folder
from datamodules.corruptions import CorruptionError
from datamodules.errors import DataError
from deploy.errors import ExportError
from lightning_modules.divergence import TrainingDiverged
from lightning_modules.models import UnknownModelError
from quantizers import CHECKPOINT_KEY, QuantSpec, QuantSpecError
from records.exits import EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR
from records.store import ResultsStoreError
from records.wandb_mode import wandb_is_online
from study.grid import StudyError

# Lightning's own use of deprecated jsonargparse calls is not the user's concern, nor is W&B's chatter
# (set WANDB_SILENT=false to see it); qreg prints where an offline run went.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("WANDB_SILENT", "true")
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

class ConfigFileError(ValueError):
    """A config file that is not valid YAML, or repeats a key."""


class RunFolderError(ValueError):
    """A run folder that cannot be used: a file, not writable, or a study cell's folder for an evaluation."""


class NothingToTrain(ValueError):
    """A fit that would train nothing (no epoch, no batch) and still write results that look like a run."""


class OptionError(ValueError):
    """An option with a value its component rejects (a negative learning rate, ...)."""


class TrainerOptionError(ValueError):
    """Trainer options Lightning refuses (e.g. --trainer.accelerator gpu on a machine without one)."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigFileError, RunFolderError, NothingToTrain, OptionError, TrainerOptionError, CheckpointError,
    CheckpointWriteError, MisconfigurationException,
    QuantSpecError, DataError, CorruptionError, UnknownModelError, ResultsStoreError, StudyError,
    ExportError, ResumeRefused,
)
# Filesystem conditions the user fixes (free space, quota, a read-only mount) wherever they strike; any other
# OSError is the user's only when it names a file the user named (or one inside it), else it is a bug.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
RUNS_DIR = "runs"
INTERRUPTED_LINE = ("qreg: stopped by {signal}; a fit's checkpoints/last.ckpt holds its progress: resume with "
                    "--ckpt_path <run>/checkpoints/last.ckpt")


def _default_run_dir(config: Any, subcommand: str) -> str:
    """One directory per run: runs/<first config's stem>-<time>, or the checkpoint's run for evaluation.

    The evaluation of a study cell's checkpoint gets a folder of its own, `<study>/evaluations/<cell>-<ckpt>-
    <time>`: written into the cell's folder, its predictions.npz and results would replace the records the
    study's report reads.

    A resume (`fit --ckpt_path <run>/checkpoints/last.ckpt`) continues in the checkpoint's run folder: its
    config.yaml, metrics.jsonl, results and W&B run (whose id the folder gives) go on, as the interrupted-run
    message promises; `_check_resume` refuses an earlier checkpoint there (it would rewrite the later history)."""
    ckpt_path = config.get("ckpt_path")
    if subcommand == "fit" and ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES:
        run = resumed_run_folder(ckpt_path)
        if run is not None and is_study_cell(run):
            raise RunFolderError(
                f"checkpoint {ckpt_path} is study cell {run}'s: resume the study (cli.py study --config <study>) "
                "to continue the cell, or give --trainer.default_root_dir a new folder for a run of its own")
        if run is not None:
            return str(run)
    if subcommand != "fit" and ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        run = Path(ckpt_path).parent.parent
        if is_study_cell(run):
            name = f"{run.name}-{Path(ckpt_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            return _reserve(run.parent.parent / "evaluations" / name)
        return str(run)
    configs = config.get("config") or []
    stem = Path(str(configs[0])).stem if configs else "run"
    # Under SLURM the folder is named after the job, which a requeue keeps: the requeued job finds its own
    # hpc checkpoint there and continues the same W&B run.
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return str(Path(RUNS_DIR) / f"{stem}-slurm{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', 0)}")
    if env.get("SLURM_JOB_ID"):
        return str(Path(RUNS_DIR) / f"{stem}-slurm{env['SLURM_JOB_ID']}")
    return _reserve(Path(RUNS_DIR) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


_RESERVED: list[Path] = []  # run folders this process created for itself (removed again if left empty)


def _reserve(folder: Path) -> str:
    """Create a fresh run folder, adding -2, -3, ... when another run started in the same second took the
    name: two fits of one config started together never share (and overwrite) one folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = folder if attempt == 1 else folder.with_name(f"{folder.name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        _RESERVED.append(candidate)
        return str(candidate)
    raise RunFolderError(f"cannot find a free run folder name next to {folder}")


def _release_unused_run_folders() -> None:
    while _RESERVED:
        folder = _RESERVED.pop()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: a run that wrote anything keeps its folder


def is_study_cell(folder: Path) -> bool:
    """A study's cell folder (`<study>/cells/<cell>/`, holding the runner's lock file)."""
    return folder.parent.name == "cells" and (folder / ".cell.lock").exists()


def check_run_folder(folder: str | os.PathLike) -> None:
    """Refuse, before anything is written, a run folder that is a file, or that cannot be created or written
    (missing permission, read-only file system)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run folder {path} exists and is not a directory; set --trainer.default_root_dir")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"run folder {path} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only_fs(existing) else "is not writable"
        raise RunFolderError(f"run folder {path} cannot be written: {existing} {why}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # Lightning resolves these names itself
RESUME_KEYS = ("hyper_parameters", CHECKPOINT_KEY, "epoch", "global_step")  # what a resume is compared with
OPTIMIZER_OPTIONS = ("lr", "momentum", "weight_decay", "gamma", "lrf", "warmup_epochs")  # each must be >= 0


def check_training_length(trainer: Any) -> None:
    """Refuse a fit that would train nothing: its test rows would look like a trained run's (and a study
    would count the cell as finished)."""
    for option in ("max_epochs", "max_steps"):
        if trainer.get(option) == 0:
            raise NothingToTrain(f"--trainer.{option} 0 trains nothing; give at least 1 (or -1 for no limit)")
    limit = trainer.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and limit <= 0:
        raise NothingToTrain(f"--trainer.limit_train_batches {limit} trains nothing; give at least 1 batch")


def check_training_batches(datamodule: Any, trainer: Any) -> None:
    """Refuse a training set that gives no batch per epoch (smaller than one batch, with drop_last)."""
    from datamodules.base import ImageClassificationDataModule

    if datamodule is None or not hasattr(datamodule, "batch_size"):
        return
    datamodule.setup("fit")  # idempotent: Lightning's own call reuses the split
    train_set = getattr(datamodule, "train_set", None)
    if train_set is None:
        return
    images = len(train_set) // max(1, trainer.world_size)
    drop_last = isinstance(datamodule, ImageClassificationDataModule)  # its training batches are all full
    batches = images // datamodule.batch_size if drop_last else math.ceil(images / datamodule.batch_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, float) and limit <= 1.0:
        batches = int(batches * limit)
    if batches == 0:
        ranks = f" per process ({trainer.world_size} processes)" if trainer.world_size > 1 else ""
        raise NothingToTrain(
            f"{images} training images{ranks} make no full batch of data.init_args.batch_size "
            f"{datamodule.batch_size} (incomplete batches are dropped): no training step would run; "
            "lower the batch size or give more data")


def check_optimizer_options(model: Any) -> None:
    """Refuse a negative (or non-finite) learning rate, momentum, weight decay, ... before a Trainer is built:
    torch would refuse it only when fit has started and written its run folder."""
    init_args = (model or {}).get("init_args") or {}
    for option in OPTIMIZER_OPTIONS:
        value = init_args.get(option)
        if isinstance(value, int | float) and not isinstance(value, bool) and not (0 <= value < math.inf):
            raise OptionError(f"--model.init_args.{option} must be a finite number >= 0, got {value}")


# The precisions every method trains and tests in: float32, or mixed precision (autocast; the quantizers still
# compute in float32). A "-true" half or double precision casts the network but not the batches the DataModules
# normalise (float32) nor the quantizers' float32 arithmetic: it would fail on the first batch, after the run
# folder was made. Lightning's aliases: 32 -> 32-true, 16 -> 16-mixed, bf16 -> bf16-mixed.
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def check_precision(trainer: Any) -> None:
    """Refuse, before anything is written, a precision qreg does not compute in (64-true, 16-true, ...)."""
    precision = trainer.get("precision")
    if precision is not None and PRECISION_ALIASES.get(str(precision), str(precision)) not in SUPPORTED_PRECISIONS:
        raise OptionError(f"--trainer.precision {precision} is not supported; qreg computes in "
                          f"{', '.join(SUPPORTED_PRECISIONS[:-1])} or {SUPPORTED_PRECISIONS[-1]} (16-mixed on a GPU "
                          "only), every method alike")


class _CtrlC:
    """Ctrl-C during a fit or test stops it the way SIGTERM does: at the next batch boundary, where Lightning
    raises SIGTERMException and qreg saves a consistent `last.ckpt` (a KeyboardInterrupt could land inside an
    optimizer step). A second Ctrl-C, or one outside a running trainer, interrupts at once."""

    trainer = None
    received = False

    @classmethod
    def handle(cls, _number, _frame) -> None:
        from lightning.pytorch.trainer.states import TrainerStatus

        trainer = cls.trainer
        if cls.received or trainer is None or trainer.state.status != TrainerStatus.RUNNING:
            raise KeyboardInterrupt
        cls.received = True
        trainer._signal_connector.received_sigterm = True
        print("\nqreg: Ctrl-C: stopping after this batch and saving last.ckpt (press again to stop at once)",
              file=sys.stderr, flush=True)


def _build_parser_classes():
    # Deferred so that `python cli.py --help` style errors stay fast and lightning imports once.
    from jsonargparse import ArgumentError
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class RunConfigSaver(SaveConfigCallback):
        """Saves `config.yaml` for fit and `config-<stage>.yaml` for evaluations in the same run folder."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
            if stage != "fit":
                self.config_filename = f"config-{stage}.yaml"
            # A resumed fit (ckpt_path given) rewrites the config of the run it continues (the checks before made
            # sure it is that run's, its accepted changes recorded in resume-changes.yaml); so does a study
            # restarting its cell from scratch, or a SLURM requeue. A fit into any other run's folder was refused.
            self.overwrite = (stage != "fit" or self.config.get("ckpt_path") is not None
                              or continued_in_place(Path(trainer.default_root_dir)) is not None)
            if "resume_changes" in self.config:  # this command's consent, not the run's config: never inherited by
                self.config = self.config.clone()  # a later run of this config.yaml (nor read by export)
                del self.config["resume_changes"]
            super().setup(trainer, pl_module, stage)

    class QregCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(QuantizationCallback, "quantization")
            # flatness before results: it adds its measures to the rows results writes in one append
            parser.add_lightning_class_args(FlatnessCallback, "flatness")
            parser.add_lightning_class_args(ResultsCallback, "results")
            parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
            if "verbose" in parser.get_defaults():  # test/validate: qreg prints its own compact table
                parser.set_defaults(verbose=False)
            parser.add_argument(
                "--test_after_fit", type=bool, default=True,
                help="after fit, evaluate the final weights on the test splits and append them to the results",
            )
            parser.add_argument(
                "--resume_changes", type=Literal["refuse", "allow"], default="refuse",
                help="fit --ckpt_path with a config that changes the run (learning rate, data, ...): refuse, or "
                     "allow: continue with the new values, recorded in the run folder's resume-changes.yaml",
            )

        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyperparameters here, first of all: validate the file before.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            self._resumed: dict[str, Any] | None = None
            if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES:
                checkpoint = read_checkpoint(ckpt_path)
                self._resumed = {key: checkpoint.get(key) for key in RESUME_KEYS}
                # Lightning would switch to the checkpoint's model class, or fail on its tensors: name both tasks.
                configured = (self.config[subcommand].get("model") or {}).get("class_path")
                trained = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
                check_checkpoint_task(ckpt_path, task_module_class(trained), task_module_class(configured),
                                      subcommand)
            # Lightning replaces the model's arguments with the checkpoint's: keep those asked for, to compare.
            model = self.config[subcommand].get("model") if subcommand == "fit" and ckpt_path else None
            self._requested_model = model.clone() if model is not None else None
            try:
                super()._parse_ckpt_path()
            except (ArgumentError, SystemExit) as error:
                raise CheckpointError(f"checkpoint {ckpt_path} carries hyperparameters this version of qreg does "
                                      f"not accept: {_one_line(error)}") from None
            unknown = (self.config[subcommand].get("model") or {}).get("dict_kwargs") if ckpt_path else None
            if unknown:
                raise CheckpointError(f"checkpoint {ckpt_path} carries hyperparameters this version of qreg does "
                                      f"not accept: {', '.join(sorted(unknown))}")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            if not config.trainer.get("default_root_dir"):
                config.trainer.default_root_dir = _default_run_dir(config, self.subcommand)
            elif self.subcommand != "fit" and is_study_cell(Path(config.trainer.default_root_dir)):
                raise RunFolderError(
                    f"{config.trainer.default_root_dir} is a study cell's folder: an evaluation there would replace "
                    "the records the study's report reads; leave --trainer.default_root_dir unset (the evaluation "
                    "then gets <study>/evaluations/<cell>-<checkpoint>-<time>/) or choose another folder")
            check_run_folder(config.trainer.default_root_dir)
            if self.subcommand == "fit":
                check_training_length(config.trainer)
                if getattr(self, "_requested_model", None) is not None:
                    config.model = self._requested_model  # compared with the checkpoint's below
            check_optimizer_options(config.get("model"))
            check_precision(config.trainer)
            if self.subcommand == "fit":
                self._resume_changes = self._check_resume(config)
            if config.trainer.get("enable_progress_bar") is False:
                self.trainer_defaults["callbacks"] = [
                    c for c in self.trainer_defaults["callbacks"] if not isinstance(c, RichProgressBar)
                ]

        def _check_resume(self, config):
            """Before anything is written: a fit into a folder holding a run is refused, and a resume whose config
            changes the run is refused naming what differs, unless --resume_changes allow; returns the callback
            that records (and honours) the changes a resume goes on with, or None."""
            import yaml
            from lightning.pytorch.utilities.rank_zero import rank_zero_only

            from callbacks import resume_changes as resume

            folder = Path(config.trainer.default_root_dir)
            ckpt_path = config.get("ckpt_path")
            if not ckpt_path:
                if getattr(rank_zero_only, "rank", 0) == 0:  # a DDP rank started after rank 0 wrote config.yaml
                    resume.refuse_existing_run(folder)
                return None
            checkpoint = getattr(self, "_resumed", None)
            named = ckpt_path in LIGHTNING_CKPT_NAMES  # Lightning finds it in this run folder
            run = folder if named else resume.checkpoint_run_folder(ckpt_path)
            if not named:
                resume.refuse_foreign_folder(folder, ckpt_path)
                resume.refuse_rewriting_history(folder, ckpt_path)
            try:
                run_config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                run_config = None
            if not isinstance(run_config, dict):
                run_config = None
                resume.say(f"{run / 'config.yaml'} cannot be read: only the model's hyperparameters and the "
                           "quantization spec the checkpoint carries are compared with this config")
            before = resume.previous_config(run_config, checkpoint)
            dumped = self._parser(self.subcommand).dump(config, format="yaml", skip_unset=False, skip_validation=True)
            changes = resume.compare(before, resume.flatten(yaml.safe_load(dumped)))
            stored = (checkpoint or {}).get(CHECKPOINT_KEY)
            spec = QuantSpec.from_dict(stored).describe() if stored is not None else "the checkpoint's"
            record = folder / resume.CHANGES_FILE
            allowed = config.get("resume_changes") == "allow"
            resume.check(changes, allowed, ckpt_path, spec, record)
            if not changes:
                return None
            asked = any(c.kind == "asked" for c in changes)
            resume.say(f"continuing {ckpt_path} with {'; '.join(c.describe() for c in changes)}"
                       f"{' (accepted by --resume_changes allow)' if asked else ''}; recorded in {record}")
            checkpoint = checkpoint or {}
            return resume.ResumeChanges(changes, record, ckpt_path, checkpoint.get("epoch"),
                                        checkpoint.get("global_step"), allowed=asked)

        def after_fit(self) -> None:
            if self.config[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="last", verbose=False)

        def instantiate_trainer(self, **kwargs: Any):
            trainer_config = self._get(self.config_init, "trainer", default={})
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = self._wandb_logger(trainer_config["default_root_dir"])
            # Every checkpoint written atomically on the run folder's file system (Lightning's own write copies
            # it there from $TMPDIR when they differ), and validated when read.
            plugins = trainer_config.get("plugins") or []
            plugins = plugins if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except MisconfigurationException as error:
                raise TrainerOptionError(f"trainer: {_one_line(error)}") from None
            if getattr(self, "_resume_changes", None) is not None:
                trainer.callbacks.append(self._resume_changes)
            _CtrlC.trainer = trainer
            return trainer

        def before_fit(self) -> None:
            check_training_batches(self.datamodule, self.trainer)
            resumed = getattr(self, "_resumed", None)
            classes = (resumed or {}).get("hyper_parameters", {}) or {}
            classes, now = classes.get("num_classes"), getattr(self.model, "hparams", {}).get("num_classes")
            if classes is not None and now is not None and classes != now:  # data changed with --resume_changes
                raise ResumeRefused(f"checkpoint {self.config[self.subcommand].ckpt_path}'s model has {classes} "
                                    f"classes, the data {now}: a resume cannot change this; train a new run")

        def _wandb_logger(self, run_dir: str):
            from callbacks.wandb_logger import ResilientWandbLogger

            spec = self._get(self.config_init, "quantization").spec
            results = self._get(self.config_init, "results")
            model = self._get(self.config_init, "model")
            data = self._get(self.config_init, "data")
            seed = self._get(self.config_init, "seed_everything")
            run_name = Path(run_dir).resolve().name
            # A stable id per (run folder, subcommand): a requeued job resumes its W&B run instead of
            # starting a new one; the evaluation of a run is a run of its own (job_type eval).
            run_id = hashlib.sha1(f"{Path(run_dir).resolve()}:{self.subcommand}".encode()).hexdigest()[:16]
            options: dict[str, Any] = {}
            if not os.environ.get("WANDB_MODE"):
                os.environ.pop("WANDB_MODE", None)  # an empty value would make wandb refuse to start
                options["offline"] = not wandb_is_online()
            logger = ResilientWandbLogger(
                project=os.environ.get("WANDB_PROJECT", "qreg"),
                name=run_name if self.subcommand == "fit" else f"{run_name}-{self.subcommand}",
                id=run_id,
                resume="allow",
                save_dir=run_dir,
                group=results.study or f"{getattr(data, 'name', 'data')}-{model.hparams.get('model', 'model')}",
                job_type="train" if self.subcommand == "fit" else "eval",
                tags=[spec.method, spec.describe().replace(" ", "-"), f"seed{seed}"],
                **options,
            )
            # Lightning always passes wandb's deprecated `anonymous` setting, which makes wandb print a warning.
            logger._wandb_init.pop("anonymous", None)
            return logger

    return QregCLI, RunConfigSaver


def _lightning_cli_options() -> dict[str, Any]:
    """The LightningCLI arguments of fit / validate / test / predict: shared by `run_lightning` and
    `resolve_fit_config`, so that a study cell's resolved config is the one its fit runs with."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from callbacks.progress import SplitsProgressBar

    return dict(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={
            "max_epochs": 200,
            "log_every_n_steps": 10,
            "callbacks": [
                SplitsProgressBar(leave=True),
                RunCheckpoint(),
                LearningRateMonitor(logging_interval="epoch"),
            ],
        },
    )


def run_lightning(args: list[str] | None) -> None:
    QregCLI, RunConfigSaver = _build_parser_classes()
    QregCLI(args=args, save_config_callback=RunConfigSaver, **_lightning_cli_options())


def resolve_fit_config(args: list[str]) -> dict[str, Any]:
    """The config `cli.py fit ARGS` would run with, as its run folder's config.yaml holds it: the arguments
    parsed by qreg's LightningCLI and nothing instantiated (no data, no model, no checkpoint read; ~0.3 s). A
    study compares it with each cell's config.yaml (study/identity.py)."""
    import yaml

    check_config_files(args)
    QregCLI, _ = _build_parser_classes()

    class Parsed(Exception):  # noqa: N818 (a control-flow signal, not an error)
        pass

    class ParseOnly(QregCLI):
        def _parse_ckpt_path(self) -> None:  # LightningCLI's first step after parsing: stop there
            raise Parsed(self)

    try:
        ParseOnly(args=["fit", *args], save_config_callback=None, **_lightning_cli_options())
    except Parsed as parsed:
        cli = parsed.args[0]
        return yaml.safe_load(cli._parser("fit").dump(cli.config["fit"], skip_none=False))
    raise AssertionError("LightningCLI did not parse its arguments first")  # pragma: no cover


_TYPE_ERROR = re.compile(r'^Parser key "(\w+)": Does not validate .*?Problem with given class_path [^:]+: '
                         r'Parser key "([^"]+)": Expected a <class \'(\w+)\'>\. Got value: (\S+)')
_LITERAL_ERROR = re.compile(r'Parser key "([^"]+)": Expected a typing\.Literal\[(.+?)\]\. Got value: (\S+)')


def _tool_parser(command: str, description: str):
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=f"cli.py {command}", description=description, exit_on_error=False)


def corrupt_command(args: list[str]) -> None:
    """Pre-generate a DataModule's corrupted test splits into a cache folder, with a progress bar."""
    from datamodules.base import ImageClassificationDataModule, progress_bar
    from datamodules.corruptions.splits import CorruptionCache

    parser = _tool_parser("corrupt", corrupt_command.__doc__)
    parser.add_subclass_arguments(ImageClassificationDataModule, "data", required=True,
                                  help="the DataModule (its corrupted_test section picks the splits)")
    parser.add_argument("--cache_dir", required=True, help="where the .npy splits and their manifest go")
    parser.add_argument("--workers", type=int, default=2, help="processes generating splits in parallel")
    config = parser.parse_args(args)
    datamodule = parser.instantiate_classes(config).data
    datamodule.setup("fit")
    clean = datamodule.test_sets["clean"]
    settings = datamodule.corrupted_test
    cache = CorruptionCache(config.cache_dir, clean.images, settings.profile, settings.seed)
    splits = settings.splits()
    cache.discard_damaged(splits)  # a damaged or foreign file is regenerated, never kept
    todo = cache.missing(splits)
    start = time.perf_counter()
    with progress_bar(disable=not todo) as progress:
        task = progress.add_task(f"corrupting {datamodule.name} ({len(clean)} images)", total=len(todo))
        cache.generate(todo, workers=config.workers, progress=lambda *_: progress.advance(task))
    seconds = time.perf_counter() - start
    rate = f", {len(todo) * len(clean) / seconds:,.0f} images/s" if todo else ""
    print(f"{len(todo)} of {len(splits)} splits written to {cache.directory} in {seconds:.1f} s{rate}; "
          f"use them with --data.init_args.corrupted_test.cache_dir {config.cache_dir}")


MIN_GRID_IMAGE = 16


def corruption_grid_command(args: list[str]) -> None:
    """Render one image under all 19 corruptions x 5 severities as a labelled PNG grid."""
    import numpy as np
    from PIL import Image

    from datamodules.corruptions import save_corruption_grid

    parser = _tool_parser("corruption-grid", corruption_grid_command.__doc__)
    parser.add_argument("image", help="an image file (any size; RGB)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--profile", default="cifar", choices=["cifar", "imagenet"])
    parser.add_argument("--seed", type=int, default=0)
    config = parser.parse_args(args)
    try:
        with Image.open(config.image) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise DataError(f"cannot read image {config.image}: {error}") from None
    height, width = pixels.shape[:2]
    if min(height, width) < MIN_GRID_IMAGE:
        # the imagenet profile's glass blur needs room for its displacements; below this it has no pixels left
        raise DataError(f"{config.image} is {width}x{height} pixels; corruption-grid needs at least "
                        f"{MIN_GRID_IMAGE}x{MIN_GRID_IMAGE}")
    path = save_corruption_grid(pixels, config.out, profile=config.profile, seed=config.seed)
    print(f"wrote {path}")


def study_command(args: list[str]) -> None:
    """Run a study's grid (FP32 + methods x bits x seeds), resumably, then write its report."""
    from jsonargparse import ActionConfigFile

    from study.grid import StudyConfig
    from study.report import write_report
    from study.runner import StudyRunner, interruption, print_outcomes
    from study.slurm import write_slurm_scripts

    parser = _tool_parser("study", study_command.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="the study file, e.g. configs/study/demo.yaml")
    parser.add_class_arguments(StudyConfig, as_positional=False)
    parser.add_argument("--executor", default="local", choices=["local", "slurm"],
                        help="local: run the cells here, one after another; slurm: write a job-array script")
    parser.add_argument("--cell", type=int | None, default=None, help="run only this cell (0-based; job arrays)")
    parser.add_argument("--slurm_options", type=list[str], default=[],
                        help='#SBATCH lines for every job, e.g. ["--gres=gpu:1", "--time=12:00:00"]')
    parser.add_argument("--report", type=bool, default=True, help="write the report when the study ends")
    parser.add_argument("--force", type=bool, default=False,
                        help="retrain the cells whose config changed since they ran (their old folders and rows are "
                             "moved to <study>/superseded/); without it such a study is refused")
    config = parser.parse_args(args)
    files = config.get("config") or []
    study_file = Path(str(files[-1].absolute)) if files else None
    study = StudyConfig(**{k: config[k] for k in ("name", "base", "methods", "seeds", "args", "output_dir",
                                                    "corruption_workers")})
    study = _as_dataclasses(study)
    if config.executor == "slurm":
        if study_file is None:
            raise StudyError("--executor slurm needs the study as a file: --config configs/study/<name>.yaml")
        StudyRunner(study, study_file, resolve_fit_config).check(study.cells(), config.force)  # before writing
        submit = write_slurm_scripts(study, study_file, config.slurm_options, force=config.force)
        print(f"wrote {submit.parent}/cells.sbatch ({len(study.cells())} array tasks) and report.sbatch; "
              f"submit with: bash {submit}")
        return
    runner = StudyRunner(study, study_file, resolve_fit_config)
    outcomes = runner.run(only=config.cell, force=config.force)
    print_outcomes(outcomes)
    stopped = interruption(outcomes, runner.stopped_by)
    if stopped is not None:
        status, what = stopped
        again = shlex.join([sys.executable, str(Path(__file__).resolve()), "study", *args])
        raise StudyInterrupted(status, f"study stopped: {what}; no further cell was started. Resume with: {again}")
    failed = [o for o in outcomes if o.status == "failed"]
    reportable = any(o.status in ("finished", "collapsed", "skipped", "diverged") for o in outcomes)
    if config.cell is None and config.report and (reportable or not failed):
        print(f"report: {write_report(runner.directory)}")
    if failed:
        listed = "; ".join(f"{o.cell.name} ({o.detail}; log {runner.cell_log(o.cell)})" for o in failed)
        raise StudyRunFailed(f"{len(failed)} {'cell' if len(failed) == 1 else 'cells'} failed: {listed}; rerun the "
                             "study to retry them")


def _as_dataclasses(study):
    """jsonargparse hands nested dataclasses back as Namespaces when read from a file; normalise them."""
    from study.grid import MethodEntry

    entries = [e if isinstance(e, MethodEntry) else MethodEntry(**dict(vars(e) if hasattr(e, "__dict__") else e))
               for e in study.methods]
    study.methods = entries
    return study


def report_command(args: list[str]) -> None:
    """Write the report of a study folder: figures, tables and report.md from its results store."""
    from study.report import write_report

    parser = _tool_parser("report", report_command.__doc__)
    parser.add_argument("study_dir", help="the study folder (holding results.jsonl)")
    parser.add_argument("--wandb", type=bool, default=True, help="also log the report to W&B")
    config = parser.parse_args(args)
    print(f"wrote {write_report(config.study_dir, log_to_wandb=config.wandb)}")


def theorem_command(args: list[str]) -> None:
    """Check Theorem 3.1 on trained FP32 runs: measured E[L(w + delta)] - L(w) against its predictions.

    For each bits level, every layer's weights get Gaussian noise of the variance of b-bit quantization noise;
    the Monte-Carlo loss increase is printed next to Eq. 4's gradient-norm term and the second-order
    0.5 * sum_l sigma_l^2 tr(H_l), and all three are appended to the run's (or its study's) results store.
    """
    from study.theorem import check_runs

    parser = _tool_parser("theorem", theorem_command.__doc__)
    parser.add_argument("path", help="a run folder (config.yaml + checkpoints/last.ckpt) or a study folder")
    parser.add_argument("--bits", type=list[int], default=[2, 4, 8])
    parser.add_argument("--images", type=int, default=256, help="training images the losses are measured on")
    parser.add_argument("--samples", type=int, default=64, help="Monte-Carlo noise draws per bits level")
    parser.add_argument("--hessian_samples", type=int, default=16, help="Hutchinson vectors")
    config = parser.parse_args(args)
    check_runs(Path(config.path), config.bits, config.images, config.samples, config.hessian_samples)


def export_command(args: list[str]) -> None:
    """Export a trained checkpoint to ONNX (QDQ) or packed integer weights, checked in ONNX Runtime."""
    from deploy.command import main as export_main

    export_main(args, _tool_parser("export", export_command.__doc__))


class StudyRunFailed(RuntimeError):
    """Some cells crashed; the study is resumable, so this ends with exit status 1, not a traceback."""


class StudyInterrupted(RuntimeError):
    """A signal stopped the study (after its running cell saved): ends with the cell's status, 143 / 130."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


TOOL_COMMANDS = {
    "corrupt": corrupt_command,
    "corruption-grid": corruption_grid_command,
    "study": study_command,
    "report": report_command,
    "theorem": theorem_command,
    "export": export_command,
}


def check_config_files(args: list[str]) -> None:
    """Read every config file first (`--config` and any `--<key> file.yaml`, and the files they compose), so a
    YAML syntax error names its file and line, and a key written twice (YAML keeps the last one silently) is
    refused naming the key, its lines and the file."""
    pairs = [*zip(args, args[1:], strict=False),  # `--config file` and `--config=file`
             *(arg.split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)]
    files = [value for flag, value in pairs
             if flag.startswith("--") and (flag == "--config" or value.endswith((".yaml", ".yml")))]
    seen: set[Path] = set()
    while files:
        path = Path(files.pop())
        if not path.is_file() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        document = _read_yaml_strictly(path)
        # LightningCLI composes sections given as file names relative to the including file.
        if isinstance(document, dict):
            for value in document.values():
                if isinstance(value, str) and value.endswith((".yaml", ".yml")):
                    files.append(str(path.parent / value))


def _read_yaml_strictly(path: Path) -> Any:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigFileError(f"{path} sets {key!r} twice (lines {lines[key]} and {line}); YAML would "
                                          "silently keep the last one: merge them into one")
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as error:  # e.g. Latin-1 from an old editor: YAML files are UTF-8
        byte = error.object[error.start]
        raise ConfigFileError(f"config file {path} is not UTF-8 text (byte {error.start} is 0x{byte:02x}); "
                              "save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise ConfigFileError(f"{path} is not valid YAML{where}: {problem}") from None
    except OSError as error:
        raise ConfigFileError(f"config file {path} cannot be read: {error.strerror}") from None


def _one_line(error: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(error).strip() or type(error).__name__)
    # jsonargparse explains a bad choice inside a long union report; keep only the part a user needs.
    choice = _LITERAL_ERROR.search(text)
    if choice:
        key, choices, value = choice.groups()
        return f"{key}: {value!r} is not a valid choice; choose one of: {choices.replace(chr(39), '')}"
    typed = _TYPE_ERROR.search(text)
    if typed:
        outer, key, kind, value = typed.groups()
        return f"{outer}.init_args.{key}: expected a {kind}, got {value}"
    return text


# Exceptions that only a bug raises: met in a chain before any user error, the whole chain is a bug (a bug
# raised while handling a user's missing file must keep its traceback, not be reported as that file).
PROGRAMMING_ERRORS = (AttributeError, NameError, AssertionError, ZeroDivisionError, IndexError)


def _find(error: BaseException | None, kinds) -> BaseException | None:
    """The first exception of `kinds` in the chain (jsonargparse and Lightning wrap the original one), walked
    as Python prints it: the explicit cause, else the implicit context unless it was suppressed."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return error
        if isinstance(error, PROGRAMMING_ERRORS):
            return None
        error = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else error.__context__
    return None


def user_error(error: BaseException, args: list[str] = ()) -> BaseException | None:
    """The user's mistake behind an exception, if any: one of the user-error classes, a full disk or read-only
    mount, or a filesystem error about a path the user gave on the command line (or a file inside it)."""
    from jsonargparse import ArgumentError

    mistake = _find(error, (*USER_ERRORS, ArgumentError))
    if mistake is not None:
        return mistake
    oserror = _find(error, OSError)
    if oserror is None:
        return None
    if oserror.errno in ENVIRONMENT_ERRNOS or _names_user_path(oserror, args):
        return UserFileError(_describe_oserror(oserror))
    return None


class UserFileError(OSError):
    """A filesystem error about a file the user named: reported in one line."""


def _names_user_path(error: OSError, args: list[str]) -> bool:
    named = [Path(value).absolute() for value in args if value and not value.startswith("-") and os.sep in value]
    if error.errno in (errno.EACCES, errno.EPERM):  # the runs folder is the user's to make writable; a file
        named += [Path(RUNS_DIR).absolute()]        # missing from it is qreg's own doing, a bug
    for filename in (error.filename, error.filename2):
        if filename is None:
            continue
        path = Path(os.fsdecode(filename)).absolute()
        if any(path == p or p in path.parents for p in named):
            return True
    return False


def _describe_oserror(error: OSError) -> str:
    reason = error.strerror or str(error)
    files = " -> ".join(os.fsdecode(f) for f in (error.filename, error.filename2) if f is not None)
    return f"{files}: {reason}" if files else reason


def main(argv: list[str] | None = None) -> int:
    _CtrlC.trainer, _CtrlC.received = None, False
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _CtrlC.handle) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        _CtrlC.trainer = None
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> int:
    # A user's mistake is one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        check_config_files(args)
        if args and args[0] in TOOL_COMMANDS:
            TOOL_COMMANDS[args[0]](args[1:])
        else:
            run_lightning(argv)
    except Exception as error:
        if isinstance(error, StudyRunFailed):
            print(f"qreg: {error}", file=sys.stderr)
            return 1
        if isinstance(error, StudyInterrupted):
            print(f"qreg: {error}", file=sys.stderr)
            return error.status
        diverged = _find(error, TrainingDiverged)
        if diverged is not None:
            print(f"qreg: diverged: {_one_line(diverged)}", file=sys.stderr)
            return EXIT_DIVERGED
        mistake = user_error(error, args)
        if mistake is None:
            raise
        print(f"qreg: error: {_one_line(mistake)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SIGTERMException:
        if _CtrlC.received:
            print(INTERRUPTED_LINE.format(signal="Ctrl-C (SIGINT)"), file=sys.stderr)
            return EXIT_SIGINT
        print(INTERRUPTED_LINE.format(signal="SIGTERM"), file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE.format(signal="Ctrl-C (SIGINT)"), file=sys.stderr)
        return EXIT_SIGINT
    except SystemExit as done:  # --help and --print_config end this way
        if _find(done, KeyboardInterrupt) is not None:
            # Lightning turns Ctrl-C into sys.exit(1) after its callbacks' on_exception (qreg's saves last.ckpt)
            print(INTERRUPTED_LINE.format(signal="Ctrl-C (SIGINT)"), file=sys.stderr)
            return EXIT_SIGINT
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        _release_unused_run_folders()  # however the run ended: a folder it reserved and never wrote to goes
    return 0


if __name__ == "__main__":
    sys.exit(main())
