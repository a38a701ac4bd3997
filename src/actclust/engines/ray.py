"""The Ray engine (``engine="ray"``): the capture and query passes as Ray Data ``map_batches`` on actors.

Each actor gets the model once (its constructor argument, put in Ray's object store once) and runs
today's passes (:func:`actclust.capture.passes.capture` and :func:`actclust.capture.passes.query`, with the
adapter's hooks and reducers) on the rows of each Ray batch. Every row carries its sample position
(:data:`ROW`), so the driver writes each returned batch at its samples' rows of the
:class:`~actclust.store.StoreWriter` whatever order the actors finish in; everything after the
capture (k-means on a sample, assignment, posteriors, scores, saving, retrieval, trust) is the
local code on the same store. Only the reduced vectors, predictions and labels travel back to the
driver, never the activation maps.

Inside an actor the rows of a Ray batch are cut at the batch boundaries of a local fit
(``position // batch_size``), so the model sees the batches it would see locally wherever Ray's
batches line up with them (they do for in-memory inputs, see :func:`_positions`).

Sample order: for in-memory inputs (arrays, tensors, tables, dicts, Datasets, DataLoaders) it is
their order, as locally. For a ``ray.data.Dataset`` it is the order of its rows with Ray's
``preserve_order`` on; the dataset is materialised once in Ray's object store (on the cluster, not
on the driver) to number its rows. Ray is imported only here, and only when a Ray pass runs.
"""

from __future__ import annotations

import numbers
import re
import types
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ..exceptions import ActClustError, CaptureError, DataError, ParameterError

__all__ = ["ROW", "RAY_OPTIONS", "Pass", "check_options", "is_dataset", "capture", "query", "require_ray"]

#: Column holding each row's sample position (0..n-1) in the datasets the Ray passes run on.
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

    def number(key, low, *, optional=True, integer=False):
        v = out[key]
        ok = (v is None and optional) or (isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= low
                                          and (not integer or isinstance(v, numbers.Integral)))
        if not ok:
            kind = "an int" if integer else "a number"
            raise ParameterError(f"ray_options[{key!r}] must be {'None or ' if optional else ''}{kind} >= {low}. "
                                 f"Got {v!r} instead.")
    number("concurrency", 1, integer=True)
    number("num_cpus", 0, optional=False)
    number("num_gpus", 0)
    cols = out["columns"]
    if cols is not None and not isinstance(cols, str) and not (
            isinstance(cols, (list, tuple)) and cols and all(isinstance(c, str) for c in cols)):
        raise ParameterError(f"ray_options['columns'] must be None, a column name or a list of them. Got {cols!r} instead.")
    return out


# ---------------------------------------------------------------------------- where rows come from
@dataclass
class _Memory:
    """In-memory inputs (array, tensor, table, dict, Dataset, DataLoader), shared with the actors
    through the object store; an actor reads the rows its Ray batch names."""

    data: object
    y: object
    label_key: object
    name: str

    def read(self, batch: dict, part: np.ndarray, start: int, stop: int):
        from ..capture.data import Batches, take

        data = self.data
        if type(data).__name__ == "DataLoader":  # keep the loader's collate_fn (padding, tokenising)
            from torch.utils.data import DataLoader, Subset

            data = DataLoader(Subset(data.dataset, list(range(start, stop))), batch_size=stop - start,
                              collate_fn=data.collate_fn)
        else:
            data = take(data, np.arange(start, stop))
        y = None if self.y is None else np.array(self.y[start:stop])  # a copy: the shared one is read-only
        (b,) = list(Batches(data, batch_size=stop - start, y=y, name=self.name, label_key=self.label_key))
        return b.inputs, b.labels


@dataclass
class _Columns:
    """The columns of a Ray Dataset as the model's inputs: ``form`` is ``"tensor"`` (one column),
    ``"item"`` (one column of a torch Dataset's items, collated), ``"table"`` (scalar numeric columns
    stacked into one float32 matrix, as a DataFrame) or ``"dict"`` (inputs by keyword)."""

    inputs: list
    label: Optional[str]
    form: str
    label_key: object
    name: str

    def read(self, batch: dict, part: np.ndarray, start: int, stop: int):
        import torch

        from ..capture.data import _tensor, as_labels, split_item

        labels = None if self.label is None else as_labels(np.asarray(batch[self.label][part]))
        if self.form == "item":
            from torch.utils.data import default_collate

            return split_item(default_collate(list(batch[self.inputs[0]][part])), self.label_key, self.name)
        cols = {c: np.asarray(batch[c][part]) for c in self.inputs}
        if self.form == "tensor":
            return _tensor(cols[self.inputs[0]], self.name), labels
        if self.form == "table":
            return torch.from_numpy(np.stack([cols[c] for c in self.inputs], 1).astype(np.float32)), labels
        return {c: _tensor(v, f"{self.name}[{c!r}]") for c, v in cols.items()}, labels


