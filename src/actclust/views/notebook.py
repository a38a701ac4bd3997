"""Results that show themselves in notebooks (Jupyter, JupyterLab, VS Code, Colab).

Every result of a fitted :class:`~actclust.ActivationClustering` has a ``_repr_html_``, so that the
last expression of a cell draws it:

* ``ac.explain(x)``: an :class:`ExplanationList` (a ``list`` of
  :class:`~actclust.analysis.explanation.Explanation`): one card per input (its picture, table or
  tokens; the DNN's and the surrogate's predictions; the path of clusters with their exemplars,
  class mixes and votes; similar training samples; trust chips);
* ``ac.similar(x)``: a :class:`~actclust.analysis.retrieval.Neighbours`: a table of indices,
  distances, predictions and layer shares, or, once training inputs are attached, their pictures;
* ``ac.concepts(layer)``: a :class:`ConceptList` of concept cards;
* ``ac.score(x, y)``: a :class:`Scores` (a ``dict``) as a table;
* ``ac`` itself: a summary of the fit (layers, clusters, weights, fidelity per layer).

**Training inputs.** A result holds indices into the training data, not the data: pictures of
training samples need it. ``ac.set_display(train=x_train, ...)`` attaches it (and class names,
``mean``/``std``, ``render``, ``tokenizer``) to the explainer: every later result draws its samples.
A single result can be drawn with them without attaching: ``nb.show(train=x_train)``. Without them,
training samples appear as their indices, and neighbour results as a table, which is also what a
result the size of a data set should be. Nothing is kept but references: the pictures are drawn
when the result is displayed, only for what is shown.

The HTML is self-contained: images are inline PNGs (:func:`actclust.views.render.png_data_uri`),
there is no JavaScript and no external asset, and every style rule sits under the ``acn`` class
of the output's root element, so it cannot change the notebook's own styles. Text takes the
notebook's colour and lines are translucent grey, so it reads on light and dark themes. Long
results are cut, with a count of what is not shown (:data:`LIMITS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..exceptions import DataError, ParameterError
from .templating import isolated

__all__ = ["Display", "Context", "ExplanationList", "ConceptList", "Scores", "HTML", "LIMITS",
           "explanation_html", "explanations_html", "neighbours_html", "concept_html", "concepts_html",
           "scores_html", "estimator_html"]

#: How much of a large result is drawn; the rest is counted.
LIMITS = {"explanations": 10, "queries": 10, "neighbours": 10, "concepts": 30, "exemplars": 4, "concept_samples": 5}
#: Rows of the small tables of training samples beside a tabular input (the input's own table has 12).
SMALL_TABLE_ROWS = 5
#: Training samples per layer, and similar samples, beside a tabular input (tables take more room).
TABULAR_SAMPLES = 2


@dataclass
class Display:
    """How results draw their inputs and training samples; set with ``ac.set_display(...)``."""

    train: object = None
    class_names: Optional[list] = None
    render: Optional[Callable] = None
    mean: object = None
    std: object = None
    feature_names: Optional[list] = None
    tokenizer: object = None


def check_display(state, display: Display, channel_axis: int = 1) -> Display:
    """``display`` checked against a fitted state: training inputs of its size, one name per class."""
    from ..analysis.explanation import check_class_names
    from .render import check_mean_std, check_train_length

    check_train_length(state, display.train)

    display.class_names = check_class_names(state, display.class_names)
    check_mean_std(state.input_spec, display.mean, display.std, channel_axis)
    return display


class Context:
    """What a result needs to draw itself: the fitted state, the display options and the inputs it is
    about. Shared by the items of a result; never copied (it holds references only)."""

    def __init__(self, state, display: Optional[Display] = None, inputs=None, label_key="auto"):
        self.state, self.display, self.inputs, self.label_key = state, display or Display(), inputs, label_key
        self._renderer = self._order = None
        self._inputs: dict = {}
        self._train: dict = {}

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def with_display(self, **options) -> "Context":
        """A context drawing with other display options (e.g. ``train=``), for :meth:`show`."""
        display = check_display(self.state, Display(**{**self.display.__dict__, **options}))
        return Context(self.state, display, self.inputs, self.label_key)

    @property
    def names(self) -> list:
        return isolated(self.display.class_names or [str(c) for c in range(self.state.n_classes)])

    @property
    def has_train(self) -> bool:
        return self.display.train is not None

    @property
    def renderer(self):
        if self._renderer is None:
            from .render import Renderer

            d = self.display
            self._renderer = Renderer(d.render, mean=d.mean, std=d.std, tokenizer=d.tokenizer,
                                      feature_names=d.feature_names or self.state.input_spec.feature_names)
        return self._renderer

    @property
    def order(self):
        """The :class:`~actclust.views.features.FeatureOrder` of tabular inputs (built on first use)."""
        if self._order is None:
            from .features import FeatureOrder

            spec = self.state.input_spec
            tabular = spec.kind == "tensor" and len(spec.shape) == 1 and "float" in spec.parts[0][2]
            if not tabular:
                self._order = FeatureOrder.file_order()
            elif self.has_train:
                self._order = FeatureOrder.from_train(self.state, self.display.train, self.label_key)
            elif self.display.mean is not None or self.display.std is not None:
                self._order = FeatureOrder.standardised()
            else:
                self._order = FeatureOrder.file_order()
        return self._order

    def input_rows(self, positions) -> dict:
        """The model inputs at ``positions`` of the result's inputs, fetched once each."""
        from ..capture.data import rows

        want = [int(p) for p in positions if int(p) not in self._inputs]
        if want and self.inputs is not None:
            try:
                for p, x in zip(want, rows(self.inputs, want, label_key=self.label_key)):
                    self._inputs[p] = x
            except Exception:  # e.g. an iterator that is spent: the cards show no picture
                self.inputs = None
        return {int(p): self._inputs.get(int(p)) for p in positions}

    def draw_input(self, position: int, x, order=None) -> dict:
        return self.renderer(x, f"input {position}", order=order)

    def train_samples(self, indices, order=None, max_rows: int = 12) -> list:
        """Training samples drawn (tables in ``order``, ``max_rows`` rows), fetched in one pass; their
        indices when no training inputs are attached."""
        if not self.has_train:
            return [{"kind": "index", "index": int(i)} for i in indices]
        from ..capture.data import rows

        okey = (None if order is None else tuple(int(j) for j in order[:16]), max_rows)
        missing = sorted({int(i) for i in indices if (int(i), okey) not in self._train})
        if missing:
            for i, x in zip(missing, rows(self.display.train, missing, label_key=self.label_key, name="train")):
                self._train[(i, okey)] = self.renderer(x, f"training sample {i}", order=order, max_rows=max_rows)
        return [self._train[(int(i), okey)] for i in indices]

    def train_caption(self, i: int) -> tuple:
        """``(caption, tooltip)`` of training sample ``i``: the DNN's class, and its label when known."""
        names, st = self.names, self.state
        pred = names[int(st.train_predictions[i])]
        label = None if st.train_labels is None else names[int(st.train_labels[i])]
        return pred, f"training sample #{int(i)} · DNN: {pred}" + (f" · label: {label}" if label is not None else "")


