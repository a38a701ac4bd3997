"""Per-input explanations as plain data: what the DNN and the surrogate said, and why.

An :class:`Explanation` serialises to JSON with this schema (``"schema": "actclust.explanation/1"``);
``C`` is the number of classes and class ids index ``class_names`` when given::

    {
      "schema": "actclust.explanation/1",
      "index": int,                       # position of the input among those explained
      "label": int | null,                # true label, when given
      "class_names": [str] | null,
      "dnn": {"prediction": int, "probability": float, "probabilities": [C floats]},
      "surrogate": {"prediction": int, "probabilities": [C floats], "prior": [C floats]},
      "layers": [                         # one per fitted layer, input to output
        {"layer": str, "cluster": int,    # the cluster the input falls in (its path)
         "weight": float,                 # the layer's weight in the surrogate (weights sum to 1)
         "class_mix": [C floats],         # the layer's class distribution for this input
         "vote": [C floats],              # how far this layer moved the surrogate from the prior, per class
         "distance": float,               # squared distance to the centre / the layer's typical one
         "exemplars": [int]}              # training samples nearest that cluster's centre
      ],
      "similar": {"low": [{"index": int, "distance": float, "prediction": int, "label": int | null}],
                  "high": [...]},         # see actclust.analysis.retrieval for the weights
      "trust": {str: float} | null,       # trust signals, when computed
      "trust_notes": [str] | null,        # which trust signals are unavailable or uncalibrated, and why
      "trust_thresholds": {"false_alarm_rate": float, "calibration": str, "n_calibration": int,
                           "right_predictions_only": bool, "signals": {str: float}} | null,
                                          # a signal below its threshold is flagged: at most that share
                                          # of held-out inputs (right predictions, for the signals of
                                          # correctness) fall below it (actclust.analysis.trust)
      "meta": {"actclust_version": str, "model_class": str, "layers": [str]} | null
    }

``vote`` is an exact additive split: ``prior + sum of the layers' votes`` equals the surrogate's
probabilities, where ``vote_l = weight_l * (class_mix_l - prior)`` and ``prior`` is the class
distribution of the surrogate's targets over the training data.
"""

from __future__ import annotations

import gc
import numbers
import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

import numpy as np

from .concepts import concepts
from ..exceptions import ParameterError, TrustWarning, user_stacklevel
from .retrieval import check_args
from .retrieval import search_many as find
from .surrogate import combine
from .trust import TRUST_OPTIONS

if TYPE_CHECKING:  # the analyses read a fitted state and a query pass; no import at run time
    from ..state import FittedState, Query

__all__ = ["Explanation", "explain", "prepare", "find_similar", "similar_weights", "check_trust_options", "SCHEMA",
           "DEFAULT_K", "TRUST_OPTIONS"]

SCHEMA = "actclust.explanation/1"
#: Similar training samples (under each preset) and cluster exemplars an explanation gives by default.
DEFAULT_K = 5
#: Whether explain's two presets share one search: no; "low" and "high" (one pass over the store, or an
#: approximate search each) want different neighbours, and no layer weighting serves both.
_SHARES = False


