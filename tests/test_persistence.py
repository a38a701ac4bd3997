import json
import os
import warnings

import numpy as np
import pytest

import actclust
from actclust import ActivationClustering, InvalidSaveError, ModelMismatchWarning

from conftest import LAYERS, TinyCNN, hook_count


@pytest.fixture
def fitted(model, data):
    return ActivationClustering(model, LAYERS, n_clusters=4, reducer={"conv": "pca:3", "fc1": "mean", "fc2": "mean"},
                                layer_weights="fit", progress=False).fit(*data)


def _arrays(run):
    return next(run.glob("arrays-*.safetensors"))


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


# the files are JSON and safetensors only; nothing pickled
def test_no_pickle(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names[0].startswith("arrays-") and names[1] == "manifest.json" and len(names) == 2
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["layers"] == LAYERS and m["reducers"]["conv"] == "pca:3"
    assert b"\x80\x04" not in _arrays(tmp_path / "run").read_bytes()[:16]


# loading with a model of other parameters warns clearly
def test_other_model_warns(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    with pytest.warns(ModelMismatchWarning, match="parameters differ"):
        actclust.load(tmp_path / "run", TinyCNN(seed=1), progress=False)


# an existing run is replaced only with overwrite=True; a folder of other files is never written into
def test_overwrite_rules(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        fitted.save(tmp_path / "run")
    fitted.save(tmp_path / "run", overwrite=True)
    assert len(list((tmp_path / "run").glob("arrays-*"))) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds other files"):
        fitted.save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# a crash while swapping in the new manifest leaves the previous save whole and loadable
def test_crash_mid_save_keeps_previous(fitted, model, data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fitted.save(run)
    before = fitted.predict_proba(data[0])
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(run, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert np.array_equal(actclust.load(run, model, progress=False).predict_proba(data[0]), before)


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
    manifest.write_text(json.dumps({**m, "arrays_file": "../../etc/passwd"}))
    with pytest.raises(InvalidSaveError, match="invalid array file"):
        actclust.load(run, model)
    manifest.write_text(json.dumps({**m, "n_classes": 5}))
    with pytest.raises(InvalidSaveError, match="inconsistent or incomplete"):
        actclust.load(run, model)
    manifest.write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(InvalidSaveError, match="format version 99"):
        actclust.load(run, model)
    manifest.write_text("{not json")
    with pytest.raises(InvalidSaveError, match="not valid JSON"):
        actclust.load(run, model)
    arrays.unlink()
    manifest.write_text(json.dumps(m))
    with pytest.raises(InvalidSaveError, match="array file .* is missing"):
        actclust.load(run, model)
