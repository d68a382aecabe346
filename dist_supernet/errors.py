"""The one error format for a user's mistake in the config: ``key=value: reason`` on one line.

Here, below every package, so that the model families (``models/``), the
supernet's own checks (``supernet/``) and the training application's schemas
(``train/config.py``) raise the same error without importing each other. A
library check that does not know where its value sits in the config names the
key as its caller knows it (``depths``); the config-facing caller re-keys it
under its group with :meth:`ConfigError.under` (``model.depths``).

Example::
    >>> e = ConfigError("depths", [0, 2], "expected positive integers")
    >>> print(e)
    depths=[0,2]: expected positive integers
    >>> print(e.under("model"))
    model.depths=[0,2]: expected positive integers
"""


class ConfigError(ValueError):
    """A user mistake in the config: ``key=value: reason`` on one line."""

    def __init__(self, key: str, value, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={format_value(value)}: {reason}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key inside ``prefix`` (``depths`` under ``model`` -> ``model.depths``)."""
        key = self.key if self.key.startswith(f"{prefix}.") else f"{prefix}.{self.key}"
        return ConfigError(key, self.value, self.reason)


def format_value(value) -> str:
    """A config value the way it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)
