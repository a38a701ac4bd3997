import contextlib
import hashlib
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import actclust
from actclust import ActivationClustering, InvalidSaveError, ModelMismatchWarning, RunExistsError

from conftest import LAYERS, TinyCNN, hook_count


@pytest.fixture
def fitted(model, data):
    return ActivationClustering(model, LAYERS, n_clusters=4, reducer={"conv": "pca:3", "fc1": "mean", "fc2": "mean"},
                                layer_weights="fit", progress=False).fit(*data)


def _arrays(run):
    return next(run.glob("arrays-*.safetensors"))


def _forge(run, manifest: dict, arrays: dict = None) -> None:
    """Rewrite a run as someone who knows the format would: arrays, checksum and digest made consistent."""
    if arrays is not None:
        old = _arrays(run)
        save_file(arrays, str(old))
        manifest["arrays_sha256"] = hashlib.sha256(old.read_bytes()).hexdigest()
    body = {k: v for k, v in manifest.items() if k != "digest"}
    manifest["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (run / "manifest.json").write_text(json.dumps(manifest))


@contextlib.contextmanager
def _disk_full_at_manifest(monkeypatch):
    """Saving fails when the new manifest is swapped in, as on a full disk."""
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "replace", real_replace)


# a saved run loads to identical predictions, weights and parameters
def test_round_trip(fitted, model, data, tmp_path):
    fitted.save(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert np.array_equal(loaded.predict_proba(data[0]), fitted.predict_proba(data[0]))
    assert np.array_equal(loaded.weights_, fitted.weights_)
    assert loaded.train_score_ == fitted.train_score_
    assert loaded.layer_weights == "fit" and loaded.reducers_["conv"].spec == "pca:3"
    for l in LAYERS:
        assert np.array_equal(loaded.train_vectors_[l], fitted.train_vectors_[l])
    assert hook_count(model) == 0


# a distilled run keeps its learned per-layer temperatures (soft assignment) through a save
def test_round_trip_distill(model, data, tmp_path):
    ac = ActivationClustering(model, LAYERS, n_clusters=4, clustering="distill", progress=False).fit(*data)
    assert any(t > 0 for t in ac.state_.temperatures.values())
    ac.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert loaded.state_.temperatures == ac.state_.temperatures
    assert np.array_equal(loaded.predict_proba(data[0]), ac.predict_proba(data[0]))


# the files are JSON and safetensors, and loading never calls an unpickler or torch.load
def test_no_pickle(fitted, model, data, tmp_path, monkeypatch):
    fitted.save(tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names[0].startswith("arrays-") and names[1] == "manifest.json" and len(names) == 2
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["state"]["layers"] == LAYERS and m["state"]["reducers"]["conv"] == "pca:3"
    raw = _arrays(tmp_path / "run").read_bytes()
    header = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, then a JSON header
    assert set(json.loads(raw[8:8 + header])) >= {"weights", "conv/posteriors"}

    def refuse(*args, **kwargs):
        raise AssertionError("loading a run must not unpickle anything")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(target, name, refuse)
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert np.array_equal(loaded.predict(data[0]), fitted.predict(data[0]))


# every manifest value that affects results is covered by its digest: an edit is refused
@pytest.mark.parametrize("edit", [
    lambda m: m["params"].update(reducer="max"),
    lambda m: m["params"].update(normalize=None),
    lambda m: m["params"].update(temperature=0.5),
    lambda m: m["state"].update(normalize=None),
    lambda m: m["state"].update(n_samples=10),
    lambda m: m["state"]["reducers"].update(conv="mean"),
    lambda m: m.update(model_fingerprint="0" * 64),
    lambda m: m["metadata"].update(weights="other.safetensors"),
])
def test_manifest_edits_refused(fitted, model, tmp_path, edit):
    run = tmp_path / "run"
    fitted.save(run)
    m = json.loads((run / "manifest.json").read_text())
    edit(m)
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InvalidSaveError, match="does not match its digest: a value in it was changed"):
        actclust.load(run, model)


# arrays that are consistent with their checksum but wrong are refused, each with what is wrong
@pytest.mark.parametrize("key, change, match", [
    ("fc1/posteriors", lambda a: a[:2], r"'fc1/posteriors' has shape \(2, 3\); expected \(4, 3\)"),
    ("fc1/posteriors", lambda a: np.where(a > 0.5, np.nan, a), "'fc1/posteriors' holds NaN"),
    ("weights", lambda a: np.array([1.5, -0.5, 0.0]), "weights .* must be non-negative and sum to 1"),
    ("weights", lambda a: a * 2, "weights .* must be non-negative and sum to 1"),
    ("train_predictions", lambda a: a + 7, "'train_predictions' must hold class ids in 0..2"),
    ("conv/train_vectors", lambda a: a[:, :2], r"centres of layer 'conv' have shape"),
    ("fc2/temperature", lambda a: -a - 1, "temperature of layer 'fc2' is negative"),
])
def test_bad_arrays_refused(fitted, model, tmp_path, key, change, match):
    run = tmp_path / "run"
    fitted.save(run)
    arrays = load_file(str(_arrays(run)))
    arrays[key] = np.ascontiguousarray(change(arrays[key]))
    _forge(run, json.loads((run / "manifest.json").read_text()), arrays)
    with pytest.raises(InvalidSaveError, match=match):
        actclust.load(run, model)


# loading with a model of other parameters warns clearly
def test_other_model_warns(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    with pytest.warns(ModelMismatchWarning, match="parameters differ"):
        actclust.load(tmp_path / "run", TinyCNN(seed=1), progress=False)


# an existing run is replaced only with overwrite=True; a folder of other files is never written into
def test_overwrite_rules(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    with pytest.raises(RunExistsError, match="pass overwrite=True"):
        fitted.save(tmp_path / "run")
    fitted.save(tmp_path / "run", overwrite=True)
    assert len(list((tmp_path / "run").glob("arrays-*"))) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds other files"):
        fitted.save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# a crash while swapping in the new manifest leaves the previous save whole and loadable, and no temp file
def test_crash_mid_save_keeps_previous(fitted, model, data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fitted.save(run)
    before = fitted.predict_proba(data[0])
    with _disk_full_at_manifest(monkeypatch), pytest.raises(OSError, match="disk full"):
        fitted.save(run, overwrite=True)
    assert sorted(p.name.split("-")[0] for p in run.iterdir()) == ["arrays", "manifest.json"]
    assert np.array_equal(actclust.load(run, model, progress=False).predict_proba(data[0]), before)


# a first save that fails leaves nothing behind, so the next save to that folder works without overwrite
def test_failed_first_save_leaves_nothing(fitted, model, data, tmp_path, monkeypatch):
    with _disk_full_at_manifest(monkeypatch), pytest.raises(OSError, match="disk full"):
        fitted.save(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # not even the folder it made
    fitted.save(tmp_path / "run")
    assert np.array_equal(actclust.load(tmp_path / "run", model, progress=False).predict(data[0]), fitted.predict(data[0]))


_SAVER = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import TinyCNN, LAYERS
import actclust
x = np.random.default_rng(0).standard_normal((12000, 1, 6, 6)).astype(np.float32)
ac = actclust.ActivationClustering(TinyCNN().eval(), LAYERS, n_clusters=4, reducer="random:128", progress=False).fit(x)
print("ready", flush=True)
while True:
    ac.save({run!r}, overwrite=True)
"""


# a save killed with SIGKILL keeps the previous run; its temporary file is removed by the next save
def test_killed_save_leaves_no_temp_behind(fitted, model, data, tmp_path):
    run = tmp_path / "run"
    code = _SAVER.format(tests=os.path.dirname(__file__), run=str(run))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".actclust-tmp") and any(p.iterdir()) for p in run.glob(".save.*")):
            assert time.monotonic() < deadline, "no temporary file seen while saving"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert any(p.name.endswith(".actclust-tmp") for p in run.iterdir())  # what a killed save leaves
    fitted.save(run, overwrite=True)
    assert not any(p.name.startswith(".") for p in run.iterdir())
    assert np.array_equal(actclust.load(run, model, progress=False).predict(data[0]), fitted.predict(data[0]))


# the array file and the manifest get the same permissions
def test_same_permissions(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert len(modes) == 1, modes


# missing, truncated, tampered or malicious saves give InvalidSaveError, never run code
def test_damaged_saves(fitted, model, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InvalidSaveError, match="No saved run at .*manifest.json is missing"):
        actclust.load(run, model)
    fitted.save(run)
    arrays = _arrays(run)
    good = arrays.read_bytes()

    arrays.write_bytes(good[: len(good) // 2])
    with pytest.raises(InvalidSaveError, match="truncated or was modified"):
        actclust.load(run, model)
    arrays.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(InvalidSaveError, match="truncated or was modified"):
        actclust.load(run, model)
    arrays.write_bytes(good)

    manifest = run / "manifest.json"
    m = json.loads(manifest.read_text())
    _forge(run, {**m, "arrays_file": "../../etc/passwd"})
    with pytest.raises(InvalidSaveError, match="invalid array file"):
        actclust.load(run, model)
    _forge(run, {**m, "state": {**m["state"], "n_classes": 5}})
    with pytest.raises(InvalidSaveError, match=r"'conv/posteriors' has shape \(4, 3\); expected \(4, 5\)"):
        actclust.load(run, model)
    _forge(run, {**m, "state": {k: v for k, v in m["state"].items() if k != "input_spec"}})
    with pytest.raises(InvalidSaveError, match="inconsistent or incomplete.*input_spec"):
        actclust.load(run, model)
    # edited and signed again: values of the wrong kind are refused at load, not met as a traceback later
    _forge(run, {k: v for k, v in m.items() if k != "arrays_sha256"})
    with pytest.raises(InvalidSaveError, match="gives no SHA-256 of its array file"):
        actclust.load(run, model)
    _forge(run, {**m, "state": {**m["state"], "input_spec": None}})
    with pytest.raises(InvalidSaveError, match="inconsistent or incomplete \\(AttributeError"):
        actclust.load(run, model)
    for field in ("n_samples", "random_state", "n_classes"):  # JSON's Infinity where a whole number goes (an outside check)
        _forge(run, {**m, "state": {**m["state"], field: float("inf")}})
        with pytest.raises(InvalidSaveError, match=r"inconsistent or incomplete \(OverflowError: cannot convert float "
                                                   r"infinity"):
            actclust.load(run, model)
    stats = m["state"]["input_stats"]
    assert stats  # recorded at fit
    for bogus in ({"": {"n": "x"}}, [1, 2], {"": {**stats[""], "lo": stats[""]["lo"][:-1]}},
                  {"": {**stats[""], "mean": [float("nan")] * len(stats[""]["mean"])}}):
        _forge(run, {**m, "state": {**m["state"], "input_stats": bogus}})
        with pytest.raises(InvalidSaveError, match="The saved input statistics"):
            actclust.load(run, model)
    for grid in (-1, "x", True):  # failed inside the first query, blamed on the model (an outside security check)
        _forge(run, {**m, "state": {**m["state"], "spatial_grid": grid}})
        with pytest.raises(InvalidSaveError, match=r"The saved spatial_grid .* must be None or an int >= 1"):
            actclust.load(run, model)
    for key, value in (("normalize", "<x>"), ("posterior", 7)):
        _forge(run, {**m, "state": {**m["state"], key: value}})
        with pytest.raises(InvalidSaveError, match=rf"The saved {key} .* must be one of"):
            actclust.load(run, model)
    _forge(run, {**m, "format_version": 99})
    with pytest.raises(InvalidSaveError, match="format version 99"):
        actclust.load(run, model)
    manifest.write_text("{not json")
    with pytest.raises(InvalidSaveError, match="not valid JSON"):
        actclust.load(run, model)
    arrays.unlink()
    manifest.write_text(json.dumps(m))
    with pytest.raises(InvalidSaveError, match="array file .* is missing"):
        actclust.load(run, model)


# What analyses keep with a run reaches the run as data (a manifest value and arrays) and comes back through the
# callback the reader is given for its key; the writer refuses keys and arrays of its own, and a callback's error
# names the run. The writer and reader import no analysis.
def test_kept_analyses_round_trip(fitted, tmp_path):
    from actclust.adapters import adapt
    from actclust.io.persistence import params_of, read_run, save

    state, adapter = fitted.state_, adapt(fitted.model)
    save(state, params_of(fitted), adapter, tmp_path / "run", kept={"my_result": ({"depth": 3}, {"mine/x": np.arange(4.0)})})
    got = []
    read_run(tmp_path / "run", progress=False, restore={"my_result": lambda s, a, v: got.append((v, a["mine/x"])),
                                                          "absent": lambda s, a, v: got.append("not called")})
    assert len(got) == 1 and got[0][0] == {"depth": 3} and np.array_equal(got[0][1], np.arange(4.0))

    def refuse(s, a, v):
        raise ValueError("depth 3 does not fit")
    with pytest.raises(InvalidSaveError, match=r"malformed my result \(ValueError: depth 3 does not fit\)"):
        read_run(tmp_path / "run", progress=False, restore={"my_result": refuse})
    with pytest.raises(actclust.ParameterError, match="Cannot keep 'format' with the run: the manifest has that key"):
        save(state, params_of(fitted), adapter, tmp_path / "b", kept={"format": ({}, {})})
    with pytest.raises(actclust.ParameterError, match=r"its arrays \['weights'\] clash with the run's own"):
        save(state, params_of(fitted), adapter, tmp_path / "c", kept={"mine": ({}, {"weights": np.zeros(1)})})
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# a run that keeps no trust calibration loads without importing trust (nor does a save of one that was never calibrated)
def test_plain_run_loads_without_trust(fitted, tmp_path):
    from pathlib import Path

    fitted.save(tmp_path / "run")
    here = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); import actclust; from conftest import TinyCNN; "
            f"ac = actclust.load({str(tmp_path / 'run')!r}, TinyCNN().eval(), progress=False); "
            f"ac.save({str(tmp_path / 'again')!r}); print('actclust.analysis.trust' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


# a prepared run loaded and saved again (elsewhere, or over itself) keeps every index it holds, also those it has not
# opened yet, and its calibration: the run saved again answers without building anything
def test_resaved_prepared_run_keeps_its_indexes(tmp_path, monkeypatch):
    import os

    from torch import nn

    from actclust.analysis import indexes

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((760, 6)).astype(np.float32), rng.integers(0, 3, 760)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    ActivationClustering(net, ["1", "2"], n_clusters=3, search="approximate", progress=False).fit(x[:700], y[:700]) \
        .prepare().save(tmp_path / "run")
    files = sorted(os.listdir(tmp_path / "run"))
    assert len([f for f in files if f.startswith("index_")]) == 6  # the similar-sample index and two trust indexes
    loaded = actclust.load(tmp_path / "run", net, progress=False)
    loaded.explain(x[700:702], trust=False)  # opens the similar-sample index (nothing new calibrated); trust's stay shut
    loaded.save(tmp_path / "again")
    loaded.save(tmp_path / "run", overwrite=True)
    assert sorted(os.listdir(tmp_path / "again")) == files == sorted(os.listdir(tmp_path / "run"))
    built = []
    monkeypatch.setattr(indexes.ApproximateIndex, "_build", lambda self, *a: built.append(1))
    for folder in ("again", "run"):
        back = actclust.load(tmp_path / folder, net, progress=False)
        assert back.state_.cache["trust"].restored
        assert back.explain(x[700:], trust=True)[0].trust is not None
    assert built == []


# a run loaded with a model of the same layer names but other widths: warned at load, and its first query says the
# model is not the fitted one (the inputs have the fitted shape), not that the inputs differ
def test_load_with_another_architecture(tmp_path):
    from torch import nn

    x = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)

    def net(width):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3)).eval()
    ActivationClustering(net(32), ["1", "2"], n_clusters=3, progress=False).fit(x).save(tmp_path / "run")
    with pytest.warns(ModelMismatchWarning, match="parameters differ"):
        other = actclust.load(tmp_path / "run", net(8), progress=False)
    with pytest.raises(actclust.DataError, match=r"Layer '1' gives 8 values per sample on X but gave 32 on the training "
                                                 r"data, for inputs of the same shape: the model is not the one"):
        other.score(x)


# a loaded run knows the model it was fitted with, as a fitted explainer does: another model bound later is said to
# differ, and a save after parameters were changed records the run's own
def test_loaded_run_knows_its_model_and_parameters(model, data, tmp_path):
    import warnings

    from actclust import ActClustWarning, ModelMismatchWarning

    from conftest import TinyCNN

    x, y = data
    ActivationClustering(model, LAYERS, n_clusters=3, progress=False).fit(x, y).save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelMismatchWarning)
        loaded.predict(x[:4])
    loaded.model = TinyCNN(seed=9).eval()
    with pytest.warns(ModelMismatchWarning, match="differ from those of the model this explainer was fitted with"):
        loaded.predict(x[:4])
    loaded.model, loaded.n_clusters = model, 7
    with pytest.warns(ActClustWarning, match=r"The parameters \['n_clusters'\] were set after fit"):
        loaded.save(tmp_path / "again")
    assert actclust.load(tmp_path / "again", model, progress=False).n_clusters == 3
