"""The study folder: ``study.json`` as written by ``create`` and read by ``serve`` and ``analyze``.

Schema ``actclust.study/1``::

    {"schema": "actclust.study/1", "created": str, "seed": int,
     "design": "between" | "within", "two_stage": bool, "conditions": [str],
     "class_names": [str], "source": {...},           # run, data, actclust version, model class
     "items": [{"id": int, "input": R, "label": int, "prediction": int, "confidence": float,
                "ai_right": bool, "attention": bool?,   # attention checks: label and ai_right null
                "views": {"similar": [sample id],
                          "similar_multiclass": [{"class": int, "probability": float, "samples": [sample id]}],
                          "concepts": [{"layer": str, "cluster": int, "weight": float,
                                        "class_mix": [float], "exemplars": [sample id]}],
                          "trust": {"surrogate_agrees": bool, "signals": {str: float}} | null}}],
     "samples": {"<training index>": {"input": R, "label": int | null, "prediction": int}}}

``R`` is a rendered input: ``{"kind": "image", "src": "data:image/png;base64,...", "width", "height"}``,
``{"kind": "table", "rows": [[name, value]], "more": int}`` or ``{"kind": "text", "text": str}``.
Only this module knows the layout; :meth:`Study.explanation` composes what a condition shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..exceptions import DataNotFoundError, InvalidSaveError

__all__ = ["SCHEMA", "CONDITIONS", "VIEWS", "Study", "load_study", "STUDY_FILE", "DB_FILE"]

SCHEMA = "actclust.study/1"
STUDY_FILE, DB_FILE = "study.json", "responses.sqlite"
# What each condition shows beside the prediction, as views of the item (see the schema above).
VIEWS = {
    "none": (),
    "similar": ("similar",),
    "similar_multiclass": ("similar_multiclass",),
    "concepts": ("concepts",),
    "full": ("similar", "concepts", "trust"),
}
CONDITIONS = tuple(VIEWS)
_TOP_CLASSES = 3  # classes of a concept's class mix shown


@dataclass
class Study:
    """A loaded study folder; ``data`` is ``study.json`` as a dict."""

    path: Path
    data: dict

    @property
    def conditions(self) -> list:
        return list(self.data["conditions"])

    @property
    def design(self) -> str:
        return self.data["design"]

    @property
    def two_stage(self) -> bool:
        return bool(self.data["two_stage"])

    @property
    def seed(self) -> int:
        return int(self.data["seed"])

    @property
    def class_names(self) -> list:
        return list(self.data["class_names"])

    @property
    def items(self) -> list:
        return self.data["items"]

    @property
    def db_path(self) -> Path:
        return self.path / DB_FILE

    def item(self, item_id: int) -> dict:
        return self._by_id[item_id]

    def __post_init__(self):
        self._by_id = {it["id"]: it for it in self.data["items"]}

    def _sample(self, idx: int) -> dict:
        s = self.data["samples"][str(idx)]
        names = self.class_names
        return {"input": s["input"], "label": s["label"],
                "label_name": None if s["label"] is None else names[s["label"]],
                "prediction": s["prediction"], "prediction_name": names[s["prediction"]]}

    def explanation(self, item_id: int, condition: str) -> Optional[dict]:
        """What ``condition`` shows beside the prediction for an item, images inlined; None for ``none``."""
        views = VIEWS[condition]
        if not views:
            return None
        v, names, out = self.item(item_id)["views"], self.class_names, {}
        if "similar" in views:
            out["similar"] = [self._sample(i) for i in v["similar"]]
        if "similar_multiclass" in views:
            out["similar_multiclass"] = [{"class": g["class"], "name": names[g["class"]],
                                          "probability": g["probability"],
                                          "samples": [self._sample(i) for i in g["samples"]]}
                                         for g in v["similar_multiclass"]]
        if "concepts" in views:
            out["concepts"] = [{"layer": c["layer"], "cluster": c["cluster"], "weight": c["weight"],
                                "class_mix": _top(c["class_mix"], names),
                                "exemplars": [self._sample(i) for i in c["exemplars"]]}
                               for c in v["concepts"]]
        if "trust" in views:
            out["trust"] = v["trust"]
        return out


def _top(mix: list, names: list) -> list:
    order = sorted(range(len(mix)), key=lambda c: -mix[c])[:_TOP_CLASSES]
    return [{"class": c, "name": names[c], "share": mix[c]} for c in order if mix[c] > 0]


def load_study(path) -> Study:
    """Read a study folder written by ``actclust study create``."""
    path = Path(path)
    file = path / STUDY_FILE
    if not file.is_file():
        raise DataNotFoundError(f"{path} is not a study folder: it has no {STUDY_FILE}; make one with "
                                "actclust study create RUN --data DATA --out FOLDER.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidSaveError(f"Cannot read {file} as JSON ({e}); create the study again.") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InvalidSaveError(f"{file} is not an actclust study of schema {SCHEMA!r} (schema: {got!r}).")
    missing = [k for k in ("conditions", "design", "two_stage", "seed", "class_names", "items", "samples")
               if k not in data]
    if missing:
        raise InvalidSaveError(f"{file} lacks the fields {missing}; create the study again.")
    unknown = [c for c in data["conditions"] if c not in VIEWS]
    if unknown:
        raise InvalidSaveError(f"{file} names unknown conditions {unknown}; known: {list(VIEWS)}.")
    return Study(path, data)
