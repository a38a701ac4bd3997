"""Memory of ``actclust fit`` at scale (issue 19): ``fit``, ``prepare()`` and ``save`` of an explainer whose store is
on disk, the process's memory sampled throughout, for this code and a baseline.

    python benchmarks/prepare_memory.py                             # 1M samples, this tree against c1e7f5b (11 min)
    python benchmarks/prepare_memory.py --n 200000                  # about 3.5 minutes
    python benchmarks/prepare_memory.py --n 20000 --baseline none   # a smoke run

The wide MLP and Gaussian mixture of ``scale.py`` (1,792 floats per sample over layers h1, h2, h3), ``--n`` training
samples, the library's defaults and ``store=`` a temporary folder, as ``actclust fit --store`` runs: ``fit``, then
``prepare()`` (the similar-sample index calibrated for explain's presets, trust's calibration with each layer's
index), then ``save``. Each version runs in a fresh process (the baseline from a temporary ``git worktree`` of its
commit, put first on ``PYTHONPATH``), one after the other. A thread samples ``/proc/self/statm`` every 10 ms: the
resident memory, and the anonymous part of it (resident minus file-backed pages: what the system cannot reclaim;
pages of a memory-mapped store or index count in the resident figure until it drops them). Reported per step: the
peak of each, and the anonymous memory after ``prepare()``; the times; and whether both versions find the same
similar samples and trust signals for 200 held-out inputs. Results: a table on stdout and
``benchmarks/results/prepare_memory.json`` with the machine and its load average. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

STEPS = ("fit", "prepare", "save")


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import LAYERS, Mixture, _statm, teacher_model

    import actclust

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = teacher_model(args)
    x, y = Mixture(args.seed, args.separation).sample("train", args.n)
    xq = Mixture(args.seed, args.separation).sample("query", 200)[0]
    folder = Path(tempfile.mkdtemp(prefix="actclust-prepare-memory-"))
    samples, stop, t0 = [], threading.Event(), time.perf_counter()

    def watch():
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, *_statm()))
            time.sleep(0.01)

    marks = {}
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        ac = actclust.ActivationClustering(model, LAYERS, store=str(folder / "store"), progress=False)
        marks["fit"] = time.perf_counter() - t0
        ac.fit(x, y)
        del x, y
        marks["prepare"] = time.perf_counter() - t0
        ac.prepare()
        marks["save"] = time.perf_counter() - t0
        after_prepare = _statm()
        ac.save(folder / "run")
        marks["end"] = time.perf_counter() - t0
        stop.set()
        thread.join()
        es = ac.explain(xq)
        digest = hashlib.sha256(repr([(e.similar, e.trust) for e in es]).encode()).hexdigest()
    finally:
        stop.set()
        shutil.rmtree(folder, ignore_errors=True)
    s = np.array(samples)
    bounds = [marks[k] for k in (*STEPS, "end")]
    out = {"n": args.n, "actclust_file": actclust.__file__, "digest": digest,
           "after_prepare_anonymous_gb": after_prepare[1] / 1e9}
    for step, a, b in zip(STEPS, bounds, bounds[1:]):
        part = s[(s[:, 0] >= a) & (s[:, 0] <= b)]
        out[step] = {"seconds": b - a, "resident_peak_gb": float(part[:, 1].max()) / 1e9 if len(part) else None,
                     "anonymous_peak_gb": float(part[:, 2].max()) / 1e9 if len(part) else None}
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import answer_child, child_options, run_child, versions, write_results
    from scale import add_data_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="training samples")
    ap.add_argument("--baseline", default="c1e7f5b", help="a commit to measure too ('none': this tree only)")
    add_data_arguments(ap)
    child_options(ap, "prepare_memory")
    args = ap.parse_args(argv)
    if answer_child(args, child):
        return 0
    if not Path("/proc/self/statm").exists():
        print("prepare_memory.py reads /proc/self/statm: Linux only.", file=sys.stderr)
        return 2
    load_before, started = os.getloadavg(), time.perf_counter()
    options = [f"--n={args.n}", f"--seed={args.seed}", f"--separation={args.separation}",
               f"--teacher-samples={args.teacher_samples}", f"--teacher-epochs={args.teacher_epochs}"]
    results = {}
    with versions(args.baseline) as trees:
        for name, src in trees.items():
            print(f"[{time.strftime('%H:%M:%S')}] {name}: fit, prepare, save of {args.n:,} samples", flush=True)
            r = run_child(__file__, src, options)
            if "error" in r:
                print(r["error"], file=sys.stderr)
                return 1
            results[name] = r
    print(f"\n| version | fit: anonymous peak | prepare(): anonymous peak | after prepare(): anonymous | prepare(): "
          f"resident peak | fit / prepare / save |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['fit']['anonymous_peak_gb']:.2f} GB | {r['prepare']['anonymous_peak_gb']:.2f} GB | "
              f"{r['after_prepare_anonymous_gb']:.2f} GB | {r['prepare']['resident_peak_gb']:.2f} GB | "
              f"{r['fit']['seconds']:.0f} / {r['prepare']['seconds']:.0f} / {r['save']['seconds']:.0f} s |")
    results["same_explanations"] = len({r["digest"] for r in results.values()}) == 1
    print(f"\nsame similar samples and trust signals for 200 held-out inputs: {results['same_explanations']}")
    write_results("prepare_memory", args, results, load_before, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