@dataclass
class Explanation:
    """Why the DNN decided as it did on one input, in terms of clusters and training samples.

    Build with :meth:`ActivationClustering.explain`; read the fields, or serialise with
    :meth:`to_dict` / :meth:`to_json` (schema in :mod:`actclust.analysis.explanation`).
    """

    index: int
    label: Optional[int]
    dnn: dict
    surrogate: dict
    layers: list
    similar: dict
    class_names: Optional[list] = None
    trust: Optional[dict] = None
    meta: Optional[dict] = None
    trust_notes: Optional[list] = None
    schema: str = field(default=SCHEMA)
    trust_thresholds: Optional[dict] = None

    def _repr_html_(self) -> str:
        """A card for notebooks (Jupyter, VS Code, Colab): see :mod:`actclust.views.notebook`."""
        from ..views.notebook import explanation_html

        return explanation_html(self)

    def class_name(self, c: int) -> str:
        return self.class_names[c] if self.class_names else str(c)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "Explanation":
        if not isinstance(data, dict):
            raise ParameterError(f"An explanation is a dict (Explanation.to_dict()); got {type(data).__name__}.")
        if data.get("schema") != SCHEMA:
            raise ParameterError(f"Not an actclust explanation of schema {SCHEMA!r}: schema is {data.get('schema')!r}.")
        import dataclasses

        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            raise ParameterError(f"Unknown fields in explanation: {unknown}.")
        missing = [f.name for f in fields if f.init and f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ParameterError(f"The explanation lacks the fields {missing}.")
        _check_values(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Explanation":
        if not isinstance(text, (str, bytes, bytearray)):
            raise ParameterError(f"from_json takes the JSON text of an explanation (Explanation.to_json()); got a "
                                 f"{type(text).__name__}" + (": use from_dict." if isinstance(text, dict) else "."))
        try:
            data = json.loads(text)
        except ValueError as e:  # JSONDecodeError, a bad encoding
            raise ParameterError(f"Not the JSON of an explanation: {e}.") from None
        return cls.from_dict(data)


def _check_values(data: dict) -> None:
    """The values :meth:`Explanation.from_dict` reads, checked as its views read them: class indices within the
    classes, lists of one number per class, numbers finite (an explanation from a JSON file someone sent made the
    notebook card fail with a raw IndexError, or showed a prediction of -1 as the last class)."""
    def need(ok: bool, where: str, what: str):
        if not ok:
            raise ParameterError(f"The explanation's {where} {what}.")

    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)

    def per_class(v, where: str):
        need(isinstance(v, list) and len(v) == n and all(is_num(x) for x in v), where,
             f"must be a list of {n} finite numbers, one per class")

    dnn, surrogate = data.get("dnn"), data.get("surrogate")
    need(isinstance(dnn, dict) and isinstance(dnn.get("probabilities"), list) and len(dnn["probabilities"]) >= 2,
         "'dnn'", "must be a dict with 'prediction' and 'probabilities' (one per class, at least 2)")
    n = len(dnn["probabilities"])
    per_class(dnn["probabilities"], "dnn probabilities")
    need(is_num(dnn.get("probability")), "dnn probability", "must be a finite number")
    classes = f"be a class index in [0, {n - 1}]"
    need(is_int(dnn.get("prediction")) and 0 <= dnn["prediction"] < n, "dnn prediction", f"must {classes}")
    need(is_int(data.get("index")), "'index'", "must be an int")
    need(data.get("label") is None or (is_int(data["label"]) and 0 <= data["label"] < n), "'label'",
         f"must be None or {classes}")
    need(isinstance(surrogate, dict) and is_int(surrogate.get("prediction")) and 0 <= surrogate["prediction"] < n,
         "surrogate prediction", f"must {classes}")
    per_class(surrogate.get("probabilities"), "surrogate probabilities")
    per_class(surrogate.get("prior"), "surrogate prior")
    need(isinstance(data.get("layers"), list) and data["layers"], "'layers'", "must be a non-empty list")
    for i, lay in enumerate(data["layers"]):
        where = f"layer {i}"
        need(isinstance(lay, dict) and isinstance(lay.get("layer"), str) and is_int(lay.get("cluster"))
             and lay["cluster"] >= 0 and is_num(lay.get("weight")) and is_num(lay.get("distance"))
             and isinstance(lay.get("exemplars"), list) and all(is_int(x) and x >= 0 for x in lay["exemplars"]),
             where, "must be a dict of 'layer' (a name), 'cluster' (an int >= 0), 'weight' and 'distance' (numbers) "
             "and 'exemplars' (training sample indices)")
        per_class(lay.get("class_mix"), f"{where} class_mix")
        per_class(lay.get("vote"), f"{where} vote")
    need(isinstance(data.get("similar"), dict), "'similar'", "must be a dict of preset -> similar samples")
    for preset, rows in data["similar"].items():
        need(isinstance(rows, list) and all(
            isinstance(r, dict) and is_int(r.get("index")) and r["index"] >= 0 and is_num(r.get("distance"))
            and is_int(r.get("prediction")) and 0 <= r["prediction"] < n
            and (r.get("label") is None or (is_int(r["label"]) and 0 <= r["label"] < n)) for r in rows),
            f"similar samples of {preset!r}", f"must be dicts of 'index', 'distance', 'prediction' and 'label' "
            f"(class indices in [0, {n - 1}])")
    names = data.get("class_names")
    need(names is None or (isinstance(names, list) and len(names) == n and all(isinstance(c, str) for c in names)),
         "'class_names'", f"must be None or a list of {n} names")
    trust = data.get("trust")
    need(trust is None or (isinstance(trust, dict) and all(
        isinstance(k, str) and (v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)))
        for k, v in trust.items())),
         "'trust'", "must be None or a dict of signal names to numbers")
    notes = data.get("trust_notes")
    need(notes is None or (isinstance(notes, list) and all(isinstance(t, str) for t in notes)), "'trust_notes'",
         "must be None or a list of strings")
    for key in ("meta", "trust_thresholds"):
        need(data.get(key) is None or isinstance(data[key], dict), repr(key), "must be None or a dict")


