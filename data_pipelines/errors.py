"""The one error type bad input raises: the CLI prints its message and exits non-zero."""


class DataError(Exception):
    """Bad input data or configuration; the message names the file, line or column."""
