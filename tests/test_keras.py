"""The Keras 3 adapter, on the JAX backend (set in conftest); the PyTorch backend in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras
from keras import layers

import actclust
from actclust import ActivationClustering, CaptureError, DataError, KerasAdapter, ParameterError, UnsupportedModelError
from actclust.adapters import adapt
from actclust.capture.reduction import make_reducer

from conftest import LAYERS, TinyCNN

HERE = Path(__file__).parent


def test_backend_is_jax():
    # the suite runs Keras on JAX (conftest sets it before any import of keras), as CI does
    assert keras.config.backend() == "jax"


# ---------------------------------------------------------------------------- models built here
def cnn(seed=0, sequential=False, softmax=False):
    """Conv2D (channels-last) -> BatchNorm -> ReLU -> pool -> flatten -> Dense -> Dense: 6x6x1 inputs, 3 classes."""
    keras.utils.set_random_seed(seed)
    stack = [layers.Conv2D(4, 3, padding="same", name="conv"), layers.BatchNormalization(name="bn"),
             layers.ReLU(name="relu"), layers.AveragePooling2D(3, name="pool"), layers.Flatten(name="flat"),
             layers.Dense(8, activation="relu", name="fc1"),
             layers.Dense(3, activation="softmax" if softmax else None, name="fc2")]
    if sequential:
        model = keras.Sequential([keras.Input((6, 6, 1))] + stack, name="seq")
    else:
        inp = keras.Input((6, 6, 1), name="image")
        x = inp
        for layer in stack:
            x = layer(x)
        model = keras.Model(inp, x, name="func")
    bn = model.get_layer("bn")  # moving statistics away from 0 and 1, so inference mode shows in the vectors
    bn.moving_mean.assign(np.full(4, 0.3, np.float32))
    bn.moving_variance.assign(np.full(4, 2.0, np.float32))
    return model


def nested(seed=0):
    """conv_a -> block (a functional model: conv_b -> relu_b) -> flat -> logits."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 1), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="conv_a")(inp)
    b_in = keras.Input((6, 6, 4))
    b = layers.ReLU(name="relu_b")(layers.Conv2D(4, 3, padding="same", name="conv_b")(b_in))
    block = keras.Model(b_in, b, name="block")
    x = layers.Flatten(name="flat")(block(x))
    return keras.Model(inp, layers.Dense(3, name="logits")(x), name="outer")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.standard_normal((120, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, 120)


def to_np(t):
    """A backend tensor as NumPy (detached on Keras's PyTorch backend)."""
    return keras.ops.convert_to_numpy(t)


def capture(model, x, layers_, reducer="auto", **kw):
    adapter = KerasAdapter(model, **kw)
    with adapter.runner({l: make_reducer(reducer) for l in adapter.resolve(layers_)}) as runner:
        return runner.run(x, "rows 0-9 of X")


def snapshot(model):
    return [(v.path, v.trainable, np.array(keras.ops.convert_to_numpy(v.value))) for v in model.weights], \
           [(l.name, l.trainable, len(l._inbound_nodes)) for l in model.layers]


def assert_unchanged(model, before):
    weights, flags = snapshot(model)
    assert [(p, t) for p, t, _ in weights] == [(p, t) for p, t, _ in before[0]]
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(weights, before[0]))
    assert flags == before[1]  # trainable flags, and no layer called again (no new graph node)


# ---------------------------------------------------------------------------- capture
@pytest.mark.parametrize("sequential", [False, True])
# captured vectors equal Keras's own sub-model outputs in inference mode (BatchNorm's moving statistics)
def test_capture_equals_manual_forward(images, sequential):
    model = cnn(sequential=sequential)
    x = images[0][:10]
    logits, out = capture(model, x, ["conv", "bn", "fc1", "fc2"])
    conv = to_np(model.get_layer("conv")(x))
    g = model.get_layer("bn")
    bn = (conv - 0.3) / np.sqrt(2.0 + g.epsilon) * g.gamma.numpy() + g.beta.numpy()
    np.testing.assert_allclose(out["conv"], conv.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(out["bn"], bn.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(logits, keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-5)
    np.testing.assert_allclose(out["fc2"], logits, atol=1e-6)
    assert out["fc1"].shape == (10, 8) and out["fc1"].dtype == np.float32


# list_layers gives Keras names in order (no InputLayer), and with a sample their shapes and layouts
def test_list_layers_names_and_shapes(images):
    model = cnn()
    assert actclust.list_layers(model) == ["conv", "bn", "relu", "pool", "flat", "fc1", "fc2"]
    info = actclust.list_layers(model, images[0][:4])
    assert list(info) == ["conv", "bn", "relu", "pool", "flat", "fc1", "fc2"]
    assert info["conv"] == (4, 6, 6, 4) and info["conv"].layout == "channels_last"
    assert info["pool"] == (4, 2, 2, 4) and info["flat"] == (4, 16) and info["flat"].layout == "dense"
    assert "mean over height and width" == info["relu"].reduction


# a channels-first Keras convolution (and the layers after it) are read channels-first
def test_channels_first_layers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2, 5, 5)), layers.Conv2D(3, 3, data_format="channels_first", name="c"),
                              layers.ReLU(name="r"), layers.Flatten(name="f"), layers.Dense(2, name="out")])
    a = KerasAdapter(model)
    assert [a.layout(n, 4, False) for n in ("c", "r")] == ["channels_first", "channels_first"]
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 5)).astype(np.float32)
    _, out = capture(model, x, ["r"])
    r = np.maximum(to_np(model.get_layer("c")(x)), 0)
    np.testing.assert_allclose(out["r"], r.mean((2, 3)), atol=1e-5)


