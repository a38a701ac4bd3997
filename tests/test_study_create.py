"""Creating a study folder (actclust.study.create) and the study CLI's create and serve steps."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actclust.cli.commands import main
from actclust.exceptions import DataError, InvalidSaveError, ParameterError, RunExistsError
from actclust.study import load_study

from conftest import XSS_CLASS, make_study


# items are stratified by AI correctness, in a seeded order; every condition's views are pre-rendered
def test_items_and_views(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source, items=10, wrong_share=0.3)
    data = json.loads((folder / "study.json").read_text())
    ac, x, y = study_source
    items = data["items"]
    assert len(items) == 10 and sum(not it["ai_right"] for it in items) == 3
    dnn = ac.query(x).dnn_pred
    for it in items:
        assert it["prediction"] == dnn[it["row"]] and it["label"] == y[it["row"]]
        assert it["ai_right"] == (it["prediction"] == it["label"]) and it["input"]["kind"] == "image"
        assert len(it["views"]["similar"]) == 3 and len(it["views"]["concepts"]) == 3  # k=3; one per layer
        assert [g["class"] for g in it["views"]["similar_multiclass"]][:1] == [it["prediction"]]
    assert data["class_names"][0] == XSS_CLASS and data["schema"] == "actclust.study/1"
    again = json.loads(make_study(tmp_path / "t", study_source, items=10, wrong_share=0.3).joinpath("study.json").read_text())
    assert [it["row"] for it in again["items"]] == [it["row"] for it in items]  # seeded
    other = json.loads(make_study(tmp_path / "u", study_source, items=10, wrong_share=0.3, seed=1)
                       .joinpath("study.json").read_text())
    assert [it["row"] for it in other["items"]] != [it["row"] for it in items]


# each condition shows exactly its views; 'none' shows nothing; similar samples of the top classes are of that class
def test_explanation_per_condition(tmp_path, study_source):
    study = load_study(make_study(tmp_path / "s", study_source))
    assert study.explanation(0, "none") is None
    assert set(study.explanation(0, "similar")) == {"similar"}
    assert set(study.explanation(0, "concepts")) == {"concepts"}
    assert set(study.explanation(0, "full")) == {"similar", "concepts", "trust"}
    assert study_source[0].state_.train_labels is not None  # so samples are picked by their true class
    groups = study.explanation(0, "similar_multiclass")["similar_multiclass"]
    assert len(groups) == 3 and sum(len(g["samples"]) for g in groups) > 0
    for g in groups:
        assert all(s["label"] == g["class"] for s in g["samples"])


# parameters are checked before any work, with what is allowed and what was given
@pytest.mark.parametrize("options, error, message", [
    ({"items": 0}, ParameterError, "items must be an int >= 1. Got 0 instead."),
    ({"wrong_share": 1.5}, ParameterError, r"wrong_share must be a number in \[0, 1\]. Got 1.5 instead."),
    ({"conditions": ["none", "magic"]}, ParameterError, "conditions must be distinct names from"),
    ({"conditions": ["none", "none"]}, ParameterError, "conditions must be distinct names from"),
    ({"design": "mixed"}, ParameterError, r"design must be one of \['between', 'within'\]. Got 'mixed' instead."),
    ({"design": "within", "items": 2, "conditions": ["none", "similar", "full"]}, ParameterError,
     "needs items >= 3. Got items=2"),
    ({"items": 100}, ParameterError, r"items=100 with wrong_share=0.5 needs 50 inputs the model gets right, but the data has 43 \(43 right, 77 wrong\); lower items \(--items\) or change wrong_share"),
    ({"class_names": ["a", "b"]}, ParameterError, "class_names must name the 3 classes; got 2 names."),
    ({"class_names": ["a", "a", "b"]}, ParameterError, "classes 0 and 1 are both named 'a'"),
    ({"attention_checks": -1}, ParameterError, "attention_checks must be an int >= 0. Got -1 instead."),
    ({"train": np.zeros((5, 1, 6, 6), np.float32)}, DataError, "train has 5 samples but the explainer was fitted on 120"),
])
def test_bad_options(tmp_path, study_source, options, error, message):
    with pytest.raises(error, match=message):
        make_study(tmp_path / "s", study_source, **options)


# the labels are required and must line up with X
def test_labels_needed(tmp_path, study_source):
    from actclust.study import create_study

    ac, x, y = study_source
    with pytest.raises(DataError, match="A study needs the true labels y of X"):
        create_study(ac, x, None, tmp_path / "s")
    with pytest.raises(DataError, match="y has 3 labels for 120 inputs"):
        create_study(ac, x, y[:3], tmp_path / "s")


# an existing study is replaced only with overwrite=True, and never once it holds responses
def test_overwrite(tmp_path, study_source):
    from actclust.study.db import Store

    folder = make_study(tmp_path / "s", study_source)
    with pytest.raises(RunExistsError, match="already holds a study; pass overwrite=True"):
        make_study(folder, study_source)
    make_study(folder, study_source, overwrite=True)
    store = Store(load_study(folder))  # served, nobody took part: the error says how to start again (it said
    with pytest.raises(RunExistsError, match=r"was served \(responses.sqlite exists\) but nobody took part yet "
                                             r"\(0 sessions, 0 responses\).*Stop the server, delete .*responses.sqlite"):
        make_study(folder, study_source, overwrite=True)  # "holds collected responses", and no way out)
    store.create_session()
    with pytest.raises(RunExistsError, match=r"holds collected responses \(responses.sqlite: 1 sessions, 0 responses\)"):
        make_study(folder, study_source, overwrite=True)
    (tmp_path / "page.html").write_text("mine")  # a file where the folder should go: refused before any work, kept
    with pytest.raises(RunExistsError, match=r"page.html is a file; give a folder for the study"):
        make_study(tmp_path / "page.html", study_source, overwrite=True)
    assert (tmp_path / "page.html").read_text() == "mine"


# a folder that is not a study, or of another schema, is refused with what to do
def test_load_errors(tmp_path):
    with pytest.raises(Exception, match="is not a study folder: it has no study.json"):
        load_study(tmp_path)
    (tmp_path / "study.json").write_text('{"schema": "other"}')
    with pytest.raises(InvalidSaveError, match="is not an actclust study of schema 'actclust.study/1'"):
        load_study(tmp_path)
    (tmp_path / "study.json").write_text("{")
    with pytest.raises(InvalidSaveError, match=r"study.json: cannot be read as JSON"):
        load_study(tmp_path)


# the CLI creates a study from a saved run and an .npz; its options are checked in option terms
def test_cli_create(tmp_path, study_source, capsys):
    ac, x, y = study_source
    ac.save(tmp_path / "run", metadata={"model": "conftest:TinyCNN", "weights": None})
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savez(tmp_path / "nolabels.npz", x=x)
    base = ["study", "create", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--quiet",
            "--model", "conftest:_study_model", "--train", str(tmp_path / "d.npz")]
    assert main(base + ["--out", str(tmp_path / "s"), "--items", "8", "--conditions", "none,full",
                        "--design", "within", "--two-stage", "--class-names", "x,y,z"]) == 0
    printed = capsys.readouterr().out
    assert "serve it with: actclust study serve" in printed
    assert "  none: the prediction and its confidence, nothing else\n" in printed  # how each condition was built
    assert "  full: similar (6 nearest training samples) + concepts + trust signals" in printed
    study = load_study(tmp_path / "s")
    assert set(study.data["construction"]) == {"none", "full"}
    assert (study.conditions, study.design, study.two_stage, study.class_names) == (["none", "full"], "within", True,
                                                                                    ["x", "y", "z"])
    for extra, message in [(["--conditions", "none,magic"], "--conditions must be comma-separated names from"),
                           (["--wrong-share", "2"], r"--wrong-share must be in \[0, 1\]; got 2.0"),
                           (["--class-names", "a,b"], "--class-names must name the run's 3 classes; got 2")]:
        assert main(base + ["--out", str(tmp_path / "t")] + extra) == 2
        assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    nolabels = ["study", "create", str(tmp_path / "run"), "--data", str(tmp_path / "nolabels.npz"), "--quiet",
                "--model", "conftest:_study_model", "--out", str(tmp_path / "t")]
    assert main(nolabels) == 2 and "has no labels y; a study needs them" in capsys.readouterr().err


def _fake_server(monkeypatch) -> dict:
    """What ``study serve`` asks of its socket and server, recorded instead of listening."""
    from actclust.study import cli as study_cli

    ran = {}

    class Socket:
        def getsockname(self):
            return (ran["host"], ran["port"])
    monkeypatch.setattr(study_cli, "listen", lambda host, port: ran.update(host=host, port=port) or Socket())
    monkeypatch.setattr(study_cli, "serve", lambda app, sock, **kw: ran.update(kw))
    return ran


# serve prints both addresses with the admin token, and warns when not bound to loopback
@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                         ("0.0.0.0", True), ("192.168.1.5", True)])
def test_cli_serve(tmp_path, study_source, monkeypatch, capsys, host, warns):
    folder = make_study(tmp_path / "s", study_source)
    ran = _fake_server(monkeypatch)
    monkeypatch.delenv("ACTCLUST_STUDY_ADMIN_TOKEN", raising=False)
    assert main(["study", "serve", str(folder), "--host", host, "--port", "8123"]) == 0
    out, err = capsys.readouterr()
    assert ran["host"] == host and ran["port"] == 8123
    assert ran["proxy_headers"] is True and ran["forwarded_allow_ips"] == "127.0.0.1" and ran["access_log"] is False
    assert "participants: http://" in out and ":8123/admin (log in with the admin token)" in out
    token = out.split("admin token:")[1].split()[0]
    assert len(token) >= 32 and "token=" not in out  # never in an address: addresses end up in access logs
    assert ("warning: listening on " + host + ", not on loopback" in err) == warns


# the default host is loopback
def test_default_host(tmp_path, study_source, monkeypatch, capsys):
    folder = make_study(tmp_path / "s", study_source)
    ran = _fake_server(monkeypatch)
    assert main(["study", "serve", str(folder), "--admin-token", "t0k"]) == 0
    assert ran["host"] == "127.0.0.1" and "admin token:  t0k" in capsys.readouterr().out


# a port in use, or out of range, is one line and exit code 2, before any address or token is printed
def test_serve_port_refused(tmp_path, study_source, capsys):
    import socket

    folder = make_study(tmp_path / "s", study_source)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["study", "serve", str(folder), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"Cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err
    assert main(["study", "serve", str(folder), "--port", "70000"]) == 2
    assert "argument --port: must be from 0 to 65535 (0: any free port); got 70000" in capsys.readouterr().err


# 'actclust study' alone prints its help and exits 2
def test_study_help(capsys):
    assert main(["study"]) == 2 and "create" in capsys.readouterr().err


# the server side imports no torch: serve, analyze (of a study or a trial table) and power load without it
# (the package's own __init__ is bypassed, since it imports the torch-based estimator)
def test_server_needs_no_torch():
    src = Path(__import__("actclust").__file__).parent
    code = f"""