def similar_weights(state: FittedState, k: int) -> dict:
    """The weights of the two similar-sample presets an explanation shows, "low" and "high" (``k`` checked
    too): searched by :func:`find_similar`, built for by :func:`prepare`."""
    return {p: check_args(state, k, p)[1] for p in ("low", "high")}


def find_similar(state: FittedState, q: Query, k: int, *, search: str = "auto", progress: bool = False,
                 backend=None) -> dict:
    """``{"low": Neighbours, "high": Neighbours}``: the similar training samples an explanation shows, searched
    as :func:`prepare` prepares them (also by the explorer, so that it shows explain's neighbours)."""
    weights = similar_weights(state, k)  # k checked: an int, NumPy's too (faiss takes Python ints only)
    return find(state, q, int(k), weights, method=search, progress=progress, backend=backend, shares=_SHARES)


def check_class_names(state: FittedState, class_names) -> Optional[list]:
    """``class_names`` as a list of the state's ``n_classes`` names (``None`` stays ``None``), checked: a sequence
    of names, or a mapping of the class ids 0..C-1 to names (a Hugging Face config's ``id2label``, whose keys were
    shown instead of its names). A string is refused (it was split into one name per character)."""
    if class_names is None:
        return None
    n = state.n_classes
    if isinstance(class_names, (str, bytes)):
        raise ParameterError(f"class_names must be a list of the {n} class names; got the string {class_names!r} "
                             "(a comma-separated string is the command line's form: split it first).")
    if isinstance(class_names, Mapping):
        ids = {}
        for key, name in class_names.items():
            if isinstance(key, str) and key.isascii() and key.isdigit():
                key = int(key)
            if not isinstance(key, numbers.Integral) or isinstance(key, bool) or int(key) in ids:
                raise ParameterError(f"class_names as a mapping must map each class id 0..{n - 1} to its name, once "
                                     f"(as id2label does); got the key {key!r}.")
            ids[int(key)] = str(name)
        if sorted(ids) != list(range(n)):
            raise ParameterError(f"class_names as a mapping must map the class ids 0..{n - 1} to names; got the ids "
                                 f"{sorted(ids)}.")
        return _distinct([ids[i] for i in range(n)])
    if isinstance(class_names, (set, frozenset)) or not hasattr(class_names, "__iter__") or np.ndim(class_names) != 1:
        raise ParameterError(f"class_names must be a list of the {n} class names, in class order (or a mapping of "
                             f"class ids to names); got {type(class_names).__name__} {class_names!r}.")
    if any(c is None for c in class_names):  # it became the name "None"
        raise ParameterError(f"class_names must name every class; class {list(class_names).index(None)} is None.")
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in class_names]
    if len(names) != n:
        raise ParameterError(f"class_names must name the {n} classes; got {len(names)} names.")
    return _distinct(names)


