import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import actclust
from actclust import ActivationClustering, CaptureError, DataWarning, list_layers
from actclust import TorchAdapter
from actclust.capture.reduction import make_reducer

from conftest import LAYERS, TinyCNN, hook_count


def _capture(model, x, layers, reducer="mean"):
    with TorchAdapter(model).runner({l: make_reducer(reducer) for l in layers}) as runner:
        logits, out = runner.run(torch.as_tensor(x), "rows 0-3 of X")
    return torch.from_numpy(logits), {l: torch.from_numpy(v) for l, v in out.items()}


# captured activations equal those of a manual forward pass, despite the in-place ReLU after conv
def test_capture_equals_manual_forward(model, data):
    x = torch.as_tensor(data[0][:10])
    logits, out = _capture(model, x, LAYERS)
    with torch.no_grad():
        conv = model.conv(x)
        conv_mean = conv.mean((2, 3))
        fc1 = model.fc1(model.flat(model.pool(torch.relu(conv))))
        fc2 = model.fc2(torch.relu(fc1))
    assert torch.allclose(out["conv"], conv_mean, atol=1e-6)
    assert (conv_mean < 0).any()  # proves the in-place ReLU did not overwrite what was captured
    assert torch.allclose(out["fc1"], fc1, atol=1e-6)
    assert torch.allclose(out["fc2"], fc2, atol=1e-6)
    assert torch.allclose(logits, fc2, atol=1e-6)


# no hook survives a successful pass, nor a model that raises mid-forward
def test_no_hook_left_after_success_and_after_raise(model, data):
    _capture(model, data[0][:4], LAYERS)
    assert hook_count(model) == 0

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model.act = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        _capture(model, data[0][:4], LAYERS)
    assert hook_count(model) == 0


# the train/eval flag of every module is restored after capture
def test_train_mode_restored(model, data):
    model.train()
    model.fc1.eval()
    _capture(model, data[0][:4], LAYERS)
    assert model.training and model.conv.training and not model.fc1.training


# a module that runs twice in one forward pass is reported, not mixed
def test_module_run_twice_is_reported(data):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(36, 36)
            self.out = nn.Linear(36, 3)

        def forward(self, x):
            return self.out(self.fc(self.fc(x.flatten(1))))

    m = Twice()
    with pytest.raises(CaptureError, match="'fc' ran more than once"):
        _capture(m, data[0][:4], ["fc"])
    assert hook_count(m) == 0


# a layer that never runs is an error naming it
def test_layer_that_never_ran(model, data):
    with pytest.raises(CaptureError, match=r"\['unused'\] did not run"):
        _capture(model, data[0][:4], ["fc1", "unused"])
    assert hook_count(model) == 0


# unknown layer: closest valid names and a pointer to list_layers
def test_unknown_layer_names_closest_and_list_layers(model, data):
    ac = ActivationClustering(model, ["fc_1"], progress=False)
    with pytest.raises(ValueError, match=r"Unknown layer 'fc_1'.*Did you mean 'fc1'.*list_layers"):
        ac.fit(data[0])
    assert hook_count(model) == 0


# outputs that are not (N, n_classes) logits are rejected with the shape seen
@pytest.mark.parametrize("head, match", [
    (lambda z: z[:, 0], r"shape \(N, n_classes\).*returned shape \(4,\)"),
    (lambda z: {"scores": z}, r"returned a dict; actclust looks for the logits.*output="),
    (lambda z: z.argmax(1, keepdim=True).repeat(1, 3), "floating-point logits"),
    # one logit (a sigmoid head): the message says how to pass it as two classes, as the Keras adapter's does
    (lambda z: z[:, :1] - 1e3, r"returned shape \(4, 1\). A binary classifier with one logit z\? Pass output=lambda z: "
                               r"torch.cat\(\[torch.zeros_like\(z\), z\], 1\)"),
    # a sigmoid's probability: read as a logit (the hint above), every input went to class 1 (an outside check)
    (lambda z: torch.sigmoid(z[:, :1]), r"returned shape \(4, 1\). Its values all lie in \[0, 1\]: a sigmoid's "
                                        r"probability p\? Pass output=lambda p: torch.cat\(\[torch.log1p\(-p\), "
                                        r"torch.log\(p\)\], 1\)"),
    # (loss, logits): the first element is no (N, C) tensor; the message names the one that is
    (lambda z: (z.sum(), z), r"returned shape \(\)\. It returns a tuple; its element 1 has shape \(4, 3\): if "
                             r"those are the logits, pass output=lambda o: o\[1\]"),
])
def test_non_logit_output(data, head, match):
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN()

        def forward(self, x):
            return head(self.net(x))

    m = Wrap()
    with pytest.raises(CaptureError, match=match):
        _capture(m, data[0][:4], ["net.fc1"])
    assert hook_count(m) == 0