import sys, types
sys.modules["torch"] = None  # any import of torch now fails
pkg = types.ModuleType("actclust"); pkg.__path__ = [{str(src)!r}]; sys.modules["actclust"] = pkg
import actclust.study.app, actclust.study.analyze, actclust.study.cli, actclust.study.db
import actclust.study.trials, actclust.study.power, actclust.study.output
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.fixture(scope="module")
def rare_class_source():
    """A TinyCNN explainer fitted on 400 inputs of which 4 are labelled class 2: the 100 training samples
    nearest an input often hold none of them."""
    from actclust import ActivationClustering

    from conftest import LAYERS, TinyCNN

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 2, 400)
    y[rng.choice(400, 4, replace=False)] = 2
    return ActivationClustering(TinyCNN(seed=3, bias=False).eval(), LAYERS, n_clusters=4, progress=False).fit(x, y), x, y


# issue 20: similar_multiclass searches each of the top-3 classes for its own nearest training samples, so every
# group of every item is filled (filtering the 100 nearest by class, as before, left class 2 bare on most items)
def test_similar_multiclass_every_group_filled(tmp_path, rare_class_source):
    ac, x, y = rare_class_source
    folder = make_study(tmp_path / "s", rare_class_source, items=12, conditions=["similar_multiclass"])
    study = load_study(folder)
    near = ac.similar(x[[it["row"] for it in study.items]], k=100, weights="high").indices
    bare = sum(not any(y[t] == 2 for t in row) for row in near)
    assert bare >= 3  # the old filter would have shown "class 2 (p%)" with no sample on these items
    for it in study.items:
        groups = study.explanation(it["id"], "similar_multiclass")["similar_multiclass"]
        assert [g["class"] for g in groups] == list(np.argsort(-ac.query(x[[it["row"]]]).dnn_proba[0],
                                                               kind="stable")[:3])
        for g in groups:
            assert len(g["samples"]) == 2 and all(s["label"] == g["class"] for s in g["samples"])


