import json
import warnings

import numpy as np
import pytest
import torch
from conftest import LAYERS
from torch import nn

import actclust
from actclust import ActivationClustering, NotFittedError
from actclust.analysis import trust as trust_mod
from actclust.analysis.trust import MIN_CALIBRATION, calibration_possible, trust_signals

KW = {"n_neighbors": 5, "calibration_fraction": 0.25}


def _ac(model, **kw):
    kw.setdefault("n_clusters", 4)
    return ActivationClustering(model, LAYERS, progress=False, **kw)


# ----------------------------------------------------------------------------------------------
# A network whose layer vectors are known functions of the input, so that every trust signal can
# be recomputed here by brute force in float64 without reading anything the library computed
# except the k-means centres.
W_B = np.array([[2.0, 0.0], [0.0, 0.5]])  # layer "b" = x @ W_B.T: stretches x, so its neighbours differ from "a"'s
W_HEAD = np.array([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])  # logits = b @ W_HEAD.T: three sectors
TINY = ["a", "b"]
TINY_KW = {"n_neighbors": 5, "calibration_fraction": 0.5}  # 60 training samples: 30 calibration, 30 reference
TINY_WEIGHTS = np.array([0.25, 0.75])  # layer_weights=[1, 3] at fit


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(torch.tensor(W_B))
            self.head.weight.copy_(torch.tensor(W_HEAD))

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def _vectors(x):
    x = np.asarray(x, dtype=np.float64)
    return {"a": x, "b": x @ W_B.T}


def _dnn(x):
    return (_vectors(x)["b"] @ W_HEAD.T).argmax(1)