# a model ending in nn.Softmax returns probabilities: read as logits they were softmaxed again, and explain gave
# confidences of 0.23 where the model said 0.998, without a word (found by an outside check); they are read as
# log-probabilities, as Keras and ONNX outputs are, so the DNN's confidences and predictions are the model's
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_output_read_as_probabilities(model, data, dtype):
    x, y = data
    probs = nn.Sequential(model, nn.Softmax(1)).to(dtype)
    with torch.no_grad():
        p = probs(torch.as_tensor(x[:50]).to(dtype)).float().numpy()
    ac = ActivationClustering(probs, [f"0.{l}" for l in LAYERS], n_clusters=4, progress=False).fit(x, y)
    es = ac.explain(x[:50], trust=False)
    np.testing.assert_allclose([e.dnn["probabilities"] for e in es], p, rtol=1e-4, atol=1e-6)
    assert [e.dnn["prediction"] for e in es] == p.argmax(1).tolist()
    logits, _ = _capture(probs, x[:4], ["0.fc1"])
    np.testing.assert_allclose(logits.numpy(), np.log(p[:4]), rtol=1e-4, atol=1e-5)


# bfloat16 inputs (NumPy has no such dtype): taken as float32 values, which hold them exactly; the input statistics'
# .numpy() raised TypeError at fit and at every query (an outside check). A bfloat16 model is fed them as they are
def test_bfloat16_inputs(model, data):
    x, y = data
    xb = torch.as_tensor(x).bfloat16()
    ac = ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(xb, y)
    plain = ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(xb.float(), y)
    np.testing.assert_array_equal(ac.predict(xb[:20]), plain.predict(xb[:20].float()))
    half = copy.deepcopy(model).bfloat16()
    fitted = ActivationClustering(half, LAYERS, n_clusters=4, progress=False).fit(xb, y)
    assert fitted.similar(xb[:3], k=2).indices.shape == (3, 2)


# a layer that gives one vector for every sample (dead, constant): k-means leaves all but one cluster empty, and that
# was kept without a word (an outside check); it is said, naming the layer
def test_constant_layer_said(data):
    x, y = data

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.dead, self.out = nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x.flatten(1)))
            self.dead(-h.abs() - 1)  # all zeros, captured only
            return self.out(h)

    with pytest.warns(DataWarning, match=r"Layer 'dead': only 1 of its 4 clusters hold training samples; the others are "
                                         r"empty\. The layer gives fewer distinct vectors than clusters"):
        ActivationClustering(Dead(), ["fc1", "dead"], n_clusters=4, progress=False).fit(x, y)


