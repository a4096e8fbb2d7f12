"""Errors that are the user's to fix: the CLI prints them without a traceback and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (recipe, flags, files, data) rather than a bug."""


class ConfigError(UserError):
    """A recipe or command-line option that cannot be turned into a valid config."""
