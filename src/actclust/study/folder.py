"""The study folder: ``study.json`` as written by ``create`` and read by ``serve`` and ``analyze``.

Schema ``actclust.study/1``::

    {"schema": "actclust.study/1", "created": str, "seed": int,
     "design": "between" | "within", "two_stage": bool, "conditions": [str],
     "class_names": [str], "source": {...},           # run, data, actclust version, model class
     "feature_order": str?,                         # tabular inputs: how their tables are ordered
     "items": [{"id": int, "input": R, "label": int, "prediction": int, "confidence": float,
                "ai_right": bool, "attention": bool?,   # attention checks: label and ai_right null
                "feature_order": [int]?,                # tabular: its trial's tables listed in this order
                "views": {"similar": [sample id],
                          "similar_multiclass": [{"class": int, "probability": float, "samples": [sample id]}],
                          "concepts": [{"layer": str, "cluster": int, "weight": float,
                                        "class_mix": [float], "exemplars": [sample id]}],
                          "trust": {"surrogate_agrees": bool, "signals": {str: float}} | null}}],
     "samples": {"<training index>": {"input": R, "label": int | null, "prediction": int}}}

``R`` is a rendered input: ``{"kind": "image", "src": "data:image/png;base64,...", "width", "height"}``,
``{"kind": "table", "rows": [[name, value]], "more": int}`` (a tabular study's tables whole, in file order: a trial
lists them in its item's ``feature_order``, the first :data:`~actclust.views.render.MAX_TABLE` rows) or
``{"kind": "text", "text": str}``.
Only this module knows the layout; :meth:`Study.explanation` composes what a condition shows.
"""

from __future__ import annotations

import json
import numbers
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..exceptions import DataNotFoundError, InvalidSaveError
from ..views.render import MAX_TABLE

__all__ = ["SCHEMA", "CONDITIONS", "VIEWS", "Study", "load_study", "validate", "STUDY_FILE", "DB_FILE"]

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
_MAX_ID = 2 ** 63 - 1  # SQLite's largest integer: item ids are stored in its INTEGER columns


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

    def shown_input(self, item_id: int) -> dict:
        """The item's input as a trial shows it: a table in the item's feature order."""
        item = self.item(item_id)
        return _in_order(item["input"], item.get("feature_order"))

    def __post_init__(self):
        self._by_id = {it["id"]: it for it in self.data["items"]}

    def _sample(self, idx: int, order=None) -> dict:
        s = self.data["samples"][str(idx)]
        names = self.class_names
        return {"input": _in_order(s["input"], order), "label": s["label"],
                "label_name": None if s["label"] is None else names[s["label"]],
                "prediction": s["prediction"], "prediction_name": names[s["prediction"]]}

    def explanation(self, item_id: int, condition: str) -> Optional[dict]:
        """What ``condition`` shows beside the prediction for an item, images inlined; None for ``none``."""
        views = VIEWS[condition]
        if not views:
            return None
        item, names, out = self.item(item_id), self.class_names, {}
        v, order = item["views"], item.get("feature_order")
        if "similar" in views:
            out["similar"] = [self._sample(i, order) for i in v["similar"]]
        if "similar_multiclass" in views:
            out["similar_multiclass"] = [{"class": g["class"], "name": names[g["class"]],
                                          "probability": g["probability"],
                                          "samples": [self._sample(i, order) for i in g["samples"]]}
                                         for g in v["similar_multiclass"]]
        if "concepts" in views:
            out["concepts"] = [{"layer": c["layer"], "cluster": c["cluster"], "weight": c["weight"],
                                "class_mix": _top(c["class_mix"], names),
                                "exemplars": [self._sample(i, order) for i in c["exemplars"]]}
                               for c in v["concepts"]]
        if "trust" in views:
            out["trust"] = v["trust"]
        return out