# before any fit knows the inputs' shape, a convolution's channel error says what it means: channels last (a
# transpose) or no channel axis (x[:, None]); it was PyTorch's message alone (found by an outside new-user check)
def test_channel_errors_before_fit_name_the_fix():
    from actclust.models import digits_cnn

    x = np.random.default_rng(0).random((40, 8, 8, 1)).astype(np.float32)
    for inputs, match in [(x, r"look channels-last \(40, 8, 8, 1\); PyTorch convolutions take channels first: "
                              r"x.transpose\(0, 3, 1, 2\). Otherwise check"),
                          (x[..., 0], r"inputs \(40, 8, 8\) have no channel axis; add it: x\[:, None\]")]:
        with pytest.raises(CaptureError, match=match):
            ActivationClustering(digits_cnn(), ["conv1", "fc1"], n_clusters=2, progress=False).fit(inputs)
    # uint8 token ids to an embedding: the dtype to give (it was the generic hint alone)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).eval()
    with pytest.raises(CaptureError, match=r"Token ids must be int64 \(or int32\) for an embedding: x.astype"):
        ActivationClustering(emb, ["1", "2"], n_clusters=2, progress=False).fit(np.ones((20, 3), np.uint8))


# a sigmoid head over several classes: probabilities read as logits flattened every confidence (0.997 shown as 0.16)
# without a word (found by an outside edge-case check); fit says so once, and output= with their log reads them
def test_sigmoid_outputs_said_once(model, data):
    import warnings

    class Sharp(nn.Module):  # a trained head's confident logits
        def forward(self, z):
            return 20 * z

    x, y = data
    probs = nn.Sequential(model, Sharp(), nn.Sigmoid())
    with pytest.warns(actclust.ActClustWarning, match=r"outputs all lie in \[0, 1\] without summing to 1 per row: "
                                                      r"probabilities of a sigmoid head\?.*output=lambda p: "
                                                      r"torch.log\(p\)") as said:
        ActivationClustering(probs, [f"0.{l}" for l in LAYERS], n_clusters=4, progress=False).fit(x, y)
    assert sum("without summing to 1" in str(w.message) for w in said) == 1 and said[0].filename == __file__
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The model's outputs all lie", actclust.ActClustWarning)
        logged = ActivationClustering(probs, [f"0.{l}" for l in LAYERS], n_clusters=4, progress=False,
                                      output=torch.log).fit(x, y)
    with torch.no_grad():
        p = probs(torch.as_tensor(x[:5])).numpy()
    e = logged.explain(x[:5], trust=False)
    np.testing.assert_allclose([d.dnn["probabilities"] for d in e], p / p.sum(1, keepdims=True), rtol=1e-4)


# one fitted explainer used from two threads: each pass hooks the shared model, so one pass's hooks saw the other's
# layers run and failed with "ran more than once" (found by an outside check); passes now take turns per model
def test_two_threads_explain_one_explainer(mixed_model, data):
    import threading

    x, y = data
    ac = ActivationClustering(mixed_model, LAYERS, n_clusters=4, progress=False).fit(x, y)
    expected = [e.to_dict() for e in ac.explain(x[:40], trust=False)]
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append([e.to_dict() for e in ac.explain(x[:40], trust=False)])
        except Exception as e:  # noqa: BLE001 - any failure is the test's finding
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(results) == 15 and all(r == expected for r in results)
    assert hook_count(mixed_model) == 0


# an output= function that raises is said as its own error, not the model's ("The model raised ... check the inputs")
def test_output_function_error_is_its_own(model, data):
    with pytest.raises(CaptureError, match=r"The output= function raised ZeroDivisionError: division by zero -- it is "
                                           r"given the model's output"):
        ActivationClustering(model, LAYERS, n_clusters=3, progress=False, output=lambda z: 1 / 0).fit(data[0])


# a process forked while another thread holds a model's capture lock starts with free locks: its child hung forever
# on the copied, held lock (found by an outside check: forks while a thread explains)
def test_fork_while_a_pass_holds_the_lock(mixed_model, data):
    import os
    import signal
    import threading
    import time

    from actclust.adapters.torch import _model_lock

    x, y = data
    ac = ActivationClustering(mixed_model, LAYERS, n_clusters=4, progress=False).fit(x, y)
    held, release = threading.Event(), threading.Event()

    def hold():
        with _model_lock(mixed_model):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: explain once, exit 0 (a hang is killed below)
        try:
            torch.set_num_threads(1)  # OpenMP's pool does not survive a fork (a hang of its own, not ours)
            ac.predict(x[:3])
            os._exit(0)
        except BaseException:
            os._exit(1)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on a capture lock held by the parent's other thread")
    finally:
        release.set()
        t.join()
    assert os.waitstatus_to_exitcode(status) == 0


