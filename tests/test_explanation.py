import json
import re

import numpy as np
import pytest
import torch

from conftest import LAYERS

import actclust
from actclust import ActivationClustering
from actclust.analysis.explanation import SCHEMA, Explanation


# one explanation per input, consistent with predict_proba, the DNN, the cluster paths, the
# concepts' exemplars and the similar samples
def test_explain_consistent(mixed_fitted, data, mixed_model):
    x, y = data[0][:6], data[1][:6]
    es = mixed_fitted.explain(x, y, k=3, trust=False)
    assert len(es) == 6
    proba, paths = mixed_fitted.predict_proba(x), mixed_fitted.cluster_paths(x)
    dnn = torch.softmax(mixed_model(torch.as_tensor(x)), 1).detach().numpy()
    exemplars = {l: [c.exemplars for c in mixed_fitted.concepts(l, k=3)] for l in LAYERS}
    similar = {p: mixed_fitted.similar(x, k=3, weights=p) for p in ("low", "high")}
    for i, e in enumerate(es):
        assert e.index == i and e.label == y[i]
        assert np.allclose(e.surrogate["probabilities"], proba[i], atol=1e-6)
        assert e.dnn["prediction"] == dnn[i].argmax() and e.dnn["probability"] == pytest.approx(dnn[i].max(), abs=1e-6)
        assert [lay["cluster"] for lay in e.layers] == paths[i].tolist()
        assert [lay["exemplars"] for lay in e.layers] == [exemplars[l][c] for l, c in zip(LAYERS, paths[i])]
        for p, nb in similar.items():
            assert [s["index"] for s in e.similar[p]] == nb.indices[i].tolist()
            assert [s["prediction"] for s in e.similar[p]] == mixed_fitted.train_predictions_[nb.indices[i]].tolist()
            assert [s["label"] for s in e.similar[p]] == data[1][nb.indices[i]].tolist()


# the votes are an exact additive split: vote = weight * (class mix - prior), the prior being the
# class distribution of the DNN's training predictions, and prior + sum of votes = probabilities
def test_votes_add_up(mixed_model, data):
    ac = ActivationClustering(mixed_model, LAYERS, n_clusters=4, layer_weights=[1, 2, 5], progress=False).fit(*data)
    prior = np.bincount(mixed_model(torch.as_tensor(data[0])).argmax(1).numpy(), minlength=3) / len(data[0])
    paths = ac.cluster_paths(data[0][:5])
    for e, path in zip(ac.explain(data[0][:5], trust=False), paths):
        np.testing.assert_allclose(e.surrogate["prior"], prior, atol=1e-6)
        assert [lay["weight"] for lay in e.layers] == pytest.approx([1 / 8, 2 / 8, 5 / 8])
        for lay, w, l, c in zip(e.layers, [1 / 8, 2 / 8, 5 / 8], LAYERS, path):
            np.testing.assert_allclose(lay["class_mix"], ac.posteriors_[l][c], atol=1e-6)
            np.testing.assert_allclose(lay["vote"], w * (ac.posteriors_[l][c] - prior), atol=1e-6)
        total = prior + sum(np.array(lay["vote"]) for lay in e.layers)
        np.testing.assert_allclose(total, e.surrogate["probabilities"], atol=1e-5)
        assert np.abs(total - prior).max() > 0.05  # the votes move the prediction here


# to_json / from_json round-trip, and the JSON has the documented top-level fields
def test_json_round_trip(fitted, data):
    e = fitted.explain(data[0][:1], class_names=["a", "b", "c"], trust=False)[0]
    back = Explanation.from_json(e.to_json())
    assert back == e and back.class_name(1) == "b"
    d = json.loads(e.to_json())
    assert d["schema"] == SCHEMA and set(d) == {"schema", "index", "label", "class_names", "dnn", "surrogate",
                                                "layers", "similar", "trust", "trust_notes", "meta", "trust_thresholds"}
    assert d["meta"] == {"actclust_version": actclust.__version__, "model_class": "conftest.TinyCNN",
                         "layers": LAYERS}
    assert set(d["layers"][0]) == {"layer", "cluster", "weight", "class_mix", "vote", "distance", "exemplars"}