# a layer's format is the nearest one before it along the graph, not in the order of model.layers: in two branches a
# ReLU after a channels-last Conv2D was read channels-first after the other branch's channels-first one (and a 1-D
# map's Dropout the reverse); a Permute that moves the channels axis turns the format (it was read channels-last)
def test_formats_follow_the_graph_and_permutes():
    keras.utils.set_random_seed(0)
    img = keras.Input((6, 6, 3), name="img")
    last = layers.Conv2D(5, 3, padding="same", name="conv_last")(img)
    first = layers.Conv2D(4, 3, padding="same", data_format="channels_first",
                          name="conv_first")(layers.Permute((3, 1, 2), name="to_cf")(img))
    relu, back = layers.ReLU(name="relu_last")(last), layers.Permute((2, 3, 1), name="to_cl")(first)
    seq = keras.Input((3, 10), name="seq")
    drop = layers.Dropout(0.1, name="drop_cf")(layers.Conv1D(4, 3, data_format="channels_first", name="c1_cf")(seq))
    swap = layers.Permute((2, 1), name="swap")(layers.Conv1D(4, 3, name="c1_cl")(layers.Permute((2, 1))(seq)))
    steps = layers.Dense(2, name="steps")(layers.Permute((2, 1), name="unswap")(swap))  # tokens of the 8 steps
    pooled = [layers.GlobalAveragePooling2D()(relu), layers.GlobalAveragePooling2D()(back),
              layers.GlobalAveragePooling1D(data_format="channels_first")(drop), layers.Flatten()(steps),
              layers.Flatten()(swap)]
    model = keras.Model([img, seq], layers.Dense(3, name="out")(layers.Concatenate()(pooled)))
    a = KerasAdapter(model)
    assert {n: a.layout(n, 4, False) for n in ("to_cf", "conv_first", "relu_last", "to_cl")} == {
        "to_cf": "channels_first", "conv_first": "channels_first", "relu_last": "channels_last", "to_cl": "channels_last"}
    assert {n: a.layout(n, 3, False) for n in ("drop_cf", "swap", "steps")} == {
        "drop_cf": "channels_first", "swap": "channels_first", "steps": "tokens"}
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 6, 6, 3)).astype(np.float32), rng.standard_normal((4, 3, 10)).astype(np.float32))
    names = ["relu_last", "to_cl", "drop_cf", "swap"]
    _, out = capture(model, x, names)
    inner = keras.Model(model.inputs, [model.get_layer(n).output for n in names])(list(x))
    want = [to_np(inner[0]).mean((1, 2)), to_np(inner[1]).mean((1, 2)), to_np(inner[2]).mean(2),
            to_np(inner[3]).mean(2)]
    for n, w in zip(names, want):
        np.testing.assert_allclose(out[n], w, atol=1e-5)


# the walk along the graph stops where the map does (a Dense on rows, a Flatten): a channels-first image branch no
# longer makes the token layers after its bottleneck channels-first; a Reshape keeps the format where it keeps the
# channels axis (a ViT's channels-first patches), and a map nothing before describes takes the format of the layer
# that reads it; a nested model is walked through, out of it and into it (an outside check of the walk)
def test_formats_across_bottlenecks_reshapes_and_nested_models():
    keras.utils.set_random_seed(0)
    img, ids = keras.Input((3, 8, 8), name="img"), keras.Input((6,), dtype="int32", name="ids")
    pooled = layers.GlobalAveragePooling2D(data_format="channels_first")(
        layers.Conv2D(4, 3, data_format="channels_first", name="conv_cf")(img))
    img_tok = layers.Reshape((1, 16), name="img_tok")(layers.Dense(16)(pooled))
    toks = layers.Concatenate(axis=1, name="cat")([img_tok, layers.Embedding(50, 16, name="emb")(ids)])
    att = layers.LayerNormalization(name="ln")(layers.MultiHeadAttention(2, 8, name="mha")(toks, toks))
    patches = layers.Reshape((4, 36), name="patches")(layers.Conv2D(4, 3, data_format="channels_first",
                                                                     name="patch_cf")(img))  # (N, C, H W)
    as_tokens = layers.Permute((2, 1), name="as_tokens")(patches)
    grid = layers.Reshape((2, 4, 4), name="grid")(layers.Dense(32)(pooled))  # read by a channels-first Conv2D next
    after = layers.Conv2D(3, 3, padding="same", data_format="channels_first", name="reads_cf")(
        layers.ReLU(name="grid_relu")(grid))
    block = keras.Sequential([keras.Input((8, 8, 3)), layers.Permute((3, 1, 2), name="to_cf"),
                              layers.Conv2D(5, 3, padding="same", data_format="channels_first", name="inner_cf")],
                             name="block")
    nested = layers.ReLU(name="after_block")(block(layers.Permute((2, 3, 1), name="to_cl")(img)))
    heads = [layers.GlobalAveragePooling1D()(att), layers.GlobalAveragePooling1D()(as_tokens),
             layers.Flatten()(after), layers.Flatten()(nested)]
    model = keras.Model([img, ids], layers.Dense(3)(layers.Concatenate()(heads)))
    a = KerasAdapter(model)
    assert {n: a.layout(n, 3, False) for n in ("img_tok", "cat", "emb", "mha", "ln", "patches", "as_tokens")} == {
        "img_tok": "tokens", "cat": "tokens", "emb": "tokens", "mha": "tokens", "ln": "tokens",
        "patches": "channels_first", "as_tokens": "tokens"}
    assert {n: a.layout(n, 4, False) for n in ("grid", "grid_relu", "to_cl", "block", "block/to_cf", "block/inner_cf",
                                                "after_block")} == {
        "grid": "channels_first", "grid_relu": "channels_first", "to_cl": "channels_last", "block": "channels_first",
        "block/to_cf": "channels_first", "block/inner_cf": "channels_first", "after_block": "channels_first"}
    rng = np.random.default_rng(0)
    x = {"img": rng.standard_normal((4, 3, 8, 8)).astype(np.float32), "ids": rng.integers(0, 50, (4, 6)).astype(np.int32)}
    _, out = capture(model, x, ["mha", "after_block"])
    inner = keras.Model(model.inputs, [model.get_layer("mha").output, model.get_layer("after_block").output])(x)
    np.testing.assert_allclose(out["mha"], to_np(inner[0]).mean(1), atol=1e-5)
    np.testing.assert_allclose(out["after_block"], to_np(inner[1]).mean((2, 3)), atol=1e-5)