# search_by_class is the exact per-class search: the k nearest of each class in the full exact ranking; -1
# pads a class with fewer than k training samples
def test_search_by_class_is_exact(rare_class_source):
    from actclust.analysis.retrieval import layer_weights, search_by_class

    ac, x, y = rare_class_source
    state, w = ac.state_, layer_weights("high", ac.state_.layers)
    classes = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    got = search_by_class(state, ac.query(x[:3], vectors=True), classes, 5, w)
    full = ac.similar(x[:3], k=400, weights="high", search="exact").indices
    for i in range(3):
        for j, c in enumerate(classes[i]):
            expected = [t for t in full[i] if y[t] == c][:5]
            assert got[i, j, :len(expected)].tolist() == expected
            assert (got[i, j, len(expected):] == -1).all() and len(expected) == (4 if c == 2 else 5)
    from actclust.exceptions import ParameterError as PE

    with pytest.raises(PE, match=r"classes must have one row of classes per input, shape \(3, m\). Got shape \(3,\)"):
        search_by_class(state, ac.query(x[:3], vectors=True), np.array([0, 1, 2]), 5, w)


# text inputs in a study are shown as tokens with a tokenizer, as in the report (participants saw the ids:
# "6 46 15 21 ...", found by an outside browser check)
def test_token_inputs_shown_as_tokens(tmp_path):
    import zoo

    from actclust import ActivationClustering
    from actclust.study import create_study

    ids, mask, y = zoo.token_task(80, seq_len=20, min_len=13, seed=0)
    ac = ActivationClustering(zoo.tiny_bert(seed=0), ["bert.pooler", "classifier"], n_clusters=3, progress=False)
    ac.fit({"input_ids": ids[:60], "attention_mask": mask[:60]}, y[:60])
    vocab = ["[PAD]", "[CLS]", "cat", "dog", "eel"] + [f"w{i}" for i in range(5, 64)]
    test = {"input_ids": ids[60:], "attention_mask": mask[60:]}
    folder = create_study(ac, test, y[60:], tmp_path / "s", train={"input_ids": ids[:60], "attention_mask": mask[:60]},
                          items=4, conditions=["similar"], tokenizer=vocab)
    item = json.loads((folder / "study.json").read_text())["items"][0]
    words = [w for w, _ in item["input"]["tokens"]]
    assert words and set(words) <= set(vocab) and not item["input"].get("ids")