def _distinct(names: list) -> list:
    """``names`` where each is a visible name of its own: blank or repeated names left the classes apart only by their
    place (a study's answer list showed blank or twin options, "The AI predicts:" nothing: an outside check). Names are
    compared as shown: without surrounding spaces and invisible format characters ("cat" and "cat " read alike; a
    zero-width space is blank); a text-direction control character is refused (U+202E turned the probability
    shown after the name around: "(0.42)" read "(24.0)")."""
    import unicodedata

    shown = ["".join(ch for ch in c if unicodedata.category(ch) != "Cf").strip() for c in names]
    blank = [i for i, c in enumerate(shown) if not c]
    if blank:
        raise ParameterError(f"class_names must give each class a name; class {blank[0]} has a blank one.")
    bidi = [i for i, c in enumerate(names) if any(ch in c for ch in _BIDI_CONTROLS)]
    if bidi:
        raise ParameterError(f"class_names must not hold text-direction control characters (U+202A-U+202E, "
                             f"U+2066-U+2069): class {bidi[0]}'s name {names[bidi[0]]!r} does, and it would turn the "
                             "text shown after it around. Remove them (right-to-left letters themselves are fine).")
    seen: dict = {}
    for i, c in enumerate(shown):
        if c in seen:
            raise ParameterError(f"class_names must give each class its own name; classes {seen[c]} and {i} are both "
                                 f"named {names[seen[c]]!r}" + ("" if names[i] == names[seen[c]] else
                                                                 f" (and {names[i]!r}, which reads the same)") + ".")
        seen[c] = i
    return names


_BIDI_CONTROLS = tuple(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def prepare(state: FittedState, *, k: int = DEFAULT_K, trust=None, search: str = "auto", progress: bool = False,
            backend=None) -> None:
    """Build now what :func:`explain` with the same ``k``, ``trust`` and ``search`` builds on its first call: the
    similar-sample index calibrated for its two presets and trust's calibration (see
    :meth:`ActivationClustering.prepare`). One plan for both, so that a prepared run answers its first explain
    without building anything."""
    from .retrieval import prepare as prepare_search

    prepare_search(state, list(similar_weights(state, min(k, state.n_samples)).values()), method=search,
                   shares=_SHARES, progress=progress, backend=backend)
    options = _trust_options(state, trust)
    if options is not None:
        cal, skipped = _calibration(state, trust, options, search=search, progress=progress, backend=backend)
        if cal is None:
            warnings.warn(skipped[0], TrustWarning, stacklevel=user_stacklevel())


def _calibration(state: FittedState, trust, options: dict, **settings) -> tuple:
    """``(calibration, None)``, or where trust was not asked for (``trust=None``: by default) and this training set
    cannot calibrate it, ``(None, notes saying why)``: explain and prepare go on without it (a layer of few distinct
    vectors, a decision tree's one-hot probabilities, left no neighbours once the calibration rows' duplicates were
    held out, and explain, prepare and the command line's fit failed under their defaults: an outside check)."""
    from .trust import calibrate

    try:
        return calibrate(state, **{**settings, **options}), None
    except ParameterError as e:
        if trust is not None:  # asked for: its error stands
            raise
        return None, [f"No trust signals: {e}"]




def check_trust_options(trust, where: str = "explain"):
    """``trust`` as ``explain`` takes it, checked: None, a bool, or a dict of :data:`TRUST_OPTIONS` (a typo, or
    ``trust="no"``, which is true, is refused)."""
    import difflib

    if trust is None or isinstance(trust, (bool, np.bool_)):
        return trust
    if not isinstance(trust, dict):
        raise ParameterError(f"The 'trust' parameter of {where} must be None (when the training set can calibrate "
                             f"them), True, False or a dict of the trust signals' options. Got {trust!r} instead.")
    unknown = [k for k in trust if k not in TRUST_OPTIONS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), TRUST_OPTIONS, n=1)
        raise ParameterError(f"Unknown option {unknown[0]!r} of the trust signals in {where}"
                             + (f"; did you mean {close[0]!r}?" if close else ".")
                             + f" They take {list(TRUST_OPTIONS)}.")
    return trust


