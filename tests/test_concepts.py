import numpy as np
import pytest

from conftest import LAYERS


# one concept per cluster; members, exemplars nearest the centre, edge samples furthest
def test_concepts(fitted):
    cs = fitted.concepts("fc1", k=3, n_edge=2)
    assert [c.cluster for c in cs] == [0, 1, 2, 3]
    assert sum(c.size for c in cs) == 120
    c = fitted.clusterings_["fc1"]
    d = c.distances(fitted.train_vectors_["fc1"])
    assign = d.argmin(1)
    for con in cs:
        members = np.flatnonzero(assign == con.cluster)
        own = d[members, con.cluster]
        assert set(con.exemplars) <= set(members) and set(con.edge) <= set(members)
        assert np.allclose(sorted(own)[:len(con.exemplars)], np.array(con.exemplar_distances) * c.scale_, rtol=1e-5)
        assert np.allclose(sorted(own)[::-1][:len(con.edge)], np.array(con.edge_distances) * c.scale_, rtol=1e-5)
        mix = np.bincount(fitted.train_predictions_[members], minlength=3) / len(members)
        assert np.allclose(con.prediction_mix, mix) and con.purity == pytest.approx(mix.max())
        assert con.majority == mix.argmax() and np.isclose(sum(con.label_mix), 1)
        assert con.to_dict()["layer"] == "fc1"


# without labels there is no label mix
def test_concepts_without_labels(model, data):
    from actclust import ActivationClustering

    ac = ActivationClustering(model, LAYERS, n_clusters=3, progress=False).fit(data[0])
    assert all(c.label_mix is None for c in ac.concepts("conv"))


# unknown layer (with a suggestion) and k out of range are clear errors
def test_concepts_errors(fitted):
    with pytest.raises(ValueError, match=r"Layer 'fc' was not fitted.*Did you mean"):
        fitted.concepts("fc")
    with pytest.raises(ValueError, match="k must be an int between 1 and the 120 training samples"):
        fitted.concepts("fc1", k=500)
    with pytest.raises(ValueError, match="n_edge must be an int"):
        fitted.concepts("fc1", n_edge=-1)
