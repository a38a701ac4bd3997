"""Explain on the CPU (issue 19): ``ac.explain(x_test)`` on Fashion-MNIST's 10,000 test images, defaults,
timed whole, as a ratio to one plain forward pass measured beside it, for this code and a baseline.

    python benchmarks/explain_cpu.py                        # this tree against commit 4b52a6c
    python benchmarks/explain_cpu.py --baseline none        # this tree only
    python benchmarks/explain_cpu.py --repeats 3 --out benchmarks/results/explain_cpu.json

Each version runs in a fresh process (the baseline from a temporary ``git worktree`` of its commit,
put first on ``PYTHONPATH``), and the versions take turns ``--rounds`` times, so both meet the same
load on a shared machine. In a process: the benchmark CNN (``benchmarks/.cache``), fitted with the
library's defaults on the 60,000 training images (layers conv1, conv2, fc1, fc2, as in
``fashion_mnist.py``); then ``ac.explain(x_test)`` once (the **first call**: it builds the search
indexes and calibrates trust, reported apart), then ``--repeats`` times, each between two plain
forward passes over the same 10,000 images (``model(x)`` in batches of 256, no hooks, as a user
would time it): the ratio is the explain time over the mean of the two passes around it. The
breakdown times the steps inside ``explain`` (capture pass, the two similar-sample searches,
concepts, trust calibration and signals, the rest: building the Explanation objects); it wraps
module functions, which costs nothing measurable. Also: recall@10 of every approximate search the
call makes against the exact one (on 1,000 test images), the default trust signals' AUROCs (right
vs wrong DNN predictions on the test images) and the test fidelity. Results: a table on stdout and
``benchmarks/results/explain_cpu.json`` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
BATCH = 256
STEPS = ("capture", "similar (low and high)", "concepts", "trust calibration", "trust signals")


# ----------------------------------------------------------------------------- one version (child process)

class Timers:
    """Wraps module functions and adds up the seconds spent in them (outermost calls only)."""

    def __init__(self):
        self.seconds: dict = {}
        self._depth = 0

    def wrap(self, module, name: str, label):
        real = getattr(module, name)

        def timed(*args, **kwargs):
            key = label(args, kwargs) if callable(label) else label
            if self._depth:
                return real(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
        setattr(module, name, timed)


def _preset(args, kwargs):
    return "similar (low and high)"  # one search of both presets, or (before) one per preset


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import fashion_cnn, forward_seconds

    import actclust
    from actclust.analysis import explanation, trust
    from actclust.capture import passes
    from actclust.datasets import load_fashion_mnist

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = fashion_cnn(progress=False)
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    x_te, y_te = x_te[:args.n_test], y_te[:args.n_test]
    xt = torch.from_numpy(x_te)
    out = {"actclust_file": actclust.__file__, "n_test": len(x_te)}
    forward_seconds(model, xt[:4 * BATCH], BATCH)  # warm-up
    ac = actclust.ActivationClustering(model, LAYERS, progress=False)
    t0 = time.perf_counter()
    ac.fit(x_tr, y_tr)
    out["fit_s"] = time.perf_counter() - t0

    timers = Timers()
    timers.wrap(passes, "query", "capture")
    timers.wrap(explanation, "find", _preset)
    timers.wrap(explanation, "concepts", "concepts")
    timers.wrap(trust, "calibrate", "trust calibration")
    timers.wrap(trust, "signals", "trust signals")

    def whole():
        timers.seconds = {}
        f0 = forward_seconds(model, xt, BATCH)
        t = time.perf_counter()
        es = ac.explain(x_te)
        s = time.perf_counter() - t
        f1 = forward_seconds(model, xt, BATCH)
        steps = dict(timers.seconds)
        steps["rest (Explanation objects, surrogate)"] = s - sum(steps.values())
        return es, {"explain_s": s, "forward_s": [f0, f1], "ratio": s / ((f0 + f1) / 2),
                    "steps_s": steps, "steps_over_forward": {k: v / ((f0 + f1) / 2) for k, v in steps.items()}}

    es, out["first_call"] = whole()
    out["repeats"] = [whole()[1] for _ in range(args.repeats)]
    ratios = [r["ratio"] for r in out["repeats"]]
    out["ratio_median"], out["ratio_min"], out["ratio_max"] = float(np.median(ratios)), min(ratios), max(ratios)
    out["has_trust"] = es[0].trust is not None

    # honesty: recall of the approximate searches the call made, AUROCs of its trust signals, fidelity
    from sklearn.metrics import roc_auc_score

    right = np.array([e.dnn["prediction"] for e in es]) == y_te
    if es[0].trust is not None:
        out["auroc"] = {k: float(roc_auc_score(right, [e.trust[k] for e in es])) for k in es[0].trust}
    out["fidelity"] = ac.score(x_te, y_te)["fidelity"]
    m = min(1000, len(x_te))
    q = ac.query(x_te[:m], vectors=True)
    recall = {}
    from actclust.analysis import retrieval

    for preset in ("low", "high"):
        k, w = retrieval.check_args(ac.state_, 10, preset)
        e = retrieval.search(ac.state_, q, k, w, method="exact").indices
        a = retrieval.search(ac.state_, q, k, w, method="approximate").indices
        recall[f"similar {preset}"] = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, e)]))
    st = ac.state_
    for l in LAYERS:
        e, _ = retrieval.layer_neighbours(st, l, q.vectors[l], 50, method="exact")
        a, _ = retrieval.layer_neighbours(st, l, q.vectors[l], 50, method="approximate")
        recall[f"trust {l} @10"] = float(np.mean([len(set(x[:10]) & set(y[:10])) / 10 for x, y in zip(a, e)]))
        recall[f"trust {l} @50"] = float(np.mean([len(set(x) & set(y)) / 50 for x, y in zip(a, e)]))
    out["recall"] = recall
    return out


# ----------------------------------------------------------------------------- driver

def run_version(src: Path | None, args) -> dict:
    from _common import run_child

    return run_child(__file__, src, [f"--repeats={args.repeats}", f"--n-test={args.n_test}"])


def table(results: dict) -> None:
    print("\n| version | explain / forward, median [min, max] | first call / forward | "
          + " | ".join(STEPS) + " | rest |")
    print("|---|---|---|" + "---|" * (len(STEPS) + 1))
    for name, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            print(f"| {name} | failed: {runs[0].get('error', '')[-200:]!r} |")
            continue
        ratios = [x["ratio"] for r in good for x in r["repeats"]]
        first = [r["first_call"]["ratio"] for r in good]
        steps = {}
        for r in good:
            for x in r["repeats"]:
                for k, v in x["steps_over_forward"].items():
                    steps.setdefault(k, []).append(v)
        rest = [v for k, v in steps.items() if k.startswith("rest")]
        print(f"| {name} | {np.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] | {np.median(first):.2f}x | "
              + " | ".join(f"{np.median(steps[s]):.2f}" if s in steps else "-" for s in STEPS)
              + f" | {np.median(rest[0]) if rest else float('nan'):.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="4b52a6c", help="commit to compare with ('none': this tree only)")
    ap.add_argument("--rounds", type=int, default=2, help="times each version runs, taking turns")
    ap.add_argument("--repeats", type=int, default=3, help="timed explain calls per process after the first")
    ap.add_argument("--n-test", type=int, default=10_000)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import answer_child, child_options

    child_options(ap, "explain_cpu")
    args = ap.parse_args(argv)
    if answer_child(args, child):
        return 0
    import torch

    from _common import versions, write_results

    load_before, t0 = os.getloadavg(), time.perf_counter()
    with versions(args.baseline) as compared:
        results: dict = {name: [] for name in compared}
        for i in range(args.rounds):
            for name, src in compared.items():
                print(f"[{time.strftime('%H:%M:%S')}] round {i + 1}: {name} (load average {os.getloadavg()[0]:.2f})",
                      file=sys.stderr, flush=True)
                results[name].append(run_version(src, args))
    table(results)
    for name, runs in results.items():
        for r in runs:
            if "recall" in r:
                print(f"{name}: recall {json.dumps({k: round(v, 4) for k, v in r['recall'].items()})}")
            if "auroc" in r:
                print(f"{name}: AUROC {json.dumps({k: round(v, 4) for k, v in r['auroc'].items()})}")
    write_results("explain_cpu", args, results, load_before, t0, torch=torch.__version__,
                  torch_threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
