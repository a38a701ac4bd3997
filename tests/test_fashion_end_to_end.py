import functools

import numpy as np
import pytest
import torch
from conftest import require_fashion_mnist

from actclust import ActivationClustering
from actclust.datasets import load_fashion_mnist
from actclust.models import accuracy, fashion_cnn, train_classifier

LAYERS = ["conv1", "conv2", "fc1", "fc2"]


@functools.lru_cache(maxsize=1)
def _trained():
    """6,000 training and 1,000 test images, and a CNN trained one epoch on the former (seeded):
    trained once for the tests of this module."""
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    x_tr, y_tr, x_te, y_te = x_tr[:6000], y_tr[:6000], x_te[:1000], y_te[:1000]
    torch.manual_seed(0)
    model = train_classifier(fashion_cnn(), x_tr, y_tr, epochs=1, batch_size=64, progress=False)
    return model, x_tr, y_tr, x_te, y_te


# on real Fashion-MNIST, a briefly trained CNN's surrogate agrees with it far above chance and
# above always answering its most frequent class, deeper layers are more faithful than the first,
# and combining layers does at least as well as the best single layer minus a small margin
@pytest.mark.slow
def test_fashion_surrogate_is_faithful():
    require_fashion_mnist()
    model, x_tr, y_tr, x_te, y_te = _trained()
    assert accuracy(model, x_te, y_te) > 0.7
    ac = ActivationClustering(model, LAYERS, n_clusters=15, progress=False)
    s = ac.fit(x_tr, y_tr).score(x_te, y_te)
    best_layer = max(v["fidelity"] for v in s["per_layer"].values())
    assert s["fidelity"] > 0.75 and s["fidelity"] >= best_layer - 0.05
    dnn = model(torch.as_tensor(x_te)).argmax(1).numpy()
    assert s["fidelity"] > np.bincount(dnn).max() / len(dnn) + 0.5
    assert s["per_layer"]["fc2"]["fidelity"] > s["per_layer"]["conv1"]["fidelity"] + 0.1


# on real Fashion-MNIST, distill is more faithful than k-means with clusters about as compact,
# "high" neighbours share the query's prediction more often than raw-pixel neighbours, and
# trust signals flag the DNN's errors better than chance
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::actclust.DistillWarning")  # 6,000 samples: a short refinement
def test_fashion_distill_similar_trust():
    require_fashion_mnist()
    import faiss
    from sklearn.metrics import roc_auc_score

    model, x_tr, y_tr, x_te, y_te = _trained()
    km = ActivationClustering(model, LAYERS, n_clusters=15, progress=False).fit(x_tr, y_tr)
    ds = ActivationClustering(model, LAYERS, n_clusters=15, clustering="distill", progress=False).fit(x_tr, y_tr)
    assert ds.score(x_te)["fidelity"] > km.score(x_te)["fidelity"] + 0.02
    assert max(ds.fit_info_["distill"]["spread_ratio"].values()) <= 1.25

    pred = model(torch.as_tensor(x_te[:300])).argmax(1).numpy()
    high = ds.similar(x_te[:300], k=10, weights="high").indices
    index = faiss.IndexFlatL2(784)
    index.add(x_tr.reshape(len(x_tr), -1))
    raw = index.search(x_te[:300].reshape(300, -1), 10)[1]
    same = lambda idx: (ds.train_predictions_[idx] == pred[:, None]).mean()  # noqa: E731
    assert same(high) > same(raw) + 0.05

    t = ds.trust(x_te)
    wrong = t["dnn_prediction"] != y_te
    assert roc_auc_score(~wrong, t["credibility"]) > 0.75
