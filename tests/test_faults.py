"""Fault injection: the files actclust reads and writes, attacked as an attacker or a careless user
would (issue 17). Each test names the defect it guards; every one of them failed on d5d707e.

A run folder someone sends you must run no code and read nothing outside itself; a saved run must
keep its own vectors whatever else is fitted into its store folder; a same-size edit of a stored
file must be refused at load; a save or a fit killed with SIGKILL (real processes) must leave the
folder whole and no bytes behind; a full disk, a bad path or non-JSON metadata must give an
ActClustError; no command may replace a file it did not write.
"""

import errno
import gc
import hashlib
import importlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import actclust
from actclust import (ActClustError, ActivationClustering, DiskFullError, InvalidSaveError, ParameterError,
                      RunExistsError, StorageError, StoragePermissionError)
from actclust.cli.commands import main

from conftest import LAYERS, TinyCNN

TESTS = str(Path(__file__).parent)
MARK = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def _fit(model, x, y=None, **kw):
    return ActivationClustering(model, LAYERS, n_clusters=4, progress=False, **kw).fit(x, y)


def _tree(folder: Path) -> dict:
    """relative path -> SHA-256 of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _run_bytes(run: Path) -> int:
    """Bytes of the files the run's manifest names (manifest, arrays, store folder, kept files)."""
    m = json.loads((run / "manifest.json").read_text())
    names = {"manifest.json", m["arrays_file"], *(m.get("files") or {})}
    if m["state"].get("store"):
        names.add(m["state"]["store"]["dir"])
    return sum(_bytes(run / n) if (run / n).is_dir() else (run / n).stat().st_size for n in names if (run / n).exists())