# a model returning (features, logits) is read through its first element: said once, with the output= to give (its
# 12 features were read as 12 classes without a word); a forward() of keyword-only inputs gets the form to pass
def test_tuple_output_and_keyword_only_forward(data):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN(seed=3, bias=False)

        def forward(self, x):
            z = self.net(x)
            return torch.cat([z, z], 1), z

    with pytest.warns(actclust.ActClustWarning, match=r"returns a tuple of 2 values; actclust reads the logits from the "
                                                      r"first, of shape \(\d+, 6\).*output=lambda o: o\[1\]"):
        ActivationClustering(Pair(), ["net.fc1"], n_clusters=3, progress=False).fit(data[0])

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN(seed=3, bias=False)

        def forward(self, *, x):
            return self.net(x)

    class Recurrent(nn.Module):  # (logits, h): h is (layers, N, H), not a second (N, d) candidate: nothing said
        def __init__(self):
            super().__init__()
            self.net = TinyCNN(seed=3, bias=False)

        def forward(self, x):
            z = self.net(x)
            return z, z[None]

    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The model returns a", actclust.ActClustWarning)
        ActivationClustering(Recurrent(), ["net.fc1"], n_clusters=3, progress=False).fit(data[0])
    with pytest.raises(CaptureError, match=r"forward\(\) takes its inputs by keyword: pass X as a dict of them"):
        ActivationClustering(Keyword(), ["net.fc1"], n_clusters=3, progress=False).fit(data[0])
    ActivationClustering(Keyword(), ["net.fc1"], n_clusters=3, progress=False).fit({"x": data[0]})


# NaN or infinite activations name the layer
def test_nan_activations_name_the_layer(model, data):
    x = data[0][:4].copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(CaptureError, match=r"layer 'conv' contain NaN or infinite values at row 0 of rows 0-3 of X"):
        _capture(model, x, ["conv"])
    assert hook_count(model) == 0


# list_layers gives names, and output shapes when given a sample
def test_list_layers(model, data):
    names = list_layers(model)
    assert names[:3] == ["conv", "relu", "pool"] and "unused" in names
    shapes = list_layers(model, torch.as_tensor(data[0][:5]))
    assert shapes["conv"] == (5, 4, 6, 6) and shapes["fc2"] == (5, 3) and "unused" not in shapes
    assert hook_count(model) == 0
    assert actclust.list_layers is list_layers