# token maps (N, T, D) of non-convolutional layers are pooled over the tokens a dict's padding mask keeps
def test_token_maps_use_the_padding_mask():
    keras.utils.set_random_seed(0)
    ids = keras.Input((5,), dtype="int32", name="token_ids")
    mask = keras.Input((5,), dtype="int32", name="padding_mask")
    h = layers.Dense(4, name="proj")(layers.Embedding(10, 6, name="emb")(ids))
    pooled = layers.GlobalAveragePooling1D(name="gap")(h)
    model = keras.Model({"token_ids": ids, "padding_mask": mask}, layers.Dense(2, name="out")(pooled))
    x = {"token_ids": np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], np.int32),
         "padding_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)}
    assert KerasAdapter(model).layout("proj", 3, True) == "tokens"
    _, out = capture(model, x, ["proj"])
    h = to_np(keras.Model(model.input, model.get_layer("proj").output)(x))
    np.testing.assert_allclose(out["proj"][0], h[0, :3].mean(0), atol=1e-5)
    np.testing.assert_allclose(out["proj"][1], h[1].mean(0), atol=1e-5)


# an Embedding(mask_zero=True) masks its input's zeros: token maps as long are pooled over the real tokens, as Keras
# pools them, with no mask in the batch (the only way the command line feeds ids); they averaged the padding in, without
# a word (an outside check); list_layers says they are masked
def test_mask_zero_embedding_masks_the_token_maps():
    keras.utils.set_random_seed(0)
    ids = keras.Input((5,), dtype="int32", name="token_ids")
    h = layers.Dense(4, name="proj")(layers.Embedding(10, 6, mask_zero=True, name="emb")(ids))
    model = keras.Model(ids, layers.Dense(2, name="out")(layers.GlobalAveragePooling1D(name="gap")(h)))
    x = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], np.int32)
    assert KerasAdapter(model).zero_masked_input() == 0
    _, out = capture(model, x, ["proj", "gap"])
    h = to_np(keras.Model(model.input, model.get_layer("proj").output)(x))
    np.testing.assert_allclose(out["proj"][0], h[0, :3].mean(0), atol=1e-5)
    np.testing.assert_allclose(out["proj"][1], h[1].mean(0), atol=1e-5)
    np.testing.assert_allclose(out["proj"], out["gap"], atol=1e-5)  # what Keras' own pooling gives
    assert actclust.list_layers(model, x)["proj"].reduction == "mean over the tokens the attention mask keeps"
    plain = keras.Model(ids, layers.Dense(2)(layers.GlobalAveragePooling1D()(layers.Embedding(10, 6)(ids))))
    assert KerasAdapter(plain).zero_masked_input() is None  # no mask_zero: nothing derived


# a Masking layer on the model's input masks the steps whose every value is its mask_value, as Keras does: they were
# averaged in, without a word (an outside check)
def test_masking_layer_masks_the_token_maps():
    keras.utils.set_random_seed(0)
    seq = keras.Input((6, 3), name="seq")
    h = layers.LSTM(4, return_sequences=True, name="lstm")(layers.Masking(0.0, name="mask")(seq))
    model = keras.Model(seq, layers.Dense(2, name="out")(layers.GlobalAveragePooling1D(name="gap")(h)))
    x = np.random.default_rng(0).standard_normal((3, 6, 3)).astype(np.float32)
    x[0, 3:] = 0
    x[1, 5:] = 0
    assert KerasAdapter(model).zero_masked_input() == 0
    _, out = capture(model, x, ["mask", "lstm", "gap"])
    np.testing.assert_allclose(out["mask"][0], x[0, :3].mean(0), atol=1e-5)
    np.testing.assert_allclose(out["mask"][1], x[1, :5].mean(0), atol=1e-5)
    np.testing.assert_allclose(out["mask"][2], x[2].mean(0), atol=1e-5)
    np.testing.assert_allclose(out["lstm"], out["gap"], atol=1e-5)  # what Keras' own masked pooling gives
    assert actclust.list_layers(model, x)["lstm"].reduction == "mean over the tokens the attention mask keeps"


