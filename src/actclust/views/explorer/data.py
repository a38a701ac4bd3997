"""What the explorer's pages show, computed from a fitted run and some test inputs.

:class:`Explorer` does, once, what every page needs and what grows with the training set: one
pass of the model over the test inputs (their vectors kept: ``n_test x width`` floats), per layer
the nearest cluster and distance of every training vector (12 bytes per sample and layer, streamed
over the store) and their order by cluster and distance, the search index of similar samples, and
the trust calibration with the test inputs' signals. Each page then computes only what it shows:
a layer page draws its clusters' exemplars and a 2-D map of a sample of the layer's vectors; a
cluster page one page of members; an input page searches that input's similar samples. Nothing
reads all training vectors into memory; results are cached per page (:class:`PageCache`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ...exceptions import DataError
from ..features import feature_order
from ..templating import for_readers, isolated

__all__ = ["Explorer", "NotFound", "PageCache", "FILTERS", "SORTS", "PAGE_SIZE"]

PAGE_SIZE = 50  # test inputs per page of the input list
SMALL_ROWS = 5  # rows of a training sample's table beside another (the input's own has 12)
MEMBERS_PER_PAGE = 48  # training samples per page of a cluster
MAP_POINTS = 2000  # training vectors drawn on a layer's map
MAP_SIZE = 360  # its width and height, in pixels
FILTERS = {"all": "all test inputs", "right": "the DNN got right", "wrong": "the DNN got wrong",
           "flagged": "with a red trust signal", "disagree": "where the surrogate disagrees with the DNN"}
SORTS = {"size": "size", "purity": "purity", "cluster": "cluster number"}
INPUT_SORTS = {"index": "position", "confidence": "DNN confidence, lowest first",
               "trust": "least trusted first"}


def number(text, below: int, at_least: int = 0) -> Optional[int]:
    """``text`` as an int in ``[at_least, below)`` where it is one written in ASCII digits, else None (a URL's
    '²' passes ``str.isdigit`` and then fails ``int``; a thousand digits exceed ``int``'s limit)."""
    text = str(text)
    if not (0 < len(text) <= 18 and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if at_least <= value < below else None


class NotFound(Exception):
    """A page for something the run does not have; ``back`` is where to go instead."""

    def __init__(self, message: str, back: str = "/", back_text: str = "the run"):
        super().__init__(message)
        self.back, self.back_text = back, back_text


class PageCache:
    """The last ``size`` pages, by address: the explorer is read-only, so a page never changes."""

    def __init__(self, size: int = 512):
        self.size, self._pages, self._lock = size, OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, build):
        with self._lock:  # one page computed at a time: a local tool for one reader
            if key in self._pages:
                self._pages.move_to_end(key)
                self.hits += 1
                return self._pages[key]
            self.misses += 1
            value = build()
            self._pages[key] = value
            if len(self._pages) > self.size:
                self._pages.popitem(last=False)
            return value


@dataclass
class LayerIndex:
    """One layer's training vectors by cluster: ``order`` sorts them by cluster, then distance to the
    centre; cluster ``c`` is ``order[start[c]:start[c + 1]]``, nearest first."""

    assign: np.ndarray
    dist: np.ndarray
    order: np.ndarray
    start: np.ndarray

    def members(self, c: int) -> np.ndarray:
        return self.order[self.start[c]:self.start[c + 1]]


class Explorer:
    """A fitted explainer, test inputs and how to draw them: everything the explorer's pages read.

    Parameters
    ----------
    ac : ActivationClustering
        A fitted (or loaded) explainer; its model runs once, over ``X``.
    X, y : test inputs and (optional) their labels.
    train : the training inputs ``fit`` saw, in order (optional), to draw training samples.
    class_names, render, mean, std, feature_names, tokenizer
        How classes and inputs are shown, as in :func:`actclust.report`.
    trust : bool, default=True
        Calibrate the trust signals (on a held-out split of the training vectors) and compute them
        for the test inputs; ``False`` skips the wait.
    k : int, default=6
        Similar samples and exemplars shown per input and cluster.
    """

    def __init__(self, ac, X, y=None, *, train=None, class_names=None, render=None, mean=None, std=None,
                 feature_names=None, tokenizer=None, trust: bool = True, k: int = 6, title: str = "actclust run",
                 progress: bool = True):
        from ...analysis import surrogate
        from ...capture.data import length
        from ..render import Renderer, check_mean_std, check_train

        self.ac, self.state, self.X, self.train, self.k, self.title = ac, ac.state_, X, train, int(k), title
        state = self.state
        self.n_test = length(X)
        if y is not None:
            y = np.asarray(y).reshape(-1)
            if len(y) != self.n_test:
                raise DataError(f"y has {len(y)} labels for {self.n_test} inputs; give one label per input.")
        check_train(ac, train)
        from ...analysis.explanation import check_class_names

        class_names = check_class_names(state, class_names)
        check_mean_std(state.input_spec, mean, std, ac._adapter().input_channel_axis)
        self.names = class_names or [str(c) for c in range(state.n_classes)]
        self.shown_names = isolated(self.names)  # as the pages show them
        self.renderer = Renderer(render, mean=mean, std=std, tokenizer=tokenizer,
                                 feature_names=feature_names or state.input_spec.feature_names)
        self.progress, self.timings = progress, {}
        if self.n_test == 0:
            raise DataError("X holds no test inputs; give at least one.")

        stages = tqdm(total=5 + bool(trust), desc="preparing the explorer", disable=not progress, leave=False,
                      bar_format="{desc}: {n}/{total} stages {bar} {elapsed}")
        timer = _Timer(self.timings, stages)
        with timer("query"):  # the one pass of the model
            self.q = ac.query(X, y, vectors=True)
        q = self.q
        with timer("surrogate"):
            probas = state.layer_probas(q.distances)  # (L, n, C)
            self.layer_pred = probas.argmax(2)
            self.layer_mix = probas
            self.proba = surrogate.combine(probas, state.weights)
            self.sur_pred = self.proba.argmax(1)
            self.paths = q.paths
            self.scores = surrogate.scores(q.dnn_pred, probas, q.labels, state.weights, state.layers)
        with timer("layers"):
            self.layers = {l: self._layer_index(l) for l in state.layers}
        with timer("feature_order"):
            self.order = feature_order(self.state, self.train, mean, std, self.ac.label_key, self.renderer.render)
        self.trust, self.thresholds, self.trust_notes = None, None, []
        if trust:
            with timer("trust"):
                self._trust()
        with timer("search_index"):  # built (and calibrated per preset) before the first input page
            self._similar(0, progress)
        stages.close()
        self.flagged = self._flags()

    # ------------------------------------------------------------------ startup
    def _layer_index(self, layer: str) -> LayerIndex:
        from ...analysis.concepts import train_assignments

        assign, dist = train_assignments(self.state, layer, self.progress)
        k = self.state.clusterings[layer].n_clusters
        order = np.lexsort((dist, assign))
        start = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=k))])
        return LayerIndex(assign, dist, order, start)

    def _trust(self) -> None:
        from ...analysis import trust

        if not trust.calibration_possible(self.state):
            self.trust_notes = [f"the run's {self.state.n_samples} training samples are too few to calibrate "
                                "trust signals"]
            return
        backend = self.ac._backend()  # as ac.trust and explain: the run's device, and its saved calibration
        cal = trust.calibrate(self.state, search=self.ac.search, progress=self.progress, backend=backend)
        signals = trust.signals(self.state, cal, self.q, backend)
        self.trust = {k: np.asarray(v, dtype=np.float64) for k, v in signals.items() if not k.endswith("_prediction")}
        self.thresholds, self.trust_notes = cal.thresholds, for_readers(cal.notes)

    def _flags(self) -> np.ndarray:
        """Per test input, the names of its signals below their thresholds."""
        flagged = np.zeros(self.n_test, dtype=np.int64)
        if self.trust is not None and self.thresholds:
            for name, t in self.thresholds["signals"].items():
                if name in self.trust:
                    flagged += self.trust[name] < t
        return flagged

    # ------------------------------------------------------------------ helpers for the pages
    def check_layer(self, layer: str) -> str:
        if layer not in self.layers:
            raise NotFound(f"The run has no layer {layer!r}; its layers are {', '.join(self.state.layers)}.")
        return layer

    def check_cluster(self, layer: str, cluster: str) -> int:
        self.check_layer(layer)
        k = self.state.clusterings[layer].n_clusters
        found = number(cluster, k)
        if found is None:
            raise NotFound(f"Layer {layer} has no cluster {cluster!r}; its clusters are 0 to {k - 1}.",
                           f"/layer/{layer}", f"layer {layer}")
        return found

    def check_input(self, index: str) -> int:
        found = number(index, self.n_test)
        if found is None:
            raise NotFound(f"There is no test input {index!r}; the inputs are 0 to {self.n_test - 1}.",
                           "/inputs", "the test inputs")
        return found

    def train_samples(self, indices, order=None, max_rows: int = 12) -> list:
        """``[(drawn, caption, tooltip)]`` of training samples (their index without training inputs);
        tables in ``order``, ``max_rows`` rows."""
        from ...capture.data import rows

        indices = [int(i) for i in indices]
        st = self.state
        if self.train is None:
            drawn = [{"kind": "index", "index": i} for i in indices]
        else:
            drawn = [self.renderer(x, f"training sample {i}", order=order, max_rows=max_rows)
                     for i, x in zip(indices, rows(self.train, indices, label_key=self.ac.label_key, name="train"))]
        out = []
        for i, d in zip(indices, drawn):
            pred = self.shown_names[int(st.train_predictions[i])]
            label = None if st.train_labels is None else self.shown_names[int(st.train_labels[i])]
            out.append((d, pred, f"training sample #{i} · DNN: {pred}" + (f" · label: {label}" if label else "")))
        return out

    def test_inputs(self, indices, orders=None, rest: int = 0) -> list:
        """Test inputs drawn (tables in the order of each input; ``rest``: further rows a page folds)."""
        from ...capture.data import rows

        indices = [int(i) for i in indices]
        xs = rows(self.X, indices, label_key=self.ac.label_key) if indices else []
        out = []
        for j, (i, x) in enumerate(zip(indices, xs)):
            order = orders[j] if orders is not None else self.input_order(i, x)
            out.append(self.renderer(x, f"input {i}", order=order, rest=rest))
        return out

    def input_order(self, i: int, x):
        if self.order is None:
            return None
        return self.order.of_input(x, int(self.paths[i, -1]))

    def cluster_order(self, layer: str, c: int):
        if self.order is None or self.order.kind != "cluster":
            return None
        return self.order.of_cluster(layer, c, len(self.order.mean))

    def concept(self, layer: str, c: int, n_exemplars: int, n_edge: int) -> dict:
        st, idx = self.state, self.layers[layer]
        members = idx.members(c)
        size = len(members)
        pred_mix = np.bincount(st.train_predictions[members], minlength=st.n_classes) / max(size, 1)
        label_mix = None
        if st.train_labels is not None:
            label_mix = (np.bincount(st.train_labels[members], minlength=st.n_classes) / max(size, 1)).tolist()
        on_path = int((self.paths[:, st.layers.index(layer)] == c).sum())
        return {"cluster": c, "size": size, "prediction_mix": pred_mix.tolist(), "label_mix": label_mix,
                "purity": float(pred_mix.max()) if size else 0.0, "majority": int(pred_mix.argmax()),
                "exemplars": members[:n_exemplars].tolist(),
                "edge": members[::-1][:n_edge].tolist() if size > n_exemplars else [],
                "test": on_path}

    def layer_map(self, layer: str) -> dict:
        """A 2-D map of a sample of the layer's training vectors: their projection on the plane of the
        cluster centres' two main directions (a PCA of the centres), coloured by cluster."""
        from ...store.vectors import take

        st = self.state
        clustering = st.clusterings[layer]
        centres = np.asarray(clustering.centers_, dtype=np.float64)
        mid = centres.mean(0)
        _, _, vt = np.linalg.svd(centres - mid, full_matrices=False)
        basis = vt[:2].T if len(vt) >= 2 else np.eye(centres.shape[1], 2)
        rng = np.random.default_rng(st.random_state)
        rows = np.sort(rng.choice(st.n_samples, min(MAP_POINTS, st.n_samples), replace=False))
        v = take(st.train_vectors[layer], rows).astype(np.float64)
        pts, cpts = (v - mid) @ basis, (centres - mid) @ basis
        both = np.vstack([pts, cpts])
        lo, hi = np.percentile(both, 0.5, 0), np.percentile(both, 99.5, 0)
        span = np.where(hi - lo > 0, hi - lo, 1.0)

        def place(p):
            return np.clip((p - lo) / span, -0.02, 1.02)

        centres_xy = place(cpts)
        return {"dots": _dots(place(pts), self.layers[layer].assign[rows]), "centres": centres_xy.tolist(),
                "labels": _label_places(centres_xy), "n": len(rows)}

    def _similar(self, i: int, progress: bool = False) -> dict:
        """Similar training samples of test input ``i`` under the "low" and "high" weights."""
        from ...analysis.explanation import find_similar
        from ...state import Query

        st, q = self.state, self.q
        one = Query(dnn_pred=q.dnn_pred[i:i + 1], dnn_proba=q.dnn_proba[i:i + 1],
                    distances={l: d[i:i + 1] for l, d in q.distances.items()},
                    vectors={l: v[i:i + 1] for l, v in q.vectors.items()}, labels=None)
        k = min(self.k, st.n_samples)
        # as explain searches them: the same neighbours as its explanations, from the index a prepared run keeps
        found = find_similar(st, one, k, search=self.ac.search, progress=progress, backend=self.ac._backend())
        return {p: list(zip(nb.indices[0].tolist(), nb.distances[0].tolist())) for p, nb in found.items()}

    def select(self, show: str, sort: str, dnn: Optional[int] = None, sur: Optional[int] = None) -> np.ndarray:
        """Test inputs for the list page: filtered by ``show`` (see :data:`FILTERS`), sorted by ``sort``."""
        q = self.q
        mask = np.ones(self.n_test, dtype=bool)
        if show in ("right", "wrong"):
            if q.labels is None:
                mask[:] = False
            else:
                mask = (q.dnn_pred == q.labels) if show == "right" else (q.dnn_pred != q.labels)
        elif show == "flagged":
            mask = self.flagged > 0
        elif show == "disagree":
            mask = self.sur_pred != q.dnn_pred
        if dnn is not None:
            mask &= q.dnn_pred == dnn
        if sur is not None:
            mask &= self.sur_pred == sur
        chosen = np.flatnonzero(mask)
        if sort == "confidence":
            key = q.dnn_proba[chosen, q.dnn_pred[chosen]]
            chosen = chosen[np.argsort(key, kind="stable")]
        elif sort == "trust" and self.trust is not None:
            main = "stacked_trust" if "stacked_trust" in self.trust else "credibility"
            chosen = chosen[np.lexsort((self.trust[main][chosen], -self.flagged[chosen]))]
        return chosen

    def disagreement(self) -> list:
        """``(dnn class, surrogate class, count)`` where they differ, most frequent first."""
        q = self.q
        differ = self.sur_pred != q.dnn_pred
        c = self.state.n_classes
        counts = np.bincount(q.dnn_pred[differ] * c + self.sur_pred[differ], minlength=c * c).reshape(c, c)
        pairs = [(int(a), int(b), int(counts[a, b])) for a, b in zip(*np.nonzero(counts))]
        return sorted(pairs, key=lambda t: -t[2])


