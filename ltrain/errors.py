"""The error a setting raises when it cannot work: a leaf module, so that any
module can raise or catch it without importing the config schema (and, through
it, the attention kinds)."""


class ConfigError(ValueError):
    """A setting that cannot work; the message is the one line shown to the user."""


def config_error(key: str, value, allowed: str) -> ConfigError:
    """The one line for a bad value: `key=value is invalid: what is allowed`."""
    return ConfigError(f"{key}={value!r} is invalid: {allowed}")
