"""The error a user's data mistake raises: one line that names the fix."""


class DataError(ValueError):
    """Missing or malformed data (a dataset root, an array file, a label file)."""