class HTML:
    """Some HTML that a notebook displays (``_repr_html_``); ``str()`` gives the HTML itself."""

    def __init__(self, html: str):
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"<actclust HTML, {len(self.html):,} characters; display it in a notebook>"


class ExplanationList(list):
    """The explanations of :meth:`ActivationClustering.explain`: a list, drawn as cards in notebooks.

    Everything a list does works as before (``es[0]``, ``len(es)``, ``json.dumps([e.to_dict() for e in es])``);
    a slice is an :class:`ExplanationList` too. ``show(train=...)`` draws it with other display options.
    """

    def __init__(self, items=(), context: Optional[Context] = None):
        super().__init__(items)
        self.context = context
        for e in self:
            if context is not None:
                e._context = context

    def __getitem__(self, key):
        out = super().__getitem__(key)
        return ExplanationList(out, self.context) if isinstance(key, slice) else out

    def _repr_html_(self) -> str:
        return explanations_html(self)

    def show(self, **display) -> HTML:
        """The cards drawn with these display options (``train=``, ``class_names=``, ``mean=``...)."""
        return HTML(explanations_html(self, self.context.with_display(**display) if self.context else None))


class ConceptList(list):
    """The concepts of :meth:`ActivationClustering.concepts`: a list of
    :class:`~actclust.analysis.concepts.Concept`, drawn as a gallery of cards in notebooks."""

    def __init__(self, items=(), context: Optional[Context] = None):
        super().__init__(items)
        self.context = context
        for c in self:
            if context is not None:
                c._context = context

    def __getitem__(self, key):
        out = super().__getitem__(key)
        return ConceptList(out, self.context) if isinstance(key, slice) else out

    def _repr_html_(self) -> str:
        return concepts_html(self)

    def show(self, **display) -> HTML:
        """The gallery drawn with these display options (``train=``, ``class_names=``...)."""
        return HTML(concepts_html(self, self.context.with_display(**display) if self.context else None))


