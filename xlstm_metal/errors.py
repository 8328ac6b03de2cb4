"""The library's errors for bad input. The command line prints them without a traceback and exits
with code 2."""


class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or the tensors."""


class SettingError(ValueError):
    """An environment variable's value that cannot be read; the message names the variable."""
