"""The host backend: NumPy, scikit-learn's k-means++ and faiss on the CPU (what actclust always computed)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..store.vectors import chunk_rows, iter_rows, runs
from .base import Backend

__all__ = ["HostBackend", "CHUNK"]

#: Rows per chunk when distances are computed over a (possibly memory-mapped) array.
CHUNK = 8192
#: Training rows per chunk of the exact search.
ROWS = 8192
#: Rows at least this wide are left out of a chunk of the exact search in place (see ``_kept_rows``).
IN_PLACE_WIDTH = 1024


class HostBackend(Backend):
    """NumPy, scikit-learn and faiss on the CPU: memory ``O(chunk x d)`` for every step."""

    name = "host"

    def sq_distances(self, X, centers, transform=None):
        c = np.ascontiguousarray(centers, dtype=np.float32)
        c_sq = (c * c).sum(1)[None, :]
        out = np.empty((len(X), len(c)), dtype=np.float32)
        # Temporaries stay O(chunk x d), not O(n x d); a memory-mapped X (store on disk) is read in chunks.
        for start, x in iter_rows(X, CHUNK):
            x = transform(x) if transform is not None else x
            d = np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * (x @ c.T) + c_sq
            out[start:start + len(x)] = np.maximum(d, 0.0)
        return out

    def kmeans_plusplus(self, X, k, seed):
        from sklearn.cluster import kmeans_plusplus

        _, chosen = kmeans_plusplus(X, k, random_state=seed)
        return np.asarray(chosen, dtype=np.int64)

    def lloyd(self, X, init, niter, seed):
        import faiss

        km = faiss.Kmeans(
            X.shape[1], len(init), niter=niter, seed=seed, verbose=False,
            # Lloyd iterations on every row given (callers sample at most 1024 per centre; faiss' default
            # would subsample to 256); no warning for small data: callers check n >= n_clusters.
            max_points_per_centroid=max(1, -(-len(X) // len(init))), min_points_per_centroid=1,
        )
        km.train(np.ascontiguousarray(X, dtype=np.float32), init_centroids=np.ascontiguousarray(init, np.float32))
        return np.ascontiguousarray(km.centroids, dtype=np.float32), float(km.obj[-1])

    def top_inner_products(self, queries, rows: Callable, n, k, exclude=None, cache: Optional[dict] = None):
        """Every query scores each chunk of ``ROWS`` rows by faiss' matrix products (``faiss.knn``, which reads
        the chunk where it lies: no index, no copy); the chunks' results are merged (faiss ``ResultHeap``). Rows
        ``exclude`` leaves out are dropped from the chunk (in place where ``rows`` gave a chunk of its own), not
        skipped by a selector: with one, faiss scores row by row instead of by matrix products (trust's
        calibration searches of 16,384-value rows: about 3x as long)."""
        import faiss

        b, k = len(queries[0]), min(k, n)
        heaps = [faiss.ResultHeap(b, k, keep_max=True) for _ in queries]
        step = chunk_rows(queries[0].shape[1], ROWS)  # rows of a wide layer fewer at a time
        for start in range(0, n, step):
            stop = min(start + step, n)
            block, ids = rows(start, stop), None
            if exclude is not None and exclude[start:stop].any():
                ids = start + np.flatnonzero(~exclude[start:stop])  # the rows kept, by their place in the store
                if not len(ids):
                    continue
                block = _kept_rows(block, ids - start)
            block = np.ascontiguousarray(block, dtype=np.float32)
            for heap, q in zip(heaps, queries):
                d, i = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(d, np.where(i < 0, -1, i + start if ids is None else ids[np.maximum(i, 0)]))
            del block  # before the next chunk is read: one chunk held at a time
        for heap in heaps:
            heap.finalize()
        return [(heap.I, heap.D) for heap in heaps]


def _kept_rows(block: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``block[kept]`` (``kept`` increasing). Rows of at least :data:`IN_PLACE_WIDTH` values are moved to the
    front of ``block`` itself where it is an array of its own, so that the search holds one chunk, not two;
    narrower rows (small chunks), or a block that is a view of the caller's array, are copied."""
    if (block.shape[1] < IN_PLACE_WIDTH or block.base is not None or not block.flags.writeable
            or not block.flags.c_contiguous):
        return block[kept]
    at = 0
    for a, b in runs(kept):
        first, length = int(kept[a]), b - a
        shift = first - at
        # towards the front, in pieces no longer than the shift: no piece overlaps its own source (numpy would
        # copy an overlapping source first, up to a whole chunk)
        for p in range(0, length if shift else 0, max(shift, 1)):
            size = min(shift, length - p)
            block[at + p:at + p + size] = block[first + p:first + p + size]
        at += length
    return block[:at]
