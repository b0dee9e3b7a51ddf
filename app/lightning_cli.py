"""qreg's LightningCLI (fit / validate / test / predict), in LightningCLI's subclass mode.

Before anything is written it validates the checkpoint, decides the run folder (app/run_folder.py), refuses a
run that trains nothing or computes in an unsupported precision, and compares a resume with the run it continues
(callbacks/resume_changes.py). Every run gets the quantization, flatness and results callbacks, the W&B logger,
atomic checkpoints and `config.yaml` in its folder; `fit` ends by testing its final weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# Imported for their side effect too: LightningCLI resolves short class names (DigitsDataModule,
# ClassificationModule) among the subclasses already imported.
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from app import run_folder, signals
from app.checks import TrainerOptionError, check_precision, check_training_batches, check_training_length
from app.config_files import check_config_files
from app.errors import one_line
from app.requeue import requeued_checkpoint
from callbacks import QuantizationCallback, ResultsCallback
from callbacks import resume_changes as resume
from callbacks.checkpoint import RunCheckpoint
from callbacks.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    check_checkpoint_task,
    read_checkpoint,
    task_module_class,
)
from callbacks.flatness import FlatnessCallback
from callbacks.progress import SplitsProgressBar
from callbacks.wandb_logger import run_logger
from lightning_modules.task import check_optimizer_options
from quantizers import CHECKPOINT_KEY, QuantSpec

RESUME_KEYS = ("hyper_parameters", CHECKPOINT_KEY, "epoch", "global_step")  # what a resume is compared with


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
                          or run_folder.continued_in_place(Path(trainer.default_root_dir)) is not None)
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
        resumed = requeued_checkpoint(self.config[subcommand], subcommand) if subcommand else None
        if resumed is not None:  # a requeued SLURM job comes back without --ckpt_path
            self.config[subcommand].ckpt_path = resumed
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._resumed: dict[str, Any] | None = None
        if ckpt_path and ckpt_path not in run_folder.LIGHTNING_CKPT_NAMES:
            checkpoint = read_checkpoint(ckpt_path)
            self._resumed = {key: checkpoint.get(key) for key in RESUME_KEYS}
            # Lightning would switch to the checkpoint's model class, or fail on its tensors: name both tasks.
            configured = (self.config[subcommand].get("model") or {}).get("class_path")
            trained = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
            check_checkpoint_task(ckpt_path, task_module_class(trained), task_module_class(configured), subcommand)
        # Lightning replaces the model's arguments with the checkpoint's: keep those asked for, to compare.
        model = self.config[subcommand].get("model") if subcommand == "fit" and ckpt_path else None
        self._requested_model = model.clone() if model is not None else None
        try:
            super()._parse_ckpt_path()
        except (ArgumentError, SystemExit) as error:
            raise CheckpointError(f"checkpoint {ckpt_path} carries hyperparameters this version of qreg does "
                                  f"not accept: {one_line(error)}") from None
        unknown = (self.config[subcommand].get("model") or {}).get("dict_kwargs") if ckpt_path else None
        if unknown:
            raise CheckpointError(f"checkpoint {ckpt_path} carries hyperparameters this version of qreg does "
                                  f"not accept: {', '.join(sorted(unknown))}")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if not config.trainer.get("default_root_dir"):
            config.trainer.default_root_dir = run_folder.default_run_dir(config, self.subcommand)
        elif self.subcommand != "fit":
            run_folder.refuse_evaluation_in_cell(config.trainer.default_root_dir)
        run_folder.check_run_folder(config.trainer.default_root_dir)
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

        folder = Path(config.trainer.default_root_dir)
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            if getattr(rank_zero_only, "rank", 0) == 0:  # a DDP rank started after rank 0 wrote config.yaml
                run_folder.refuse_existing_run(folder)
            return None
        checkpoint = getattr(self, "_resumed", None)
        named = ckpt_path in run_folder.LIGHTNING_CKPT_NAMES  # Lightning finds it in this run folder
        run = folder if named else run_folder.checkpoint_run_folder(ckpt_path)
        if not named:
            run_folder.refuse_foreign_folder(folder, ckpt_path)
            run_folder.refuse_rewriting_history(folder, ckpt_path)
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
            raise TrainerOptionError(f"trainer: {one_line(error)}") from None
        if getattr(self, "_resume_changes", None) is not None:
            trainer.callbacks.append(self._resume_changes)
        signals.watch(trainer)  # a Ctrl-C or a preemption stops it at its next batch
        return trainer

    def before_fit(self) -> None:
        check_training_batches(self.datamodule, self.trainer)
        resumed = getattr(self, "_resumed", None)
        classes = (resumed or {}).get("hyper_parameters", {}) or {}
        classes, now = classes.get("num_classes"), getattr(self.model, "hparams", {}).get("num_classes")
        if classes is not None and now is not None and classes != now:  # data changed with --resume_changes
            raise resume.ResumeRefused(f"checkpoint {self.config[self.subcommand].ckpt_path}'s model has {classes} "
                                       f"classes, the data {now}: a resume cannot change this; train a new run")

    def _wandb_logger(self, run_dir: str):
        spec = self._get(self.config_init, "quantization").spec
        results = self._get(self.config_init, "results")
        model = self._get(self.config_init, "model")
        data = self._get(self.config_init, "data")
        seed = self._get(self.config_init, "seed_everything")
        group = results.study or f"{getattr(data, 'name', 'data')}-{model.hparams.get('model', 'model')}"
        return run_logger(run_dir, self.subcommand, group,
                          tags=[spec.method, spec.describe().replace(" ", "-"), f"seed{seed}"])


def cli_options() -> dict[str, Any]:
    """The LightningCLI arguments of fit / validate / test / predict: shared by `run` and `resolve_fit_config`,
    so that a study cell's resolved config is the one its fit runs with."""
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


def run(args: list[str] | None) -> None:
    QregCLI(args=args, save_config_callback=RunConfigSaver, **cli_options())


class _Parsed(Exception):  # noqa: N818 (a control-flow signal, not an error)
    pass


class _ParseOnly(QregCLI):
    def _parse_ckpt_path(self) -> None:  # LightningCLI's first step after parsing: stop there
        raise _Parsed(self)


def resolve_fit_config(args: list[str]) -> dict[str, Any]:
    """The config `cli.py fit ARGS` would run with, as its run folder's config.yaml holds it: the arguments
    parsed by qreg's LightningCLI and nothing instantiated (no data, no model, no checkpoint read; ~0.3 s). A
    study compares it with each cell's config.yaml (study/identity.py)."""
    import yaml

    check_config_files(args)
    try:
        with warnings.catch_warnings():  # LightningCLI's advice against parsing given args: exactly what is meant here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            _ParseOnly(args=["fit", *args], save_config_callback=None, **cli_options())
    except _Parsed as parsed:
        cli = parsed.args[0]
        return yaml.safe_load(cli._parser("fit").dump(cli.config["fit"], skip_none=False))
    raise AssertionError("LightningCLI did not parse its arguments first")  # pragma: no cover
