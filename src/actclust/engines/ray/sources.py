"""Where the rows of a Ray pass come from: in-memory data shared through the object store, or the
columns of a ``ray.data.Dataset``, numbered by sample position."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...exceptions import DataError, ParameterError
from .config import ROW, require_ray

__all__ = ["Memory", "Columns", "columns", "numbered", "chunk", "reordering"]

_LABEL_COLUMNS = ("label", "labels", "y")  # label columns taken with label_key="auto"

# ---------------------------------------------------------------------------- where rows come from
@dataclass
class Memory:
    """In-memory inputs (array, tensor, table, dict, Dataset, DataLoader), shared with the actors
    through the object store; an actor reads the rows its Ray batch names."""

    data: object
    y: object
    label_key: object
    name: str

    def read(self, batch: dict, part: np.ndarray, start: int, stop: int):
        from ...capture.data import Batches, take

        data = self.data
        if type(data).__name__ == "DataLoader":  # keep the loader's collate_fn (padding, tokenising)
            from ...adapters.torch_data import rows_of

            data = rows_of(data, start, stop)
        else:
            data = take(data, np.arange(start, stop))
        y = None if self.y is None else np.array(self.y[start:stop])  # a copy: the shared one is read-only
        (b,) = list(Batches(data, batch_size=stop - start, y=y, name=self.name, label_key=self.label_key))
        return b.inputs, b.labels


@dataclass
class Columns:
    """The columns of a Ray Dataset as the model's inputs: ``form`` is ``"tensor"`` (one column),
    ``"item"`` (one column of a torch Dataset's items, collated), ``"table"`` (scalar numeric columns
    stacked into one float32 matrix, as a DataFrame) or ``"dict"`` (inputs by keyword)."""

    inputs: list
    label: Optional[str]
    form: str
    label_key: object
    name: str

    def read(self, batch: dict, part: np.ndarray, start: int, stop: int):
        from ...capture.data import as_labels, collate, numeric, split_item

        labels = None if self.label is None else as_labels(np.asarray(batch[self.label][part]))
        if self.form == "item":
            inputs, labels = split_item(collate(list(batch[self.inputs[0]][part])), self.label_key, self.name)
            return inputs, None if labels is None else as_labels(labels)
        cols = {c: np.asarray(batch[c][part]) for c in self.inputs}
        if self.form == "tensor":
            return numeric(cols[self.inputs[0]], self.name), labels
        if self.form == "table":
            return np.stack([cols[c] for c in self.inputs], 1).astype(np.float32), labels
        return {c: numeric(v, f"{self.name}[{c!r}]") for c, v in cols.items()}, labels


def columns(schema_names: list, sample: dict, label_key, options: dict, name: str) -> Columns:
    """Decide, from the column names and a small sample batch, which columns feed the model."""
    names = [c for c in schema_names if c != ROW]
    found = f"{name} (a Ray Dataset) has columns {names}"
    if isinstance(label_key, bool) or not (label_key is None or isinstance(label_key, str)):
        raise ParameterError(f"{found}, so label_key must name a column, or be 'auto' or None. Got {label_key!r} instead.")
    cols = options["columns"]
    cols = None if cols is None else [cols] if isinstance(cols, str) else list(cols)
    label = None
    if label_key == "auto":
        label = next((c for c in _LABEL_COLUMNS if c in names and (cols is None or c not in cols)), None)
    elif label_key is not None:
        if label_key not in names:
            raise DataError(f"label_key={label_key!r} is not a column: {found}.")
        label = label_key
    if cols is not None:
        unknown = [c for c in cols if c not in names]
        if unknown:
            raise DataError(f"ray_options['columns'] names {unknown}, which are not columns: {found}.")
    inputs = cols if cols is not None else [c for c in names if c != label]
    kinds = {c: _kind(np.asarray(sample[c])) for c in inputs}
    if len(inputs) == 1 and kinds[inputs[0]] in ("tensor", "scalar", "object"):
        form = "item" if kinds[inputs[0]] == "object" else "tensor"
        if form == "item":
            label = None  # the items carry their labels; split_item takes them by label_key
        return Columns(inputs, label, form, label_key, name)
    if inputs and all(k == "scalar" for k in kinds.values()):
        return Columns(inputs, label, "table", label_key, name)
    if inputs and all(k in ("scalar", "tensor") for k in kinds.values()) and any(k == "tensor" for k in kinds.values()):
        return Columns(inputs, label, "dict", label_key, name)
    raise DataError(
        f"{found} (label column: {label!r}); actclust cannot tell which are the model's inputs "
        f"({', '.join(f'{c}: {k}' for c, k in kinds.items()) or 'none left'}). Say which with "
        "ray_options={'columns': 'image'} (one input), a list of numeric columns (a table, or inputs by keyword), "
        "and the label with label_key='<column>' or None."
    )


def _kind(a: np.ndarray) -> str:
    if a.dtype == object:
        return "text" if len(a) and isinstance(a[0], (str, bytes)) else "object"
    if a.dtype.kind not in "biuf":
        return "text"
    return "scalar" if a.ndim == 1 else "tensor"



def numbered(ray, ds, batch_size: int):
    """``ds`` with a :data:`ROW` column of sample positions, in Ray's ``preserve_order`` order of its rows,
    and its length. The dataset is materialised once in the object store to count the rows of each block."""
    ctx = ds.context
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        blocks = ds.to_arrow_refs()
    finally:
        ctx.execution_options.preserve_order = saved
    counts = ray.get([_count.remote(b) for b in blocks])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    if n == 0:
        raise DataError("X is empty: it holds no samples.")
    # Cut at multiples of the chunk (whole local batches): several blocks for the actors to share
    # (a block is one actor task), and Ray's batches then fall on the local batches' boundaries.
    step = chunk(n, batch_size)
    numbered = []
    for block, start, stop in zip(blocks, offsets[:-1].tolist(), offsets[1:].tolist()):
        cuts = [start, *range((start // step + 1) * step, stop, step), stop]
        numbered += [_number.remote(block, start, a - start, b - start) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return ray.data.from_arrow_refs(numbered), n


# Ray Data operators that give a Dataset's rows in another order than its source's
_REORDERING = {"RandomShuffle": "random_shuffle", "RandomizeBlocks": "randomize_block_order", "Sort": "sort",
               "Aggregate": "groupby"}


def reordering(ds) -> Optional[str]:
    """The first step of ``ds``'s plan that reorders its rows (``"random_shuffle"``, ``"sort"``...), or None.
    Read from Ray Data's logical plan, which is not public API: a plan it cannot read gives None."""
    try:
        todo, seen = [ds._logical_plan.dag], set()
        while todo:
            op = todo.pop()
            if id(op) in seen:
                continue
            seen.add(id(op))
            name = type(op).__name__
            if name in _REORDERING:
                return _REORDERING[name]
            if name == "Repartition" and getattr(op, "keys", None):  # groupby's hash partitions
                return "groupby"
            if name == "Repartition" and getattr(op, "shuffle", False):
                return "repartition(shuffle=True)"
            if name.startswith("Read") and getattr(getattr(op, "scanner", None), "shuffle", None) is not None:
                return "read with shuffle="  # read_parquet(..., shuffle="files")
            todo.extend(op.input_dependencies)
    except AttributeError:  # another Ray version's plan: not checked
        return None
    return None


