"""The error a user's data mistake raises: one line that names the fix."""

from user_errors import UserError


class DataError(UserError):
    """Missing or malformed data (a dataset root, an array file, a label file)."""