@pytest.fixture
def npz(tmp_path, data):
    path = tmp_path / "d.npz"
    np.savez(path, x=data[0][:40], y=data[1][:40])
    return path


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """The current folder is tmp_path, off sys.path; modules imported from it are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("evil", "usermod_trust", "usermod_shadow", "shadowdep"):
            del sys.modules[name]
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------- 1. a run folder runs its code
# defect 1: a run folder carrying helpers.py and recording folder.helpers:build ran it when scored;
# now neither score nor --trust-run-model imports it (the marker file is never written)
def test_run_folder_code_never_runs(fitted, npz, cwd, capsys):
    marker = cwd / "marker"
    run = cwd / "evil"
    fitted.save(run, metadata={"model": "evil.helpers:build", "weights": None})
    (run / "__init__.py").write_text(MARK.format(marker=str(marker)))
    (run / "helpers.py").write_text(MARK.format(marker=str(marker)) +
                                    f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import TinyCNN\n"
                                    "def build():\n    return TinyCNN()\n")
    importlib.invalidate_caches()
    for command in ("score", "report"):
        assert main([command, "evil", "--data", str(npz), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "records its model as 'evil.helpers:build'" in err and "does not import code a run folder names" in err
        assert "Name the model yourself with --model package.module:callable, code you have read" in err
        assert "never from inside the run folder" in err and "--trust-run-model" in err
    assert main(["score", "evil", "--data", str(npz), "--quiet", "--trust-run-model"]) == 2
    err = capsys.readouterr().err
    assert "code that lies inside the run folder" in err and "never imports code from a run folder" in err
    # --model naming the run's code, as the message once said to (an outside check): refused too, from outside the run
    # (as a package of it) and from inside it (its module found in the current folder)
    assert main(["score", "evil", "--data", str(npz), "--quiet", "--model", "evil.helpers:build"]) == 2
    err = capsys.readouterr().err
    assert "The model 'evil.helpers:build' (--model) is code that lies inside the run folder evil" in err
    os.chdir(run)
    try:
        assert main(["score", ".", "--data", str(npz), "--quiet", "--model", "helpers:build"]) == 2
    finally:
        os.chdir(cwd)
    assert "The model 'helpers:build' (--model) is code that lies inside the run folder" in capsys.readouterr().err
    assert not marker.exists() and "evil" not in sys.modules and "helpers" not in sys.modules
    actclust.load(run, fitted.model, progress=False)  # the Python API never imports anything a run names
    assert not marker.exists()


# an outside check: run from inside a run folder, --model put that folder first on sys.path and left it there, so a
# module the run holds (its jinja2.py, or one the user's model imports) ran; now the folder is never added from inside
# the run, and from elsewhere only while the model's module is imported, then last
def test_run_folder_modules_never_shadow_imports(fitted, npz, cwd, capsys, monkeypatch):
    from actclust.cli.inputs import import_factory

    marker = cwd / "marker"
    own = cwd / "own"  # the user's model, outside the run, on sys.path
    own.mkdir()
    (own / "usermod_shadow.py").write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import TinyCNN\n"
                                           "def build():\n    import shadowdep\n    return TinyCNN()\n")
    monkeypatch.syspath_prepend(str(own))
    run = cwd / "run"
    fitted.save(run)
    (run / "shadowdep.py").write_text(MARK.format(marker=str(marker)))  # what the user's code imports, not installed
    importlib.invalidate_caches()
    os.chdir(run)
    try:
        with pytest.raises(ModuleNotFoundError, match="No module named 'shadowdep'"):  # the user's code: its traceback
            main(["score", ".", "--data", str(npz), "--quiet", "--model", "usermod_shadow:build"])
        assert str(run) not in sys.path
    finally:
        os.chdir(cwd)
    assert not marker.exists()
    # from the user's own folder: found there, and that folder goes last once the module is imported
    (cwd / "usermod_cwd.py").write_text("def build():\n    return 1\n")
    assert import_factory("usermod_cwd:build")() == 1
    assert sys.path[-1] == str(cwd) and sys.path[0] != str(cwd)
    del sys.modules["usermod_cwd"]


# defect 1: a recorded model of the user's own (not actclust's) was imported from the current folder
# without being asked; now it needs --model or --trust-run-model, which says which file it runs first
def test_recorded_user_model_needs_opt_in(fitted, model, npz, cwd, capsys):
    marker = cwd / "marker"
    run = cwd / "run"
    fitted.save(run, metadata={"model": "usermod_trust:build", "weights": None})
    (cwd / "usermod_trust.py").write_text(MARK.format(marker=str(marker)) +
                                          f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import TinyCNN\n"
                                          "def build():\n    return TinyCNN()\n")
    importlib.invalidate_caches()
    assert main(["score", "run", "--data", str(npz), "--quiet"]) == 2
    assert "records its model as 'usermod_trust:build'" in capsys.readouterr().err
    assert not marker.exists()
    assert main(["score", "run", "--data", str(npz), "--quiet", "--trust-run-model"]) == 0
    err = capsys.readouterr().err
    assert marker.exists()  # opted in: it ran, and said what before
    assert f"--trust-run-model: importing 'usermod_trust' (running {cwd / 'usermod_trust.py'})" in err


# defect 1: actclust's own builders are rebuilt without opt-in, from the installed package: the
# current folder is not put on the import path (it was, so a folder could shadow any module)
def test_builtin_model_needs_no_opt_in_and_keeps_sys_path(cwd, capsys):
    from actclust.models import digits_cnn

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 1, 8, 8)).astype(np.float32)
    np.savez(cwd / "digits8.npz", x=x, y=rng.integers(0, 10, 60))
    ac = ActivationClustering(digits_cnn().eval(), ["fc1", "fc2"], n_clusters=3, progress=False).fit(x)
    ac.save(cwd / "run", metadata={"model": "actclust.models:digits_cnn", "weights": None})
    path = list(sys.path)
    assert main(["score", "run", "--data", "digits8.npz", "--quiet", "--json"]) == 0
    assert sys.path == path and str(cwd) not in sys.path
    assert json.loads(capsys.readouterr().out)["n"] == 60


# defect 1: recorded weights were read wherever they pointed (../, absolute, a link out of the run)
@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_recorded_weights_stay_inside_the_run(fitted, npz, cwd, capsys, where):
    from safetensors.torch import save_file

    outside = cwd / "outside.safetensors"
    save_file(TinyCNN().state_dict(), str(outside))
    recorded = {"parent": "../outside.safetensors", "absolute": str(outside), "link": "w.safetensors"}[where]
    fitted.save(cwd / "run", metadata={"model": "conftest:TinyCNN", "weights": recorded})
    if where == "link":
        os.symlink(outside, cwd / "run" / "w.safetensors")
    assert main(["score", "run", "--data", str(npz), "--quiet", "--model", "conftest:TinyCNN"]) == 2
    err = capsys.readouterr().err
    expected = "pass through the link" if where == "link" else "which is not a path inside the run folder"
    assert expected in err and "add --weights" in err


# the run's own weights file damaged: said so, not the advice for a --weights file saved the wrong way (an outside check)
def test_damaged_recorded_weights_named_as_the_runs(fitted, npz, cwd, capsys):
    fitted.save(cwd / "run", metadata={"model": "conftest:TinyCNN", "weights": "w.safetensors"})
    (cwd / "run" / "w.safetensors").write_bytes(b"\xff" * 64)
    assert main(["score", "run", "--data", str(npz), "--quiet", "--model", "conftest:TinyCNN"]) == 2
    err = capsys.readouterr().err
    assert "keeps its model's weights in w.safetensors, which cannot be read" in err and "the run is damaged" in err
    assert "torch.save" not in err


# a run that records no weights (saved from Python), scored with --model alone: the callable's fresh model was scored,
# untrained, with a warning only (fidelity 0.0: an outside check); refused, saying to add --weights
def test_untrained_model_for_a_run_without_weights_refused(data, npz, cwd, capsys):
    from safetensors.torch import save_file

    x, y = data
    trained = TinyCNN(seed=7).eval()
    _fit(trained, x, y).save(cwd / "run")
    assert main(["score", "run", "--data", str(npz), "--quiet", "--model", "conftest:TinyCNN"]) == 2
    err = capsys.readouterr().err
    assert ("records no model weights, none were given, and the model conftest:TinyCNN builds has other parameters "
            "than the one the run was fitted with (untrained?): add --weights") in err
    save_file(trained.state_dict(), str(cwd / "w.safetensors"))
    assert main(["score", "run", "--data", str(npz), "--quiet", "--model", "conftest:TinyCNN",
                 "--weights", str(cwd / "w.safetensors")]) == 0


# ---------------------------------------------------------------------------- 2. a saved run owns its vectors
# defect 2: fitting B into A's store folder and then saving A gave a run with B's vectors
def test_two_estimators_one_store_folder(model, mixed_model, data, tmp_path):
    x, y = data
    store = tmp_path / "vectors"
    a = _fit(model, x, y, store=store)
    expected = _fit(model, x, y).similar(x[:30], k=5, search="exact").indices  # the same fit, in memory
    b = _fit(mixed_model, x[::-1].copy(), store=store)
    np.testing.assert_array_equal(a.similar(x[:30], k=5, search="exact").indices, expected)
    a.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    np.testing.assert_array_equal(loaded.similar(x[:30], k=5, search="exact").indices, expected)
    assert b.state_.train_vectors.directory != a.state_.train_vectors.directory


_OTHER_FIT = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from conftest import TinyCNN, LAYERS
import actclust
x = np.random.default_rng(5).standard_normal((150, 1, 6, 6)).astype(np.float32)
actclust.ActivationClustering(TinyCNN(seed=7).eval(), LAYERS, n_clusters=4, progress=False, store={store!r}).fit(x)
print("fitted", flush=True)
"""