@pytest.fixture(scope="module")
def tiny():
    """(x_train, y_train, x_query): y agrees with the DNN on about half the training samples;
    the queries are new points, the last three far outside the training data."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 2)).astype(np.float32)
    pred = _dnn(x)
    y = np.where(rng.random(60) < 0.5, pred, (pred + 1 + rng.integers(0, 2, 60)) % 3)
    xq = np.concatenate([rng.standard_normal((25, 2)), [[6.0, 6.0], [-7.0, 5.0], [0.0, -8.0]]]).astype(np.float32)
    return x, y, xq


def _tiny_ac(**kw):
    kw = {"n_clusters": 3, "normalize": None, "layer_weights": [1, 3], **kw}
    return ActivationClustering(_Tiny().eval(), TINY, progress=False, **kw)


class _Oracle:
    """Deep k-NN (Papernot & McDaniel 2018) and the surrogate, by brute force on the hand-computed vectors.

    The split is the documented one: a permutation drawn from ``random_state``, calibration first.
    """

    def __init__(self, x, labels, centers, knn_weights=TINY_WEIGHTS, k=5, fraction=0.5, random_state=0,
                 held_out=None):
        n = len(x)
        self.v, self.labels, self.pred = _vectors(x), np.asarray(labels), _dnn(x)
        self.centers = {l: np.asarray(c, dtype=np.float64) for l, c in centers.items()}
        self.w, self.k = np.asarray(knn_weights, dtype=np.float64), k  # of the neighbour signals
        if held_out is None:  # trust's own split: a permutation drawn from random_state, calibration first
            order = np.random.default_rng(random_state).permutation(n)
            n_cal = round(fraction * n)
            self.cal, self.ref = order[:n_cal], order[n_cal:]
            self.v_cal = {l: v[self.cal] for l, v in self.v.items()}
            self.cal_labels, self.cal_pred = self.labels[self.cal], self.pred[self.cal]
        else:  # held-out (x_val, y_val): every training vector is a neighbour
            self.ref = np.arange(n)
            self.v_cal, self.cal_labels, self.cal_pred = _vectors(held_out[0]), np.asarray(held_out[1]), _dnn(held_out[0])

    def _neighbours(self, l, v):
        """Squared distances to the reference vectors of layer l, nearest first, and their labels."""
        d = ((v[:, None, :] - self.v[l][self.ref][None]) ** 2).sum(2)
        order = np.argsort(d, 1, kind="stable")
        return np.take_along_axis(d, order, 1), self.labels[self.ref][order]

    def alpha(self, vectors, cls):
        """Nonconformity: weighted count over layers of the k nearest whose label is not ``cls``."""
        return sum(w * (self._neighbours(l, vectors[l])[1][:, :self.k] != cls[:, None]).sum(1)
                   for w, l in zip(self.w, TINY))

    def credibility(self, vectors, cls):
        cal_alpha = self.alpha(self.v_cal, self.cal_labels)
        return (cal_alpha[None, :] >= self.alpha(vectors, cls)[:, None] - 1e-9).mean(1)

    def _kth(self, l, v):
        return self._neighbours(l, v)[0][:, self.k - 1]

    def knn_typicality(self, vectors):
        return sum(w * (self._kth(l, self.v_cal[l])[None, :] >= self._kth(l, vectors[l])[:, None]).mean(1)
                   for w, l in zip(self.w, TINY))

    def ood_typicality(self, vectors):
        """Fisher's combination (chi-squared, 2L degrees of freedom) of each layer's share of
        calibration samples at least as far from their nearest reference vector as the input,
        a share of 0 counted as 1 / (n_cal + 1)."""
        from scipy.stats import chi2

        stat = 0
        for l in TINY:
            cal_near = self._neighbours(l, self.v_cal[l])[0][:, 0]
            p = (cal_near[None, :] >= self._neighbours(l, vectors[l])[0][:, 0][:, None]).mean(1)
            stat = stat - 2 * np.log(np.maximum(p, 1 / (len(cal_near) + 1)))
        return chi2.sf(stat, 2 * len(TINY))

    def _nearest(self, l, v):
        d = ((v[:, None, :] - self.centers[l][None]) ** 2).sum(2)
        return d.min(1), d.argmin(1)

    def cluster_typicality(self, vectors):
        out = 0
        for w, l in zip(self.w, TINY):
            d_ref, c_ref = self._nearest(l, self.v[l][self.ref])
            spread = np.array([d_ref[c_ref == c].mean() for c in range(len(self.centers[l]))])
            assert np.isfinite(spread).all()  # the fixture gives every cluster a reference member
            d_cal, c_cal = self._nearest(l, self.v_cal[l])
            d_q, c_q = self._nearest(l, vectors[l])
            out = out + w * ((d_cal / spread[c_cal])[None, :] >= (d_q / spread[c_q])[:, None]).mean(1)
        return out

    def layer_probas(self, vectors):
        """Per layer, the class mix (smoothed by one pseudo-count toward the prior) of the input's
        nearest cluster, the surrogate's targets being the DNN's predictions on all training samples."""
        prior = np.bincount(self.pred, minlength=3) / len(self.pred)
        out = []
        for l in TINY:
            c_train = self._nearest(l, self.v[l])[1]
            post = np.array([(np.bincount(self.pred[c_train == c], minlength=3) + prior) / ((c_train == c).sum() + 1)
                             for c in range(len(self.centers[l]))])
            out.append(post[self._nearest(l, vectors[l])[1]])
        return np.stack(out)

    def stack_features(self, vectors, judged, agreement, credibility):
        """stacked_trust's documented inputs: per layer the kernel-weighted share of the k nearest
        voting ``judged``, per layer the log distance ratio other class / ``judged`` class among the k
        nearest reference vectors (a class absent there at the k-th distance), per layer the same ratio
        of the distances to the classes' mean reference vectors, then the agreement and the credibility."""
        votes, ratios, mean_ratios = [], [], []
        for l in TINY:
            d, lab = self._neighbours(l, vectors[l])
            floor = 1e-6 * (vectors[l] ** 2).sum(1, keepdims=True)
            r, same = np.sqrt(np.maximum(d[:, :self.k], floor)), lab[:, :self.k] == judged[:, None]
            kernel = np.exp(-(r / r[:, -1:]) ** 2)
            votes.append((kernel * same).sum(1) / kernel.sum(1))
            near = [np.minimum(np.where(m, r, np.inf).min(1), r[:, -1]) for m in (same, ~same)]
            ratios.append(np.log(near[1] + 1e-9) - np.log(near[0] + 1e-9))
            ref, ref_labels = self.v[l][self.ref], self.labels[self.ref]
            means = np.stack([ref[ref_labels == c].mean(0) for c in range(3)])  # every class has reference rows here
            rm = np.sqrt(np.maximum(((vectors[l][:, None, :] - means[None]) ** 2).sum(2), floor))
            own = rm[np.arange(len(judged)), judged]
            other = np.where(np.arange(3)[None, :] == judged[:, None], np.inf, rm).min(1)
            mean_ratios.append(np.log(other + 1e-9) - np.log(own + 1e-9))
        return np.column_stack(votes + ratios + mean_ratios + [agreement, credibility])

    def signals(self, x):
        v, pred = _vectors(x), _dnn(x)
        rows = np.arange(len(pred))
        probas = self.layer_probas(v)
        comb = np.tensordot(TINY_WEIGHTS, probas, 1)  # the surrogate's own weights
        cred = np.stack([self.credibility(v, np.full(len(pred), c)) for c in range(3)], 1)
        return {
            "dnn_prediction": pred,
            "dnn_confidence": _softmax(x)[rows, pred],
            "ood_typicality": self.ood_typicality(v),
            "surrogate_prediction": comb.argmax(1),
            "surrogate_confidence": comb.max(1),
            "surrogate_dnn_agreement": comb[rows, pred],
            "layer_agreement": (probas.argmax(2) == pred[None]).T.astype(float) @ TINY_WEIGHTS,
            "credibility": cred[rows, pred],
            "dknn_prediction": cred.argmax(1),
            "knn_typicality": self.knn_typicality(v),
            "cluster_typicality": self.cluster_typicality(v),
        }


def _softmax(x):
    z = _vectors(x)["b"] @ W_HEAD.T
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _check_signals(got, expected):
    for key, value in expected.items():
        assert key in got, key
        if value.dtype.kind == "i":
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=key)