class _Recurrent(nn.Module):
    """Token ids -> an LSTM over time -> logits from its last state; ``batch_first`` as given."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb, self.lstm, self.fc = nn.Embedding(30, 8), nn.LSTM(8, 12, batch_first=batch_first), nn.Linear(12, 2)

    def forward(self, x):
        e = self.emb(x)
        _, (h, _) = self.lstm(e if self.batch_first else e.transpose(0, 1))
        return self.fc(h[-1])


# a layer whose output is not one row per input (an LSTM without batch_first gives (T, N, H)) is refused, naming
# the layer, also where its sequences are as long as the batch (every batch then matches on the first axis)
@pytest.mark.parametrize("batch_size", [10, 16])
def test_sequence_first_layer_refused(batch_size):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (40, 10))  # 10 steps: batches of 10 take the time axis for the batch one
    with pytest.raises(CaptureError, match=r"The layer 'lstm' output shape \(10, \d+, 12\) for a batch of \d+: not one "
                                           r"row per sample \(a sequence-first output, as nn.LSTM"):
        ActivationClustering(_Recurrent(False).eval(), ["lstm", "fc"], n_clusters=2, batch_size=batch_size,
                             progress=False).fit(ids)
    ac = ActivationClustering(_Recurrent(True).eval(), ["lstm", "fc"], n_clusters=2, batch_size=batch_size,
                              progress=False).fit(ids)
    assert ac.train_vectors_["lstm"].shape == (40, 12)
    # list_layers says so too (it showed such a layer as a token map to average, which fit then refused)
    assert list_layers(_Recurrent(False).eval(), ids[:2])["lstm"].reduction == (
        "not one row per sample (first axis 10 for a sample of 2: sequence-first?), so it cannot be captured: choose "
        "a layer whose output has the batch axis first")
    assert list_layers(_Recurrent(True).eval(), ids[:2])["lstm"].reduction.startswith("mean over all tokens")


# a module kept under two attribute names (self.act = self.relu) is a layer by either: PyTorch lists it once, under
# its first name, and a fit asking for the other was refused as unknown (an outside check)
def test_module_under_two_names():
    from torch import nn

    import actclust

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.relu, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)
            self.act = self.relu

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    model = Aliased().eval()
    assert actclust.list_layers(model) == ["fc1", "relu", "fc2", "act"]  # in the order of registration
    x = np.random.default_rng(0).standard_normal((120, 4)).astype(np.float32)
    by_alias = actclust.ActivationClustering(model, ["act", "fc2"], n_clusters=3, progress=False).fit(x)
    by_name = actclust.ActivationClustering(model, ["relu", "fc2"], n_clusters=3, progress=False).fit(x)
    assert by_alias.state_.layers == ["act", "fc2"]
    np.testing.assert_array_equal(np.asarray(by_alias.state_.train_vectors["act"]),
                                  np.asarray(by_name.state_.train_vectors["relu"]))


class _Encoder(nn.Module):
    """Token ids and an attention mask through nn.TransformerEncoder, whose fast path (eval, no grad, a padding mask)
    hands nested tensors, padding dropped, from layer to layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
        self.fc = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)[:, 0])


# the inner layers of an nn.TransformerEncoder give nested tensors on PyTorch's fast path: read padded back to the
# batch's tokens, they average the real tokens as the slow path's outputs do (the hooks failed on them, "the model
# raised RuntimeError", and list_layers on the whole model)
def test_nested_tensors_of_the_transformer_fast_path():
    model = _Encoder().eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 13, (40,), generator=g)
    lengths[0] = 9  # no input of all 12 tokens: the nested tensors are shorter than the mask
    lengths = torch.minimum(lengths, torch.tensor(11))
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1, 30, (40, 12), generator=g) * mask, "attention_mask": mask}
    assert list_layers(model, batch)["enc.layers.0"].layout == "tokens"
    ac = ActivationClustering(model, ["enc.layers.0", "fc"], n_clusters=3, normalize=None, progress=False).fit(batch)
    seen = []
    handle = model.enc.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
        handle.remove()
    keep = mask[:, :, None].float()
    want = ((seen[0] * keep).sum(1) / keep.sum(1)).numpy()
    np.testing.assert_allclose(ac.train_vectors_["enc.layers.0"], want, rtol=1e-4, atol=1e-5)


