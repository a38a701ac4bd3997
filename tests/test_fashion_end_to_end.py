import numpy as np
import pytest

from actclust import ActivationClustering
from actclust.datasets import FASHION_MNIST_DIR, load_fashion_mnist
from actclust.models import accuracy, fashion_cnn, train_classifier


# on real Fashion-MNIST, a briefly trained CNN's surrogate agrees with it far above chance,
# and combining layers does at least as well as the best single layer minus a small margin
@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist is not installed")
def test_fashion_surrogate_is_faithful():
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    x_tr, y_tr, x_te, y_te = x_tr[:6000], y_tr[:6000], x_te[:1000], y_te[:1000]
    model = train_classifier(fashion_cnn(), x_tr, y_tr, epochs=1, batch_size=64, progress=False)
    assert accuracy(model, x_te, y_te) > 0.7
    ac = ActivationClustering(model, ["conv1", "conv2", "fc1", "fc2"], n_clusters=15, progress=False)
    s = ac.fit(x_tr, y_tr).score(x_te, y_te)
    best_layer = max(v["fidelity"] for v in s["per_layer"].values())
    assert s["fidelity"] > 0.75 and s["fidelity"] >= best_layer - 0.05
    assert np.allclose(ac.predict_proba(x_te[:50]).sum(1), 1, atol=1e-5)