# layers of a nested model are named outer/inner, captured through the outer graph, and a bare name resolves
def test_nested_model(images):
    model = nested()
    a = KerasAdapter(model)
    assert a.layer_names() == ["conv_a", "block", "block/conv_b", "block/relu_b", "flat", "logits"]
    assert a.resolve(["relu_b", "block/conv_b", "block"]) == ["block/relu_b", "block/conv_b", "block"]
    before = snapshot(model)
    x = images[0][:10]
    _, out = capture(model, x, ["block/relu_b", "conv_a", "block"])
    conv_a = to_np(model.get_layer("conv_a")(x))
    relu_b = np.maximum(to_np(model.get_layer("block").get_layer("conv_b")(conv_a)), 0)
    np.testing.assert_allclose(out["block/relu_b"], relu_b.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(out["block"], out["block/relu_b"], atol=1e-6)
    assert actclust.list_layers(model, x)["block/conv_b"] == (10, 6, 6, 4)
    assert_unchanged(model, before)


# a bare inner name found in two nested models is refused, naming both paths
def test_ambiguous_bare_name():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    blocks = []
    for name in ("b1", "b2"):
        i = keras.Input((4,))
        blocks.append(keras.Model(i, layers.Dense(4, name="d")(i), name=name))
    model = keras.Model(inp, layers.Dense(2, name="out")(blocks[1](blocks[0](inp))))
    with pytest.raises(ParameterError, match=r"'d' is ambiguous: the model has \['b1/d', 'b2/d'\]; give the full path"):
        ActivationClustering(model, ["d"], progress=False).fit(np.zeros((8, 4), np.float32))


# a model with two inputs is fed a dict by input name; a single array or a missing key is refused first
def test_multi_input_dict():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = layers.Dense(5, activation="relu", name="h")(layers.Concatenate(name="cat")([a, b]))
    model = keras.Model({"a": a, "b": b}, layers.Dense(3, name="out")(h))
    rng = np.random.default_rng(0)
    x = {"a": rng.standard_normal((60, 3)).astype(np.float32), "b": rng.standard_normal((60, 2)).astype(np.float32)}
    ac = ActivationClustering(model, ["h", "out"], n_clusters=3, progress=False).fit(x)
    assert ac.predict(x).shape == (60,)
    with pytest.raises(DataError, match=r"X is a single array but the model takes 2 inputs \['a', 'b'\]: pass a dict"):
        ActivationClustering(model, ["h"], n_clusters=3, progress=False).fit(x["a"])
    with pytest.raises(DataError, match=r"takes the inputs \['a', 'b'\]; missing \['b'\]; not inputs of the model: \['c'\]"):
        ActivationClustering(model, ["h"], n_clusters=3, progress=False).fit({"a": x["a"], "c": x["b"]})


# ---------------------------------------------------------------------------- models that cannot be explained
# a subclassed model is refused, saying why and what to do
def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = layers.Dense(3)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(np.zeros((1, 4), np.float32))
    with pytest.raises(UnsupportedModelError, match=r"Net is a subclassed keras.Model: .* cannot be reached. Build "
                                                    r"the same network with the functional API .* export it to ONNX"):
        ActivationClustering(net, ["fc"], progress=False).fit(np.zeros((4, 4), np.float32))


# a Sequential model never built is refused, saying to call it once or build it
def test_unbuilt_model_is_refused():
    model = keras.Sequential([layers.Dense(4, name="d"), layers.Dense(2, name="out")])
    with pytest.raises(UnsupportedModelError, match=r"has not been built.*call it once on a batch \(model\(x\[:1\]\)\), "
                                                    r"or build it with model.build"):
        actclust.list_layers(model)


# a TensorFlow SavedModel folder, a missing .keras file and an unknown layer are refused with what to do
def test_bad_model_paths_and_names(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="is a TensorFlow SavedModel.*save it as .keras.*export it to ONNX"):
        actclust.list_layers(str(tmp_path / "saved"))
    with pytest.raises(actclust.DataNotFoundError, match="No Keras model file at"):
        actclust.list_layers(tmp_path / "missing.keras")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")  # Keras said "File not found" of it (an outside check)
    with pytest.raises(UnsupportedModelError, match=r"bad.keras is not a Keras model file: a .keras file is a zip "
                                                    r"archive \(as model.save\('model.keras'\) writes it\), and this "
                                                    "one is not \\(an ONNX model\\? name it .onnx\\)"):
        actclust.list_layers(tmp_path / "bad.keras")
    import zipfile

    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as z:  # a zip, but no model in it: Keras' own words
        z.writestr("notes.txt", "hello")
    with pytest.raises(UnsupportedModelError, match="Keras could not load .*empty.keras"):
        actclust.list_layers(tmp_path / "empty.keras")
    with pytest.raises(ParameterError, match=r"Unknown layer 'fc3'.*Did you mean 'fc2'"):
        ActivationClustering(cnn(), ["fc3"], progress=False).fit(np.zeros((4, 6, 6, 1), np.float32))


# a .keras file is loaded (safe mode) once, and explains as the model it holds
def test_keras_file(tmp_path, images):
    model = cnn()
    model.save(tmp_path / "cnn.keras")
    a = adapt(str(tmp_path / "cnn.keras"))
    assert a.model is adapt(tmp_path / "cnn.keras").model  # loaded once for the same file
    assert a.layer_names() == KerasAdapter(model).layer_names()
    assert a.fingerprint() == KerasAdapter(model).fingerprint()
    np.testing.assert_allclose(capture(a.model, images[0][:5], ["relu"])[1]["relu"],
                               capture(model, images[0][:5], ["relu"])[1]["relu"], atol=1e-6)


# ---------------------------------------------------------------------------- bad inputs, bad outputs
# inputs Keras casts to the model's input type, losing what it cannot hold: fractional values to integer ids became
# other ids, values past float16's range infinite, blamed on a layer (an outside check); both refused, naming them
def test_casts_that_lose_values_refused():
    keras.utils.set_random_seed(0)
    tok = keras.Input((5,), dtype="int32", name="ids")
    ids_model = keras.Model(tok, layers.Dense(3)(layers.GlobalAveragePooling1D()(layers.Embedding(20, 4, name="emb")(tok))))
    ids = np.random.default_rng(0).integers(1, 20, (40, 5))
    with pytest.raises(DataError, match=r"X holds fractional values but the model's input 'ids' is int32 \(token ids, "
                                        r"indices\): pass the integers"):
        ActivationClustering(ids_model, ["emb"], n_clusters=3, progress=False).fit(ids * 0.3)
    assert ActivationClustering(ids_model, ["emb"], n_clusters=3, progress=False).fit(
        ids.astype(np.float32)).state_.n_samples == 40  # whole numbers as floats: cast
    x = keras.Input((4,), dtype="float16", name="x")
    half = keras.Model(x, layers.Dense(3, dtype="float16")(layers.Dense(8, name="h", dtype="float16")(x)))
    big = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    big[7, 1] = 1e6
    with pytest.raises(DataError, match=r"Row 7 of rows 0-39 of X, input 'x', holds values beyond the range of the "
                                        r"model's float16 input \(largest 65504\)"):
        ActivationClustering(half, ["h"], n_clusters=3, progress=False).fit(big)


# uint8 inputs to a model that scales its own (a Rescaling layer): the advice is to cast alone; dividing by 255 as it
# said scaled them twice (an outside check: accuracy 0.96 -> 0.10)
def test_uint8_to_a_rescaling_model_says_cast_alone():
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="pixels")
    model = keras.Model(x, layers.Dense(2, activation="softmax")(layers.Rescaling(1 / 255, name="rescale")(x)))
    with pytest.raises(DataError, match=r"X holds uint8 values \(raw image bytes\?\): convert to float with "
                                        r"x.astype\('float32'\) alone: the model's 'rescale' layer scales them itself, "
                                        r"so do not divide them by 255"):
        ActivationClustering(model, ["rescale"], n_clusters=2, progress=False).fit(np.zeros((8, 4), np.uint8))