# Where a centre's label "c<k>" may go, tried in turn: (dx, dy, anchor) from the centre, in the map's pixels (bold 11 px
# text; the centre's circle has a radius of 7)
_LABEL_SPOTS = ((9, 4, "start"), (-9, 4, "end"), (0, -10, "middle"), (0, 17, "middle"),
                (9, -7, "start"), (-9, -7, "end"), (9, 15, "start"), (-9, 15, "end"))


def _label_places(centres: np.ndarray, size: int = MAP_SIZE) -> list:
    """``(x, y, anchor)`` of each centre's label on the map: the first of :data:`_LABEL_SPOTS` where it covers no
    label placed before it and no other centre's circle and lies inside the map (else the spot that covers least).
    Two centres close together had their labels printed over each other (c9 and c13, an outside check)."""
    xy = np.column_stack([size * centres[:, 0], size * (1 - centres[:, 1])])
    placed = []  # (x0, y0, x1, y1) of the labels placed

    def box(x, y, anchor, text):
        w = 7.0 * len(text) + 2  # bold 11 px digits and "c": about 7 px each
        x0 = x if anchor == "start" else x - w if anchor == "end" else x - w / 2
        return x0, y - 10.0, x0 + w, y + 2.0

    def overlap(a, b):  # the area two boxes (x0, y0, x1, y1) share
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    view = (-10.0, -10.0, size + 10.0, size + 10.0)  # the map's view box: a label outside it is cut off or not drawn

    def covered(b, k):
        area = 100 * (overlap(b, b) - overlap(b, view)) + sum(overlap(b, o) for o in placed)
        return area + sum(overlap(b, (cx - 7, cy - 7, cx + 7, cy + 7))  # other centres' circles, as squares
                          for j, (cx, cy) in enumerate(xy) if j != k)

    out = []
    for k, (cx, cy) in enumerate(xy):
        text = f"c{k}"
        spots = [(cx + dx, cy + dy, a) for dx, dy, a in _LABEL_SPOTS]
        costs = [covered(box(x, y, a, text), k) for x, y, a in spots]
        x, y, a = spots[next((i for i, c in enumerate(costs) if c == 0), int(np.argmin(costs)))]
        placed.append(box(x, y, a, text))
        out.append((round(float(x), 1), round(float(y), 1), a))
    return out


