"""Turning one input into something a report can show: an inlined PNG, a table of features, or text.

What :class:`Renderer` returns, the form every view (report, notebook, explorer, study) reads:

* ``{"kind": "image", "src": "data:image/png;base64,...", "width": int, "height": int}``;
* ``{"kind": "table", "rows": [(name, value), ...], "more": int}``: at most ``MAX_FEATURES`` rows, in the
  order asked for (:mod:`actclust.views.features` puts the features that matter for the input first),
  values in the data's own units when ``mean``/``std`` are given; ``more`` counts the rows left out;
  with ``rest=``, ``"rest"`` holds further rows that a page folds (opened on a click);
* ``{"kind": "text", "text": str}``: a ``render`` that returned a string, or a token sequence, which also
  carries ``"tokens": [[token, is_special], ...]`` (padding left out), ``"hidden"`` (padding tokens not
  shown) and ``"more"`` (tokens beyond ``max_tokens``);
* ``{"kind": "error", "text": str}``: a placeholder naming the input that could not be drawn.
"""

from __future__ import annotations

import base64
import struct
import warnings
import zlib
from typing import Callable, Optional

import numpy as np

from ..exceptions import ActClustError, DataError, DataWarning, ParameterError, RenderWarning, user_stacklevel

MAX_FEATURES = 12
#: A feature table holds at most this many rows (shown, and folded: see ``rest``); more are counted, not listed.
MAX_TABLE = 1000
_MAX_FEATURES = MAX_FEATURES
MAX_TOKENS = 128
_IDS_KEYS = ("input_ids", "ids", "tokens")
_MASK_KEYS = ("attention_mask", "mask")


#: Training rows the model is run on to check that ``train`` is the data ``fit`` saw, in its order.
TRAIN_CHECK_ROWS = 64


def check_train_length(state, train) -> None:
    """``train`` (to draw training samples) as long as the training data ``fit`` saw."""
    from ..capture.data import length

    if train is not None and length(train) != state.n_samples:
        raise DataError(f"train has {length(train)} samples but the explainer was fitted on {state.n_samples}; "
                        "pass the same training data, in the same order.")


def check_train(ac, train) -> None:
    """``train`` checked to be the training inputs ``fit`` saw, in order: as long (else refused), and the model's
    predictions on :data:`TRAIN_CHECK_ROWS` of its rows, spread over it, those ``fit`` recorded (else a
    :class:`DataWarning`: a shuffled copy of the same length drew other samples' pictures as similar samples and
    exemplars without a word; a warning, as a random model or pipeline disagrees with itself too)."""
    from ..capture.data import take

    state = ac.state_
    check_train_length(state, train)
    if train is None:
        return
    rows = np.unique(np.linspace(0, state.n_samples - 1, min(state.n_samples, TRAIN_CHECK_ROWS)).astype(np.int64))
    try:
        agree = float(np.mean(ac.query(take(train, rows)).dnn_pred == state.train_predictions[rows]))
    except ActClustError:  # rows the model does not take as they are (a dict with more keys than fit's): not checked
        return
    if agree < 0.9:  # the same model on the same rows gives the same predictions, up to a rare tie on another device
        warnings.warn(f"train may not be the training data fit saw, in its order: the model's predictions on "
                      f"{len(rows)} of its rows agree with fit's on {agree:.0%} of them, so the pictures of training "
                      "samples may be of other samples. Pass the same training data, in the same order (not "
                      "shuffled); a model or data pipeline that is random (dropout at inference, augmentation) "
                      "explains it too.", DataWarning, stacklevel=user_stacklevel())


