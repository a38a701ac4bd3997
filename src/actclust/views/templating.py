"""The one Jinja2 environment of the views (notebook, explorer), with the filters their templates share.

Autoescape is on for every template (ours end in ``.j2``, which Jinja's default would not escape):
class names, feature names and text inputs come from users and are always shown as text.
"""

from __future__ import annotations

import functools
import math

__all__ = ["environment", "class_color", "cluster_color", "PALETTE"]

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def class_color(c: int) -> str:
    """The colour of class ``c``: a palette readable on light and dark backgrounds, then golden-angle hues."""
    c = int(c)
    if c < len(PALETTE):
        return PALETTE[c]
    return f"hsl({(c * 137.508) % 360:.0f}, 55%, 55%)"


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


def _thousands(n) -> str:
    return f"{int(n):,}"


@functools.lru_cache(maxsize=None)
def environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("actclust.views", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, pct=_pct, argmax=_argmax, thousands=_thousands)
    env.globals.update(color=class_color, cluster_color=cluster_color, zip=zip)
    return env