# every signal equals a brute-force recomputation: surrogate signals from the centres and the
# training predictions, deep k-NN credibility, its class, and both typicalities from the raw vectors
@pytest.mark.parametrize("layer_weights, w", [("surrogate", TINY_WEIGHTS), ("equal", [0.5, 0.5])])
def test_signals_match_brute_force(tiny, layer_weights, w):
    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    got = ac.trust(xq, layer_weights=layer_weights, **TINY_KW)
    centers = {l: ac.clusterings_[l].centers_ for l in TINY}
    _check_signals(got, _Oracle(x, y, centers, knn_weights=w).signals(xq))
    # the fixture exercises what it should: credibility takes several values, far inputs look atypical
    assert len(np.unique(got["credibility"])) >= 4
    assert got["knn_typicality"][-3:].max() == 0 and got["cluster_typicality"][-3:].max() == 0
    assert got["ood_typicality"][-3:].max() < 0.01 < np.median(got["ood_typicality"][:25])


# the neighbours' labels are the true labels when fit had them, else the DNN's predictions
def test_neighbour_labels_are_labels_or_predictions(tiny):
    x, y, xq = tiny
    without = _tiny_ac().fit(x)
    got = without.trust(xq, **TINY_KW)
    centers = {l: without.clusterings_[l].centers_ for l in TINY}
    _check_signals(got, _Oracle(x, _dnn(x), centers).signals(xq))
    with_y = _tiny_ac().fit(x, y).trust(xq, **TINY_KW)
    assert not np.array_equal(with_y["credibility"], got["credibility"])


# stacked_trust is the documented logistic regression, refitted here on features computed by brute
# force for the calibration samples (none taken from the library's outputs)
def test_stacked_trust_matches_brute_force(tiny):
    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    got = ac.trust(xq, **TINY_KW)
    o = _Oracle(x, y, {l: ac.clusterings_[l].centers_ for l in TINY})
    expected = _stacked_by_brute_force(o, xq, confidence=None)
    np.testing.assert_allclose(got["stacked_trust"], expected, atol=1e-4)
    assert expected.max() - expected.min() > 0.3  # the signal is not a constant on this fixture


