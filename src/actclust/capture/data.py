"""Turn what a user passes as data into a stream of ``(inputs, labels)`` batches, for any framework.

Accepted: an array of inputs (NumPy, a PyTorch or JAX tensor: first axis = samples), a pandas
``DataFrame``/``Series``; a dict of such arrays (model inputs by keyword, e.g. ``input_ids`` and
``attention_mask``); a map-style dataset (anything with ``__len__`` and ``__getitem__`` whose
items are an input, a tuple or a dict); and the loaders of the frameworks, handled by their
adapters without this module importing them (PyTorch's ``Dataset``/``DataLoader``; Keras's
``PyDataset`` and ``tf.data``). Which element of a tuple or dict item is the label is said by
``label_key`` (see :func:`split_item`); labels given both in the batches and as ``y=`` must agree.
Order must be fixed, since every result lines up with the samples by position.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import numpy as np

from ..exceptions import DataError, ParameterError
from .arrays import dtype_name, is_array, is_integer, stack, take_rows, to_numpy

__all__ = ["Batch", "Batches", "batch_len", "length", "take", "rows", "split_item", "check_agree", "as_labels", "check_label_range",
           "LABEL_NAMES", "numeric", "collate", "Source"]

LABEL_NAMES = ("labels", "label")  # dict keys taken as the label with label_key="auto" (Hugging Face's)
#: Loaders of a framework, by the top-level module of their type: ``module:function`` returning a
#: :class:`Source` for the object, or None when it is not one of that framework's loaders.
_LOADERS = {"torch": "actclust.adapters.torch_data:source", "keras": "actclust.adapters.keras_data:source",
            "tensorflow": "actclust.adapters.keras_data:source"}


@dataclass(frozen=True)
class Batch:
    """One batch: the model's inputs (an array, tuple or dict of arrays), labels, first row's position."""

    inputs: object
    labels: Optional[np.ndarray]
    start: int
    #: where ``labels`` were split off by ``label_key="auto"`` from a loader's ``(inputs, labels)`` pairs, said of
    #: a model that then fails on its inputs (a model of two inputs, as ``(ids, lengths)``, lost its second)
    label_guessed: bool = False

    @property
    def where(self) -> str:
        return f"rows {self.start}-{self.start + batch_len(self.inputs) - 1}"


def batch_len(inputs) -> int:
    if isinstance(inputs, Mapping):
        inputs = next(iter(inputs.values()))
    elif isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return int(inputs.shape[0])


class Source:
    """Batches as a loader yields them (array, tuple or dict items, labels not split off), and the
    number of samples when known. Framework adapters subclass it for their loaders."""

    n_samples: Optional[int] = None

    def __iter__(self) -> Iterator:
        raise NotImplementedError

    def take(self, idx: np.ndarray):
        """The samples at ``idx``, as data :class:`Batches` accepts."""
        raise NotImplementedError


class _MapSource(Source):
    """A map-style dataset without a framework: items collated into batches of ``batch_size``."""

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size, self.n_samples = data, batch_size, len(data)

    def __iter__(self):
        for start in range(0, self.n_samples, self.batch_size):
            yield collate([self.data[i] for i in range(start, min(start + self.batch_size, self.n_samples))])

    def take(self, idx):
        return _Subset(self.data, np.asarray(idx, dtype=np.int64))


class _Subset:
    def __init__(self, data, idx):
        self.data, self.idx = data, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.data[int(self.idx[i])]


def collate(items: list):
    """A batch from per-sample items: arrays stacked, tuples and dicts element-wise, numbers as arrays."""
    first = items[0]
    if isinstance(first, Mapping):
        return {k: collate([it[k] for it in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(collate([it[j] for it in items]) for j in range(len(first)))
    if is_array(first):
        return stack(items)
    try:
        out = np.asarray(items)
    except (ValueError, TypeError) as e:
        raise DataError(f"The items of the dataset cannot be stacked into a batch ({e}).") from None
    if out.dtype == object:
        raise DataError(f"The items of the dataset hold {type(first).__name__} values that are not arrays or numbers.")
    return out


def _loader_source(data, batch_size: int, name: str) -> Optional[Source]:
    """The :class:`Source` of a framework's loader (imported only when ``data`` is one of its objects)."""
    for cls in type(data).__mro__:
        root = cls.__module__.split(".", 1)[0]
        if root in _LOADERS and root in sys.modules:
            module, _, fn = _LOADERS[root].partition(":")
            source = getattr(importlib.import_module(module), fn)(data, batch_size, name)
            if source is not None:
                return source
    return None