# trust left out by default on a small training set: the notes say why (they were empty: an outside check); asked
# for none, none and no note
def test_trust_left_out_says_why(fitted, data):
    e = fitted.explain(data[0][:2])[0]
    assert e.trust is None and len(e.trust_notes) == 1
    assert re.fullmatch(r"No trust signals: the training set of 120 samples is too small to calibrate them \(a held-out "
                        r"tenth of at least 20 samples, and 50 others as neighbours\)\. Fit on more samples, or pass "
                        r"trust=\{'calibration': ac\.query\(X_val, y_val, vectors=True\)\}\.", e.trust_notes[0])
    assert Explanation.from_json(e.to_json()).trust_notes == e.trust_notes
    off = fitted.explain(data[0][:2], trust=False)[0]
    assert off.trust is None and off.trust_notes is None
    # fewer samples than trust's 50 neighbours: the advice says to lower them too (held-out data alone then failed)
    small = actclust.ActivationClustering(fitted.model, LAYERS, n_clusters=4, progress=False).fit(data[0][:40], data[1][:40])
    note = small.explain(data[0][:2])[0].trust_notes[0]
    assert note.endswith("trust={'calibration': ac.query(X_val, y_val, vectors=True), 'n_neighbors': 40 or fewer}.")
    q = small.query(data[0][40:80], data[1][40:80], vectors=True)
    assert small.explain(data[0][:2], trust={"calibration": q, "n_neighbors": 40})[0].trust is not None


# bad class names and foreign JSON are clear errors
def test_explanation_errors(fitted, data):
    with pytest.raises(ValueError, match="class_names must name the 3 classes"):
        fitted.explain(data[0][:1], class_names=["a"], trust=False)
    with pytest.raises(ValueError, match="Not an actclust explanation"):
        Explanation.from_json('{"schema": "other/1"}')
    with pytest.raises(ValueError, match=r"Unknown fields in explanation: \['extra'\]"):
        Explanation.from_dict({"schema": SCHEMA, "extra": 1})
    whole = fitted.explain(data[0][:1], k=np.int64(3), trust=False)[0].to_dict()  # NumPy's ints are ints
    assert len(whole["similar"]["low"]) == 3
    with pytest.raises(actclust.ParameterError, match="An explanation is a dict"):
        Explanation.from_dict([whole])
    with pytest.raises(actclust.ParameterError, match=r"The explanation lacks the fields \['layers'\]"):
        Explanation.from_dict({k: v for k, v in whole.items() if k != "layers"})
    # values of the wrong kind or range are refused, not met as a raw IndexError in a view, or shown as another
    # class (a prediction of -1 was drawn as the last class) (found by an outside security check)
    import copy

    for change, match in [
        (lambda d: d["dnn"].update(prediction=3), r"dnn prediction must be a class index in \[0, 2\]"),
        (lambda d: d["dnn"].update(prediction=-1), r"dnn prediction must be a class index in \[0, 2\]"),
        (lambda d: d["dnn"].update(probability=float("nan")), r"dnn probability must be a finite number"),
        (lambda d: d.update(layers=[1, 2]), r"layer 0 must be a dict of 'layer' \(a name\)"),
        (lambda d: d["layers"][1].update(class_mix=[1.0]), r"layer 1 class_mix must be a list of 3 finite numbers"),
        (lambda d: d.update(similar=None), r"'similar' must be a dict of preset -> similar samples"),
        (lambda d: d["similar"]["low"][0].update(prediction=7), r"similar samples of 'low' must be dicts of"),
        (lambda d: d.update(class_names=["a"]), r"'class_names' must be None or a list of 3 names"),
        (lambda d: d.update(label="cat"), r"'label' must be None or be a class index"),
    ]:
        bad = copy.deepcopy(whole)
        change(bad)
        with pytest.raises(actclust.ParameterError, match=r"The explanation's " + match):
            Explanation.from_json(json.dumps(bad))
    # arguments of the wrong kind are ParameterErrors, not Python's TypeErrors (found by an outside edge-case check)
    for call, match in [
        (lambda: fitted.explain(data[0][:1], k=None, trust=False), r"k must be an int >= 1 .*Got None"),
        (lambda: fitted.explain(data[0][:1], k="5", trust=False), r"k must be an int >= 1 .*Got '5'"),
        (lambda: fitted.similar(data[0][:1], weights=None), r"weights must be one of \['equal', 'low', 'high'\]"),
        (lambda: fitted.similar(data[0][:1], weights=5), r"weights must be one of .*Got 5 instead"),
        (lambda: Explanation.from_json("nope"), r"Not the JSON of an explanation: Expecting value"),
        (lambda: Explanation.from_json(whole), r"from_json takes the JSON text of an explanation .*got a dict: use "
                                               r"from_dict"),
        (lambda: fitted.set_display(mean="x"), r"mean must be a number or an array of numbers .*Got 'x'"),
        # finite, std above 0: std=0 or mean=nan drew every picture wrong without a word (an outside check)
        (lambda: fitted.set_display(std=0), r"std must hold finite numbers, each above 0 \(it undoes the inputs' "
                                            r"normalisation: x \* std \+ mean\). Got 0 instead"),
        (lambda: fitted.set_display(std=np.array([-1.0])), r"std must hold finite numbers, each above 0"),
        (lambda: fitted.set_display(mean=float("nan")), r"mean must hold finite numbers \(it undoes"),
        (lambda: fitted.set_display(std=float("inf")), r"std must hold finite numbers, each above 0"),
        (lambda: actclust.list_layers(fitted.model, np.zeros((2, 3, 6, 6), np.float32)), r"raised RuntimeError on the sample"),
    ]:
        with pytest.raises(actclust.ParameterError if "sample" not in match else actclust.CaptureError, match=match):
            call()
    with_trust = fitted.explain(data[0][:2], trust={"calibration_fraction": 0.3})[1]
    assert with_trust.trust and Explanation.from_json(with_trust.to_json()) == with_trust  # trust signals read back


