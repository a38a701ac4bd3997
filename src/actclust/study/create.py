"""Build a study folder from a fitted explainer: pick the items and pre-render every condition.

The only module of :mod:`actclust.study` that needs the model (and torch): everything a trial
shows is computed here once and written to ``study.json`` (schema in :mod:`.folder`).
"""

from __future__ import annotations

import datetime
import json
import numbers
import os
from pathlib import Path

import numpy as np

from ..io import atomic
from ..exceptions import DataError, ParameterError, RunExistsError
from .folder import CONDITIONS, DB_FILE, SCHEMA, STUDY_FILE

__all__ = ["create_study"]

_MULTICLASS_TOP, _PER_CLASS, _EXEMPLARS = 3, 2, 4  # top classes, samples per class, exemplars per layer


def create_study(ac, X, y, out, *, train=None, items: int = 40, wrong_share: float = 0.5,
                 conditions=CONDITIONS, design: str = "between", two_stage: bool = False, seed: int = 0,
                 class_names=None, feature_names=None, render=None, mean=None, std=None, k: int = 6,
                 attention_checks: int = 0, overwrite: bool = False, source=None, tokenizer=None) -> Path:
    """Write a study folder for the fitted explainer ``ac`` on labelled inputs ``X, y``.

    Parameters
    ----------
    X, y : inputs the model did not train on, and their true labels (needed: a study asks
        whether people accept the model's right predictions and reject its wrong ones).
    out : path of the study folder; an existing study is replaced only with ``overwrite=True``,
        and never one that holds responses.
    train : the training inputs ``fit`` saw, in order, to show similar samples and exemplars
        (without it they appear as their training indices).
    items : int, default=40
        Items drawn at random, stratified by whether the model is right on them.
    wrong_share : float in [0, 1], default=0.5
        Share of the items the model gets wrong (half, as in Schemmer et al. 2023).
    conditions : sequence of {"none", "similar", "similar_multiclass", "concepts", "full"}
    design : {"between", "within"}
    two_stage : bool
        Ask each participant's own answer before showing the advice.
    class_names, feature_names, render, mean, std, tokenizer
        How classes and inputs are shown; as in :func:`actclust.report` (``tokenizer``: token ids shown as
        tokens, padding hidden; without it participants see the ids). A tabular input's table lists its
        features in the report's order (with ``train``: those along which the input departs from the mean
        like the samples it is grouped with, first), and every table of a trial, its samples' too, in the
        item's order; the first :data:`~actclust.views.render.MAX_FEATURES` are shown, the others open on a click.
    k : int, default=6
        Similar samples shown per trial.
    attention_checks : int, default=0
        Extra trials whose input is the instruction to reject with confidence 4 (shown with a
        real item's prediction and explanation); :mod:`.analyze` leaves them out of the metrics
        and, by default, leaves out the participants who fail one.
    source : dict, optional
        Provenance to record (e.g. the run folder and data it came from).

    Returns
    -------
    Path
        The study folder.
    """
    from ..analysis import retrieval
    from ..capture.data import length, rows, take
    from ..views.features import feature_order
    from ..views.render import MAX_FEATURES, Renderer

    state = ac.state_
    conditions = _check(items, wrong_share, conditions, design, seed, k)
    if not isinstance(attention_checks, numbers.Integral) or isinstance(attention_checks, bool) or attention_checks < 0:
        raise ParameterError(f"attention_checks must be an int >= 0. Got {attention_checks!r} instead.")
    out = Path(out)
    atomic.check_can_write(out, "create the study in")  # a read-only place is said before the work, not after it
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"{out} is a file; give a folder for the study (a new one is created).")
    if os.path.lexists(out / DB_FILE):
        from .db import count_taken_part

        counts = count_taken_part(out / DB_FILE)
        if counts is not None and counts == (0, 0):
            raise RunExistsError(
                f"{out} was served ({DB_FILE} exists) but nobody took part yet (0 sessions, 0 responses); a served "
                f"study is never replaced while its server may run. Stop the server, delete {out / DB_FILE} (and its "
                "-wal and -shm files, if any), then create the study again; or choose another folder.")
        held = "" if counts is None else f": {counts[0]} sessions, {counts[1]} responses"
        raise RunExistsError(f"{out} holds collected responses ({DB_FILE}{held}); a study with responses is never "
                             "replaced. Choose another folder.")
    if (out / STUDY_FILE).exists() and not overwrite:
        raise RunExistsError(f"{out} already holds a study; pass overwrite=True (--overwrite) to replace it.")
    if (out / STUDY_FILE).exists():  # replaced only if it is a study (checked as serve checks it)
        from ..exceptions import ActClustError
        from .folder import load_study

        try:
            load_study(out)
        except ActClustError as e:
            raise RunExistsError(f"{out / STUDY_FILE} is not an actclust study ({e}); --overwrite replaces only a study. "
                                 "Choose another folder.") from None
    if y is None:
        raise DataError("A study needs the true labels y of X: it measures whether people accept the model's "
                        "right predictions and reject its wrong ones.")
    y = np.asarray(y).reshape(-1)
    if len(y) != length(X):
        raise DataError(f"y has {len(y)} labels for {length(X)} inputs; give one label per input.")
    from ..analysis.explanation import check_class_names
    from ..views.render import check_mean_std, check_train

    names = check_class_names(state, class_names) or [str(c) for c in range(state.n_classes)]
    check_mean_std(state.input_spec, mean, std, ac._adapter().input_channel_axis)
    check_train(ac, train)

    q = ac.query(X, y)
    chosen = _pick(q.dnn_pred == y, items, wrong_share, seed)
    picked = take(X, chosen)
    explanations = ac.explain(picked, y[chosen], k=k, class_names=names)
    train_classes = state.train_labels if state.train_labels is not None else state.train_predictions
    shown_classes = _top_classes(q.dnn_proba[chosen], np.bincount(train_classes, minlength=state.n_classes))
    per_class = retrieval.search_by_class(state, ac.query(picked, vectors=True), shown_classes, _PER_CLASS,
                                          retrieval.layer_weights("high", state.layers))
    renderer = Renderer(render, mean=mean, std=std, feature_names=feature_names or state.input_spec.feature_names,
                        tokenizer=tokenizer)
    # Tables are kept whole, in file order, and the server lists every table of a trial in its item's order (samples
    # are shared between items), the first MAX_TABLE rows of each (an outside check found tables in file order, the
    # rows past the first twelve out of reach)
    order = feature_order(state, train, mean, std, ac.label_key, render)
    whole = state.input_spec.shape[0] if order is not None else MAX_FEATURES
    records = []
    for j, (e, x) in enumerate(zip(explanations, rows(X, chosen, label_key=ac.label_key))):
        i, proba = int(chosen[j]), q.dnn_proba[chosen[j]]
        multi = [{"class": int(c), "probability": float(proba[c]), "samples": [int(t) for t in ids if t >= 0]}
                 for c, ids in zip(shown_classes[j], per_class[j])]
        ranked = order.of_input(x, e.layers[-1]["cluster"]) if order is not None else None
        records.append({
            "id": j, "row": i, "input": renderer(x, f"input {i}", max_rows=whole), "label": int(y[i]),
            **({"feature_order": [int(f) for f in ranked]} if ranked is not None else {}),
            "prediction": int(q.dnn_pred[i]), "confidence": float(proba[q.dnn_pred[i]]),
            "ai_right": bool(q.dnn_pred[i] == y[i]),
            "views": {
                "similar": [s["index"] for s in e.similar["high"][:k]],
                "similar_multiclass": multi,
                "concepts": [{"layer": l["layer"], "cluster": l["cluster"], "weight": l["weight"],
                              "class_mix": l["class_mix"], "exemplars": l["exemplars"][:_EXEMPLARS]} for l in e.layers],
                "trust": {"surrogate_agrees": e.surrogate["prediction"] == e.dnn["prediction"],
                          "signals": dict(e.trust or {})},
            }})
    records += _attention_items(records, attention_checks, seed, two_stage)
    shown = sorted({t for r in records for t in _sample_ids(r["views"])})
    if train is None:
        pictures = {t: {"kind": "text", "text": f"training sample #{t}"} for t in shown}
    else:
        pictures = {t: renderer(x, f"training sample {t}", max_rows=whole)
                    for t, x in zip(shown, rows(train, shown, label_key=ac.label_key, name="train"))}
    samples = {str(t): {"input": pictures[t], "prediction": int(state.train_predictions[t]),
                        "label": None if state.train_labels is None else int(state.train_labels[t])} for t in shown}
    data = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seed": int(seed), "design": design, "two_stage": bool(two_stage), "conditions": conditions,
            "class_names": names, "source": {**ac.provenance(), **(source or {})},
            "construction": describe(conditions, k=k, labels=state.train_labels is not None),
            **({"feature_order": order.note} if order is not None else {}),
            "render_failures": renderer.failures, "items": records, "samples": samples}
    with atomic.folder(out):
        atomic.write(out / STUDY_FILE, json.dumps(data).encode("utf-8"), what="study", replace=overwrite)
    return out


