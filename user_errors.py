"""The one base class of every mistake a user can fix: a bad config, file, option or dataset.

Each package raises its own subclass (QuantSpecError, DataError, CheckpointError, StudyError, ExportError, ...)
so that its message names the fix; the entry point (`app/errors.py`) needs to know this class only to end such
a mistake in one line on stderr and exit status 2, and anything else keeps its traceback as the bug it is.
It lives below every floor so that the lowest one, `quantizers`, can raise it too.
"""


class UserError(ValueError):
    """A mistake the user can fix. A ValueError, so that jsonargparse reports one raised while it builds a
    class from a config as a bad value of that key."""
