"""Turn what a user passes as data into a stream of ``(x, y)`` batches.

Accepted: a NumPy array or torch tensor of inputs (first axis = samples), a map-style
``torch.utils.data.Dataset`` or a ``DataLoader``; their items may be an input alone or an
``(input, label, ...)`` tuple. Order must be fixed, since every result lines up with the
samples by position.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .exceptions import DataError


class Batches:
    """A re-iterable stream of ``(x, y)`` batches with a known length where possible."""

    def __init__(self, data, *, batch_size: int, y=None, name: str = "X"):
        self.name = name
        self.batch_size = batch_size
        self._y = None if y is None else _as_labels(y)
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data))
        if isinstance(data, torch.Tensor):
            if data.ndim == 0:
                raise DataError(f"{name} must have a first axis of samples; got a scalar.")
            self._tensor, self._loader = data, None
            self.n_samples: Optional[int] = data.shape[0]
        elif isinstance(data, DataLoader):
            if isinstance(data.sampler, RandomSampler):
                raise DataError(
                    f"The DataLoader passed as {name} shuffles its samples; actclust lines "
                    "results up with samples by position, so pass a DataLoader with shuffle=False."
                )
            self._tensor, self._loader = None, data
            self.n_samples = _safe_len(data.dataset)
        elif isinstance(data, Dataset) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple, str))
        ):
            self._tensor = None
            self._loader = DataLoader(data, batch_size=batch_size, shuffle=False)
            self.n_samples = len(data)
        else:
            raise DataError(
                f"{name} must be a NumPy array, a torch Tensor, a Dataset or a DataLoader; "
                f"got {type(data).__name__}." + (" Convert it with np.asarray first." if isinstance(data, (list, tuple)) else "")
            )
        if self.n_samples == 0:
            raise DataError(f"{name} is empty: it holds no samples.")
        if self._y is not None and self.n_samples is not None and len(self._y) != self.n_samples:
            raise DataError(
                f"y has {len(self._y)} labels but {name} has {self.n_samples} samples; "
                "they must have the same length."
            )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        start = 0
        if self._tensor is not None:
            for start in range(0, self.n_samples, self.batch_size):
                stop = min(start + self.batch_size, self.n_samples)
                yield self._tensor[start:stop], self._labels(start, stop)
            return
        for item in self._loader:
            x, y = _split_item(item, self.name)
            stop = start + x.shape[0]
            if self._y is not None:
                y = self._labels(start, stop)
            yield x, y
            start = stop
        if start == 0:
            raise DataError(f"{self.name} is empty: it holds no samples.")

    def _labels(self, start: int, stop: int) -> Optional[torch.Tensor]:
        if self._y is None:
            return None
        if stop > len(self._y):
            raise DataError(
                f"y has {len(self._y)} labels but {self.name} yields more samples; "
                "they must have the same length."
            )
        return self._y[start:stop]


def _split_item(item, name: str):
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        y = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
        return item[0], y
    raise DataError(
        f"Each batch of {name} must be a tensor or an (input, label, ...) tuple of tensors; "
        f"got {type(item).__name__}."
    )


def _as_labels(y) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y))
    if y.ndim != 1:
        raise DataError(f"y must be a 1-D sequence of class indices; got shape {tuple(y.shape)}.")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise DataError("y must hold integer class indices; got non-integer values.")
    elif y.dtype == torch.bool or y.is_complex():
        raise DataError(f"y must hold integer class indices; got dtype {y.dtype}.")
    return y.long()


def _safe_len(dataset) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return None


class Collector:
    """Gathers per-batch arrays into one array per key, along the first axis (``axis`` for some).

    When the number of samples is known, each key gets one buffer allocated at its first batch
    and later batches are copied in, so no per-batch array outlives its batch: many small
    retained arrays between the large, short-lived activation maps fragment the C heap, and
    resident memory then grows with the data set even though little is kept.
    """

    def __init__(self, n_samples: Optional[int]):
        self.n = n_samples
        self._buffers: dict = {}
        self._lists: dict = {}
        self._pos: dict = {}

    def add(self, key, array: np.ndarray, axis: int = 0) -> None:
        if self.n is None:
            self._lists.setdefault(key, []).append((np.array(array, copy=True), axis))
            return
        if key not in self._buffers:
            shape = list(array.shape)
            shape[axis] = self.n
            self._buffers[key] = np.empty(shape, dtype=array.dtype)
            self._pos[key] = 0
        pos, size = self._pos[key], array.shape[axis]
        if pos + size > self.n:
            raise DataError(f"The data yielded more than the {self.n} samples its length promised.")
        index = [slice(None)] * array.ndim
        index[axis] = slice(pos, pos + size)
        self._buffers[key][tuple(index)] = array
        self._pos[key] = pos + size

    def get(self, key) -> np.ndarray:
        if self.n is None:
            items = self._lists[key]
            return np.concatenate([a for a, _ in items], axis=items[0][1])
        if self._pos[key] != self.n:
            raise DataError(f"The data yielded {self._pos[key]} samples, fewer than the {self.n} its length promised.")
        return self._buffers[key]
