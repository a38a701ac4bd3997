"""ONNX models through onnxruntime: the same results as the PyTorch network they were exported from,
the graph's tensors as layers, several inputs, fixed batch sizes, scikit-learn's probabilities, and
clear errors for what cannot run."""

import re
import warnings

import numpy as np
import onnx
import pytest
import skl2onnx
import torch
from torch import nn

import actclust
from actclust import (ActivationClustering, CaptureError, DataError, DataWarning, ParameterError,
                      UnsupportedModelError)
from actclust.adapters import adapt

from conftest import TinyCNN

TORCH_TO_ONNX = {"conv": "/conv/Conv_output_0", "fc1": "/fc1/Gemm_output_0", "fc2": "logits"}


def _export(model, path, example, names=("x",), dynamic=True, outputs=("logits",)):
    axes = {n: {0: "N"} for n in (*names, *outputs)} if dynamic else None
    torch.onnx.export(model, example, str(path), input_names=list(names), output_names=list(outputs),
                      dynamic_axes=axes, dynamo=False)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The conftest's mixed-prediction TinyCNN, exported with a dynamic batch axis, and data."""
    model = TinyCNN(seed=3, bias=False).eval()
    path = _export(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", (torch.randn(2, 1, 6, 6),))
    x = np.random.default_rng(0).standard_normal((400, 1, 6, 6)).astype(np.float32)
    return model, path, x


def _cos(a, b):
    """Cosine of each pair of rows; two zero rows (an input that gives zero activations) count as equal."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na < 1e-9) & (nb < 1e-9)
    return np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-300))


# the exported network gives the PyTorch run's vectors (cosine >= 0.9999), clusters (agreement >= 0.99),
# fidelity (within 0.002) and neighbours
def test_same_results_as_pytorch(trained_digits_cnn, tmp_path):
    model, x_tr, _, x_te, _ = trained_digits_cnn
    path = _export(model, tmp_path / "digits.onnx", (torch.from_numpy(x_tr[:2]),))
    names = {"conv1": "/conv1/Conv_output_0", "conv2": "/conv2/Conv_output_0", "fc1": "/fc1/Gemm_output_0",
             "fc2": "logits"}
    a = ActivationClustering(model, list(names), n_clusters=10, progress=False).fit(x_tr)
    b = ActivationClustering(str(path), list(names.values()), n_clusters=10, progress=False).fit(x_tr)
    for l, o in names.items():
        assert _cos(a.train_vectors_[l], b.train_vectors_[o]).min() >= 0.9999, l
    assert (a.cluster_paths(x_te) == b.cluster_paths(x_te)).mean() >= 0.99
    assert abs(a.score(x_te)["fidelity"] - b.score(x_te)["fidelity"]) <= 0.002
    agree = np.mean([len(set(i) & set(j)) / 10 for i, j in zip(a.similar(x_te[:50]).indices, b.similar(x_te[:50]).indices)])
    assert agree >= 0.99


# a path, the file's bytes and an onnx.ModelProto are the same model, with the same fingerprint; the
# user's ModelProto is not changed by adding layer outputs
def test_path_bytes_and_proto(exported):
    _, path, x = exported
    proto = onnx.load(str(path))
    n_outputs = len(proto.graph.output)
    fps = {adapt(m).fingerprint() for m in (str(path), path.read_bytes(), proto)}
    preds = [ActivationClustering(m, ["/fc1/Gemm_output_0"], n_clusters=3, progress=False).fit(x[:60]).predict(x[:20])
             for m in (path, path.read_bytes(), proto)]
    assert len(fps) == 1 and all(np.array_equal(p, preds[0]) for p in preds)
    assert len(proto.graph.output) == n_outputs


# layer names are the graph's tensors; a node's name resolves to its output; an unknown name gets the
# closest ones; list_layers shows shapes, layouts and what produces each tensor
def test_layer_names(exported):
    _, path, x = exported
    names = actclust.list_layers(str(path))
    assert names[:3] == ["/conv/Conv_output_0", "/relu/Relu_output_0", "/pool/AveragePool_output_0"]
    info = actclust.list_layers(str(path), x[:4])
    assert info["/conv/Conv_output_0"] == (4, 4, 6, 6) and info["/conv/Conv_output_0"].layout == "channels_first"
    assert info["/conv/Conv_output_0"].op == "Conv" and info["logits"].reduction == "as is (dense)"
    ac = ActivationClustering(str(path), ["/conv/Conv", "logits"], n_clusters=3, progress=False).fit(x[:60])
    assert ac.layers_ == ["/conv/Conv_output_0", "logits"]
    with pytest.raises(ParameterError, match=r"Unknown layer '/conv/Conv_out'.*Did you mean '/conv/Conv_output_0'"):
        ActivationClustering(str(path), ["/conv/Conv_out"], progress=False).fit(x[:60])
    # the PyTorch module's name finds the tensors it became (the message spoke of sub-modules, and offered none)
    with pytest.raises(ParameterError, match=r"Unknown layer 'relu': the model has no tensor \(node output\) of that "
                                             r"name. Did you mean '/relu/Relu_output_0'"):
        ActivationClustering(str(path), ["relu"], progress=False).fit(x[:60])


# saved and loaded with the same file; the model file is all a run needs
def test_save_load_report(exported, tmp_path):
    _, path, x = exported
    ac = ActivationClustering(str(path), list(TORCH_TO_ONNX.values()), n_clusters=4, progress=False).fit(x[:200])
    ac.save(tmp_path / "run")
    back = actclust.load(tmp_path / "run", str(path), progress=False)
    assert np.array_equal(back.predict(x[200:]), ac.predict(x[200:]))
    e = back.explain(x[200:202], trust=False)
    assert e[0].meta["model_class"].startswith("onnx:")
    html = actclust.report(back, x[200:260], train=x[:200], out=tmp_path / "r.html", n_correct=1, n_wrong=1,
                           trust=False).read_text()
    assert "<img" in html


# two inputs fed by name (dict) or in the graph's order (tuple)
def test_several_inputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fa, self.out = nn.Linear(3, 4), nn.Linear(6, 3)

        def forward(self, a, b):
            return self.out(torch.cat([torch.relu(self.fa(a)), b], 1))

    model = Two().eval()
    path = _export(model, tmp_path / "two.onnx", (torch.randn(2, 3), torch.randn(2, 2)), names=("a", "b"))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((80, 3)).astype(np.float32), rng.standard_normal((80, 2)).astype(np.float32)
    layers = ["/fa/Gemm_output_0", "logits"]
    by_name = ActivationClustering(str(path), layers, n_clusters=3, progress=False).fit({"a": a, "b": b})
    with torch.no_grad():
        direct = model(torch.from_numpy(a), torch.from_numpy(b)).argmax(1).numpy()
    assert np.array_equal(by_name.train_predictions_, direct)
    # a tuple in the graph's order, and a dict in any order
    by_position = ActivationClustering(str(path), layers, n_clusters=3, progress=False).fit((a, b))
    assert np.array_equal(by_position.train_predictions_, direct)
    assert np.array_equal(by_name.query({"b": b, "a": a}).dnn_pred, direct)
    with pytest.raises(DataError, match=r"The ONNX model's inputs are \['a', 'b'\]; the batch has \['a', 'c'\]"):
        ActivationClustering(str(path), layers, n_clusters=3, progress=False).fit({"a": a, "c": b})
    with pytest.raises(DataError, match=r"The ONNX model takes 2 inputs \['a', 'b'\], and X is a single array: pass a "
                                        r"dict of arrays by input name, or a tuple in that order"):
        ActivationClustering(str(path), layers, n_clusters=3, progress=False).fit(a)
    # the command line: an .npz with one array per input name (a single x could not feed it, and the error said to pass
    # a dict, which the command line cannot: an outside check); without them, the message names the inputs
    from actclust.cli.commands import main

    np.savez(tmp_path / "two.npz", a=a, b=b, y=direct)
    np.savez(tmp_path / "one.npz", x=a)
    assert main(["fit", str(path), "--data", str(tmp_path / "two.npz"), "--layers", ",".join(layers), "--n-clusters",
                 "3", "--out", str(tmp_path / "run"), "--quiet", "--no-prepare"]) == 0
    assert np.array_equal(actclust.load(tmp_path / "run", str(path), progress=False).train_predictions_, direct)
    assert main(["score", str(tmp_path / "run"), "--data", str(tmp_path / "two.npz"), "--quiet"]) == 0
    assert main(["report", str(tmp_path / "run"), "--data", str(tmp_path / "two.npz"), "--train",
                 str(tmp_path / "two.npz"), "--out", str(tmp_path / "r.html"), "--quiet"]) == 0
    with pytest.raises(actclust.ParameterError, match=r"two.npz has no array named 'x' \(it has \['a', 'y'\]\); the model "
                                                      r"takes the inputs \['a', 'b'\]: give one array per input name "
                                                      r"\(numpy.savez\(path, a=..., b=..., y=y\)\)"):
        np.savez(tmp_path / "two.npz", a=a, y=direct)
        from actclust.cli.inputs import load_data

        load_data(str(tmp_path / "two.npz"), "train", adapt(str(path)))


# a model exported without a dynamic batch axis runs in slices of its batch size, with a warning
def test_fixed_batch_size(exported, tmp_path):
    model, _, x = exported
    path = _export(model, tmp_path / "fixed.onnx", (torch.randn(8, 1, 6, 6),), dynamic=False)
    with pytest.warns(actclust.ActClustWarning, match="fixed batch size of 8: batches are run in slices"):
        ac = ActivationClustering(str(path), ["/fc1/Gemm_output_0", "logits"], n_clusters=3, batch_size=50,
                                  progress=False).fit(x[:100])
    with torch.no_grad():
        assert np.array_equal(ac.train_predictions_, model(torch.from_numpy(x[:100])).argmax(1).numpy())
        # fewer inputs than the fixed batch: one padded slice, cut back to the inputs
        assert np.array_equal(ac.predict(x[100:103]), model(torch.from_numpy(x[100:103])).argmax(1).numpy())
    import warnings

    with warnings.catch_warnings():  # said once per model, not with every call (an outside check saw it each time)
        warnings.filterwarnings("error", "The ONNX model has a fixed batch size")
        assert len(ac.explain(x[100:101])) == 1
    assert {info.shape[0] for info in actclust.list_layers(str(path), x[:1]).values()} == {1}


# a scikit-learn classifier converted with skl2onnx: its probabilities are read as the model's output
def test_scikit_learn_probabilities():
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier

    x, y = load_iris(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    clf = MLPClassifier((16,), max_iter=600, random_state=0).fit(x, y)
    proto = skl2onnx.convert_sklearn(clf, initial_types=[("x", FloatTensorType([None, 4]))],
                                     options={id(clf): {"zipmap": False}})
    names = actclust.list_layers(proto)
    hidden = next(n for n in names if adapt(proto).producer[n].op_type == "Relu")
    ac = ActivationClustering(proto, [hidden], n_clusters=4, progress=False).fit(x, y)
    assert np.array_equal(ac.train_predictions_, clf.predict(x))
    q = ac.query(x[:5])
    np.testing.assert_allclose(q.dnn_proba, clf.predict_proba(x[:5]), atol=1e-5)  # softmax(log p) = p
    # converted with its default ZipMap: the probabilities as a sequence of maps are no layer (not listed, and
    # listing the layers' shapes on a sample does not fail on them)
    zipped = skl2onnx.convert_sklearn(clf, initial_types=[("x", FloatTensorType([None, 4]))])
    assert "output_probability" not in actclust.list_layers(zipped)
    assert hidden in actclust.list_layers(zipped, x[:2]) and "output_probability" not in actclust.list_layers(zipped, x[:2])


# a map transposed to channels-last (as tf2onnx exports TensorFlow models) is read channels-last
def test_channels_last_tensor(tmp_path):
    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.head = nn.Conv2d(1, 5, 3, padding=1), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x).permute(0, 2, 3, 1))  # (N, H, W, C)
            return self.head(h.mean((1, 2)))

    model = NHWC().eval()
    path = _export(model, tmp_path / "nhwc.onnx", (torch.randn(2, 1, 6, 6),))
    relu = next(n for n in actclust.list_layers(str(path)) if adapt(str(path)).producer[n].op_type == "Relu")
    x = np.random.default_rng(0).standard_normal((50, 1, 6, 6)).astype(np.float32)
    assert actclust.list_layers(str(path), x[:2])[relu].layout == "channels_last"
    ac = ActivationClustering(str(path), [relu], n_clusters=3, normalize=None, progress=False).fit(x)
    with torch.no_grad():
        expected = torch.relu(model.conv(torch.from_numpy(x))).mean((2, 3)).numpy()
    np.testing.assert_allclose(ac.train_vectors_[relu], expected, rtol=1e-5, atol=1e-6)


# a ConvNeXt block: a map made channels-last stays so through a LayerNormalization and a Linear on the channels (a
# MatMul by a weight matrix) and what follows them; it was read channels-first, averaged over the width and channels
def test_channels_last_through_layer_norm_and_linear(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.ln, self.pw, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.LayerNorm(4), nn.Linear(4, 6), \
                nn.Linear(6, 3)

        def parts(self, x):
            ln = self.ln(self.conv(x).permute(0, 2, 3, 1))  # (N, H, W, C)
            return ln, torch.relu(self.pw(ln))

        def forward(self, x):
            return self.head(self.parts(x)[1].mean((1, 2)))

    model = Block().eval()
    path = _export(model, tmp_path / "convnext.onnx", (torch.randn(2, 1, 8, 8),))
    x = np.random.default_rng(0).standard_normal((60, 1, 8, 8)).astype(np.float32)
    ops = {adapt(str(path)).producer[n].op_type: n for n in actclust.list_layers(str(path))}
    shown = actclust.list_layers(str(path), x[:2])
    assert {op: shown[ops[op]].layout for op in ("LayerNormalization", "MatMul", "Add", "Relu")} == {
        op: "channels_last" for op in ("LayerNormalization", "MatMul", "Add", "Relu")}
    layers = [ops["LayerNormalization"], ops["Relu"]]
    ac = ActivationClustering(str(path), layers, n_clusters=3, normalize=None, progress=False).fit(x)
    with torch.no_grad():
        expected = [t.mean((1, 2)).numpy() for t in model.parts(torch.from_numpy(x))]
    for layer, want in zip(layers, expected):
        np.testing.assert_allclose(ac.train_vectors_[layer], want, rtol=1e-5, atol=1e-5)


# a layout followed through what keeps it: a Transpose moves the channels axis of whatever it transposes (tokens to a
# channels-first map ahead of a Conv1d), a GLU's Split and Mul, a Reshape that keeps the channels axis whole (a conv
# map flattened, a Swin block's view back to (N, H, W, C); its target built by shape arithmetic), a 5-axis transpose,
# and every input of an operator tried in turn (a LayerNorm exported at opset 16 as ReduceMean, Sub, ...; a GRN)
@pytest.mark.parametrize("opset", [16, 17])
def test_layouts_followed_through_what_keeps_them(tmp_path, opset):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.conv1, self.conv2 = nn.Linear(3, 8), nn.Conv1d(8, 12, 3, padding=1), nn.Conv2d(2, 6, 3,
                                                                                                      padding=1)
            self.ln, self.conv3, self.ln3, self.head = nn.LayerNorm(6), nn.Conv3d(1, 4, 1), nn.LayerNorm(4), \
                nn.Linear(6 + 6 + 6 + 4, 3)

        def parts(self, tokens, image, video):
            as_map = self.emb(tokens).transpose(1, 2)  # (N, 8, T): channels-first for the Conv1d
            glu = nn.functional.glu(self.conv1(as_map), dim=1)  # (N, 6, T)
            conv = self.conv2(image)  # (N, 6, 4, 4)
            flat = conv.flatten(2)  # (N, 6, 16)
            grid = self.ln(flat.transpose(1, 2)).reshape(conv.shape[0], 4, 4, 6)  # (N, 4, 4, 6)
            cube = self.ln3(self.conv3(video).permute(0, 2, 3, 4, 1))  # (N, 2, 2, 2, 4)
            return as_map, glu, flat, grid, cube

        def forward(self, tokens, image, video):
            as_map, glu, flat, grid, cube = self.parts(tokens, image, video)
            return self.head(torch.cat([glu.mean(2), flat.mean(2), grid.mean((1, 2)), cube.mean((1, 2, 3))], 1))

    model = Mixed().eval()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 10, 3)).astype(np.float32), rng.standard_normal((40, 2, 4, 4)).astype(np.float32),
         rng.standard_normal((40, 1, 2, 2, 2)).astype(np.float32))
    path = tmp_path / "mixed.onnx"
    axes = {n: {0: "N"} for n in ("tokens", "image", "video", "logits")}
    torch.onnx.export(model, tuple(torch.from_numpy(a[:2]) for a in x), str(path), input_names=["tokens", "image",
                      "video"], output_names=["logits"], dynamic_axes=axes, dynamo=False, opset_version=opset)
    a = adapt(str(path))
    made = {n: (a.producer[n].op_type, len(a.types[n][1] or ())) for n in a.layer_names()}
    with torch.no_grad():
        want = [t.numpy() for t in model.parts(*(torch.from_numpy(v) for v in x))]
    axes_of = {"channels_first": lambda v: v.mean(tuple(range(2, v.ndim))),
               "channels_last": lambda v: v.mean(tuple(range(1, v.ndim - 1)))}
    picks = {"Transpose": (3, "channels_first", 0), "Mul": (3, "channels_first", 1), "Reshape": (3, "channels_first", 2)}
    layers, expect = [], []
    for op, (rank, layout, part) in picks.items():
        name = next(n for n, (o, r) in made.items() if o == op and r == rank)
        assert a.layout(name, rank, False) == layout, (op, name)
        layers.append(name)
        expect.append(axes_of[layout](want[part]))
    grid = next(n for n, (o, r) in made.items() if o == "Reshape" and r == 4)
    cube = [n for n, (o, r) in made.items() if r == 5 and o not in ("Conv",)][-1]  # the LayerNorm's (or its last op)
    assert a.layout(grid, 4, False) == "channels_last" and a.layout(cube, 5, False) == "channels_last"
    ac = ActivationClustering(str(path), layers + [grid, cube], n_clusters=3, normalize=None, progress=False).fit(x)
    for name, w in zip(layers + [grid, cube], expect + [want[3].mean((1, 2)), want[4].mean((1, 2, 3))]):
        np.testing.assert_allclose(ac.train_vectors_[name], w, rtol=1e-4, atol=1e-5)


def _padded_ids(length: int, keep: int):
    """30 rows of token ids below 50 and their mask; every second row padded (id 0) after ``keep`` tokens."""
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(1, 50, (30, length)), np.ones((30, length), np.int64)
    mask[::2, keep:] = 0
    ids[mask == 0] = 0
    return ids, mask


# a token map through a transpose and back (a Conv1d over its steps) and what follows is tokens, averaged over the real
# tokens of the batch's attention_mask (a transposed token map read channels-last averaged the padding in)
def test_tokens_through_a_transpose_keep_their_mask(tmp_path):
    class TextCNN(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.conv, self.lin, self.fc = nn.Embedding(50, 16), nn.Conv1d(16, 16, 3, padding=1), \
                nn.Linear(16, 8), nn.Linear(8, 3)

        def parts(self, input_ids):
            h = self.emb(input_ids)
            back = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
            return back, torch.relu(self.lin(back + h))

        def forward(self, input_ids, attention_mask):
            z, m = self.parts(input_ids)[1], attention_mask.unsqueeze(-1).float()
            return self.fc((z * m).sum(1) / m.sum(1))

    model = TextCNN().eval()
    path = tmp_path / "textcnn.onnx"
    axes = {"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"}, "logits": {0: "N"}}
    torch.onnx.export(model, (torch.randint(1, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=axes,
                      dynamo=False, opset_version=17)
    ids, mask = _padded_ids(7, keep=4)
    a = adapt(str(path))
    back = next(n for n in a.layer_names() if a.producer[n].op_type == "Transpose"  # the one after the conv's ReLU
                and a.producer[a.producer[n].input[0]].op_type == "Relu")
    last = next(n for n in a.layer_names()[::-1] if a.producer[n].op_type == "Relu")
    assert a.layout(back, 3, True) == a.layout(last, 3, True) == "tokens"
    ac = ActivationClustering(str(path), [back, last], n_clusters=3, normalize=None, progress=False).fit(
        {"input_ids": ids, "attention_mask": mask})
    keep = torch.from_numpy(mask)[:, :, None].float()
    with torch.no_grad():
        want = [((t * keep).sum(1) / keep.sum(1)).numpy() for t in model.parts(torch.from_numpy(ids))]
    for name, w in zip([back, last], want):
        np.testing.assert_allclose(ac.train_vectors_[name], w, rtol=1e-4, atol=1e-5)


# a graph that takes token ids alone (it pools them itself): its token maps were averaged over the padding without a
# word, and a dict batch with an attention_mask was refused as an unknown input (an outside check). The mask is taken as
# the token mask alone, and without one a DataWarning says the padding is averaged in
def test_ids_only_graph_takes_a_mask_apart(tmp_path):
    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.lin, self.fc = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, input_ids):
            m = (input_ids != 0).unsqueeze(-1).float()
            return self.fc((torch.relu(self.lin(self.emb(input_ids))) * m).sum(1) / m.sum(1))

    path = tmp_path / "ids.onnx"
    torch.onnx.export(Ids().eval(), (torch.randint(1, 50, (2, 6)),), str(path), input_names=["input_ids"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "N", 1: "T"}, "logits": {0: "N"}},
                      dynamo=False, opset_version=17)
    ids, mask = _padded_ids(6, keep=3)
    a = adapt(str(path))
    relu = next(n for n in a.layer_names() if a.producer[n].op_type == "Relu")
    with pytest.warns(DataWarning, match=rf"Layer '{re.escape(relu)}' is a token map averaged over all 6 positions: "
                                         r"the batches carry no attention mask"):
        plain = ActivationClustering(str(path), [relu], n_clusters=3, normalize=None, progress=False).fit(ids)
    gather = next(n for n in a.layer_names() if a.producer[n].op_type == "Gather")
    with pytest.warns(DataWarning, match=rf"Layers \['{re.escape(gather)}', '{re.escape(relu)}'\] are token maps "
                                         r"averaged over all 6 positions") as said:  # each named (it named the first)
        ActivationClustering(str(path), [gather, relu], n_clusters=3, normalize=None, progress=False).fit(ids)
    assert sum("token map" in str(w.message) for w in said) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        masked = ActivationClustering(str(path), [relu], n_clusters=3, normalize=None, progress=False).fit(
            {"input_ids": ids, "attention_mask": mask})
    m = Ids().eval()
    keep = torch.from_numpy(mask)[:, :, None].float()
    with torch.no_grad():
        h = torch.relu(m.lin(m.emb(torch.from_numpy(ids))))
    np.testing.assert_allclose(masked.train_vectors_[relu], ((h * keep).sum(1) / keep.sum(1)).numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(plain.train_vectors_[relu], h.mean(1).numpy(), rtol=1e-4, atol=1e-5)


# inputs cast to the graph's types lose what those cannot hold: fractional values given to integer ids became other
# ids, and values past float16's range became infinite, blamed on a layer (an outside check); both refused, naming them
def test_casts_that_lose_values_refused(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    ids_path = tmp_path / "ids.onnx"
    torch.onnx.export(nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(24, 3)).eval(),
                      (torch.randint(1, 50, (2, 6)),), str(ids_path), input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "N"}, "logits": {0: "N"}}, dynamo=False, opset_version=17)
    ids = np.random.default_rng(0).integers(1, 50, (40, 6))
    with pytest.raises(DataError, match=r"X holds fractional values but the model's input 'input_ids' takes integers"):
        ActivationClustering(str(ids_path), ["logits"], n_clusters=3, progress=False).fit(ids + 0.7)
    fitted = ActivationClustering(str(ids_path), ["logits"], n_clusters=3, progress=False).fit(ids.astype(np.float32))
    assert fitted.state_.n_samples == 40  # whole numbers as floats: cast, as documented

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
                               helper.make_node("MatMul", ["x32", "w"], ["logits"])], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [w])
    half = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(half))
    x = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    x[7, 2] = 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # NumPy's overflow in the cast stays unsaid
        with pytest.raises(DataError, match=r"Row 7 of rows 0-39 of X, input 'x', holds values beyond the range of the "
                                            r"model's float16 input \(largest 65504\): they become infinite"):
            ActivationClustering(str(half), ["x32"], n_clusters=3, progress=False).fit(x)


# a sequence-first (T, N, D) tensor is not one row per input, also where T >= N (it was cut to its first N rows, token
# positions, and read as one row per input: vectors averaged over the batch)
def test_sequence_first_tensors_refused(tmp_path):
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.fc = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.lin(x).transpose(0, 1)).mean(0))

    x = np.random.default_rng(0).standard_normal((12, 16, 4)).astype(np.float32)
    path = _export(SeqFirst().eval(), tmp_path / "seqfirst.onnx", (torch.from_numpy(x[:2]),))
    relu = next(n for n in actclust.list_layers(str(path)) if adapt(str(path)).producer[n].op_type == "Relu")
    assert actclust.list_layers(str(path), x[:2])[relu] == (16, 2, 4)
    with pytest.raises(CaptureError, match=rf"Layer '{relu}' gives an output of shape \(16, 12, 4\), which is not one "
                                           r"row per input \(the batch has 12\)"):
        ActivationClustering(str(path), [relu], n_clusters=3, progress=False).fit(x)


# a GroupNorm on a 1-D map, exported as Reshape to groups, InstanceNormalization and Reshape back, keeps the map
# channels-first, and so does what follows (its (N, C, L) output was read as tokens, averaged over the channels)
def test_group_norm_of_a_1d_map(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.GELU(), nn.Flatten(), nn.Linear(60, 3))
    x = np.random.default_rng(0).standard_normal((30, 4, 10)).astype(np.float32)
    path = _export(net.eval(), tmp_path / "gn.onnx", (torch.from_numpy(x[:2]),))
    a = adapt(str(path))
    names = a.layer_names()
    norm = next(n for n in names if a.producer[n].op_type == "Add")  # the GroupNorm's bias: its output
    gelu = names[names.index(norm) + 1]  # the GELU's (first) output
    assert a.layout(norm, 3, False) == a.layout(gelu, 3, False) == "channels_first"
    ac = ActivationClustering(str(path), [norm], n_clusters=3, normalize=None, progress=False).fit(x)
    with torch.no_grad():
        np.testing.assert_allclose(ac.train_vectors_[norm], net[:2](torch.from_numpy(x)).mean(2).numpy(), rtol=1e-4,
                                   atol=1e-5)


# what cannot run gets a clear error before any work
def test_bad_models(tmp_path, exported):
    _, path, x = exported
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(UnsupportedModelError, match=r"junk.onnx is not an ONNX model .*torch.onnx.export, tf2onnx or skl2onnx"):
        ActivationClustering(str(junk), ["a"]).fit(x)
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.onnx", "w") as z:  # a .keras file under another name (an outside check)
        z.writestr("config.json", "{}")
    with pytest.raises(UnsupportedModelError, match=r"model.onnx is not an ONNX model but a zip archive, as a Keras "
                                                    r"model file is: if it is one, name it .keras"):
        ActivationClustering(str(tmp_path / "model.onnx"), ["a"]).fit(x)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"is a TensorFlow SavedModel.*tf2onnx.convert --saved-model"):
        ActivationClustering(str(saved), ["a"]).fit(x)
    script = tmp_path / "model.pt"
    script.write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"model.pt is a PyTorch file.*export it to ONNX"):
        ActivationClustering(str(script), ["a"]).fit(x)
    with pytest.raises(UnsupportedModelError, match=r"No ONNX model at .*missing.onnx: the file does not exist"):
        adapt(str(tmp_path / "missing.onnx"))


# inputs the graph cannot take are refused before the model runs, naming what to change
@pytest.mark.parametrize("make, match", [
    (lambda x: (np.clip(x, 0, 1) * 255).astype(np.uint8), r"uint8 values \(raw image bytes\?\) but the model's input 'x' is floating"),
    (lambda x: x.astype(np.int64), r"int64 values but the model's input 'x' is floating: convert the inputs to float"),
    (lambda x: x.reshape(len(x), -1), r"X has 2 axes \(60, 36\) but the model's input 'x' has 4 \(\(N, 1, 6, 6\)\)"),
    (lambda x: x[:, :, :5, :5].copy(), r"X has shape \(60, 1, 5, 5\) but the model's input 'x' is \(N, 1, 6, 6\): axis 2 must be 6"),
])
def test_bad_inputs(exported, make, match):
    _, path, x = exported
    with pytest.raises(DataError, match=match):
        ActivationClustering(str(path), ["logits"], n_clusters=2, progress=False).fit(make(x[:60]))


# a tensor that is not one row per input cannot be a layer
def test_layer_not_per_sample(tmp_path):
    class BatchMean(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x - x.mean(0, keepdim=True))

    path = _export(BatchMean().eval(), tmp_path / "bm.onnx", (torch.randn(3, 4),))
    mean = next(n for n in actclust.list_layers(str(path)) if adapt(str(path)).producer[n].op_type == "ReduceMean")
    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    with pytest.raises(CaptureError, match=rf"Layer '{mean}' gives an output of shape \(1, 4\), which is not one row per input"):
        ActivationClustering(str(path), [mean], n_clusters=2, progress=False).fit(x)


# the mean and the spatial summary computed inside the graph equal the shared reducers' on the host
# (channels-first and channels-last maps), and only (N, C) vectors leave onnxruntime
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_reductions_in_the_graph(trained_digits_cnn, tmp_path, monkeypatch, layout):
    from actclust.adapters.onnx import OnnxAdapter
    from actclust.capture.passes import hooked

    model, x_tr, _, x_te, _ = trained_digits_cnn
    if layout == "channels_first":
        path, layers, x = _export(model, tmp_path / "d.onnx", (torch.from_numpy(x_tr[:2]),)), \
            ["/conv1/Conv_output_0", "/conv2/Conv_output_0", "logits"], x_tr[:300]
    else:
        class NHWC(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.conv, self.head = nn.Conv2d(1, 24, 3, padding=1), nn.Linear(24, 10)

            def forward(self, x):
                h = torch.relu(self.conv(x).permute(0, 2, 3, 1))
                return self.head(h.mean((1, 2)))

        path = _export(NHWC().eval(), tmp_path / "nhwc.onnx", (torch.randn(2, 1, 8, 8),))
        layers, x = [next(n for n in actclust.list_layers(str(path)) if adapt(str(path)).producer[n].op_type == "Relu"),
                     "logits"], x_tr[:300]
    in_graph = ActivationClustering(str(path), layers, n_clusters=4, progress=False).fit(x)
    runner = OnnxAdapter(str(path)).runner(
        hooked({l: actclust.make_reducer("auto") for l in layers}, "l2", 4))
    assert set(runner.reduced) == {layers[0]} | ({layers[1]} if layout == "channels_first" else set())
    monkeypatch.setattr(OnnxAdapter, "reducible", lambda *a: False)
    on_host = ActivationClustering(str(path), layers, n_clusters=4, progress=False).fit(x)
    for key in on_host.train_vectors_:
        np.testing.assert_allclose(in_graph.train_vectors_[key], on_host.train_vectors_[key], rtol=1e-4, atol=1e-5)


# tensor names may hold ':' (tf2onnx's 'dense/BiasAdd:0'): a layer named after another one plus ':grid', where
# actclust keeps that one's spatial summary, is refused instead of overwriting it (which broke similar and explain)
def test_layer_named_like_a_summary():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["feat"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["feat"], ["feat:grid"]), helper.make_node("GlobalAveragePool", ["feat:grid"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]), helper.make_node("MatMul", ["flat", "wo"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
                               numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "wo")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    x = rng.normal(size=(200, 1, 8, 8)).astype(np.float32)
    with pytest.raises(ParameterError, match="The layers 'feat' and 'feat:grid' cannot both be in 'layers': actclust "
                                             "keeps the spatial summary of a layer under its name followed by ':grid'"):
        ActivationClustering(proto, ["feat", "feat:grid"], n_clusters=4, progress=False).fit(x)
    ac = ActivationClustering(proto, ["feat:grid", "gap"], n_clusters=4, progress=False).fit(x)  # alone: fine
    assert ac.similar(x[:2]).indices.shape == (2, 10)


# the command line on a model file: no warning about --weights (the file holds them; --weights is refused for it)
def test_cli_fit_on_a_model_file_says_nothing_of_weights(exported, tmp_path, capsys):
    from actclust.cli import main

    _, path, x = exported
    np.savez(tmp_path / "d.npz", x=x)
    fit = ["fit", str(path), "--layers", "/fc1/Gemm_output_0", "--data", str(tmp_path / "d.npz"), "--n-clusters", "3",
           "--quiet", "--no-prepare"]
    assert main(fit + ["--out", str(tmp_path / "run")]) == 0
    assert "--weights" not in capsys.readouterr().err
    torch.save({}, tmp_path / "w.pt")
    assert main(fit + ["--out", str(tmp_path / "run2"), "--weights", str(tmp_path / "w.pt")]) == 2
    assert "--weights is for a model built by package.module:callable" in capsys.readouterr().err


# a run keeps its ONNX model in its one file, which the manifest pins: a model the user gave with its tensors in an
# external-data file is kept whole (only the .onnx was copied), and a run whose kept model names external data
# (an unpinned file, or one outside the run) is refused when read (found by an outside security check)
def test_cli_runs_keep_onnx_models_whole(exported, tmp_path, capsys):
    import hashlib
    import json

    import onnx

    from actclust.cli import main

    _, path, x = exported
    np.savez(tmp_path / "d.npz", x=x)
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(onnx.load(str(path)), str(source / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    assert main(["fit", str(source / "m.onnx"), "--layers", "/fc1/Gemm_output_0", "--data", str(tmp_path / "d.npz"),
                 "--n-clusters", "3", "--quiet", "--no-prepare", "--out", str(tmp_path / "run")]) == 0
    (source / "m.data").unlink()  # the run does not need the user's files
    assert main(["score", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--quiet"]) == 0
    capsys.readouterr()
    # a kept model edited to read a tensor from another file, its hashes made to match as an attacker would
    run = tmp_path / "run"
    m = json.loads((run / "manifest.json").read_text())
    kept = run / m["metadata"]["model"]
    proto = onnx.load(str(kept))
    onnx.save_model(proto, str(kept), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)  # a file beside it that no hash of the run pins
    m["files"][kept.name] = hashlib.sha256(kept.read_bytes()).hexdigest()
    body = {k: v for k, v in m.items() if k != "digest"}
    m["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (run / "manifest.json").write_text(json.dumps(m))
    assert main(["score", str(run), "--data", str(tmp_path / "d.npz"), "--quiet"]) == 2
    assert "stores tensors in other files (ONNX external data), which no SHA-256 of the run pins" in \
        capsys.readouterr().err


# a binary classifier's one column (a sigmoid's probability, or its logit): the error says how to pass it as two
# classes, as the PyTorch and Keras adapters' do (the ONNX one listed the outputs only)
@pytest.mark.parametrize("squash, match", [
    (True, r"Output 'p' holds one value per input, all in \[0, 1\]: a sigmoid's probability\? Pass output=lambda o: "
           r"np.concatenate\(\[np.log1p\(-o\['p'\].reshape\(-1, 1\)\), np.log\(o\['p'\].reshape\(-1, 1\)\)\], 1\)"),
    (False, r"Output 'p' holds one value per input: a binary classifier's logit\? Pass output=lambda o: "
            r"np.concatenate\(\[np.zeros_like\(o\['p'\].reshape\(-1, 1\)\), o\['p'\].reshape\(-1, 1\)\], 1\)"),
])
def test_one_column_output_hint(tmp_path, squash, match):
    class Binary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, x):
            z = self.fc(x) - 100  # all negative: a logit, unless squashed
            return torch.sigmoid(z) if squash else z

    torch.manual_seed(0)
    path = _export(Binary().eval(), tmp_path / "binary.onnx", (torch.randn(2, 4),), outputs=("p",))
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(CaptureError, match=match):
        ActivationClustering(str(path), ["p"], n_clusters=2, progress=False).fit(x)
