"""Exceptions and warnings raised by actclust.

Every error the library raises derives from :class:`ActClustError`, so a caller can catch them
all at once; each subclass also derives from the built-in exception a Python user would expect
(``ValueError`` for bad arguments or data, ``RuntimeError`` for a model that misbehaves during
capture, ``FileExistsError`` for a save that would replace something). An error raised by the
user's model while actclust runs it is re-raised as a :class:`CaptureError` or
:class:`DataError` that says which batch and what to check, with the original as its cause.
Every warning actclust emits is one of the public classes below.
"""

__all__ = [
    "ActClustError",
    "ParameterError",
    "NotFittedError",
    "CaptureError",
    "UnsupportedModelError",
    "DataError",
    "InvalidSaveError",
    "RunExistsError",
    "DataNotFoundError",
    "ModelImportError",
    "MissingDependencyError",
    "StorageError",
    "DiskFullError",
    "StoragePermissionError",
    "ActClustWarning",
    "ModelMismatchWarning",
    "ConvergenceWarning",
    "DistillWarning",
    "IDECWarning",
    "IDECTrainingError",
    "RenderWarning",
    "DataWarning",
    "TrustWarning",
    "DeviceMemoryWarning",
    "SearchWarning",
]


class ActClustError(Exception):
    """Base class of every error actclust raises."""


class ParameterError(ActClustError, ValueError):
    """A parameter (of the estimator or of a method) has a value that is not allowed."""


class NotFittedError(ActClustError, ValueError, AttributeError):
    """A method that needs a fitted explainer was called before ``fit``."""


class CaptureError(ActClustError, RuntimeError):
    """The model did something during capture that makes its activations unusable."""


class UnsupportedModelError(ActClustError, TypeError):
    """The model cannot be explained as given (e.g. a TorchScript module, which has no forward hooks)."""


class DataError(ActClustError, ValueError):
    """Data passed to actclust cannot be used (wrong type, empty, misaligned labels, other shape)."""


class InvalidSaveError(ActClustError, ValueError):
    """A saved run is missing, truncated, tampered with or of an unknown format."""


class RunExistsError(ActClustError, FileExistsError):
    """Saving would replace an existing run or file, and replacing was not asked for."""


class DataNotFoundError(ActClustError, FileNotFoundError):
    """A file or data set actclust was asked to read does not exist."""


class ModelImportError(ActClustError, ImportError):
    """The command line could not import the model factory it was given."""


class MissingDependencyError(ActClustError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra to install."""


class StorageError(ActClustError, OSError):
    """Reading or writing a file failed for a reason of the system (no such folder, a path that is
    not a folder, an I/O error); the message names the path and what to do. Nothing partial is
    left behind. ``errno`` and ``filename`` are those of the original error, its ``__cause__``."""


class DiskFullError(StorageError):
    """The disk (or the quota) ran out of space while actclust wrote a file; nothing partial is
    left behind. Free space, or write to another disk."""


class StoragePermissionError(StorageError, PermissionError):
    """actclust may not create, write or replace a file (permissions, a read-only file system)."""


class ActClustWarning(UserWarning):
    """Base class of every warning actclust emits."""


class ModelMismatchWarning(ActClustWarning):
    """A saved run is being loaded with a model whose parameters differ from the fitted one."""


class ConvergenceWarning(ActClustWarning):
    """A clustering or its refinement stopped before converging; the message names the layer."""


class DistillWarning(ConvergenceWarning):
    """The distillation refinement did not converge or went non-finite; the message carries the loss history."""


class IDECWarning(ConvergenceWarning):
    """IDEC training went non-finite or did not converge; the message carries the loss history."""


class IDECTrainingError(ActClustError, RuntimeError):
    """IDEC training produced non-finite losses; no model is kept."""


class RenderWarning(ActClustWarning):
    """The report could not draw an input and shows a placeholder instead."""


class TrustWarning(ActClustWarning):
    """Some trust signals are unavailable or not calibrated against true labels."""


class DataWarning(ActClustWarning):
    """Data was accepted but probably not as the user meant (e.g. token maps reduced over features)."""


class DeviceMemoryWarning(ActClustWarning):
    """The device ran out of memory; the work goes on in smaller chunks, or on the host where even the smallest do not
    fit (each said once per backend)."""


class SearchWarning(ActClustWarning):
    """An approximate neighbour search cannot reach its recall target on this data (said once per index and
    weighting): ``search="auto"`` then searches exactly."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that points at the first frame
    outside actclust (the user's line), however deep in the library the warning is raised: a fixed level named a
    line of actclust for some callers (``report`` calls what ``explain`` calls)."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
