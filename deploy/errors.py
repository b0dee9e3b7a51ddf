"""The error a user's export mistake raises: one line that names the fix (app/errors.py turns it into exit status 2)."""

from user_errors import UserError


class ExportError(UserError):
    """A checkpoint, format or output path that cannot be exported as asked."""


class VerificationFailed(RuntimeError):
    """The exported model disagrees with the PyTorch model beyond the accepted tolerance (not the user's fault)."""


class ExportStopped(BaseException):
    """SIGTERM during an export, raised by its signal handler so that the temporary file is removed on the way out
    (a BaseException, like KeyboardInterrupt: no library's `except Exception` swallows it)."""
