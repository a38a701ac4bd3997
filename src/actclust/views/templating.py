"""The one Jinja2 environment of the views (notebook, explorer), with the filters their templates share.

Autoescape is on for every template (ours end in ``.j2``, which Jinja's default would not escape):
class names, feature names and text inputs come from users and are always shown as text.
"""

from __future__ import annotations

import functools
import math
import re

__all__ = ["environment", "class_color", "cluster_color", "isolated", "for_readers", "signal_title", "PALETTE", "DISTINCT_COLORS"]

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


_FSI, _PDI = "\u2068", "\u2069"  # Unicode's first strong isolate and pop directional isolate
_BIDI_CONTROLS = re.compile("[\u2066-\u2069]")  # isolates a name may carry: one left open would spill past it


def isolated(names) -> list:
    """Class names as the views show them: each between Unicode's first-strong isolate and its pop (U+2068, U+2069),
    so that a right-to-left name (Hebrew, Arabic) is laid out on its own and does not take the numbers beside it
    into its direction ("DNN: (0.98) 9 <name>" instead of "DNN: <name> (0.98)"). Invisible; in text and attributes
    alike, where HTML's ``<bdi>`` cannot go. Isolate controls inside a name are dropped first (an unmatched one would
    keep the text after the name isolated), so a name isolated twice reads as once."""
    return [f"{_FSI}{_BIDI_CONTROLS.sub('', n)}{_PDI}" for n in map(str, names)]


# The advice to a programmer at the end of a note's parenthesis: "(fit with them; in Python, also calibration=...)",
# "(held-out data holds more errors: in Python, trust={...}; the command line has no option for it)"
_CODE_ADVICE = re.compile(r"[;:]\s*in Python\b(?:[^()]|\([^()]*\))*(?=\)\s*$)")


def for_readers(notes) -> list:
    """Trust's notes as a page shows them to a reader of a report or of the explorer: without the advice to the
    Python caller some of them end with ("needs true labels (fit with them)"); the warning and the notebook, read by
    that caller, keep it."""
    return [_CODE_ADVICE.sub("", str(n)) for n in notes or ()]


#: Classes given colours of their own, each as far (in CIELAB) from all before it as a grid of mid-light colours allows.
DISTINCT_COLORS = 256


def class_color(c: int) -> str:
    """The colour of class ``c``: a palette readable on light and dark backgrounds, then, up to
    :data:`DISTINCT_COLORS`, each the colour of a grid farthest from every colour before it, then golden-angle hues.
    Golden-angle hues alone left the 100 colours of 100 classes 1.4 apart at the closest (CIELAB distance; 192 pairs
    under 10, hard to tell apart); chosen farthest first they are at least 13.7 apart."""
    c = int(c)
    if c < len(PALETTE):
        return PALETTE[c]
    if c < DISTINCT_COLORS:
        return _distinct_colors()[c]
    return f"hsl({(c * 137.508) % 360:.0f}, 55%, 55%)"


@functools.lru_cache(maxsize=1)
def _distinct_colors() -> tuple:
    """:data:`PALETTE`, then the colours of an HSL grid (mid lightness, visible on light and dark pages) added one by
    one, each the farthest in CIELAB from all chosen before it: the first ``n`` are as far apart as this greedy order
    makes any ``n``."""
    import colorsys

    import numpy as np

    grid = [colorsys.hls_to_rgb(h / 360, light, sat) for h in range(0, 360, 4) for sat in (.4, .55, .7)
            for light in (.35, .48, .62)]
    chosen = [tuple(int(p[i:i + 2], 16) / 255 for i in (1, 3, 5)) for p in PALETTE]
    lab = _lab(np.array(grid))
    nearest = np.min([np.linalg.norm(lab - v, axis=1) for v in _lab(np.array(chosen))], 0)
    while len(chosen) < DISTINCT_COLORS:
        j = int(np.argmax(nearest))
        chosen.append(grid[j])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[j], axis=1))
    return PALETTE + tuple("#" + "".join(f"{round(255 * v):02x}" for v in rgb) for rgb in chosen[len(PALETTE):])


def _lab(rgb):
    """CIELAB (D65) of sRGB colours ``(n, 3)`` in [0, 1]: distances there follow how far apart colours look."""
    import numpy as np

    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), xyz * 24389 / 27 / 116 + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def cluster_color(c: int) -> str:
    """The colour of cluster ``c`` on a layer's map: golden-angle hues, apart from the class palette's."""
    return f"hsl({(int(c) * 137.508 + 20) % 360:.0f}, 65%, 48%)"


def _num(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    v = float(v)
    if math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * float(v):.0f}%"


def _argmax(values) -> int:
    values = list(values)
    return max(range(len(values)), key=values.__getitem__) if values else 0


#: Trust signals as the pages name them (the others: their key, "_" read as a space)
_SIGNAL_TITLES = {"dnn_confidence": "DNN confidence", "surrogate_dnn_agreement": "surrogate-DNN agreement",
                  "knn_typicality": "kNN typicality", "ood_typicality": "OOD typicality",
                  "dknn_prediction": "DkNN prediction"}


def signal_title(key) -> str:
    """A trust signal's name on a page: "DNN confidence" for ``dnn_confidence`` (it read "dnn confidence")."""
    return _SIGNAL_TITLES.get(str(key), str(key).replace("_", " "))


def _thousands(n) -> str:
    return f"{int(n):,}"


@functools.lru_cache(maxsize=None)
def environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("actclust.views", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, pct=_pct, argmax=_argmax, thousands=_thousands, signal=signal_title)
    from ..analysis.trust import MEANINGS

    env.globals.update(color=class_color, cluster_color=cluster_color, zip=zip, meaning=MEANINGS)
    return env