def _top_classes(proba: np.ndarray, train_counts: np.ndarray) -> np.ndarray:
    """Per item, the ``_MULTICLASS_TOP`` most likely classes that have training samples to show."""
    order = np.argsort(-proba, axis=1, kind="stable")
    usable = [c for c in range(proba.shape[1]) if train_counts[c] > 0]
    if len(usable) < min(_MULTICLASS_TOP, proba.shape[1]):
        raise DataError(f"similar_multiclass shows the {_MULTICLASS_TOP} most likely classes, but only classes {usable} "
                        "have training samples.")
    return np.array([[c for c in row if train_counts[c] > 0][:_MULTICLASS_TOP] for row in order], dtype=np.int64)


def describe(conditions, *, k: int, labels: bool = True) -> dict:
    """What each condition shows, and how it was built: recorded in study.json and printed by the CLI."""
    kind = "labelled" if labels else "predicted (fit had no labels)"
    text = {
        "none": "the prediction and its confidence, nothing else",
        "similar": f"the {k} training samples nearest the input over all layers (layer weights 'high': the last layer "
                   "counts ten times the first; the run's search, exact or approximate)",
        "similar_multiclass": f"for each of the model's {_MULTICLASS_TOP} most likely classes that have training "
                              f"samples, the {_PER_CLASS} training samples {kind} as that class nearest the input, "
                              "searched within the class (layer weights 'high', exact search)",
        "concepts": f"per layer, the cluster the input falls in: its class mix (top 3 classes) and {_EXEMPLARS} "
                    "exemplars (training samples nearest the cluster's centre)",
        "full": f"similar ({k} nearest training samples) + concepts + trust signals (whether the clustering surrogate "
                "agrees with the model, and the signals of trust())",
    }
    return {c: text[c] for c in conditions}


