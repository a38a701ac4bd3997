"""The driver's side of a Ray pass: :class:`Pass` (rows numbered, the actors started), and the capture
pass of ``fit`` and the query pass of the analyses on it."""

from __future__ import annotations

import contextlib
import gc

from dataclasses import replace

import numpy as np

from ...exceptions import ActClustError, DataError, ParameterError
from ...capture.arrays import is_torch, to_numpy
from .config import ROW, RayConfig, is_dataset, require_ray
from .sources import Memory, chunk, columns, numbered, reordering
from .workers import Worker, worker_error

__all__ = ["Pass", "capture", "query"]

# ---------------------------------------------------------------------------- the driver
class Pass:
    """A Ray pass over ``X``: its rows numbered, its input spec read on the driver, the actors' options.

    ``reducers`` (fit) are checked first: those that need a fitting pass in order cannot run on Ray.
    """

    def __init__(self, config: RayConfig, adapter, X, y, spec=None, reducers=None):
        from ...capture.data import Batches
        from ...capture.passes import spec_of

        fitted = [l for l, r in (reducers or {}).items() if r.needs_fit]
        if fitted:
            raise ParameterError(
                f"The reducers of {fitted} need a fitting pass over the data in order (e.g. 'pca:d'), which "
                "engine='ray' does not run; use 'mean', 'max', 'grid:g' or 'random:d', or engine='local'.")
        ray = require_ray()
        if not ray.is_initialized():
            ray.init()
        ac = config
        self.ray, self.config, self.options = ray, config, config.options
        self.name = "X"
        if is_dataset(X):
            step = None if y is None else reordering(X)
            if step is not None:  # the rows come in another order than y's: each label would go to another row
                raise DataError(
                    f"X is a ray.data.Dataset whose plan reorders its rows ({step}), so the labels given apart as y= "
                    "would belong to other rows. Keep the labels in a column of the Dataset (label_key names it) "
                    "instead of y=, or reorder after adding them.")
            self.ds, self.n = numbered(ray, X, ac.batch_size)
            if y is not None and len(y) != self.n:
                raise DataError(f"y has {len(y)} labels but X has {self.n} rows; they must have the same length.")
            sample = self.ds.take_batch(min(self.n, 256), batch_format="numpy")
            self.source = columns(list(self.ds.schema().names), sample, ac.label_key, self.options, self.name)
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
            shared = to_numpy(X) if is_torch(X) else X  # NumPy: zero-copy in the store
            self.source = Memory(shared, None if y is None else np.asarray(y), ac.label_key, self.name)
            inputs, feature_names = next(iter(batches)).inputs, batches.feature_names
            # Blocks of whole local batches, already in the object store: no task upstream of the actors
            # (a task would wait for a CPU that the actors hold).
            import pyarrow as pa

            step = chunk(self.n, ac.batch_size)
            self.ds = ray.data.from_arrow([pa.table({ROW: np.arange(s, min(s + step, self.n))})
                                           for s in range(0, self.n, step)])
            self.y = None
        self.first = inputs  # the first rows, read on the driver: the layouts and input statistics come from them
        self.spec = spec if spec is not None else spec_of(inputs, feature_names)
        if spec is not None:
            spec.check(spec_of(inputs, feature_names), self.name)
        adapter.check_inputs(inputs, self.name)

    def sample(self, size: int = 2048):
        """Up to ``size`` inputs spread over the data, read on the driver (for the input statistics)."""
        if isinstance(self.source, Memory):
            from ...capture.data import Batches, take

            idx = np.unique(np.linspace(0, self.n - 1, min(self.n, size)).astype(np.int64))
            part = take(self.source.data, idx)
            return next(iter(Batches(part, batch_size=len(idx), label_key=self.config.label_key, name=self.name))).inputs
        sample = self.ds.take_batch(min(self.n, size), batch_format="numpy")
        return self.source.read(sample, np.arange(len(sample[ROW])), 0, len(sample[ROW]))[0]

    def run(self, adapter, payload: dict, desc: str):
        """Yield the actors' output batches (dicts of arrays, each with :data:`ROW`), in completion order."""
        from tqdm.auto import tqdm

        ray, o = self.ray, self.options
        gpus, cpus = ray.cluster_resources().get("GPU", 0), ray.cluster_resources().get("CPU", 1)
        num_gpus = o["num_gpus"] if o["num_gpus"] is not None else (1 if gpus else 0)
        if o["num_cpus"] > cpus or num_gpus > gpus:  # an actor no node can hold: the fit waited for it forever
            raise ParameterError(
                f"ray_options asks {o['num_cpus']} CPU(s) and {num_gpus} GPU(s) per actor, but the Ray cluster has "
                f"{cpus:g} CPU(s) and {gpus:g} GPU(s) in all: ask at most that (ray_options={{'num_cpus': ...}}).")
        slots = (gpus // num_gpus) if num_gpus else (cpus // o["num_cpus"])
        size = o["concurrency"] or max(1, int(slots))
        # The module itself (no DataParallel or compile wrapper: one actor runs one device), or the adapter.
        model, output = (adapter.inner, adapter.output) if hasattr(adapter, "inner") else (adapter, None)
        payload = {**payload, "model": model, "output": output, "framework": adapter.framework,
                   "source": self.source, "spec": self.spec,
                   "batch_size": self.config.batch_size, "num_cpus": o["num_cpus"]}
        ref = ray.put(payload)  # the model goes to the object store once; each actor reads it at start
        out = self.ds.map_batches(
            Worker, fn_constructor_args=([ref],), batch_size=self.config.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=o["num_cpus"], num_gpus=num_gpus)
        # An actor that dies (killed, out of memory, node lost) is restarted and its batch run again:
        # Ray Data's defaults for actor pools (unlimited restarts and retries).
        self.info = {"name": "ray", "actors": size, "num_gpus_per_actor": num_gpus, "batches": 0, "out_of_order": 0}
        highest = -1
        bar = tqdm(total=self.n, desc=desc, disable=not self.config.progress, leave=False)
        ctx = out.context  # a copy made with self.ds, which is ours: the user's context is left alone
        ctx.enable_progress_bars = False  # ours, on the driver, counts the samples written
        ctx.print_on_execution_start = self.config.progress
        ctx.execution_options.preserve_order = False  # rows carry their positions
        batches = iter(out.iter_batches(batch_size=None, batch_format="numpy"))  # a generator, closed below
        failure, finished = None, False
        try:
            for batch in batches:
                rows = batch[ROW]
                self.info["batches"] += 1
                self.info["out_of_order"] += int(len(rows) > 0 and rows.min() < highest)
                highest = max(highest, int(rows.max(initial=-1)))
                bar.update(len(rows))
                yield batch
            finished = True
        except Exception as e:  # a worker's error, wrapped by Ray (an actclust error's class too): name the batch and
            if type(e).__module__ == "actclust.exceptions":  # the worker's error (its text, not Ray's exception: see
                raise  # below); one of ours raised here as it is
            failure = worker_error(e)
        finally:
            bar.close()
            # A pass that failed, was interrupted or was abandoned by its caller hands its actors' CPUs back now.
            # Ray Data's objects hold them through reference cycles: left to the garbage collector (and kept alive by
            # a traceback holding Ray's exception, as a notebook keeps its last one), every other Ray job waited for
            # the cluster's CPUs. So: the iterator closed, nothing of Ray's kept, a collection.
            getattr(batches, "close", lambda: None)()
            del ref, batches, out
            if not finished:
                gc.collect()
        if failure is not None:
            raise failure



# ---------------------------------------------------------------------------- the passes
def capture(run: Pass, adapter, reducers: dict, writer, *, keep_proba: bool):
    """The capture pass of ``fit`` on Ray: vectors into ``writer`` by sample position; returns what
    :func:`actclust.capture.passes.capture` returns. ``run.info`` then holds the engine's facts for ``fit_info``.

    The layouts and the input statistics come from the first rows, read on the driver (one small
    local pass), so every actor reads each layer the same way."""
    from ...capture import passes
    from ...capture.data import Batch
    from ...capture.stats import InputStats
    from ...store import Collector, StoreWriter
    from .workers import Parts

    ac = run.config
    hooked = passes.hooked(reducers, ac.normalize, ac.spatial_grid, random_state=ac.random_state)
    probe = Parts([Batch(run.first, None, 0)], run.name, run.spec.feature_names)
    with StoreWriter(None, "float32", probe.n_samples) as scratch:
        first = passes.capture(adapter, probe, hooked, scratch, keep_proba=False, progress=False, spec=run.spec)
    stats = InputStats(adapter.input_channel_axis)
    stats.add(run.sample())
    col, classes, has_y = Collector(run.n), set(), []
    payload = {"state": None, "reducers": reducers, "normalize": ac.normalize, "spatial_grid": ac.spatial_grid,
               "random_state": ac.random_state, "keep_proba": keep_proba, "layouts": first.layouts}
    with contextlib.closing(run.run(adapter, payload, "capturing activations (ray)")) as stream:  # closed on errors too
        for i, batch in enumerate(stream):
            rows = batch[ROW]
            vectors = {k[2:]: batch[k] for k in batch if k.startswith("v/")}
            if i == 0:
                passes.announce(run.n, {k: v.shape[1] for k, v in vectors.items()}, writer, ac.progress)
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
    return passes.Captured(col.get("pred"), col.get("proba") if keep_proba else None, _labels(run, col, has_y),
                           classes.pop(), run.spec, first.layouts, stats.to_dict())


def query(state, config: RayConfig, adapter, X, y, *, keep_vectors: bool):
    """A query pass on Ray over a ``ray.data.Dataset``: the same :class:`~actclust.state.Query` as locally."""
    from ...state import Query
    from ...store import Collector
    from ...store.vectors import VectorStore

    run = Pass(config, adapter, X, y, spec=state.input_spec)
    # The actors need the centres and reducers, not the training vectors: zero rows of each width.
    light = replace(state, train_vectors=VectorStore({k: np.zeros((0, v.shape[1]), np.float32)
                                                      for k, v in state.train_vectors.items()}),
                    train_predictions=np.zeros(0, np.int64), train_labels=None, train_score={}, fit_info={}, cache={})
    col, has_y = Collector(run.n), []
    with contextlib.closing(run.run(adapter, {"state": light, "keep_vectors": keep_vectors},
                                    "running the model on the inputs (ray)")) as stream:
        for batch in stream:
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
                 labels=_labels(run, col, has_y))


def _labels(run: Pass, col, has_y: list):
    """The pass's labels: ``y=``'s, or those of every batch (a label column); where both are given they must
    agree, as in a local pass (a label column was silently ignored for ``y=``)."""
    from ...capture.data import check_agree

    found = col.get("y") if has_y and all(has_y) else None
    if run.y is not None and found is not None:
        check_agree(found, np.asarray(run.y), run.name)
    return run.y if run.y is not None else found

