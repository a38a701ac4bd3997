import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actclust.cli.commands import _parser, main

# Python parameter wording that must never reach a CLI user: the CLI speaks in options.
PYTHON_WORDING = ("overwrite=True", "parameter of ActivationClustering", "list_layers(model)", "posterior='label'",
                  "allow_pickle")
CONSOLE_SCRIPT = Path(sys.executable).with_name("actclust")


def _paste(hint_line: str) -> list:
    """The argv of the `actclust ...` command at the end of a printed hint, as a shell would split it."""
    words = shlex.split(hint_line[hint_line.rindex("actclust "):])
    assert words[0] == "actclust"
    return words[1:]


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((60, 1, 6, 6)).astype(np.float32), y=rng.integers(0, 3, 60))
    return path


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """The current folder is tmp_path/user, outside sys.path; modules imported from it are forgotten after."""
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("usermod"):
            del sys.modules[name]


TINY_MODULE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import TinyCNN

def build():
    return TinyCNN()
"""


# the demo trains, fits, prints the table and saves a run into its default folder; the score
# command its hint prints runs as pasted
def test_demo_then_score(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quiet", "--epochs", "8"]) == 0
    text = capsys.readouterr().out
    out = tmp_path / "actclust-demo"
    assert "combined" in text and "fc2" in text and (out / "manifest.json").exists()
    assert "wrote the HTML report" in text and (out / "report.html").stat().st_size > 10_000
    hint = next(line for line in text.splitlines() if "actclust score" in line)
    assert hint.endswith("actclust score actclust-demo --data digits")
    assert main(_paste(hint) + ["--json", "--quiet"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0 <= scores["fidelity"] <= 1 and set(scores["per_layer"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert [v["weight"] for v in scores["per_layer"].values()] == [0.25] * 4  # as the table shows them
    # a run fitted from a PyTorch model, scored with its ONNX export: the run's PyTorch weights are not applied to the
    # file (the error said to drop a --weights never given: an outside check)
    import torch
    from actclust.models import digits_cnn

    net = digits_cnn()
    torch.onnx.export(net.eval(), (torch.zeros(2, 1, 8, 8),), str(tmp_path / "cnn.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    assert main(["score", "actclust-demo", "--data", "digits", "--model", str(tmp_path / "cnn.onnx"), "--quiet",
                 "--json"]) == 2
    err = capsys.readouterr().err  # what does not fit is said: its tensors are not the run's layers
    assert "--weights is for a model" not in err and "The model has no layers ['conv1', 'conv2', 'fc1', 'fc2']" in err


# a demo into an explicit folder holding a run stops before training and names the option
def test_demo_explicit_out_needs_overwrite_flag(tmp_path, fitted, capsys):
    fitted.save(tmp_path / "run")
    assert main(["demo", "--quiet", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "add --overwrite to replace it" in err and "overwrite=True" not in err


# fit takes a user model by import path, weights, and an .npz; exit code 0, run saved
def test_fit_user_model_npz(tmp_path, capsys):
    from safetensors.torch import save_file

    from conftest import TinyCNN

    save_file(TinyCNN().state_dict(), str(tmp_path / "w.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((60, 1, 6, 6)).astype(np.float32), y=rng.integers(0, 3, 60))
    code = main(["fit", "conftest:TinyCNN", "--weights", str(tmp_path / "w.safetensors"), "--data",
                 str(tmp_path / "d.npz"), "--layers", "conv,fc1", "--n-clusters", "3", "--out",
                 str(tmp_path / "run"), "--quiet", "--posterior", "label", "--clustering", "distill"])
    assert code == 0 and (tmp_path / "run" / "manifest.json").exists()
    assert "warning" not in capsys.readouterr().err  # --weights given: nothing to warn about
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["params"]["clustering"] == "distill"
    # the run records conftest:TinyCNN, not an actclust builder: the user names it to score (see test_faults)
    assert main(["score", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--quiet",
                 "--model", "conftest:TinyCNN"]) == 0
    assert "accuracy" in capsys.readouterr().out
    # report on the .npz, with the training data given to show similar samples
    html = tmp_path / "r" / "report.html"
    assert main(["report", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--train", str(tmp_path / "d.npz"),
                 "--out", str(html), "--quiet", "--n-correct", "2", "--n-wrong", "1", "--model", "conftest:TinyCNN"]) == 0
    assert "wrote" in capsys.readouterr().out and html.read_text().count('<article class="card') == 3
    # the same --out again is refused (exit 2) and keeps the file, unless --overwrite
    again = ["report", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--out", str(html), "--quiet",
             "--model", "conftest:TinyCNN"]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert f"{html} already exists; add --overwrite to replace it" in err and "overwrite=True" not in err
    assert main(again + ["--overwrite"]) == 0
    # a second fit into the same --out stops before fitting, keeping the run
    again = ["fit", "conftest:TinyCNN", "--data", str(tmp_path / "d.npz"), "--layers", "conv", "--out", str(tmp_path / "run")]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "add --overwrite to replace it" in err and "overwrite=True" not in err
    assert (tmp_path / "run" / "manifest.json").exists()


# bad input exits with 2 and one clear line on stderr, in option terms
@pytest.mark.parametrize("argv, match", [
    (["fit", "nomodule", "--data", "digits", "--layers", "a", "--out", "x"], "package.module:callable"),
    (["fit", "conftest:LAYERS", "--data", "digits", "--layers", "a", "--out", "x"], "not a callable"),
    (["fit", "models/mine.py:build", "--data", "digits", "--layers", "a", "--out", "x"],
     "not a file path; got 'models/mine.py:build'. Run actclust in models and give mine:build"),
    (["fit", "conftest:Nope", "--data", "digits", "--layers", "a", "--out", "x"], "has no attribute 'Nope'"),
    (["fit", "conftest:TinyCNN", "--data", "mnist", "--layers", "fc1", "--out", "x"], "--data must be one of"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc_1", "--out", "x"],
     "Unknown layer 'fc_1': the model has no sub-module of that name. Did you mean 'fc1'"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc_1", "--out", "x"],
     "List the valid names with: actclust layers conftest:TinyCNN"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc1,fc1", "--out", "x"], "The layer 'fc1' is listed twice in --layers"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", " , ", "--out", "x"],
     "--layers must name at least one module; list them with: actclust layers conftest:TinyCNN"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc1", "--n-clusters", "1", "--out", "x"],
     "argument --n-clusters: must be at least 2"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc1", "--batch-size", "0", "--out", "x"],
     "argument --batch-size: must be at least 1"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc1", "--reducer", "avg", "--out", "x"],
     "--reducer must be mean, max, grid, grid:G, pca:D or random:D"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "conv,fc1", "--layer-weights", "1,2,3", "--out", "x"],
     "--layer-weights must give one number per --layers entry (2: conv,fc1); got 3"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc1", "--layer-weights", "-1", "--out", "x"],
     "--layer-weights must be non-negative numbers"),
    # a negative first weight: the option's own message, not argparse's "expected one argument" (an outside check)
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "conv,fc1", "--layer-weights", "-1,2", "--out", "x"],
     "--layer-weights must be non-negative numbers, not all zero; got '-1,2'"),
    (["demo", "--epochs", "0"], "argument --epochs: must be at least 1"),
    (["report", "/nonexistent/run", "--data", "digits", "--n-wrong", "-1"], "argument --n-wrong: must be at least 0"),
    (["score", "/nonexistent/run", "--data", "digits"], "No saved run"),
    (["report", "/nonexistent/run", "--data", "digits"], "No saved run"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc1", "--layer-weights", "a,b", "--out", "x"],
     "--layer-weights must be 'fit' or comma-separated numbers"),
])
def test_bad_input_exit_code(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing is written where the tests run
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and not any(w in err for w in PYTHON_WORDING)


# fit prepares the run: the similar-sample index and trust's calibration are saved with it, so that later commands
# load them (nothing searched or built again); --no-prepare saves the run without them
def test_fit_prepares_the_run(tmp_path, monkeypatch, capsys):
    from actclust.analysis import indexes, trust

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((2400, 1, 6, 6)).astype(np.float32), y=rng.integers(0, 3, 2400))
    fit = ["fit", "conftest:TinyCNN", "--data", str(tmp_path / "d.npz"), "--layers", "conv,fc1", "--n-clusters", "3"]
    assert main(fit + ["--out", str(tmp_path / "run")]) == 0
    assert "preparing the similar-sample index and trust's calibration" in capsys.readouterr().err
    assert main(fit + ["--out", str(tmp_path / "plain"), "--no-prepare", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["trust_calibration"]["n_neighbors"] == 50 and manifest["trust_calibration"]["search"] == "auto"
    assert sorted({f.rsplit(".", 1)[1] for f in os.listdir(tmp_path / "run") if f.startswith("index_")}) == \
        ["faiss", "safetensors"]
    assert not [f for f in os.listdir(tmp_path / "plain") if f.startswith("index_")]
    assert "trust_calibration" not in (tmp_path / "plain" / "manifest.json").read_text()
    built, searched = [], []
    real_build, real_stats = indexes.ApproximateIndex._build, trust._neighbour_stats
    monkeypatch.setattr(indexes.ApproximateIndex, "_build", lambda self, *a: built.append(1) or real_build(self, *a))
    monkeypatch.setattr(trust, "_neighbour_stats", lambda *a: searched.append(len(a[2])) or real_stats(*a))
    report = ["report", "--data", str(tmp_path / "d.npz"), "--quiet", "--n-correct", "1", "--n-wrong", "1",
              "--model", "conftest:TinyCNN"]
    assert main(report + [str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    assert built == [] and 240 not in searched  # the run's index and calibration, loaded
    assert main(report + [str(tmp_path / "plain"), "--out", str(tmp_path / "p.html")]) == 0
    assert built and 240 in searched  # built again by the command


# options checked against the data: too many clusters, label posterior without labels, a broken
# .npz, weights that do not fit; each in option terms, exit code 2
def test_bad_data_for_options(tmp_path, tiny_npz, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "conftest:TinyCNN", "--layers", "fc1", "--n-clusters", "3", "--out", "run", "--quiet"]
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((5, 1, 6, 6), np.float32))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    np.save(tmp_path / "lone.npy", np.zeros(3))
    (tmp_path / "lone.npy").rename(tmp_path / "lone.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([{}, {}], dtype=object))
    np.savez(tmp_path / "short_y.npz", x=np.zeros((5, 1, 6, 6), np.float32), y=np.zeros(4, int))
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 1, 6, 6), np.float32))
    torch = pytest.importorskip("torch")
    torch.save({"fc9.weight": torch.zeros(2)}, tmp_path / "other.pt")
    cases = [
        (["--data", str(tiny_npz), "--n-clusters", "61"], f"--n-clusters 61 is more than the 60 samples of --data {tiny_npz}"),
        # one sample: "use at most 1" cluster was advice --n-clusters refuses (at least 2; an outside check)
        (["--data", "one.npz"], "--data one.npz holds 1 sample; clustering needs at least 2 (and as many as --n-clusters)"),
        (["--data", "nolabels.npz", "--posterior", "label"],
         "--posterior label needs the true labels, but --data nolabels.npz has no array 'y'"),
        (["--data", "broken.npz"], "Cannot read broken.npz as an .npz file of numeric arrays"),
        (["--data", "lone.npz"], "Cannot read lone.npz as an .npz file of numeric arrays"),
        (["--data", "objects.npz"], "Cannot read objects.npz as an .npz file of numeric arrays"),
        (["--data", "short_y.npz"], "The array y in short_y.npz must hold one label per sample of x (5)"),
        (["--data", str(tiny_npz), "--weights", "other.pt"], "The weights in other.pt do not fit the model conftest:TinyCNN"),
    ]
    for extra, match in cases:
        assert main(fit + extra) == 2, extra
        err = capsys.readouterr().err
        assert match in err and not any(w in err for w in PYTHON_WORDING), err
    assert not (tmp_path / "run").exists()


# `actclust fit mymodule:build` in the folder holding mymodule.py imports it, as `python -m` would
def test_model_from_current_folder(user_folder, tiny_npz, capsys):
    (user_folder / "usermod_a.py").write_text(TINY_MODULE.format(tests=str(Path(__file__).parent)))
    importlib.invalidate_caches()
    assert main(["layers", "usermod_a:build"]) == 0
    assert capsys.readouterr().out.split() == ["conv", "relu", "pool", "flat", "fc1", "act", "fc2", "unused"]
    assert main(["fit", "usermod_a:build", "--data", str(tiny_npz), "--layers", "fc1", "--n-clusters", "3",
                 "--out", "run", "--quiet"]) == 0
    assert (user_folder / "run" / "manifest.json").exists()


# a model module that cannot be imported: the message names the module, the folder searched and
# the expected form; a module that is found but imports something missing names that instead
def test_model_module_not_found(user_folder, capsys):
    assert main(["layers", "usermod_missing:build"]) == 2
    err = capsys.readouterr().err
    assert "Cannot import the model module 'usermod_missing'" in err
    assert f"current folder ({user_folder})" in err and "'package.module:callable'" in err
    (user_folder / "usermod_b.py").write_text("import usermod_not_installed\n")
    importlib.invalidate_caches()
    assert main(["layers", "usermod_b:build"]) == 2
    assert "Importing the model module 'usermod_b' failed: No module named 'usermod_not_installed'" in capsys.readouterr().err


# fit without --weights warns on stderr (also with --quiet) that the factory's weights are used,
# and says how to pass trained ones
def test_fit_without_weights_warns(tmp_path, tiny_npz, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "conftest:TinyCNN", "--data", str(tiny_npz), "--layers", "fc1", "--n-clusters", "3",
                 "--out", "run", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "actclust fit: warning: no --weights given: conftest:TinyCNN is used with the weights it gives" in err
    assert "add --weights model.pt" in err


# the score command printed after fit reuses the user's --data and the model the user named, and runs as pasted
def test_fit_hint_is_a_runnable_command(tmp_path, tiny_npz, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "conftest:TinyCNN", "--data", "d.npz", "--layers", "conv,fc1", "--n-clusters", "3",
                 "--out", "my run", "--quiet"]) == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if "actclust score" in line)
    assert hint.endswith("actclust score 'my run' --data d.npz --model conftest:TinyCNN")
    assert "(give held-out data instead of d.npz for figures on new inputs)" in hint  # it is the training data
    assert main(_paste(hint) + ["--quiet"]) == 0
    assert "combined" in capsys.readouterr().out


# report checks its --out and --train before the work, in option terms (exit code 2)
def test_report_checks_out_and_train(tmp_path, tiny_npz, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "conftest:TinyCNN", "--data", "d.npz", "--layers", "fc1", "--n-clusters", "3",
                 "--out", "run", "--quiet"]) == 0
    np.savez(tmp_path / "other.npz", x=np.zeros((7, 1, 6, 6), np.float32))
    (tmp_path / "folder").mkdir()
    report = ["report", "run", "--data", "d.npz", "--quiet", "--model", "conftest:TinyCNN"]
    assert main(report + ["--out", "folder"]) == 2
    assert "--out folder is a directory; give the HTML file to write, e.g. --out folder/report.html" in capsys.readouterr().err
    assert main(report + ["--train", "other.npz"]) == 2
    assert ("--train other.npz has 7 samples but the run was fitted on 60; add --train with the .npz the run was "
            "fitted on") in capsys.readouterr().err
    # as many samples, of another shape: said as view says it (it met the pictures' code: a traceback; outside check)
    np.savez(tmp_path / "shape.npz", x=np.zeros((60, 1, 5, 5), np.float32))
    assert main(report + ["--train", "shape.npz"]) == 2
    assert ("--train shape.npz holds inputs of shape (1, 5, 5) per sample, but the run's model takes (1, 6, 6)"
            in capsys.readouterr().err)
    assert not (tmp_path / "report.html").exists()


def _actions(parser):
    """(parser, action) for every action of the parser and its subcommands, except -h."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        yield parser, action
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield parser, choice
            for sub in action.choices.values():
                yield from _actions(sub)