def chunk(n: int, batch_size: int) -> int:
    """Rows per block of a Ray pass: whole local batches, up to 16, at least about 8 blocks when ``n`` allows."""
    return batch_size * max(1, min(16, n // (8 * batch_size)))


def _remote(fn):
    """``fn`` as a Ray task, made on first use (Ray is imported only when a Ray pass runs)."""
    made = {}

    class Lazy:
        def remote(self, *args):
            if "f" not in made:
                # One CPU each, as Ray's default: tasks without one would start a worker process each, all at once.
                # A copy of fn, which Ray pickles by value (it is not the module's attribute): the
                # task's worker then imports NumPy and PyArrow, not actclust (torch: seconds).
                copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
                made["f"] = require_ray().remote(num_cpus=1)(copy)
            return made["f"].remote(*args)
    return Lazy()


def _count_rows(table) -> int:
    return table.num_rows


def _add_positions(table, offset: int, a: int, b: int):
    """Rows ``a:b`` of a block whose first row is sample ``offset``, with their positions."""
    import pyarrow as pa

    table = table.slice(a, b - a)
    if ROW in table.column_names:
        table = table.drop_columns([ROW])
    return table.append_column(ROW, pa.array(np.arange(offset + a, offset + b, dtype=np.int64)))


_count, _number = _remote(_count_rows), _remote(_add_positions)