def _check_aligned(data, y, name: str) -> None:
    """Refuse a pandas ``y`` whose index holds ``data``'s index labels in another order: labels go to rows by position
    (as in scikit-learn), so each would go to another row, without a word (an outside check: accuracy 1.0 -> 0.57 with
    ``y.sort_index()``). An index of other labels, or 0..n-1 on either side (``reset_index(drop=True)``, a Series
    made from an array), is taken by position."""
    xi, yi = getattr(data, "index", None), getattr(y, "index", None)
    if type(data).__name__ not in ("DataFrame", "Series") or type(y).__name__ not in ("Series", "DataFrame"):
        return
    if any(type(i).__name__ == "RangeIndex" and i.start == 0 and i.step == 1 for i in (xi, yi)):
        return  # 0..n-1 on either side: made from positions (reset_index, a Series of an array)
    try:  # the same labels, each once, in another order (no sorting: an index may mix types)
        same = len(xi) == len(yi) and not xi.equals(yi) and xi.is_unique and yi.is_unique and bool(yi.isin(xi).all())
    except TypeError:
        return
    if not same:
        return
    raise DataError(f"y's index holds the labels of {name}'s index in another order, and labels go to rows by position: "
                    f"each would go to another row. Pass y.loc[{name}.index] to align them (or y.to_numpy() if the "
                    "order is meant).")


class Batches:
    """A re-iterable stream of :class:`Batch` with a known length where possible."""

    def __init__(self, data, *, batch_size: int, y=None, name: str = "X", label_key="auto"):
        self.name = name
        self.batch_size = batch_size
        self.label_key = label_key
        self.feature_names: Optional[list] = None
        self._y = None if y is None else as_labels(y)
        _check_aligned(data, y, name)
        data = self._from_pandas(data)
        self._array = self._columns = self._source = None
        if isinstance(data, tuple) and data and all(is_array(v) for v in data):  # a model's inputs by position
            self._columns = tuple(_columns(dict(enumerate(data)), name).values())
            self.n_samples = batch_len(self._columns)
        elif isinstance(data, (list, tuple, str, bytes)):
            raise DataError(
                f"{name} must be an array (NumPy or a framework's tensor), a pandas DataFrame, a dict of arrays, a tuple "
                f"of arrays (a model's inputs in order) or a dataset; got "
                + ("a list: convert a list of samples with np.asarray first, or pass a model's inputs as a tuple."
                   if isinstance(data, list) else "a tuple that holds other values than arrays."
                   if isinstance(data, tuple) and data else f"an empty {type(data).__name__}."))
        elif isinstance(data, Mapping):
            # its "labels" taken as a loader's dict batches' are (label_key="auto"), not passed to the model
            inputs, labels = split_item({k: v for k, v in data.items()}, label_key, name) if all(
                is_array(v) for v in data.values()) else (data, None)
            self._columns = _columns(inputs, name)
            self.n_samples = batch_len(self._columns)
            if labels is not None:
                labels = as_labels(labels, f"{name}[{_label_name(data, label_key)!r}]")
                if self._y is not None and len(self._y) == len(labels):
                    check_agree(labels, self._y, name)
                self._y = labels if self._y is None else self._y
        elif is_array(data):
            self._array = numeric(data, name)
            if len(self._array.shape) == 0:
                raise DataError(f"{name} must have a first axis of samples; got a scalar.")
            self.n_samples = int(self._array.shape[0])
        else:
            self._source = _loader_source(data, batch_size, name)
            if self._source is None:
                if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
                    raise DataError(
                        f"{name} must be an array (NumPy or a framework's tensor), a pandas DataFrame, a dict of arrays, "
                        f"a dataset (with __len__ and __getitem__) or a framework's data loader; got {type(data).__name__}."
                    )
                self._source = _MapSource(data, batch_size)
            self.n_samples = self._source.n_samples  # None for a stream without a length: collected as it comes
        if self.n_samples == 0:
            raise DataError(f"{name} is empty: it holds no samples.")
        if self._y is not None and self.n_samples is not None and len(self._y) != self.n_samples:
            # one label for one sample given without its batch axis, whose first axis was then read as the samples
            one = " (one sample without its batch axis? pass it as a batch of one, x[None])" if len(self._y) == 1 else ""
            raise DataError(
                f"y has {len(self._y)} labels but {name} has {self.n_samples} samples; "
                f"they must have the same length{one}."
            )

    @property
    def unlabelled(self) -> bool:
        """Whether these batches surely carry no labels: one array (or table) in memory and no ``y`` (data that
        yields batches may carry them, known only once read)."""
        return self._array is not None and self._y is None

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
        return np.array(frame.to_numpy(dtype=np.float32, na_value=np.nan))  # our own, writable copy

    def __iter__(self) -> Iterator[Batch]:
        if self._array is not None or self._columns is not None:
            for start in range(0, self.n_samples, self.batch_size):
                stop = min(start + self.batch_size, self.n_samples)
                if self._array is not None:
                    inputs = self._array[start:stop]
                elif isinstance(self._columns, tuple):
                    inputs = tuple(v[start:stop] for v in self._columns)
                else:
                    inputs = {k: v[start:stop] for k, v in self._columns.items()}
                yield Batch(inputs, self._labels(start, stop), start)
            return
        start = 0
        for item in self._source:
            inputs, y = split_item(item, self.label_key, self.name)
            guessed = y is not None and self.label_key == "auto" and isinstance(item, (tuple, list))
            stop = start + batch_len(inputs)
            if y is not None:
                y = as_labels(y, f"the labels in the batches of {self.name}")
            if self._y is not None:
                given = self._labels(start, stop)
                if y is not None:
                    check_agree(y, given, self.name, start)
                y = given
            yield Batch(inputs, y, start, guessed)
            start = stop
        if start == 0:
            raise DataError(f"{self.name} is empty: it holds no samples.")
        if self._y is not None and start != len(self._y):
            raise DataError(f"y has {len(self._y)} labels but {self.name} yields {start} samples; "
                            "they must have the same length.")

    def _labels(self, start: int, stop: int) -> Optional[np.ndarray]:
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
    if isinstance(data, Mapping):
        return len(next(iter(data.values())))
    if is_array(data):
        return int(data.shape[0])
    if isinstance(data, tuple) and data and all(is_array(v) for v in data):
        return length(data[0])
    source = _loader_source(data, 1, "data")
    if source is not None and source.n_samples is not None:
        return source.n_samples
    return len(data)


