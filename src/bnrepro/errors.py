"""Errors a user can fix; the entrypoint prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: the message says what was wrong and what to do."""


class DataError(UserError):
    """Dataset files missing, unreadable or not the expected bytes."""


class ConfigError(UserError):
    """A config value of the wrong type or out of range."""


class RunHeld(UserError):
    """Another live process is training this run directory (bnrepro.infra.run_lock)."""
