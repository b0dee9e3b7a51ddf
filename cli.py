"""qreg's only entry point.

    python cli.py fit  --config configs/digits_resnet20_lsq4.yaml
    python cli.py test --config configs/digits_resnet20_lsq4.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt

fit / validate / test / predict go through LightningCLI. A user's mistake (bad config key, unknown method,
bits out of range, missing dataset) ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

# Imported for their side effect too: LightningCLI resolves short class names (DigitsDataModule,
# ClassificationModule) among the subclasses already imported.
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from callbacks import QuantizationCallback, ResultsCallback
from callbacks.checkpoint import RunCheckpoint
from datamodules.errors import DataError
from lightning_modules.models import UnknownModelError
from quantizers import QuantSpecError
from study.store import ResultsStoreError

# Lightning's own use of deprecated jsonargparse calls is not the user's concern, nor is W&B's chatter
# (set WANDB_SILENT=false to see it); qreg prints where an offline run went.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("WANDB_SILENT", "true")

USER_ERRORS: tuple[type[Exception], ...] = (
    QuantSpecError, DataError, UnknownModelError, ResultsStoreError, FileNotFoundError,
)
RUNS_DIR = "runs"


def wandb_is_online() -> bool:
    """True when W&B credentials exist (env var or `wandb login`); otherwise runs are logged offline."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _default_run_dir(config: Any, subcommand: str) -> str:
    """One directory per run: runs/<first config's stem>-<time>, or the checkpoint's run for evaluation."""
    ckpt_path = config.get("ckpt_path")
    if subcommand != "fit" and ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        return str(Path(ckpt_path).parent.parent)
    configs = config.get("config") or []
    stem = Path(str(configs[0])).stem if configs else "run"
    return str(Path(RUNS_DIR) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _build_parser_classes():
    # Deferred so that `python cli.py --help` style errors stay fast and lightning imports once.
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class RunConfigSaver(SaveConfigCallback):
        """Saves `config.yaml` for fit and `config-<stage>.yaml` for evaluations in the same run folder."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
            if stage != "fit":
                self.config_filename = f"config-{stage}.yaml"
            self.overwrite = stage != "fit" or trainer.ckpt_path is not None
            super().setup(trainer, pl_module, stage)

    class QregCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(QuantizationCallback, "quantization")
            parser.add_lightning_class_args(ResultsCallback, "results")
            parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
            parser.add_argument(
                "--test_after_fit", type=bool, default=True,
                help="after fit, evaluate the final weights on the test splits and append them to the results",
            )

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            if not config.trainer.get("default_root_dir"):
                config.trainer.default_root_dir = _default_run_dir(config, self.subcommand)
            if config.trainer.get("enable_progress_bar") is False:
                self.trainer_defaults["callbacks"] = [
                    c for c in self.trainer_defaults["callbacks"] if not isinstance(c, RichProgressBar)
                ]

        def after_fit(self) -> None:
            if self.config[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="last")

        def instantiate_trainer(self, **kwargs: Any):
            trainer_config = self._get(self.config_init, "trainer", default={})
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = self._wandb_logger(trainer_config["default_root_dir"])
            return super().instantiate_trainer(**kwargs)

        def _wandb_logger(self, run_dir: str):
            from lightning.pytorch.loggers import WandbLogger

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
            if "WANDB_MODE" not in os.environ:
                options["offline"] = not wandb_is_online()
            logger = WandbLogger(
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


def run_lightning(args: list[str] | None) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar

    QregCLI, RunConfigSaver = _build_parser_classes()
    QregCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        seed_everything_default=0,
        save_config_callback=RunConfigSaver,
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={
            "max_epochs": 200,
            "callbacks": [
                RichProgressBar(leave=True),
                RunCheckpoint(),
                LearningRateMonitor(logging_interval="epoch"),
            ],
        },
    )


_LITERAL_ERROR = re.compile(r'Parser key "([^"]+)": Expected a typing\.Literal\[(.+?)\]\. Got value: (\S+)')


def _one_line(error: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(error).strip() or type(error).__name__)
    # jsonargparse explains a bad choice inside a long union report; keep only the part a user needs.
    choice = _LITERAL_ERROR.search(text)
    if choice:
        key, choices, value = choice.groups()
        return f"{key}: {value!r} is not a valid choice; choose one of: {choices.replace(chr(39), '')}"
    return text


def user_error(error: BaseException) -> BaseException | None:
    """The user's mistake behind an exception, if any: jsonargparse and Lightning wrap the original one."""
    from jsonargparse import ArgumentError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, USER_ERRORS):
            return error
        if isinstance(error, ArgumentError):
            return error
        error = error.__cause__ or error.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    # A user's mistake is one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        run_lightning(argv)
    except Exception as error:
        mistake = user_error(error)
        if mistake is None:
            raise
        print(f"qreg: error: {_one_line(mistake)}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help and --print_config end this way
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
