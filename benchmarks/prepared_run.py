"""The first explain after loading a run (issue 19): a run saved right after ``fit`` against the same run saved
after ``ac.prepare()`` (what ``actclust fit`` now saves), on Fashion-MNIST's 10,000 test images, defaults.

    python benchmarks/prepared_run.py                 # two rounds, about 3 minutes on 2 cores
    python benchmarks/prepared_run.py --baseline 6abd63c   # the same runs loaded by that commit too, taking turns
    python benchmarks/prepared_run.py --rounds 1 --n-test 2000   # a smoke run

The benchmark CNN (``benchmarks/.cache``) is fitted once with the library's defaults on the 60,000 training
images (layers conv1, conv2, fc1, fc2) and saved twice into a temporary folder: as ``fit`` left it ("plain"),
and after ``ac.prepare()`` ("prepared": the similar-sample index and trust's calibration, with each layer's
index, built and kept with the run; the time ``prepare`` took is reported). Then, ``--rounds`` times, taking
turns, each run in a fresh process, as a new Python session or a CLI command meets it: ``actclust.load``
(every file checked against its SHA-256), the first ``ac.explain(x_test)``, then a second one, each as a ratio
to a plain forward pass over the same images measured beside it (``model(x)`` in batches of 256, no hooks).
The explanations of both runs must be the same (similar samples and trust signals). With ``--baseline COMMIT``
both runs (saved by this tree) are also loaded and explained by that commit (a temporary ``git worktree`` put
first on ``PYTHONPATH``), its processes taking turns with this tree's, and its explanations must be the same
too. Results: a table on stdout and ``benchmarks/results/prepared_run.json`` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
BATCH = 256


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import fashion_cnn, forward_seconds

    import actclust
    from actclust.datasets import load_fashion_mnist

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = fashion_cnn(progress=False)
    x_te = load_fashion_mnist()[2][:args.n_test]
    xt = torch.from_numpy(x_te)
    forward_seconds(model, xt[:4 * BATCH], BATCH)  # warm-up
    f0 = forward_seconds(model, xt, BATCH)
    t = time.perf_counter()
    ac = actclust.load(args.run, model, progress=False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    es = ac.explain(x_te)
    first_s = time.perf_counter() - t
    f1 = forward_seconds(model, xt, BATCH)
    t = time.perf_counter()
    ac.explain(x_te)
    again_s = time.perf_counter() - t
    f2 = forward_seconds(model, xt, BATCH)
    similar = [[s["index"] for p in ("low", "high") for s in e.similar[p]] for e in es]
    signals = sorted(es[0].trust)
    trust = [[e.trust[k] for k in signals] for e in es]
    fw = (f0 + f1) / 2
    return {"load_s": load_s, "first_explain_s": first_s, "again_explain_s": again_s, "forward_s": [f0, f1, f2],
            "first_over_forward": first_s / fw, "load_and_first_over_forward": (load_s + first_s) / fw,
            "again_over_forward": again_s / ((f1 + f2) / 2),
            "digest": hash_of(similar, trust), "n_test": len(x_te)}


def hash_of(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def prepare_runs(folder: Path) -> dict:
    """Fit once, save as fit left it and after prepare(); the seconds fit, prepare and the saves took."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import fashion_cnn

    import actclust
    from actclust.datasets import load_fashion_mnist

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = fashion_cnn(progress=False)
    x_tr, y_tr = load_fashion_mnist()[:2]
    ac = actclust.ActivationClustering(model, LAYERS, progress=False)
    out = {}
    t = time.perf_counter()
    ac.fit(x_tr, y_tr)
    out["fit_s"] = time.perf_counter() - t
    ac.save(folder / "plain")
    t = time.perf_counter()
    ac.prepare()
    out["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ac.save(folder / "prepared")
    out["save_prepared_s"] = time.perf_counter() - t
    out["prepared_files_mib"] = sum(f.stat().st_size for f in (folder / "prepared").iterdir() if f.is_file()) / 2 ** 20
    out["plain_files_mib"] = sum(f.stat().st_size for f in (folder / "plain").iterdir() if f.is_file()) / 2 ** 20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="times each run is loaded and explained, taking turns")
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", default="none", help="a commit that loads and explains the same runs too ('none': "
                    "this tree only)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import answer_child, child_options

    child_options(ap, "prepared_run")
    args = ap.parse_args(argv)
    if answer_child(args, child):
        return 0
    from _common import run_child, write_results

    from _common import versions

    load_before, started = os.getloadavg(), time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="actclust-prepared-"))
    runs = ("plain", "prepared")
    with versions(args.baseline) as trees:
        series = [(v, name) for v in trees for name in runs]  # (version, run)
        try:
            results = {"setup": prepare_runs(folder), **{_label(v, name): [] for v, name in series}}
            print(f"fit {results['setup']['fit_s']:.1f} s, prepare {results['setup']['prepare_s']:.1f} s", flush=True)
            for i in range(args.rounds):
                for v, name in series if i % 2 == 0 else series[::-1]:
                    r = run_child(__file__, trees[v], [f"--run={folder / name}", f"--n-test={args.n_test}"])
                    if "error" in r:
                        print(r["error"], file=sys.stderr)
                        return 1
                    results[_label(v, name)].append(r)
                    print(f"round {i + 1}, {_label(v, name)}: load {r['load_s']:.2f} s, first explain "
                          f"{r['first_explain_s']:.2f} s ({r['first_over_forward']:.2f}x a forward pass), again "
                          f"{r['again_over_forward']:.2f}x", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    labels = [_label(v, name) for v, name in series]
    results["same_explanations"] = len({r["digest"] for label in labels for r in results[label]}) == 1
    print("\n| run | load | first explain | load + first explain, over a forward pass | again, over a forward pass |")
    print("|---|---|---|---|---|")
    for label in labels:
        rs = results[label]
        print(f"| {label} | {np.median([r['load_s'] for r in rs]):.2f} s | {np.median([r['first_explain_s'] for r in rs]):.2f} s"
              f" | {np.median([r['load_and_first_over_forward'] for r in rs]):.2f}x"
              f" | {np.median([r['again_over_forward'] for r in rs]):.2f}x |")
    print(f"\nprepare took {results['setup']['prepare_s']:.1f} s once (fit {results['setup']['fit_s']:.1f} s); "
          f"same explanations from every run and version: {results['same_explanations']}")
    import torch

    write_results("prepared_run", args, results, load_before, started, torch=torch.__version__,
                  torch_threads=torch.get_num_threads())
    return 0


def _label(version: str, run: str) -> str:
    """``plain`` / ``prepared`` for this tree, ``prepared (baseline abc1234)`` for a baseline's process."""
    return run if version == "this tree" else f"{run} ({version})"


if __name__ == "__main__":
    sys.exit(main())
