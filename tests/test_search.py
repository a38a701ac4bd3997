"""Approximate similar-sample search against exact search, and the choice between them."""

import numpy as np
import pytest

from actclust import ParameterError
from actclust.analysis.retrieval import (AUTO_EXACT_ROWS, ApproximateIndex, Index, layer_stats, layer_weights,
                                resolve_search)


def _clustered_vectors(n, widths=(16, 32, 64), n_clusters=60, seed=0):
    """Unit-length layer vectors with cluster structure shared across layers (like activations)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, n)
    out = {}
    for j, d in enumerate(widths):
        centres = rng.standard_normal((n_clusters, d))
        v = centres[labels] + (0.6 + 0.3 * j) * rng.standard_normal((n, d))
        out[f"layer{j}"] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return out


# the IVF index of 8-bit codes, calibrated per weighting and re-ranked exactly, finds >= 95% of the exact
# 10 nearest of held-out queries, for every preset
def test_approximate_recall_against_exact():
    both = _clustered_vectors(20500)  # queries from the same distribution, not in the index
    train = {l: v[:20000] for l, v in both.items()}
    queries = {l: v[20000:] for l, v in both.items()}
    scales = layer_stats(train)
    exact, approx = Index(train, scales), ApproximateIndex(train, scales, random_state=0)
    assert all(p <= approx.nlist for p, _ in approx.settings.values())
    layers = list(train)
    for preset in ("equal", "low", "high"):
        w = layer_weights(preset, layers)
        e_idx, e_dist, _ = exact.search(queries, 10, w)
        a_idx, a_dist, _ = approx.search(queries, 10, w)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(a_idx, e_idx)])
        assert recall >= 0.95, (preset, recall)
        # what it returns is re-ranked by exact distance, so it is never closer than the truth
        assert np.all(a_dist[:, 0] >= e_dist[:, 0] - 1e-5) and np.all(np.diff(a_dist, axis=1) >= 0)


# the estimator's search parameter, per call and as a default; bad names are refused with the choices
def test_search_parameter(model, data):
    from actclust import ActivationClustering

    x = data[0]
    ac = ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=3, progress=False).fit(x)
    exact = ac.similar(x[:20], k=5, search="exact")
    approx = ac.similar(x[:20], k=5, search="approximate")
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx.indices, exact.indices)])
    assert overlap >= 0.8
    assert np.array_equal(ac.similar(x[:20], k=5).indices, exact.indices)  # "auto" on 120 samples: exact
    with pytest.raises(ParameterError, match=r"'search' parameter must be one of \['auto', 'exact', 'approximate'\]"):
        ac.similar(x[:2], search="fast")
    with pytest.raises(ParameterError, match=r"'search' parameter of ActivationClustering must be one of"):
        ActivationClustering(model, ["fc1"], search="ivf", progress=False).fit(x)
    es = ac.explain(x[:3], k=3, trust=False, search="approximate")
    assert len(es[0].similar["low"]) == 3


# "auto" is exact below the measured break-even size and approximate above it, on the host
def test_auto_threshold():
    assert resolve_search("auto", 1_797, 300) == "exact"  # scikit-learn's digits
    assert resolve_search("auto", 60_000, 266) == "approximate"  # Fashion-MNIST: summaries and 'mean' vectors
    assert resolve_search("auto", 54_000, 32) == "approximate"  # trust's search of one narrow layer
    assert resolve_search("auto", 1_281_167, 3840) == "approximate"  # ImageNet, ResNet-50 'mean'
    assert resolve_search("auto", AUTO_EXACT_ROWS, 1) == "approximate"
    assert resolve_search("auto", AUTO_EXACT_ROWS - 1, 10**4) == "exact"
    assert resolve_search("exact", 10**9, 10**3) == "exact"
