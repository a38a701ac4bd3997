"""The networks users bring: BatchNorm ResNets, Hugging Face models fed dict batches, DataParallel,
torch.compile and half-precision copies, TorchScript (refused), custom outputs."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import actclust
from actclust import (ActClustWarning, ActivationClustering, ModelMismatchWarning, ParameterError,
                      UnsupportedModelError)
from actclust.models import resnet18

from conftest import hook_count

RESNET_LAYERS = ["layer1", "layer2", "layer4", "fc"]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = resnet18(in_channels=1, n_classes=10, width=8)
    # a few training steps so BatchNorm has running statistics and num_batches_tracked > 0
    x = torch.randn(64, 1, 28, 28)
    m.train()
    with torch.no_grad():
        for xb in x.split(16):
            m(xb)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((160, 1, 28, 28)).astype(np.float32)


def _fit(model, x, layers=RESNET_LAYERS, **kw):
    return ActivationClustering(model, layers, n_clusters=4, progress=False, **kw).fit(x)


def _strict_load(path, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return actclust.load(path, model, progress=False, **kw)


# a BatchNorm ResNet fits, saves, loads, explains and reports; its 0-dim buffers are fingerprinted
def test_resnet_with_batchnorm_end_to_end(resnet, images, tmp_path):
    assert int(resnet.bn1.num_batches_tracked) == 4 and resnet.bn1.num_batches_tracked.ndim == 0
    ac = _fit(resnet, images)
    ac.save(tmp_path / "run")
    loaded = _strict_load(tmp_path / "run", resnet)
    assert np.array_equal(loaded.predict(images), ac.predict(images))
    e = loaded.explain(images[:3], k=2, trust=False)
    assert [l["layer"] for l in e[0].layers] == RESNET_LAYERS
    path = actclust.report(loaded, images[:40], train=images, out=tmp_path / "r.html", n_correct=2, n_wrong=2)
    assert path.stat().st_size > 1000
    bumped = copy.deepcopy(resnet)
    bumped.bn1.num_batches_tracked += 1  # only a 0-dim buffer differs: the fingerprint sees it
    assert actclust.model_fingerprint(bumped) != actclust.model_fingerprint(resnet)


# fingerprints hash every dtype: bfloat16, bool and 0-dim buffers
def test_fingerprint_every_dtype(resnet):
    m = copy.deepcopy(resnet).bfloat16()
    m.register_buffer("flag", torch.tensor(True))
    fp = actclust.model_fingerprint(m)
    m.flag.fill_(False)
    assert actclust.model_fingerprint(m) != fp


# DataParallel: a run moves between the wrapped and the unwrapped model, with no spurious warning
def test_dataparallel_both_ways(resnet, images, tmp_path):
    dp = nn.DataParallel(resnet)
    assert actclust.model_fingerprint(dp) == actclust.model_fingerprint(resnet)
    wrapped = _fit(dp, images, layers=["module.layer1", "module.layer2", "layer4", "fc"])
    plain = _fit(resnet, images)
    assert wrapped.layers_ == RESNET_LAYERS
    assert np.array_equal(wrapped.predict(images), plain.predict(images))
    wrapped.save(tmp_path / "wrapped")
    plain.save(tmp_path / "plain")
    assert np.array_equal(_strict_load(tmp_path / "wrapped", resnet).predict(images), plain.predict(images))
    assert np.array_equal(_strict_load(tmp_path / "plain", dp).predict(images), plain.predict(images))
    assert hook_count(resnet) == 0


# torch.compile: hooks cause no graph break (fullgraph=True would raise), passes do not recompile
# without bound, and a run saved from the compiled model loads on the plain one
def test_compiled_model(resnet, images, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(resnet, backend="aot_eager", fullgraph=True)
    ac = ActivationClustering(compiled, RESNET_LAYERS, n_clusters=4, batch_size=64, progress=False).fit(images)
    for _ in range(2):
        ac.score(images)  # 160 = 64 + 64 + 32: a partial batch in every pass
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 3  # one per batch shape (full, partial), not one per pass
    plain = _fit(resnet, images)
    assert np.array_equal(ac.predict(images), plain.predict(images))
    ac.save(tmp_path / "run")
    assert np.array_equal(_strict_load(tmp_path / "run", resnet).predict(images), plain.predict(images))
    torch._dynamo.reset()


# a compiled model run before actclust hooked it reuses a graph without hooks: detected, and the
# uncompiled module is run instead, with a warning, so results are still right
def test_compiled_model_warmed_up(resnet, images):
    torch._dynamo.reset()
    compiled = torch.compile(resnet, backend="aot_eager")
    with torch.no_grad():
        compiled(torch.from_numpy(images[:64]))
    with pytest.warns(ActClustWarning, match="compiled model skipped actclust's hooks"):
        ac = ActivationClustering(compiled, RESNET_LAYERS, n_clusters=4, batch_size=64, progress=False).fit(images)
    assert np.array_equal(ac.predict(images), _fit(resnet, images).predict(images))
    torch._dynamo.reset()


# a half-precision copy of the network is explained; vectors are kept in float32
def test_half_precision_copy(resnet, images):
    half = copy.deepcopy(resnet).half()
    ac = _fit(half, images)
    assert ac.train_vectors_["layer1"].dtype == np.float32
    with torch.no_grad():
        full = resnet(torch.from_numpy(images)).argmax(1).numpy()
    assert (ac.train_predictions_ == full).mean() > 0.9  # half's own predictions, close to float's
    assert ac.score(images)["fidelity"] == ac.train_score_["fidelity"]


# TorchScript modules run no hooks: refused with what to do
@pytest.mark.parametrize("convert", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(2, 1, 28, 28))])
def test_torchscript_refused(resnet, images, convert):
    scripted = convert(copy.deepcopy(resnet))
    with pytest.raises(UnsupportedModelError, match="TorchScript models cannot be explained.*Pass the original nn.Module"):
        _fit(scripted, images)


# torch.export's program.module() runs aten operations, not its sub-modules: refused with what to do (it failed in
# eval() with a bare NotImplementedError); its unflattened form and a symbolically traced model run their sub-modules
def test_exported_program_module_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(40, 6)
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    with pytest.raises(UnsupportedModelError, match=r"runs its graph's operations, not its sub-modules, so it calls no "
                                                    r"forward hooks.*torch.export.unflatten\(program\)"):
        ActivationClustering(program.module(), ["0", "2"], n_clusters=3, progress=False).fit(x)
    want = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=False).fit(x).train_vectors_["0"]
    for model in (torch.export.unflatten(program), torch.fx.symbolic_trace(net)):
        got = ActivationClustering(model, ["0", "2"], n_clusters=3, progress=False).fit(x).train_vectors_["0"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# logits in a dict, or picked by a user function; a run fitted with output= needs it again at load
def test_output_function(images, tmp_path):
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(28 * 28, 4)

        def forward(self, x):
            return {"scores": self.fc(x.flatten(1)), "logits": None}

    with pytest.raises(actclust.CaptureError, match=r"returned a dict; actclust looks for the logits.*output="):
        _fit(Scores(), images, layers=["fc"])
    m = Scores()
    ac = _fit(m, images, layers=["fc"], output=lambda out: out["scores"])
    ac.save(tmp_path / "run")
    with pytest.raises(ParameterError, match=r"fitted with a custom output= function; pass the same one"):
        actclust.load(tmp_path / "run", m)
    back = actclust.load(tmp_path / "run", m, output=lambda out: out["scores"], progress=False)
    assert np.array_equal(back.predict(images), ac.predict(images))


# a model whose weights really differ still warns after the fingerprint change
def test_mismatch_still_warns(resnet, images, tmp_path):
    _fit(resnet, images).save(tmp_path / "run")
    other = copy.deepcopy(resnet)
    with torch.no_grad():
        other.fc.weight.add_(1.0)
    with pytest.warns(ModelMismatchWarning, match="parameters differ"):
        actclust.load(tmp_path / "run", other, progress=False)


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def bert():
    from zoo import tiny_bert, token_task, train_token_model

    ids, mask, y = token_task(800, seed=0)
    model = train_token_model(tiny_bert(), ids[:600], mask[:600], y[:600], epochs=10)
    return model, ids, mask, y


BERT_REDUCERS = {"bert.encoder.layer.0": "token_mean", "bert.encoder.layer.1": "token_first",
                 "bert.pooler": "mean", "classifier": "mean"}


# a Hugging Face classifier fed dict batches with attention masks: fitted, faithful, saved and loaded
def test_hugging_face_dict_batches(bert, tmp_path):
    model, ids, mask, y = bert
    ac = ActivationClustering(model, list(BERT_REDUCERS), reducer=BERT_REDUCERS, n_clusters=4, progress=False)
    ac.fit({"input_ids": ids[:600], "attention_mask": mask[:600]}, y[:600])
    test = {"input_ids": ids[600:], "attention_mask": mask[600:]}
    assert len(np.unique(ac.train_predictions_)) == 3  # a trained model, not a constant one
    assert ac.score(test, y[600:])["fidelity"] >= 0.8
    ac.save(tmp_path / "run")
    back = _strict_load(tmp_path / "run", model)
    assert np.array_equal(back.predict(test), ac.predict(test))
    e = back.explain({k: v[:2] for k, v in test.items()}, trust=False)
    assert e[0].meta["model_class"].endswith("BertForSequenceClassification")
    train = {"input_ids": ids[:600], "attention_mask": mask[:600]}
    html = actclust.report(back, test, y[600:], train=train, out=tmp_path / "r.html", n_correct=1, n_wrong=1,
                           trust=False).read_text()
    # token inputs show as tokens with the padding hidden (issue 21), not as rows of ids and masks
    assert html.count('<div class="tok">') == 2 and "padding token" in html and "attention_mask" not in html
    # a tokenizer's whole output as train (token_type_ids too, which fit did not take): drawn, not refused by the
    # check that train is fit's data (it runs the model only on what fit took; found by an outside check)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", actclust.DataWarning)
        actclust.report(back, test, y[600:], train={**train, "token_type_ids": torch.zeros_like(ids[:600])},
                        out=tmp_path / "r2.html", n_correct=1, n_wrong=1, trust=False)


# (ids, labels) as X is the model's inputs in order: the labels reached BERT as its attention mask, and the model's
# error did not say so; it now says to pass the labels as y=
def test_labels_in_a_tuple_named(bert):
    model, ids, _, y = bert
    ac = ActivationClustering(model, list(BERT_REDUCERS), reducer=BERT_REDUCERS, n_clusters=4, progress=False)
    with pytest.raises(actclust.CaptureError, match=r"input 1: shape \(\d+,\), int64\).*its last element holds one "
                       r"integer per sample: if those are the labels, pass them as y= \(fit\(X, y\)\)"):
        ac.fit((ids[:600], y[:600]))


# more padding (masked tokens) leaves every layer's vector unchanged with token reducers
def test_padding_invariance(bert):
    model, ids, mask, y = bert
    ac = ActivationClustering(model, list(BERT_REDUCERS), reducer=BERT_REDUCERS, n_clusters=4, progress=False)
    ac.fit({"input_ids": ids[:600], "attention_mask": mask[:600]})
    pad = torch.zeros(200, 9, dtype=torch.int64)
    q1 = ac.query({"input_ids": ids[600:], "attention_mask": mask[600:]}, vectors=True)
    q2 = ac.query({"input_ids": torch.cat([ids[600:], pad], 1), "attention_mask": torch.cat([mask[600:], pad], 1)},
                  vectors=True)
    for l in BERT_REDUCERS:
        np.testing.assert_allclose(q2.vectors[l], q1.vectors[l], atol=1e-5)
    assert np.array_equal(q2.paths, q1.paths)


# defaults on a BERT classifier: token layers are read as tokens and pooled over the real ones (the old
# default "mean" reduced over the hidden size, so vectors moved with padding and a longer batch failed)
def test_bert_defaults(bert):
    import dataclasses

    model, ids, mask, _ = bert
    layers = ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler", "classifier"]
    x = {"input_ids": ids[:300], "attention_mask": mask[:300]}
    ac = ActivationClustering(model, layers, n_clusters=3, progress=False).fit(x)
    assert ac.state_.layouts == dict(zip(layers, ["tokens"] * 3 + ["dense"] * 2))
    pad = torch.zeros(100, 9, dtype=torch.int64)
    q1 = ac.query({"input_ids": ids[600:700], "attention_mask": mask[600:700]}, vectors=True)
    q2 = ac.query({"input_ids": torch.cat([ids[600:700], pad], 1), "attention_mask": torch.cat([mask[600:700], pad], 1)},
                  vectors=True)
    for l in layers:
        np.testing.assert_allclose(q2.vectors[l], q1.vectors[l], atol=1e-5)
    # batches as long as the sequences: fit looks once at one input less to tell the batch axis from the tokens'
    # (the token maps' mask cut with the inputs), and reads the same vectors
    same = ActivationClustering(model, layers, n_clusters=3, batch_size=ids.shape[1], progress=False).fit(x)
    for l in layers:
        np.testing.assert_allclose(same.train_vectors_[l], ac.train_vectors_[l], atol=1e-5)
    shown = actclust.list_layers(model, {"input_ids": ids[:2], "attention_mask": mask[:2]})
    assert shown["bert.encoder.layer.0"].reduction == "mean over the tokens the attention mask keeps"
    assert shown["classifier"].reduction == "as is (dense)"
    # a run saved before layouts were recorded reads token maps channels-first, as it was fitted: that warns
    ac.state_ = dataclasses.replace(ac.state_, layouts={l: "channels_first" for l in layers})
    with pytest.warns(actclust.DataWarning, match=r"'bert.encoder.layer.0' outputs token vectors .*reducer='token_mean'"):
        ac.query(x)


# without the mask, a plain mean over tokens would move with padding: the masked mean is what fixes it
def test_masked_mean_is_needed(bert):
    from actclust.capture.reduction import make_reducer

    model, ids, mask, _ = bert
    t = torch.randn(4, 10, 5)
    m = torch.ones(4, 10, dtype=torch.int64)
    m[:, 6:] = 0
    red = make_reducer("token_mean")
    np.testing.assert_allclose(red(t, m), t[:, :6].mean(1), atol=1e-6)
    assert not torch.allclose(red(t, None), t[:, :6].mean(1))


# the Hugging Face model through DataParallel and torch.compile: same clusters, no graph break from hooks
def test_hugging_face_wrapped_and_compiled(bert):
    from torch._dynamo.utils import counters

    model, ids, mask, _ = bert
    x = {"input_ids": ids[:300], "attention_mask": mask[:300]}
    plain = ActivationClustering(model, list(BERT_REDUCERS), reducer=BERT_REDUCERS, n_clusters=4, progress=False).fit(x)
    dp = ActivationClustering(nn.DataParallel(model), list(BERT_REDUCERS), reducer=BERT_REDUCERS, n_clusters=4,
                              progress=False).fit(x)
    assert np.array_equal(dp.cluster_paths(x), plain.cluster_paths(x))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    cm = ActivationClustering(compiled, list(BERT_REDUCERS), reducer=BERT_REDUCERS, n_clusters=4, progress=False).fit(x)
    assert not counters["graph_break"]
    assert np.array_equal(cm.cluster_paths(x), plain.cluster_paths(x))
    torch._dynamo.reset()


# the vector store on disk and the spatial summaries on models unlike the demo CNN: a BatchNorm
# ResNet (conv summaries projected to 64 values), the same wrapped in DataParallel, a Hugging Face
# model fed dict batches with attention masks (token maps: no summary), and a pandas table. Each
# gives what the in-memory fit gives, saves, reloads memory-mapped, and finds the same neighbours.
@pytest.mark.parametrize("case", ["resnet", "dataparallel", "bert", "pandas"])
def test_disk_store_on_real_models(case, resnet, images, bert, tmp_path):
    if case in ("resnet", "dataparallel"):
        model = resnet if case == "resnet" else nn.DataParallel(resnet)
        layers, kw, x, y = RESNET_LAYERS, {}, images, None
    elif case == "bert":
        model, ids, mask, y_all = bert
        layers, kw = list(BERT_REDUCERS), {"reducer": BERT_REDUCERS}
        x, y = {"input_ids": ids[:300], "attention_mask": mask[:300]}, y_all[:300]
    else:
        pd = pytest.importorskip("pandas")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        x = pd.DataFrame(np.random.default_rng(0).standard_normal((150, 4)).astype(np.float32),
                         columns=["age", "bmi", "bp", "s1"])
        layers, kw, y = ["1", "2"], {}, None
    mem = ActivationClustering(model, layers, n_clusters=4, progress=False, **kw).fit(x, y)
    disk = ActivationClustering(model, layers, n_clusters=4, progress=False, store=tmp_path / "v", **kw).fit(x, y)
    summaries = [k for k in disk.state_.train_vectors if k.endswith(":grid")]
    assert summaries == ([f"{l}:grid" for l in ["layer1", "layer2", "layer4"]] if case in ("resnet", "dataparallel")
                         else [])
    assert all(disk.train_vectors_[k].shape[1] == 64 for k in summaries)  # 8+ channels x 16 cells, projected
    assert np.array_equal(disk.predict(x), mem.predict(x))
    near = disk.similar(x, k=3, search="exact").indices
    assert np.array_equal(near, mem.similar(x, k=3, search="exact").indices)
    disk.save(tmp_path / "run")
    back = _strict_load(tmp_path / "run", model)
    assert back.state_.train_vectors.on_disk
    assert np.array_equal(back.predict(x), disk.predict(x))
    assert np.array_equal(back.similar(x, k=3, search="exact").indices, near)
    signals = back.trust(x, n_neighbors=5, calibration_fraction=0.2)
    assert np.isfinite(signals["credibility"]).all()


# trust calibrated on held-out data, on models unlike the demo CNN: dict batches with attention
# masks, a BatchNorm ResNet in DataParallel, a pandas table; the same signals after save and load
@pytest.mark.parametrize("case", ["bert", "resnet-dataparallel", "pandas"])
def test_held_out_trust_on_real_models(case, resnet, images, bert, tmp_path):
    if case == "bert":
        model, ids, mask, y = bert
        data = {"input_ids": ids, "attention_mask": mask}
        x_fit, x_val, x_q = ({k: v[a:b] for k, v in data.items()} for a, b in ((0, 600), (600, 760), (760, 800)))
        y_fit, y_val = y[:600].numpy(), y[600:760].numpy()
        layers, kw = list(BERT_REDUCERS), {"reducer": BERT_REDUCERS}
    elif case == "resnet-dataparallel":
        model, layers, kw = torch.nn.DataParallel(resnet), ["module.layer1", "module.layer4", "module.fc"], {}
        y_all = resnet(torch.from_numpy(images)).argmax(1).numpy()
        y_all[::4] = (y_all[::4] + 1) % 10  # labels the network gets wrong a quarter of the time
        x_fit, x_val, x_q, y_fit, y_val = images[:100], images[100:140], images[140:], y_all[:100], y_all[100:140]
    else:
        import pandas as pd

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 3)).eval()
        x = np.random.default_rng(1).standard_normal((400, 4)).astype(np.float32)
        df = pd.DataFrame(x, columns=["age", "bmi", "bp", "s1"])
        y_all = np.where(np.random.default_rng(2).random(400) < 0.7, model(torch.from_numpy(x)).argmax(1).numpy(),
                         np.random.default_rng(3).integers(0, 3, 400))
        x_fit, x_val, x_q, y_fit, y_val = df[:300], df[300:380], df[380:], y_all[:300], y_all[300:380]
        layers, kw = ["1", "3"], {}
    ac = ActivationClustering(model, layers, n_clusters=3, progress=False, **kw).fit(x_fit, y_fit)
    got = ac.trust(x_q, n_neighbors=5, calibration=(x_val, y_val))
    assert "stacked_trust" in got and all(np.isfinite(v).all() for v in got.values())
    assert got["ood_typicality"].min() >= 0 and got["ood_typicality"].max() <= 1
    ac.save(tmp_path / "run")
    back = _strict_load(tmp_path / "run", model.module if case == "resnet-dataparallel" else model)
    again = back.trust(x_q, n_neighbors=5, calibration=(x_val, y_val))
    for k in got:
        np.testing.assert_allclose(again[k], got[k], err_msg=k)
