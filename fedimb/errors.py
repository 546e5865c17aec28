"""The error every bad input becomes: one line naming the field or the file, exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that is not allowed; ``str()`` is the one line shown to the user."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"config error: {field_name}: {message}")
        self.field_name = field_name