# the explanations go to the oldest generation as they are made (not through the young one, whose next pass would
# traverse them all: 2% of explain on 10,000 inputs); a process that keeps objects frozen itself keeps them frozen
@pytest.mark.parametrize("frozen_before", [False, True])
def test_explanations_go_to_the_oldest_generation(fitted, data, frozen_before):
    import gc

    sentinel = [[]]  # an object of the caller's, frozen by it where it freezes
    enabled = gc.isenabled()
    if frozen_before:
        gc.freeze()
    gc.disable()  # no collection of the test's own moves objects on between the call and the checks
    try:
        es = fitted.explain(data[0][:3], trust=False)
        where = [{id(o) for o in gc.get_objects(generation=g)} for g in range(3)]
        made = [es[0], es[0].layers, es[0].layers[0], es[0].dnn["probabilities"], es[-1].similar["low"]]
        if frozen_before:  # left as they are: the caller's frozen object still frozen, the explanations young
            assert not any(id(sentinel) in ids for ids in where) and all(id(o) in where[0] for o in made)
        else:
            assert all(id(o) in where[2] for o in made)
    finally:
        gc.unfreeze()
        (gc.enable if enabled else gc.disable)()


# explanations are built with the cycle collector paused (they hold no cycles; it set itself off
# hundreds of times per 10,000 inputs), and it is left as the caller had it, even when a step fails;
# no two explanations share a mutable part, so editing one edits no other
@pytest.mark.parametrize("enabled", [True, False])
def test_explain_leaves_gc_as_it_was(fitted, data, enabled, monkeypatch):
    import gc

    from actclust.analysis import explanation

    (gc.enable if enabled else gc.disable)()
    try:
        es = fitted.explain(data[0][[0, 0, 1]], class_names=["a", "b", "c"], trust=False)  # the same input twice
        assert gc.isenabled() is enabled
        monkeypatch.setattr(explanation, "_samples", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            fitted.explain(data[0][:4], trust=False)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()
    a, b = es[0], es[1]
    for part in (lambda e: e.class_names, lambda e: e.surrogate["prior"], lambda e: e.layers[0]["exemplars"],
                 lambda e: e.meta, lambda e: e.meta["layers"]):
        assert part(a) == part(b) and part(a) is not part(b)
    a.surrogate["prior"][0] = -1.0
    a.layers[0]["exemplars"].append(-1)
    assert b.surrogate["prior"][0] != -1.0 and b.layers[0]["exemplars"][-1] != -1


# prepare builds what explain's first call builds, from one plan: explain then builds no index and calibrates no
# trust; prepare(trust=False) leaves the calibration to the first explain; an unprepared explain builds both
def test_prepare_builds_what_explain_builds(monkeypatch):
    from actclust.analysis import explanation, indexes

    built = []
    real_build = indexes.ApproximateIndex._build
    monkeypatch.setattr(indexes.ApproximateIndex, "_build", lambda self, *a: built.append(1) or real_build(self, *a))
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((760, 4)).astype(np.float32), rng.integers(0, 3, 760)
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).eval()

    def fitted():
        return ActivationClustering(net, ["1", "2"], n_clusters=3, search="approximate", progress=False).fit(x[:700],
                                                                                                          y[:700])
    ac = fitted().prepare()
    index, cal = ac.state_.cache["retrieval"]["retrieval", "approximate", "host"], ac.state_.cache["trust"]
    settings, n_built = dict(index.settings), len(built)
    assert set(settings) and n_built
    es = ac.explain(x[700:])
    assert es[0].trust is not None and len(built) == n_built and index.settings == settings
    assert ac.state_.cache["trust"] is cal
    ac = fitted().prepare(trust=False)
    assert "trust" not in ac.state_.cache
    assert ac.explain(x[700:])[0].trust is not None and "trust" in ac.state_.cache
    built.clear()
    ac = fitted()
    ac.explain(x[700:])
    assert built and "trust" in ac.state_.cache
    # the estimator's defaults are the plan's
    import inspect

    assert inspect.signature(ActivationClustering.explain).parameters["k"].default == explanation.DEFAULT_K


