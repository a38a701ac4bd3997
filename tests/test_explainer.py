import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import actclust
from actclust import ActivationClustering, NotFittedError, ParameterError

from conftest import LAYERS, hook_count, layer_vectors, sq_distances


def _ac(model, **kw):
    kw.setdefault("n_clusters", 4)
    return ActivationClustering(model, LAYERS, progress=False, **kw)


def _dnn(model, x):
    return model(torch.as_tensor(x)).argmax(1).numpy()


def _posteriors(train_assign, targets, n_classes=3, smoothing=1.0):
    """Each cluster's class mix of ``targets``, from (soft) assignments, with ``smoothing``
    pseudo-counts of the overall mix: the documented surrogate, by hand."""
    onehot = np.eye(n_classes)[targets]
    prior = onehot.mean(0)
    counts = train_assign.T @ onehot
    return (counts + smoothing * prior) / (counts.sum(1, keepdims=True) + smoothing)


def _hard(d):
    return np.eye(d.shape[1])[d.argmin(1)]


# fit returns self; on held-out inputs, paths, probabilities, predictions and every score equal a
# brute-force surrogate: nearest centre per layer, that cluster's smoothed mix of the DNN's
# training predictions, layers averaged
def test_fit_predict_score(mixed_model, data):
    x, y = data
    ac = _ac(mixed_model)
    assert ac.fit(x[:90], y[:90]) is ac
    xt, yt = x[90:], y[90:]
    v_train, v = layer_vectors(mixed_model, x[:90]), layer_vectors(mixed_model, xt)
    dnn_train, dnn = _dnn(mixed_model, x[:90]), _dnn(mixed_model, xt)
    paths, probas = [], []
    for l in LAYERS:
        centers = ac.clusterings_[l].centers_
        post = _posteriors(_hard(sq_distances(v_train[l], centers)), dnn_train)
        paths.append(sq_distances(v[l], centers).argmin(1))
        probas.append(post[paths[-1]])
    p = np.mean(probas, 0)
    np.testing.assert_array_equal(ac.cluster_paths(xt), np.stack(paths, 1))
    np.testing.assert_allclose(ac.predict_proba(xt), p, atol=1e-6)
    np.testing.assert_array_equal(ac.predict(xt), p.argmax(1))
    s = ac.score(xt, yt)
    assert s["n"] == 30 and s["fidelity"] == pytest.approx((p.argmax(1) == dnn).mean())
    assert s["accuracy"] == pytest.approx((p.argmax(1) == yt).mean())
    assert s["dnn_accuracy"] == pytest.approx((dnn == yt).mean())
    assert s["per_layer"] == {l: {"fidelity": pytest.approx((q.argmax(1) == dnn).mean()),
                                  "accuracy": pytest.approx((q.argmax(1) == yt).mean())}
                              for l, q in zip(LAYERS, probas)}
    assert 0.5 < s["fidelity"] < 1  # neither trivial nor perfect: the check above can tell
    assert ac.score(xt)["accuracy"] is None
    assert hook_count(mixed_model) == 0


# the in-sample scores kept by fit equal scoring the training data again (hard assignment)
def test_train_score_matches_rescoring(model, data):
    x, y = data
    ac = _ac(model, layer_weights=[1, 2, 3]).fit(x, y)
    assert ac.train_score_ == ac.score(x, y)


# the combined prediction is the weighted layer mix divided by the sum of the weights
def test_combination_uses_sum_of_weights(mixed_model, data):
    x = data[0]
    ac = _ac(mixed_model, layer_weights=[3, 0, 1]).fit(x)
    assert np.allclose(ac.weights_, [0.75, 0, 0.25])
    paths = ac.cluster_paths(x)
    manual = 0.75 * ac.posteriors_["conv"][paths[:, 0]] + 0.25 * ac.posteriors_["fc2"][paths[:, 2]]
    assert np.allclose(ac.predict_proba(x), manual, atol=1e-6)
    assert not np.allclose(manual, ac.posteriors_["fc1"][paths[:, 1]], atol=0.05)  # the layers differ here


