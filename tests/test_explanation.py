import json

import numpy as np
import pytest
import torch

from actclust.explanation import SCHEMA, Explanation


# one explanation per input, consistent with predict_proba, the DNN, the cluster paths
def test_explain_consistent(fitted, data, model):
    x, y = data[0][:6], data[1][:6]
    es = fitted.explain(x, y, k=3, trust=False)
    assert len(es) == 6
    proba, paths = fitted.predict_proba(x), fitted.cluster_paths(x)
    dnn = torch.softmax(model(torch.as_tensor(x)), 1).detach().numpy()
    for i, e in enumerate(es):
        assert e.index == i and e.label == y[i]
        assert np.allclose(e.surrogate["probabilities"], proba[i], atol=1e-6)
        assert e.dnn["prediction"] == dnn[i].argmax() and e.dnn["probability"] == pytest.approx(dnn[i].max(), abs=1e-6)
        assert [lay["cluster"] for lay in e.layers] == paths[i].tolist()
        assert len(e.similar["low"]) == 3 and len(e.similar["high"]) == 3
        assert all(len(lay["exemplars"]) <= 3 for lay in e.layers)


# the votes are an exact additive split: prior + sum of votes = surrogate probabilities
def test_votes_add_up(fitted, data):
    fitted.layer_weights = [1, 2, 5]
    fitted.fit(*data)
    for e in fitted.explain(data[0][:5], trust=False):
        total = np.array(e.surrogate["prior"]) + sum(np.array(lay["vote"]) for lay in e.layers)
        assert np.allclose(total, e.surrogate["probabilities"], atol=1e-5)
        assert sum(lay["weight"] for lay in e.layers) == pytest.approx(1)


# to_json / from_json round-trip, and the JSON has the documented top-level fields
def test_json_round_trip(fitted, data):
    e = fitted.explain(data[0][:1], class_names=["a", "b", "c"], trust=False)[0]
    back = Explanation.from_json(e.to_json())
    assert back == e and back.class_name(1) == "b"
    d = json.loads(e.to_json())
    assert d["schema"] == SCHEMA and set(d) == {"schema", "index", "label", "class_names", "dnn", "surrogate",
                                                "layers", "similar", "trust"}
    assert set(d["layers"][0]) == {"layer", "cluster", "weight", "class_mix", "vote", "distance", "exemplars"}


# bad class names and foreign JSON are clear errors
def test_explanation_errors(fitted, data):
    with pytest.raises(ValueError, match="class_names must name the 3 classes"):
        fitted.explain(data[0][:1], class_names=["a"], trust=False)
    with pytest.raises(ValueError, match="Not an actclust explanation"):
        Explanation.from_json('{"schema": "other/1"}')
    with pytest.raises(ValueError, match=r"Unknown fields in explanation: \['extra'\]"):
        Explanation.from_dict({"schema": SCHEMA, "extra": 1})
