"""Arrays of any framework, seen through one small interface, without importing a framework.

Data reaches actclust as NumPy arrays, pandas tables, or a framework's own tensors (PyTorch,
JAX, TensorFlow). The capture code asks the same few questions of each (its shape, dtype,
which rows are not finite, its rows as NumPy) through the functions here: NumPy answers
directly; a tensor of a framework answers through that framework, which is necessarily imported
already (the tensor is one of its objects), so nothing here imports one.

Reducers compute on the device the activations are on, through an :class:`Ops` of that
framework: :data:`NUMPY` here, PyTorch's in :mod:`actclust.adapters.torch_ops`, found by
:func:`ops_for` from the array's type.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import numpy as np

__all__ = ["Ops", "NUMPY", "ops_for", "pool_matrix", "is_array", "is_torch", "dtype_name", "fractional", "is_floating",
           "is_integer", "nonfinite_rows", "to_numpy", "take_rows", "stack"]


def is_torch(a) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def is_array(a) -> bool:
    """Whether ``a`` is an array or tensor of samples (NumPy, PyTorch, JAX, TensorFlow...)."""
    return isinstance(a, np.ndarray) or (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "__getitem__")
                                         and not isinstance(a, (str, bytes)) and not _is_pandas(a))


def _is_pandas(a) -> bool:
    return type(a).__module__.startswith("pandas")


def dtype_name(a) -> str:
    """``"float32"``, ``"int64"``, ``"bool"``...: the same names for every framework."""
    dt = getattr(a, "dtype", None)
    if dt is None:  # a table of several dtypes, a list: NumPy's reading of it
        dt = np.asarray(a).dtype if not hasattr(a, "dtypes") else np.result_type(*a.dtypes)
    name = getattr(dt, "name", None) if not is_torch(a) else None
    return str(name if isinstance(name, str) else dt).replace("torch.", "")


def fractional(a) -> bool:
    """Whether the floating array ``a`` holds a finite value that is not a whole number (ids cast to a model's integer
    input would lose it)."""
    x = np.asarray(to_numpy(a), dtype=np.float64)
    finite = x[np.isfinite(x)]
    return bool((finite != np.round(finite)).any())


def is_floating(a) -> bool:
    name = dtype_name(a)
    return name.startswith(("float", "bfloat", "half")) or name == "double"


def is_integer(a) -> bool:
    return dtype_name(a).startswith(("int", "uint", "long", "short"))


def nonfinite_rows(a) -> np.ndarray:
    """Positions of the rows of ``a`` that hold NaN or infinite values (floating arrays only)."""
    if not is_floating(a) or a.shape[0] == 0:
        return np.empty(0, np.int64)
    if is_torch(a):
        torch = sys.modules["torch"]
        bad = ~torch.isfinite(a.reshape(a.shape[0], -1)).all(1)
        return torch.nonzero(bad).flatten().cpu().numpy() if bool(bad.any()) else np.empty(0, np.int64)
    x = to_numpy(a)
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))


def to_numpy(a) -> np.ndarray:
    """``a`` as a NumPy array on the host (a view where the framework allows)."""
    if isinstance(a, np.ndarray):
        return a
    if is_torch(a):
        a = a.detach().cpu()
        # NumPy has no bfloat16 (nor torch's 8-bit floats): their values as float32, which holds each exactly
        narrow = a.is_floating_point() and (a.dtype.itemsize < 2 or a.dtype == sys.modules["torch"].bfloat16)
        return (a.float() if narrow else a).numpy()
    return np.asarray(a)


def take_rows(a, idx: np.ndarray):
    """``a[idx]`` for any array, in its own framework."""
    if is_torch(a):
        return a[sys.modules["torch"].from_numpy(np.asarray(idx, dtype=np.int64)).to(a.device)]
    if isinstance(a, np.ndarray):
        return a[idx]
    return np.asarray(a)[idx]


def stack(items: list):
    """One batch from per-sample arrays: a tensor batch from tensors, a NumPy batch otherwise."""
    if is_torch(items[0]):
        return sys.modules["torch"].stack(list(items))
    return np.stack([np.asarray(i) for i in items])


# ---------------------------------------------------------------------------- reducers' operations
class Ops:
    """The operations reducers need, on one framework's arrays (on their device).

    Every method takes and returns that framework's arrays; ``t`` is channels-first
    ``(N, C, *spatial)`` where a layout matters. Implementations: :data:`NUMPY` (this module) and
    :class:`actclust.adapters.torch_ops.TorchOps`.
    """

    name = "abstract"

    def float32(self, t):
        raise NotImplementedError

    def moveaxis(self, t, source: int, destination: int):
        raise NotImplementedError

    def flatten(self, t, start: int = 1):
        """``t`` with every axis from ``start`` on merged into one."""
        raise NotImplementedError

    def mean_last(self, t, mask=None):
        """Mean over the last axis; with ``mask (N, L)``, over the positions it keeps (at least one)."""
        raise NotImplementedError

    def amax_last(self, t, mask=None):
        raise NotImplementedError

    def first_kept(self, t, mask):
        """Each row's first token of ``t (N, T, D)`` that ``mask (N, T)`` keeps (the first where it keeps none)."""
        raise NotImplementedError

    def adaptive_avg_pool(self, t, g: int):
        """``(N, C, H, W)`` to ``(N, C, g, g)`` or ``(N, C, L)`` to ``(N, C, g)``, with PyTorch's bins
        (cell ``i`` covers ``floor(i * H / g)`` to ``ceil((i + 1) * H / g)``)."""
        raise NotImplementedError

    def l2_normalize(self, v):
        """Rows of ``v (N, d)`` scaled to unit length, whatever their magnitude; zero rows stay zero."""
        raise NotImplementedError

    def asarray_like(self, a: np.ndarray, like):
        """NumPy ``a`` in ``like``'s framework, on its device, with its floating dtype."""
        raise NotImplementedError

    def sign_projection(self, width: int, seed: int, like):
        """:func:`actclust.capture.reduction.sign_projection` computed in this framework."""
        raise NotImplementedError

    def to_host(self, t) -> np.ndarray:
        """``t`` as a float32 NumPy array ``(N, d)`` on the host."""
        raise NotImplementedError


