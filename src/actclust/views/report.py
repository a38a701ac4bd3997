"""A self-contained HTML report: summary, concept gallery and explanation cards.

The report reads only public results (scores, :class:`~actclust.analysis.concepts.Concept` and
:class:`~actclust.analysis.explanation.Explanation` objects); images are inlined as PNG data, so the one
file opens from disk with no network access.
"""

from __future__ import annotations

import datetime
import numbers
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..capture.data import length, rows, take
from .features import feature_order
from .render import MAX_FEATURES, MAX_TABLE, Renderer, check_mean_std, check_train
from .templating import class_color, for_readers, isolated, signal_title
from ..exceptions import DataError, DataWarning, ParameterError, RenderWarning, RunExistsError, user_stacklevel
from ..io import atomic

__all__ = ["report"]

#: More explanations than this in one report get a warning: each is a card with its pictures (an outside check's
#: 2,000 made a page of 33 MB that took 13 s to open); the explorer serves any number a page at a time.
MANY_CARDS = 300

def report(ac, X, y=None, *, out="report.html", train=None, render=None, mean=None, std=None,
           class_names=None, feature_names=None, indices=None, n_correct: int = 4, n_wrong: int = 4,
           k: int = 6, n_exemplars: int = 6, n_edge: int = 3, trust=None, title: str = "actclust report",
           overwrite: bool = False, tokenizer=None) -> Path:
    """Write an HTML report of the fitted explainer ``ac`` on inputs ``X`` (labels ``y``, optional).

    Parameters
    ----------
    X : ndarray, Tensor or Dataset
        Inputs to score and to pick explained examples from (e.g. the test set).
    out : path, default="report.html"
        Written atomically; parent folders are created. An existing file is replaced only with
        ``overwrite=True`` (checked before any work).
    train : ndarray, Tensor or Dataset, optional
        The training inputs ``fit`` saw, in the same order, to show similar samples and concept
        exemplars; without it they appear as their training indices.
    render, mean, std, feature_names, tokenizer
        How inputs are drawn; see :class:`actclust.views.render.Renderer`: ``mean``/``std`` undo the
        model's normalisation of images and of feature rows (tables then show the data's own units),
        ``tokenizer`` turns token ids into tokens (padding hidden). A ``render`` that raises gives a
        visible placeholder naming the input, and a warning; the report still completes. Feature
        tables list first the features that matter for the input (:mod:`actclust.views.features`).
    indices : sequence of int, optional
        Inputs of ``X`` to explain. By default ``n_correct`` inputs the DNN got right and
        ``n_wrong`` it got wrong (with no labels: where the surrogate agrees / disagrees with it).
    k, n_exemplars, n_edge : int
        Similar samples per card, exemplars and edge samples per concept.
    trust : bool, dict or None
        Show trust signals on the cards; ``None`` when the training set can calibrate them; a
        dict passes options to :func:`actclust.analysis.trust.trust_signals`, such as held-out data to
        calibrate on: ``{"calibration": (X_val, y_val)}`` (or a query of them, ``ac.query(X_val, y_val, vectors=True)``).

    Returns
    -------
    Path
        The written file.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    from ..analysis.concepts import concepts
    from ..analysis.explanation import check_class_names, explain
    from ..analysis.surrogate import combine, scores
    from ..analysis.trust import MEANINGS

    state = ac.state_
    out = Path(out)
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it.")
    for name, value in (("n_correct", n_correct), ("n_wrong", n_wrong), ("k", k), ("n_exemplars", n_exemplars),
                        ("n_edge", n_edge)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ParameterError(f"{name} must be a non-negative int. Got {value!r} instead.")
    check_train(ac, train)
    names = check_class_names(state, class_names) or [str(c) for c in range(state.n_classes)]
    check_mean_std(state.input_spec, mean, std, ac._adapter().input_channel_axis)
    if feature_names is None:
        feature_names = state.input_spec.feature_names  # a DataFrame's columns, kept by fit

    meta = ac.provenance()
    trust = ac._trust_arg(trust, "report")  # checked, held-out calibration data queried, before the work
    q = ac.query(X, y)  # scores and the choice of inputs; vectors only for the few explained below
    probas = state.layer_probas(q.distances)
    summary = scores(q.dnn_pred, probas, q.labels, state.weights, state.layers)
    chosen, how = _choose(q, combine(probas, state.weights).argmax(1), indices, n_correct, n_wrong,
                          state.random_state)
    if len(chosen) > MANY_CARDS:  # a page, not a browser of inputs: say so before the work
        warnings.warn(f"The report will hold {len(chosen)} explanations, one card each with its pictures: a heavy "
                      f"page (2,000 cards: 33 MB, 13 s to open). To browse many inputs, serve the explorer "
                      "(actclust view, or actclust.views.explorer); a report reads best with tens.",
                      RenderWarning, stacklevel=user_stacklevel())
    explanations = []
    if len(chosen):  # a second, small pass keeps the vectors of the explained inputs only
        with warnings.catch_warnings():  # all of X was checked by the pass above: its few rows are not judged again
            warnings.simplefilter("ignore", DataWarning)  # (they set off a false alarm of their own: an outside check)
            picked = ac.query(take(X, chosen), None if q.labels is None else q.labels[chosen], vectors=True)
        explanations = explain(state, picked, k=max(k, 1), class_names=names, trust=trust, meta=meta,
                               search=ac.search, progress=ac.progress)
    renderer = Renderer(render, mean=mean, std=std, feature_names=feature_names, tokenizer=tokenizer)
    order = feature_order(state, train, mean, std, ac.label_key, render)
    cards = []
    for j, (e, x) in enumerate(zip(explanations, rows(X, chosen, label_key=ac.label_key))):
        o = order.of_input(x, e.layers[-1]["cluster"]) if order is not None else None
        # the input's own table holds all its features, those past the first rows folded (an outside check could
        # not open them); its samples' tables show the first rows
        drawn = renderer(x, f"input {int(chosen[j])}", order=o, rest=MAX_TABLE - MAX_FEATURES)
        cards.append({"e": e, "x": drawn, "row": int(chosen[j]), "order": _key(o)})
    gallery = {}
    for l in tqdm(state.layers, desc="drawing concepts", disable=not ac.progress, leave=False):
        gallery[l] = concepts(state, l, k=max(1, min(n_exemplars, state.n_samples)), n_edge=min(n_edge, state.n_samples))
    n_features = state.input_spec.shape[0] if order is not None else 0
    concept_order = {(l, c.cluster): _key(order.of_cluster(l, c.cluster, n_features)) if order is not None else None
                     for l, cs in gallery.items() for c in cs}
    # Every training sample shown is drawn before the page, so the failure banner counts them all; a
    # table is drawn in the order of the card or concept that shows it.
    wanted = ({(i, c["order"]) for c in cards for lay in c["e"].layers for i in lay["exemplars"][:4]}
              | {(s["index"], c["order"]) for c in cards for p in c["e"].similar.values() for s in p}
              | {(i, concept_order[l, c.cluster]) for l, cs in gallery.items() for c in cs for i in c.exemplars + c.edge})
    shown = sorted({i for i, _ in wanted})
    if train is None:
        samples = {key: {"kind": "text", "text": f"#{key[0]}"} for key in wanted}
    else:
        raw = dict(zip(shown, rows(train, shown, label_key=ac.label_key, name="train")))
        samples = {(i, o): renderer(raw[i], f"training sample {i}", order=o) for i, o in sorted(wanted, key=str)}
    env = Environment(loader=PackageLoader("actclust.views", "templates"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["signal"] = signal_title
    html = env.get_template("report.html.j2").render(
        title=title, ac=ac, state=state, scores=summary, names=isolated(names),
        colors=[class_color(c) for c in range(state.n_classes)],
        gallery=gallery, cards=cards, how=how, train_sample=lambda i, o=None: samples[i, o], has_train=train is not None,
        concept_order=concept_order, order_note=order.note if order is not None else "",
        thresholds=next((e.trust_thresholds for e in explanations if e.trust_thresholds), None),
        trust_notes=for_readers(next((e.trust_notes for e in explanations if e.trust_notes), None)),  # once, above the cards
        n_exemplars=n_exemplars, model_name=meta["model_class"].rsplit(".", 1)[-1], failures=renderer.failures,
        meaning=MEANINGS, zip=zip,
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        n_clusters={l: c.n_clusters for l, c in state.clusterings.items()},
    )
    with atomic.guard("create the folder of the report", out.parent), atomic.folder(out.parent):
        atomic.write(out, html, what="report", replace=overwrite)  # not over a file made meanwhile
    return out


def _key(order):
    """A feature order as a dictionary key (the rows a table shows, and a few more)."""
    return None if order is None else tuple(int(j) for j in order[:16])


def _choose(q, surrogate_pred, indices, n_correct, n_wrong, seed):
    """The inputs to explain, and a sentence saying how they were picked."""
    n = len(q.dnn_pred)
    if indices is not None:
        chosen = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = chosen[(chosen < 0) | (chosen >= n)]
        if bad.size:
            raise ParameterError(f"indices {bad[:5].tolist()} are out of range for the {n} inputs given.")
        return chosen, "Inputs chosen by the caller."
    if q.labels is not None:
        right, what = q.dnn_pred == q.labels, ("the DNN classified correctly", "the DNN got wrong")
    else:
        right, what = q.dnn_pred == surrogate_pred, ("the surrogate agrees with the DNN on",
                                                     "the surrogate disagrees with the DNN on (no labels given)")
    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.choice(np.flatnonzero(mask), min(m, int(mask.sum())), replace=False))
             for mask, m in ((right, n_correct), (~right, n_wrong))]
    how = (f"{len(picks[0])} inputs {what[0]} and {len(picks[1])} {what[1]}, picked at random "
           f"(seed {seed}) among the {n} given.")
    return np.concatenate(picks).astype(np.int64), how