def take(data, idx):
    """The samples at positions ``idx``, in the same form as ``data`` where it has one."""
    idx = np.asarray(idx, dtype=np.int64)
    if type(data).__module__.startswith("pandas") and hasattr(data, "iloc"):
        return data.iloc[idx]
    if isinstance(data, Mapping):
        return {k: take(v, idx) for k, v in data.items()}
    if is_array(data):
        return take_rows(data, idx)
    if isinstance(data, tuple) and data and all(is_array(v) for v in data):
        return tuple(take(v, idx) for v in data)
    source = _loader_source(data, 1, "data")
    if source is not None:
        return source.take(idx)
    return _Subset(data, idx)


def check_agree(found: np.ndarray, given: np.ndarray, name: str = "X", start: int = 0) -> None:
    """Labels read from the data (a batch's, a label column's) that differ from ``y=``'s are refused (one of the
    two is wrong, and taking either silently would fit or score against the wrong labels)."""
    if not np.array_equal(found, given):
        row = int(np.flatnonzero(found != given)[0])
        raise DataError(
            f"The labels in the batches of {name} differ from y= at row {start + row} (the batch says "
            f"{int(found[row])}, y says {int(given[row])}); give the labels one way only (y=, or in the batches, "
            "with label_key), or make them agree."
        )


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
        cols = {k: to_numpy(v) for k, v in inputs.items()}
        return [{k: v[i] for k, v in cols.items()} for i in range(batch_len(inputs))]
    if isinstance(inputs, (tuple, list)):
        cols = [to_numpy(v) for v in inputs]
        return [tuple(v[i] for v in cols) for i in range(batch_len(inputs))]
    return list(to_numpy(inputs))


def numeric(a, name: str):
    """``a`` as a batchable array: NumPy arrays checked for numbers (and copied once if read-only, so
    no framework warns about writing into them); other frameworks' tensors as they are."""
    if isinstance(a, np.ndarray) or not is_array(a):
        a = np.asarray(a)
        if a.dtype.kind == "V" and (a.dtype.name == "bfloat16" or a.dtype.name.startswith("float8")):
            a = a.astype(np.float32)  # ml_dtypes' narrow floats (JAX's NumPy bfloat16): float32 holds each exactly
        if a.dtype == object or a.dtype.kind in "USV":
            raise DataError(f"{name} holds {a.dtype} values; pass numbers (an array of a numeric dtype).")
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a)
    return a