class Scores(dict):
    """The scores of :meth:`ActivationClustering.score`: the same dict, drawn as a table in notebooks."""

    def __init__(self, scores: dict, weights=None, n_clusters=None):
        super().__init__(scores)
        self.weights, self.n_clusters = weights, n_clusters

    def _repr_html_(self) -> str:
        return scores_html(self)


# ---------------------------------------------------------------------------- drawing
def _render(what: str, **values) -> str:
    from .templating import environment

    return environment().get_template("notebook.html.j2").render(what=what, **values)


def _context_of(obj, context=None) -> Optional[Context]:
    return context if context is not None else getattr(obj, "_context", None) or getattr(obj, "context", None)


def _card(e, ctx: Optional[Context], x=None) -> dict:
    """What one explanation card shows, ready for the template."""
    names = isolated(e.class_names or (ctx.names if ctx is not None else range(len(e.dnn["probabilities"]))))
    pred = e.dnn["prediction"]
    order = None
    picture = None
    if ctx is not None and x is not None:
        last = e.layers[-1]["cluster"] if e.layers else None
        if _is_row(x):
            order = ctx.order.of_input(x, last)
        picture = ctx.draw_input(e.index, x, order)
    n_ex, n_sim, small = LIMITS["exemplars"], None, 12
    if order is not None:  # a tabular input: fewer, smaller tables beside it
        n_ex, n_sim, small = TABULAR_SAMPLES, 2 * TABULAR_SAMPLES, SMALL_TABLE_ROWS
    if ctx is not None:
        wanted = [i for lay in e.layers for i in lay["exemplars"][:n_ex]]
        wanted += [s["index"] for p in e.similar.values() for s in p[:n_sim]]
        drawn = dict(zip(wanted, ctx.train_samples(wanted, order, small)))

        def sample(i):
            return drawn[i], *ctx.train_caption(i)
    else:
        def sample(i):
            return {"kind": "index", "index": int(i)}, "", f"training sample #{int(i)}"
    votes = [lay["vote"][pred] for lay in e.layers]
    similar = {p: [(*sample(s["index"])[:1], names[s["prediction"]], f"training sample #{s['index']} · DNN: "
                    f"{names[s['prediction']]}" + (f" · label: {names[s['label']]}" if s.get("label") is not None else "")
                    + f" · distance {s['distance']:.3f}") for s in rows[:n_sim]]
               for p, rows in e.similar.items()}
    return {
        "e": e, "names": names, "pred": pred, "picture": picture,
        "exemplars": [[sample(i) for i in lay["exemplars"][:n_ex]] for lay in e.layers],
        "similar": similar, "vmax": max([abs(v) for v in votes] + [1e-6]),
        "wrong": e.label is not None and e.label != pred,
        "order_note": ctx.order.note if ctx is not None and picture is not None and picture["kind"] == "table" else "",
    }


