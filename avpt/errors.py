"""The one error type of a user's mistake: ``ConfigError`` (a setting, file or folder that is not
usable), printed by the CLI as one line with exit code 2. A leaf module: every layer raises it
without importing the checks (``avpt.validate``) or the loader (``avpt.config``)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting, file or folder the user gave is not usable (one line, exit code 2)."""
