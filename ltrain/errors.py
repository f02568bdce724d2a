"""The error a setting raises when it cannot work: a leaf module, so that any
module can raise or catch it without importing the config schema (and, through
it, the attention kinds and kernels)."""


class ConfigError(ValueError):
    """A setting that cannot work; the message is the one line shown to the user."""
