"""qreg's only entry point.

    python cli.py fit  --config configs/digits_resnet20_lsq4.yaml
    python cli.py test --config configs/digits_resnet20_lsq4.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt
    python cli.py study --config configs/study/demo.yaml
    python cli.py report runs/study-demo
    python cli.py export --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt --format onnx --out m.onnx
    python cli.py corrupt --data configs/data/digits.yaml --cache_dir corrupted/
    python cli.py corruption-grid image.png --out grid.png
    python cli.py theorem runs/study-demo

fit / validate / test / predict go through qreg's LightningCLI (app/lightning_cli.py); the other commands are
plain jsonargparse CLIs that never build a Trainer, each living with its package (study/command.py,
deploy/command.py, datamodules/corruptions/command.py). How a command ends is app/errors.py's: a user's mistake
in one line on stderr and exit status 2, a diverged run 3, a signal 143 / 130, a bug with its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Lightning's own use of deprecated jsonargparse calls is not the user's concern, nor is W&B's chatter
# (set WANDB_SILENT=false to see it); qreg prints where an offline run went.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("WANDB_SILENT", "true")
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _tool(command: str, function, *extra):
    """A tool command: its package's function, given a parser named after the command (exit_on_error off, so
    that a bad option is a user error like any other)."""
    from jsonargparse import ArgumentParser

    def run(args: list[str]) -> None:
        parser = ArgumentParser(prog=f"cli.py {command}", description=function.__doc__, exit_on_error=False)
        function(args, parser, *extra)

    return run


def _study(args: list[str]) -> None:
    from app.errors import CommandFailed
    from app.lightning_cli import resolve_fit_config
    from study import command

    _tool("study", command.study, resolve_fit_config, CommandFailed)(args)


def _report(args: list[str]) -> None:
    from study import command

    _tool("report", command.report)(args)


def _theorem(args: list[str]) -> None:
    from study import command

    _tool("theorem", command.theorem)(args)


def _export(args: list[str]) -> None:
    from deploy import command

    _tool("export", command.main)(args)


def _corrupt(args: list[str]) -> None:
    from datamodules.corruptions import command

    _tool("corrupt", command.corrupt)(args)


def _corruption_grid(args: list[str]) -> None:
    from datamodules.corruptions import command

    _tool("corruption-grid", command.corruption_grid)(args)


TOOL_COMMANDS = {"study": _study, "report": _report, "theorem": _theorem, "export": _export,
                 "corrupt": _corrupt, "corruption-grid": _corruption_grid}


def main(argv: list[str] | None = None) -> int:
    from app.preemption import owning_preemption  # first: SLURM's SIGUSR1 may come during the imports below

    with owning_preemption():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from app import lightning_cli, run_folder
    from app.config_files import check_config_files
    from app.errors import exit_status
    from app.signals import handling_ctrl_c

    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    args = list(sys.argv[1:] if argv is None else argv)

    def command() -> None:
        check_config_files(args)
        if args and args[0] in TOOL_COMMANDS:
            TOOL_COMMANDS[args[0]](args[1:])
        else:
            lightning_cli.run(argv)

    with handling_ctrl_c():
        try:
            return exit_status(command, args)
        finally:
            run_folder.release_unused_run_folders()  # a folder it reserved and never wrote to goes again


if __name__ == "__main__":
    sys.exit(main())