def check_mean_std(spec, mean, std, channel_axis: int = 1) -> None:
    """Refuse, before any drawing, ``mean``/``std`` that cannot fit the fitted inputs (``spec``: the state's
    :class:`~actclust.state.InputSpec`; ``channel_axis``: the adapter's, 1 or -1 of a batch): one value, or one
    per feature of a table or per channel of an image. A bad pair was found picture by picture: a report of
    placeholders and a warning each. Arrays of any framework (a tensor's ``size`` is a method, not a number)."""
    if mean is None and std is None:
        return
    for name, v in (("mean", mean), ("std", std)):  # numbers, or arrays of them ('x' failed at the first picture)
        values = v.detach().cpu().numpy() if hasattr(v, "detach") else v
        if v is not None and (isinstance(v, (str, bytes)) or np.asarray(values).dtype.kind not in "biuf"):
            raise ParameterError(f"{name} must be a number or an array of numbers (one per channel or feature). "
                                 f"Got {v!r} instead.")
        # finite, and a positive std: std=0 or mean=nan drew every picture blank or wrong, without a word (an outside
        # check), and std=inf warned in NumPy's words
        a = None if v is None else np.asarray(values, dtype=np.float64)
        if a is not None and (not np.isfinite(a).all() or (name == "std" and (a <= 0).any())):
            raise ParameterError(f"{name} must hold finite numbers{', each above 0' if name == 'std' else ''} (it "
                                 f"undoes the inputs' normalisation: x * std + mean). Got {v!r} instead.")
    if spec is None or spec.kind != "tensor":
        return
    shape = tuple(spec.shape)
    if len(shape) == 1:
        allowed, what = {1, shape[0]}, "feature"
    elif len(shape) >= 3:
        allowed, what = {1, shape[channel_axis - 1 if channel_axis > 0 else channel_axis]}, "channel"
    else:
        allowed, what = {1}, "image"
    sizes = {name: int(np.prod(tuple(getattr(v, "shape", np.shape(v))), dtype=np.int64))
             for name, v in (("mean", mean), ("std", std)) if v is not None}
    bad = {k: v for k, v in sizes.items() if v not in allowed}
    if bad:
        per = f" or one per {what} ({max(allowed)})" if len(allowed) > 1 else ""
        raise ParameterError(f"{' and '.join(f'{k} has {v} values' for k, v in bad.items())}, but the inputs, of shape "
                             f"{shape} per sample, take one value{per}.")