def _in_order(rendered: dict, order) -> dict:
    """A table's rows in ``order`` (where it orders them all), the first :data:`MAX_TABLE`; others as they are."""
    if rendered.get("kind") != "table":
        return rendered
    rows = rendered["rows"]
    if order is not None and len(order) == len(rows):
        rows = [rows[j] for j in order]
    return {**rendered, "rows": rows[:MAX_TABLE], "more": rendered.get("more", 0) + max(0, len(rows) - MAX_TABLE)}


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
    # The study's own files are regular files in the folder: a link (dangling too) would make serve read or write
    # (SQLite's database, journal and write-ahead log) wherever it points, outside the folder.
    for name in (STUDY_FILE, DB_FILE, *(DB_FILE + s for s in ("-wal", "-shm", "-journal"))):
        entry = path / name
        if entry.is_symlink() or (os.path.lexists(entry) and not stat.S_ISREG(entry.lstat().st_mode)):
            raise InvalidSaveError(f"{entry} is not a regular file (a link, or something else): a study's files are "
                                   "its own; create the study again, or copy it with its files, not links.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError) as e:
        raise InvalidSaveError(f"{file}: cannot be read as JSON ({e}). Create the study again (actclust study "
                               "create).") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InvalidSaveError(f"{file} is not an actclust study of schema {SCHEMA!r} (schema: {got!r}).")
    missing = [k for k in ("conditions", "design", "two_stage", "seed", "class_names", "items", "samples")
               if k not in data]
    if missing:
        raise InvalidSaveError(f"{file} lacks the fields {missing}; create the study again.")
    validate(data, file)
    return Study(path, data)


def _no_constant(name: str):
    """JSON's non-standard ``NaN`` and ``Infinity`` refused: no field of a study holds them, and the API's answers
    could not carry them (participants got server errors)."""
    raise InvalidSaveError(f"{name} is not a number a study holds")


class _Bad(Exception):
    """One problem found by :func:`validate`, said as 'where: what'."""


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise _Bad(f"{where} {what}")


def validate(data: dict, file="study.json") -> None:
    """Check everything ``serve`` and ``analyze`` read from ``study.json``; raise :class:`InvalidSaveError`
    naming the first field that is wrong (an edited or damaged file is refused at start, not
    answered with errors while participants take part)."""
    try:
        _validate(data)
    except _Bad as e:
        raise InvalidSaveError(f"{file}: {e}. Create the study again (actclust study create) instead of editing "
                               "study.json.") from None


def _validate(data: dict) -> None:
    conditions = data["conditions"]
    _need(isinstance(conditions, list) and conditions and all(isinstance(c, str) for c in conditions),
          "'conditions'", f"must be a non-empty list of names from {list(VIEWS)}; it is {conditions!r}")
    unknown = [c for c in conditions if c not in VIEWS]
    _need(not unknown, "'conditions'", f"names unknown conditions {unknown}; known: {list(VIEWS)}")
    _need(len(set(conditions)) == len(conditions), "'conditions'", f"repeats a condition: {conditions}")
    _need(data["design"] in ("between", "within"), "'design'", f"must be 'between' or 'within', not {data['design']!r}")
    _need(isinstance(data["two_stage"], bool), "'two_stage'", f"must be true or false, not {data['two_stage']!r}")
    _need(_int(data["seed"], 0, _MAX_ID), "'seed'", f"must be an integer in [0, 2**63 - 1], not {data['seed']!r}")
    names = data["class_names"]
    _need(isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names), "'class_names'",
          "must be a list of at least 2 class names")
    n_classes, samples, items = len(names), data["samples"], data["items"]
    _need(isinstance(samples, dict), "'samples'", "must be an object of training samples")
    for key, sample in samples.items():
        where = f"sample {key!r}"
        _need(key.isdigit() and isinstance(sample, dict), where, "must be a training index with its sample")
        _need(_rendered(sample.get("input")), where, "has no rendered 'input'")
        _need(sample.get("label") is None or _int(sample.get("label"), 0, n_classes - 1), where,
              f"has a 'label' that is not a class index in [0, {n_classes - 1}]")
        _need(_int(sample.get("prediction"), 0, n_classes - 1), where,
              f"has a 'prediction' that is not a class index in [0, {n_classes - 1}]")
    _need(isinstance(items, list) and items, "'items'", "must be a non-empty list")
    seen = set()
    for j, item in enumerate(items):
        _need(isinstance(item, dict), f"item {j}", "must be an object")
        where = f"item {j} (id {item.get('id')!r})"
        _need(_int(item.get("id"), 0, _MAX_ID), where, "must have an integer 'id' in [0, 2**63 - 1]")
        _need(item["id"] not in seen, where, "repeats the id of an earlier item")
        seen.add(item["id"])
        _need(_rendered(item.get("input")), where, "has no rendered 'input'")
        if "feature_order" in item:  # a trial lists its tables' rows in this order: each row once
            order, shown = item["feature_order"], item["input"]
            _need(isinstance(order, list) and all(_int(f, 0, len(order) - 1) for f in order)
                  and len(set(order)) == len(order)
                  and (shown.get("kind") != "table" or len(shown.get("rows") or ()) == len(order)), where,
                  "has a 'feature_order' that is not an order of its table's rows")
        _need(_int(item.get("prediction"), 0, n_classes - 1), where,
              f"has a 'prediction' that is not a class index in [0, {n_classes - 1}]")
        conf = item.get("confidence")
        _need(isinstance(conf, numbers.Real) and not isinstance(conf, bool) and 0 <= conf <= 1, where,
              "has a 'confidence' that is not a probability")
        if item.get("attention"):
            _need(item.get("attention") is True, where, "has an 'attention' that is not true or false")
        else:
            _need(_int(item.get("label"), 0, n_classes - 1), where,
                  f"has a 'label' that is not a class index in [0, {n_classes - 1}]")
            _need(isinstance(item.get("ai_right"), bool), where, "has an 'ai_right' that is not true or false")
            _need(item["ai_right"] == (item["label"] == item["prediction"]), where,
                  "has an 'ai_right' that disagrees with its label and prediction")
        _views(item.get("views"), {v for c in conditions for v in VIEWS[c]}, where, samples, n_classes)
    real = sum(not it.get("attention") for it in items)
    _need(real > 0, "'items'", "holds only attention checks")
    _need(data["design"] == "between" or real >= len(conditions), "'items'",
          f"has {real} items for {len(conditions)} conditions; a within-subjects design needs one per condition")