# the DNN's predictions are the surrogate targets by default; labels with posterior="label":
# every cluster's posterior is the smoothed class mix of those targets among its members
def test_posterior_prediction_vs_label(mixed_model, data):
    x, y = data
    pred = _ac(mixed_model).fit(x)
    lab = _ac(mixed_model, posterior="label").fit(x, y)
    dnn = _dnn(mixed_model, x)
    v = layer_vectors(mixed_model, x)
    assert np.array_equal(pred.train_predictions_, dnn) and np.array_equal(lab.train_labels_, y)
    for ac, targets in ((pred, dnn), (lab, y)):
        for l in LAYERS:
            assign = _hard(sq_distances(v[l], ac.clusterings_[l].centers_))
            np.testing.assert_allclose(ac.posteriors_[l], _posteriors(assign, targets), atol=1e-6, err_msg=l)


class _UnequalLayers(nn.Module):
    """8 features; the class depends on features 0 and 1 only. "embed" passes all 8 through, so its
    clusters follow the 6 large irrelevant ones; "hidden" mixes in some of them; "logits" has none."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.hidden = nn.Linear(8, 4)
        self.act = nn.ReLU()
        self.logits = nn.Linear(4, 3)
        hidden = torch.zeros(4, 8)
        hidden[[0, 1, 2, 3], [0, 1, 0, 1]] = torch.tensor([1.0, 1.0, -1.0, -1.0])
        hidden[:, 2:] = 0.3 * torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(8))
            self.hidden.weight.copy_(hidden)
            self.logits.weight.copy_(torch.tensor([[1.0, 0, -1, 0], [0, 1, 0, -1], [-1, -1, 1, 1]]))
            for m in (self.embed, self.hidden, self.logits):
                m.bias.zero_()

    def forward(self, x):
        return self.logits(self.act(self.hidden(self.embed(x))))


# layer_weights="fit", on layers that differ, gives more weight to the faithful ones and a held-out
# fidelity not lower than equal weights (here higher); the weights are learned on the training data only
def test_learned_weights():
    model = _UnequalLayers().eval()
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    x[:, 2:] *= 3
    train, test = x[:600], x[600:]  # fixed split; fit sees only `train`
    layers = ["embed", "hidden", "logits"]
    equal = ActivationClustering(model, layers, n_clusters=8, progress=False, random_state=0).fit(train)
    learned = ActivationClustering(model, layers, n_clusters=8, layer_weights="fit", progress=False,
                                   random_state=0).fit(train)
    per_layer = equal.score(test)["per_layer"]
    assert per_layer["logits"]["fidelity"] > per_layer["embed"]["fidelity"] + 0.2  # the layers do differ
    fit_fidelity, equal_fidelity = learned.score(test)["fidelity"], equal.score(test)["fidelity"]
    assert fit_fidelity >= equal_fidelity
    assert fit_fidelity > equal_fidelity  # strictly, so that "fit" silently returning equal weights fails
    assert learned.weights_[2] > learned.weights_[0]


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
    assert np.array_equal(ac.train_labels_, y)
    assert ac.score(loader)["accuracy"] == pytest.approx((ac.predict(x) == y).mean())


def _soft(d, temperature, scale):
    logits = -d / (temperature * scale)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# per-layer n_clusters; with a temperature, posteriors are soft-count class mixes and predictions
# soft mixes of them, softmax(-d^2 / (temperature * mean squared distance to the nearest centre))
def test_per_layer_clusters_and_temperature(mixed_model, data):
    x = data[0]
    ac = ActivationClustering(mixed_model, LAYERS, n_clusters={"conv": 2, "fc1": 3, "fc2": 5}, temperature=0.5,
                              progress=False).fit(x[:90])
    assert [ac.posteriors_[l].shape[0] for l in LAYERS] == [2, 3, 5]
    v_train, v = layer_vectors(mixed_model, x[:90]), layer_vectors(mixed_model, x[90:])
    expected, hard = 0, 0
    for l in LAYERS:
        centers = ac.clusterings_[l].centers_
        d_train = sq_distances(v_train[l], centers)
        scale = d_train.min(1).mean()
        post = _posteriors(_soft(d_train, 0.5, scale), _dnn(mixed_model, x[:90]))
        np.testing.assert_allclose(ac.posteriors_[l], post, atol=1e-5, err_msg=l)
        expected = expected + _soft(sq_distances(v[l], centers), 0.5, scale) @ post / 3
        hard = hard + _hard(sq_distances(v[l], centers)) @ post / 3
    np.testing.assert_allclose(ac.predict_proba(x[90:]), expected, atol=1e-5)
    assert np.abs(expected - hard).max() > 0.05  # the temperature matters here


# every bad input gets a clear error; afterwards no hook is left and the explainer still fits
@pytest.mark.parametrize("kwargs, fit_args, match", [
    ({"n_clusters": 1}, {}, r"'n_clusters' parameter .* an int >= 2 or a dict of them \(one per layer\). Got 1 instead"),
    ({"n_clusters": 500}, {}, "n_clusters for layer 'conv' is 500, more than the 120 samples"),
    ({"n_clusters": {"conv": 3}}, {}, r"'n_clusters' dict .* missing \['fc1', 'fc2'\]"),
    ({"posterior": "label"}, {}, "posterior='label' needs the true labels"),
    ({"posterior": "labels"}, {}, r"'posterior' parameter .* one of \['prediction', 'label'\]. Got 'labels'"),
    ({}, {"y": np.zeros(5, dtype=int)}, r"y has 5 labels but X has 120 samples; they must have the same length\.$"),
    # one label: perhaps one sample without its batch axis (its first axis was read as the samples: an outside check)
    ({}, {"y": np.zeros(1, dtype=int)}, r"y has 1 labels but X has 120 samples; they must have the same length \(one "
                                        r"sample without its batch axis\? pass it as a batch of one, x\[None\]\)"),
    ({}, {"y": np.full(120, 7)}, r"y has classes the model does not have: \[7\]"),
    ({}, {"y": np.full(120, 0.5)}, "integer class indices"),
    ({"layer_weights": [1, -1, 1]}, {}, "'layer_weights' parameter .* non-negative"),
    ({"layer_weights": [0, 0, 0]}, {}, "not all zero"),
    ({"layer_weights": "learn"}, {}, "'layer_weights' parameter .* Got 'learn'"),
    ({"reducer": "avg"}, {}, "'reducer' parameter .* Got 'avg'"),
    ({"normalize": "l1"}, {}, "'normalize' parameter .* Got 'l1'"),
    ({"temperature": -1}, {}, "'temperature' parameter .* >= 0"),
    ({"batch_size": 0}, {}, "'batch_size' parameter .* an int >= 1. Got 0 instead"),
    ({"random_state": -1}, {}, r"'random_state' parameter .* an int in \[0, 4294967295\]. Got -1 instead"),
    ({"random_state": 2**40}, {}, r"'random_state' parameter .* Got 1099511627776 instead"),
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
    np.testing.assert_array_equal(ac.fit(x).predict_proba(x), _ac(model).fit(x).predict_proba(x))


# an empty data set and non-array data are rejected
@pytest.mark.parametrize("x, match", [
    (np.zeros((0, 1, 6, 6), dtype=np.float32), "X is empty"),
    ([[1, 2]], r"must be an array \(NumPy or a framework's tensor\), a pandas DataFrame, a dict of arrays, a tuple of "
               r"arrays \(a model's inputs in order\) or a dataset; got a list: convert a list of samples with np.asarray"),
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


# a reducer dict may name only the layers it changes (as the docs' BERT example does); the others take "auto"
# (it was refused: "must have exactly one entry per layer"); a layer it names that is not one of them is refused
def test_reducer_dict_of_some_layers(model, data):
    from actclust.capture.reduction import make_reducer

    ac = _ac(model, reducer={"conv": "max"}).fit(data[0])
    assert ac.state_.reducers["conv"].spec == make_reducer("max").spec
    assert all(ac.state_.reducers[l].spec == make_reducer("auto").spec for l in ("fc1", "fc2"))
    with pytest.raises(ParameterError, match=r"The 'reducer' dict names layers the model's explainer does not have: "
                                             r"\['conv9'\] .*the layers it leaves out take 'auto'"):
        _ac(model, reducer={"conv9": "max"}).fit(data[0])
    with pytest.raises(ParameterError, match=r"The 'n_clusters' dict must have exactly one entry per layer; missing "
                                             r"\['fc1', 'fc2'\]"):
        _ac(model, n_clusters={"conv": 3}).fit(data[0])


# posterior='label' without labels, on data that cannot carry them, is refused before the capture pass (it ran the
# whole pass first; found by an outside new-user check); batches that may carry labels are still read first
def test_label_posterior_without_labels_refused_before_the_pass(model, data, monkeypatch):
    from actclust.capture import passes

    def no_pass(*args, **kwargs):
        raise AssertionError("the capture pass ran before the missing labels were said")

    monkeypatch.setattr(passes, "capture", no_pass)
    with pytest.raises(ValueError, match="posterior='label' needs the true labels"):
        _ac(model, posterior="label").fit(data[0])


# layers listed in another order than they run: the presets weigh layers by their place in the list, so "low" and
# "high" swapped meaning without a word (found by an outside check); fit says so and how to list them
def test_layers_out_of_run_order_warned(model, data):
    import warnings

    with pytest.warns(actclust.ActClustWarning, match=r"listed in another order than the model runs them "
                                                      r"\(\['fc2', 'conv', 'fc1'\]; they run as \['conv', 'fc1', "
                                                      r"'fc2'\]\).*layers=\['conv', 'fc1', 'fc2'\]") as said:
        ActivationClustering(model, ["fc2", "conv", "fc1"], n_clusters=4, progress=False).fit(*data)
    assert said[0].filename == __file__
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The layers are listed", actclust.ActClustWarning)
        ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=4, progress=False).fit(*data)
        # a container listed before its part: its hook fires after the part's, which is no order of depth
        nested = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.ReLU()),
                                     torch.nn.Linear(8, 3)).eval()
        ActivationClustering(nested, ["0", "0.1", "1"], n_clusters=4, progress=False).fit(*data)


# targets that hold only some of the model's classes: the surrogate never predicts the others, said at fit (an outside
# check fitted digits 0-4 and got a fidelity of 0 on 5-9 without a word)
def test_unseen_classes_warned(model, mixed_model, data):
    import warnings

    with pytest.warns(actclust.ActClustWarning, match=r"The model has 3 classes but its predictions on the training "
                                                      r"data hold 1 of them: the surrogate never predicts the classes "
                                                      r"\[0, 2\]") as said:
        ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(*data)  # it predicts class 1 only
    assert said[0].filename == __file__
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The model has .* classes but", actclust.ActClustWarning)
        ActivationClustering(mixed_model, LAYERS, n_clusters=4, progress=False).fit(*data)


# load without the model says what it needs (a bare TypeError said an argument was missing)
def test_load_without_model(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    with pytest.raises(ParameterError, match=r"load\('.*run'\) needs the model the run explains: "
                                             r"actclust.load\(path, model\)"):
        actclust.load(tmp_path / "run")
    with pytest.raises(ParameterError, match=r"verify must be True or False. Got 'no' instead"):
        actclust.load(tmp_path / "run", fitted.model, verify="no")  # it was taken as True
    # a run that keeps its ONNX model: the message names the file (it only said a run keeps no code: outside check)
    (tmp_path / "run" / "model-0123456789abcdef.onnx").write_bytes(b"")
    with pytest.raises(ParameterError, match=r"This run keeps its ONNX model \(data, not code\): actclust.load\(path, "
                                             r"'.*run/model-0123456789abcdef.onnx'\)"):
        actclust.load(tmp_path / "run")


# inputs of another shape than the training data are reported
def test_inputs_of_other_shape(model, data):
    ac = _ac(model, reducer="grid:2").fit(data[0])
    with pytest.raises(ValueError, match=r"X has per-sample shape \(1, 1, 1\) but the explainer was fitted on "
                                          r"inputs of shape \(1, 6, 6\)"):
        ac.predict(np.zeros((4, 1, 1, 1), dtype=np.float32))
    assert hook_count(model) == 0


# the model's device is used for inputs (CUDA when available), results come back as NumPy
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model(mixed_model, data, no_tf32):
    on_cpu = _ac(mixed_model).fit(data[0])
    paths, proba = on_cpu.cluster_paths(data[0]), on_cpu.predict_proba(data[0])
    ac = _ac(mixed_model.cuda()).fit(data[0])
    out = ac.predict_proba(data[0])
    assert isinstance(out, np.ndarray)
    # float differences between devices may move a sample across a cluster boundary, rarely
    assert (ac.cluster_paths(data[0]) == paths).mean() > 0.95 and np.abs(out - proba).mean() < 0.02


# clustering="distill": the learned per-layer temperatures are used everywhere (posteriors are
# soft-count class mixes and predictions soft mixes at those temperatures), user weights are kept,
# the in-sample scores use them, and a saved run predicts identically after loading. Its fidelity
# gain over k-means is measured where it can be: held-out toy data in test_distill.py and
# Fashion-MNIST in test_fashion_end_to_end.py (120 samples here are too few to show it).
@pytest.mark.parametrize("layer_weights", [None, "fit", np.array([1.0, 2.0, 1.0])])
def test_distill_end_to_end(mixed_model, data, tmp_path, layer_weights):
    import actclust

    with torch.no_grad():
        mixed_model.fc2.weight.mul_(10)  # a confident DNN, whose softmax the refinement matches
    x, y = data
    ac = _ac(mixed_model, clustering="distill", layer_weights=layer_weights).fit(x[:90], y[:90])
    if layer_weights is None:
        assert np.allclose(ac.weights_, 1 / 3)
    elif not isinstance(layer_weights, str):  # user weights are kept, normalised
        assert np.allclose(ac.weights_, [0.25, 0.5, 0.25])
    temps = ac.fit_info_["distill"]["temperatures"]  # as refined, relative to each clustering's scale_
    assert temps == {l: ac.clusterings_[l].temperature_ for l in LAYERS}
    v_train, v = layer_vectors(mixed_model, x[:90]), layer_vectors(mixed_model, x[90:])
    expected, sharpness = 0, []
    for w, l in zip(ac.weights_, LAYERS):
        centers = ac.clusterings_[l].centers_
        d_train = sq_distances(v_train[l], centers)
        scale = d_train.min(1).mean()  # temperatures are relative to it
        post = _posteriors(_soft(d_train, temps[l], scale), _dnn(mixed_model, x[:90]))
        np.testing.assert_allclose(ac.posteriors_[l], post, atol=1e-5, err_msg=l)
        soft = _soft(sq_distances(v[l], centers), temps[l], scale)
        sharpness.append(soft.max(1).mean())
        expected = expected + w * soft @ post
    np.testing.assert_allclose(ac.predict_proba(x[90:]), expected, atol=1e-5)
    assert min(sharpness) < 0.9  # some layer's assignment is far from hard: the temperatures matter
    assert ac.train_score_ == ac.score(x[:90], y[:90])  # in-sample scores used the learned soft assignment
    ac.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", mixed_model, progress=False)
    assert np.allclose(loaded.predict_proba(x), ac.predict_proba(x), atol=1e-6)


# a clustering's warning (e.g. no convergence) reaches the user with the layer it concerns
def test_clustering_warnings_name_the_layer(model, data, monkeypatch):
    import warnings

    import actclust.fitting as ex
    from actclust.clustering import KMeans

    class Grumpy(KMeans):
        def fit(self, X):
            warnings.warn("did not converge", UserWarning)
            return super().fit(X)

    monkeypatch.setattr(ex, "make_clustering", lambda name, k, seed=0: Grumpy(k, seed))
    with pytest.warns(UserWarning, match="layer 'fc1': did not converge"):
        _ac(model).fit(data[0])


# fewer clusters than the classes the surrogate learns: fit warns, naming the layers and what to give instead
def test_fewer_clusters_than_classes_warn():
    import warnings

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 12)).eval()
    y = rng.integers(0, 12, 300)
    with pytest.warns(actclust.ActClustWarning, match=r"The layers \['1'\] have fewer clusters \(\[5\]\) than the 12 "
                                                      r"classes the surrogate learns.*n_clusters=24"):
        ActivationClustering(net, ["1", "2"], n_clusters={"1": 5, "2": 12}, posterior="label", progress=False).fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", actclust.ActClustWarning)
        ActivationClustering(net, ["1", "2"], n_clusters=12, posterior="label", progress=False).fit(x, y)


# what fit learned stays with what it was fitted with (an outside check of the Python API): a save records the
# parameters of the fit, not those set after it (the loaded run claimed layers it did not hold); a display attached
# to the previous fit is dropped (its training pictures were drawn for the new one's neighbours); another model bound
# after fit is said to differ, as load says it; layers_ is a copy (appending to it broke the next call)
def test_fit_keeps_what_it_was_fitted_with(mixed_model, data, tmp_path):
    import warnings

    from actclust import ActClustWarning, ModelMismatchWarning

    from conftest import TinyCNN

    x, y = data
    ac = _ac(mixed_model).fit(x[:80], y[:80])
    ac.set_display(train=x[:80])
    ac.layers, ac.n_clusters, ac.batch_size = LAYERS[-1:], 3, 32
    with pytest.warns(ActClustWarning, match=r"The parameters \['layers', 'n_clusters'\] were set after fit; the run "
                                             r"saves those it was fitted with \(layers=\['conv', 'fc1', 'fc2'\], "
                                             r"n_clusters=4\)\. Call fit\(\) again to use the new ones"):
        ac.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", mixed_model, progress=False)
    assert loaded.layers == LAYERS and loaded.n_clusters == 4 and loaded.batch_size == 32  # batch_size: a later call's
    ac.layers, ac.n_clusters = LAYERS, 4
    with pytest.warns(ActClustWarning, match=r"fit replaced the display that set_display\(\) attached to the previous "
                                             r"fit .*call set_display\(\) again"):
        ac.fit(x[40:], y[40:])
    assert "_display" not in ac.__dict__
    ac.layers_.append("relu")
    assert ac.layers_ == LAYERS and ac.predict(x[:5]).shape == (5,)
    other = TinyCNN(seed=7).eval()
    ac.model = other
    with pytest.warns(ModelMismatchWarning, match="differ from those of the model this explainer was fitted with"):
        ac.predict(x[:5])
    ac.model = mixed_model  # the fitted one again: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelMismatchWarning)
        ac.predict(x[:5])
    # the same model trained on in place after fit (fidelity 0.90 -> 0.26 without a word: an outside check): said
    # once, from PyTorch's version counters and then the weights' fingerprint; a refit on it says nothing
    with torch.no_grad():
        mixed_model.fc1.weight.mul_(-1)
    with pytest.warns(ModelMismatchWarning, match="differ from those of the model this explainer was fitted with"):
        ac.predict(x[:5])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelMismatchWarning)
        ac.predict(x[:5])  # said once per change
        ac.fit(x, y)
        ac.predict(x[:5])
        with torch.no_grad():
            mixed_model.fc1.weight.mul_(1.0)  # written in place, the same weights: the fingerprint says nothing changed
        ac.predict(x[:5])


# scikit-learn's parameter API: get_params / set_params, clone, check_is_fitted; repr shows what differs from the
# defaults (two explainers of another clustering or seed printed alike: an outside check)
def test_scikit_learn_parameter_api(model, data):
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError as SkNotFitted
    from sklearn.utils.validation import check_is_fitted

    ac = ActivationClustering(model, LAYERS, n_clusters=4, clustering="distill", random_state=3, progress=False)
    assert ac.get_params()["clustering"] == "distill" and ac.get_params()["model"] is model
    assert repr(ac) == ("ActivationClustering(layers=['conv', 'fc1', 'fc2'], n_clusters=4, clustering='distill', "
                        "random_state=3, progress=False)")
    twin = clone(ac)  # scikit-learn deep-copies the parameters that are no estimators: the model too
    assert {k: v for k, v in twin.get_params().items() if k != "model"} == \
        {k: v for k, v in ac.get_params().items() if k != "model"}
    assert isinstance(twin.model, type(model)) and twin.model is not model
    assert ac.set_params(n_clusters=3) is ac and ac.n_clusters == 3
    with pytest.raises(ParameterError, match=r"ActivationClustering has no parameters \['k'\]; its parameters are "
                                             r"\['model', 'layers', 'n_clusters'"):
        ac.set_params(k=3)
    with pytest.raises(SkNotFitted):
        check_is_fitted(ac)
    check_is_fitted(_ac(model).fit(data[0]))


# layer_weights="fit" on a held-out part of a sample or two says its weights are close to a guess (they came back as
# if chosen: an outside check); on enough held-out samples it says nothing
def test_fit_weights_on_too_few_held_out(mixed_model, data):
    import warnings

    from actclust import ActClustWarning

    x, y = data
    with pytest.warns(ActClustWarning, match=r"layer_weights='fit' chooses the weights on 2 held-out sample\(s\) "
                                             r"\(validation_fraction=0.2 of 12\): too few to tell the layers apart"):
        _ac(mixed_model, layer_weights="fit", n_clusters=3).fit(x[:12], y[:12])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ActClustWarning)
        _ac(mixed_model, layer_weights="fit", n_clusters=3).fit(x, y)  # 24 held out
