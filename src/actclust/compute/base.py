"""The interface of a compute backend: the heavy numeric steps after the model's pass."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

__all__ = ["Backend"]


class Backend:
    """The heavy numeric steps of actclust after the model's pass; see :class:`HostBackend` for the contract.

    ``device`` is where the work runs (``"cpu"``, ``"cuda:0"``); ``on_device`` is True for a
    backend that computes away from the host (its search answers ``search="auto"`` exactly).
    """

    name = "abstract"
    device = "cpu"
    on_device = False

    def sq_distances(self, X, centers: np.ndarray, transform: Optional[Callable] = None) -> np.ndarray:
        """Squared Euclidean distances ``(n, k)`` float32 from each row of ``X`` (any ``(n, d)`` array, a
        memory map too, read in chunks; ``transform`` maps a chunk first) to each of ``centers``."""
        raise NotImplementedError

    def kmeans_plusplus(self, X: np.ndarray, k: int, seed: int) -> np.ndarray:
        """The positions ``(k,)`` of the rows of ``X`` chosen as initial centres by greedy k-means++
        (scikit-learn's, with its random draws)."""
        raise NotImplementedError

    def lloyd(self, X: np.ndarray, init: np.ndarray, niter: int, seed: int) -> tuple:
        """``(centres, final objective)`` of ``niter`` Lloyd iterations from ``init`` (faiss' k-means:
        an empty cluster takes half of a large one)."""
        raise NotImplementedError

    def top_inner_products(self, queries: list, rows: Callable, n: int, k: int, exclude=None,
                           cache: Optional[dict] = None) -> list:
        """``(ids (b, k), inner products (b, k))`` of the rows of largest inner product with each query,
        largest first, for each query matrix of ``queries`` (all of the same width), over ``n`` rows read
        as ``rows(start, stop)`` in chunks; rows where the boolean mask ``exclude`` is true are left out;
        id ``-1`` pads where fewer than ``k`` rows remain. ``cache`` (a dict owned by the caller's index) may keep the rows where
        the backend computes, for the next call."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device!r})"
