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
        from ..capture.reduction import SUMMARY_DIMS

        device = None if like is None else like.device
        i = torch.arange(width, device=device, dtype=torch.int64)[:, None]
        j = torch.arange(SUMMARY_DIMS, device=device, dtype=torch.int64)[None, :]
        return sign_bits(i, j, seed, torch).float() / SUMMARY_DIMS ** 0.5

    def to_host(self, t):
        return t.reshape(t.shape[0], -1).float().cpu().numpy()


OPS = TorchOps()
