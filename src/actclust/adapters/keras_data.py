"""Keras's ``PyDataset`` and TensorFlow's ``tf.data.Dataset`` as data (:class:`actclust.capture.data.Source`).

Imported only when the data is one of them (so keras or tensorflow is imported already). Each
item is a batch, in Keras's convention: ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``
(the weights are dropped); ``x`` an array or a dict of arrays by input name. A batch becomes
what :func:`actclust.capture.data.split_item` reads: ``x``, ``(x, y)``, or the dict ``x`` with
the labels under ``"labels"``; ``((x1, x2), y)`` becomes ``(x1, x2, y)`` (say ``label_key=-1``).
TensorFlow tensors come out as NumPy. The order must be fixed (no shuffling): results line up
with samples by position. A ``tf.data.Dataset`` must be batched (``ds.batch(n)``), as Keras's
``fit`` needs it.
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np

from ..capture.arrays import to_numpy
from ..capture.data import LABEL_NAMES, Source, batch_len
from ..exceptions import DataError

__all__ = ["source", "KerasSource"]


def source(data, batch_size: int, name: str) -> Optional["KerasSource"]:
    """The batches of a ``keras.utils.PyDataset`` or a batched ``tf.data.Dataset``; None for other objects."""
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(data, keras.utils.PyDataset):
        return KerasSource(data, name, "PyDataset")
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(data, tf.data.Dataset):
        return KerasSource(data, name, "tf.data.Dataset")
    return None


class KerasSource(Source):
    """Batches of a PyDataset (read by index, in order, without its workers) or of a tf.data.Dataset."""

    n_samples = None  # known only once read: the loaders count batches, not samples

    def __init__(self, data, name: str, kind: str):
        self.data, self.name, self.kind = data, name, kind

    def _raw(self):
        if self.kind == "PyDataset":
            try:
                n = self.data.num_batches
            except NotImplementedError:  # neither __len__ nor num_batches
                n = None
            if n is None:
                raise DataError(f"The PyDataset passed as {self.name} has no length (no __len__, and num_batches is not "
                                "a number); actclust needs a finite dataset read in order.")
            for i in range(n):
                yield self.data[i]
        else:
            yield from self.data

    def __iter__(self):
        for item in self._raw():
            yield _standard(item, self.name)

    def take(self, idx):
        """The samples at ``idx`` (gathered in one pass over the batches), as a map-style dataset."""
        idx = np.asarray(idx, dtype=np.int64)
        if not len(idx):
            return _Samples(np.empty((0,), np.float32))
        order = np.argsort(idx, kind="stable")
        wanted, parts, start = idx[order], [], 0
        for batch in self:
            n = batch_len(batch if not isinstance(batch, tuple) else batch[0])
            lo, hi = np.searchsorted(wanted, [start, start + n])
            if hi > lo:
                parts.append(_rows(batch, wanted[lo:hi] - start))
            start += n
        if len(wanted) and (wanted[-1] >= start or wanted[0] < 0):
            raise DataError(f"{self.name} holds {start} samples; sample {int(wanted[-1])} was asked for.")
        gathered = _concat(parts)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return _Samples(_rows(gathered, back))


def _standard(item, name: str):
    """One batch in Keras's convention as split_item reads it; tensors as NumPy."""
    if isinstance(item, dict):
        return {k: _np(v) for k, v in item.items()}
    if not isinstance(item, (tuple, list)):
        return _np(item)
    if not 1 <= len(item) <= 3:
        raise DataError(f"The batches of {name} are tuples of {len(item)} elements; Keras's convention is x, (x, y) "
                        "or (x, y, sample_weight).")
    x = item[0]
    y = _np(item[1]) if len(item) > 1 and item[1] is not None else None
    if isinstance(x, dict):
        x = {k: _np(v) for k, v in x.items()}
        if y is None:
            return x
        clash = [k for k in LABEL_NAMES if k in x]
        if clash:
            raise DataError(f"The batches of {name} have an input named {clash[0]!r} and labels; rename that input.")
        return {**x, LABEL_NAMES[0]: y}
    if isinstance(x, (tuple, list)):
        return tuple(_np(v) for v in x) + ((y,) if y is not None else ())
    return _np(x) if y is None else (_np(x), y)


def _np(a):
    return a if isinstance(a, np.ndarray) else to_numpy(a)


def _rows(batch, idx):
    if isinstance(batch, dict):
        return {k: v[idx] for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(v[idx] for v in batch)
    return batch[idx]


def _concat(parts: list):
    first = parts[0]
    if isinstance(first, dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(len(first)))
    return np.concatenate(parts)


class _Samples:
    """Samples taken from a Keras loader, as a map-style dataset (one item per sample, labels kept)."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return batch_len(self.batch if not isinstance(self.batch, tuple) else self.batch[0])

    def __getitem__(self, i):
        return _rows(self.batch, int(i))