# every option and argument of every subcommand has help text, and its help shows its default
def test_every_option_has_help_and_default():
    seen = 0
    for parser, action in _actions(_parser()):
        seen += 1
        assert action.help and action.help.strip(), f"{parser.prog} {action.option_strings or action.dest}: no help"
        # a flag (no value: --no-prepare) says in its help what it does; its default would read "(default: True)"
        if action.option_strings and action.nargs != 0 and action.default not in (None, False, argparse.SUPPRESS):
            text = " ".join(parser.format_help().split())
            assert f"(default: {action.default}" in text, f"{parser.prog} {action.option_strings}: default not shown"
    assert seen > 30


# exit codes as documented: --help 0, a usage error 2 (returned, not raised), an unexpected
# error 1 with its traceback
def test_exit_codes(user_folder, capsys):
    assert main(["fit", "--help"]) == 0 and "(default: 15)" in capsys.readouterr().out
    assert main(["fit", "conftest:TinyCNN"]) == 2 and "required" in capsys.readouterr().err
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().err
    (user_folder / "usermod_c.py").write_text("def build():\n    raise RuntimeError('boom in build')\n")
    script = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "actclust.cli"]
    r = subprocess.run(script + ["layers", "usermod_c:build"], capture_output=True, text=True, cwd=user_folder)
    assert r.returncode == 1 and "Traceback" in r.stderr and "boom in build" in r.stderr


