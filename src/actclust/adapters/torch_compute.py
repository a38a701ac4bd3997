"""The compute backend on a PyTorch device (:class:`actclust.compute.Backend`): the steps after the
model's pass as tensor operations where the model runs.

A PyTorch model on CUDA gets this backend by default (``device=None``: the model's device). It
computes what :class:`actclust.compute.HostBackend` computes, the same way, so results agree within
float32 rounding (tested on the CPU device against the host, where the same code runs):

- squared distances to centres as ``||x||^2 - 2 x.c + ||c||^2``, rows streamed through the device in
  chunks;
- k-means++ seeding as scikit-learn's greedy variant, with its random draws taken from the same
  NumPy generator (only the distances are computed on the device), then faiss' Lloyd iterations
  (an empty cluster takes half of the largest by faiss' rule), assignment by chunked matrix products;
- exact top-``k`` search by inner product: each chunk of rows times each chunk of queries, the
  chunk's top ``k`` merged with the running best (``torch.topk`` over both). Rows that fit in
  ``memory_fraction`` of the free device memory stay there between calls (``cache``); others are
  streamed from the host on every call.

A device out of memory halves the chunks and starts the step again (a :class:`DeviceMemoryWarning`
once per backend); where even the smallest chunks do not fit (or the step holds its rows whole: k-means++),
that step runs on the host (:data:`actclust.compute.HOST`, said once too) and the next step starts again from the
chunks it started from. A step never returns a partial answer.

Every step runs its matrix products in full float32 (``torch.set_float32_matmul_precision("highest")`` while it
runs, the caller's setting restored when the last step running ends): a script that allows TF32 for its own training (PyTorch Lightning's
advice, ``"high"``) would otherwise round the products to 10 bits and move cluster assignments and distances.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import numpy as np
import torch

from ..compute.base import Backend
from ..exceptions import DeviceMemoryWarning, user_stacklevel
from ..store.vectors import iter_rows

__all__ = ["TorchBackend"]

_EPS = 1.0 / 1024  # faiss' perturbation when an empty cluster takes half of another
_MIN_CHUNK = 16
# torch.OutOfMemoryError is torch >= 2.5; torch 2.1-2.4 (which actclust supports) raise torch.cuda's.
_OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


_HOST_STEPS = {"_sq_distances": "sq_distances", "_kmeans_plusplus": "kmeans_plusplus", "_lloyd": "lloyd",
               "_top": "top_inner_products"}


_KEPT = {}  # device -> [(weak reference to the first tensor of rows an index keeps there, their bytes)]


def _kept_on(device: str) -> list:
    """The rows indexes keep on ``device`` (through any backend), those of indexes dropped since left out."""
    _KEPT[device] = [(ref, size) for ref, size in _KEPT.get(device, []) if ref() is not None]
    return _KEPT[device]


_PRECISION = {"lock": threading.Lock(), "steps": 0, "saved": None}  # the steps running, in any thread


class _full_float32:
    """Matrix products in full float32 while the block runs (no TF32), the caller's precision restored after. The
    setting is the process', not a thread's: the first of the steps running at once (in any thread) sets it, the last
    to end restores it (a step ending while another ran restored TF32 under it: an outside review). A model's pass
    run meanwhile in another thread gets full float32 too."""

    def __enter__(self):
        with _PRECISION["lock"]:
            if _PRECISION["steps"] == 0:
                _PRECISION["saved"] = torch.get_float32_matmul_precision()
                if _PRECISION["saved"] != "highest":
                    torch.set_float32_matmul_precision("highest")
            _PRECISION["steps"] += 1

    def __exit__(self, *exc):
        with _PRECISION["lock"]:
            _PRECISION["steps"] -= 1
            if _PRECISION["steps"] == 0 and _PRECISION["saved"] != "highest":
                torch.set_float32_matmul_precision(_PRECISION["saved"])
        return False


class TorchBackend(Backend):
    """The heavy steps on one PyTorch device.

    Parameters
    ----------
    device : str or torch.device
    rows : int
        Rows per chunk streamed to the device (distances, search).
    block : int
        Most scores computed at once in the search (queries x rows of one block), and so its memory.
    memory_fraction : float
        Share of the free device memory the search may keep the rows of its index in between calls.
    """

    name = "torch"
    on_device = True

    def __init__(self, device="cpu", *, rows: int = 65536, block: int = 1 << 26, memory_fraction: float = 0.5):
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cuda" and self.torch_device.index is None:
            # "cuda" is the calling thread's current device, which another thread may see otherwise: fixed here, so
            # that rows kept on it are searched there, and the run's caches are keyed by one name ("cuda:0")
            self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self.torch_device)
        self.rows, self.block, self.memory_fraction = int(rows), int(block), float(memory_fraction)
        self._warned = self._warned_host = False

    # ------------------------------------------------------------------ out of memory
    def _retry(self, step, *args, chunked: bool = True):
        """Run ``step(*args)`` in full float32; on a device out of memory, halve the chunks and run it again, and
        at the smallest chunks (at once where the step is not ``chunked``) run the host's step of the same name."""
        start = self.rows, self.block
        while True:
            try:
                with _full_float32():
                    return step(*args)
            except _OOM:
                pass  # (out of this block, the failed step's frames and the device memory they held are released)
            if self.torch_device.type == "cuda":
                torch.cuda.empty_cache()
            if not chunked or (self.rows <= _MIN_CHUNK and self.block <= _MIN_CHUNK * _MIN_CHUNK):
                return self._on_host(step, args, start)
            # Halved down to the minimum; a chunk already below it is kept, never enlarged.
            self.rows = max(min(self.rows, _MIN_CHUNK), self.rows // 2)
            self.block = max(min(self.block, _MIN_CHUNK * _MIN_CHUNK), self.block // 2)
            if not self._warned:
                self._warned = True
                warnings.warn(f"The device {self.device} ran out of memory; actclust goes on in smaller chunks "
                              f"({self.rows} rows, {self.block} scores at once).", DeviceMemoryWarning,
                              stacklevel=user_stacklevel())

    def _on_host(self, step, args, start):
        """The host's answer to ``step``, where the device has no room for it; the chunks as they were before it
        (smaller ones did not help: the next step tries these again)."""
        from ..compute import HOST

        self.rows, self.block = start
        if not self._warned_host:
            self._warned_host = True
            warnings.warn(f"The device {self.device} ran out of memory even in the smallest chunks; actclust computes "
                          f"this step ({_HOST_STEPS[step.__name__]}) on the host, and tries the device again at the next.",
                          DeviceMemoryWarning, stacklevel=user_stacklevel())
        args = args[:-1] if step.__name__ == "_top" else args  # the host keeps no rows between calls (no cache)
        return getattr(HOST, _HOST_STEPS[step.__name__])(*args)

    def _to(self, a: np.ndarray) -> torch.Tensor:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not a.flags.writeable:  # a read-only memory map (a store on disk): torch warns on those
            a = a.copy()
        t = torch.from_numpy(a)
        if self.torch_device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.torch_device, non_blocking=True)

    # ------------------------------------------------------------------ distances
    def sq_distances(self, X, centers, transform=None):
        return self._retry(self._sq_distances, X, centers, transform)

    def _sq_distances(self, X, centers, transform):
        c = self._to(centers)
        c_sq = (c * c).sum(1)[None, :]
        out = np.empty((len(X), len(c)), dtype=np.float32)
        for start, x in iter_rows(X, self.rows):
            x = self._to(transform(x) if transform is not None else x)
            d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + c_sq
            out[start:start + len(x)] = d.clamp_min_(0.0).cpu().numpy()
        return out

    # ------------------------------------------------------------------ k-means
    def kmeans_plusplus(self, X, k, seed):
        return self._retry(self._kmeans_plusplus, X, k, seed, chunked=False)  # every row at once, in float64

    def _kmeans_plusplus(self, X, k, seed):
        """scikit-learn's ``_kmeans_plusplus`` (greedy, ``2 + log k`` trials), its random draws from the same
        ``RandomState(seed)`` on the host, distances (in float64, as scikit-learn upcasts float32) here."""
        rs = np.random.RandomState(seed)
        n = len(X)
        x = self._to(X).double()
        x_sq = (x * x).sum(1)
        trials = 2 + int(np.log(k))
        weight = np.ones(n, dtype=np.float32)
        first = rs.choice(n, p=weight / weight.sum())
        ids = [int(first)]

        def dist(rows):  # (len(rows), n) squared distances, as scikit-learn's float32 result
            c = x[rows]
            return ((c * c).sum(1)[:, None] - 2.0 * (c @ x.T) + x_sq[None, :]).clamp_min_(0.0).float()

        closest = dist(torch.tensor([first], device=self.torch_device))[0]
        pot = float(closest.double().sum())
        for _ in range(1, k):
            rand = torch.from_numpy(rs.uniform(size=trials) * pot).to(self.torch_device)
            cand = torch.searchsorted(torch.cumsum(closest.double(), 0), rand).clamp_max_(n - 1)
            d = torch.minimum(closest[None, :], dist(cand))
            pots = d.double().sum(1)
            best = int(torch.argmin(pots))
            pot, closest = float(pots[best]), d[best]
            ids.append(int(cand[best]))
        return np.asarray(ids, dtype=np.int64)

    def lloyd(self, X, init, niter, seed):
        return self._retry(self._lloyd, X, init, niter, seed)

    def _lloyd(self, X, init, niter, seed):
        """faiss' ``Clustering::train``: ``niter`` times assign (objective = sum of squared distances),
        then each centre to the mean of its rows; an empty cluster takes a copy of a cluster drawn by
        size with faiss' draws, both moved by ``1 +- 1/1024`` in alternate coordinates."""
        if len(X) == len(init):  # faiss' corner case: the rows are the centres, objective 0
            return np.array(X, dtype=np.float32), 0.0
        x = self._to(X)
        c = self._to(init).clone()
        k, n = len(c), len(x)
        obj = 0.0
        x_sq = (x * x).sum(1, keepdim=True)
        for _ in range(niter):
            assign = torch.empty(n, dtype=torch.int64, device=x.device)
            obj = 0.0
            c_sq = (c * c).sum(1)[None, :]
            step = max(1, self.block // max(k, 1))
            for s in range(0, n, step):
                d = (x_sq[s:s + step] - 2.0 * (x[s:s + step] @ c.T) + c_sq).clamp_min_(0.0)
                best, assign[s:s + step] = d.min(1)
                obj += float(best.double().sum())
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(c.dtype), torch.zeros_like(c))
            sizes = counts.cpu().numpy().astype(np.float32)  # faiss' float hassign
            # faiss draws from a fresh std::mt19937(1234) in every iteration that splits (whatever the
            # seed): RandomState(1234) is that generator, mt() / float(mt.max()) its float draw.
            rng = np.random.RandomState(1234) if (sizes == 0).any() else None
            for ci in np.flatnonzero(sizes == 0):
                cj = 0
                while not (np.float32(rng.randint(0, 1 << 32, dtype=np.uint32)) / np.float32(4294967295)
                           < np.float32((float(sizes[cj]) - 1.0) / float(np.float32(n - k)))):
                    cj = (cj + 1) % k
                sign = torch.where(torch.arange(c.shape[1], device=c.device) % 2 == 0, 1.0, -1.0)
                c[ci] = c[cj] * (1 + _EPS * sign)
                c[cj] = c[cj] * (1 - _EPS * sign)
                sizes[ci] = sizes[cj] / 2
                sizes[cj] -= sizes[ci]
        return c.cpu().numpy(), obj

    # ------------------------------------------------------------------ exact search
    def top_inner_products(self, queries, rows, n, k, exclude=None, cache=None):
        return self._retry(self._top, queries, rows, n, k, exclude, cache)

    def _chunks(self, rows, n, cache):
        """The index rows on the device, chunk by chunk: kept in ``cache`` when they fit."""
        if cache is not None and cache.get("rows") is not None and cache.get("chunk") == self.rows \
                and cache.get("n") == n:  # rows kept for another n (the index grew) are not reused
            yield from cache["rows"]
            return
        if cache is not None:
            cache.clear()  # rows kept for another n or chunk: freed before the budget counts what is kept
        kept, keep = [], cache is not None and self._fits(n, rows)
        for start in range(0, n, self.rows):
            t = self._to(rows(start, min(start + self.rows, n)))
            if keep:
                kept.append((start, t))
            yield start, t
        if keep:
            cache.update(rows=kept, chunk=self.rows, n=n)
            if kept and self._memory() is not None:  # counted against the device's budget while they live
                _kept_on(self.device).append((weakref.ref(kept[0][1]), n * kept[0][1].shape[1] * 4))

    def _fits(self, n, rows) -> bool:
        """Whether ``n`` rows may stay on the device: within ``memory_fraction`` of its free memory, and, with the rows
        every index keeps there (through any backend on the device: two explainers share it), of its whole memory
        (each index alone could take half of what the others left, and leave the model's next pass none)."""
        memory = self._memory()
        if memory is None:
            return True
        free, total = memory
        need = n * rows(0, 1).shape[1] * 4
        return need <= self.memory_fraction * free and \
            need + sum(size for _, size in _kept_on(self.device)) <= self.memory_fraction * total

    def _memory(self):
        """``(free, total)`` bytes of the device (None: not a device whose memory runs out apart from the host's)."""
        if self.torch_device.type != "cuda":
            return None
        return torch.cuda.mem_get_info(self.torch_device)

    def _top(self, queries, rows, n, k, exclude, cache):
        k = min(k, n)
        qs = [self._to(q) for q in queries]
        b = len(qs[0])
        best = [(torch.full((b, k), -torch.inf, device=self.torch_device),
                 torch.full((b, k), -1, dtype=torch.int64, device=self.torch_device)) for _ in qs]
        mask = None if exclude is None or not exclude.any() else torch.from_numpy(exclude).to(self.torch_device)
        try:
            for start, r in self._chunks(rows, n, cache):
                ids = torch.arange(start, start + len(r), device=self.torch_device)
                step = max(1, self.block // max(len(r), 1))
                for j, q in enumerate(qs):
                    for s in range(0, b, step):
                        scores = q[s:s + step] @ r.T
                        if mask is not None:
                            scores.masked_fill_(mask[start:start + len(r)][None, :], -torch.inf)
                        top = scores.topk(min(k, len(r)), dim=1)
                        vals = torch.cat([best[j][0][s:s + step], top.values], 1)
                        idx = torch.cat([best[j][1][s:s + step], ids[top.indices]], 1)
                        keep = vals.topk(k, dim=1)
                        best[j][0][s:s + step] = keep.values
                        best[j][1][s:s + step] = torch.gather(idx, 1, keep.indices)
        except _OOM:
            if cache is not None:
                cache.clear()  # streamed from the host from now on
            raise
        # Padding as the host's (faiss' heaps): id -1, score the lowest float32.
        return [(torch.where(torch.isfinite(v), i, -1).cpu().numpy(),
                 torch.where(torch.isfinite(v), v, torch.finfo(v.dtype).min).cpu().numpy()) for v, i in best]
