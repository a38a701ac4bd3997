import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from actclust import ActivationClustering, NotFittedError

from conftest import LAYERS, hook_count


def _ac(model, **kw):
    kw.setdefault("n_clusters", 4)
    return ActivationClustering(model, LAYERS, progress=False, **kw)


# fit returns self; probabilities are distributions; predict, paths and score agree in shape
def test_fit_predict_score(model, data):
    x, y = data
    ac = _ac(model)
    assert ac.fit(x) is ac
    p = ac.predict_proba(x)
    assert p.shape == (120, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.array_equal(ac.predict(x), p.argmax(1))
    paths = ac.cluster_paths(x)
    assert paths.shape == (120, 3) and paths.max() < 4
    s = ac.score(x, y)
    assert set(s["per_layer"]) == set(LAYERS) and s["n"] == 120
    dnn = model(torch.as_tensor(x)).argmax(1).numpy()
    assert s["fidelity"] == pytest.approx((p.argmax(1) == dnn).mean())
    assert s["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert ac.score(x)["accuracy"] is None
    assert hook_count(model) == 0


# the in-sample scores kept by fit equal scoring the training data again (hard assignment)
def test_train_score_matches_rescoring(model, data):
    x, y = data
    ac = _ac(model, layer_weights=[1, 2, 3]).fit(x, y)
    assert ac.train_score_ == ac.score(x, y)


# the combined prediction is the weighted layer mix divided by the sum of the weights
def test_combination_uses_sum_of_weights(model, data):
    x = data[0]
    ac = _ac(model, layer_weights=[3, 0, 1]).fit(x)
    assert np.allclose(ac.weights_, [0.75, 0, 0.25])
    paths = ac.cluster_paths(x)
    manual = 0.75 * ac.posteriors_["conv"][paths[:, 0]] + 0.25 * ac.posteriors_["fc2"][paths[:, 2]]
    assert np.allclose(ac.predict_proba(x), manual, atol=1e-6)


# the DNN's predictions are the surrogate targets by default; labels with posterior="label"
def test_posterior_prediction_vs_label(model, data):
    x, y = data
    pred = _ac(model).fit(x)
    lab = _ac(model, posterior="label").fit(x, y)
    dnn = model(torch.as_tensor(x)).argmax(1).numpy()
    counts_pred = np.bincount(dnn, minlength=3)
    assert np.array_equal(pred.train_predictions_, dnn)
    assert not np.allclose(pred.posteriors_["fc2"], lab.posteriors_["fc2"])
    assert np.array_equal(lab.train_labels_, y) and counts_pred.sum() == 120


# learned layer weights are a distribution and do not lower held-out fidelity below equal weights much
def test_learned_weights(model, data):
    x = data[0]
    ac = _ac(model, layer_weights="fit").fit(x)
    assert ac.weights_.shape == (3,) and np.isclose(ac.weights_.sum(), 1) and (ac.weights_ >= 0).all()


# results are reproducible with a fixed random_state
def test_reproducible(model, data):
    a = _ac(model, random_state=3).fit(data[0]).predict_proba(data[0])
    b = _ac(model, random_state=3).fit(data[0]).predict_proba(data[0])
    assert np.array_equal(a, b)


# a Tensor, a Dataset and a DataLoader of (x, y) give the same fit; labels come from the loader
def test_data_kinds(model, data):
    x, y = data
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    ref = _ac(model).fit(x).predict_proba(x)
    assert np.allclose(_ac(model).fit(xt).predict_proba(xt), ref)
    ds = TensorDataset(xt, yt)
    assert np.allclose(_ac(model).fit(ds).predict_proba(ds), ref)
    loader = DataLoader(ds, batch_size=7)
    ac = _ac(model, posterior="label").fit(loader)
    assert np.array_equal(ac.train_labels_, y) and ac.score(loader)["accuracy"] is not None


# per-layer n_clusters and soft assignment
def test_per_layer_clusters_and_temperature(model, data):
    ac = ActivationClustering(model, LAYERS, n_clusters={"conv": 2, "fc1": 3, "fc2": 5}, temperature=0.5,
                              progress=False).fit(data[0])
    assert [ac.posteriors_[l].shape[0] for l in LAYERS] == [2, 3, 5]
    assert np.allclose(ac.predict_proba(data[0]).sum(1), 1, atol=1e-5)


# every bad input gets a clear error; afterwards no hook is left and the explainer still fits
@pytest.mark.parametrize("kwargs, fit_args, match", [
    ({"n_clusters": 1}, {}, r"'n_clusters' parameter .* int >= 2.*got 1"),
    ({"n_clusters": 500}, {}, "n_clusters for layer 'conv' is 500, more than the 120 samples"),
    ({"n_clusters": {"conv": 3}}, {}, r"'n_clusters' dict .* missing \['fc1', 'fc2'\]"),
    ({"posterior": "label"}, {}, "posterior='label' needs the true labels"),
    ({"posterior": "labels"}, {}, r"'posterior' parameter .* one of \['prediction', 'label'\]. Got 'labels'"),
    ({}, {"y": np.zeros(5, dtype=int)}, "y has 5 labels but X has 120 samples"),
    ({}, {"y": np.full(120, 7)}, r"y has classes the model does not have: \[7\]"),
    ({}, {"y": np.full(120, 0.5)}, "integer class indices"),
    ({"layer_weights": [1, -1, 1]}, {}, "'layer_weights' parameter .* non-negative"),
    ({"layer_weights": [0, 0, 0]}, {}, "not all zero"),
    ({"layer_weights": "learn"}, {}, "'layer_weights' parameter .* Got 'learn'"),
    ({"reducer": "avg"}, {}, "'reducer' parameter .* Got 'avg'"),
    ({"normalize": "l1"}, {}, "'normalize' parameter .* Got 'l1'"),
    ({"temperature": -1}, {}, "'temperature' parameter .* >= 0"),
    ({"batch_size": 0}, {}, "'batch_size' parameter .* positive int"),
    ({"clustering": "dec"}, {}, "'clustering' parameter"),
])
def test_bad_input_then_still_fits(model, data, kwargs, fit_args, match):
    x = data[0]
    ac = _ac(model, **kwargs)
    with pytest.raises(ValueError, match=match):
        ac.fit(x, **fit_args)
    assert hook_count(model) == 0
    defaults = _ac(model).__dict__
    for name in kwargs:  # mend the bad parameter on the same object, then fit it
        setattr(ac, name, defaults[name])
    assert ac.fit(x).predict_proba(x).shape == (120, 3)


# an empty data set and non-array data are rejected
@pytest.mark.parametrize("x, match", [
    (np.zeros((0, 1, 6, 6), dtype=np.float32), "X is empty"),
    ([[1, 2]], "must be a NumPy array, a torch Tensor, a Dataset or a DataLoader; got list"),
])
def test_bad_data(model, x, match):
    with pytest.raises(ValueError, match=match):
        _ac(model).fit(x)
    assert hook_count(model) == 0


# a shuffled DataLoader is refused: results must line up with samples
def test_shuffled_loader(model, data):
    loader = DataLoader(TensorDataset(torch.as_tensor(data[0])), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        _ac(model).fit(loader)


# methods that need a fitted explainer say to call fit first
@pytest.mark.parametrize("method", ["predict_proba", "predict", "score", "cluster_paths", "save"])
def test_not_fitted(model, data, method, tmp_path):
    ac = _ac(model)
    arg = tmp_path / "run" if method == "save" else data[0]
    with pytest.raises(NotFittedError, match="not fitted yet. Call 'fit'"):
        getattr(ac, method)(arg)


# inputs of another shape than the training data are reported
def test_inputs_of_other_shape(model, data):
    ac = _ac(model, reducer="grid:2").fit(data[0])
    with pytest.raises(ValueError, match=r"Inputs of shape \(1, 1, 1\) differ from the shape \(1, 6, 6\)"):
        ac.predict(np.zeros((4, 1, 1, 1), dtype=np.float32))
    assert hook_count(model) == 0


# the model's device is used for inputs (CUDA when available), results come back as NumPy
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model(model, data):
    m = model.cuda()
    ac = _ac(m).fit(data[0])
    assert ac.predict_proba(data[0]).shape == (120, 3)


# clustering="distill" refines k-means toward the DNN: fidelity not lower, learned temperatures
# used everywhere, weights sum to 1, and a saved run predicts identically after loading
@pytest.mark.parametrize("layer_weights", [None, "fit", np.array([1.0, 2.0, 1.0])])
def test_distill_end_to_end(model, data, tmp_path, layer_weights):
    import actclust

    x, y = data
    base = _ac(model, layer_weights=layer_weights).fit(x, y)
    ac = _ac(model, clustering="distill", layer_weights=layer_weights).fit(x, y)
    assert ac.score(x)["fidelity"] >= base.score(x)["fidelity"]
    assert np.isclose(ac.weights_.sum(), 1)
    if layer_weights is None:
        assert np.allclose(ac.weights_, 1 / 3)
    elif not isinstance(layer_weights, str):  # user weights are kept, normalised
        assert np.allclose(ac.weights_, [0.25, 0.5, 0.25])
    temps = ac.fit_info_["distill"]["temperatures"]
    assert set(temps) == set(LAYERS) and all(t >= 0 for t in temps.values())
    assert ac.train_score_ == ac.score(x, y)  # in-sample scores used the learned soft assignment
    ac.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert np.allclose(loaded.predict_proba(x), ac.predict_proba(x), atol=1e-6)


# a clustering's warning (e.g. no convergence) reaches the user with the layer it concerns
def test_clustering_warnings_name_the_layer(model, data, monkeypatch):
    import warnings

    import actclust.explainer as ex
    from actclust.clustering import KMeans

    class Grumpy(KMeans):
        def fit(self, X):
            warnings.warn("did not converge", UserWarning)
            return super().fit(X)

    monkeypatch.setattr(ex, "make_clustering", lambda name, k, seed=0: Grumpy(k, seed))
    with pytest.warns(UserWarning, match="layer 'fc1': did not converge"):
        _ac(model).fit(data[0])
