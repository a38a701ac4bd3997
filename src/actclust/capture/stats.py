"""What the training inputs looked like, per channel, and whether new data looks the same.

``fit`` records, for each floating input, per channel (per feature of a table): the mean and
standard deviation of its values, their range, and the spread of the per-sample means. The
analyses compare the inputs they are given with it and warn once, naming the statistic and the
likely cause, when the data departs from them: inputs scaled to [0, 1] for a model trained on
standardised ones, raw bytes, channels in another order. A few inputs are judged by what a
few inputs can show (the mean is compared with the spread of per-sample means for that many
samples), so explaining five images does not warn about nothing.

About :data:`MAX_ROWS` samples, spread evenly over the data, are read: enough for these
statistics, and nearly free next to a forward pass.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from .arrays import is_floating, to_numpy

__all__ = ["InputStats", "MAX_ROWS"]

MAX_ROWS = 8192
_MAX_CHANNELS = 4096  # wider inputs are summarised as one channel
_MEAN_Z = 6.0  # a mean further than this many standard errors of the per-sample means ...
_MEAN_MIN_SHIFT = 0.25  # ... and than this share of the values' standard deviation departs
_STD_RATIO = 2.0  # a standard deviation more than twice or less than half the training one departs ...
#: ... and further from it than this many standard errors of a variance estimated from that many samples (the
#: training values' fourth moment says how far a variance moves by chance: far for a feature that is mostly one value,
#: a rare pixel of the digits' border, which warned on held-out digits and on training digits themselves)
_STD_Z = 4.0
_MIN_ROWS_FOR_STD = 16
_OUTSIDE_SHARE = 0.005  # more than 0.5% of values outside the training range (widened by 5%) departs ...
_OUTSIDE_MIN = 3  # ... and at least this many (one rare pixel a little past its training maximum is no departure)


class _Part:
    """Running per-channel sums of one floating input."""

    def __init__(self, axis: int):
        self.axis, self.n = axis, 0
        self.sum = self.sumsq = self.sum3 = self.sum4 = self.msum = self.msumsq = self.lo = self.hi = None
        self.count = 0  # values per channel seen
        self.table = False
        self.outside = 0  # values outside a reference range (comparison only)

    def add(self, x: np.ndarray, ref: Optional[dict] = None) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.table = x.ndim == 2
        if x.ndim == 1:
            x = x[:, None, None]
        elif x.ndim == 2:
            x = x[:, :, None]  # a table: every feature a channel of one value
        else:
            x = np.moveaxis(x, self.axis, 1).reshape(x.shape[0], x.shape[self.axis], -1)
        if x.shape[1] > _MAX_CHANNELS:
            x = x.reshape(x.shape[0], 1, -1)
        per_sample = x.mean(2)
        x2 = x ** 2
        # third and fourth moments where a channel is one value per sample (tables): a rare feature's spread moves
        # by chance there; a map's channel pools many values per sample (and the pass over a batch of images would
        # cost a percent of explain)
        moments = ((x2 * x).sum((0, 2)), (x2 * x2).sum((0, 2))) if x.shape[2] == 1 else (None, None)
        parts = (x.sum((0, 2)), x2.sum((0, 2)), *moments, per_sample.sum(0), (per_sample ** 2).sum(0),
                 x.min((0, 2)), x.max((0, 2)))
        if self.sum is None:
            self.sum, self.sumsq, self.sum3, self.sum4, self.msum, self.msumsq, self.lo, self.hi = parts
        elif parts[0].shape != self.sum.shape:
            return  # another width (variable-length inputs): the first batches' statistics stand
        else:
            self.sum, self.sumsq, self.sum3, self.sum4, self.msum, self.msumsq = (
                None if a is None else a + b
                for a, b in zip((self.sum, self.sumsq, self.sum3, self.sum4, self.msum, self.msumsq), parts[:6]))
            self.lo, self.hi = np.minimum(self.lo, parts[6]), np.maximum(self.hi, parts[7])
        self.n += x.shape[0]
        self.count += x.shape[0] * x.shape[2]
        if ref is not None and len(ref["lo"]) == x.shape[1]:
            lo, hi = np.asarray(ref["lo"]), np.asarray(ref["hi"])
            pad = 0.05 * (hi - lo)
            self.outside += int(((x < (lo - pad)[None, :, None]) | (x > (hi + pad)[None, :, None])).sum())

    def summary(self) -> dict:
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean ** 2, 0))
        mmean = self.msum / self.n
        mstd = np.sqrt(np.maximum(self.msumsq / self.n - mmean ** 2, 0))
        out = {"n": int(self.n), "axis": int(self.axis), "mean": mean.tolist(), "std": std.tolist(),
               "sample_mean_std": mstd.tolist(), "lo": self.lo.tolist(), "hi": self.hi.tolist(), "table": bool(self.table)}
        if self.sum4 is not None:
            e2, e3, e4 = self.sumsq / self.count, self.sum3 / self.count, self.sum4 / self.count
            out["m4"] = np.maximum(e4 - 4 * mean * e3 + 6 * mean ** 2 * e2 - 3 * mean ** 4, 0).tolist()  # central
        return out


def _parts(inputs) -> list:
    if isinstance(inputs, Mapping):
        return [(str(k), v) for k, v in inputs.items()]
    if isinstance(inputs, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(inputs)]
    return [("", inputs)]


class InputStats:
    """Per-channel statistics of the floating inputs, accumulated over the first :data:`MAX_ROWS` samples.

    ``axis`` is the channel axis of inputs with more than two axes (1 for PyTorch and ONNX
    ``(N, C, H, W)``, -1 for Keras ``(N, H, W, C)``); a table's features are its channels.
    """

    def __init__(self, axis: int = 1, reference: Optional[dict] = None, n_samples: Optional[int] = None):
        self.axis, self.reference = axis, reference
        self.parts: dict[str, _Part] = {}
        # Every stride-th sample is read, so the statistics cover the whole data (sorted data too).
        self.stride = max(1, -(-n_samples // MAX_ROWS)) if n_samples else 1
        self.seen = 0

    def add(self, inputs) -> None:
        parts = _parts(inputs)
        n = int(parts[0][1].shape[0])
        rows = np.arange((-self.seen) % self.stride, n, self.stride)
        self.seen += n
        if len(rows) == 0:
            return
        for key, value in parts:
            if not is_floating(value):
                continue
            x = to_numpy(value)
            x = x if self.stride == 1 else x[rows]
            ref = None if self.reference is None else self.reference.get(key)
            self.parts.setdefault(key, _Part(self.axis if x.ndim > 2 else 1)).add(x, ref)

    def to_dict(self) -> dict:
        return {key: p.summary() for key, p in self.parts.items() if p.sum is not None}

    def departure(self, name: str) -> Optional[str]:
        """A sentence saying how these inputs depart from ``reference`` (the training inputs), or None."""
        if not self.reference:
            return None
        found = []
        for key, part in self.parts.items():
            ref = self.reference.get(key)
            if ref is None or part.sum is None or len(ref["mean"]) != len(part.sum):
                continue
            got = part.summary()
            label = name if key == "" else f"{name}[{key!r}]"
            mean_t, std_t = np.asarray(ref["mean"]), np.asarray(ref["std"])
            smean_t = np.asarray(ref["sample_mean_std"])
            mean_q, std_q = np.asarray(got["mean"]), np.asarray(got["std"])
            shift = np.abs(mean_q - mean_t)
            # Bernstein's bound at the same level: the spread of per-sample means over sqrt(n), plus the training
            # range over n, which a few inputs of a skewed feature (a border pixel, mostly 0) need: one training
            # digit's rare pixel moved its mean 25x and warned
            n_q = max(got["n"], 1)
            span = np.asarray(ref["hi"]) - np.asarray(ref["lo"])
            tolerance = np.maximum(_MEAN_Z * smean_t / np.sqrt(n_q) + _MEAN_Z ** 2 * span / (3 * n_q),
                                   _MEAN_MIN_SHIFT * std_t)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(std_t > 0, std_q / std_t, np.where(std_q > 0, np.inf, 1.0))
            channel = "feature" if ref.get("table") else "channel"
            # a feature constant in training (a border pixel) moves in no mean or deviation a few inputs could judge:
            # the share of values outside the training range (below) judges it
            varying = std_t > 0
            bad_mean = np.flatnonzero((shift > tolerance + 1e-12) & varying)
            far = (ratio > _STD_RATIO) | (ratio < 1 / _STD_RATIO)
            if ref.get("m4") is not None and got.get("m4") is not None and len(ref["m4"]) == len(std_t):
                # (maps, and runs saved before: the ratio alone)
                # the standard errors of both variances, from the fourth moments (the larger one for the query's: a
                # sparse feature's few values move it), every sample counted once (one image's pixels are not
                # independent)
                m4_t, m4_q = np.asarray(ref["m4"]), np.asarray(got["m4"])
                se = np.sqrt(np.maximum(m4_t - std_t ** 4, 0) / max(ref["n"], 1)
                             + np.maximum(np.maximum(m4_t, m4_q) - std_q ** 4, 0) / max(got["n"], 1))
                far &= np.abs(std_q ** 2 - std_t ** 2) > _STD_Z * se
            bad_std = np.flatnonzero(far & varying) if got["n"] >= _MIN_ROWS_FOR_STD else np.empty(0, int)
            outside = part.outside / max(part.count * len(part.sum), 1)
            for c in sorted(set(bad_mean.tolist()) | set(bad_std.tolist()))[:1]:
                where = f" {channel} {c}" if len(mean_t) > 1 else ""
                found.append(f"{label}{where} has mean {mean_q[c]:.3g} and standard deviation {std_q[c]:.3g}, where the "
                             f"training inputs had {mean_t[c]:.3g} and {std_t[c]:.3g}")
            # a few rows leave a few values past a rare feature's range by chance: 3 of 8 rows x 64 pixels warned one
            # in-distribution batch in 40 (an outside check); below the rows the spread needs, ten times the share
            share = _OUTSIDE_SHARE if got["n"] >= _MIN_ROWS_FOR_STD else 10 * _OUTSIDE_SHARE
            if not found and outside > share and part.outside >= _OUTSIDE_MIN:
                # each value against its own feature's training range, as the message says (it gave the range over
                # every feature, which held the values said to lie outside: an outside check)
                span = f"[{min(ref['lo']):.3g}, {max(ref['hi']):.3g}]"
                found.append(f"{outside:.1%} of the values of {label} lie outside the training inputs' range"
                             + (f" of their own {channel} (every {channel}'s range lies within {span})"
                                if len(ref["lo"]) > 1 else f" {span}"))
        if not found:
            return None
        return ("; ".join(found) + ". Were these inputs prepared as the training inputs were (the same scaling or "
                "standardisation, the same channel order)? Results on inputs unlike the training data do not describe "
                "how the model behaves on its data.")