# trust= takes the trust signals' options as trust() takes them, in explain, prepare and report alike: held-out
# (X_val, y_val) is queried (it failed with AttributeError outside trust()); a typo or a string is refused
def test_trust_options_everywhere(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((900, 4)).astype(np.float32), rng.integers(0, 3, 900)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    ac = ActivationClustering(net, ["1", "2"], n_clusters=3, progress=False).fit(x[:600], y[:600])
    held = {"calibration": (x[600:850], y[600:850])}
    direct = ac.trust(x[850:], **held)
    assert len(ac.trust(x[850:], n_neighbors=np.int64(20))["credibility"]) == 50  # NumPy's ints are ints
    es = ac.explain(x[850:], trust=held)
    np.testing.assert_allclose([e.trust["credibility"] for e in es], direct["credibility"])
    assert es[0].trust_thresholds["calibration"] == "held-out data"
    ac.prepare(trust=held)
    path = actclust.report(ac, x[850:], y[850:], out=tmp_path / "r.html", trust=held, n_correct=1, n_wrong=1)
    assert "held-out data" in path.read_text()
    for bad, match in (("no", r"The 'trust' parameter of explain must be None .* Got 'no' instead"),
                       ({"calibraton": held["calibration"]}, r"Unknown option 'calibraton' of the trust signals in "
                                                            r"explain; did you mean 'calibration'\?")):
        with pytest.raises(actclust.ParameterError, match=match):
            ac.explain(x[850:], trust=bad)
    with pytest.raises(actclust.ParameterError, match=r"Unknown option 'calibraton' of the trust signals in trust"):
        ac.trust(x[850:], calibraton=held["calibration"])


# class names as a list, or as a mapping of class ids to names (a Hugging Face config's id2label, whose keys were
# shown instead), everywhere names are shown; a string is refused (it was split into one name per character)
def test_class_names_forms(fitted, data, tmp_path):
    from actclust.views.explorer import Explorer

    x = data[0]
    names = {0: "cat", 1: "dog", 2: "bird"}
    assert fitted.explain(x[:2], class_names=names, trust=False)[0].class_names == \
        ["cat", "dog", "bird"]
    assert fitted.explain(x[:2], class_names={"2": "bird", "0": "cat", "1": "dog"}, trust=False)[0].class_names == \
        ["cat", "dog", "bird"]
    assert "bird" in actclust.report(fitted, x[:20], data[1][:20], out=tmp_path / "r.html", class_names=names,
                                     n_correct=1, n_wrong=1).read_text()
    assert Explorer(fitted, x[:10], class_names=names, trust=False, progress=False).names == ["cat", "dog", "bird"]
    fitted.set_display(class_names=names)
    assert "dog" in fitted.explain(x[:2], trust=False)._repr_html_()
    for bad, match in (("abc", r"class_names must be a list of the 3 class names; got the string 'abc'"),
                       ({0: "cat", 1: "dog"}, r"must map the class ids 0..2 to names; got the ids \[0, 1\]"),
                       ({"cat": 0, "dog": 1, "bird": 2}, r"must map each class id 0..2 to its name, once \(as id2label "
                                                          r"does\); got the key 'cat'"),
                       ({0: "cat", "0": "kitten", 1: "dog", 2: "bird"}, r"once \(as id2label does\); got the key 0"),
                       ({"b", "a", "c"}, r"must be a list of the 3 class names, in class order"),
                       (3, r"must be a list of the 3 class names, in class order .* got int 3"),
                       (["cat", "dog"], r"class_names must name the 3 classes; got 2 names"),
                       # blank or twin names left classes apart by their place only (a study's answer list: an outside
                       # check)
                       (["cat", " ", "bird"], r"class_names must give each class a name; class 1 has a blank one"),
                       (["cat", "dog", "cat"], r"class_names must give each class its own name; classes 0 and 2 are "
                                               r"both named 'cat'"),
                       ({0: "cat", 1: "", 2: "bird"}, r"class 1 has a blank one"),
                       # names that read alike, invisible ones, None, and a direction control that turned the figures
                       # shown after it around (an outside check)
                       (["cat", "dog", "cat "], r"classes 0 and 2 are both named 'cat' \(and 'cat ', which reads the same\)"),
                       (["cat", "\u200b", "bird"], r"class 1 has a blank one"),
                       (["cat", None, "bird"], r"class_names must name every class; class 1 is None"),
                       (["cat", "\u202edog", "bird"], r"must not hold text-direction control characters .* class 1's "
                                                      r"name '\\u202edog' does")):
        with pytest.raises(actclust.ParameterError, match=match):
            fitted.explain(x[:2], class_names=bad, trust=False)
