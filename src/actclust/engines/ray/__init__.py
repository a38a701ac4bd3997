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


from .config import RAY_OPTIONS, ROW, RayConfig, check_options, is_dataset, require_ray
from .passes import Pass, capture, query

__all__ = ["ROW", "RAY_OPTIONS", "RayConfig", "Pass", "check_options", "is_dataset", "capture", "query", "require_ray"]
