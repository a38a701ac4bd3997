"""What a Ray pass needs to know, without the estimator: :class:`RayConfig`, and the checks of ``ray_options``."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np  # noqa: F401

from ...exceptions import ParameterError

__all__ = ["ROW", "RAY_OPTIONS", "RayConfig", "check_options", "is_dataset", "require_ray"]

ROW = "__actclust_row__"
#: Keys of ``ray_options`` and their defaults; see :class:`actclust.ActivationClustering`.
RAY_OPTIONS = {"concurrency": None, "num_cpus": 1, "num_gpus": None, "columns": None}
_LABEL_COLUMNS = ("label", "labels", "y")  # label columns taken with label_key="auto"
_INSTALL = 'pip install "actclust[ray]"'


def require_ray():
    """The ``ray`` module with Ray Data, or a :class:`ParameterError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ParameterError(
            f"engine='ray' needs Ray Data, which is not installed ({e}); install it with {_INSTALL}, "
            "or use engine='local'."
        ) from None
    return ray


def is_dataset(X) -> bool:
    """Whether ``X`` is a ``ray.data.Dataset`` (checked without importing Ray)."""
    return any(c.__module__.startswith("ray.data") and c.__name__ == "Dataset" for c in type(X).__mro__)


def check_options(options) -> dict:
    """``ray_options`` with defaults filled in; :class:`ParameterError` for an unknown key or a bad value."""
    if options is None:
        return dict(RAY_OPTIONS)
    if not isinstance(options, dict) or set(options) - set(RAY_OPTIONS):
        unknown = sorted(set(options) - set(RAY_OPTIONS)) if isinstance(options, dict) else options
        raise ParameterError(f"The 'ray_options' parameter of ActivationClustering must be None or a dict with keys "
                             f"from {sorted(RAY_OPTIONS)}. Got {unknown!r} instead.")
    out = {**RAY_OPTIONS, **options}

    def number(key, low, *, optional=True, integer=False, above=False):
        v = out[key]
        ok = (v is None and optional) or (isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= low
                                          and not (above and v == low)
                                          and (not integer or isinstance(v, numbers.Integral)))
        if not ok:
            kind = "an int" if integer else "a number"
            raise ParameterError(f"ray_options[{key!r}] must be {'None or ' if optional else ''}{kind} "
                                 f"{'>' if above else '>='} {low}. Got {v!r} instead.")
    number("concurrency", 1, integer=True)
    # above 0: with 0 the pool was sized for the cluster's CPUs over 1e-9, two billion actors, and fit never ended
    number("num_cpus", 0, optional=False, above=True)
    number("num_gpus", 0)
    cols = out["columns"]
    if cols is not None and not isinstance(cols, str) and not (
            isinstance(cols, (list, tuple)) and cols and all(isinstance(c, str) for c in cols)):
        raise ParameterError(f"ray_options['columns'] must be None, a column name or a list of them. Got {cols!r} instead.")
    return out




@dataclass(frozen=True)
class RayConfig:
    """The estimator's parameters a Ray pass reads (built from the estimator or a fit's config)."""

    batch_size: int
    label_key: Any
    normalize: Optional[str]
    spatial_grid: Optional[int]
    random_state: int
    progress: bool
    options: dict

    @classmethod
    def of(cls, params) -> "RayConfig":
        return cls(batch_size=params.batch_size, label_key=params.label_key, normalize=params.normalize,
                   spatial_grid=params.spatial_grid, random_state=params.random_state, progress=params.progress,
                   options=check_options(params.ray_options))