# a layer of one value per sample (N,) is a vector of one, and integer or boolean outputs are read as floats (the
# reducers failed on them inside the hooks, and the error blamed the model's inputs)
def test_one_value_and_integer_layers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l, self.score, self.flags, self.fc = nn.Linear(6, 8), nn.Identity(), nn.Identity(), nn.Linear(8, 3)

        def forward(self, x):
            h = self.l(x)
            return self.fc(h + self.score(h.sum(1))[:, None] + self.flags(h > 0).float())

    x = torch.randn(50, 6)
    model = Odd().eval()
    ac = ActivationClustering(model, ["score", "flags"], n_clusters=3, normalize=None, progress=False).fit(x)
    with torch.no_grad():
        h = model.l(x)
    np.testing.assert_allclose(ac.train_vectors_["score"], h.sum(1, keepdim=True).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(ac.train_vectors_["flags"], (h > 0).float().numpy())


# what fails while a hook reduces a layer's output is said of that layer, not as the model's error on its inputs
def test_a_failed_reduction_names_its_layer(monkeypatch, model, data):
    from actclust.adapters.torch_ops import OPS

    def broken(t, mask=None):
        raise RuntimeError("no such reduction")
    monkeypatch.setattr(type(OPS), "mean_last", lambda self, t, mask=None: broken(t, mask))
    with pytest.raises(CaptureError, match=r"Layer 'conv' gave an output of shape \(120, 4, 6, 6\) that actclust could "
                                           r"not reduce to vectors on .*\(RuntimeError: no such reduction\); choose "
                                           r"another layer, or another reducer"):
        ActivationClustering(model, ["conv"], n_clusters=3, progress=False).fit(data[0])


# a model split over devices (Hugging Face's device_map="auto"): the mask is on the input's device, a layer's output on
# another; the masked reductions read the mask where the output lies ("meta" stands for a second device here)
@pytest.mark.parametrize("reduction", ["mean_last", "amax_last", "first_kept"])
def test_masked_reductions_follow_the_layers_device(reduction):
    from actclust.adapters.torch_ops import OPS

    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    t = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    on_cpu = getattr(OPS, reduction)(t if reduction != "first_kept" else t.transpose(1, 2), mask)
    elsewhere = getattr(OPS, reduction)(t.to("meta") if reduction != "first_kept" else t.transpose(1, 2).to("meta"), mask)
    assert elsewhere.device.type == "meta" and elsewhere.shape == on_cpu.shape
    want = {"mean_last": torch.stack([t[0, :, :2].mean(1), t[1, :, 1:].mean(1)]),
            "amax_last": torch.stack([t[0, :, :2].amax(1), t[1, :, 1:].amax(1)]),
            "first_kept": torch.stack([t[0, :, 0], t[1, :, 1]])}[reduction]
    torch.testing.assert_close(on_cpu, want)


# a token map shorter than the batch's attention mask (a strided convolution before it): the mask cannot say which
# of its tokens are padding, so all are averaged, and a warning says so once (the reducer failed on the two lengths)
def test_tokens_fewer_than_the_mask():
    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.conv = nn.Embedding(40, 16), nn.Conv1d(16, 16, 2, stride=2)
            self.lstm, self.fc = nn.LSTM(16, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, input_ids, attention_mask):
            out, _ = self.lstm(self.conv(self.emb(input_ids).transpose(1, 2)).transpose(1, 2))
            return self.fc(out[:, -1])

    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1, 40, (60, 12), generator=g), torch.ones(60, 12, dtype=torch.long)
    mask[:, 10:] = 0
    model = Down().eval()
    with pytest.warns(actclust.DataWarning, match=r"Layer 'lstm' gives 6 tokens where the batch's attention mask has "
                                                   r"12: .* its vectors average all of them, padding included") as seen:
        ac = ActivationClustering(model, ["lstm"], n_clusters=3, normalize=None, progress=False, batch_size=20).fit(
            {"input_ids": ids, "attention_mask": mask})
    assert sum("gives 6 tokens" in str(w.message) for w in seen) == 1
    with torch.no_grad():
        want = model.lstm(model.conv(model.emb(ids).transpose(1, 2)).transpose(1, 2))[0].mean(1).numpy()
    np.testing.assert_allclose(ac.train_vectors_["lstm"], want, rtol=1e-5, atol=1e-6)
    # list_layers says what fit does (it said the mask was used: an outside check on wav2vec 2.0)
    sample = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    assert list_layers(model, sample)["lstm"].reduction == (
        "mean over all 6 tokens, padding included (the attention mask covers 12: it cannot say which of these are padding)")
    assert list_layers(model, sample)["emb"].reduction == "mean over the tokens the attention mask keeps"


# a dense layer kept as it is (normalize=None) is copied in its hook: the in-place ReLU after it changed what was
# captured (to the ReLU's output) before the pass ended
def test_in_place_module_after_a_dense_layer():
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).eval()
    ac = ActivationClustering(model, ["0", "2"], n_clusters=3, normalize=None, progress=False).fit(x)
    with torch.no_grad():
        np.testing.assert_allclose(ac.train_vectors_["0"], model[0](x).numpy(), rtol=1e-6)
    assert (ac.train_vectors_["0"] < 0).any()