def _bins(size: int, g: int) -> list:
    return [((i * size) // g, -(-((i + 1) * size) // g)) for i in range(g)]


def pool_matrix(size: int, g: int) -> np.ndarray:
    """``(size, g)``: column ``i`` averages the positions of PyTorch's adaptive-pooling bin ``i``."""
    m = np.zeros((size, g), np.float32)
    for i, (a, b) in enumerate(_bins(size, g)):
        m[a:b, i] = 1.0 / (b - a)
    return m


_MASK31 = 0x7FFFFFFF


def sign_bits(i, j, seed: int, xp):
    """The integer hash behind the sign projection, with ``xp`` the array module (NumPy or torch):
    products stay below 2**63, so every framework and device computes the same bits."""
    x = (i * 40503 + j * 2654435 + (seed & _MASK31)) & _MASK31
    for _ in range(3):
        x = ((x ^ (x >> 15)) * 1597334677) & _MASK31
    return ((x >> 11) & 1) * 2 - 1


class NumpyOps(Ops):
    name = "numpy"

    def __init__(self):
        self._signs: dict = {}

    def float32(self, t):
        return np.asarray(t, dtype=np.float32)

    def moveaxis(self, t, source, destination):
        return np.moveaxis(t, source, destination)

    def flatten(self, t, start=1):
        return t.reshape(*t.shape[:start], -1)

    def first_kept(self, t, mask):
        first = (np.asarray(mask) != 0).argmax(1)  # argmax of booleans: the first True, or 0 where none is
        return t[np.arange(len(t)), first]

    def mean_last(self, t, mask=None):
        if mask is None:
            return t.mean(-1)
        m = np.asarray(mask, dtype=t.dtype)[:, None, :]
        return (t * m).sum(-1) / np.maximum(m.sum(-1), 1)

    def amax_last(self, t, mask=None):
        if mask is None:
            return t.max(-1)
        keep = np.asarray(mask).astype(bool)[:, None, :]
        out = np.where(keep, t, -np.inf).max(-1)
        return np.where(np.isfinite(out), out, 0).astype(t.dtype)

    def adaptive_avg_pool(self, t, g):
        # Pooling is linear: each spatial axis is multiplied by a (size, g) matrix of bin weights (BLAS),
        # which also gives PyTorch's overlapping bins where the size does not divide by g.
        t = np.asarray(t, dtype=np.float32)
        out = t @ pool_matrix(t.shape[-1], g)  # (..., g) over the last axis
        if t.ndim == 4:
            out = np.swapaxes(np.swapaxes(out, 2, 3) @ pool_matrix(t.shape[2], g), 2, 3)
        return out

    def l2_normalize(self, v):
        # each row scaled by its largest value first: the squares of values near 1e19 (or 1e-20) overflow (underflow)
        # float32, and such rows became zeros, all in one cluster (an outside check); in float32 at least (float16's
        # floor of 1e-12 is 0, and its zero rows became NaN), given back in v's own floating type
        dtype = v.dtype if v.dtype.kind == "f" and v.dtype.itemsize >= 4 else np.dtype(np.float32)
        w = v.astype(dtype, copy=False)
        big = np.abs(w).max(1, keepdims=True) if w.shape[1] else np.zeros((len(w), 1), dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # rows of inf or NaN: named by the capture's check instead
            u = w / np.maximum(big, np.finfo(dtype).tiny)
            u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        return u.astype(v.dtype, copy=False) if v.dtype.kind == "f" else u

    def asarray_like(self, a, like):
        return np.asarray(a, dtype=like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)

    def sign_projection(self, width, seed, like=None):
        from .reduction import SUMMARY_DIMS

        key = (width, seed)
        if key not in self._signs:  # made once per width and seed, not per batch
            if len(self._signs) >= 64:
                self._signs.clear()
            i = np.arange(width, dtype=np.int64)[:, None]
            j = np.arange(SUMMARY_DIMS, dtype=np.int64)[None, :]
            self._signs[key] = (sign_bits(i, j, seed, np) / SUMMARY_DIMS ** 0.5).astype(np.float32)
            self._signs[key].setflags(write=False)
        return self._signs[key]

    def to_host(self, t):
        return np.ascontiguousarray(np.asarray(t, dtype=np.float32).reshape(len(t), -1))


NUMPY = NumpyOps()
#: Where the Ops of a framework live, by the top-level module of its array type.
_OPS_MODULES = {"torch": "actclust.adapters.torch_ops"}
_OPS: dict = {}


def ops_for(t) -> Ops:
    """The :class:`Ops` of ``t``'s framework: PyTorch's for tensors, NumPy's for anything else
    (a JAX or TensorFlow array is read as NumPy on the host)."""
    root = type(t).__module__.split(".", 1)[0]
    if root in _OPS_MODULES:
        ops: Optional[Ops] = _OPS.get(root)
        if ops is None:
            ops = _OPS[root] = importlib.import_module(_OPS_MODULES[root]).OPS
        return ops
    return NUMPY
