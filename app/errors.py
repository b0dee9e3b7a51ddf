"""The error path: how a run that went wrong ends.

A user's mistake (any `UserError`, a jsonargparse or Lightning configuration error, a full disk, a filesystem
error about a path the user named) ends in one line on stderr and exit status 2; a diverged run in one line and
status 3; a signal with the line that says how to resume, and 143 / 130; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from app.preemption import Preempted
from app.signals import ctrl_c_received
from lightning_modules.divergence import TrainingDiverged
from records.exits import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR
from records.preemption import preemption_noted
from study.layout import RUNS_DIR
from user_errors import UserError

INTERRUPTED_LINE = ("qreg: stopped by {signal}; a fit's checkpoints/last.ckpt holds its progress: resume with "
                    "--ckpt_path <run>/checkpoints/last.ckpt")
# Filesystem conditions the user fixes (free space, quota, a read-only mount) wherever they strike; any other
# OSError is the user's only when it names a file the user named (or one inside it), else it is a bug.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# Exceptions that only a bug raises: met in a chain before any user error, the whole chain is a bug (a bug
# raised while handling a user's missing file must keep its traceback, not be reported as that file).
PROGRAMMING_ERRORS = (AttributeError, NameError, AssertionError, ZeroDivisionError, IndexError)


class CommandFailed(Exception):
    """A command that ran to its end and failed in a way it has already explained (a study whose cells failed,
    or that a signal stopped): its one line, and the status to exit with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UserFileError(OSError):
    """A filesystem error about a file the user named: reported in one line."""


_TYPE_ERROR = re.compile(r'^Parser key "(\w+)": Does not validate .*?Problem with given class_path [^:]+: '
                         r'Parser key "([^"]+)": Expected a <class \'(\w+)\'>\. Got value: (\S+)')
_LITERAL_ERROR = re.compile(r'Parser key "([^"]+)": Expected a typing\.Literal\[(.+?)\]\. Got value: (\S+)')


def one_line(error: BaseException) -> str:
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


def find(error: BaseException | None, kinds) -> BaseException | None:
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
    """The user's mistake behind an exception, if any: a `UserError` (or a configuration error of jsonargparse
    or Lightning), a full disk or read-only mount, or a filesystem error about a path the user gave on the
    command line (or a file inside it)."""
    from jsonargparse import ArgumentError

    mistake = find(error, (UserError, MisconfigurationException, ArgumentError))
    if mistake is not None:
        return mistake
    oserror = find(error, OSError)
    if oserror is None:
        return None
    if oserror.errno in ENVIRONMENT_ERRNOS or _names_user_path(oserror, args):
        return UserFileError(_describe_oserror(oserror))
    return None


def _names_user_path(error: OSError, args: list[str]) -> bool:
    named = [Path(value).absolute() for value in args if value and not value.startswith("-") and os.sep in value]
    if error.errno in (errno.EACCES, errno.EPERM):  # the runs folder is the user's to make writable; a file
        named += [RUNS_DIR.absolute()]              # missing from it is qreg's own doing, a bug
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


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def exit_status(command: Callable[[], None], args: list[str]) -> int:
    """Run `command` and map how it ended to qreg's exit statuses (re-raising a bug)."""
    try:
        command()
    except Exception as error:
        if isinstance(error, CommandFailed):
            _say(f"qreg: {error}")
            return error.status
        diverged = find(error, TrainingDiverged)
        if diverged is not None:
            _say(f"qreg: diverged: {one_line(diverged)}")
            return EXIT_DIVERGED
        mistake = user_error(error, args)
        if mistake is None:
            raise
        _say(f"qreg: error: {one_line(mistake)}")
        return EXIT_USER_ERROR
    except SIGTERMException:
        if preemption_noted() and not ctrl_c_received():  # qreg's SIGUSR1 handler stopped the fit
            _say(INTERRUPTED_LINE.format(signal="SIGUSR1 (preemption)"))
            return EXIT_PREEMPTED
        signal = "Ctrl-C (SIGINT)" if ctrl_c_received() else "SIGTERM"
        _say(INTERRUPTED_LINE.format(signal=signal))
        return EXIT_SIGINT if ctrl_c_received() else EXIT_SIGTERM
    except Preempted:  # outside a fit: nothing to save, the requeued job redoes it
        _say("qreg: stopped by SIGUSR1 (preemption) before training or after it; nothing to save")
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        _say(INTERRUPTED_LINE.format(signal="Ctrl-C (SIGINT)"))
        return EXIT_SIGINT
    except SystemExit as done:  # --help and --print_config end this way
        if find(done, KeyboardInterrupt) is not None:
            # Lightning turns Ctrl-C into sys.exit(1) after its callbacks' on_exception (qreg's saves last.ckpt)
            _say(INTERRUPTED_LINE.format(signal="Ctrl-C (SIGINT)"))
            return EXIT_SIGINT
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    return 0