# defect 2: a second process fitting into the folder of a live explainer replaced its vectors
def test_second_process_fits_into_a_live_store(model, data, tmp_path):
    x, y = data
    store = tmp_path / "vectors"
    a = _fit(model, x, y, store=store)
    expected = a.similar(x[:30], k=5, search="exact").indices
    r = subprocess.run([sys.executable, "-c", _OTHER_FIT.format(tests=TESTS, store=str(store))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fitted" in r.stdout, r.stderr
    a.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    np.testing.assert_array_equal(loaded.similar(x[:30], k=5, search="exact").indices, expected)
    np.testing.assert_array_equal(a.similar(x[:30], k=5, search="exact").indices, expected)


# defect 2 (copy-on-write): later fits into the store folder change no byte of a saved run, and old
# generations do not pile up: those no live explainer holds are removed by the next fit
def test_later_fits_never_change_a_saved_run(model, mixed_model, data, tmp_path):
    from actclust.store import generations

    x, y = data
    store, run = tmp_path / "vectors", tmp_path / "run"
    a = _fit(model, x, y, store=store)
    a.save(run)
    expected, files = a.similar(x[:30], k=5, search="exact").indices, _tree(run)
    del a
    gc.collect()
    b = _fit(mixed_model, x[::-1].copy(), store=store)
    c = _fit(model, x[:100], store=store)
    assert len(generations(store)) == 2  # a's generation went once nobody held it; b's and c's stay
    assert _tree(run) == files
    loaded = actclust.load(run, model, progress=False)
    np.testing.assert_array_equal(loaded.similar(x[:30], k=5, search="exact").indices, expected)
    del b
    gc.collect()
    _fit(model, x[:90], store=store)
    assert len(generations(store)) == 2 and c.state_.train_vectors.directory in generations(store)


# a loaded run's search indexes are read on first use: a save over its folder in the meantime (another process's
# fit --out RUN --overwrite) removed their files, and the loaded explainer's searches and its saves elsewhere
# failed with FileNotFoundError for good (found by an outside check). They are opened at load: it answers as loaded
def test_loaded_indexes_survive_a_save_over_the_run(model, mixed_model, data, tmp_path):
    x, y = data
    a = _fit(model, x, y)
    expected = a.similar(x[:30], k=5, search="approximate").indices  # builds the index the save keeps
    a.save(tmp_path / "run")
    assert any(n.endswith(".faiss") for n in os.listdir(tmp_path / "run"))
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    b = _fit(mixed_model, x[::-1].copy())
    b.similar(x[:5], k=5, search="approximate")
    b.save(tmp_path / "run", overwrite=True)  # the run's files are now b's
    np.testing.assert_array_equal(loaded.similar(x[:30], k=5, search="approximate").indices, expected)
    loaded.save(tmp_path / "copy")
    again = actclust.load(tmp_path / "copy", model, progress=False)
    np.testing.assert_array_equal(again.similar(x[:30], k=5, search="approximate").indices, expected)


# a load while another process saves over the run met files removed under it (raw FileNotFoundError, or a "damaged
# run, fit again"): a load takes the folder's lock shared, so it waits for a save under way, and a save for it
def test_load_waits_for_a_save_under_way(model, data, tmp_path, npz):
    import threading

    from actclust.io import atomic

    x, y = data
    run = tmp_path / "run"
    _fit(model, x, y).save(run)
    expected = actclust.load(run, model, progress=False).predict(x[:20])
    turn = atomic.hold_folder(run)  # as a save holds it while it replaces the run's files
    done = []
    loader = threading.Thread(target=lambda: done.append(actclust.load(run, model, progress=False)))
    loader.start()
    loader.join(0.5)
    assert loader.is_alive() and not done  # waiting for the save
    turn.release()
    loader.join(30)
    np.testing.assert_array_equal(done[0].predict(x[:20]), expected)
    # the command line reads the run's manifest and model files under the same lock (it read them before: one save's
    # weights with another's run, exit 0: an outside check)
    from actclust.io import persistence

    real, free = persistence.read_manifest, []

    def spied(path):  # while the command reads the manifest, a save could take the folder's lock: no longer
        hold = atomic.Hold.attempt(path)
        free.append(hold is not None)
        if hold is not None:
            hold.release()
        return real(path)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(persistence, "read_manifest", spied)
        assert main(["score", str(run), "--data", str(npz), "--quiet", "--model", "conftest:TinyCNN"]) == 0
    assert free and not any(free)  # the command's own read too (it was free: [True, False])
    # a named pipe given as the run: said not to be one (the lock's open of it waited for a writer forever: review)
    os.mkfifo(tmp_path / "pipe")
    said = []

    def load_pipe():
        try:
            actclust.load(tmp_path / "pipe", model, progress=False)
        except actclust.InvalidSaveError as e:
            said.append(str(e))
    pipe = threading.Thread(target=load_pipe, daemon=True)
    pipe.start()
    pipe.join(20)
    assert not pipe.is_alive() and said and said[0].startswith(f"No saved run at {tmp_path / 'pipe'}")


# a save killed while it removed the replaced run's store folder left half of it, which no later save took for a
# leftover: every save into the folder was refused after (an outside check). The folder is renamed to a temporary entry
# of ours first, which the next save removes
def test_save_killed_while_removing_the_old_store(model, mixed_model, data, tmp_path, monkeypatch):
    from actclust.io import atomic

    x, y = data
    run = tmp_path / "run"
    _fit(model, x, y, store=tmp_path / "s1").save(run)
    b = _fit(mixed_model, x[::-1].copy(), store=tmp_path / "s2")
    real = atomic.shutil.rmtree

    def killed(path, ignore_errors=False):
        files = sorted(os.listdir(path)) if "store-" in os.path.basename(path) else []
        if not files:
            return real(path, ignore_errors=ignore_errors)
        os.unlink(os.path.join(path, "store.json"))  # the replaced store's manifest gone (rmtree's order), then the
        raise KeyboardInterrupt  # process dies

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        b.save(run, overwrite=True)
    monkeypatch.setattr(atomic.shutil, "rmtree", real)
    b.save(run, overwrite=True)  # was: RunExistsError, "files that are not part of the run (store-...)"
    assert not [n for n in os.listdir(run) if n.endswith(".actclust-tmp")]
    np.testing.assert_array_equal(actclust.load(run, mixed_model, progress=False).predict(x), b.predict(x))


# ---------------------------------------------------------------------------- 3. stored files checked at load
def _reverse_block(raw: bytearray) -> None:
    raw[64:192] = raw[64:192][::-1]


def _nan(raw: bytearray) -> None:
    raw[40:44] = np.array([np.nan], np.float32).tobytes()


def _bit_flips(raw: bytearray) -> None:
    rng = np.random.default_rng(0)
    for bit in rng.choice(len(raw) * 8, 3, replace=False):
        raw[bit // 8] ^= 1 << (bit % 8)


# defect 3: a same-size edit of a stored vector file loaded and answered silently wrong
@pytest.mark.parametrize("edit", [_reverse_block, _nan, _bit_flips], ids=["reversed-block", "nan", "bit-flips"])
def test_same_size_store_edits_refused(model, data, tmp_path, edit):
    x, y = data
    ac = _fit(model, x, y, store=tmp_path / "vectors")
    ac.save(tmp_path / "run")
    target = sorted((tmp_path / "run").glob("store*/layer-*.bin"))[1]
    raw = bytearray(target.read_bytes())
    edit(raw)
    with open(target, "r+b") as f:  # in place: same size, same inode
        f.write(raw)
    with pytest.raises(InvalidSaveError, match=rf"{re.escape(target.name)} does not match its SHA-256 in manifest.json"):
        actclust.load(tmp_path / "run", model, progress=False)


# defect 3: store.json was outside the digest: swapping the files of two layers of equal width
# loaded silently with each layer's neighbours read from the other's vectors
@pytest.mark.parametrize("verify", [True, False])
def test_store_manifest_in_digest(data, tmp_path, verify):
    x, y = data
    model = TinyCNN(n_classes=4).eval()  # conv and fc2 both give 4 values per sample
    ac = _fit(model, x, y, store=tmp_path / "vectors", spatial_grid=None)
    ac.save(tmp_path / "run")
    (store_json,) = (tmp_path / "run").glob("store*/store.json")
    m = json.loads(store_json.read_text())
    entries = {e["name"]: e for e in m["layers"]}
    assert entries["conv"]["width"] == entries["fc2"]["width"]
    entries["conv"]["file"], entries["fc2"]["file"] = entries["fc2"]["file"], entries["conv"]["file"]
    store_json.unlink()  # a new file: the store folder of the fit keeps its own
    store_json.write_text(json.dumps(m, indent=1))
    with pytest.raises(InvalidSaveError, match="store.json does not match its SHA-256 in manifest.json"):
        actclust.load(tmp_path / "run", model, progress=False, **({} if verify else {"verify": False}))


# ---------------------------------------------------------------------------- 4. kill -9 during save and capture
_SAVER = """
import os, sys, numpy as np, torch
torch.set_num_threads(1)  # no thread pool for the forked savers to inherit
sys.path.insert(0, {tests!r})
from conftest import TinyCNN, LAYERS
import actclust
x = np.random.default_rng(0).standard_normal((8000, 1, 6, 6)).astype(np.float32)
ac = actclust.ActivationClustering(TinyCNN().eval(), LAYERS, n_clusters=4, reducer="grid:6", progress=False,
                                   store={store!r}).fit(x)
print("ready", flush=True)
for line in sys.stdin:  # "<folder> <overwrite>": a child saves there until killed; the server reaps it
    folder, overwrite = line.split()
    pid = os.fork()
    if pid == 0:
        while True:
            ac.save(folder, overwrite=overwrite == "1")
            print("saved", flush=True)
            overwrite = "1"
    print("child", pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


class _Saver:
    """A process holding a fitted explainer that forks one saver per :meth:`kill_during`: a fork
    costs milliseconds where a fresh interpreter costs seconds, so a test can kill many saves."""

    def __init__(self, tmp_path, store=None):
        code = _SAVER.format(tests=TESTS, store=None if store is None else str(store))
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self._pending, self._seen = b"", []
        assert self._line() == "ready"

    def _line(self, timeout: float = 120) -> str:
        """The saver's next line; a saver silent for ``timeout`` seconds fails the test, naming what it said
        last, instead of leaving it waiting (unbuffered reads: a line Python buffered would escape select)."""
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], \
                f"the saver said nothing for {timeout:.0f} s; its last lines: {self._seen[-6:]}"
            chunk = os.read(fd, 4096)
            assert chunk, "the saver process ended"
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        self._seen.append(line.decode())
        return self._seen[-1].strip()

    def kill_during(self, folder: Path, moment, *, saves: int = 2, overwrite: bool = True, timeout: float = 60) -> int:
        """Start a saver into ``folder``; after ``saves`` complete saves, SIGKILL it once ``moment()``."""
        self.proc.stdin.write(f"{folder} {int(overwrite)}\n")
        self.proc.stdin.flush()
        words = self._line().split()
        assert words[0] == "child", words
        pid = int(words[1])
        try:
            for _ in range(saves):
                assert self._line() == "saved"
            deadline = time.monotonic() + timeout
            while not moment():
                assert time.monotonic() < deadline, "the moment to kill never came"
        finally:
            os.kill(pid, signal.SIGKILL)
        done = 0
        # a child killed inside its print leaves "saved" without its newline, so the server's "reaped" can follow it
        # on the same line ("savedreaped": the harness waited for a "reaped" line that had come, and failed)
        while not (line := self._line()).endswith("reaped"):
            done += line == "saved"
        return done

    def close(self):
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def _kill_when(proc, condition, timeout=90):
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "the moment to kill never came"
            assert proc.poll() is None, "the process ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def _writing(run: Path) -> bool:
    """Whether a save is writing its bulk data: a temporary (hidden) file of over 1 MiB in the folder."""
    try:  # the listing itself fails when a folder in it is renamed or removed while it is read
        for p in run.rglob("*"):
            try:
                if any(c.startswith(".") for c in p.relative_to(run).parts) and p.is_file() \
                        and p.stat().st_size > 1 << 20:
                    return True
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
    except FileNotFoundError:
        pass
    return False


def _hidden(run: Path) -> bool:
    try:
        return any(p.name.startswith(".") for p in run.iterdir())
    except FileNotFoundError:
        return False


# defect 4: kill -9 during save left safetensors' .tmpXXXXXX files the next save did not remove
# (gigabytes after ten kills); now the folder stays whole after every kill and the next save leaves
# no byte behind. Eight savers killed in their third save: as soon as a temporary entry appears,
# while the bulk data is written, or at random instants; with a vector store too.
@pytest.mark.slow
@pytest.mark.parametrize("store", [False, True], ids=["memory", "store"])
def test_sigkill_during_save(tmp_path, store):
    rng = np.random.default_rng(int(store))
    x = np.random.default_rng(0).standard_normal((8000, 1, 6, 6)).astype(np.float32)
    ac = ActivationClustering(TinyCNN().eval(), LAYERS, n_clusters=4, reducer="grid:6", progress=False).fit(x)
    run, saver = tmp_path / "run", _Saver(tmp_path, tmp_path / "vectors" if store else None)
    try:
        for when in ["appears", "appears", "writing", "writing"] + ["random"] * 4:
            delay = rng.uniform(0, 0.1)
            moment = {"appears": lambda: _hidden(run), "writing": lambda: _writing(run),
                      "random": lambda: _hidden(run) and time.sleep(delay) is None}[when]
            saver.kill_during(run, moment)
            loaded = actclust.load(run, TinyCNN().eval(), progress=False)  # whole: the last save or the one before
            np.testing.assert_array_equal(loaded.predict(x[:200]), ac.predict(x[:200]))
    finally:
        saver.close()
    ac.save(run, overwrite=True)
    assert _bytes(run) == _run_bytes(run)  # nothing left over
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


# defect 4: a killed *first* save into a folder made every later save there fail ("holds other files")
@pytest.mark.slow
def test_killed_first_save_never_blocks(tmp_path, model, data):
    saver = _Saver(tmp_path)
    fitted = _fit(model, *data)
    try:
        for i, when in enumerate(["appears", "writing", "appears", "writing"]):
            run = tmp_path / f"first-{i}"
            moment = (lambda: _hidden(run)) if when == "appears" else (lambda: _writing(run))
            assert saver.kill_during(run, moment, saves=0, overwrite=False) == 0
            assert run.exists()
            fitted.save(run)  # no overwrite needed: nothing of a run was there
            assert _bytes(run) == _run_bytes(run)
            np.testing.assert_array_equal(actclust.load(run, model, progress=False).predict(data[0]),
                                          fitted.predict(data[0]))
    finally:
        saver.close()


_CAPTURE = """
import sys, time, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import TinyCNN, LAYERS
import actclust

class Slow(TinyCNN):
    def forward(self, x):
        time.sleep(0.01)
        return super().forward(x)

x = np.random.default_rng(0).standard_normal((20000, 1, 6, 6)).astype(np.float32)
print("ready", flush=True)
actclust.ActivationClustering(Slow().eval(), LAYERS, n_clusters=4, batch_size=64, progress=False,
                              store={store!r}).fit(x)
"""


# a fit killed with SIGKILL while capturing: the next fit into the folder works and removes its bytes
@pytest.mark.slow
def test_sigkill_during_capture(tmp_path, model, data):
    from actclust.store import generations

    store = tmp_path / "vectors"
    proc = subprocess.Popen([sys.executable, "-c", _CAPTURE.format(tests=TESTS, store=str(store))],
                            stdout=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: store.exists() and any(f.stat().st_size > 0 for f in store.rglob("layer-*.bin")))
    assert _bytes(store) > 0 and not generations(store)  # a killed fit commits no generation
    ac = _fit(model, *data, store=store)
    (gen,) = generations(store)
    assert sorted(p.name for p in store.iterdir()) == [gen.name] and _bytes(store) == _bytes(gen)
    assert ac.score(*data)["n"] == len(data[0])


# ---------------------------------------------------------------------------- 5. nothing overwritten unasked
# defect 7 of the issue: --overwrite replaced a folder that is not a run but holds a manifest.json
def test_overwrite_refuses_a_folder_that_is_not_a_run(fitted, npz, tmp_path, capsys):
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "My App", "icons": []}))
    (app / "index.html").write_text("<html></html>")
    before = _tree(app)
    with pytest.raises(RunExistsError, match="its manifest.json is not the manifest of an actclust run"):
        fitted.save(app, overwrite=True)
    assert main(["fit", "conftest:TinyCNN", "--data", str(npz), "--layers", "fc1", "--n-clusters", "3",
                 "--out", str(app), "--overwrite", "--quiet"]) == 2
    assert "is not the manifest of an actclust run" in capsys.readouterr().err
    assert _tree(app) == before


# --overwrite replaces a run, but not a run folder that also holds the user's files
def test_overwrite_keeps_files_that_are_not_the_runs(fitted, tmp_path):
    fitted.save(tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match=r"also holds files that are not part of the run \(notes.txt\)"):
        fitted.save(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


# an interrupt just after the commit (in the folder's fsync that follows the manifest's rename) left no run: the
# clean-up of a failed save removed the files the new manifest, already in place, names (found by an outside check
# that interrupted a save at each of its 1,841 steps). It now keeps a committed run whole
def test_interrupt_right_after_the_commit_keeps_the_new_run(model, mixed_model, data, tmp_path, monkeypatch):
    from actclust.io import atomic

    x, y = data
    old = _fit(model, x, y)
    new = ActivationClustering(mixed_model, LAYERS, n_clusters=3, progress=False, store=tmp_path / "vs").fit(x, y)
    old.save(tmp_path / "run")
    real = atomic.publish

    def publish(source, target):
        real(source, target)
        if Path(target).name == "manifest.json":
            raise KeyboardInterrupt  # as if in fsync_dir, once the rename is done

    monkeypatch.setattr(atomic, "publish", publish)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "run", overwrite=True)
    monkeypatch.setattr(atomic, "publish", real)
    loaded = actclust.load(tmp_path / "run", mixed_model, progress=False)
    assert loaded.n_clusters == 3
    np.testing.assert_array_equal(loaded.predict(x), new.predict(x))


# a save without overwrite removes only leftovers it can show are a save's: entries named by a hash of their content
# that hold that content. The user's files whose names merely look alike (a checkpoint named by a commit, a folder
# of notes named store-<hex>) were deleted without a word (found by an outside check)
def test_lookalike_files_are_not_leftovers(model, data, tmp_path):
    import shutil

    fitted = ActivationClustering(model, LAYERS, n_clusters=4, progress=False, store=tmp_path / "vs").fit(*data)
    fitted.save(tmp_path / "run")
    ours = sorted(n for n in os.listdir(tmp_path / "run") if n != "manifest.json")
    assert any(n.startswith("store-") for n in ours) and any(n.startswith("arrays-") for n in ours)
    mine = tmp_path / "mine"
    (mine / "store-0123456789abcdef").mkdir(parents=True)
    (mine / "store-0123456789abcdef" / "notes.txt").write_text("important")
    (mine / "ckpt-0123456789abcdef.safetensors").write_bytes(b"weights")
    (mine / "arrays-fedcba9876543210.safetensors").write_bytes(b"not a run's arrays")
    for name in ours:  # a save killed between placing its hashed entries and its manifest: these are ours
        copy = shutil.copytree if (tmp_path / "run" / name).is_dir() else shutil.copy
        copy(tmp_path / "run" / name, mine / name)
    with pytest.raises(RunExistsError, match=r"holds other files \(arrays-fedcba9876543210.safetensors, "
                                             r"ckpt-0123456789abcdef.safetensors, store-0123456789abcdef\)"):
        fitted.save(mine)
    assert (mine / "store-0123456789abcdef" / "notes.txt").read_text() == "important"
    for name in ("ckpt-0123456789abcdef.safetensors", "arrays-fedcba9876543210.safetensors", "store-0123456789abcdef"):
        shutil.move(mine / name, tmp_path / name)
    fitted.save(mine)  # only a killed save's entries left: no overwrite needed, and they become the run's
    assert sorted(os.listdir(mine)) == sorted(ours + ["manifest.json"])
    np.testing.assert_array_equal(actclust.load(mine, model, progress=False).predict(data[0]), fitted.predict(data[0]))


# defect 7 of the issue: the demo replaced a report.html it had not written; it replaces only files
# its run recorded as its own
def test_demo_keeps_a_report_it_did_not_write(fitted, tmp_path, monkeypatch, capsys):
    from actclust.adapters import adapt
    from actclust.cli.commands import DEMO_OUT
    from actclust.io import persistence
    from actclust.io.persistence import check_writable

    monkeypatch.chdir(tmp_path)
    fitted.save(tmp_path / DEMO_OUT)  # a run, saved by someone else, not by the demo
    (tmp_path / DEMO_OUT / "report.html").write_text("my own report")
    for argv in (["demo", "--quiet", "--epochs", "1"], ["demo", "--quiet", "--epochs", "1", "--overwrite"]):
        assert main(argv) == 2
        assert "not part of the run (report.html)" in capsys.readouterr().err
    assert (tmp_path / DEMO_OUT / "report.html").read_text() == "my own report"
    persistence.save(fitted.state_, persistence.params_of(fitted), adapt(fitted.model), tmp_path / "demo2",
                     files={"report.html": None})  # as the demo saves: report.html recorded as the run's own
    (tmp_path / "demo2" / "report.html").write_text("the demo's report")
    check_writable(tmp_path / "demo2", True)  # recorded as the run's: replaceable


# defect 5 of the issue: study analyze --html overwrote any file, the study's responses.sqlite included
def test_study_analyze_never_overwrites_the_study(tmp_path, study_source, capsys):
    from actclust.study.db import Store
    from actclust.study.folder import load_study

    from conftest import make_study

    folder = make_study(tmp_path / "s", study_source, conditions=["none", "full"])
    store = Store(load_study(folder))
    s = store.create_session()
    session = store.authorise(session_id=s["session_id"], token=s["token"])
    trial = store.next_trial(session)[0]
    store.record(session, trial["id"], "accept", 2, None)
    def data(tree):  # SQLite's -shm is its shared-memory index, rewritten by any reader: not the study's data
        return {k: v for k, v in tree.items() if not k.endswith("-shm")}

    before = data(_tree(folder))
    for name, extra in (("responses.sqlite", []), ("study.json", []), ("responses.sqlite", ["--overwrite"])):
        assert main(["study", "analyze", str(folder), "--n-boot", "100", "--html", str(folder / name), *extra]) == 2
        err = capsys.readouterr().err
        assert f"Refusing to write the page to {folder / name}" in err and "with or without --overwrite" in err
    (tmp_path / "page.html").write_text("mine")
    assert main(["study", "analyze", str(folder), "--n-boot", "100", "--html", str(tmp_path / "page.html")]) == 2
    assert "page.html already exists and is not a page written by actclust study; pass --overwrite" in capsys.readouterr().err
    assert data(_tree(folder)) == before and (tmp_path / "page.html").read_text() == "mine"
    assert main(["study", "analyze", str(folder), "--n-boot", "100", "--html", str(tmp_path / "page.html"),
                 "--overwrite"]) == 0
    assert "<svg" in (tmp_path / "page.html").read_text()


# ---------------------------------------------------------------------------- 6. errors that are not ours
# defect 9 of the issue: save(None), save("/proc/x") and non-JSON metadata raised TypeError and OSError
def test_bad_paths_and_metadata(fitted, tmp_path):
    with pytest.raises(ParameterError, match=r"The run's path must be a directory path .* Got None instead"):
        fitted.save(None)
    with pytest.raises(ParameterError, match=r"Got '' instead"):
        fitted.save("")
    with pytest.raises(StorageError, match=r"Could not save the run to /proc/x: No such file or directory.*not under /proc"):
        fitted.save("/proc/x")
    with pytest.raises(ParameterError, match=r"metadata must hold only JSON values .*set"):
        fitted.save(tmp_path / "run", metadata={"tags": {"a", "b"}})
    with pytest.raises(ParameterError, match=r"metadata must hold only JSON values .*Out of range float"):
        fitted.save(tmp_path / "run", metadata={"score": float("nan")})
    with pytest.raises(ParameterError, match=r"metadata must be a dict"):
        fitted.save(tmp_path / "run", metadata=["model"])
    assert not (tmp_path / "run").exists()
    # a name longer than the file system allows: a StorageError (exit 2 on the command line), not an OSError traceback
    # (exit 1), for save, load and study create, the study before its work (found by an outside check)
    long = tmp_path / ("y" * 300)
    with pytest.raises(StorageError, match=r"Could not save the run to .*yyy: File name too long"):
        fitted.save(long)
    with pytest.raises(StorageError, match=r"Could not read the run at .*yyy: File name too long"):
        actclust.load(long, fitted.model)
    from actclust.study import create_study
    from actclust.views import render

    def no_work(*args, **kwargs):
        raise AssertionError("the study was rendered before its folder was checked")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "Renderer", no_work)
        with pytest.raises(StorageError, match=r"Could not create the study in .*yyy: File name too long"):
            create_study(fitted, np.zeros((12, 1, 6, 6), np.float32), np.zeros(12, int), out=long, items=4)


def _enospc_after(limit: int):
    """An ``os.write`` that fails with ENOSPC once ``limit`` bytes were written, as a full disk does."""
    real, written = os.write, [0]

    def write(fd, data):
        if written[0] + len(data) > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        return real(fd, data)
    return write


class _FullFile:
    """A binary file whose writes fail with ENOSPC after ``limit`` bytes (vector store files)."""

    def __init__(self, path, mode, limit):
        self._f, self._left = open(path, mode, buffering=0), limit
        self.name = self._f.name

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self._left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


# defect 9 of the issue: a full disk surfaced as OSError/SafetensorError and left partial files; now a
# DiskFullError (an OSError and an ActClustError) saying what to do, the previous run whole, no bytes left
def test_full_disk_patched_writer(fitted, model, data, tmp_path, monkeypatch):
    from actclust.store import vectors

    run = tmp_path / "run"
    fitted.save(run)
    before = _tree(run)
    monkeypatch.setattr(os, "write", _enospc_after(20_000))
    with pytest.raises(DiskFullError, match=r"the disk is full \(No space left on device\).*free space"):
        fitted.save(run, overwrite=True)
    with pytest.raises(DiskFullError):
        fitted.save(tmp_path / "first")
    with pytest.raises(DiskFullError):  # the folders it made go again: none left empty in the user's way
        fitted.save(tmp_path / "made" / "deeper")
    (tmp_path / "mine").mkdir()
    with pytest.raises(DiskFullError):  # a folder the user made stays
        fitted.save(tmp_path / "mine")
    monkeypatch.undo()
    assert _tree(run) == before and not (tmp_path / "first").exists() and not (tmp_path / "made").exists()
    assert list((tmp_path / "mine").iterdir()) == []
    np.testing.assert_array_equal(actclust.load(run, model, progress=False).predict(data[0]), fitted.predict(data[0]))
    store = tmp_path / "vectors"
    first = _fit(model, *data, store=store)
    store_before = _tree(store)
    monkeypatch.setattr(vectors, "open", lambda path, mode="r", **kw: _FullFile(path, mode, 1000), raising=False)
    with pytest.raises(DiskFullError, match=r"Could not write the vector store .*the disk is full"):
        _fit(model, *data, store=store)
    monkeypatch.undo()
    assert _tree(store) == store_before  # the failed fit's partial generation is gone
    assert first.score(*data)["n"] == len(data[0])


_TMPFS = """
import errno, json, os, sys, numpy as np
sys.path.insert(0, {tests!r})
from conftest import TinyCNN, LAYERS
import actclust
from actclust import DiskFullError, StoragePermissionError
disk, ro = {disk!r}, {ro!r}
x = np.random.default_rng(0).standard_normal((4000, 1, 6, 6)).astype(np.float32)
out = {{}}
def used():
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(disk) for f in fs)
try:  # a store bigger than the disk
    actclust.ActivationClustering(TinyCNN().eval(), LAYERS, n_clusters=4, reducer="grid:6", progress=False,
                                  store=os.path.join(disk, "vectors")).fit(x)
    out["store"] = "no error"
except DiskFullError as e:
    out["store"] = type(e).__name__
out["store_left"] = used()
small = actclust.ActivationClustering(TinyCNN().eval(), LAYERS, n_clusters=4, progress=False).fit(x[:200])
small.save(os.path.join(disk, "run"))
kept = used()
big = actclust.ActivationClustering(TinyCNN().eval(), LAYERS, n_clusters=4, reducer="grid:6",
                                    progress=False).fit(x)
try:
    big.save(os.path.join(disk, "run"), overwrite=True)
    out["save"] = "no error"
except DiskFullError as e:
    out["save"] = type(e).__name__
out["save_left"] = used() - kept
out["reload"] = int((actclust.load(os.path.join(disk, "run"), TinyCNN().eval(), progress=False).predict(x[:50])
                     == small.predict(x[:50])).all())
try:
    small.save(os.path.join(ro, "run"))
    out["read_only"] = "no error"
except StoragePermissionError as e:
    out["read_only"] = type(e).__name__
print(json.dumps(out))
"""


# a real full disk (a 2 MiB tmpfs) and a read-only file system, in a private mount namespace
# (unshare: no root needed); skipped, saying why, only where the kernel allows no such namespace
@pytest.mark.slow
def test_full_disk_tmpfs(tmp_path):
    disk, ro = tmp_path / "disk", tmp_path / "ro"
    disk.mkdir()
    ro.mkdir()
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "--mount", "--map-root-user", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare --mount --map-root-user failed); the patched "
                    "writer variant test_full_disk_patched_writer ran instead")
    script = _TMPFS.format(tests=TESTS, disk=str(disk), ro=str(ro))
    shell = (f"mount -t tmpfs -o size=2m tmpfs {disk} && mount -t tmpfs -o ro,size=1m tmpfs {ro} && "
             f'exec "$0" -c "$1"')
    r = subprocess.run([unshare, "--mount", "--map-root-user", "sh", "-c", shell, sys.executable, script],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"store": "DiskFullError", "store_left": 0, "save": "DiskFullError", "save_left": 0, "reload": 1,
                   "read_only": "StoragePermissionError"}


# ---------------------------------------------------------------------------- 7. one atomic helper
# persistence, the vector store and the report writer write through io.atomic only: no os.replace,
# write_text, save_file... of their own (there were three of them)
def test_one_atomic_helper():
    import ast

    src = Path(actclust.__file__).parent
    banned = {"replace", "rename", "write_text", "write_bytes", "save_file", "copy2", "copyfile"}
    for module in ("io/persistence.py", "store/vectors.py", "views/report.py", "study/output.py"):
        tree = ast.parse((src / module).read_text())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not calls & banned, (module, calls & banned)
        assert "atomic" in {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}, module


# ---------------------------------------------------------------------------- the refusals, each with its message
# recorded models and weights the CLI refuses, each saying why and what to add
@pytest.mark.parametrize("metadata, extra, match", [
    ({"model": "nowhere_module:build"}, ["--trust-run-model"],
     "--trust-run-model: the module 'nowhere_module' that the run at run records is neither in the current folder"),
    ({"model": "no-colon"}, ["--trust-run-model"], "records its model as 'no-colon', not as 'package.module:callable'"),
    ({"model": "conftest:TinyCNN", "weights": "missing.safetensors"}, ["--model", "conftest:TinyCNN"],
     "The weights file run/missing.safetensors that the run at run records is missing; add --weights"),
    ({"model": "conftest:TinyCNN", "weights": "sub"}, ["--model", "conftest:TinyCNN"],
     "The weights run/sub that the run at run records are not a regular file in the run"),
    ({"model": "conftest:TinyCNN", "weights": "w.pt"}, ["--model", "conftest:TinyCNN"],
     "records the weights 'w.pt', which are not a .safetensors file; a run's files are read as JSON, safetensors and ONNX only"),
    # a run saved from Python: the hint names --weights too (following it with --model alone scored an untrained net)
    (None, [], "does not say how to build its model (a run saved from Python keeps neither the model nor its weights); "
               "add --model with the callable that builds it, as package.module:callable, and --weights"),
])
def test_cli_run_refusals(fitted, npz, cwd, capsys, metadata, extra, match):
    fitted.save(cwd / "run", metadata=metadata)
    (cwd / "run" / "sub").mkdir()
    (cwd / "run" / "w.pt").write_bytes(b"\x80\x04pickle")
    assert main(["score", "run", "--data", str(npz), "--quiet", *extra]) == 2
    assert match in capsys.readouterr().err


# weights the run records are checked against their SHA-256 in the manifest
def test_cli_recorded_weights_checked(fitted, npz, cwd, capsys):
    from actclust.adapters import adapt
    from actclust.io import persistence
    from actclust.cli.commands import _weights_bytes

    data = _weights_bytes(fitted.model)
    name = persistence.hashed_name("model.safetensors", data)
    persistence.save(fitted.state_, persistence.params_of(fitted), adapt(fitted.model), cwd / "run",
                     metadata={"model": "conftest:TinyCNN", "weights": name}, files={name: data})
    assert main(["score", "run", "--data", str(npz), "--quiet", "--model", "conftest:TinyCNN"]) == 0
    raw = bytearray((cwd / "run" / name).read_bytes())
    raw[-1] ^= 1
    (cwd / "run" / name).write_bytes(raw)
    assert main(["score", "run", "--data", str(npz), "--quiet", "--model", "conftest:TinyCNN"]) == 2
    assert f"run/{name} does not match its SHA-256 in the run's manifest" in capsys.readouterr().err


# links and devices in a run folder are refused: a link could point anywhere (/dev/zero, /etc/...)
def test_links_in_a_run_refused(model, data, tmp_path):
    from actclust.io.persistence import _digest

    ac = _fit(model, *data, store=tmp_path / "vectors")
    run = tmp_path / "run"
    ac.save(run)
    manifest = run / "manifest.json"
    good = manifest.read_text()
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    with pytest.raises(InvalidSaveError, match="manifest.json is not a regular file of at most 64 MiB"):
        actclust.load(run, model)
    manifest.unlink()
    manifest.write_text(good)
    (arrays,) = run.glob("arrays-*")
    os.rename(arrays, tmp_path / "elsewhere")
    arrays.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidSaveError, match=r"The array file .* is not a regular file \(a link or a device"):
        actclust.load(run, model)
    arrays.unlink()
    os.rename(tmp_path / "elsewhere", arrays)
    (store,) = run.glob("store-*")
    layer = store / "layer-1.bin"
    os.rename(layer, tmp_path / "layer")
    layer.symlink_to(tmp_path / "layer")
    with pytest.raises(InvalidSaveError, match=r"The stored vector file .*layer-1.bin is missing or not a regular file"):
        actclust.load(run, model)
    with pytest.raises(InvalidSaveError, match=r"lacks 'layer-1.bin' \(layer 'conv:grid'\), or it is not a regular file"):
        actclust.store.VectorStore.open(store)
    os.rename(store, tmp_path / "store")
    store.symlink_to(tmp_path / "store")
    with pytest.raises(InvalidSaveError, match=r"The vector store folder .* of the saved run is missing or is a link"):
        actclust.load(run, model)
    m = json.loads(good)
    m["state"]["store"]["dir"] = "../vectors"
    m["digest"] = _digest(m)
    manifest.write_text(json.dumps(m))
    with pytest.raises(InvalidSaveError, match=r"manifest.json describes its vector store wrongly \('../vectors'\)"):
        actclust.load(run, model)


# files kept with a run: plain names, bytes or None; nothing of the run's own
@pytest.mark.parametrize("files, match", [
    (["report.html"], "files must be a dict of file name -> bytes"),
    ({"../x": b""}, r"Cannot keep a file named '../x' with the run"),
    ({"manifest.json": b""}, r"Cannot keep a file named 'manifest.json'"),
    ({"arrays-0123456789abcdef.safetensors": b""}, r"Cannot keep a file named 'arrays-0123456789abcdef"),
    ({"notes.txt": "text"}, r"files\['notes.txt'\] must be bytes, a function that streams them, or None. Got str"),
])
def test_files_kept_with_a_run_checked(fitted, tmp_path, files, match):
    from actclust.adapters import adapt
    from actclust.io import persistence

    with pytest.raises(ParameterError, match=match):
        persistence.save(fitted.state_, persistence.params_of(fitted), adapt(fitted.model), tmp_path / "run",
                         files=files)
    assert not (tmp_path / "run").exists()


# a parameter that is not JSON is refused before anything is written; permissions become ours too
def test_unsaveable_parameter_and_permission(fitted, tmp_path, monkeypatch):
    import pathlib

    fitted.ray_options = {"columns": {"x"}}
    with pytest.raises(ParameterError, match=r"Cannot save the run: a parameter or fitted value is not JSON"):
        fitted.save(tmp_path / "run")
    fitted.ray_options = None

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    with pytest.raises(StoragePermissionError, match=r"Could not save the run to .*Permission denied.*choose a folder "
                                                     r"you may write to"):
        fitted.save(tmp_path / "run")
    assert not (tmp_path / "run").exists()


# across file systems the run copies the store (hard links fail); a store file changed in place
# since fit is caught while copying
def test_store_copied_across_file_systems(model, data, tmp_path, monkeypatch):
    ac = _fit(model, *data, store=tmp_path / "vectors")
    expected = ac.similar(data[0][:20], k=3, search="exact").indices

    def exdev(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", exdev)
    ac.save(tmp_path / "run")
    (copied,) = (tmp_path / "run").glob("store-*/layer-0.bin")
    assert not os.path.samefile(copied, ac.state_.train_vectors.directory / "layer-0.bin")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    np.testing.assert_array_equal(loaded.similar(data[0][:20], k=3, search="exact").indices, expected)
    with open(ac.state_.train_vectors.directory / "layer-1.bin", "r+b") as f:
        f.write(b"\0" * 8)
    with pytest.raises(InvalidSaveError, match=r"The stored vectors of layer 'conv:grid' .* changed after fit"):
        ac.save(tmp_path / "run2")
    assert not (tmp_path / "run2").exists()  # nothing partial, not even the folder the save made


# study analyze --html refuses a directory, naming the file to give
def test_study_analyze_html_directory(tmp_path, study_source, capsys):
    from conftest import make_study

    folder = make_study(tmp_path / "s", study_source, conditions=["none"])
    (tmp_path / "out").mkdir()
    assert main(["study", "analyze", str(folder), "--html", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out'} is a folder; --html takes a file name" in capsys.readouterr().err