@pytest.mark.parametrize("make, match", [
    (lambda x: (x * 255).astype(np.uint8), r"X holds uint8 values \(raw image bytes\?\): convert to float"),
    (lambda x: x.astype(np.int64), r"X holds int64 values but the model's input 'image' is float32 and the model has "
                                   r"no Embedding layer"),
    (lambda x: np.moveaxis(x, -1, 1), r"X has samples of shape \(1, 6, 6\), but the model's input 'image' takes samples "
                                      r"of shape \(6, 6, 1\).*channels-last images \(N, H, W, C\): np.moveaxis"),
    (lambda x: x[..., 0], r"samples of shape \(6, 6\).*Add the channel axis: x\[..., None\]"),
    (lambda x: x[:, :5], r"X has samples of shape \(5, 6, 1\), but the model's input 'image' takes samples of shape "
                         r"\(6, 6, 1\)"),
])
# inputs the model cannot take are refused before any forward pass, naming what to do
def test_bad_inputs(images, make, match):
    model = cnn()
    with pytest.raises(DataError, match=match):
        ActivationClustering(model, ["fc1"], n_clusters=2, progress=False).fit(make(images[0][:8]))


# an error inside the model becomes a CaptureError naming the rows and shapes, with the original as cause
def test_model_error_is_wrapped():
    class Boom(layers.Layer):
        def call(self, x):
            return x

        def compute_output_spec(self, x):
            return keras.KerasTensor(x.shape, x.dtype)

    inp = keras.Input((4,))
    model = keras.Model(inp, layers.Dense(2, name="out")(Boom(name="boom")(inp)))
    boom = model.get_layer("boom")
    boom.call = lambda x: (_ for _ in ()).throw(RuntimeError("kaboom"))
    with pytest.raises(CaptureError, match=r"(?s)The model raised RuntimeError on rows 0-9 of X \(shape \(10, 4\), "
                                           r"float32\): .*kaboom.* -- check that the inputs") as e:
        capture(model, np.zeros((10, 4), np.float32), ["out"])
    assert isinstance(e.value.__cause__, RuntimeError)


# NaN activations name the first layer that had them and the row
def test_nan_activations_name_the_layer(images):
    model = cnn()
    x = images[0][:10].copy()
    model.get_layer("fc1").kernel.assign(np.full((16, 8), np.nan, np.float32))
    with pytest.raises(CaptureError, match=r"activations of layer 'fc1' contain NaN or infinite values at row 0 of "
                                           r"rows 0-9 of X \(and 9 more rows\)"):
        capture(model, x, ["conv", "fc1"])


# an output that is not (N, n_classes), or a layer without one row per sample, is refused with its shape
def test_bad_outputs():
    inp = keras.Input((4,))
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="p")(inp))
    with pytest.raises(CaptureError, match=r"logits of shape \(N, n_classes\).*returned shape \(3, 1\). A single sigmoid"):
        capture(model, np.zeros((3, 4), np.float32), ["p"])
    # several outputs, the first one not the classifier's: the message names the one taken and how to choose
    heads = keras.Model(inp, {"aux": layers.Dense(1, name="aux")(inp), "cls": layers.Dense(3, name="cls")(inp)})
    with pytest.raises(CaptureError, match=r"returned shape \(3, 1\) \(its output 'aux' \(of \['aux', 'cls'\]\)\)\. "
                                           r"Pass output=<function of the outputs"):
        capture(heads, np.zeros((3, 4), np.float32), ["cls"])
    # the first of several outputs is (N, C) but may not be the classifier's: read, and said once
    two = keras.Model(inp, [layers.Dense(5, name="emb")(inp), layers.Dense(2, name="cls2")(inp)])
    with pytest.warns(actclust.ActClustWarning, match=r"several outputs; actclust reads the logits from its first output "
                                                      r"\(of 2\), of shape \(3, 5\). If that is not the classifier's"):
        capture(two, np.zeros((3, 4), np.float32), ["emb"])

    class BatchMean(layers.Layer):
        def call(self, x):
            return keras.ops.mean(x, axis=0)

    h = BatchMean(name="batch_mean")(inp)
    model = keras.Model(inp, layers.Dense(2, name="out")(inp + keras.ops.sum(h)))
    with pytest.raises(CaptureError, match=r"'batch_mean' output shape \(4,\) for a batch of 3: not one row per sample"):
        capture(model, np.ones((3, 4), np.float32), ["batch_mean"])


