"""Every error tritonmerge raises on purpose derives from TritonMergeError.

The messages are meant to be read by a person who did not write the call: they name the
method, parameter, tensor, file or model at fault and what would have been accepted.
"""


class TritonMergeError(Exception):
    """Base class of all tritonmerge errors."""


class UnknownMethodError(TritonMergeError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ParameterError(TritonMergeError, ValueError):
    """A merge parameter is unknown, missing or out of range."""


class InputError(TritonMergeError, ValueError):
    """The tensors handed to a merge are unusable (shapes, dtypes, NaN/Inf, empty lists...)."""


class BackendUnavailableError(TritonMergeError, RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists why."""


class CheckpointError(TritonMergeError, RuntimeError):
    """A checkpoint on disk is missing, corrupt, inconsistent or cannot be written."""


class ConfigError(TritonMergeError, ValueError):
    """A merge configuration (YAML or dict) is invalid."""


class NonFiniteResultError(TritonMergeError, FloatingPointError):
    """A merge produced NaN or Inf."""


class NonFiniteInputError(TritonMergeError, FloatingPointError):
    """An input checkpoint holds NaN or Inf; the message names the model, file and tensor."""


class OutputLockedError(CheckpointError):
    """Another tritonmerge process is writing the same output folder."""