def _columns(data: Mapping, name: str) -> dict:
    """A dict of per-sample arrays (model inputs by keyword), all of the same length."""
    if not data:
        raise DataError(f"{name} is an empty dict; give the model's inputs by name, e.g. "
                        "{'input_ids': ..., 'attention_mask': ...}.")
    cols = {}
    for key, value in data.items():
        t = numeric(value, f"{name}[{key!r}]")
        if len(t.shape) == 0:
            raise DataError(f"{name}[{key!r}] must have a first axis of samples; got a scalar.")
        cols[str(key)] = t
    lengths = {k: int(v.shape[0]) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"The arrays of {name} differ in length: {lengths}; each must hold one row per sample.")
    return cols


def split_item(item, label_key, name: str = "X"):
    """Split one batch from a loader into the model's inputs and the labels.

    ``label_key``: ``"auto"`` takes ``(input, label)`` pairs whose second element is a 1-D
    integer array, and the ``"labels"`` (or ``"label"``) entry of a dict; a tuple of three or
    more arrays must say which is the label. ``None``: every element goes to the model. An int
    (tuples) or a str (dicts): that element is the label, the others go to the model.
    """
    if is_array(item):
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
        _all_arrays(item.values(), name)
        if not item:
            raise DataError(f"The batches of {name} hold only the label {key!r}: no input is left for the model.")
        return item, label
    if isinstance(item, (tuple, list)) and item:
        parts = list(item)
        if len(parts) == 2 and isinstance(parts[0], Mapping) and is_array(parts[1]) and label_key in ("auto", 1, -1):
            inputs = dict(parts[0])  # (inputs by name, labels): a Dataset's usual items, collated
            _all_arrays(inputs.values(), name)
            if label_key != "auto" or _looks_like_labels(parts[1], batch_len(inputs)):
                return inputs, parts[1]
        _all_arrays(parts, name)
        if label_key == "auto":
            if len(parts) == 1:
                return parts[0], None
            if len(parts) == 2 and _looks_like_labels(parts[1], parts[0].shape[0]):
                return parts[0], parts[1]
            raise DataError(
                f"The batches of {name} are tuples of {len(parts)} tensors ("
                + ", ".join(f"{dtype_name(p)} {tuple(p.shape)}" for p in parts)
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


def _all_arrays(parts, name: str) -> None:
    for p in parts:
        if not is_array(p):
            raise DataError(f"The batches of {name} must hold tensors; found a {type(p).__name__}"
                            + (" (a pair of a dict of inputs and a 1-D array of labels is read as inputs and labels)"
                               if isinstance(p, Mapping) else "") + ".")


def _label_name(data: Mapping, label_key) -> str:
    """The key of ``data`` its labels were taken from."""
    return next((k for k in LABEL_NAMES if k in data), None) if label_key == "auto" else label_key


def _looks_like_labels(t, n: int) -> bool:
    return len(t.shape) == 1 and int(t.shape[0]) == n and is_integer(t)


def as_labels(y, what: str = "y") -> np.ndarray:
    """``y`` as a 1-D int64 NumPy array of class indices; text labels are refused, saying how to encode them."""
    a = to_numpy(y) if is_array(y) else np.asarray(y)
    if a.ndim != 1:
        raise DataError(f"{what} must be a 1-D sequence of class indices; got shape {tuple(a.shape)}.")
    if a.dtype == object or a.dtype.kind in "USV":
        examples = ", ".join(repr(str(v)) for v in list(dict.fromkeys(a.tolist()))[:3])
        raise DataError(
            f"{what} holds text labels ({examples}, ...); the model's classes are indices 0..n_classes-1: map each "
            "label to the index of the model's output it stands for (e.g. with the class list used in training)."
        )
    if a.dtype.kind == "f":
        if not np.array_equal(a, np.round(a)):
            raise DataError(f"{what} must hold integer class indices; got non-integer values.")
    elif a.dtype.kind not in "iu":
        raise DataError(f"{what} must hold integer class indices; got dtype {a.dtype}.")
    return a.astype(np.int64)


def check_label_range(labels: np.ndarray, n_classes: int, adapter=None) -> None:
    """Refuse labels outside the model's classes ``0..n_classes - 1``; where ``adapter`` read the logits from one of
    several outputs, the message says which, and how to pick another."""
    bad = np.unique(labels[(labels < 0) | (labels >= n_classes)])
    if bad.size:
        picked = getattr(adapter, "picked_output", "")
        raise DataError(
            f"y has classes the model does not have: {bad[:10].tolist()}; the model outputs "
            f"{n_classes} classes, so labels must be in 0..{n_classes - 1}."
            + (f" The model has several outputs and actclust reads the logits from {picked}: if the labels are "
               "another output's, refit with output=<function of the outputs that returns that output's logits>."
               if picked else "")
        )