def _check(items, wrong_share, conditions, design, seed, k) -> list:
    for name, value, low in (("items", items, 1), ("k", k, 1), ("seed", seed, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ParameterError(f"{name} must be an int >= {low}. Got {value!r} instead.")
    if not isinstance(wrong_share, numbers.Real) or not 0 <= wrong_share <= 1:
        raise ParameterError(f"wrong_share must be a number in [0, 1]. Got {wrong_share!r} instead.")
    conditions = [conditions] if isinstance(conditions, str) else list(conditions)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions or len(set(conditions)) != len(conditions):
        raise ParameterError(f"conditions must be distinct names from {list(CONDITIONS)}. Got {conditions!r} instead.")
    if design not in ("between", "within"):
        raise ParameterError(f"design must be one of ['between', 'within']. Got {design!r} instead.")
    if design == "within" and items < len(conditions):
        raise ParameterError(f"A within-subjects design shows each of the {len(conditions)} conditions on different "
                             f"items, so it needs items >= {len(conditions)}. Got items={items}.")
    return conditions


def _pick(right: np.ndarray, items: int, wrong_share: float, seed: int) -> np.ndarray:
    """Item rows, stratified by AI correctness, in a seeded random order."""
    n_wrong = int(round(items * wrong_share))
    have = {"right": int(right.sum()), "wrong": int((~right).sum())}
    for what, need in (("wrong", n_wrong), ("right", items - n_wrong)):
        if need > have[what]:
            raise ParameterError(f"items={items} with wrong_share={wrong_share} needs {need} inputs the model gets "
                                 f"{what}, but the data has {have[what]} ({have['right']} right, {have['wrong']} "
                                 "wrong); lower items (--items) or change wrong_share (--wrong-share).")
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(~right), n_wrong, replace=False),
                             rng.choice(np.flatnonzero(right), items - n_wrong, replace=False)])
    return rng.permutation(chosen)


ATTENTION_TEXT = "Attention check: whatever the AI says, choose Reject and confidence 4."
#: Two stages ask first for the participant's own answer, where Reject is not offered (only the second counts).
ATTENTION_TEXT_TWO_STAGE = ("Attention check: when asked what this is, choose any class; then, whatever the AI says, "
                            "choose Reject and confidence 4.")


def _attention_items(records: list, n: int, seed: int, two_stage: bool = False) -> list:
    """``n`` attention-check items, each borrowing a real item's prediction and explanation (and the order of its
    tables' features: its samples are shown in it)."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for j, source in enumerate(rng.choice(len(records), n, replace=n > len(records)).tolist()):
        base = records[source]
        out.append({**base, "id": len(records) + j, "row": None, "attention": True, "label": None, "ai_right": None,
                    "input": {"kind": "text", "text": ATTENTION_TEXT_TWO_STAGE if two_stage else ATTENTION_TEXT}})
    return out


def _sample_ids(views: dict):
    yield from views["similar"]
    for g in views["similar_multiclass"]:
        yield from g["samples"]
    for c in views["concepts"]:
        yield from c["exemplars"]