# a reader that leaves early (`actclust layers ... | head`): no traceback, exit 0 (an outside check saw one)
def test_closed_stdout_is_no_error():
    script = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "actclust.cli"]
    p = subprocess.Popen(script + ["layers", "actclust.models:digits_cnn"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # closed before anything is printed: every print meets a broken pipe
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# the installed console script runs and reports usage errors with exit code 2, as python -m actclust (a newcomer's
# first guess, which said "No module named actclust.__main__") and python -m actclust.cli do
@pytest.mark.parametrize("module", ["actclust.cli", "actclust"])
def test_console_script(module):
    r = subprocess.run([sys.executable, "-m", module, "fit"], capture_output=True, text=True)
    assert r.returncode == 2 and "the following arguments are required" in r.stderr and "usage: actclust" in r.stderr


# --store writes the vectors to a directory outside the run; the run links them and scores the same;
# a --store inside --out is refused before anything is fitted
def test_fit_with_store(tmp_path, capsys):
    from safetensors.torch import save_file

    from conftest import TinyCNN

    save_file(TinyCNN().state_dict(), str(tmp_path / "w.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((60, 1, 6, 6)).astype(np.float32), y=rng.integers(0, 3, 60))
    base = ["fit", "conftest:TinyCNN", "--weights", str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "d.npz"),
            "--layers", "conv,fc1", "--n-clusters", "3", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "run"), "--store", str(tmp_path / "vectors"),
                        "--store-dtype", "float16"]) == 0
    assert len(list((tmp_path / "vectors").glob("gen-*/store.json"))) == 1
    assert len(list((tmp_path / "run").glob("store-*/store.json"))) == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["params"]["store_dtype"] == "float16" and manifest["state"]["store"]["dtype"] == "float16"
    assert main(["score", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--quiet",
                 "--model", "conftest:TinyCNN"]) == 0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "run2"), "--store", str(tmp_path / "run2" / "v")]) == 2
    assert "--store " + str(tmp_path / "run2" / "v") + " is inside --out" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()
    # the other way round: a run inside the store folder made every later fit into the store refuse it
    assert main(base + ["--out", str(tmp_path / "vectors" / "run3"), "--store", str(tmp_path / "vectors")]) == 2
    assert "--out " + str(tmp_path / "vectors" / "run3") + " is inside --store" in capsys.readouterr().err
    assert not (tmp_path / "vectors" / "run3").exists()