# ---------------------------------------------------------------------------- probabilities
# a softmax output is read as log-probabilities: predictions and confidences are the model's own
def test_probabilities_become_log_probabilities(images):
    x = images[0][:40]
    probs_model, logits_model = cnn(softmax=True), cnn()
    probs = keras.ops.convert_to_numpy(probs_model(x, training=False))
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    logits, _ = capture(probs_model, x, ["fc1"])
    np.testing.assert_allclose(logits, np.log(probs), atol=1e-5)
    ref, _ = capture(logits_model, x, ["fc1"])  # same weights without the softmax
    shift = logits - ref  # log softmax(z) = z - logsumexp(z): one constant per row
    np.testing.assert_allclose(shift - shift[:, :1], 0, atol=1e-4)
    # an output= giving probabilities is detected by its rows; a logits output is left as it is
    given, _ = capture(logits_model, x, ["fc1"], output=lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True))
    np.testing.assert_allclose(given, np.log(probs), atol=1e-5)
    ac = ActivationClustering(probs_model, ["fc1", "fc2"], n_clusters=3, progress=False).fit(images[0])
    np.testing.assert_array_equal(ac.query(x).dnn_pred, probs.argmax(1))
    np.testing.assert_allclose(ac.query(x).dnn_proba, probs, atol=1e-5)
    trust = ac.trust(x, calibration=images[0][40:])
    np.testing.assert_allclose(trust["dnn_confidence"], probs.max(1), atol=1e-5)


# ---------------------------------------------------------------------------- end to end
# fit, score, similar, explain, trust, save, load and report on a functional CNN; the model is left as it was
def test_end_to_end(tmp_path, images):
    x, y = images
    model = cnn(seed=1)
    before = snapshot(model)
    ac = ActivationClustering(model, ["conv", "relu", "fc1", "fc2"], n_clusters=4, progress=False).fit(x, y)
    assert ac.state_.layouts["conv"] == "channels_last"
    scores = ac.score(x[:40], y[:40])
    assert 0 <= scores["fidelity"] <= 1 and set(scores["per_layer"]) == {"conv", "relu", "fc1", "fc2"}
    assert ac.similar(x[:3], k=4).indices[:, 0].tolist() == [0, 1, 2]
    cards = ac.explain(x[:2], y[:2], k=3)
    assert len(cards) == 2 and cards[0].meta["model_class"].endswith("Functional")
    assert set(ac.trust(x[:5], calibration=x[:40])) >= {"dnn_confidence"}
    own = {"n_neighbors": 5, "calibration_fraction": 0.5}  # calibrated on the run's own split: kept with it
    signals = ac.trust(x[:5], **own)
    ac.save(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["state"]["framework"] == "keras" and manifest["model_fingerprint"] == actclust.model_fingerprint(model)
    assert manifest["trust_calibration"]["n_neighbors"] == 5
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    np.testing.assert_allclose(loaded.predict_proba(x[:20]), ac.predict_proba(x[:20]), atol=1e-6)
    assert loaded.state_.cache["trust"].restored  # read back, not searched again
    again = loaded.trust(x[:5], **own)
    for k in signals:
        np.testing.assert_allclose(again[k], signals[k], atol=1e-6, err_msg=k)
    model.save(tmp_path / "cnn.keras")
    from_file = actclust.load(tmp_path / "run", str(tmp_path / "cnn.keras"), progress=False)
    np.testing.assert_allclose(from_file.predict_proba(x[:20]), ac.predict_proba(x[:20]), atol=1e-6)
    page = actclust.report(ac, x[:30], y[:30], train=x, out=tmp_path / "report.html", n_correct=2, n_wrong=2)
    assert "<html" in page.read_text()[:500].lower()
    assert_unchanged(model, before)


# a keras PyDataset of (x, y) batches fits as the arrays do, and its samples can be taken by position
def test_pydataset(images):
    x, y = images

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[i * 50:(i + 1) * 50], y[i * 50:(i + 1) * 50]

    model = cnn()
    a = ActivationClustering(model, ["relu", "fc1"], n_clusters=3, posterior="label", progress=False).fit(Batches())
    b = ActivationClustering(model, ["relu", "fc1"], n_clusters=3, posterior="label", progress=False).fit(x, y)
    np.testing.assert_allclose(a.train_vectors_["fc1"], b.train_vectors_["fc1"], atol=1e-6)
    np.testing.assert_array_equal(a.train_labels_, y)
    from actclust.capture.data import rows

    got = rows(Batches(), np.array([70, 3, 119]))
    np.testing.assert_array_equal(np.stack(got), x[[70, 3, 119]])


# ---------------------------------------------------------------------------- fingerprints and dependencies
# the fingerprint depends on every weight value and not on how the model was built (functional or Sequential)
def test_fingerprint():
    f = cnn(sequential=False)
    s = cnn(sequential=True)
    s.set_weights(f.get_weights())
    assert actclust.model_fingerprint(f) == actclust.model_fingerprint(s)
    s.get_layer("bn").moving_mean.assign(np.zeros(4, np.float32))
    assert actclust.model_fingerprint(f) != actclust.model_fingerprint(s)


# without keras installed, a Keras model path says which extra to install
def test_missing_keras(monkeypatch, tmp_path):
    (tmp_path / "m.keras").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(actclust.MissingDependencyError, match=r'explaining a Keras model needs keras.*pip install '
                                                              r'"actclust\[keras\]"'):
        actclust.list_layers(tmp_path / "m.keras")


# keras set to a backend that is not installed is named, with what to do
def test_missing_backend():
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "import actclust\n"
            "from actclust.adapters.keras import import_keras\n"
            "try:\n    import_keras()\nexcept actclust.MissingDependencyError as e:\n    print(e)\n")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "Keras is set to use the tensorflow backend, which is not installed" in out.stdout, out.stderr[-2000:]
    assert "set KERAS_BACKEND to an installed backend" in out.stdout


