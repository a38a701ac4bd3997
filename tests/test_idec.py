"""Tests of the deep embedded clustering method (clustering="idec")."""

import numpy as np
import pytest

from conftest import sq_distances

from actclust.clustering.idec import IDEC, IDECTrainingError, IDECWarning
from actclust.clustering import make_clustering

FAST = {"pretrain_epochs": 2, "max_iter": 60, "update_interval": 20, "tol": 0.05, "max_samples": 1000}


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 8))
    labels = rng.integers(0, 3, size=600)
    return (centres[labels] + rng.normal(size=(600, 8))).astype(np.float32), labels


@pytest.fixture(scope="module")
def fitted(blobs):
    return IDEC(3, random_state=0, **FAST).fit(blobs[0])


def test_fit_finds_the_blobs(blobs, fitted):
    # Well separated blobs come out as the clusters (up to relabelling); sizes and scale are those
    # of the nearest centre in the embedding, recomputed by brute force.
    x, labels = blobs
    pred = fitted.predict(x)
    agree = max((pred == perm[labels]).mean() for perm in map(np.array, _perms(3)))
    assert agree > 0.95
    assert fitted.centers_.shape == (3, 8) and fitted.embedded_centers_.shape == (3, 10)
    d = sq_distances(fitted.embed(x), fitted.embedded_centers_)
    assert fitted.cluster_sizes_.tolist() == np.bincount(d.argmin(1), minlength=3).tolist()
    assert fitted.scale_ == pytest.approx(d.min(1).mean(), rel=1e-4)


def _perms(k):
    import itertools
    return itertools.permutations(range(k))


def test_distances_shape_and_chunking(blobs, fitted):
    # distances are squared embedding distances (n, k), the same in any chunking.
    x, _ = blobs
    d = fitted.distances(x)
    assert d.shape == (600, 3) and d.dtype == np.float32
    np.testing.assert_allclose(np.vstack([fitted.distances(x[:7]), fitted.distances(x[7:])]), d, rtol=1e-5)
    np.testing.assert_allclose(d, sq_distances(fitted.embed(x), fitted.embedded_centers_), rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_through_safetensors(blobs, fitted, tmp_path):
    # The state is plain numpy arrays (layer sizes as int64); reloaded, distances are identical.
    from safetensors.numpy import load_file, save_file

    state = fitted.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["layer_sizes"].dtype == np.int64 and state["layer_sizes"].tolist() == [8, 64, 10]
    save_file(state, str(tmp_path / "idec.safetensors"))
    other = make_clustering("idec", 3)
    other.load_state_dict(load_file(str(tmp_path / "idec.safetensors")))
    np.testing.assert_array_equal(other.distances(blobs[0]), fitted.distances(blobs[0]))
    np.testing.assert_array_equal(other.soft_assign(blobs[0], 0.5), fitted.soft_assign(blobs[0], 0.5))


def test_load_state_dict_refuses_mismatched_encoder(fitted):
    # Weights that do not fit the recorded layer sizes are refused, naming the layer.
    state = dict(fitted.state_dict())
    state["encoder.1.weight"] = state["encoder.1.weight"][:, :5]
    with pytest.raises(ValueError, match=r"IDEC encoder layer 1 has weight \(10, 5\).*need \(10, 64\)"):
        IDEC(3).load_state_dict(state)


def test_fit_is_deterministic(blobs, fitted):
    # Same seed, same model.
    again = IDEC(3, random_state=0, **FAST).fit(blobs[0])
    np.testing.assert_array_equal(again.embedded_centers_, fitted.embedded_centers_)


def test_non_convergence_warns_with_history(blobs):
    # Stopping while samples still change cluster warns, with the loss history.
    with pytest.warns(IDECWarning, match=r"did not converge in max_iter=20 steps.*its last clusters are used.*runs with their defaults.*Loss history: phase=pretrain"):
        c = IDEC(3, random_state=0, pretrain_epochs=1, max_iter=20, update_interval=10, tol=0.0).fit(blobs[0])
    assert not c.converged_ and c.distances(blobs[0]).shape == (600, 3)


def test_non_finite_loss_warns_and_raises(blobs):
    # A diverging loss is never kept: it warns with the history and raises.
    with (pytest.warns(IDECWarning, match=r"loss became non-finite. Loss history"),
          pytest.raises(IDECTrainingError, match=r"IDEC training failed: the pretraining loss became non-finite")):
        IDEC(3, lr=float("inf"), **FAST).fit(blobs[0])


def test_fit_input_errors(blobs):
    # Too few rows, wrong rank and non-finite values are refused with what to change.
    with pytest.raises(ValueError, match=r"at least n_clusters=3 rows; got shape \(2, 8\)"):
        IDEC(3).fit(blobs[0][:2])
    with pytest.raises(ValueError, match=r"got shape \(600,\)"):
        IDEC(3).fit(blobs[0][:, 0])
    x = blobs[0].copy()
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"IDEC got non-finite values in X"):
        IDEC(3).fit(x)


def test_make_clustering_names():
    # "idec" builds an IDEC; an unknown name lists the valid ones.
    c = make_clustering("idec", 4, 1)
    assert isinstance(c, IDEC) and c.n_clusters == 4 and c.random_state == 1
    with pytest.raises(ValueError, match=r"must be one of \['kmeans', 'idec', 'distill'\]. Got 'dec' instead"):
        make_clustering("dec", 4)


def test_explainer_with_idec_saves_and_loads(model, data, tmp_path):
    # clustering="idec" runs through ActivationClustering and a save/load round trip unchanged.
    import warnings

    import actclust
    from actclust import ActivationClustering

    x, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IDECWarning)  # 120 samples: convergence is not the point here
        ac = ActivationClustering(model, ["conv", "fc1"], n_clusters=3, clustering="idec", progress=False).fit(x, y)
    assert all(isinstance(c, IDEC) for c in ac.clusterings_.values())
    ac.save(tmp_path / "run")
    again = actclust.load(tmp_path / "run", model)
    np.testing.assert_array_equal(again.predict_proba(x), ac.predict_proba(x))
