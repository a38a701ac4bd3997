import json
import subprocess
import sys

import numpy as np
import pytest

from actclust.cli import main


# the demo trains, fits, prints the table and saves a run that `score` reads back
def test_demo_then_score(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quiet", "--out", str(out), "--epochs", "8"]) == 0
    text = capsys.readouterr().out
    assert "combined" in text and "fc2" in text and (out / "manifest.json").exists()
    assert "wrote the HTML report" in text and (out / "report.html").stat().st_size > 10_000
    assert main(["score", str(out), "--data", "digits", "--json", "--quiet"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0 <= scores["fidelity"] <= 1 and set(scores["per_layer"]) == {"conv1", "conv2", "fc1", "fc2"}
    # a second demo into the same explicit folder needs --overwrite
    assert main(["demo", "--quiet", "--out", str(out), "--epochs", "1"]) == 2
    assert "overwrite" in capsys.readouterr().err


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
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["params"]["clustering"] == "distill"
    assert main(["score", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out
    # report on the .npz, with the training data given to show similar samples
    html = tmp_path / "r" / "report.html"
    assert main(["report", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--train", str(tmp_path / "d.npz"),
                 "--out", str(html), "--quiet", "--n-correct", "2", "--n-wrong", "1"]) == 0
    assert "wrote" in capsys.readouterr().out and html.read_text().count('<article class="card') == 3
    # the same --out again is refused (exit 2) and keeps the file, unless --overwrite
    again = ["report", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--out", str(html), "--quiet"]
    assert main(again) == 2 and "already exists" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
    # a second fit into the same --out stops before fitting, keeping the run
    again = ["fit", "conftest:TinyCNN", "--data", str(tmp_path / "d.npz"), "--layers", "conv", "--out", str(tmp_path / "run")]
    assert main(again) == 2 and "pass overwrite=True" in capsys.readouterr().err
    assert (tmp_path / "run" / "manifest.json").exists()


# bad input exits with 2 and one clear line on stderr
@pytest.mark.parametrize("argv, match", [
    (["fit", "nomodule", "--data", "digits", "--layers", "a", "--out", "x"], "package.module:callable"),
    (["fit", "conftest:Nope", "--data", "digits", "--layers", "a", "--out", "x"], "has no attribute 'Nope'"),
    (["fit", "conftest:TinyCNN", "--data", "mnist", "--layers", "fc1", "--out", "x"], "--data must be one of"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc_1", "--out", "x"], "Did you mean 'fc1'"),
    (["score", "/nonexistent/run", "--data", "digits"], "No saved run"),
    (["report", "/nonexistent/run", "--data", "digits"], "No saved run"),
    (["fit", "conftest:TinyCNN", "--data", "digits", "--layers", "fc1", "--layer-weights", "a,b", "--out", "x"],
     "--layer-weights must be 'fit' or comma-separated numbers"),
])
def test_bad_input_exit_code(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


# the installed console script runs and reports usage errors with exit code 2
def test_console_script():
    r = subprocess.run([sys.executable, "-m", "actclust.cli", "fit"], capture_output=True, text=True)
    assert r.returncode == 2 and "required" in r.stderr