class Renderer:
    """Renders inputs for the HTML report; never raises on a bad input, shows a placeholder.

    Parameters
    ----------
    render : callable, optional
        ``render(x) -> str | array``: text, or an image ``(H, W)``, ``(H, W, 3)`` or ``(C, H, W)``
        with values in [0, 1] (float) or 0-255 (uint8). Overrides the defaults below.
    mean, std : float or sequence, optional
        The normalisation the model's inputs went through, ``x_model = (x - mean) / std``: images are
        shown as ``x * std + mean`` (one value, or one per channel), feature rows in their own units
        the same way (one value, or one per feature). Without them, images outside [0, 1] are
        min-max scaled each, and feature rows show the model's values.
    feature_names : sequence of str, optional
        Names of the features of 1-D (tabular) inputs.
    tokenizer : optional
        How token ids become text: a Hugging Face tokenizer (``convert_ids_to_tokens``), a function
        ``ids -> list of str``, or a vocabulary (a list indexed by id, or a dict id -> token). Token
        inputs are 1-D integer inputs, or a dict/tuple whose ``input_ids`` (else first 1-D integer
        part) are the ids; their ``attention_mask`` hides the padding (without a mask, trailing pad
        ids: the tokenizer's ``pad_token_id``, else 0). Without a tokenizer the ids are shown.
    max_tokens : int, default=128
        Tokens shown per input; the rest are counted.
    """

    def __init__(self, render: Optional[Callable] = None, mean=None, std=None, feature_names=None, tokenizer=None,
                 max_tokens: int = MAX_TOKENS):
        self.render, self.feature_names, self.tokenizer, self.max_tokens = render, feature_names, tokenizer, max_tokens
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        self.failures: list = []

    def __call__(self, x, what: str, order=None, max_rows: int = MAX_FEATURES, rest: int = 0) -> dict:
        """``x`` drawn (see the module's docstring); ``order``: feature indices of a table, first shown
        first; ``max_rows``: rows of a table (fewer for the small tables beside another); ``rest``: up to this
        many further rows, as ``"rest"`` (a page folds them: the rows past the first still open)."""
        try:
            if self.render is not None:
                return self._from_user(self.render(x))
            if isinstance(x, (dict, tuple)):  # a model with several inputs: tokens, else one row per input
                ids, mask = _token_parts(x)
                return self._tokens(ids, mask) if ids is not None else _parts_table(x)
            x = np.asarray(x)
            if x.ndim == 1 and x.dtype.kind in "iub":  # token ids (an embedding's input)
                return self._tokens(x, None)
            return self._default(x, order, max_rows, rest)
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

    def table_values(self, x: np.ndarray) -> np.ndarray:
        """A feature row in the data's own units: ``x * std + mean`` (one value, or one per feature)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if self.mean is None and self.std is None:
            return x
        mean = np.zeros(1) if self.mean is None else self.mean.reshape(-1).astype(np.float64)
        std = np.ones(1) if self.std is None else self.std.reshape(-1).astype(np.float64)
        if {mean.size, std.size} - {1, x.size}:
            raise DataError(f"mean/std give {mean.size}/{std.size} values for a row of {x.size} features; "
                            "give one value, or one per feature")
        return x * std + mean

    def _default(self, x: np.ndarray, order=None, max_rows: int = MAX_FEATURES, rest: int = 0) -> dict:
        if x.ndim == 1:
            names = self.feature_names or [f"x{i}" for i in range(len(x))]
            if len(names) != len(x):
                raise DataError(f"{len(names)} feature names for {len(x)} features")
            values = self.table_values(x)
            shown = np.arange(len(x)) if order is None else np.asarray(order, dtype=np.int64).reshape(-1)
            rows = [(str(names[j]), _number(values[j])) for j in shown[:max_rows]]
            folded = [(str(names[j]), _number(values[j])) for j in shown[max_rows:max_rows + max(rest, 0)]]
            out = {"kind": "table", "rows": rows, "more": max(0, len(x) - len(rows) - len(folded))}
            return {**out, "rest": folded} if folded else out
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


    def _tokens(self, ids, mask) -> dict:
        """Token ids as a strip of tokens (padding hidden) and as text."""
        ids = np.asarray(ids).reshape(-1).astype(np.int64)
        if mask is not None:
            keep = np.asarray(mask).reshape(-1)[:len(ids)].astype(bool)
        else:  # no mask: trailing pad ids are padding
            pad = getattr(self.tokenizer, "pad_token_id", None)
            pad = 0 if pad is None else int(pad)
            end = len(ids)
            while end > 0 and ids[end - 1] == pad:
                end -= 1
            keep = np.arange(len(ids)) < end
        visible = ids[keep]
        shown = visible[:self.max_tokens].tolist()
        words = self._words(shown)
        special = set(int(i) for i in getattr(self.tokenizer, "all_special_ids", []) or [])
        text = self._text(words) if self.tokenizer is not None else " ".join(words)
        if len(visible) > len(shown):  # the tooltip of a thumbnail shows the text: cut, it said so nowhere
            text += f" … (+{len(visible) - len(shown)} more tokens)"
        return {"kind": "text", "text": text, "tokens": [[w, i in special] for w, i in zip(words, shown)],
                "hidden": int((~keep).sum()), "more": int(len(visible) - len(shown)),
                "ids": self.tokenizer is None}

    def _words(self, ids: list) -> list:
        tok = self.tokenizer
        if tok is None:
            return [str(i) for i in ids]
        if hasattr(tok, "convert_ids_to_tokens"):  # Hugging Face
            words = tok.convert_ids_to_tokens(ids)
            unknown = [i for i, w in zip(ids, words) if w is None]  # ids beyond its vocabulary: shown as "None"
            if unknown:
                words = [f"[{i}]" if w is None else w for i, w in zip(ids, words)]
                if not getattr(self, "_said_unknown", False):
                    self._said_unknown = True
                    warnings.warn(f"The tokenizer has no token for the ids {sorted(set(unknown))[:5]} (its vocabulary "
                                  f"holds {len(tok)}): is it the model's tokenizer? They are shown as [id].",
                                  RenderWarning, stacklevel=user_stacklevel())
        elif isinstance(tok, dict):
            words = [tok.get(i, f"[{i}]") for i in ids]
        elif isinstance(tok, (list, tuple)):
            words = [tok[i] if 0 <= i < len(tok) else f"[{i}]" for i in ids]
        elif callable(tok):
            words = tok(ids)
        else:
            raise DataError(f"tokenizer is a {type(tok).__name__}; give a Hugging Face tokenizer, a function "
                            "ids -> list of str, or a vocabulary (list or dict)")
        words = [str(w) for w in words]
        if len(words) != len(ids):
            raise DataError(f"the tokenizer gave {len(words)} tokens for {len(ids)} ids")
        return words

    def _text(self, words: list) -> str:
        join = getattr(self.tokenizer, "convert_tokens_to_string", None)
        if join is not None:
            try:
                return str(join(list(words)))
            except Exception:  # a tokenizer that cannot join these tokens: spaces will do
                pass
        return " ".join(words)


def _number(v: float) -> str:
    return f"{float(v):.4g}"


def _token_parts(x):
    """``(ids, mask)`` of a dict or tuple input holding token ids, else ``(None, None)``."""
    items = list(x.items()) if isinstance(x, dict) else list(enumerate(x))
    arrays = [(k, np.asarray(v)) for k, v in items]
    ints = [(k, v) for k, v in arrays if v.ndim == 1 and v.dtype.kind in "iu"]
    if not ints:
        return None, None
    ids = next((v for k, v in ints if k in _IDS_KEYS), None)
    ids_key = next((k for k, v in ints if k in _IDS_KEYS), None)
    if ids is None:
        ids_key, ids = ints[0]
    mask = next((v for k, v in arrays if k in _MASK_KEYS and v.shape == ids.shape), None)
    if mask is None and not isinstance(x, dict):  # a tuple: a 0/1 part as long as the ids is the mask
        mask = next((v for k, v in arrays if k != ids_key and v.shape == ids.shape and v.dtype.kind in "iub"
                     and np.isin(v, (0, 1)).all()), None)
    return ids, mask


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
