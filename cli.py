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

import hashlib
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

# Imported for their side effect too: LightningCLI resolves short class names (DigitsDataModule,
# ClassificationModule) among the subclasses already imported.
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from callbacks import QuantizationCallback, ResultsCallback
from callbacks.checkpoint import RunCheckpoint
from callbacks.flatness import FlatnessCallback
from datamodules.corruptions import CorruptionError
from datamodules.errors import DataError
from deploy.errors import ExportError
from lightning_modules.divergence import TrainingDiverged
from lightning_modules.models import UnknownModelError
from quantizers import QuantSpecError
from study.grid import StudyError
from study.store import ResultsStoreError

# Lightning's own use of deprecated jsonargparse calls is not the user's concern, nor is W&B's chatter
# (set WANDB_SILENT=false to see it); qreg prints where an offline run went.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("WANDB_SILENT", "true")
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

class ConfigFileError(ValueError):
    """A config file that is not valid YAML."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigFileError,
    QuantSpecError, DataError, CorruptionError, UnknownModelError, ResultsStoreError, StudyError, FileNotFoundError,
    ExportError,
)
RUNS_DIR = "runs"
EXIT_DIVERGED = 3  # the loss became NaN/inf: a result, not a crash (a study records it and goes on)
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


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
    # Under SLURM the folder is named after the job, which a requeue keeps: the requeued job finds its own
    # hpc checkpoint there and continues the same W&B run.
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return str(Path(RUNS_DIR) / f"{stem}-slurm{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', 0)}")
    if env.get("SLURM_JOB_ID"):
        return str(Path(RUNS_DIR) / f"{stem}-slurm{env['SLURM_JOB_ID']}")
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
            # A resumed fit (ckpt_path given) rewrites the config of the run it continues.
            self.overwrite = stage != "fit" or self.config.get("ckpt_path") is not None
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
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="last", verbose=False)

        def instantiate_trainer(self, **kwargs: Any):
            trainer_config = self._get(self.config_init, "trainer", default={})
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = self._wandb_logger(trainer_config["default_root_dir"])
            return super().instantiate_trainer(**kwargs)

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
            "log_every_n_steps": 10,
            "callbacks": [
                RichProgressBar(leave=True),
                RunCheckpoint(),
                LearningRateMonitor(logging_interval="epoch"),
            ],
        },
    )


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
    todo = cache.missing(splits)
    start = time.perf_counter()
    with progress_bar(disable=not todo) as progress:
        task = progress.add_task(f"corrupting {datamodule.name} ({len(clean)} images)", total=len(todo))
        cache.generate(todo, workers=config.workers, progress=lambda *_: progress.advance(task))
    seconds = time.perf_counter() - start
    rate = f", {len(todo) * len(clean) / seconds:,.0f} images/s" if todo else ""
    print(f"{len(todo)} of {len(splits)} splits written to {cache.directory} in {seconds:.1f} s{rate}; "
          f"use them with --data.init_args.corrupted_test.cache_dir {config.cache_dir}")


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
    path = save_corruption_grid(pixels, config.out, profile=config.profile, seed=config.seed)
    print(f"wrote {path}")


def study_command(args: list[str]) -> None:
    """Run a study's grid (FP32 + methods x bits x seeds), resumably, then write its report."""
    from jsonargparse import ActionConfigFile

    from study.grid import StudyConfig
    from study.report import write_report
    from study.runner import StudyRunner, print_outcomes
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
    config = parser.parse_args(args)
    files = config.get("config") or []
    study_file = Path(str(files[-1].absolute)) if files else None
    study = StudyConfig(**{k: config[k] for k in ("name", "base", "methods", "seeds", "args", "output_dir",
                                                    "corruption_workers")})
    study = _as_dataclasses(study)
    if config.executor == "slurm":
        if study_file is None:
            raise StudyError("--executor slurm needs the study as a file: --config configs/study/<name>.yaml")
        submit = write_slurm_scripts(study, study_file, config.slurm_options)
        print(f"wrote {submit.parent}/cells.sbatch ({len(study.cells())} array tasks) and report.sbatch; "
              f"submit with: bash {submit}")
        return
    runner = StudyRunner(study, study_file)
    outcomes = runner.run(only=config.cell)
    print_outcomes(outcomes)
    if config.cell is None and config.report:
        print(f"report: {write_report(runner.directory)}")
    failed = [o.cell.name for o in outcomes if o.status == "failed"]
    if failed:
        raise StudyRunFailed(f"cells failed: {', '.join(failed)} (rerun the study to retry them)")


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


TOOL_COMMANDS = {
    "corrupt": corrupt_command,
    "corruption-grid": corruption_grid_command,
    "study": study_command,
    "report": report_command,
    "theorem": theorem_command,
    "export": export_command,
}


def check_config_files(args: list[str]) -> None:
    """Read every `--config` file first, so a YAML syntax error names its file and line."""
    import yaml

    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--config" and Path(value).is_file():
            try:
                yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                problem = getattr(error, "problem", None) or "cannot be parsed"
                raise ConfigFileError(f"{value} is not valid YAML{where}: {problem}") from None


def _one_line(error: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(error).strip() or type(error).__name__)
    # jsonargparse explains a bad choice inside a long union report; keep only the part a user needs.
    choice = _LITERAL_ERROR.search(text)
    if choice:
        key, choices, value = choice.groups()
        return f"{key}: {value!r} is not a valid choice; choose one of: {choices.replace(chr(39), '')}"
    return text


def _find(error: BaseException | None, kinds) -> BaseException | None:
    """The first exception of `kinds` in the chain: jsonargparse and Lightning wrap the original one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return error
        error = error.__cause__ or error.__context__
    return None


def user_error(error: BaseException) -> BaseException | None:
    """The user's mistake behind an exception, if any."""
    from jsonargparse import ArgumentError

    return _find(error, (*USER_ERRORS, ArgumentError))


def main(argv: list[str] | None = None) -> int:
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
        diverged = _find(error, TrainingDiverged)
        if diverged is not None:
            print(f"qreg: diverged: {_one_line(diverged)}", file=sys.stderr)
            return EXIT_DIVERGED
        mistake = user_error(error)
        if mistake is None:
            raise
        print(f"qreg: error: {_one_line(mistake)}", file=sys.stderr)
        return 2
    except SIGTERMException:
        print("qreg: stopped by SIGTERM; the run's checkpoints/last.ckpt holds its progress: resume with "
              "--ckpt_path <run>/checkpoints/last.ckpt", file=sys.stderr)
        return EXIT_SIGTERM
    except SystemExit as done:  # --help and --print_config end this way
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
