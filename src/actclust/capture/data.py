"""Turn what a user passes as data into a stream of ``(inputs, labels)`` batches.

Accepted: a NumPy array, torch tensor or pandas ``DataFrame``/``Series`` of inputs (first axis
= samples); a dict of such arrays (model inputs by keyword, e.g. ``input_ids`` and
``attention_mask``); a map-style ``Dataset`` or a ``DataLoader`` whose items are an input, a
tuple of tensors or a dict of tensors. Which element of a tuple or dict item is the label is
said by ``label_key`` (see :func:`split_item`). Order must be fixed, since every result lines
up with the samples by position: a ``DataLoader`` must read its dataset in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

from ..exceptions import DataError, ParameterError
from ..store.vectors import Collector  # noqa: F401  (the passes gather their outputs with it)

LABEL_NAMES = ("labels", "label")  # dict keys taken as the label with label_key="auto" (Hugging Face's)


@dataclass(frozen=True)
class Batch:
    """One batch: the model's inputs (tensor, tuple or dict of tensors), labels, first row's position."""

    inputs: object
    labels: Optional[torch.Tensor]
    start: int

    @property
    def where(self) -> str:
        return f"rows {self.start}-{self.start + batch_len(self.inputs) - 1}"


def batch_len(inputs) -> int:
    if isinstance(inputs, Mapping):
        inputs = next(iter(inputs.values()))
    elif isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return int(inputs.shape[0])


class Batches:
    """A re-iterable stream of :class:`Batch` with a known length where possible."""

    def __init__(self, data, *, batch_size: int, y=None, name: str = "X", label_key="auto"):
        self.name = name
        self.batch_size = batch_size
        self.label_key = label_key
        self.feature_names: Optional[list] = None
        self._y = None if y is None else as_labels(y)
        data = self._from_pandas(data)
        if isinstance(data, np.ndarray):
            data = _tensor(data, name)
        self._tensor = self._columns = self._loader = None
        if isinstance(data, torch.Tensor):
            if data.ndim == 0:
                raise DataError(f"{name} must have a first axis of samples; got a scalar.")
            self._tensor, self.n_samples = data, data.shape[0]
        elif isinstance(data, Mapping):
            self._columns = _columns(data, name)
            self.n_samples = batch_len(self._columns)
        elif isinstance(data, DataLoader):
            _check_order(data, name)
            self._loader = data
            self.n_samples = _safe_len(data.dataset)
        elif isinstance(data, Dataset) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple, str))
        ):
            self._loader = DataLoader(data, batch_size=batch_size, shuffle=False)
            self.n_samples = _safe_len(data)  # None for an IterableDataset: collected as it comes
        else:
            raise DataError(
                f"{name} must be a NumPy array, a torch Tensor, a pandas DataFrame, a dict of arrays, a "
                f"Dataset or a DataLoader; got {type(data).__name__}."
                + (" Convert it with np.asarray first." if isinstance(data, (list, tuple)) else "")
            )
        if self.n_samples == 0:
            raise DataError(f"{name} is empty: it holds no samples.")
        if self._y is not None and self.n_samples is not None and len(self._y) != self.n_samples:
            raise DataError(
                f"y has {len(self._y)} labels but {name} has {self.n_samples} samples; "
                "they must have the same length."
            )

    def _from_pandas(self, data):
        """A DataFrame becomes a float32 array (numeric columns only); its column names are kept."""
        module = type(data).__module__
        if not module.startswith("pandas") or not hasattr(data, "to_numpy"):
            return data
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        frame = data.to_frame() if data.ndim == 1 else data
        bad = [str(c) for c, t in frame.dtypes.items() if not (is_numeric_dtype(t) or is_bool_dtype(t))]
        if bad:
            raise DataError(
                f"{self.name} has non-numeric columns {bad[:5]}: encode them as numbers (e.g. one-hot, "
                "as in training) or drop them before passing the table."
            )
        self.feature_names = [str(c) for c in frame.columns]
        values = frame.to_numpy(dtype=np.float32, na_value=np.nan)
        return values

    def __iter__(self) -> Iterator[Batch]:
        if self._tensor is not None or self._columns is not None:
            for start in range(0, self.n_samples, self.batch_size):
                stop = min(start + self.batch_size, self.n_samples)
                if self._tensor is not None:
                    inputs = self._tensor[start:stop]
                else:
                    inputs = {k: v[start:stop] for k, v in self._columns.items()}
                yield Batch(inputs, self._labels(start, stop), start)
            return
        start = 0
        for item in self._loader:
            inputs, y = split_item(item, self.label_key, self.name)
            stop = start + batch_len(inputs)
            if self._y is not None:
                y = self._labels(start, stop)
            yield Batch(inputs, y, start)
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


def length(data) -> int:
    """Number of samples in any accepted form of data (a DataLoader: its dataset's)."""
    if isinstance(data, DataLoader):
        return len(data.dataset)
    if isinstance(data, Mapping):
        return len(next(iter(data.values())))
    return len(data)


def take(data, idx):
    """The samples at positions ``idx``, in the same form as ``data`` where it has one."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(data, np.ndarray):
        return data[idx]
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(idx)]
    if type(data).__module__.startswith("pandas") and hasattr(data, "iloc"):
        return data.iloc[idx]
    if isinstance(data, Mapping):
        return {k: take(v, idx) for k, v in data.items()}
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return torch.utils.data.Subset(dataset, idx.tolist())


def rows(data, idx, *, label_key="auto", name: str = "X") -> list:
    """The model inputs of the samples at ``idx``, one per sample, as NumPy arrays (a tuple or dict
    of arrays for models with several inputs); labels are split off as ``fit`` splits them."""
    out = []
    if len(idx) == 0:
        return out
    for batch in Batches(take(data, idx), batch_size=len(idx), label_key=label_key, name=name):
        out.extend(_unbatch(batch.inputs))
    return out


def _unbatch(inputs) -> list:
    if isinstance(inputs, Mapping):
        cols = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        return [{k: v[i] for k, v in cols.items()} for i in range(batch_len(inputs))]
    if isinstance(inputs, (tuple, list)):
        cols = [v.detach().cpu().numpy() for v in inputs]
        return [tuple(v[i] for v in cols) for i in range(batch_len(inputs))]
    return list(inputs.detach().cpu().numpy())


def _tensor(a: np.ndarray, name: str) -> torch.Tensor:
    if a.dtype == object or a.dtype.kind in "USV":
        raise DataError(f"{name} holds {a.dtype} values; pass numbers (an array of a numeric dtype).")
    return torch.from_numpy(np.ascontiguousarray(a))


def _columns(data: Mapping, name: str) -> dict:
    """A dict of per-sample arrays (model inputs by keyword), all of the same length."""
    if not data:
        raise DataError(f"{name} is an empty dict; give the model's inputs by name, e.g. "
                        "{'input_ids': ..., 'attention_mask': ...}.")
    cols = {}
    for key, value in data.items():
        t = value if isinstance(value, torch.Tensor) else _tensor(np.asarray(value), f"{name}[{key!r}]")
        if t.ndim == 0:
            raise DataError(f"{name}[{key!r}] must have a first axis of samples; got a scalar.")
        cols[str(key)] = t
    lengths = {k: v.shape[0] for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"The arrays of {name} differ in length: {lengths}; each must hold one row per sample.")
    return cols


def _check_order(loader: DataLoader, name: str) -> None:
    """Refuse loaders that do not read their dataset in order: results would not line up."""
    if isinstance(loader.dataset, IterableDataset):
        return  # its own order; nothing to check
    bs = loader.batch_sampler
    sampler = loader.sampler if bs is None else getattr(bs, "sampler", None)
    if bs is not None and type(bs) is not BatchSampler:
        raise DataError(
            f"The DataLoader passed as {name} uses a custom batch_sampler ({type(bs).__name__}); actclust "
            "lines results up with samples by position, so it needs the dataset read in order: pass "
            "DataLoader(dataset, batch_size=..., shuffle=False)."
        )
    if type(sampler) is not SequentialSampler:
        raise DataError(
            f"The DataLoader passed as {name} draws its samples with a {type(sampler).__name__}; actclust "
            "lines results up with samples by position, so it needs them in order: pass "
            "DataLoader(dataset, shuffle=False) (for a subset, torch.utils.data.Subset(dataset, indices))."
        )
    if bs is not None and bs.drop_last and len(loader.dataset) % bs.batch_size:
        raise DataError(
            f"The DataLoader passed as {name} has drop_last=True and would skip the last "
            f"{len(loader.dataset) % bs.batch_size} samples; pass drop_last=False."
        )


def split_item(item, label_key, name: str = "X"):
    """Split one batch from a DataLoader into the model's inputs and the labels.

    ``label_key``: ``"auto"`` takes ``(input, label)`` pairs whose second element is a 1-D
    integer tensor, and the ``"labels"`` (or ``"label"``) entry of a dict; a tuple of three or
    more tensors must say which is the label. ``None``: every element goes to the model. An int
    (tuples) or a str (dicts): that element is the label, the others go to the model.
    """
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, Mapping):
        item = dict(item)
        if isinstance(label_key, bool) or (label_key is not None and not isinstance(label_key, str)):
            raise ParameterError(
                f"The batches of {name} are dicts, so label_key must name a key ({sorted(item)}) or be "
                f"None or 'auto'; got {label_key!r}."
            )
        key = next((k for k in LABEL_NAMES if k in item), None) if label_key == "auto" else label_key
        if key is not None and key not in item:
            raise DataError(f"label_key={key!r} is not a key of the batches of {name}; they have {sorted(item)}.")
        label = item.pop(key) if key is not None else None
        _all_tensors(item.values(), name)
        if not item:
            raise DataError(f"The batches of {name} hold only the label {key!r}: no input is left for the model.")
        return item, label
    if isinstance(item, (tuple, list)) and item:
        parts = list(item)
        _all_tensors(parts, name)
        if label_key == "auto":
            if len(parts) == 1:
                return parts[0], None
            if len(parts) == 2 and _looks_like_labels(parts[1], parts[0].shape[0]):
                return parts[0], parts[1]
            raise DataError(
                f"The batches of {name} are tuples of {len(parts)} tensors ("
                + ", ".join(f"{str(p.dtype).replace('torch.', '')} {tuple(p.shape)}" for p in parts)
                + "); say which one is the label with label_key=<its position>, or label_key=None if "
                "there is none: the other elements are passed to the model as positional inputs."
            )
        if label_key is None:
            return (parts[0] if len(parts) == 1 else tuple(parts)), None
        if isinstance(label_key, bool) or not isinstance(label_key, int) or not -len(parts) <= label_key < len(parts):
            raise ParameterError(
                f"The batches of {name} are tuples of {len(parts)} tensors, so label_key must be a position "
                f"in 0..{len(parts) - 1}, None or 'auto'; got {label_key!r}."
            )
        label = parts.pop(label_key)
        if not parts:
            raise DataError(f"The batches of {name} hold only the label: no input is left for the model.")
        return (parts[0] if len(parts) == 1 else tuple(parts)), label
    raise DataError(
        f"Each batch of {name} must be a tensor, a tuple of tensors or a dict of tensors; "
        f"got {type(item).__name__}."
    )


def _all_tensors(parts, name: str) -> None:
    for p in parts:
        if not isinstance(p, torch.Tensor):
            raise DataError(f"The batches of {name} must hold tensors; found a {type(p).__name__}.")


def _looks_like_labels(t: torch.Tensor, n: int) -> bool:
    return t.ndim == 1 and t.shape[0] == n and not t.is_floating_point() and t.dtype != torch.bool


def as_labels(y) -> torch.Tensor:
    y = torch.from_numpy(np.ascontiguousarray(np.asarray(y))) if not isinstance(y, torch.Tensor) else y
    if y.ndim != 1:
        raise DataError(f"y must be a 1-D sequence of class indices; got shape {tuple(y.shape)}.")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise DataError("y must hold integer class indices; got non-integer values.")
    elif y.dtype == torch.bool or y.is_complex():
        raise DataError(f"y must hold integer class indices; got dtype {y.dtype}.")
    return y.long()


def check_label_range(labels: np.ndarray, n_classes: int) -> None:
    """Refuse labels outside the model's classes ``0..n_classes - 1``."""
    bad = np.unique(labels[(labels < 0) | (labels >= n_classes)])
    if bad.size:
        raise DataError(
            f"y has classes the model does not have: {bad[:10].tolist()}; the model outputs "
            f"{n_classes} classes, so labels must be in 0..{n_classes - 1}."
        )


def _safe_len(dataset) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return None
