"""The Ray Data actors: the model loaded once, then the local capture or query pass on each Ray batch."""

from __future__ import annotations

import re
import sys

import numpy as np

from ...exceptions import ActClustError, CaptureError
from .config import ROW

__all__ = ["Worker", "worker_error"]

# ---------------------------------------------------------------------------- the actors
class Worker:
    """A Ray Data actor: the model loaded once, then the capture or query pass on each Ray batch."""

    def __init__(self, payload):
        import ray

        from ...adapters import adapt

        p = ray.get(payload[0]) if isinstance(payload, (list, tuple)) else payload
        self.p = p
        model = p["model"]
        torch = sys.modules.get("torch") if p["framework"] == "torch" else None
        if torch is None and p["framework"] == "torch":
            import torch
        if torch is not None:
            torch.set_num_threads(max(1, int(p["num_cpus"])))
            if ray.get_gpu_ids() and torch.cuda.is_available():
                model = model.to("cuda")
        self.adapter = adapt(model, p["output"])

    def __call__(self, batch: dict) -> dict:
        from ...capture import passes as _passes
        from ...capture.data import Batch
        from ...store.vectors import StoreWriter

        p = self.p
        rows = np.asarray(batch[ROW], dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        parts = []
        for a, b in local_batches(rows[order], p["batch_size"]):
            start, stop = int(rows[order][a]), int(rows[order][b - 1]) + 1
            inputs, labels = p["source"].read(batch, order[a:b], start, stop)
            parts.append(Batch(inputs, labels, start))
        batches = Parts(parts, p["source"].name, p["spec"].feature_names)
        out = {ROW: rows[order]}
        if p["state"] is None:  # the capture pass of fit
            with StoreWriter(None, "float32", batches.n_samples) as writer:
                c = _passes.capture(
                    self.adapter, batches, _passes.hooked(p["reducers"], p["normalize"], p["spatial_grid"],
                                                          random_state=p["random_state"]),
                    writer, keep_proba=p["keep_proba"], progress=False, spec=p["spec"], layouts=p["layouts"])
                vectors = writer.finish()
            labels = c.labels
            out.update({"pred": c.predictions, "classes": np.full(len(c.predictions), c.n_classes)})
            if c.proba is not None:
                out["proba"] = c.proba
        else:  # a query pass
            q = _passes.query(p["state"], self.adapter, batches, keep_vectors=p["keep_vectors"], progress=False)
            labels, vectors = q.labels, q.vectors or {}
            out.update({"pred": q.dnn_pred, "proba": q.dnn_proba, **{f"d/{l}": d for l, d in q.distances.items()}})
        if labels is not None:
            out["y"] = labels
        out.update({f"v/{k}": v for k, v in vectors.items()})
        return out


def local_batches(rows: np.ndarray, batch_size: int) -> list:
    """``(a, b)`` slices of sorted positions that are consecutive and within one local batch."""
    from ...store.vectors import runs

    cuts = np.flatnonzero(np.diff(rows // batch_size) != 0) + 1
    edges = [0, *cuts.tolist(), len(rows)]
    return [(a + s, a + e) for a, b in zip(edges[:-1], edges[1:]) for s, e in runs(rows[a:b])]


class Parts:
    """A list of :class:`~actclust.capture.data.Batch`, iterated as the local passes iterate ``Batches``."""

    def __init__(self, parts: list, name: str, feature_names):
        from ...capture.data import batch_len

        self.parts, self.name, self.feature_names = parts, name, feature_names
        self.n_samples = sum(batch_len(b.inputs) for b in parts)
        self.batch_size = max((batch_len(b.inputs) for b in parts), default=1)

    def __iter__(self):
        return iter(self.parts)



def worker_error(e: Exception) -> Exception:
    """The actclust error a worker raised (it names the rows and the model's error), as the same
    class, or a :class:`CaptureError` carrying Ray's message. Ray Data hands the driver a
    ``UserCodeException`` whose text holds the worker's traceback, not the exception itself."""
    from ... import exceptions

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


