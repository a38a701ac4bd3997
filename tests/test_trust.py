import numpy as np
import pytest
import torch
from conftest import LAYERS

import actclust
from actclust import ActivationClustering, NotFittedError
from actclust import trust as trust_mod
from actclust.trust import MIN_CALIBRATION, calibration_possible, trust_signals

KW = {"n_neighbors": 5, "calibration_fraction": 0.25}


def _ac(model, **kw):
    kw.setdefault("n_clusters", 4)
    return ActivationClustering(model, LAYERS, progress=False, **kw)


def _split(ac, fraction=0.25):
    n = len(ac.train_predictions_)
    order = np.random.default_rng(ac.random_state).permutation(n)
    n_cal = round(fraction * n)
    return order[:n_cal], order[n_cal:]


# every signal is a per-input array in [0, 1]; the DNN prediction is the model's argmax
def test_signals_shapes_and_ranges(model, data):
    x, y = data
    ac = _ac(model, layer_weights=[1, 2, 3]).fit(x, y)
    s = trust_signals(ac, x[:40], **KW)
    assert set(s) >= {"dnn_prediction", "surrogate_confidence", "surrogate_dnn_agreement", "layer_agreement",
                      "credibility", "knn_typicality", "cluster_typicality", "dknn_prediction"}
    for v in s.values():
        assert v.shape == (40,)
    for k in ("surrogate_confidence", "surrogate_dnn_agreement", "layer_agreement", "credibility",
              "knn_typicality", "cluster_typicality"):
        assert (s[k] >= 0).all() and (s[k] <= 1).all(), k
    dnn = model(torch.as_tensor(x[:40])).argmax(1).numpy()
    assert np.array_equal(s["dnn_prediction"], dnn)
    assert (s["surrogate_confidence"] >= s["surrogate_dnn_agreement"] - 1e-6).all()


# surrogate signals equal what predict_proba and the cluster paths give
def test_surrogate_signals_match_surrogate(model, data):
    x, y = data
    ac = _ac(model, layer_weights=[1, 2, 3]).fit(x, y)
    s = trust_signals(ac, x, **KW)
    p = ac.predict_proba(x)
    rows = np.arange(len(x))
    assert np.allclose(s["surrogate_confidence"], p.max(1), atol=1e-6)
    assert np.allclose(s["surrogate_dnn_agreement"], p[rows, s["dnn_prediction"]], atol=1e-6)
    paths = ac.cluster_paths(x)
    votes = np.stack([ac.posteriors_[l].argmax(1)[paths[:, i]] == s["dnn_prediction"]
                      for i, l in enumerate(LAYERS)], 1)
    assert np.allclose(s["layer_agreement"], votes @ (np.array([1, 2, 3]) / 6))


# credibility is the deep k-NN p-value of the DNN's class, checked against brute force,
# with layers weighted equally (deep k-NN as published) or by the surrogate's weights
@pytest.mark.parametrize("layer_weights, w", [("equal", [1, 1, 1]), ("surrogate", [1, 2, 3])])
def test_credibility_matches_brute_force(model, data, layer_weights, w):
    x, y = data
    ac = _ac(model, layer_weights=[1, 2, 3]).fit(x, y)
    s = trust_signals(ac, x[:30], layer_weights=layer_weights, **KW)
    cal, ref = _split(ac)
    q = ac._query(x[:30], keep_vectors=True)

    def alphas(vectors, own):
        out = 0
        for wl, l in zip(w, LAYERS):
            d = ((vectors[l][:, None, :] - ac.train_vectors_[l][ref][None]) ** 2).sum(2)
            nn_labels = y[ref][np.argsort(d, 1)[:, :5]]
            out = out + wl * (nn_labels != own[:, None]).sum(1)
        return out

    cal_alpha = alphas({l: ac.train_vectors_[l][cal] for l in LAYERS}, y[cal])
    test_alpha = alphas(q.vectors, s["dnn_prediction"])
    expected = (cal_alpha[None, :] >= test_alpha[:, None] - 1e-9).mean(1)
    assert np.allclose(s["credibility"], expected)


# inputs unlike the training data get low k-NN and cluster typicality
def test_typicality_low_far_from_training_data(model, data):
    x, y = data
    ac = _ac(model).fit(x, y)
    inside = trust_signals(ac, x[:40], **KW)
    far = trust_signals(ac, 8 + 4 * np.abs(x[:40]), **KW)
    assert far["knn_typicality"].mean() < inside["knn_typicality"].mean() - 0.2
    assert far["cluster_typicality"].mean() < inside["cluster_typicality"].mean() - 0.2


# the calibration is built once, reused, rebuilt after a refit or with other parameters
def test_calibration_cached_and_rebuilt(model, data):
    x, y = data
    ac = _ac(model).fit(x, y)
    first = trust_signals(ac, x, **KW)
    cal = ac._trust_cache
    again = trust_signals(ac, x, **KW)
    assert ac._trust_cache is cal
    for k in first:
        assert np.array_equal(first[k], again[k])
    trust_signals(ac, x, n_neighbors=6, calibration_fraction=0.25)
    assert ac._trust_cache is not cal
    cal = ac._trust_cache
    ac.fit(x[::-1].copy(), y[::-1].copy())
    trust_signals(ac, x, n_neighbors=6, calibration_fraction=0.25)
    assert ac._trust_cache is not cal


# the neighbour labels are the true labels when fit had them, else the DNN's predictions
def test_labels_or_predictions(model, data):
    x, y = data
    _, ref = _split(_ac(model).fit(x))
    with_y = _ac(model).fit(x, y)
    trust_signals(with_y, x[:5], **KW)
    assert np.array_equal(with_y._trust_cache.ref_labels, y[ref])
    without = _ac(model).fit(x)
    trust_signals(without, x[:5], **KW)
    assert np.array_equal(without._trust_cache.ref_labels, without.train_predictions_[ref])