def _rendered(value) -> bool:
    return isinstance(value, dict) and value.get("kind") in ("image", "table", "text")


def _views(views, needed: set, where: str, samples: dict, n_classes: int) -> None:
    _need(isinstance(views, dict), where, "has no 'views' (what each condition shows)")
    missing = sorted(needed - set(views))
    _need(not missing, where, f"lacks the views {missing} that its conditions show")

    def ids(value, what):
        _need(isinstance(value, list) and all(_int(i, 0, _MAX_ID) and str(i) in samples for i in value), where,
              f"has {what} that are not training samples of 'samples'")
    if "similar" in needed:
        ids(views["similar"], "'similar' samples")
    if "similar_multiclass" in needed:
        groups = views["similar_multiclass"]
        _need(isinstance(groups, list) and all(isinstance(g, dict) and _int(g.get("class"), 0, n_classes - 1)
                                               and isinstance(g.get("probability"), numbers.Real) for g in groups),
              where, "has 'similar_multiclass' groups without a class index and a probability")
        for g in groups:
            ids(g.get("samples"), "'similar_multiclass' samples")
    if "concepts" in needed:
        concepts = views["concepts"]
        _need(isinstance(concepts, list) and all(
            isinstance(c, dict) and isinstance(c.get("layer"), str) and _int(c.get("cluster"), 0, _MAX_ID)
            and isinstance(c.get("weight"), numbers.Real) and isinstance(c.get("class_mix"), list)
            and len(c["class_mix"]) == n_classes and all(isinstance(m, numbers.Real) for m in c["class_mix"])
            for c in concepts), where, f"has 'concepts' without a layer, cluster, weight and a class mix of "
                                       f"{n_classes} shares")
        for c in concepts:
            ids(c.get("exemplars"), "concept exemplars")
    if "trust" in needed:
        trust = views["trust"]
        _need(trust is None or (isinstance(trust, dict) and isinstance(trust.get("surrogate_agrees"), bool)
                                and isinstance(trust.get("signals"), dict)
                                and all(isinstance(v, numbers.Real) for v in trust["signals"].values())),
              where, "has 'trust' that is not {surrogate_agrees, signals}")