def _stacked_by_brute_force(o, xq, confidence):
    """The documented logistic regression on brute-force features; with ``confidence`` (the
    held-out inputs), log(1 - the DNN's softmax probability of its class, capped at 1 - 1e-6) is last."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    right = o.cal_pred == o.cal_labels
    assert min(right.sum(), (~right).sum()) >= 10  # the fixture's calibration split can fit it

    def features(vectors, pred, x=None):
        rows = np.arange(len(pred))
        agreement = np.tensordot(TINY_WEIGHTS, o.layer_probas(vectors), 1)[rows, pred]
        f = o.stack_features(vectors, pred, agreement, o.credibility(vectors, pred))
        return f if x is None else np.column_stack([f, np.log(1 - np.minimum(_softmax(x)[rows, pred], 1 - 1e-6))])

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    model.fit(features(o.v_cal, o.cal_pred, confidence), o.cal_labels == o.cal_pred)
    return model.predict_proba(features(_vectors(xq), _dnn(xq), None if confidence is None else xq))[:, 1]


# calibration=ac.query(x_val, y_val, vectors=True): held-out samples calibrate, every training
# vector is a neighbour, and stacked_trust adds the DNN's confidence; all by brute force
def test_held_out_calibration_matches_brute_force(tiny):
    x, y, xq = tiny
    rng = np.random.default_rng(5)
    x_val = rng.standard_normal((40, 2)).astype(np.float32)
    y_val = np.where(rng.random(40) < 0.5, _dnn(x_val), (_dnn(x_val) + 1) % 3)
    ac = _tiny_ac().fit(x, y)
    got = ac.trust(xq, n_neighbors=5, calibration=ac.query(x_val, y_val, vectors=True))
    o = _Oracle(x, y, {l: ac.clusterings_[l].centers_ for l in TINY}, held_out=(x_val, y_val))
    _check_signals(got, o.signals(xq))
    np.testing.assert_allclose(got["stacked_trust"], _stacked_by_brute_force(o, xq, confidence=x_val), atol=1e-4)
    pair = ac.trust(xq, n_neighbors=5, calibration=(x_val, y_val))  # the inputs themselves, queried by trust
    for k in got:
        np.testing.assert_array_equal(pair[k], got[k], err_msg=k)
    with pytest.warns(actclust.TrustWarning, match="needs true labels"):  # inputs alone: no labels
        assert "stacked_trust" not in ac.trust(xq, n_neighbors=5, calibration=x_val)
    own = ac.trust(xq, **TINY_KW)  # the cache holds one calibration: switching back rebuilds trust's own
    assert not np.allclose(own["credibility"], got["credibility"])


# without true labels trust says which signals are missing or measure agreement, in a warning and
# in every Explanation; the DNN's confidence is there either way
def test_unlabeled_trust_warns_and_explanations_say_so(tiny):
    x, y, xq = tiny
    ac = _tiny_ac().fit(x)
    with pytest.warns(actclust.TrustWarning, match=r"stacked_trust is unavailable: .* needs true labels .*"
                                                   r"credibility and dknn_prediction count neighbours by the DNN's own"):
        got = ac.trust(xq, **TINY_KW)
    assert "stacked_trust" not in got and "dnn_confidence" in got
    es = trust_mod_explain(ac, xq)  # the same calibration, cached: said once, kept in every explanation
    assert "needs true labels" in es[0].trust_notes[0] and "not correctness" in es[-1].trust_notes[1]
    assert actclust.Explanation.from_json(es[0].to_json()).trust_notes == es[0].trust_notes
    with pytest.warns(actclust.TrustWarning, match=r"holds 0 DNN errors and 30 right predictions; it needs at least 10 "
                                                   r"of each \(held-out data holds more errors: in Python, "
                                                   r"trust=\{'calibration': \(X_val, y_val\)\}; the command line has no "
                                                   r"option for it\)"):
        _tiny_ac().fit(x, _dnn(x)).trust(xq, **TINY_KW)
    # labels on held-out data give an unlabeled fit its stacked_trust
    rng = np.random.default_rng(5)
    x_val = rng.standard_normal((40, 2)).astype(np.float32)
    y_val = np.where(rng.random(40) < 0.5, _dnn(x_val), (_dnn(x_val) + 1) % 3)
    assert "stacked_trust" in ac.trust(xq, n_neighbors=5, calibration=ac.query(x_val, y_val, vectors=True))
    # held-out data without errors: the note no longer says to pass held-out data, which it is
    with pytest.warns(actclust.TrustWarning, match=r"holds 0 DNN errors and 40 right predictions; it needs at least 10 "
                                                   r"of each\.$"):
        _tiny_ac().fit(x, _dnn(x)).trust(xq, n_neighbors=5, calibration=ac.query(x_val, _dnn(x_val), vectors=True))


def trust_mod_explain(ac, xq):
    from actclust.analysis.explanation import explain

    return explain(ac.state_, ac.query(xq, vectors=True), k=3, trust=TINY_KW)  # trust_signals' options


def test_held_out_calibration_refused(tiny):
    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    with pytest.raises(ValueError, match=r"calibration query needs the reduced vectors: make it with "
                                         r"ac.query\(X_val, y_val, vectors=True\)"):
        ac.trust(xq, calibration=ac.query(x, y))
    with pytest.raises(ValueError, match=f"calibration query has 5 samples; at least MIN_CALIBRATION={MIN_CALIBRATION}"):
        ac.trust(xq, calibration=ac.query(x[:5], y[:5], vectors=True))
    with pytest.raises(ValueError, match=r"n_neighbors=100 needs at least 100 training samples; the fit had 60"):
        ac.trust(xq, n_neighbors=100, calibration=ac.query(x, y, vectors=True))


# inputs unlike the training data get low k-NN and cluster typicality
def test_typicality_low_far_from_training_data(model, data):
    x, y = data
    ac = _ac(model).fit(x, y)
    inside = ac.trust(x[:40], **KW)
    far = ac.trust(8 + 4 * np.abs(x[:40]), **KW)
    assert far["knn_typicality"].mean() < inside["knn_typicality"].mean() - 0.2
    assert far["cluster_typicality"].mean() < inside["cluster_typicality"].mean() - 0.2


# the calibration is built once per fit and parameters (its neighbour searches are not repeated),
# reused otherwise, and a refit on other data gives that data's signals
def test_calibration_cached_and_rebuilt(tiny, monkeypatch):
    built = []
    real = trust_mod.calibrate.__globals__["_Calibration"]
    monkeypatch.setattr(trust_mod, "_Calibration", lambda *a, **kw: built.append(a[0]) or real(*a, **kw))
    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    first = ac.trust(xq, **TINY_KW)
    assert len(built) == 2  # a draft to search with, then the finished calibration
    again = ac.trust(xq, **TINY_KW)
    assert len(built) == 2
    for k in first:
        np.testing.assert_array_equal(first[k], again[k], err_msg=k)
    ac.trust(xq, n_neighbors=6, calibration_fraction=0.5)
    assert len(built) == 4
    x2, y2 = x[::-1] * 1.5, y[::-1].copy()
    ac.fit(x2, y2)
    refit = ac.trust(xq, n_neighbors=6, calibration_fraction=0.5)
    assert len(built) == 6
    centers = {l: ac.clusterings_[l].centers_ for l in TINY}
    _check_signals(refit, _Oracle(x2, y2, centers, k=6).signals(xq))


# batching the neighbour search does not change any signal
def test_batching_does_not_change_results(model, data, monkeypatch):
    x, y = data
    whole = _ac(model).fit(x, y).trust(x, **KW)
    monkeypatch.setattr(trust_mod, "_BATCH", 7)
    batched = _ac(model).fit(x, y).trust(x, **KW)  # a fresh fit: the calibration is built in batches too
    for k in whole:
        np.testing.assert_allclose(whole[k], batched[k], err_msg=k)


# a saved and loaded explainer gives the same signals with the defaults: from the calibration saved with the run
# (nothing searched again), or, in a run saved before any trust call, from the same calibration built again
def test_same_after_load(model, data, tmp_path, monkeypatch):
    x, y = data
    x_big = np.concatenate([x, x + 0.01])
    y_big = np.concatenate([y, y])
    ac = _ac(model).fit(x_big, y_big)
    ac.save(tmp_path / "plain")
    before = ac.trust(x[:20])  # defaults: 10% of 240 = 24 calibration samples
    ac.save(tmp_path / "run")
    searched = []  # the layers' neighbour searches: those of the inputs, and those of a calibration built
    real = trust_mod._neighbour_stats
    monkeypatch.setattr(trust_mod, "_neighbour_stats", lambda *a: searched.append(len(a[2])) or real(*a))
    loaded = actclust.load(tmp_path / "run", model)
    assert loaded.state_.cache["trust"].key == ac.state_.cache["trust"].key
    after = loaded.trust(x[:20])
    assert searched == [20] * len(LAYERS)  # the calibration kept with the run: its samples not searched again
    rebuilt = actclust.load(tmp_path / "plain", model).trust(x[:20])
    assert searched[len(LAYERS):] == [24] * len(LAYERS) + [20] * len(LAYERS)
    for k in before:
        assert np.array_equal(before[k], after[k]), k
        assert np.array_equal(before[k], rebuilt[k]), k
    # other parameters, or a held-out calibration (the user's data, not the run's), are calibrated anew
    loaded.trust(x[:20], n_neighbors=4)
    assert searched[-2 * len(LAYERS):] == [24] * len(LAYERS) + [20] * len(LAYERS)
    loaded.trust(x[:20], calibration=(x[:30], y[:30]))
    loaded.save(tmp_path / "held-out")
    assert "trust_calibration" not in (tmp_path / "held-out" / "manifest.json").read_text()


# stacked_trust's model is kept with the run too
def test_stacked_trust_same_after_load(tiny, tmp_path):
    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    before = ac.trust(xq, **TINY_KW)
    ac.save(tmp_path / "run")
    after = actclust.load(tmp_path / "run", _Tiny().eval()).trust(xq, **TINY_KW)
    assert before["stacked_trust"].max() - before["stacked_trust"].min() > 0.3
    for k in before:
        assert np.array_equal(before[k], after[k]), k


# a calibration kept with a run serves on any device: one computed on a GPU answers on a machine without one
def test_saved_calibration_serves_on_any_device(tiny, tmp_path, monkeypatch):
    from safetensors.numpy import load_file
    from test_persistence import _arrays, _forge

    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    before = ac.trust(xq, **TINY_KW)
    ac.save(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest["trust_calibration"]["device"] = "cuda:0"  # as a run prepared on a GPU records it
    _forge(tmp_path / "run", manifest, load_file(str(_arrays(tmp_path / "run"))))
    searched = []
    real = trust_mod._neighbour_stats
    monkeypatch.setattr(trust_mod, "_neighbour_stats", lambda *a: searched.append(len(a[2])) or real(*a))
    loaded = actclust.load(tmp_path / "run", _Tiny().eval())
    after = loaded.trust(xq, **TINY_KW)
    assert searched == [len(xq)] * len(TINY)  # the inputs only: the calibration samples not searched again
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    loaded.save(tmp_path / "again")  # and it keeps saying where it was computed
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["trust_calibration"]["device"] == "cuda:0"


# a run prepared before stacked_trust took the class means' ratio (its model: 2L + 2 features, no class means) loads,
# and trust calibrates again on first use, as for a run saved unprepared: the same signals as this code's own
def test_calibration_saved_before_the_class_means_is_built_again(tiny, tmp_path, monkeypatch):
    from safetensors.numpy import load_file
    from test_persistence import _arrays, _forge

    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    before = ac.trust(xq, **TINY_KW)
    ac.save(tmp_path / "run")
    arrays = load_file(str(_arrays(tmp_path / "run")))
    assert arrays["trust/stack/coef"].shape == (3 * len(TINY) + 2,)
    old = {k: v for k, v in arrays.items() if not k.startswith(("trust/class_means/", "trust/class_present"))}
    for k in ("trust/stack/mean", "trust/stack/scale", "trust/stack/coef"):
        old[k] = np.concatenate([v[:2 * len(TINY)], v[3 * len(TINY):]]) if (v := arrays[k]).size > 1 else v
    _forge(tmp_path / "run", json.loads((tmp_path / "run" / "manifest.json").read_text()), old)
    searched = []
    real = trust_mod._neighbour_stats
    monkeypatch.setattr(trust_mod, "_neighbour_stats", lambda *a: searched.append(len(a[2])) or real(*a))
    loaded = actclust.load(tmp_path / "run", _Tiny().eval())
    kept = loaded.state_.cache["trust_thresholds"]["signals"]  # the chips' thresholds, but the old model's
    assert "stacked_trust" not in kept and kept == {k: v for k, v in ac.state_.cache["trust_thresholds"]["signals"].items()
                                                    if k != "stacked_trust"}
    after = loaded.trust(xq, **TINY_KW)
    assert len(searched) == 2 * len(TINY)  # the calibration samples searched again, then the inputs
    assert loaded.state_.cache["trust_thresholds"] == ac.state_.cache["trust_thresholds"]
    for k in before:
        assert np.array_equal(before[k], after[k]), k


# The run's reader knows no analysis: it hands the kept calibration to the callback it is given (the explainer's
# load passes trust's), and reading a run that holds one without it imports no trust code
def test_run_reader_imports_no_trust(tiny, tmp_path):
    import subprocess
    import sys

    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    ac.trust(xq, **TINY_KW)
    ac.save(tmp_path / "run")
    assert "trust_calibration" in json.loads((tmp_path / "run" / "manifest.json").read_text())

    def analyses(code):  # the analysis modules a fresh interpreter holds after running ``code``
        code = f"import sys; {code}; print(sorted(m for m in sys.modules if m.startswith('actclust.analysis.')))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    read = f"from actclust.io.persistence import read_run; read_run({str(tmp_path / 'run')!r}, progress=False)"
    # only what the fitted state itself computes with (the surrogate's combination)
    assert analyses(read) == analyses("import actclust.state") == "['actclust.analysis.surrogate']\n"


# stacked_trust's model kept as numbers predicts as scikit-learn's pipeline fitted on the same features
def test_stack_predicts_as_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 6)) * [1, 10, 0.1, 3, 1, 5] + [0, 5, -2, 0, 1, 0]
    right = f[:, 0] + 0.1 * f[:, 1] + rng.standard_normal(300) > 0.3
    want = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(f, right)
    q = rng.standard_normal((50, 6)) * 4
    np.testing.assert_allclose(trust_mod._Stack.fit(f, right).predict(q), want.predict_proba(q)[:, 1], rtol=0,
                               atol=1e-12)


# a loaded run whose calibration has notes says them once, as a fresh calibration would
def test_notes_said_after_load(tiny, tmp_path):
    x, y, xq = tiny
    ac = _tiny_ac().fit(x)
    with pytest.warns(actclust.TrustWarning, match="stacked_trust is unavailable"):
        ac.trust(xq, **TINY_KW)
    ac.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", _Tiny().eval())
    with pytest.warns(actclust.TrustWarning, match="stacked_trust is unavailable"):
        loaded.trust(xq, **TINY_KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error", actclust.TrustWarning)
        loaded.trust(xq, **TINY_KW)  # once per run


# a saved calibration that does not fit the run is refused as a damaged save
@pytest.mark.parametrize("damage,match", [
    (lambda m, a: a.update({"trust/cal_alpha": a["trust/cal_alpha"][:-1]}), r"trust/cal_alpha has shape \(29,\)"),
    (lambda m, a: a.update({"trust/cal_kth/b": np.full(30, np.nan)}), "values that are not finite"),
    (lambda m, a: a.pop("trust/stack/coef"), "KeyError: 'trust/stack/coef'"),
    (lambda m, a: m["trust_calibration"].update(search="fast"), "trust calibration settings"),
    # the class means of stacked_trust: which classes have reference rows is the run's to say, and each mean is a
    # float32 whose square stays finite (1e39 became infinite, 1e20 overflowed its square: every value NaN)
    (lambda m, a: a.update({"trust/class_present": np.zeros(3)}), "class_present does not say which classes"),
    (lambda m, a: a.update({"trust/class_means/b": np.full((3, 2), 1e39)}), "class_means/b holds values past"),
    (lambda m, a: a.update({"trust/class_means/a": np.full((3, 2), 1e20, np.float32)}), "class_means/a holds values"),
    (lambda m, a: a.pop("trust/class_means/a"), "KeyError: 'trust/class_means/a'"),
    (lambda m, a: a.update({"trust/class_means/a": np.zeros((3, 3))}), r"class_means/a has shape \(3, 3\)"),
])
def test_damaged_calibration_refused(tiny, tmp_path, damage, match):
    from safetensors.numpy import load_file
    from test_persistence import _arrays, _forge

    x, y, xq = tiny
    ac = _tiny_ac().fit(x, y)
    ac.trust(xq, **TINY_KW)
    ac.save(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    arrays = load_file(str(_arrays(tmp_path / "run")))
    damage(manifest, arrays)
    _forge(tmp_path / "run", manifest, arrays)
    with pytest.raises(actclust.InvalidSaveError, match="malformed trust calibration .*" + match):
        actclust.load(tmp_path / "run", _Tiny().eval())


# trust on an unfitted explainer says to fit first
def test_unfitted(model, data):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        _ac(model).trust(data[0])


# a calibration split below the minimum is refused, naming the minimum
def test_calibration_too_small(model, data):
    x, y = data
    ac = _ac(model).fit(x, y)
    assert not calibration_possible(ac.state_) and calibration_possible(ac.state_, 5, 0.25)
    with pytest.raises(ValueError, match=f"12 samples .* at least MIN_CALIBRATION={MIN_CALIBRATION} are needed: raise "
                                         "calibration_fraction to 0.17 or more"):
        ac.trust(x)  # 10% of 120
    with pytest.raises(ValueError, match="at least MIN_CALIBRATION=20 are needed: no split of them can calibrate"):
        ac.trust(x, n_neighbors=110)  # 120 rows: 20 for calibration would leave 100 neighbours (it said: raise the
        # fraction, which no value could do)
    with pytest.raises(ValueError, match="n_neighbors=100 needs at least 100"):
        ac.trust(x, n_neighbors=100, calibration_fraction=0.25)


# trust_signals on a query made elsewhere equals ac.trust; a query without vectors is refused
def test_query_reused(model, data):
    x, y = data
    ac = _ac(model).fit(x, y)
    direct = ac.trust(x[:10], **KW)
    reused = trust_signals(ac.state_, ac.query(x[:10], vectors=True), **KW)
    for k in direct:
        assert np.array_equal(direct[k], reused[k]), k
    with pytest.raises(ValueError, match="need the reduced vectors"):
        trust_signals(ac.state_, ac.query(x[:10]), **KW)


# bad parameters name the parameter and the value given
@pytest.mark.parametrize("kw, match", [
    ({"n_neighbors": 0}, "'n_neighbors' .* positive int. Got 0"),
    ({"n_neighbors": 2.5}, "'n_neighbors' .* positive int. Got 2.5"),
    ({"calibration_fraction": 1.0}, r"'calibration_fraction' .* \(0, 1\). Got 1.0"),
    ({"calibration_fraction": "0.2"}, r"'calibration_fraction' .* \(0, 1\). Got '0.2'"),
    ({"layer_weights": "fit"}, r"'layer_weights' .* \['surrogate', 'equal'\]. Got 'fit'"),
])
def test_bad_parameters(model, data, kw, match):
    x, y = data
    ac = _ac(model).fit(x, y)
    with pytest.raises(ValueError, match=match):
        ac.trust(x, **{**KW, **kw})


# stacked_trust needs true labels and both right and wrong predictions in the calibration split
def test_stacked_trust_only_when_calibratable(tiny):
    x, y, xq = tiny
    assert "stacked_trust" in _tiny_ac().fit(x, y).trust(xq, **TINY_KW)
    assert "stacked_trust" not in _tiny_ac().fit(x).trust(xq, **TINY_KW)  # DNN predictions as labels
    assert "stacked_trust" not in _tiny_ac().fit(x, _dnn(x)).trust(xq, **TINY_KW)  # no errors


# the distance ratio of stacked_trust is among the k nearest (a class absent there counts at the k-th distance): one
# search k deep per batch and no deeper one (a second, 200-deep search for most inputs of the last layers was most of
# trust's search time), the same features as brute force in float64
def test_ratio_among_the_k_nearest_one_search():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3000, 4)).astype(np.float32)
    labels = (ref[:, 0] > 0.8).astype(np.int64) + (ref[:, 1] > 1.2)  # classes 0, 1, 2 of very unequal size
    queries = rng.standard_normal((500, 4)).astype(np.float32) * 1.3
    judged = rng.integers(0, 3, 500)
    depths = []

    def find(v, depth):
        depths.append((len(v), depth))
        d = ((v[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(2)
        idx = np.argsort(d, 1, kind="stable")[:, :depth]
        return np.take_along_axis(d, idx, 1), idx

    k = 5
    counts, kth, (vote, ratio, nearest) = trust_mod._neighbour_stats(find, labels, queries, k, 3, judged)
    assert depths == [(500, k)]
    d = ((queries[:, None, :].astype(np.float64) - ref[None]) ** 2).sum(2)
    order = np.argsort(d, 1, kind="stable")[:, :k]
    r = np.sqrt(np.take_along_axis(d, order, 1))
    same = labels[order] == judged[:, None]
    assert 0 < (~(same.any(1) & (~same).any(1))).sum() < 500  # the fixture has inputs lacking a class among the k
    near = [np.minimum(np.where(m, r, np.inf).min(1), r[:, -1]) for m in (same, ~same)]
    np.testing.assert_allclose(ratio, np.log(near[1] + 1e-9) - np.log(near[0] + 1e-9), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, np.stack([(labels[order] == c).sum(1) for c in range(3)], 1))
    np.testing.assert_allclose(kth, r[:, k - 1] ** 2, rtol=1e-5)
    np.testing.assert_allclose(nearest, r[:, 0] ** 2, rtol=1e-5)


# the class means are those of the reference rows (the calibration rows left out), whatever the chunks; the ratio to
# them leaves out a class without reference rows, and counts the judged class's distance, where it has none, at the
# farthest mean; all by brute force in float64
def test_class_means_and_their_ratio(monkeypatch):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((500, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 500)
    labels[labels == 3] = 2  # class 3 has no rows
    is_cal = rng.random(500) < 0.2
    labels[labels == 1] = 4  # class 4: rows in the calibration split only, so no reference row either
    labels[(labels == 4) & ~is_cal] = 1
    is_cal[labels == 4] = True
    monkeypatch.setattr(trust_mod, "_BATCH", 7)  # many chunks
    means, present = trust_mod._class_means(X, labels, is_cal, 5)
    np.testing.assert_array_equal(present, [True, True, True, False, False])
    for c in range(3):
        np.testing.assert_allclose(means[c], X[~is_cal & (labels == c)].astype(np.float64).mean(0), rtol=1e-6)
    V = rng.standard_normal((40, 6)).astype(np.float32)
    judged = np.r_[rng.integers(0, 3, 36), [3, 4, 3, 1]]  # a judged class without reference rows, then one with
    got = trust_mod._mean_ratio(V, means, present, judged)
    r = np.sqrt(((V[:, None, :].astype(np.float64) - means[None, :3].astype(np.float64)) ** 2).sum(2))
    far = r.max(1)
    own = np.where(judged < 3, r[np.arange(40), np.minimum(judged, 2)], far)
    other = np.where(np.arange(3)[None, :] == judged[:, None], np.inf, r).min(1)
    np.testing.assert_allclose(got, np.log(other) - np.log(own), rtol=1e-5, atol=1e-5)
    assert (got[36:39] <= 0).all()  # no mean of its own: as far as the farthest
    # one class with reference rows only: no other class to be nearer, so the ratio counts at the farthest (itself)
    alone = np.array([True, False, False, False, False])
    one = trust_mod._mean_ratio(V, means, alone, np.zeros(40, np.int64))
    np.testing.assert_allclose(one, 0, atol=1e-6)


# activations far from 0 (an offset the means share): the ratio to the class means is as exact as float32 lets the
# distances between the vectors be, not lost to |v|^2 - 2 v.m + |m|^2 of large numbers (it was off by 8% of its size)
def test_class_mean_ratio_of_offset_activations():
    rng = np.random.default_rng(7)
    means = (30 + 0.05 * rng.standard_normal((10, 64))).astype(np.float32)
    V = (30 + 0.05 * rng.standard_normal((500, 64))).astype(np.float32)
    judged = rng.integers(0, 10, 500)
    got = trust_mod._mean_ratio(V, means, np.ones(10, bool), judged)
    r = np.sqrt(((V[:, None, :].astype(np.float64) - means[None].astype(np.float64)) ** 2).sum(2))
    own = r[np.arange(500), judged]
    other = np.where(np.arange(10)[None, :] == judged[:, None], np.inf, r).min(1)
    expected = np.log(other) - np.log(own)
    assert np.abs(expected).mean() < 0.2  # ratios near 0: the case the expansion got wrong
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).mean())


# a training set holding each input twice (oversampled, augmented copies): a calibration row's twin is left out of the
# searches with it, so the calibration samples' nearest neighbours are no copies of themselves at distance 0 (they
# were: ood_typicality then flagged about half of all ordinary inputs at its 5% threshold: an outside check)
def test_duplicated_training_rows_left_out_with_their_calibration_twin(model, data):
    x, y = data
    twice = ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(np.concatenate([x, x]),
                                                                                  np.concatenate([y, y]))
    cal = trust_mod.calibrate(twice.state_, calibration_fraction=0.1)
    n_cal = round(0.1 * 240)
    drawn = np.sort(np.random.default_rng(twice.state_.random_state).permutation(240)[:n_cal])
    twins = (drawn + 120) % 240
    assert cal.is_cal[drawn].all() and cal.is_cal[twins].all()
    assert int(cal.is_cal.sum()) == len(set(drawn.tolist()) | set(twins.tolist()))
    for l in LAYERS:
        assert cal.cal_nearest[l].min() > 0, l
    once = ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(x, y)
    assert int(trust_mod.calibrate(once.state_, calibration_fraction=0.2).is_cal.sum()) == 24  # no twins: as before


# few distinct vectors (a decision tree's one-hot outputs; here each of 6 inputs 100 times): no split keeps neighbours
# once the calibration rows' duplicates are held out. explain, prepare (and the command line's fit) failed under their
# defaults (an outside check); they go on without trust, saying why, and trust() says to pass held-out data
def test_few_distinct_vectors_leave_trust_out_by_default(model, data):
    x, y = data
    few = ActivationClustering(model, LAYERS, n_clusters=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the model predicts one class of these)
        few.fit(np.repeat(x[:6], 100, axis=0), np.repeat(y[:6], 100))
    with pytest.warns(actclust.TrustWarning, match=r"No trust signals: Only 0 training samples remain as neighbours"):
        few.prepare()
    e = few.explain(x[:2])[0]
    assert e.trust is None and e.trust_notes[0].startswith("No trust signals: Only 0 training samples remain")
    with pytest.raises(actclust.ParameterError, match=r"The layers give few distinct vectors, so no split of the training "
                                                      r"set keeps neighbours: pass held-out data as calibration"):
        few.trust(x[:2])
    with pytest.raises(actclust.ParameterError, match=r"remain as neighbours"):
        few.explain(x[:2], trust=True)  # asked for: refused, as before
    assert few.trust(x[:2], calibration=(x[6:80], y[6:80]), n_neighbors=10)["credibility"].shape == (2,)


# a threshold flags about 5% of the calibration values below it; where the lowest values tie (layer_agreement is 0 for
# several), the cut fell on them and flagged nothing (a dead chip: an outside check): the next value up, flagging the
# ties, where they are at most twice the rate; no threshold where they are more
def test_false_alarm_thresholds_with_ties():
    from actclust.analysis.trust import false_alarm_thresholds

    spread = np.linspace(0, 1, 200)
    tied = np.r_[np.zeros(12), np.full(188, 0.75)]  # 6% at 0
    many = np.r_[np.zeros(40), np.full(160, 0.75)]  # 20% at 0
    got = false_alarm_thresholds({"ood_typicality": spread, "knn_typicality": tied, "cluster_typicality": many}, None,
                                 "test", rate=0.05)["signals"]
    assert (spread < got["ood_typicality"]).mean() == 0.05
    assert got["knn_typicality"] == 0.75 and (tied < got["knn_typicality"]).mean() == 0.06
    assert "cluster_typicality" not in got


# the rows' hashes (for duplicates) are computed once per fitted state: calibrate draws its split on every call, and a
# pass over the whole store per explain call would cost seconds at a million rows (a self-review)
def test_row_hashes_computed_once(model, data, monkeypatch):
    x, y = data
    state = ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(x, y).state_
    calls = []
    real = trust_mod._hash_rows
    monkeypatch.setattr(trust_mod, "_hash_rows", lambda s: calls.append(1) or real(s))
    for _ in range(3):
        trust_mod.calibrate(state, calibration_fraction=0.2)
    assert calls == [1]