def _is_row(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype.kind == "f"


def explanation_html(e, context: Optional[Context] = None) -> str:
    """One explanation as a card (the input's picture when it came from ``ac.explain``)."""
    return explanations_html([e], context or getattr(e, "_context", None), single=True)


def explanations_html(es, context: Optional[Context] = None, single: bool = False) -> str:
    """A list of explanations as cards: the first ``LIMITS["explanations"]``, and a count of the rest."""
    ctx = context if context is not None else getattr(es, "context", None)
    if ctx is None and len(es):
        ctx = getattr(es[0], "_context", None)
    shown = list(es)[:LIMITS["explanations"]]
    xs = ctx.input_rows([e.index for e in shown]) if ctx is not None and ctx.inputs is not None else {}
    cards = [_card(e, ctx, xs.get(e.index)) for e in shown]
    labelled = [e for e in es if e.label is not None]
    summary = {
        "n": len(es), "right": sum(e.label == e.dnn["prediction"] for e in labelled), "labelled": len(labelled),
        "agree": sum(e.surrogate["prediction"] == e.dnn["prediction"] for e in es),
    }
    thresholds = next((e.trust_thresholds for e in es if getattr(e, "trust_thresholds", None)), None)
    notes = next((e.trust_notes for e in es if e.trust_notes), None)
    return _render("explanations", cards=cards, summary=summary, single=single, hidden=len(es) - len(shown),
                   has_train=ctx is not None and ctx.has_train, thresholds=thresholds, notes=notes,
                   has_trust=any(e.trust for e in es))


def neighbours_html(nb, context: Optional[Context] = None) -> str:
    """Similar training samples: pictures with training inputs attached, else a table of indices."""
    ctx = _context_of(nb, context)
    n, k = nb.indices.shape
    q_shown, k_shown = min(n, LIMITS["queries"]), min(k, LIMITS["neighbours"])
    layers = list(ctx.state.layers) if ctx is not None else [f"layer {j}" for j in range(nb.layer_shares.shape[2])]
    names = ctx.names if ctx is not None else None  # (isolated: see Context.names)
    rows = []
    xs = ctx.input_rows(range(q_shown)) if ctx is not None and ctx.inputs is not None else {}
    for q in range(q_shown):
        x = xs.get(q)
        order = ctx.order.of_input(x) if ctx is not None and x is not None and _is_row(x) else None
        picture = ctx.draw_input(q, x, order) if x is not None else None
        idx = nb.indices[q, :k_shown].tolist()
        drawn = ctx.train_samples(idx, order) if ctx is not None and ctx.has_train else [None] * len(idx)
        items = []
        for j, i in enumerate(idx):
            pred = lab = None
            if ctx is not None:
                pred = names[int(ctx.state.train_predictions[i])]
                if ctx.state.train_labels is not None:
                    lab = names[int(ctx.state.train_labels[i])]
            items.append({"index": i, "distance": float(nb.distances[q, j]), "pred": pred, "label": lab,
                          "shares": nb.layer_shares[q, j].tolist(), "drawn": drawn[j]})
        rows.append({"q": q, "picture": picture, "items": items})
    from .templating import class_color

    return _render("neighbours", rows=rows, n=n, k=k, hidden_q=n - q_shown, hidden_k=k - k_shown, layers=layers,
                   layer_colors=[class_color(j + 3) for j in range(len(layers))],
                   weights=[float(w) for w in nb.weights], pictures=ctx is not None and ctx.has_train)


def concept_html(c, context: Optional[Context] = None) -> str:
    return concepts_html([c], context or getattr(c, "_context", None))


def concepts_html(cs, context: Optional[Context] = None) -> str:
    """Concept cards: exemplars and edge samples, class mix, size and purity."""
    ctx = context if context is not None else getattr(cs, "context", None)
    if ctx is None and len(cs):
        ctx = getattr(cs[0], "_context", None)
    shown = list(cs)[:LIMITS["concepts"]]
    n_ex = LIMITS["concept_samples"]
    cards = []
    for c in shown:
        order = None
        if ctx is not None and ctx.has_train and ctx.order.kind == "cluster":
            order = ctx.order.of_cluster(c.layer, c.cluster, len(ctx.order.mean))
        ex = [(d, *ctx.train_caption(i)) for d, i in zip(ctx.train_samples(c.exemplars[:n_ex], order), c.exemplars)] \
            if ctx is not None else [({"kind": "index", "index": i}, "", f"#{i}") for i in c.exemplars[:n_ex]]
        edge = [(d, *ctx.train_caption(i)) for d, i in zip(ctx.train_samples(c.edge, order), c.edge)] \
            if ctx is not None else [({"kind": "index", "index": i}, "", f"#{i}") for i in c.edge]
        cards.append({"c": c, "exemplars": ex, "edge": edge, "more": max(0, len(c.exemplars) - n_ex)})
    names = ctx.names if ctx is not None else isolated(range(len(shown[0].prediction_mix))) if shown else []
    tabular = any(s[0]["kind"] == "table" for card in cards for s in card["exemplars"])
    return _render("concepts", cards=cards, names=names, hidden=len(cs) - len(shown), has_train=ctx is not None and
                   ctx.has_train, tabular=tabular, layers=sorted({c.layer for c in cs}))


def scores_html(s, weights=None, n_clusters=None) -> str:
    """Fidelity and accuracy per layer and combined."""
    weights = weights if weights is not None else getattr(s, "weights", None)
    n_clusters = n_clusters if n_clusters is not None else getattr(s, "n_clusters", None)
    return _render("scores", s=s, weights=None if weights is None else [float(w) for w in weights],
                   n_clusters=n_clusters, title=f"Surrogate on {int(s['n']):,} inputs")


def estimator_html(ac) -> str:
    """The explainer: its parameters, and once fitted what it learned per layer."""
    from ..io.persistence import params_of

    state = ac.__dict__.get("_fitted_state")
    params = params_of(ac)
    if state is None:
        return _render("estimator", ac=ac, state=None, params=params, model=type(ac.model).__name__, layers=[])
    score = state.train_score or {}
    per_layer = score.get("per_layer", {})
    layers = [{"name": l, "clusters": state.clusterings[l].n_clusters, "weight": float(state.weights[j]),
               "reducer": getattr(state.reducers[l], "spec", str(state.reducers[l])),
               "width": int(state.train_vectors[l].shape[1]),
               "empty": int((np.asarray(getattr(state.clusterings[l], "cluster_sizes_", [1])) == 0).sum()),
               "fidelity": per_layer.get(l, {}).get("fidelity"), "accuracy": per_layer.get(l, {}).get("accuracy")}
              for j, l in enumerate(state.layers)]
    display = ac.__dict__.get("_display")
    return _render("estimator", ac=ac, state=state, params=params, layers=layers, score=score,
                   model=type(ac.model).__name__, thresholds=state.cache.get("trust_thresholds"),
                   on_disk=getattr(state.train_vectors, "on_disk", False), display=display)


def show_neighbours(nb, train=None, **display) -> str:
    """:meth:`Neighbours.show`: the neighbours drawn with training inputs ``train`` and other display options."""
    ctx = getattr(nb, "_context", None)
    if ctx is None:
        raise ParameterError("These neighbours do not know their explainer; draw the results of ac.similar(x).")
    if train is not None:
        display["train"] = train
    return neighbours_html(nb, ctx.with_display(**display))
