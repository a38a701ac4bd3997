"""Turning one input into something a report can show: an inlined PNG, a table of features, or text."""

from __future__ import annotations

import base64
import struct
import warnings
import zlib
from typing import Callable, Optional

import numpy as np

from ..exceptions import DataError, RenderWarning

_MAX_FEATURES = 12


class Renderer:
    """Renders inputs for the HTML report; never raises on a bad input, shows a placeholder.

    Parameters
    ----------
    render : callable, optional
        ``render(x) -> str | array``: text, or an image ``(H, W)``, ``(H, W, 3)`` or ``(C, H, W)``
        with values in [0, 1] (float) or 0-255 (uint8). Overrides the defaults below.
    mean, std : float or sequence, optional
        Per-channel normalisation the model's inputs went through; images are shown as
        ``x * std + mean``. Without them, images outside [0, 1] are min-max scaled each.
    feature_names : sequence of str, optional
        Names of the features of 1-D (tabular) inputs.
    """

    def __init__(self, render: Optional[Callable] = None, mean=None, std=None, feature_names=None):
        self.render, self.feature_names = render, feature_names
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        self.failures: list = []

    def __call__(self, x, what: str) -> dict:
        try:
            if self.render is not None:
                return self._from_user(self.render(x))
            if isinstance(x, (dict, tuple)):  # a model with several inputs: one row per input
                return _parts_table(x)
            return self._default(np.asarray(x))
        except Exception as e:  # a report shows every input it can, and says which it could not
            message = f"could not render {what}: {type(e).__name__}: {e}"
            self.failures.append(message)
            warnings.warn(f"{message}; the report shows a placeholder.", RenderWarning, stacklevel=3)
            return {"kind": "error", "text": message}

    def _from_user(self, out) -> dict:
        if isinstance(out, str):
            return {"kind": "text", "text": out}
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        if isinstance(out, np.ndarray) and _is_image(out):
            return _image(_to_uint8(_channels_last(out)))
        raise DataError(f"render returned {type(out).__name__}; expected a str or an image array "
                        "(H, W), (H, W, 3) or (C, H, W)")

    def _default(self, x: np.ndarray) -> dict:
        if x.ndim == 1:
            names = self.feature_names or [f"x{i}" for i in range(len(x))]
            if len(names) != len(x):
                raise DataError(f"{len(names)} feature names for {len(x)} features")
            rows = [(str(n), f"{float(v):.4g}") for n, v in zip(names[:_MAX_FEATURES], x[:_MAX_FEATURES])]
            return {"kind": "table", "rows": rows, "more": max(0, len(x) - _MAX_FEATURES)}
        if not _is_image(x):
            raise DataError(f"an input of shape {x.shape} is not an image or a feature row; pass render=")
        img = _channels_last(x.astype(np.float32))
        if self.mean is not None or self.std is not None:
            mean = np.zeros(1, np.float32) if self.mean is None else self.mean.reshape(-1)
            std = np.ones(1, np.float32) if self.std is None else self.std.reshape(-1)
            channels = 1 if img.ndim == 2 else img.shape[2]
            if {mean.size, std.size} - {1, channels}:
                raise DataError(f"mean/std give {mean.size}/{std.size} values for an image of {channels} channel(s)")
            img = np.clip(img * (std if img.ndim == 3 else std[0]) + (mean if img.ndim == 3 else mean[0]), 0, 1)
        elif img.min() < 0 or img.max() > 1:
            low, high = float(img.min()), float(img.max())
            img = (img - low) / (high - low) if high > low else np.zeros_like(img)
        return _image(_to_uint8(img))


def _parts_table(x) -> dict:
    """A sample of several inputs (e.g. ``input_ids`` and ``attention_mask``) as a table of short summaries."""
    items = x.items() if isinstance(x, dict) else enumerate(x)
    rows = []
    for key, v in items:
        v = np.asarray(v)
        if v.ndim == 1 and v.dtype.kind in "iub":
            shown = " ".join(str(int(t)) for t in v[:16]) + (f" … ({len(v)})" if len(v) > 16 else "")
        else:
            flat = v.reshape(-1)
            shown = ", ".join(f"{float(t):.3g}" for t in flat[:6]) + (f" … {v.shape}" if flat.size > 6 else "")
        rows.append((str(key), shown))
    return {"kind": "table", "rows": rows, "more": 0}


def _is_image(x: np.ndarray) -> bool:
    return (x.ndim == 2 and min(x.shape) > 1) or (x.ndim == 3 and (x.shape[0] in (1, 3) or x.shape[2] in (1, 3)))


def _channels_last(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[2] not in (1, 3):
        x = np.moveaxis(x, 0, -1)
    return x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    return (np.clip(np.nan_to_num(img.astype(np.float32)), 0, 1) * 255 + 0.5).astype(np.uint8)


def _image(img: np.ndarray) -> dict:
    return {"kind": "image", "src": png_data_uri(img), "width": int(img.shape[1]), "height": int(img.shape[0])}


def png_data_uri(img: np.ndarray) -> str:
    """An 8-bit grey ``(H, W)`` or RGB ``(H, W, 3)`` image as a ``data:image/png;base64`` URI."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape[:2]
    color = 0 if img.ndim == 2 else 2
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))  # filter type 0 on each row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