# actclust's own warnings print as one line naming the command (no source path); others as Python's
def test_warnings_print_as_one_line(monkeypatch, capsys):
    import warnings

    from actclust import TrustWarning
    from actclust.cli import commands as cli

    def noisy(args):
        warnings.warn("Trust signals: stacked_trust is unavailable", TrustWarning)
        warnings.warn("something else", UserWarning)
        return 0

    monkeypatch.setattr(cli, "_layers", noisy)
    before = warnings.showwarning
    with pytest.warns(UserWarning, match="something else") as caught:  # handed on as before
        assert cli.main(["layers", "x:y"]) == 0
    err = capsys.readouterr().err
    assert err == "actclust layers: warning: Trust signals: stacked_trust is unavailable\n"
    assert [w.category for w in caught] == [UserWarning]
    assert warnings.showwarning is before  # restored


# report --out never writes over the run it reads (its manifest, its vectors), even with --overwrite; a new file
# beside them in the run folder (as the demo's report.html) is fine
def test_report_never_writes_over_its_run(tmp_path, tiny_npz, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["fit", "conftest:TinyCNN", "--data", str(tiny_npz), "--layers", "fc1", "--n-clusters", "3", "--out",
                 str(run), "--quiet", "--no-prepare", "--store", str(tmp_path / "store")]) == 0
    manifest = (run / "manifest.json").read_bytes()
    report = ["report", str(run), "--data", str(tiny_npz), "--model", "conftest:TinyCNN", "--quiet", "--overwrite",
              "--n-correct", "1", "--n-wrong", "1"]
    store_file = next(run.glob("store-*/layer-0.bin"))  # the run's copy of its vectors
    capsys.readouterr()
    for target, part in ((run / "manifest.json", "manifest.json"), (store_file, "store")):
        assert main(report + ["--out", str(target)]) == 2
        assert f"is part of the run {run} the report reads" in capsys.readouterr().err
    assert (run / "manifest.json").read_bytes() == manifest
    assert main(report + ["--out", str(run / "report.html")]) == 0
    assert main(report + ["--out", str(run)]) == 2  # the run's folder: the hint puts the report beside it
    assert f"is a directory; give the HTML file to write, e.g. --out {run}-report.html" in capsys.readouterr().err
    data = tiny_npz.read_bytes()  # nor over a file it reads (--overwrite replaced the --data file with the HTML)
    assert main(report + ["--out", str(tiny_npz)]) == 2
    assert f"--out {tiny_npz} is the --data file the report reads; it is never written over" in capsys.readouterr().err
    assert tiny_npz.read_bytes() == data
    # nor over the code of its --model (the report replaced the module with HTML, and the next command met a
    # SyntaxError: an outside check)
    source = tmp_path / "usermod_report.py"
    source.write_text(TINY_MODULE.format(tests=str(Path(__file__).parent)))
    code = source.read_bytes()
    monkeypatch.syspath_prepend(str(tmp_path))
    at = report.index("conftest:TinyCNN")
    assert main(report[:at] + ["usermod_report:build"] + report[at + 1:] + ["--out", str(source)]) == 2
    assert f"--out {source} is the code of the --model usermod_report:build the report runs; it is never written " \
           "over" in capsys.readouterr().err
    assert source.read_bytes() == code


