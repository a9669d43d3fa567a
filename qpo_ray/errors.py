"""User-facing errors: the CLI prints these as one clear line and exits non-zero."""


class QPOError(Exception):
    """An error caused by the user's input or environment (bad config, bad data, missing model).

    The message must name what is wrong and where (file, row, column or config key).
    """


class ConfigError(QPOError):
    """Invalid configuration: unknown key, wrong type, bad value."""


class DataError(QPOError):
    """A dataset row, file or version breaks the schema or cannot be read."""


class ModelSourceError(QPOError):
    """A model or tokenizer path/id cannot be resolved or loaded."""


class TargetError(QPOError):
    """The target LLM (engine, server, replica) cannot score a request."""
