"""The reducers' operations on PyTorch tensors, on their device (:class:`actclust.capture.arrays.Ops`).

They run inside forward hooks, also of compiled models: tensor operations only, no Python
branch on values, so ``torch.compile(fullgraph=True)`` traces them without a graph break.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..capture.arrays import Ops, pool_matrix, sign_bits

__all__ = ["TorchOps", "OPS"]


class TorchOps(Ops):
    name = "torch"

    def float32(self, t):
        return t.float()

    def moveaxis(self, t, source, destination):
        return torch.movedim(t, source, destination)

    def flatten(self, t, start=1):
        return t.flatten(start)

    def mean_last(self, t, mask=None):
        if mask is None:
            return t.mean(-1)
        m = mask.to(t.device, t.dtype).unsqueeze(1)  # (a model split over devices: the layer's, not the input's)
        return (t * m).sum(-1) / m.sum(-1).clamp_min(1)

    def first_kept(self, t, mask):
        first = (mask != 0).to(torch.uint8).argmax(1)  # the first kept token (argmax returns the first of its ties)
        return t[torch.arange(t.shape[0], device=t.device), first.to(t.device)]

    def amax_last(self, t, mask=None):
        if mask is None:
            return t.amax(-1)
        keep = mask.to(t.device, torch.bool).unsqueeze(1)
        out = t.masked_fill(~keep, float("-inf")).amax(-1)
        return torch.nan_to_num(out, neginf=0.0)

    def adaptive_avg_pool(self, t, g):
        if t.ndim != 4:
            return F.adaptive_avg_pool1d(t, g)
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
            return F.adaptive_avg_pool2d(t, g)  # (half precision: PyTorch's own accumulates in float32)
        # On the CPU, as matrix products with the bins' weights (the same bins; equal to 1e-6): the
        # spatial summaries took a tenth of explain's capture pass. Per 10,000 maps, ms: (32, 28, 28)
        # 89 -> 55 in two products (rows, then columns); (64, 14, 14) 82 -> 29 and (2048, 7, 7) 1,620
        # -> 290 in one, with both axes' weights, which wins where a map holds at most _FLAT_POOL values.
        n, c, h, w = t.shape
        if h * w <= _FLAT_POOL:
            return (t.reshape(n, c, h * w) @ _pool_weights(h, w, g, t.dtype, True)).reshape(n, c, g, g)
        rows, cols = _pool_weights(h, w, g, t.dtype, False)
        return torch.matmul(torch.matmul(rows, t), cols)

    def l2_normalize(self, v):
        # as NumPy's: each row scaled by its largest value first, so that no square overflows or underflows
        if v.shape[1] == 0:
            return v
        w = v if v.is_floating_point() and v.element_size() >= 4 else v.float()  # float16's 1e-12 floor is 0
        u = w / w.abs().amax(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return u.to(v.dtype) if v.is_floating_point() else u

    def asarray_like(self, a, like):
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, dtype)

    def sign_projection(self, width, seed, like=None):
        device = None if like is None else like.device
        if torch.compiler.is_compiling():  # traced into the compiled graph: tensor operations, no cache
            return _signs(width, seed, device)
        # Hashing width x 64 integers took a third of a capture pass on Fashion-MNIST when redone per batch.
        return _cached_signs(width, seed, device)

    def to_host(self, t):
        return t.reshape(t.shape[0], -1).float().cpu().numpy()


#: Maps of at most this many values are pooled in one matrix product (see ``TorchOps.adaptive_avg_pool``).
_FLAT_POOL = 256


@lru_cache(maxsize=64)
def _pool_weights(h, w, g, dtype, both: bool):
    """Adaptive pooling's bin weights on the host, made once per shape: ``(h w, g g)`` for both axes at once, else
    ``((g, h), (w, g))`` for rows, then columns."""
    if both:
        return torch.from_numpy(np.kron(pool_matrix(h, g), pool_matrix(w, g))).to(dtype)
    return (torch.from_numpy(np.ascontiguousarray(pool_matrix(h, g).T)).to(dtype),
            torch.from_numpy(pool_matrix(w, g)).to(dtype))


@lru_cache(maxsize=64)
def _cached_signs(width, seed, device):
    return _signs(width, seed, device)


def _signs(width, seed, device):
    from ..capture.reduction import SUMMARY_DIMS

    i = torch.arange(width, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(SUMMARY_DIMS, device=device, dtype=torch.int64)[None, :]
    return sign_bits(i, j, seed, torch).float() / SUMMARY_DIMS ** 0.5


OPS = TorchOps()