# a KERAS_BACKEND Keras cannot use (a typo, upper case) is one line and exit 2 in the CLI, not Keras's 45-line traceback
@pytest.mark.parametrize("backend", ["JAX", "bogus"])
def test_unusable_backend(tmp_path, backend):
    keras.Sequential([keras.Input((4,)), layers.Dense(2)]).save(tmp_path / "m.keras")
    env = {**os.environ, "KERAS_BACKEND": backend}
    out = subprocess.run([sys.executable, "-m", "actclust.cli", "layers", str(tmp_path / "m.keras")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert (f"actclust layers: error: Keras cannot start: Unable to import backend : {backend} (the environment "
            f"variable KERAS_BACKEND is '{backend}'); set it to jax, torch or tensorflow, in lower case") in out.stderr


# ---------------------------------------------------------------------------- same results across frameworks
@pytest.fixture(scope="module")
def ported():
    """The suite's PyTorch TinyCNN (mixed predictions) and its Keras port with the same weights."""
    import keras_port

    net = TinyCNN(seed=3, bias=False).eval()
    return net, keras_port.port(net), keras_port.inputs()


def cosines(a, b):
    """Row-wise cosine similarity; 1 where both rows are zero (a dead ReLU gives the same zero vector in both)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na < 1e-12) & (nb < 1e-12)
    return np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-300))


# the Keras port gives the PyTorch run's vectors (cosine >= 0.9999), cluster paths (>= 0.99) and fidelity (0.002)
def test_same_results_as_pytorch(ported):
    net, model, (x_t, x_k) = ported
    fit = dict(n_clusters=4, progress=False, random_state=0)
    ac_t = ActivationClustering(net, LAYERS, **fit).fit(x_t[:480])
    ac_k = ActivationClustering(model, LAYERS, **fit).fit(x_k[:480])
    for layer in LAYERS:
        assert cosines(ac_t.train_vectors_[layer], ac_k.train_vectors_[layer]).min() >= 0.9999, layer
    from actclust.state import SUMMARY_SUFFIX

    np.testing.assert_allclose(ac_k.train_vectors_["conv" + SUMMARY_SUFFIX], ac_t.train_vectors_["conv" + SUMMARY_SUFFIX],
                               atol=1e-5)  # the spatial summary of a channels-last map is the channels-first one's
    paths_t, paths_k = ac_t.cluster_paths(x_t[480:]), ac_k.cluster_paths(x_k[480:])
    assert (paths_t == paths_k).all(1).mean() >= 0.99
    assert (ac_t.state_.train_predictions == ac_k.state_.train_predictions).all()
    assert abs(ac_t.score(x_t[480:])["fidelity"] - ac_k.score(x_k[480:])["fidelity"]) <= 0.002
    assert len(np.unique(ac_t.state_.train_predictions)) == 3  # a model whose fidelity can tell right from wrong


# Keras's PyTorch backend (in a subprocess) gives the JAX backend's logits, vectors and fingerprint
def test_torch_backend_matches_jax(ported):
    import keras_port

    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(HERE / "keras_port.py")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["backend"] == "torch"
    assert got["adapter"] == "KerasAdapter"  # a keras.Model is also a torch.nn.Module on this backend
    net, model, _ = ported
    logits, vectors = keras_port.keras_vectors(model, keras_port.inputs(64)[1])
    np.testing.assert_allclose(np.array(got["logits"]), logits, atol=1e-5)
    for layer in keras_port.LAYERS:
        assert cosines(got["vectors"][layer], vectors[layer]).min() >= 0.9999, layer
    assert got["fingerprint"] == actclust.model_fingerprint(model)


# ---------------------------------------------------------------------------- the remaining refusals
# the adapter's own arguments: a keras.Model and a callable output=
def test_adapter_arguments():
    with pytest.raises(UnsupportedModelError, match="The model must be a keras.Model; got object"):
        KerasAdapter(object())
    with pytest.raises(UnsupportedModelError, match="output must be a callable that returns the logits; got 3"):
        KerasAdapter(cnn(), output=3)


# inputs given as a tuple must give one array per model input
def test_tuple_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    model = keras.Model([a, b], layers.Dense(3, name="out")(layers.Concatenate(name="cat")([a, b])))
    x = (np.ones((4, 3), np.float32), np.ones((4, 2), np.float32))
    assert actclust.list_layers(model, x)["cat"] == (4, 5)
    with pytest.raises(DataError, match=r"X gives 1 inputs but the model takes 2 \(\['a', 'b'\]\)"):
        KerasAdapter(model).check_inputs(x[:1], "X")


# an output= that returns no array, or integers, is refused saying what is expected
def test_bad_custom_output(images):
    x = images[0][:4]
    with pytest.raises(CaptureError, match=r"output= returned a list; actclust looks for the logits as an array"):
        capture(cnn(), x, ["fc1"], output=lambda out: [out])
    with pytest.raises(CaptureError, match="must return floating-point logits; got dtype int64"):
        capture(cnn(), x, ["fc1"], output=lambda out: np.tile(out.argmax(1)[:, None], 2).astype(np.int64))


# a nested model first called in another model has its layers' outputs there: refused, saying why
def test_layer_first_called_in_another_model():
    inner_in = keras.Input((4,))
    block = keras.Model(inner_in, layers.Dense(4, name="d")(inner_in), name="block")
    a_in, b_in = keras.Input((4,)), keras.Input((4,))
    keras.Model(a_in, block(a_in), name="first")
    second = keras.Model(b_in, layers.Dense(2, name="out")(block(b_in)), name="second")
    assert capture(second, np.ones((3, 4), np.float32), ["out"])[1]["out"].shape == (3, 2)
    with pytest.raises(UnsupportedModelError, match="of 'second' cannot be reached from its inputs .*first called in "
                                                    "another model has it there"):
        capture(second, np.ones((3, 4), np.float32), ["block/d"])


# Keras loaders that cannot be read as ordered batches of samples are refused with what to do
def test_pydataset_refusals(images):
    from actclust.capture.data import Batches
    from actclust.adapters.keras_data import source

    x, y = images

    class Endless(keras.utils.PyDataset):
        num_batches = None

        def __getitem__(self, i):
            return x[:10]

    class Four(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return x[:10], y[:10], y[:10], y[:10]

    class Pairs(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return x[:10], y[:10]

    class Clash(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": x[:10], "labels": x[:10]}, y[:10]

    with pytest.raises(DataError, match=r"The PyDataset passed as X has no length"):
        list(Batches(Endless(), batch_size=10))
    with pytest.raises(DataError, match=r"tuples of 4 elements; Keras's convention is x, \(x, y\) or \(x, y, sample_weight\)"):
        list(Batches(Four(), batch_size=10))
    with pytest.raises(DataError, match="have an input named 'labels' and labels; rename that input"):
        list(Batches(Clash(), batch_size=10))
    with pytest.raises(DataError, match="X holds 10 samples; sample 12 was asked for"):
        source(Pairs(), 10, "X").take([3, 12])


# the command line gives a channels-last model the built-in data sets' images channels-last (they are channels-first,
# and a user of the command line cannot move them: fit and score were refused with Python advice, x.transpose;
# found by an outside new-user check); an .npz is given as it is
def test_cli_builtin_images_for_a_channels_last_model(tmp_path, capsys):
    from actclust.cli import main

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = layers.Dense(10, name="logits")(layers.Flatten(name="flat")(x))
    keras.Model(inp, x).save(tmp_path / "cnn.keras")
    run = str(tmp_path / "run")
    assert main(["fit", str(tmp_path / "cnn.keras"), "--data", "digits", "--layers", "conv,logits", "--n-clusters",
                 "3", "--quiet", "--no-prepare", "--out", run]) == 0
    assert main(["score", run, "--data", "digits", "--quiet", "--trust-run-model"]) == 0
    assert "combined" in capsys.readouterr().out
    np.savez(tmp_path / "first.npz", x=np.zeros((20, 1, 8, 8), np.float32))  # the user's own file: as given
    assert main(["score", run, "--data", str(tmp_path / "first.npz"), "--quiet", "--trust-run-model"]) == 2
    assert "transpose" in capsys.readouterr().err
    # a built-in set of another image size fits neither layout: said of the model's own (the moveaxis hint misled)
    inp = keras.Input((6, 6, 1), name="small")
    keras.Model(inp, layers.Dense(3, name="logits")(layers.Flatten(name="flat")(inp))).save(tmp_path / "six.keras")
    assert main(["fit", str(tmp_path / "six.keras"), "--data", "digits", "--layers", "flat", "--quiet",
                 "--out", str(tmp_path / "six")]) == 2
    err = capsys.readouterr().err
    assert ("--data digits has samples of shape (8, 8, 1), but the model's input 'small' takes samples of "
            "shape (6, 6, 1)") in err and "moveaxis" not in err
    assert "Neither layout of the built-in digits images (1 x 8 x 8) fits the model: give --data an .npz" in err


# a model of several outputs is read at its first; labels of another output are refused saying which one was read and
# how to pick another (the error blamed the labels alone)
def test_labels_of_another_output_name_the_output_read(images):
    x, y = images
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    h = layers.Dense(8, activation="relu", name="fc")(layers.Flatten()(inp))
    model = keras.Model(inp, [layers.Dense(2, name="aux")(h), layers.Dense(4, name="main")(h)])
    with pytest.warns(actclust.ActClustWarning, match=r"several outputs; actclust reads the logits from its first "
                                                      r"output \(of 2\)"):
        ac = ActivationClustering(model, ["fc"], n_clusters=2, progress=False).fit(x)
    with pytest.raises(DataError, match=r"the model outputs 2 classes, so labels must be in 0..1. The model has several "
                                        r"outputs and actclust reads the logits from its first output \(of 2\): if the "
                                        r"labels are another output's, refit with output="):
        ac.score(x, np.arange(len(x)) % 4)


# a sigmoid head over several classes is said once, as in PyTorch (its probabilities were read as logits silently)
def test_sigmoid_head_said(images):
    x, y = images
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    h = layers.Dense(8, activation="relu", name="fc1")(layers.Flatten(name="flat")(inp))
    logits = layers.Dense(3, name="z")(h)
    model = keras.Model(inp, layers.Activation("sigmoid", name="out")(20 * logits))  # confident, as trained heads are
    with pytest.warns(actclust.ActClustWarning, match=r"probabilities of a sigmoid head\?.*output=lambda p: np.log\(p\)"):
        ActivationClustering(model, ["fc1", "out"], n_clusters=3, progress=False).fit(x[:60], y[:60])
