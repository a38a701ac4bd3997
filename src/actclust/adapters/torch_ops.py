"""The reducers' operations on PyTorch tensors, on their device (:class:`actclust.capture.arrays.Ops`).

They run inside forward hooks, also of compiled models: tensor operations only, no Python
branch on values, so ``torch.compile(fullgraph=True)`` traces them without a graph break.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..capture.arrays import Ops, sign_bits

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
        m = mask.to(t.dtype).unsqueeze(1)
        return (t * m).sum(-1) / m.sum(-1).clamp_min(1)

    def amax_last(self, t, mask=None):
        if mask is None:
            return t.amax(-1)
        keep = mask.to(torch.bool).unsqueeze(1)
        out = t.masked_fill(~keep, float("-inf")).amax(-1)
        return torch.nan_to_num(out, neginf=0.0)

    def adaptive_avg_pool(self, t, g):
        return F.adaptive_avg_pool2d(t, g) if t.ndim == 4 else F.adaptive_avg_pool1d(t, g)

    def l2_normalize(self, v):
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def asarray_like(self, a, like):
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, dtype)

    def sign_projection(self, width, seed, like=None):
        device = None if like is None else like.device
        if torch.compiler.is_compiling():  # traced into the compiled graph: tensor operations, no cache
            return _signs(width, seed, device)
        # Hashing width x 64 integers took a third of a capture pass on Fashion-MNIST when redone per batch.
        key = (width, seed, str(device))
        if key not in _SIGNS:
            if len(_SIGNS) >= 64:
                _SIGNS.clear()
            _SIGNS[key] = _signs(width, seed, device)
        return _SIGNS[key]

    def to_host(self, t):
        return t.reshape(t.shape[0], -1).float().cpu().numpy()


#: Sign projections made so far, by (width, seed, device).
_SIGNS: dict = {}


def _signs(width, seed, device):
    from ..capture.reduction import SUMMARY_DIMS

    i = torch.arange(width, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(SUMMARY_DIMS, device=device, dtype=torch.int64)[None, :]
    return sign_bits(i, j, seed, torch).float() / SUMMARY_DIMS ** 0.5


OPS = TorchOps()
