"""Errors that reach the user as one line and exit code 2.

Anything raised as a `UserError` is the user's to fix (a bad job file, a missing data file,
an unreachable store); the CLI prints it without a traceback. Everything else is a bug or an
infrastructure failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A job-file value that is missing, unknown, mistyped or impossible.

    `key` is the dotted path of the offending value (``student.zero_stage``) so the
    message points at the line to fix.
    """

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key nested under `prefix`."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.message, self.source)