# a place where the run cannot be saved is said before the fit, not after it; a run another command saved there
# meanwhile is refused in option terms (--overwrite), not in the library's
def test_unwritable_out_said_before_the_fit(tmp_path, tiny_npz, fitted, capsys):
    from actclust import RunExistsError
    from actclust.adapters import adapt
    from actclust.io.persistence import params_of, save

    assert main(["fit", "conftest:TinyCNN", "--data", str(tiny_npz), "--layers", "fc1", "--n-clusters", "3", "--out",
                 "/proc/actclust-run", "--no-prepare"]) == 2
    out, err = capsys.readouterr()
    assert "Could not save the run to /proc/actclust-run" in err and "in-sample" not in out  # no fit ran
    save(fitted.state_, params_of(fitted), adapt(fitted.model), tmp_path / "run")
    with pytest.raises(RunExistsError, match="A saved run already exists at .*; add --overwrite to replace it"):
        save(fitted.state_, params_of(fitted), adapt(fitted.model), tmp_path / "run", flag="add --overwrite")


# the score table keeps its columns under a layer name longer than the layer column (17+ characters shifted the
# numbers of that row; found by an outside new-user check)
def test_score_table_keeps_columns_under_long_names():
    from types import SimpleNamespace

    from actclust.cli.commands import format_scores

    layer = {"fidelity": 0.5, "accuracy": 0.25}
    scores = {"n": 3, "fidelity": 0.75, "accuracy": 0.5, "dnn_accuracy": 0.5,
              "per_layer": {"conv": layer, "next_activations_of_block_1": layer}}
    lines = format_scores(scores, SimpleNamespace(weights_=[0.5, 0.5])).splitlines()[1:]
    assert len({len(line) for line in lines}) == 1, lines  # every row as wide: the columns line up
    assert {line.index("0.5000") for line in lines[1:3]} == {lines[0].index("fidelity") + 2}