def _columns(schema_names: list, sample: dict, label_key, options: dict, name: str) -> _Columns:
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
        return _Columns(inputs, label, form, label_key, name)
    if inputs and all(k == "scalar" for k in kinds.values()):
        return _Columns(inputs, label, "table", label_key, name)
    if inputs and all(k in ("scalar", "tensor") for k in kinds.values()) and any(k == "tensor" for k in kinds.values()):
        return _Columns(inputs, label, "dict", label_key, name)
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


# ---------------------------------------------------------------------------- the actors
class _Worker:
    """A Ray Data actor: the model loaded once, then the capture or query pass on each Ray batch."""

    def __init__(self, payload):
        import ray
        import torch

        from ..adapters import adapt

        p = ray.get(payload[0]) if isinstance(payload, (list, tuple)) else payload
        self.p = p
        torch.set_num_threads(max(1, int(p["num_cpus"])))
        model = p["model"]
        if ray.get_gpu_ids() and torch.cuda.is_available():
            model = model.to("cuda")
        self.adapter = adapt(model, p["output"])

    def __call__(self, batch: dict) -> dict:
        from ..capture import passes as _passes
        from ..capture.data import Batch
        from ..store.vectors import StoreWriter

        p = self.p
        rows = np.asarray(batch[ROW], dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        parts = []
        for a, b in _local_batches(rows[order], p["batch_size"]):
            start, stop = int(rows[order][a]), int(rows[order][b - 1]) + 1
            inputs, labels = p["source"].read(batch, order[a:b], start, stop)
            parts.append(Batch(inputs, labels, start))
        batches = _Parts(parts, p["source"].name, p["spec"].feature_names)
        out = {ROW: rows[order]}
        if p["state"] is None:  # the capture pass of fit
            with StoreWriter(None, "float32", batches.n_samples) as writer:
                pred, proba, labels, n_classes, _ = _passes.capture(
                    self.adapter, batches, _passes.hooked(p["reducers"], p["normalize"], p["spatial_grid"],
                                                          random_state=p["random_state"]),
                    writer, keep_proba=p["keep_proba"], progress=False, spec=p["spec"])
                vectors = writer.finish()
            out.update({"pred": pred, "classes": np.full(len(pred), n_classes)})
            if proba is not None:
                out["proba"] = proba
        else:  # a query pass
            q = _passes.query(p["state"], self.adapter, batches, keep_vectors=p["keep_vectors"], progress=False)
            labels, vectors = q.labels, q.vectors or {}
            out.update({"pred": q.dnn_pred, "proba": q.dnn_proba, **{f"d/{l}": d for l, d in q.distances.items()}})
        if labels is not None:
            out["y"] = labels
        out.update({f"v/{k}": v for k, v in vectors.items()})
        return out


def _local_batches(rows: np.ndarray, batch_size: int) -> list:
    """``(a, b)`` slices of sorted positions that are consecutive and within one local batch."""
    from ..store.vectors import runs

    cuts = np.flatnonzero(np.diff(rows // batch_size) != 0) + 1
    edges = [0, *cuts.tolist(), len(rows)]
    return [(a + s, a + e) for a, b in zip(edges[:-1], edges[1:]) for s, e in runs(rows[a:b])]


class _Parts:
    """A list of :class:`~actclust.capture.data.Batch`, iterated as the local passes iterate ``Batches``."""

    def __init__(self, parts: list, name: str, feature_names):
        from ..capture.data import batch_len

        self.parts, self.name, self.feature_names = parts, name, feature_names
        self.n_samples = sum(batch_len(b.inputs) for b in parts)
        self.batch_size = max((batch_len(b.inputs) for b in parts), default=1)

    def __iter__(self):
        return iter(self.parts)


# ---------------------------------------------------------------------------- the driver
class Pass:
    """A Ray pass over ``X``: its rows numbered, its input spec read on the driver, the actors' options.

    ``reducers`` (fit) are checked first: those that need a fitting pass in order cannot run on Ray.
    """

    def __init__(self, ac, adapter, X, y, spec=None, reducers=None):
        from ..capture.data import Batches
        from ..capture.passes import spec_of

        fitted = [l for l, r in (reducers or {}).items() if r.needs_fit]
        if fitted:
            raise ParameterError(
                f"The reducers of {fitted} need a fitting pass over the data in order (e.g. 'pca:d'), which "
                "engine='ray' does not run; use 'mean', 'max', 'grid:g' or 'random:d', or engine='local'.")
        ray = require_ray()
        if not ray.is_initialized():
            ray.init()
        self.ray, self.ac, self.options = ray, ac, check_options(ac.ray_options)
        self.name = "X"
        if is_dataset(X):
            self.ds, self.n = _numbered(ray, X, ac.batch_size)
            if y is not None and len(y) != self.n:
                raise DataError(f"y has {len(y)} labels but X has {self.n} rows; they must have the same length.")
            sample = self.ds.take_batch(2, batch_format="numpy")
            self.source = _columns(list(self.ds.schema().names), sample, ac.label_key, self.options, self.name)
            first_rows = np.arange(len(sample[ROW]))
            inputs, _ = self.source.read(sample, first_rows, 0, len(first_rows))
            feature_names = self.source.inputs if self.source.form == "table" else None
            self.y = None if y is None else np.asarray(y)
        else:
            batches = Batches(X, batch_size=ac.batch_size, y=y, name=self.name, label_key=ac.label_key)
            if batches.n_samples is None:
                raise DataError("engine='ray' needs data whose length is known (an IterableDataset has none); "
                                "pass a ray.data.Dataset or a map-style Dataset.")
            self.n = batches.n_samples
            shared = X.detach().cpu().numpy() if type(X).__name__ == "Tensor" else X  # NumPy: zero-copy in the store
            self.source = _Memory(shared, None if y is None else np.asarray(y), ac.label_key, self.name)
            inputs, feature_names = next(iter(batches)).inputs, batches.feature_names
            # Blocks of whole local batches, already in the object store: no task upstream of the actors
            # (a task would wait for a CPU that the actors hold).
            import pyarrow as pa

            step = _chunk(self.n, ac.batch_size)
            self.ds = ray.data.from_arrow([pa.table({ROW: np.arange(s, min(s + step, self.n))})
                                           for s in range(0, self.n, step)])
            self.y = None
        self.spec = spec if spec is not None else spec_of(inputs, feature_names)
        if spec is not None:
            spec.check(spec_of(inputs, feature_names), self.name)
        adapter.check_inputs(inputs, self.name)

    def run(self, adapter, payload: dict, desc: str):
        """Yield the actors' output batches (dicts of arrays, each with :data:`ROW`), in completion order."""
        from tqdm.auto import tqdm

        ray, o = self.ray, self.options
        gpus = ray.cluster_resources().get("GPU", 0)
        num_gpus = o["num_gpus"] if o["num_gpus"] is not None else (1 if gpus else 0)
        slots = (gpus // num_gpus) if num_gpus else (ray.cluster_resources().get("CPU", 1) // max(o["num_cpus"], 1e-9))
        size = o["concurrency"] or max(1, int(slots))
        # The module itself (no DataParallel or compile wrapper: one actor runs one device), or the adapter.
        model, output = (adapter.inner, self.ac.output) if hasattr(adapter, "inner") else (adapter, None)
        payload = {**payload, "model": model, "output": output, "source": self.source, "spec": self.spec,
                   "batch_size": self.ac.batch_size, "num_cpus": o["num_cpus"]}
        ref = ray.put(payload)  # the model goes to the object store once; each actor reads it at start
        out = self.ds.map_batches(
            _Worker, fn_constructor_args=([ref],), batch_size=self.ac.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=o["num_cpus"], num_gpus=num_gpus)
        # An actor that dies (killed, out of memory, node lost) is restarted and its batch run again:
        # Ray Data's defaults for actor pools (unlimited restarts and retries).
        self.info = {"name": "ray", "actors": size, "num_gpus_per_actor": num_gpus, "batches": 0, "out_of_order": 0}
        highest = -1
        bar = tqdm(total=self.n, desc=desc, disable=not self.ac.progress, leave=False)
        ctx = out.context  # a copy made with self.ds, which is ours: the user's context is left alone
        ctx.enable_progress_bars = False  # ours, on the driver, counts the samples written
        ctx.print_on_execution_start = self.ac.progress
        ctx.execution_options.preserve_order = False  # rows carry their positions
        try:
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                rows = batch[ROW]
                self.info["batches"] += 1
                self.info["out_of_order"] += int(len(rows) > 0 and rows.min() < highest)
                highest = max(highest, int(rows.max(initial=-1)))
                bar.update(len(rows))
                yield batch
        except ActClustError:
            raise
        except Exception as e:  # a worker's error, wrapped by Ray: name the batch and the worker's error
            raise _worker_error(e) from e
        finally:
            bar.close()
            del ref


def _worker_error(e: Exception) -> Exception:
    """The actclust error a worker raised (it names the rows and the model's error), as the same
    class, or a :class:`CaptureError` carrying Ray's message. Ray Data hands the driver a
    ``UserCodeException`` whose text holds the worker's traceback, not the exception itself."""
    from .. import exceptions

    seen, todo = set(), [e]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        if isinstance(c, ActClustError) and type(c).__module__ == "actclust.exceptions":
            return type(c)(f"{c} (on a Ray worker)")
        todo += [getattr(c, "cause", None), c.__cause__, c.__context__]
    found = re.findall(r"actclust\.exceptions\.(\w+): (.+)", str(e))
    if found:
        name, message = found[-1]
        kind = getattr(exceptions, name, CaptureError)
        return (kind if isinstance(kind, type) and issubclass(kind, ActClustError) else CaptureError)(
            f"{message} (on a Ray worker)")
    return CaptureError(f"The Ray pass failed: {type(e).__name__}: {str(e)[-3000:]}")


def _numbered(ray, ds, batch_size: int):
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
    step = _chunk(n, batch_size)
    numbered = []
    for block, start, stop in zip(blocks, offsets[:-1].tolist(), offsets[1:].tolist()):
        cuts = [start, *range((start // step + 1) * step, stop, step), stop]
        numbered += [_number.remote(block, start, a - start, b - start) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return ray.data.from_arrow_refs(numbered), n


def _chunk(n: int, batch_size: int) -> int:
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


# ---------------------------------------------------------------------------- the passes
def capture(run: Pass, adapter, reducers: dict, writer, *, keep_proba: bool):
    """The capture pass of ``fit`` on Ray: vectors into ``writer`` by sample position; returns what
    :func:`actclust.capture.passes.capture` returns. ``run.info`` then holds the engine's facts for ``fit_info``."""
    from ..capture.data import Collector
    from ..capture.passes import _announce

    ac = run.ac
    col, classes, has_y = Collector(run.n), set(), []
    payload = {"state": None, "reducers": reducers, "normalize": ac.normalize, "spatial_grid": ac.spatial_grid,
               "random_state": ac.random_state, "keep_proba": keep_proba}
    for i, batch in enumerate(run.run(adapter, payload, "capturing activations (ray)")):
        rows = batch[ROW]
        vectors = {k[2:]: batch[k] for k in batch if k.startswith("v/")}
        if i == 0:
            _announce(run.n, {k: v.shape[1] for k, v in vectors.items()}, writer, ac.progress)
        writer.add(vectors, rows=rows)
        col.put("pred", batch["pred"], rows)
        classes.update(np.unique(batch["classes"]).tolist())
        if len(classes) > 1:
            raise DataError(f"The model output {sorted(classes)} classes on different batches of X.")
        if keep_proba:
            col.put("proba", batch["proba"], rows)
        has_y.append("y" in batch)
        if "y" in batch:
            col.put("y", batch["y"], rows)
    labels = run.y if run.y is not None else (col.get("y") if all(has_y) else None)
    return col.get("pred"), col.get("proba") if keep_proba else None, labels, classes.pop(), run.spec


def query(state, ac, adapter, X, y, *, keep_vectors: bool):
    """A query pass on Ray over a ``ray.data.Dataset``: the same :class:`~actclust.state.Query` as locally."""
    from ..capture.data import Collector
    from ..state import Query
    from ..store.vectors import VectorStore

    run = Pass(ac, adapter, X, y, spec=state.input_spec)
    # The actors need the centres and reducers, not the training vectors: zero rows of each width.
    light = replace(state, train_vectors=VectorStore({k: np.zeros((0, v.shape[1]), np.float32)
                                                      for k, v in state.train_vectors.items()}),
                    train_predictions=np.zeros(0, np.int64), train_labels=None, train_score={}, fit_info={}, cache={})
    col, has_y = Collector(run.n), []
    for batch in run.run(adapter, {"state": light, "keep_vectors": keep_vectors}, "explaining (ray)"):
        rows = batch[ROW]
        for k in batch:
            if k != ROW and k != "y":
                col.put(k, batch[k], rows)
        has_y.append("y" in batch)
        if "y" in batch:
            col.put("y", batch["y"], rows)
    keys = state.layers + [k for k in state.train_vectors if k not in state.layers]
    return Query(dnn_pred=col.get("pred"), dnn_proba=col.get("proba"),
                 distances={l: col.get(f"d/{l}") for l in state.layers},
                 vectors={k: col.get(f"v/{k}") for k in keys} if keep_vectors else None,
                 labels=run.y if run.y is not None else (col.get("y") if all(has_y) else None))

