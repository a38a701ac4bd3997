"""Reducers, written once for every framework: the same map gives the same vector as a NumPy array and
as a PyTorch tensor, channels-first or channels-last."""

import numpy as np
import pytest
import torch

from actclust import DataError
from actclust.capture.arrays import NUMPY
from actclust.capture.reduction import describe, make_reducer, normalized

T = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
A = T.numpy()
FRAMEWORKS = [pytest.param(lambda a: torch.from_numpy(np.ascontiguousarray(a)), id="torch"),
              pytest.param(lambda a: np.ascontiguousarray(a), id="numpy")]


def _np(v):
    return v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


# mean and max pool every axis after the channel axis, in either framework
@pytest.mark.parametrize("to", FRAMEWORKS)
def test_mean_and_max(to):
    np.testing.assert_allclose(_np(make_reducer("mean")(to(A))), A.mean((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(_np(make_reducer("auto")(to(A))), A.mean((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(_np(make_reducer("max")(to(A))), A.max((2, 3)), rtol=1e-6)
    assert isinstance(make_reducer("mean")(to(A)), type(to(A)))  # computed where the map is


# grid:g average-pools to g x g and flattens channel-major (the default g is 2)
@pytest.mark.parametrize("to", FRAMEWORKS)
def test_grid(to):
    blocks = A.reshape(2, 3, 2, 2, 2, 2).mean((3, 5))  # (n, channel, row block, column block)
    np.testing.assert_allclose(_np(make_reducer("grid:2")(to(A))), blocks.reshape(2, 12), rtol=1e-6)
    np.testing.assert_allclose(_np(make_reducer("grid")(to(A))), blocks.reshape(2, 12), rtol=1e-6)
    np.testing.assert_allclose(_np(make_reducer("grid:1")(to(A))), A.mean((2, 3)), rtol=1e-6)


# NumPy's adaptive pooling has PyTorch's bins, also where the map does not divide evenly
@pytest.mark.parametrize("shape, g", [((2, 3, 7, 5), 3), ((2, 2, 9, 9), 4), ((3, 4, 11), 4)])
def test_numpy_pooling_equals_torch(shape, g):
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = (torch.nn.functional.adaptive_avg_pool2d if len(shape) == 4 else torch.nn.functional.adaptive_avg_pool1d)(
        torch.from_numpy(a), g).numpy()
    np.testing.assert_allclose(NUMPY.adaptive_avg_pool(a, g), ref, rtol=1e-5, atol=1e-6)


# PyTorch's own pooling on the CPU is matrix products (one for small maps, two for larger): the same bins as
# adaptive_avg_pool2d, divisible or not, for contiguous, channels-last and float64 maps, and for g larger than the map
@pytest.mark.parametrize("shape, g", [((2, 3, 28, 28), 4), ((2, 5, 14, 14), 4), ((3, 2, 7, 5), 3), ((1, 4, 17, 23), 4),
                                      ((2, 3, 3, 3), 4), ((2, 2, 40, 9), 2)])
def test_torch_pooling_equals_adaptive_avg_pool(shape, g):
    from actclust.adapters.torch_ops import OPS

    t = torch.from_numpy(np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    ref = torch.nn.functional.adaptive_avg_pool2d(t, g)
    for x in (t, t.to(memory_format=torch.channels_last), t.double()):
        out = OPS.adaptive_avg_pool(x, g)
        assert out.shape == ref.shape and out.dtype == x.dtype
        np.testing.assert_allclose(out.double().numpy(), ref.double().numpy(), rtol=1e-5, atol=1e-6)
    half = OPS.adaptive_avg_pool(t.bfloat16(), g)  # PyTorch's own pooling: no weights rounded to bfloat16
    assert torch.equal(half, torch.nn.functional.adaptive_avg_pool2d(t.bfloat16(), g))


# a channels-last map (Keras) gives the vector of the same map channels-first (PyTorch, ONNX), for every reducer
@pytest.mark.parametrize("spec", ["auto", "mean", "max", "grid:2", "random:5"])
@pytest.mark.parametrize("to", FRAMEWORKS)
def test_channels_last_equals_channels_first(spec, to):
    r = make_reducer(spec, random_state=1)
    first = r(to(A), layout="channels_first")
    last = r(to(np.moveaxis(A, 1, -1)), layout="channels_last")
    np.testing.assert_allclose(_np(last), _np(first), rtol=1e-5, atol=1e-4)


# a token map (N, T, D) is pooled over the tokens the mask keeps: padding does not move the vector
@pytest.mark.parametrize("spec", ["auto", "mean", "max", "token_mean"])
@pytest.mark.parametrize("to", FRAMEWORKS)
def test_tokens_pool_over_real_tokens(spec, to):
    rng = np.random.default_rng(0)
    t = rng.standard_normal((4, 6, 5)).astype(np.float32)
    mask = np.ones((4, 6), np.int64)
    padded = np.concatenate([t, rng.standard_normal((4, 3, 5)).astype(np.float32)], 1)
    pmask = np.concatenate([mask, np.zeros((4, 3), np.int64)], 1)
    r = make_reducer(spec)
    a = r(to(t), to(mask), layout="tokens")
    b = r(to(padded), to(pmask), layout="tokens")
    np.testing.assert_allclose(_np(b), _np(a), rtol=1e-6)
    expected = t.max(1) if spec == "max" else t.mean(1)
    np.testing.assert_allclose(_np(a), expected, rtol=1e-5)


# token_first takes each input's first real token: under left padding (GPT-2's) position 0 is padding, and every padded
# input got the same vector (an outside check); right padding and no mask: position 0, as before
@pytest.mark.parametrize("to", FRAMEWORKS)
def test_token_first_takes_the_first_real_token(to):
    rng = np.random.default_rng(0)
    t = rng.standard_normal((3, 5, 4)).astype(np.float32)
    left = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    r = make_reducer("token_first")
    np.testing.assert_array_equal(_np(r(to(t), to(left), layout="tokens")), t[[0, 1, 2], [2, 0, 4]])
    right = left[:, ::-1].copy()
    np.testing.assert_array_equal(_np(r(to(t), to(right), layout="tokens")), t[:, 0])
    np.testing.assert_array_equal(_np(r(to(t), None, layout="tokens")), t[:, 0])


# dense (N, F) outputs pass through every pooling reducer unchanged
@pytest.mark.parametrize("spec", ["auto", "mean", "max", "grid:3"])
def test_dense_passes_through(spec):
    x = torch.randn(5, 7)
    assert make_reducer(spec)(x) is x


# random:d is a fixed linear projection to d values: same seed, same result; another seed, another;
# the same in NumPy and PyTorch
def test_random_projection_is_seeded():
    a, b = make_reducer("random:5", random_state=1), make_reducer("random:5", random_state=1)
    assert a(T).shape == (2, 5) and torch.equal(a(T), b(T))
    assert not torch.allclose(a(T), make_reducer("random:5", random_state=2)(T))
    torch.testing.assert_close(a(T[:1] + 2 * T[1:]), a(T[:1]) + 2 * a(T[1:]), rtol=1e-4, atol=1e-3)
    assert not torch.allclose(a(T)[0], a(T)[1])  # it reads the input
    np.testing.assert_allclose(a(A), a(T).numpy(), rtol=1e-5)


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
    np.testing.assert_allclose(r(x.numpy()), ours, rtol=1e-4, atol=1e-4)


# pca:d with fewer samples than d says how many it needs
def test_pca_too_few_samples():
    r = make_reducer("pca:8")
    r.partial_fit(torch.randn(3, 20))
    with pytest.raises(ValueError, match="needs at least 8 samples"):
        r.finish_fit()


# l2 normalisation divides each reduced vector by its length and leaves zero vectors at zero
@pytest.mark.parametrize("to", FRAMEWORKS)
def test_l2_normalized(to):
    f = normalized(make_reducer("mean"), "l2")
    out = _np(f(to(np.concatenate([A, np.zeros((1, 3, 4, 4), np.float32)]))))
    mean = A.mean((2, 3))
    np.testing.assert_allclose(out[:2], mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-6)
    assert np.array_equal(out[2], np.zeros(3))
    # at any magnitude float32 holds: the squares of values near 1e19 overflowed (1e-25: underflowed), and such rows
    # came out as zeros, every sample in one cluster (an outside check)
    unit = mean[:2] / np.linalg.norm(mean[:2], axis=1, keepdims=True)
    for scale in (1e19, 1e30, 1e-25, 1e-38):
        scaled = _np(f(to((A * np.float32(scale)).astype(np.float32))))
        np.testing.assert_allclose(scaled, unit, rtol=1e-5, atol=1e-6)
    # float16 maps: zero rows stay zero (the floor of 1e-12 is 0 in float16, and 0 / 0 gave NaN: review)
    half = _np(f(to(np.concatenate([A, np.zeros((1, 3, 4, 4), np.float32)]).astype(np.float16))))
    assert half.dtype == np.float16 and np.array_equal(half[2], np.zeros(3))
    np.testing.assert_allclose(half[:2].astype(np.float32), unit, rtol=2e-3, atol=2e-3)


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


# a size larger than the map is refused before it costs memory (grid:1000 on an 8x8 map once took 22 GB)
@pytest.mark.parametrize("spec, match", [
    ("grid:1000", r"'grid:1000' pools to a 1000-cell grid, more than the map's 8x8 positions; use grid:g with g <= 8"),
    ("grid:9", r"more than the map's 8x8 positions"),
    ("random:512", r"'random:512' projects to 512 values, but the map has only 192; use random:d with d < 192"),
])
def test_sizes_larger_than_the_map(spec, match):
    with pytest.raises(DataError, match=match):
        make_reducer(spec)(np.zeros((2, 3, 8, 8), np.float32))
    r = make_reducer("pca:512")
    with pytest.raises(DataError, match=r"'pca:512' projects to 512 values, but the map has only 192"):
        r.partial_fit(np.zeros((2, 3, 8, 8), np.float32))


# the retrieval summaries' projection: fixed signs +-1/8, balanced, different per seed, the same in NumPy
# and PyTorch, and it keeps pairwise distances (Johnson-Lindenstrauss): ratios near 1 on random vectors
def test_sign_projection_keeps_distances():
    from actclust.capture.reduction import SUMMARY_DIMS, sign_projection

    p = sign_projection(1536, 7)
    assert p.shape == (1536, SUMMARY_DIMS)
    assert set(np.unique(p).tolist()) == {-0.125, 0.125}
    assert 0.45 < float((p > 0).mean()) < 0.55
    assert np.array_equal(p, sign_projection(1536, 7)) and not np.array_equal(p, sign_projection(1536, 8))
    assert np.array_equal(sign_projection(1536, 7, torch.zeros(1)).numpy(), p)
    x = np.random.default_rng(0).standard_normal((100, 1536))
    d0 = np.linalg.norm(x[:, None] - x[None], axis=2)
    y = x @ p
    d1 = np.linalg.norm(y[:, None] - y[None], axis=2)
    off = ~np.eye(100, dtype=bool)
    ratio = d1[off] / d0[off]
    assert 0.9 < float(ratio.mean()) < 1.1 and float(ratio.std()) < 0.15


# a conv map is pooled to the grid, and projected to SUMMARY_DIMS values only when wider
@pytest.mark.parametrize("to", FRAMEWORKS)
def test_spatial_summary_widths(to):
    from actclust.capture.reduction import SUMMARY_DIMS, spatial_summary

    summarize = spatial_summary(4, seed=3)
    narrow = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    out = _np(summarize(to(narrow)))
    assert out.shape == (2, 48)
    assert np.allclose(out[0, 0], narrow[0, 0, :2, :2].mean())  # first channel, first cell
    wide = np.random.default_rng(0).standard_normal((2, 32, 8, 8)).astype(np.float32)
    assert summarize(to(wide)).shape == (2, SUMMARY_DIMS)
    np.testing.assert_allclose(_np(summarize(to(np.moveaxis(wide, 1, -1)), layout="channels_last")),
                               _np(summarize(to(wide))), rtol=1e-5, atol=1e-5)
    assert summarize(to(np.zeros((2, 5), np.float32))) is None  # dense output: no layout to keep
    assert summarize(to(np.zeros((2, 3, 2, 2), np.float32))).shape == (2, 12)  # smaller than the grid: its own size


# what list_layers shows for each layout
def test_describe():
    r = make_reducer("auto")
    assert describe(r, "dense", (8, 10)) == "as is (dense)"
    assert describe(r, "channels_last", (8, 5, 5, 3)) == "mean over height and width"
    assert describe(make_reducer("grid:2"), "channels_first", (8, 3, 5, 5)) == "grid:2"
    assert describe(r, "tokens", (8, 12, 16)) == "mean over the tokens the attention mask keeps"
    # a projection reduces a dense output wider than d and keeps a narrower one whole: said of each
    assert describe(make_reducer("pca:100"), "dense", (8, 32)) == "as is (dense; 32 values, no more than pca:100)"
    assert describe(make_reducer("random:16"), "dense", (8, 32)) == "random:16 (from 32 values)"
    r = make_reducer("pca:100")
    r.partial_fit(np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32))
    r.finish_fit()
    assert r(np.zeros((2, 32), np.float32)).shape == (2, 32)  # what the description says: kept whole


# PyTorch: a 3-axis map is channels-first where a 1-D convolution, pooling or normalisation makes it, also after
# element-wise modules that keep it (ReLU, Dropout: they ran as token maps, averaged over the channels); other
# modules' 3-axis outputs (an Embedding's, a Linear's on tokens, and element-wise ones after them) are token maps
def test_torch_layouts_follow_element_wise_modules():
    import actclust
    from torch import nn

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.1), nn.Conv1d(8, 16, 3, padding=1),
                         nn.Sequential(nn.GELU()), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 2)).eval()
    shown = actclust.list_layers(conv, torch.randn(2, 1, 40))
    assert {n: i.layout for n, i in shown.items() if len(i) == 3} == {n: "channels_first" for n in "012345"} | {
        "4.0": "channels_first"}
    x = torch.randn(30, 1, 40)
    ac = actclust.ActivationClustering(conv, ["1", "4"], n_clusters=3, progress=False).fit(x)
    with torch.no_grad():
        relu = torch.relu(conv[0](x)).mean(2).numpy()
    relu /= np.linalg.norm(relu, axis=1, keepdims=True)  # normalize="l2", the default
    np.testing.assert_allclose(ac.train_vectors_["1"], relu, rtol=1e-5, atol=1e-6)
    assert ac.train_vectors_["4"].shape == (30, 16)
    tokens = nn.Sequential(nn.Embedding(10, 6), nn.ReLU(), nn.Linear(6, 5), nn.GELU(), nn.Dropout(0.1)).eval()
    shown = actclust.list_layers(tokens, torch.randint(0, 10, (2, 7)))
    assert {n: i.layout for n, i in shown.items()} == {n: "tokens" for n in "01234"}

    class ConvBlock(nn.Module):  # a Conformer's convolution module: tokens in, a Conv1d over time, tokens out
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.drop = nn.Conv1d(16, 16, 3, padding=1), nn.SiLU(), nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(self.act(self.conv(x.transpose(1, 2))).transpose(1, 2))
    block = nn.Sequential(nn.Linear(4, 16), ConvBlock()).eval()
    shown = actclust.list_layers(block, torch.randn(2, 20, 4))
    assert shown["1"].layout == "tokens" and shown["1.conv"].layout == "channels_first"


class _ConvModule(torch.nn.Module):
    """A Conformer's convolution module: tokens (N, T, 16) in, a Conv1d over time, tokens out (a transposed view of its
    map, or that view made contiguous)."""

    def __init__(self, contiguous=False):
        super().__init__()
        self.conv, self.act, self.contiguous = torch.nn.Conv1d(16, 16, 3, padding=1), torch.nn.SiLU(), contiguous

    def forward(self, x):
        y = self.act(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return y.contiguous() if self.contiguous else y


def _conformer(contiguous=False):
    """Tokens (N, T, 4) of any length T, the convolution module, then a head on the last time step."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), _ConvModule(contiguous), _Last(), nn.Linear(16, 3)).eval()


class _Last(torch.nn.Module):
    def forward(self, x):
        return x[:, -1]


# As many time steps as features, (N, 16, 16): the shape reads either way, and was read channels-first (each time
# step's mean over its features); the transposed view the block returns shows the tokens
def test_torch_tokens_as_long_as_wide_read_by_their_strides():
    import actclust

    model = _conformer()
    x = torch.randn(30, 16, 4)
    shown = actclust.list_layers(model, x[:2])
    assert shown["1"].layout == "tokens" and shown["1.conv"].layout == "channels_first"
    ac = actclust.ActivationClustering(model, ["1"], n_clusters=3, progress=False).fit(x)
    assert ac.state_.layouts["1"] == "tokens"
    np.testing.assert_allclose(ac.train_vectors_["1"], _token_means(model, x), rtol=1e-5, atol=1e-6)


def _token_means(model, x):
    """The convolution module's output averaged over the time steps, unit length: one value per feature."""
    with torch.no_grad():
        v = model[1](model[0](x)).mean(1).numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _lengths_loader(lengths):
    """Batches of 10 sequences of 4 features, each batch as long as ``lengths`` says, in order."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    return DataLoader([torch.randn(t, 4, generator=g) for t in lengths for _ in range(10)], batch_size=10)


# Made contiguous, (N, 16, 16) shows nothing: a batch of another length decides, before or after it; after it, the
# first batch was read channels-first and the vectors would mix two readings: refused, naming the layer
def test_torch_tokens_as_long_as_wide_follow_another_batch():
    import actclust
    from actclust.exceptions import CaptureError

    model = _conformer(contiguous=True)
    loader = _lengths_loader([20, 16, 16])
    ac = actclust.ActivationClustering(model, ["1"], n_clusters=3, progress=False).fit(loader)
    assert ac.state_.layouts["1"] == "tokens"
    expected = np.concatenate([_token_means(model, b) for b in loader])
    np.testing.assert_allclose(ac.train_vectors_["1"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(CaptureError, match=r"Layer '1' gave \(10, 20, 16\) in this batch, read as tokens \(N, T, D\), "
                                           r"but was read as a channels-first map \(N, C, L\) in the first batch"):
        actclust.ActivationClustering(_conformer(contiguous=True), ["1"], n_clusters=3,
                                      progress=False).fit(_lengths_loader([16, 20]))


# a ConvNeXt block's (N, H, W, C) maps, made by a LayerNorm over the channels or a Linear on them (through element-wise
# modules after them), are channels-last; the block, permuted back, is channels-first (they were all read
# channels-first, averaged over the width and channels); Hugging Face's ConvNeXt (its own LayerNorm, with a data_format,
# and its GELUActivation) the same
def test_torch_channels_last_maps_of_linear_and_layer_norm():
    import actclust
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.ln, self.pw, self.act = nn.Conv2d(3, 12, 3, padding=1), nn.LayerNorm(12), nn.Linear(12, 20), \
                nn.GELU()

        def forward(self, x):
            return self.act(self.pw(self.ln(self.conv(x).permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 3)).eval()
    x = torch.randn(40, 3, 6, 8)
    shown = actclust.list_layers(model, x[:2])
    assert {n: shown[n].layout for n in ("0.conv", "0.ln", "0.pw", "0.act", "0")} == {
        "0.conv": "channels_first", "0.ln": "channels_last", "0.pw": "channels_last", "0.act": "channels_last",
        "0": "channels_first"}
    ac = actclust.ActivationClustering(model, ["0.ln", "0.act", "0"], n_clusters=3, normalize=None,
                                       progress=False).fit(x)
    with torch.no_grad():
        ln = model[0].ln(model[0].conv(x).permute(0, 2, 3, 1))
        act = model[0].act(model[0].pw(ln))
    for name, want in (("0.ln", ln.mean((1, 2))), ("0.act", act.mean((1, 2))), ("0", act.mean((1, 2)))):
        np.testing.assert_allclose(ac.train_vectors_[name], want.numpy(), rtol=1e-5, atol=1e-6)

    from transformers import ConvNextConfig, ConvNextForImageClassification

    hf = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[12, 16], depths=[1, 1], num_stages=2,
                                                       num_labels=3, image_size=32)).eval()
    shown = actclust.list_layers(hf, torch.randn(2, 3, 32, 32))
    block = "convnext.encoder.stages.0.layers.0"
    assert {n: shown[f"{block}.{n}"].layout for n in ("dwconv", "layernorm", "pwconv1", "act", "pwconv2")} == {
        "dwconv": "channels_first", "layernorm": "channels_last", "pwconv1": "channels_last", "act": "channels_last",
        "pwconv2": "channels_last"}
    assert shown[block].layout == shown["convnext.encoder.stages.1.downsampling_layer.0"].layout == "channels_first"


# 1-D maps made by a GroupNorm, halved by a GLU over the channels, or turned from tokens by a transpose (a LayerNorm
# between two, as wav2vec 2.0's feature encoder does) are channels-first, and a Linear or LayerNorm itself is
# channels-last also in a map as high as it is wide (all were read the other way: an outside check of a model zoo)
def test_torch_maps_of_group_norms_gated_units_transposes_and_square_maps():
    import actclust
    from torch import nn

    class LayerNormConv(nn.Module):  # wav2vec 2.0's feat_extract_norm="layer" block
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.act = nn.Conv1d(4, 12, 3), nn.LayerNorm(12), nn.GELU()

        def forward(self, x):
            return self.act(self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.GroupNorm(2, 8), nn.Conv1d(8, 12, 1), nn.GLU(dim=1),
                          nn.Conv1d(6, 4, 1), LayerNormConv(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(12, 3)).eval()
    x = torch.randn(30, 4, 20)
    shown = actclust.list_layers(model, x[:2])
    assert {n: shown[n].layout for n in ("1", "3", "5", "5.act")} == {n: "channels_first" for n in ("1", "3", "5", "5.act")}
    ac = actclust.ActivationClustering(model, ["1", "3", "5"], n_clusters=3, normalize=None, progress=False).fit(x)
    with torch.no_grad():
        outs = [model[:2](x), model[:4](x), model[:6](x)]
    for name, out in zip(["1", "3", "5"], outs):
        np.testing.assert_allclose(ac.train_vectors_[name], out.mean(2).numpy(), rtol=1e-5, atol=1e-6)

    square = nn.Sequential(nn.Conv2d(3, 8, 1), _Permute(0, 2, 3, 1), nn.LayerNorm(8), nn.Linear(8, 8)).eval()
    shown = actclust.list_layers(square, torch.randn(2, 3, 8, 8))  # (N, 8, 8, 8): the shape reads either way
    assert shown["2"].layout == shown["3"].layout == "channels_last"


class _Permute(torch.nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


# nn.TransformerEncoder given its padding mask otherwise than as the batch's attention_mask: its nested tensors are
# averaged over each input's own tokens, so that a vector does not depend on the batch it was in (padded to the
# longest in the batch, it did: a norm ratio of 9/4 between batch sizes 12 and 2)
def test_nested_tensors_without_the_batch_mask_do_not_depend_on_the_batch():
    import actclust
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
            self.fc = nn.Linear(16, 3)

        def forward(self, x, lengths):
            pad = torch.arange(x.shape[1])[None] >= lengths[:, None]
            return self.fc(self.enc(x, src_key_padding_mask=pad)[:, 0])

    g = torch.Generator().manual_seed(0)
    x, lengths = torch.randn(24, 10, 16, generator=g), torch.randint(2, 10, (24,), generator=g)
    model = Encoder().eval()
    got = [actclust.ActivationClustering(model, ["enc.layers.0"], n_clusters=3, normalize=None, progress=False,
                                         batch_size=b).fit((x, lengths)).train_vectors_["enc.layers.0"] for b in (24, 2)]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-6)
    seen = []
    handle = model.enc.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            model(x, lengths)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
        handle.remove()
    keep = (torch.arange(10)[None] < lengths[:, None]).float()[:, :, None]
    np.testing.assert_allclose(got[0], ((seen[0] * keep).sum(1) / keep.sum(1)).numpy(), rtol=1e-4, atol=1e-5)


# transposed views that are tokens stay tokens: a ViT's patch embedding (a Conv2d's map flattened and transposed), a
# Linear over the token axis transposed back (a Mixer's token mixing), Hugging Face's ViT; only a LayerNorm's tokens
# transposed so that its features lie on axis 1 are a map (the rule that reads wav2vec 2.0's blocks took them all)
def test_torch_transposed_tokens_stay_tokens():
    import actclust
    from torch import nn

    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 16, 4, stride=4)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)  # (N, 16 patches, 16 features)

    class TokenMixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.norm(x).transpose(1, 2)).transpose(1, 2)

    torch.manual_seed(0)
    model = nn.Sequential(Patches(), TokenMixing(), nn.Flatten(), nn.Linear(256, 3)).eval()
    x = torch.randn(20, 3, 16, 16)
    shown = actclust.list_layers(model, x[:2])
    assert shown["0"].layout == shown["1"].layout == "tokens"
    ac = actclust.ActivationClustering(model, ["0", "1"], n_clusters=3, normalize=None, progress=False).fit(x)
    with torch.no_grad():
        for name, out in (("0", model[0](x)), ("1", model[:2](x))):
            np.testing.assert_allclose(ac.train_vectors_[name], out.mean(1).numpy(), rtol=1e-5, atol=1e-6)

    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=32, image_size=16, patch_size=4, num_labels=3)).eval()
    assert actclust.list_layers(vit, torch.randn(2, 3, 16, 16))["vit.embeddings.patch_embeddings"].layout == "tokens"