def _trust_options(state: FittedState, trust) -> Optional[dict]:
    """``trust_signals``' options for explain's ``trust`` argument (a dict of them, e.g. ``{"calibration":
    ac.query(X_val, y_val, vectors=True)}``, or a bool), or ``None`` where the explanations carry no trust
    signals; by default (``None``) they do whenever the training set is large enough to calibrate them."""
    trust = check_trust_options(trust)
    if isinstance(trust, dict):
        return trust
    if trust is None:
        from .trust import calibration_possible

        trust = calibration_possible(state)
    return {} if trust else None


def explain(state: FittedState, q: Query, *, k: int = DEFAULT_K, class_names=None, trust=None, meta: Optional[dict] = None,
            search: str = "auto", progress: bool = False, backend=None) -> list:
    """One :class:`Explanation` per input of the query ``q`` (made with ``vectors=True``) of a
    fitted ``state``; see :meth:`ActivationClustering.explain`. ``backend`` (:mod:`actclust.compute`)
    computes the searches (the host by default)."""
    class_names = check_class_names(state, class_names)
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:  # None, '5': a bare TypeError below
        raise ParameterError(f"k must be an int >= 1 (similar samples and exemplars shown). Got {k!r} instead.")
    k = min(int(k), state.n_samples)  # a training set smaller than k shows all of it
    probas = state.layer_probas(q.distances)  # (L, n, C)
    combined = combine(probas, state.weights)
    w = state.weights / state.weights.sum()
    prior = state.target_prior()
    exemplars = {l: [c.exemplars for c in concepts(state, l, k=k, n_edge=0, progress=progress, backend=backend)]
                 for l in state.layers}
    near = find_similar(state, q, k, search=search, progress=progress, backend=backend)
    options = _trust_options(state, trust)
    signals, notes, thresholds = None, None, None
    if options is None and trust is None:  # left out by default: the notes say why (they were empty: an outside check)
        from .trust import MIN_CALIBRATION

        n = state.n_samples  # (50: trust's default n_neighbors)
        notes = [f"No trust signals: the training set of {n} samples is too small to calibrate them (a held-out tenth "
                 f"of at least {MIN_CALIBRATION} samples, and 50 others as neighbours). Fit on more samples, or pass "
                 "trust={'calibration': ac.query(X_val, y_val, vectors=True)"
                 + (f", 'n_neighbors': {n} or fewer" if n < 50 else "") + "}."]
    if options is not None:
        from .trust import signals as trust_signals

        cal, notes = _calibration(state, trust, options, search=search, progress=progress, backend=backend)
        if cal is not None:
            signals, notes, thresholds = trust_signals(state, cal, q, backend), list(cal.notes) or None, cal.thresholds
    with _cycle_collector_paused():
        return _build(state, q, probas, combined, w, prior, exemplars, near, class_names, signals, notes,
                      thresholds, meta)