def _dots(points: np.ndarray, clusters: np.ndarray, size: int = MAP_SIZE):
    """The map's points as SVG: one path of round dots per cluster (a few elements, not one per point)."""
    from markupsafe import Markup

    from ..templating import cluster_color

    xy = np.column_stack([size * points[:, 0], size * (1 - points[:, 1])])
    parts = []
    for c in np.unique(clusters):
        d = "".join("M%.1f %.1fh0" % (x, y) for x, y in xy[clusters == c])
        parts.append(f'<path class="dots" d="{d}" stroke="{cluster_color(int(c))}"/>')
    return Markup("".join(parts))


class _Timer:
    """Times each start stage into ``out``, and moves the stage bar with the stage's name."""

    _NAMES = {"query": "one pass of the model over the test inputs", "surrogate": "the surrogate's predictions",
              "layers": "the cluster of every training vector", "feature_order": "feature statistics",
              "trust": "trust calibration and signals", "search_index": "the similar-sample search index"}

    def __init__(self, out: dict, bar=None):
        self.out, self.bar = out, bar

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def block():
            if self.bar is not None:
                self.bar.set_description(f"preparing the explorer: {self._NAMES.get(name, name)}")
            start = time.perf_counter()
            yield
            self.out[name] = time.perf_counter() - start
            if self.bar is not None:
                self.bar.update()
        return block()
