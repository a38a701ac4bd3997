"""The ``actclust`` command line."""

from .commands import main, run

__all__ = ["main", "run"]