@contextmanager
def _cycle_collector_paused():
    """Python's cycle collector paused while the explanations are built: they hold no cycles, and
    the hundreds of thousands of dicts and lists they are made of set it off again and again, each
    time traversing every live object (10,000 explanations: 1.4 s with it, 0.35 s without).

    Then they are moved to the oldest generation, as objects that live long get there, without the young
    generation's pass that would otherwise traverse them all at the next allocation (0.06-0.07 s per 10,000
    explanations, 2% of ``explain``): ``gc.freeze`` then ``gc.unfreeze``, which moves every tracked object of
    the process at once, untouched; not where the process keeps objects frozen itself (a server that forks)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


def _build(state, q, probas, combined, w, prior, exemplars, near, class_names, signals, notes, thresholds,
           meta) -> list:
    """The :class:`Explanation` objects, from whole arrays converted to Python lists in bulk (per-element
    conversion, or a dict built field by field per input, would dominate ``explain``)."""
    n, layer_names = q.n, state.layers
    paths = q.paths
    mix = probas.transpose(1, 0, 2).tolist()  # (n, L, C)
    votes = (w[:, None, None] * (probas - prior)).transpose(1, 0, 2).tolist()
    dist = np.stack([q.distances[l][np.arange(n), paths[:, j]] / state.clusterings[l].scale_
                     for j, l in enumerate(layer_names)], 1).tolist()
    sims = [(p, _samples(state, nb)) for p, nb in near.items()]
    labels = [None] * n if q.labels is None else q.labels.tolist()
    dnn_pred, dnn_proba = q.dnn_pred.tolist(), q.dnn_proba.tolist()
    comb, surrogate_pred, path_list = combined.tolist(), combined.argmax(1).tolist(), paths.tolist()
    names = None if class_names is None else [str(c) for c in class_names]
    trust_rows = [None] * n if signals is None else _rows(
        {k: v for k, v in signals.items() if not k.endswith("_prediction")})
    weights, prior_list = w.tolist(), prior.tolist()
    ex_lists = [[list(map(int, e)) for e in exemplars[l]] for l in layer_names]
    per_layer = list(zip(layer_names, weights, ex_lists))
    out = []
    for i in range(n):
        mix_i, votes_i, dist_i, proba_i, pred = mix[i], votes[i], dist[i], dnn_proba[i], dnn_pred[i]
        layers = [{"layer": l, "cluster": c, "weight": wl, "class_mix": mix_i[j], "vote": votes_i[j],
                   "distance": dist_i[j], "exemplars": ex_l[c][:]}
                  for j, ((l, wl, ex_l), c) in enumerate(zip(per_layer, path_list[i]))]
        out.append(Explanation(
            index=i, label=labels[i],
            dnn={"prediction": pred, "probability": proba_i[pred], "probabilities": proba_i},
            surrogate={"prediction": surrogate_pred[i], "probabilities": comb[i], "prior": prior_list[:]},
            layers=layers, similar={p: rows[i] for p, rows in sims}, class_names=None if names is None else names[:],
            trust=trust_rows[i], meta=None if meta is None else _copy_meta(meta),
            trust_notes=None if notes is None else list(notes),
            trust_thresholds=None if thresholds is None else _copy(thresholds),
        ))
    return out


def _copy_meta(meta: dict) -> dict:
    return {k: list(v) if isinstance(v, list) else v for k, v in meta.items()}


def _copy(thresholds: dict) -> dict:
    return {**thresholds, "signals": dict(thresholds["signals"])}


def _samples(state: FittedState, nb) -> list:
    """Per input, its similar training samples as dicts."""
    idx, dist, pred = nb.indices.tolist(), nb.distances.tolist(), state.train_predictions[nb.indices].tolist()
    if state.train_labels is None:
        return [[{"index": t, "distance": d, "prediction": p, "label": None} for t, d, p in zip(ti, di, pi)]
                for ti, di, pi in zip(idx, dist, pred)]
    labels = state.train_labels[nb.indices].tolist()
    return [[{"index": t, "distance": d, "prediction": p, "label": y} for t, d, p, y in zip(ti, di, pi, yi)]
            for ti, di, pi, yi in zip(idx, dist, pred, labels)]


def _rows(columns: dict) -> list:
    """Dict of per-input arrays to a list of per-input dicts of floats."""
    keys, values = list(columns), [np.asarray(v, dtype=np.float64).tolist() for v in columns.values()]
    return [dict(zip(keys, row)) for row in zip(*values)]