# a tabular study keeps its tables whole in file order, and each item the order its trial lists them in (the report's:
# FeatureOrder from the training inputs); a study.json whose order is not one of its table's rows is refused
def test_tabular_feature_order(tmp_path):
    import torch

    from actclust import ActivationClustering
    from actclust.study import create_study
    from actclust.views.features import FeatureOrder

    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 20)).astype(np.float32)
    y = rng.integers(0, 2, 90)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    ac = ActivationClustering(mlp, ["0", "2"], n_clusters=3, progress=False).fit(x, y)
    names = [f"f{i}" for i in range(20)]
    folder = create_study(ac, x, y, tmp_path / "s", train=x, items=4, conditions=["similar"], k=2, feature_names=names,
                          attention_checks=2)
    data = json.loads((folder / "study.json").read_text())
    order = FeatureOrder.from_train(ac.state_, x)
    real = [it for it in data["items"] if not it.get("attention")]
    for item in real:
        assert [n for n, _ in item["input"]["rows"]] == names and item["input"]["more"] == 0
        cluster = ac.cluster_paths(x[item["row"]:item["row"] + 1])[0][-1]
        assert item["feature_order"] == order.of_input(x[item["row"]], cluster).tolist()
    assert all([n for n, _ in s["input"]["rows"]] == names for s in data["samples"].values())
    assert data["feature_order"].startswith("features ordered by how far the input departs")
    # a trial lists the item's table and its samples' in the item's order (an attention check: its source item's)
    study = load_study(folder)
    for item in data["items"]:
        ranked = [names[j] for j in item["feature_order"]]
        if not item.get("attention"):
            assert [n for n, _ in study.shown_input(item["id"])["rows"]] == ranked
        for sample in study.explanation(item["id"], "similar")["similar"]:
            assert [n for n, _ in sample["input"]["rows"]] == ranked
    # a table of more than MAX_TABLE features lists its first MAX_TABLE in order, and counts the others
    from actclust.study import folder as study_folder

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_folder, "MAX_TABLE", 15)
        shown = study.shown_input(real[0]["id"])
        assert [n for n, _ in shown["rows"]] == [names[j] for j in real[0]["feature_order"][:15]] and shown["more"] == 5
    data["items"][0]["feature_order"][1] = data["items"][0]["feature_order"][0]
    (folder / "study.json").write_text(json.dumps(data))
    with pytest.raises(InvalidSaveError, match=r"item 0 \(id 0\) has a 'feature_order' that is not an order of its "
                                               "table's rows"):
        load_study(folder)