# batching the neighbour search does not change any signal
def test_batching_does_not_change_results(model, data, monkeypatch):
    x, y = data
    ac = _ac(model).fit(x, y)
    whole = trust_signals(ac, x, **KW)
    monkeypatch.setattr(trust_mod, "_BATCH", 7)
    ac._trust_cache = None
    batched = trust_signals(ac, x, **KW)
    for k in whole:
        assert np.allclose(whole[k], batched[k]), k


# a saved and loaded explainer recomputes the same calibration and signals; ac.trust delegates
def test_same_after_load(model, data, tmp_path):
    x, y = data
    x_big = np.concatenate([x, x + 0.01])
    y_big = np.concatenate([y, y])
    ac = _ac(model).fit(x_big, y_big)
    before = ac.trust(x[:20])  # defaults: 10% of 240 = 24 calibration samples
    ac.save(tmp_path / "run")
    after = actclust.load(tmp_path / "run", model).trust(x[:20])
    for k in before:
        assert np.array_equal(before[k], after[k]), k


# trust on an unfitted explainer says to fit first
def test_unfitted(model, data):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        _ac(model).trust(data[0])


# a calibration split below the minimum is refused, naming the minimum
def test_calibration_too_small(model, data):
    x, y = data
    ac = _ac(model).fit(x, y)
    assert not calibration_possible(ac) and calibration_possible(ac, 5, 0.25)
    with pytest.raises(ValueError, match=f"12 samples .* at least MIN_CALIBRATION={MIN_CALIBRATION}"):
        ac.trust(x)  # 10% of 120
    with pytest.raises(ValueError, match="n_neighbors=100 needs at least 100"):
        trust_signals(ac, x, n_neighbors=100, calibration_fraction=0.25)


# a query pass made elsewhere is reused; one without vectors is refused
def test_query_reused(model, data):
    x, y = data
    ac = _ac(model).fit(x, y)
    direct = trust_signals(ac, x[:10], **KW)
    reused = trust_signals(ac, None, query=ac._query(x[:10], keep_vectors=True), **KW)
    for k in direct:
        assert np.array_equal(direct[k], reused[k]), k
    with pytest.raises(ValueError, match="needs the reduced vectors"):
        trust_signals(ac, None, query=ac._query(x[:10]), **KW)


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
        trust_signals(ac, x, **{**KW, **kw})


def _half_wrong(model, x):
    """Labels that agree with the DNN on about half the inputs, so the calibration holds both."""
    pred = model(torch.as_tensor(x)).argmax(1).numpy()
    return np.where(np.random.default_rng(1).random(len(x)) < 0.5, pred, (pred + 1) % 3)


# stacked_trust is the logistic regression on the calibration split, checked against brute force
def test_stacked_trust_matches_brute_force(model, data, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    monkeypatch.setattr(trust_mod, "_RATIO_NEIGHBORS", 20)  # fewer than the 90 reference samples
    x, _ = data
    y = _half_wrong(model, x)
    ac = _ac(model).fit(x, y)
    s = trust_signals(ac, x[:40], **KW)
    cal, ref = _split(ac)

    def features(vectors, pred, agreement, credibility):
        cols = {"vote": [], "ratio": []}
        for l in LAYERS:
            d2 = ((vectors[l][:, None, :].astype(np.float64) - ac.train_vectors_[l][ref][None]) ** 2).sum(2)
            order = np.argsort(d2, 1)[:, :20]
            floor = 1e-6 * (vectors[l].astype(np.float64) ** 2).sum(1, keepdims=True)
            r = np.sqrt(np.maximum(np.take_along_axis(d2, order, 1), floor))
            same = y[ref][order] == pred[:, None]
            kernel = np.exp(-(r[:, :5] / r[:, 4:5]) ** 2)
            cols["vote"].append((kernel * same[:, :5]).sum(1) / kernel.sum(1))
            near = [np.minimum(np.where(m, r, np.inf).min(1), r[:, -1]) for m in (same, ~same)]
            cols["ratio"].append(np.log(near[1] + 1e-9) - np.log(near[0] + 1e-9))
        return np.column_stack(cols["vote"] + cols["ratio"] + [agreement, credibility])

    cal_pred = ac.train_predictions_[cal]
    on_cal = trust_signals(ac, x[cal], **KW)  # calibration samples judged against the same split
    X_cal = features({l: ac.train_vectors_[l][cal] for l in LAYERS}, cal_pred,
                     on_cal["surrogate_dnn_agreement"], on_cal["credibility"])
    model_ = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(X_cal, cal_pred == y[cal])
    q = ac._query(x[:40], keep_vectors=True)
    X = features(q.vectors, s["dnn_prediction"], s["surrogate_dnn_agreement"], s["credibility"])
    assert np.allclose(s["stacked_trust"], model_.predict_proba(X)[:, 1], atol=1e-4)
    assert (s["stacked_trust"] >= 0).all() and (s["stacked_trust"] <= 1).all()


# stacked_trust needs true labels and both right and wrong predictions in the calibration split
def test_stacked_trust_only_when_calibratable(model, data):
    x, _ = data
    y = _half_wrong(model, x)
    assert "stacked_trust" in trust_signals(_ac(model).fit(x, y), x[:5], **KW)
    assert "stacked_trust" not in trust_signals(_ac(model).fit(x), x[:5], **KW)  # DNN predictions as labels
    pred = model(torch.as_tensor(x)).argmax(1).numpy()
    assert "stacked_trust" not in trust_signals(_ac(model).fit(x, pred), x[:5], **KW)  # no errors
