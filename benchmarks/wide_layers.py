"""Very wide layers: peak memory and time of fit, explain and similar-sample search, for this code and a
baseline, on an MLP whose hidden layer is ``--width`` values wide (a flattened map passed through whole).

    python benchmarks/wide_layers.py                              # 16,384 values, 20,000 rows, against a7bacd0
    python benchmarks/wide_layers.py --width 4096 --baseline none # this tree only

The model is ``64 -> width -> 10`` with random weights (seed 0), fitted on ``--n`` Gaussian inputs with
random labels over its two Linear layers (``"1"``: the ReLU'd hidden layer is stored as is; ``"2"``: the
logits), defaults otherwise, the vectors in a disk store in a temporary folder. Gaussian inputs through
random weights have no cluster structure: the worst case for an approximate index. Each version runs in a
fresh process (the baseline from a temporary ``git worktree`` of its commit, put first on ``PYTHONPATH``).
Per step, the wall time and the peak resident memory above the step's start (sampled every few ms):
``fit``; ``explain`` of ``--n-queries`` other inputs (the first call: it builds the search indexes and
calibrates trust), and again; ``similar`` of 300 inputs with ``search="approximate"`` and ``"exact"``. Also
recall@10 of explain's similar samples against the exact ones, and the warnings the calls gave. Results: a
table on stdout and ``benchmarks/results/wide_layers.json`` with the machine and its load average.
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

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("fit", "explain (first)", "explain (again)", "similar approximate", "similar exact")


def child(args) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import PeakRSS

    import actclust

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch.nn.Sequential(torch.nn.Linear(64, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 10)).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n + args.n_queries, 64)).astype(np.float32)
    y = rng.integers(0, 10, args.n)
    xq = x[args.n:]
    tmp = Path(tempfile.mkdtemp(prefix="actclust-wide-"))
    out = {"actclust_file": actclust.__file__, "steps": {}}
    said: list = []
    try:
        ac = actclust.ActivationClustering(model, ["1", "2"], store=str(tmp / "store"), progress=False)
        calls = [("fit", lambda: ac.fit(x[:args.n], y)),
                 ("explain (first)", lambda: ac.explain(xq)),
                 ("explain (again)", lambda: ac.explain(xq)),
                 ("similar approximate", lambda: ac.similar(xq[:300], k=10, search="approximate")),
                 ("similar exact", lambda: ac.similar(xq[:300], k=10, search="exact"))]
        results = {}
        for name, call in calls:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t = time.perf_counter()
                with PeakRSS() as peak:
                    results[name] = call()
                seconds = time.perf_counter() - t
            said += [f"{name}: {w.category.__name__}: {str(w.message)[:300]}" for w in caught
                     if w.category.__name__ not in ("DeprecationWarning", "FutureWarning")]
            out["steps"][name] = {"s": seconds, "peak_mib": (peak.peak - peak.start) / 2 ** 20,
                                  "rss_mib": peak.peak / 2 ** 20}
            print(f"{name}: {seconds:.1f} s, +{out['steps'][name]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
        exact = {p: ac.similar(xq, k=5, weights=p, search="exact").indices for p in ("low", "high")}
        es = results["explain (again)"]
        out["explain_similar_recall"] = {
            p: float(np.mean([len({s["index"] for s in e.similar[p]} & set(t.tolist())) / 5 for e, t in zip(es, exact[p])]))
            for p in ("low", "high")}
        out["warnings"] = said
        out["store_mib"] = sum(f.stat().st_size for f in (tmp / "store").rglob("*.bin")) / 2 ** 20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_version(src, args) -> dict:
    from _common import run_child

    return run_child(__file__, src, [f"--width={args.width}", f"--n={args.n}", f"--n-queries={args.n_queries}"],
                     echo_stderr=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="a7bacd0", help="commit to compare with ('none': this tree only)")
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--n-queries", type=int, default=500)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import answer_child, child_options

    child_options(ap, "wide_layers")
    args = ap.parse_args(argv)
    if answer_child(args, child):
        return 0
    from _common import versions, write_results

    load_before, t0 = os.getloadavg(), time.perf_counter()
    results = {}
    with versions(args.baseline) as compared:
        for name, src in compared.items():
            print(f"[{time.strftime('%H:%M:%S')}] {name} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr,
                  flush=True)
            results[name] = run_version(src, args)
    print(f"\n{args.width} values wide, {args.n} rows, {args.n_queries} queries: seconds / peak MiB above the start")
    print("| version | " + " | ".join(STEPS) + " | explain's similar recall@5 low / high |")
    print("|---|" + "---|" * (len(STEPS) + 1))
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][-200:]!r} |")
            continue
        cells = [f"{r['steps'][s]['s']:.1f} s / {r['steps'][s]['peak_mib']:.0f}" for s in STEPS]
        rec = r["explain_similar_recall"]
        print(f"| {name} | " + " | ".join(cells) + f" | {rec['low']:.3f} / {rec['high']:.3f} |")
    for name, r in results.items():
        for w in r.get("warnings", []):
            print(f"{name}: {w}")
    write_results("wide_layers", args, results, load_before, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
