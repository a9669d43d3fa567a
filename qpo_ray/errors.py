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


class ResourceError(QPOError):
    """The machine refused: a full disk, a file-size limit, an unwritable folder, too many open files."""


def os_reason(e: OSError) -> str:
    """The OS's words for ``e`` ("No space left on device"), on one line, whatever raised it (Python or Arrow)."""
    return " ".join(str(e.strerror or e).split())


class TrainingError(QPOError):
    """Training cannot go on: the loss or the weights stopped being finite numbers."""
