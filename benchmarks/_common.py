"""Shared pieces of the benchmarks: the cached Fashion-MNIST CNN, timing and memory probes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from actclust.datasets import load_fashion_mnist
from actclust import models
from actclust.models import accuracy, train_classifier

CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def fashion_cnn(epochs: int = 6, progress: bool = True):
    """The benchmark CNN, trained once (about 90 s on 2 cores) and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    model = models.fashion_cnn()
    path = CACHE / f"fashion_cnn_e{epochs}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(as_uint8=True)
    train_classifier(model, x_tr, y_tr, epochs=epochs, batch_size=128, progress=progress)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model.eval()


def forward_seconds(model, x: torch.Tensor, batch_size: int) -> float:
    """Time of one plain ``model(x)`` pass over ``x`` in batches, no hooks: the baseline."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in x.split(batch_size):
            model(batch)
    return time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident memory every few ms while the block runs; ``.peak - .start``."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


def test_accuracy(model) -> float:
    _, _, x_te, y_te = load_fashion_mnist()
    return accuracy(model, x_te, y_te)


@contextmanager
def versions(commit: str):
    """``{name: src folder}`` of the versions to compare, each run with its ``src`` first on ``PYTHONPATH``: the
    baseline ``commit`` from a temporary ``git worktree`` (removed at the end; none for "none"), then this tree."""
    if commit == "none":
        yield {"this tree": None}
        return
    tree = Path(tempfile.mkdtemp(prefix="actclust-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True)
    try:
        yield {f"baseline {commit}": tree / "src", "this tree": None}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def child_options(ap, name: str) -> None:
    """``--out`` (by default ``benchmarks/results/<name>.json``) and the hidden ``--child`` of a benchmark that runs
    each version in a fresh process (:func:`run_child`)."""
    ap.add_argument("--out", default=str(RESULTS / f"{name}.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def answer_child(args, child) -> bool:
    """In a child process (``--child``): ``child(args)`` printed on the ``RESULT`` line :func:`run_child` reads.
    Whether this was one."""
    if args.child:
        print("RESULT " + json.dumps(child(args)))
    return bool(args.child)


def run_child(script: str, src, options: list, echo_stderr: bool = False) -> dict:
    """Run ``script --child *options`` in a fresh process with ``src`` first on ``PYTHONPATH`` (this tree where
    ``None``), and read back the dict it printed on its last ``RESULT `` line (``{"error": ...}`` where it failed)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", *options], env=env,
                       capture_output=True, text=True)
    if echo_stderr:
        sys.stderr.write(r.stderr[-2000:])
    line = next((l for l in r.stdout.splitlines()[::-1] if l.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        return {"error": (r.stderr or r.stdout)[-3000:]}
    return json.loads(line[len("RESULT "):])


def write_results(name: str, args, results: dict, load_before, started: float, **machine) -> None:
    """``args.out``: the results with the command, the machine (its load before and after), the commit and settings."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {"benchmark": name, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), **machine,
                       "load_average_before": load_before, "load_average_after": os.getloadavg(), "git_commit": commit},
           "settings": vars(args), "results": results, "wall_s": time.perf_counter() - started}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
