import numpy as np
import pytest
import torch

from actclust.capture.reduction import make_reducer, normalized

T = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)


# mean and max pool every axis after the channel axis
def test_mean_and_max():
    assert torch.equal(make_reducer("mean")(T), T.mean((2, 3)))
    assert torch.equal(make_reducer("max")(T), T.amax((2, 3)))


# grid:g average-pools to g x g and flattens channel-major (the default g is 2)
def test_grid():
    blocks = T.numpy().reshape(2, 3, 2, 2, 2, 2).mean((3, 5))  # (n, channel, row block, column block)
    np.testing.assert_allclose(make_reducer("grid:2")(T).numpy(), blocks.reshape(2, 12), rtol=1e-6)
    np.testing.assert_allclose(make_reducer("grid")(T).numpy(), blocks.reshape(2, 12), rtol=1e-6)
    np.testing.assert_allclose(make_reducer("grid:1")(T).numpy(), T.numpy().mean((2, 3)), rtol=1e-6)


# dense (N, F) outputs pass through every pooling reducer unchanged
@pytest.mark.parametrize("spec", ["mean", "max", "grid:3"])
def test_dense_passes_through(spec):
    x = torch.randn(5, 7)
    assert make_reducer(spec)(x) is x


# random:d is a fixed linear projection to d values: same seed, same result; another seed, another
def test_random_projection_is_seeded():
    a, b = make_reducer("random:5", random_state=1), make_reducer("random:5", random_state=1)
    assert a(T).shape == (2, 5) and torch.equal(a(T), b(T))
    assert not torch.allclose(a(T), make_reducer("random:5", random_state=2)(T))
    torch.testing.assert_close(a(T[:1] + 2 * T[1:]), a(T[:1]) + 2 * a(T[1:]), rtol=1e-4, atol=1e-3)
    assert not torch.allclose(a(T)[0], a(T)[1])  # it reads the input


# pca:d fitted in a streaming way matches a batch PCA of the flattened maps (up to sign)
def test_streaming_pca_matches_batch_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((600, 2, 3, 3)).astype(np.float32) * np.geomspace(1, 60, 18, dtype=np.float32).reshape(1, 2, 3, 3))
    r = make_reducer("pca:3")
    for batch in x.split(100):
        r.partial_fit(batch)
    r.finish_fit()
    ours = r(x).numpy()
    ref = PCA(3).fit_transform(x.flatten(1).numpy())
    for j in range(3):
        assert abs(np.corrcoef(ours[:, j], ref[:, j])[0, 1]) > 0.99


# pca:d with fewer samples than d says how many it needs
def test_pca_too_few_samples():
    r = make_reducer("pca:8")
    r.partial_fit(torch.randn(3, 20))
    with pytest.raises(ValueError, match="needs at least 8 samples"):
        r.finish_fit()


# l2 normalisation divides each reduced vector by its length and leaves zero vectors at zero
def test_l2_normalized():
    f = normalized(make_reducer("mean"), "l2")
    out = f(torch.cat([T, torch.zeros(1, 3, 4, 4)]))
    mean = T.numpy().mean((2, 3))
    np.testing.assert_allclose(out[:2].numpy(), mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-6)
    assert torch.equal(out[2], torch.zeros(3))


# unknown or malformed reducer names get the parameter, the choices and the value
@pytest.mark.parametrize("spec, match", [
    ("avg", r"'reducer' parameter of ActivationClustering must be one of .*Got 'avg' instead"),
    ("mean:3", "takes no argument"),
    ("pca", "needs a dimension"),
    ("grid:0", "positive integer"),
])
def test_bad_reducer_names(spec, match):
    with pytest.raises(ValueError, match=match):
        make_reducer(spec)


# grid on a map that is neither 3-D nor 4-D says which reducers fit
def test_grid_on_5d_map():
    with pytest.raises(ValueError, match="needs maps of shape"):
        make_reducer("grid:2")(torch.randn(2, 3, 2, 2, 2))


# the retrieval summaries' projection: fixed signs +-1/8, balanced, different per seed, and it keeps
# pairwise distances (Johnson-Lindenstrauss): ratios near 1 on random vectors
def test_sign_projection_keeps_distances():
    from actclust.capture.reduction import SUMMARY_DIMS, sign_projection

    p = sign_projection(1536, 7)
    assert p.shape == (1536, SUMMARY_DIMS)
    assert set(p.unique().tolist()) == {-0.125, 0.125}
    assert 0.45 < float((p > 0).float().mean()) < 0.55
    assert torch.equal(p, sign_projection(1536, 7)) and not torch.equal(p, sign_projection(1536, 8))
    x = torch.randn(100, 1536, generator=torch.Generator().manual_seed(0))
    d0, d1 = torch.cdist(x, x), torch.cdist(x @ p, x @ p)
    off = ~torch.eye(100, dtype=torch.bool)
    ratio = d1[off] / d0[off]
    assert 0.9 < float(ratio.mean()) < 1.1 and float(ratio.std()) < 0.15


# a conv map is pooled to the grid, and projected to SUMMARY_DIMS values only when wider
def test_spatial_summary_widths():
    from actclust.capture.reduction import SUMMARY_DIMS, spatial_summary

    summarize = spatial_summary(4, seed=3)
    narrow = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = summarize(narrow)
    assert out.shape == (2, 48)
    assert torch.allclose(out[0, 0], narrow[0, 0, :2, :2].mean())  # first channel, first cell
    assert summarize(torch.randn(2, 32, 8, 8)).shape == (2, SUMMARY_DIMS)
    assert summarize(torch.randn(2, 5)) is None  # dense output: no layout to keep
