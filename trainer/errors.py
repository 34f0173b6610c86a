"""Every error a user sees as one line, at the bottom of the import graph, so that
any layer can raise or catch them (launch -> workers -> trainer never turns around
for an exception class).  Exit status: 2 for the ValueErrors and limits known up
front, 1 for a run that fails."""
import os


class ConfigError(ValueError):
    """A bad setting or config file; the message says what to change."""


def knob(name, default):
    """A positive integer from the environment variable `name` (the COREGPT_* sizes
    that tests shrink), else default; anything else is a ConfigError."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class DataError(ValueError):
    """A token file, corpus or run directory that cannot be used; the message says why."""


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message names the file or tensor."""


class EngineError(RuntimeError):
    """The GEMM engine asked for cannot run here; the message says what to install."""


class ResourceError(RuntimeError):
    """The run does not fit the machine; the message says what to change."""


class RunError(RuntimeError):
    """The run stopped for a reason the user must see (non-finite loss, ...)."""


class WorkerError(RuntimeError):
    """A worker died or failed; the message says which and how."""