# an RNN fed packed sequences returns a PackedSequence: padded back, in the batch's order, each sequence averaged over
# its own steps (list_layers left it out and fit refused it, "no tensor first"); a module that runs twice in a pass is
# listed as such (fit refuses it)
def test_packed_sequences_and_modules_run_twice():
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lstm, self.act, self.fc = nn.LSTM(3, 8, batch_first=True), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x, lengths):
            _, (h, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.fc(self.act(self.act(h[0])))

    g = torch.Generator().manual_seed(0)
    x, lengths = torch.randn(40, 10, 3, generator=g), torch.randint(2, 11, (40,), generator=g)
    model = Packed().eval()
    shown = list_layers(model, (x[:2], lengths[:2]))
    assert shown["lstm"] == (2, int(lengths[:2].max()), 8) and shown["lstm"].layout == "tokens"
    assert shown["act"].reduction.startswith("runs 2 times in one forward pass, so it cannot be captured")
    ac = ActivationClustering(model, ["lstm", "fc"], n_clusters=3, normalize=None, progress=False, batch_size=16).fit(
        (x, lengths))
    with torch.no_grad():
        want = [model.lstm(x[i:i + 1, :n])[0][0].mean(0).numpy() for i, n in enumerate(lengths.tolist())]
    np.testing.assert_allclose(ac.train_vectors_["lstm"], np.stack(want), rtol=1e-4, atol=1e-5)
    with pytest.raises(CaptureError, match=r"The layer 'act' ran more than once in one forward pass"):
        ActivationClustering(model, ["act"], n_clusters=3, progress=False).fit((x, lengths))


# a model fed (ids, lengths) packs its sequences itself: its embedding, a token map of a batch without an attention
# mask, is averaged over every position, padding included, and is now said to be (once, naming it, not the LSTM whose
# packed output has its own lengths); list_layers says so of unmasked token maps; a dict with a mask warns of nothing
def test_unmasked_token_maps_of_token_ids_warned():
    from torch.nn.utils.rnn import pack_padded_sequence

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.lstm, self.fc = nn.Embedding(20, 4, padding_idx=0), nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 3)

        def forward(self, ids, lengths=None, attention_mask=None):
            if lengths is None:
                lengths = attention_mask.sum(1)
            _, (h, _) = self.lstm(pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False))
            return self.fc(h[0])

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 9, (60,), generator=g)
    keep = torch.arange(8)[None] < lengths[:, None]
    ids = torch.randint(1, 20, (60, 8), generator=g) * keep
    model = Text().eval()
    assert list_layers(model, (ids[:2], lengths[:2]))["emb"].reduction == (
        "mean over all tokens (the sample has no attention mask: padding, if any, included)")
    with pytest.warns(actclust.DataWarning, match=r"Layer\(s\) \['emb'\] are token maps averaged over all 8 positions: the "
                                         r"batches carry no attention mask.*'attention_mask' \(1 for real tokens\)"):
        ActivationClustering(model, ["emb", "lstm", "fc"], n_clusters=3, progress=False).fit((ids, lengths))
    masked = {"ids": ids, "attention_mask": keep.long()}
    assert list_layers(model, {k: v[:2] for k, v in masked.items()})["emb"].reduction == (
        "mean over the tokens the attention mask keeps")
    with warnings.catch_warnings():
        warnings.simplefilter("error", actclust.DataWarning)
        ac = ActivationClustering(model, ["emb", "lstm", "fc"], n_clusters=3, normalize=None, progress=False).fit(masked)
    with torch.no_grad():
        want = torch.stack([model.emb(ids[i, :n]).mean(0) for i, n in enumerate(lengths.tolist())]).numpy()
    np.testing.assert_allclose(ac.train_vectors_["emb"], want, rtol=1e-5, atol=1e-6)
