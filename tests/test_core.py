"""The core needs no framework: with torch made unimportable, actclust imports, runs an ONNX model through
fit, score, similar, explain, trust, save, load and report (and the CLI), and says which extra a torch-only
feature needs. And the package's layers keep to their rules: no framework import in the core, no import
of another module's private names."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import actclust

SRC = Path(actclust.__file__).parent
FRAMEWORKS = ("torch", "keras", "tensorflow", "jax", "onnx", "onnxruntime", "transformers")
#: Modules that must run without any framework: the analysis, persistence, report, study and store
#: layers, and the core that fits and queries through an adapter.
CORE = ("analysis", "io", "views", "study", "store", "capture", "compute", "state.py", "fitting.py", "validation.py",
        "explainer.py", "exceptions.py", "deps.py", "datasets.py", "cli", "clustering", "engines")

_BLOCK = """
import sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")

sys.meta_path.insert(0, _Block())
"""


def _run_blocked(code: str, blocked=("torch", "keras", "tensorflow", "jax", "transformers"), cwd=None):
    script = _BLOCK.format(blocked=set(blocked)) + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, request):
    """The conftest's trained digits CNN, exported to ONNX, and the digits data as .npz files."""
    model, x_tr, y_tr, x_te, y_te = request.getfixturevalue("trained_digits_cnn")
    folder = tmp_path_factory.mktemp("core")
    torch.onnx.export(model, (torch.from_numpy(x_tr[:2]),), str(folder / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    np.savez(folder / "train.npz", x=x_tr, y=y_tr)
    np.savez(folder / "test.npz", x=x_te, y=y_te)
    return folder


# importing actclust loads no framework and no analysis module
def test_import_is_light():
    out = _run_blocked("""
        import sys, actclust
        print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'scipy', 'faiss', 'sklearn', 'onnxruntime'}))
        print(actclust.__version__)
    """, blocked=())
    assert out.splitlines()[0] == "[]"


# with torch blocked: every core module imports, an ONNX model goes through the whole method, the CLI works,
# and the torch-only clusterings say which extra to install
def test_onnx_end_to_end_without_torch(onnx_model, tmp_path):
    out = _run_blocked(f"""
        import importlib, pkgutil, sys, warnings
        warnings.simplefilter("ignore")
        import numpy as np
        import actclust
        skipped = []
        for m in pkgutil.walk_packages(actclust.__path__, "actclust."):
            if m.name.endswith("__main__") or m.name in ("actclust.models", "actclust.adapters.torch", "actclust.adapters.torch_ops",
                          "actclust.adapters.torch_data", "actclust.adapters.torch_compute", "actclust.adapters.keras", "actclust.adapters.keras_data"):
                continue  # a framework's own adapter (and the demo's networks) need it
            importlib.import_module(m.name)
        folder = {str(onnx_model)!r}
        tr, te = np.load(folder + "/train.npz"), np.load(folder + "/test.npz")
        layers = ["/conv1/Conv_output_0", "/conv2/Conv_output_0", "/fc1/Gemm_output_0", "logits"]
        ac = actclust.ActivationClustering(folder + "/model.onnx", layers, n_clusters=8, progress=False)
        ac.fit(tr["x"], tr["y"])
        s = ac.score(te["x"], te["y"])
        nb = ac.similar(te["x"][:3])
        es = ac.explain(te["x"][:3])
        t = ac.trust(te["x"][:20], calibration=(te["x"][20:220], te["y"][20:220]))
        cs = ac.concepts(layers[-1])
        ac.prepare()  # the run's own trust calibration (the held-out one above is not kept) and search index
        ac.save({str(tmp_path / 'run')!r})
        back = actclust.load({str(tmp_path / 'run')!r}, folder + "/model.onnx", progress=False)
        assert np.array_equal(back.predict(te["x"]), ac.predict(te["x"]))
        print("kept:", back.state_.cache["trust"].key[4])
        actclust.report(back, te["x"][:100], te["y"][:100], train=tr["x"], out={str(tmp_path / 'r.html')!r},
                        n_correct=1, n_wrong=1)
        try:
            actclust.ActivationClustering(folder + "/model.onnx", layers, clustering="distill").fit(tr["x"])
        except actclust.MissingDependencyError as e:
            print("distill:", e)
        from actclust.cli import main
        code = main(["fit", folder + "/model.onnx", "--layers", ",".join(layers[2:]), "--data", folder + "/train.npz",
                     "--out", {str(tmp_path / 'cli-run')!r}, "--quiet"])
        code2 = main(["score", {str(tmp_path / 'cli-run')!r}, "--model", folder + "/model.onnx", "--data",
                      folder + "/test.npz", "--json", "--quiet"])
        print("cli:", code, code2)
        print("fidelity:", round(s["fidelity"], 4), len(es), nb.indices.shape, sorted(t)[:2], len(cs))
        import os
        fitted = {{store: actclust.ActivationClustering(folder + "/model.onnx", layers, n_clusters=8, progress=False,
                                                      store=store, search="approximate").fit(tr["x"], tr["y"])
                  for store in (None, {str(tmp_path / 'store')!r})}}
        found = [f.similar(te["x"][:10], k=4).indices for f in fitted.values()]
        index = fitted[{str(tmp_path / 'store')!r}].state_.cache["retrieval"]["retrieval", "approximate", "host"]
        print("disk store:", np.array_equal(*found), os.fstat(index.source.fd).st_nlink)
        print("torch loaded:", "torch" in sys.modules)
    """)
    assert "disk store: True 0" in out  # the index mapped from an unnamed file beside the store, the same answers
    assert "torch loaded: False" in out
    assert "kept: internal" in out
    assert "cli: 0 0" in out
    assert 'distill: clustering=\'distill\' needs torch, which is not installed' in out and 'actclust[torch]' in out
    fidelity = float(out.split("fidelity: ")[1].split()[0])
    assert fidelity > 0.5


# actclust.MissingDependencyError is an ActClustError and an ImportError, and names the extra
def test_missing_dependency_error():
    from actclust.deps import require

    with pytest.raises(actclust.MissingDependencyError, match=r'feature X needs no_such_pkg, which is not installed'):
        require("no_such_pkg", "feature X")
    assert issubclass(actclust.MissingDependencyError, (actclust.ActClustError, ImportError))


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name, None
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                yield node, ("." * node.level) + (node.module or ""), a.name


def _core_files():
    for entry in CORE:
        p = SRC / entry
        yield from ([p] if p.suffix == ".py" else sorted(p.rglob("*.py")))


# no module of the core imports a framework (the adapters do, only when the model is one of theirs)
@pytest.mark.parametrize("path", list(_core_files()), ids=lambda p: str(p.relative_to(SRC)))
def test_core_imports_no_framework(path):
    bad = [f"line {node.lineno}: {mod}" for node, mod, _ in _imports(path)
           if mod.split(".")[0] in FRAMEWORKS]
    # an actor of a torch model sets torch's threads; distill and IDEC train with torch (a missing torch is a
    # MissingDependencyError naming actclust[torch], tested above)
    allowed = {"engines/ray/workers.py": ["torch"], "clustering/distill.py": ["torch"], "clustering/idec.py": ["torch"]}
    rel = str(path.relative_to(SRC))
    bad = [b for b in bad if not any(b.endswith(": " + m) for m in allowed.get(rel, []))]
    assert not bad, bad


# no module imports another module's private names (a leading underscore): shared helpers are public
@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_imports(path):
    def private(mod, name):
        parts = [p for p in mod.lstrip(".").split(".") if p]
        if any(p.startswith("_") and p not in ("__future__", "_version") for p in parts):
            return True
        return name is not None and name.startswith("_") and name != "__version__"

    bad = [f"line {node.lineno}: from {mod} import {name}" for node, mod, name in _imports(path) if private(mod, name)]
    assert not bad, bad


# a run saved by the previous format (2: no layouts, summaries seeded by layer name) loads and answers as before
def test_format_2_run_loads(model, data, tmp_path):
    from actclust.io.persistence import _digest  # noqa: the test forges an old manifest

    x, _ = data
    ac = actclust.ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=3, progress=False).fit(x)
    ac.save(tmp_path / "run")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    m["format_version"] = 2
    for key in ("layouts", "input_stats", "framework", "summary_seeds"):
        m["state"].pop(key)
    m["digest"] = _digest(m)
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(m))
    back = actclust.load(tmp_path / "run", model, progress=False)
    assert back.state_.layouts == {"conv": "channels_first", "fc1": "channels_first", "fc2": "channels_first"}
    assert np.array_equal(back.predict(x), ac.predict(x))
    # with a store folder (format 2 kept its files outside the digest): refused, naming the format version
    ac2 = actclust.ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=3, progress=False,
                                        store=tmp_path / "s").fit(x)
    ac2.save(tmp_path / "run2")
    m = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    m["format_version"] = 2
    m["digest"] = _digest(m)
    (tmp_path / "run2" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(actclust.InvalidSaveError, match=r"run2 has format version 2, saved by an earlier actclust with "
                                                        r"its vectors in a store folder whose files carry no checksums"):
        actclust.load(tmp_path / "run2", model, progress=False)
