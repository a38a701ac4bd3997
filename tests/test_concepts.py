import numpy as np
import pytest
import torch

from conftest import LAYERS, layer_vectors, sq_distances


# one concept per cluster: its members (nearest centre), their prediction and label mixes, the k
# members nearest the centre and the n_edge furthest, with squared distances over the layer's
# mean squared distance to the nearest centre; all recomputed by brute force
def test_concepts(mixed_fitted, mixed_model, data):
    x, y = data
    cs = mixed_fitted.concepts("fc1", k=3, n_edge=2)
    assert [c.cluster for c in cs] == [0, 1, 2, 3]
    d = sq_distances(layer_vectors(mixed_model, x)["fc1"], mixed_fitted.clusterings_["fc1"].centers_)
    assign, scale = d.argmin(1), d.min(1).mean()
    dnn = mixed_model(torch.as_tensor(x)).argmax(1).numpy()
    for con in cs:
        members = np.flatnonzero(assign == con.cluster)
        by_distance = members[np.argsort(d[members, con.cluster], kind="stable")]
        assert con.size == len(members) > 3
        assert con.exemplars == by_distance[:3].tolist() and con.edge == by_distance[::-1][:2].tolist()
        np.testing.assert_allclose(con.exemplar_distances, d[by_distance[:3], con.cluster] / scale, rtol=1e-4)
        np.testing.assert_allclose(con.edge_distances, d[by_distance[::-1][:2], con.cluster] / scale, rtol=1e-4)
        mix = np.bincount(dnn[members], minlength=3) / len(members)
        np.testing.assert_allclose(con.prediction_mix, mix)
        assert con.purity == pytest.approx(mix.max()) and con.majority == mix.argmax()
        np.testing.assert_allclose(con.label_mix, np.bincount(y[members], minlength=3) / len(members))
        assert con.to_dict()["layer"] == "fc1"
    assert len({c.majority for c in cs}) > 1  # the mixes differ between clusters here


# without labels there is no label mix
def test_concepts_without_labels(model, data):
    from actclust import ActivationClustering

    ac = ActivationClustering(model, LAYERS, n_clusters=3, progress=False).fit(data[0])
    assert all(c.label_mix is None for c in ac.concepts("conv"))


# unknown layer (with a suggestion) and k out of range are clear errors
def test_concepts_errors(fitted):
    with pytest.raises(ValueError, match=r"Layer 'fc' was not fitted.*Did you mean 'fc2', 'fc1'\?"):
        fitted.concepts("fc")
    with pytest.raises(ValueError, match=r"A layer is one name of the fitted layers .*; got \['fc1'\]"):
        fitted.concepts(["fc1"])  # it answered "Did you mean ['fc1']?"
    with pytest.raises(ValueError, match="k must be an int between 1 and the 120 training samples"):
        fitted.concepts("fc1", k=500)
    with pytest.raises(ValueError, match="n_edge must be an int"):
        fitted.concepts("fc1", n_edge=-1)
