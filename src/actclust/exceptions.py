"""Exceptions and warnings raised by actclust.

Every error the library raises on purpose derives from :class:`ActClustError`, so a caller
can catch them all at once; each subclass also derives from the built-in exception a Python
user would expect (``ValueError`` for bad arguments, ``RuntimeError`` for a model that
misbehaves during capture).
"""

__all__ = [
    "ActClustError",
    "NotFittedError",
    "CaptureError",
    "DataError",
    "InvalidSaveError",
    "ModelMismatchWarning",
]


class ActClustError(Exception):
    """Base class of every error actclust raises on purpose."""


class NotFittedError(ActClustError, ValueError, AttributeError):
    """A method that needs a fitted explainer was called before ``fit``."""


class CaptureError(ActClustError, RuntimeError):
    """The model did something during capture that makes its activations unusable."""


class DataError(ActClustError, ValueError):
    """Data passed to actclust cannot be used (wrong type, empty, misaligned labels, other shape)."""


class InvalidSaveError(ActClustError, ValueError):
    """A saved run is missing, truncated, tampered with or of an unknown format."""


class ModelMismatchWarning(UserWarning):
    """A saved run is being loaded with a model whose parameters differ from the fitted one."""