# Ctrl-C once the command is done (while Python unloads PyTorch, about a second) killed the process silently with
# status -2: a finished command read as a failed one. The installed command ignores it then and exits with its own
# status; Ctrl-C during the work still says "interrupted" with 130 (main, in-process, leaves Ctrl-C alone)
_LATE_CTRL_C = """
import os, signal, sys, time
from actclust.cli import {entry}
code = {entry}(["layers", "--help"])
os.kill(os.getpid(), signal.SIGINT)  # as a late Ctrl-C: the work done, the process not yet gone
time.sleep(0.2)
print("exiting", code, flush=True)
sys.exit(code)
"""


def test_late_ctrl_c_keeps_the_status():
    import subprocess

    done = subprocess.run([sys.executable, "-c", _LATE_CTRL_C.format(entry="run")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "exiting 0" in done.stdout, done.stderr[-2000:]
    inside = subprocess.run([sys.executable, "-c", _LATE_CTRL_C.format(entry="main")], capture_output=True, text=True,
                            timeout=120)
    assert inside.returncode == -2 and "KeyboardInterrupt" in inside.stderr  # main leaves the caller's Ctrl-C alone


def test_ctrl_c_during_the_work(monkeypatch, capsys):
    from actclust.cli import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_parser", lambda real=commands._parser: _patched(real(), interrupted))
    assert commands.main(["demo"]) == commands.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().endswith("interrupted")


def _patched(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser


# every command's help reads cleanly: no "(default: True)" after a flag that turns something off, no "%%" left from
# argparse's escaping in a description (both found by an outside check of the docs), and --model names model files
def test_help_texts(capsys):
    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    texts = [p.format_help() for p in parsers(_parser())]
    assert len(texts) > 10 and not [t for t in texts if "(default: True)" in t or "%%" in t]
    assert "must be at least 100 for 95% intervals" in _usage_error(["study", "analyze", "x", "--n-boot", "5"], capsys)
    assert any("an .onnx or .keras file" in t and "--trust-run-model" in t for t in texts)


def _usage_error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


# a PyTorch model of several named inputs (a Hugging Face model's input_ids and attention_mask): an .npz with arrays
# named as its forward's parameters feeds it, for fit and for score (a run fitted on dict inputs could not be used
# from the command line: an outside check)
def test_npz_of_named_inputs_for_a_torch_model(user_folder, capsys):
    (user_folder / "usermod_two.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Two(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.emb, self.out = nn.Embedding(12, 4), nn.Linear(4, 3)\n"
        "    def forward(self, input_ids, attention_mask):\n"
        "        m = attention_mask.unsqueeze(-1).float()\n"
        "        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1))\n"
        "def build():\n    return Two()\n")
    importlib.invalidate_caches()
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(1, 12, (60, 6)), (np.arange(6)[None] < rng.integers(2, 7, (60, 1))).astype(np.int64)
    np.savez(user_folder / "d.npz", input_ids=ids, attention_mask=mask, y=rng.integers(0, 3, 60))
    assert main(["fit", "usermod_two:build", "--data", "d.npz", "--layers", "emb,out", "--n-clusters", "3", "--out",
                 "run", "--quiet", "--no-prepare"]) == 0
    assert main(["score", "run", "--data", "d.npz", "--model", "usermod_two:build", "--quiet"]) == 0
    assert "combined" in capsys.readouterr().out
