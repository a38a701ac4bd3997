"""Fashion-MNIST benchmark of the clustering surrogate (one command, prints a table, writes JSON).

    python benchmarks/fashion_mnist.py            # full run (about 5 min on 2 cores)
    python benchmarks/fashion_mnist.py --quick    # 15 clusters only

Fits ``ActivationClustering`` on the 60,000 training images over conv1, conv2, fc1, fc2 of a
small CNN (trained once and cached), scores it on the 10,000 test images, for each number of
clusters, posterior and layer weighting. Fit time is reported as a ratio to one plain forward
pass over the same images with the same batch size, measured right before each fit. Peak memory
of ``fit`` (resident set above its start) is measured in fresh processes at 10k and 60k samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch

from _common import RESULTS, PeakRSS, fashion_cnn, forward_seconds, test_accuracy

from actclust import ActivationClustering
from actclust.datasets import load_fashion_mnist

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
BATCH = 256


def memory_probe(n: int) -> dict:
    """Run in a fresh process: peak resident memory that ``fit`` adds on ``n`` training images."""
    model = fashion_cnn()
    x_tr = torch.from_numpy(load_fashion_mnist()[0][:n])
    forward_seconds(model, x_tr[:BATCH], BATCH)  # warm up allocator and kernels
    ac = ActivationClustering(model, LAYERS, n_clusters=15, batch_size=BATCH, progress=False)
    with PeakRSS() as mem:
        ac.fit(x_tr)
    stored = sum(v.nbytes for v in ac.train_vectors_.values())
    return {"n": n, "peak_added_mb": (mem.peak - mem.start) / 2**20, "stored_vectors_mb": stored / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="15 clusters only")
    ap.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "fashion_mnist.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0

    model = fashion_cnn()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    x_tr_t = torch.from_numpy(x_tr)
    dnn_acc = test_accuracy(model)
    forward_seconds(model, x_tr_t[: 4 * BATCH], BATCH)  # warm-up
    rows = []
    for k in ([15] if args.quick else [10, 15, 30]):
        for posterior in ("prediction", "label"):
            for weights in (None, "fit"):
                fwd = forward_seconds(model, x_tr_t, BATCH)
                ac = ActivationClustering(model, LAYERS, n_clusters=k, posterior=posterior,
                                          layer_weights=weights, batch_size=BATCH, progress=False)
                start = time.perf_counter()
                ac.fit(x_tr, y_tr)
                fit_s = time.perf_counter() - start
                s = ac.score(x_te, y_te)
                rows.append({
                    "n_clusters": k, "posterior": posterior, "weights": weights or "equal",
                    "fidelity": s["fidelity"], "accuracy": s["accuracy"],
                    "per_layer": s["per_layer"], "layer_weights": dict(zip(LAYERS, ac.weights_.tolist())),
                    "fit_over_forward": fit_s / fwd, "fit_stages_s": {
                        k2: v for k2, v in ac.fit_info_.items() if k2.startswith("seconds")},
                    "forward_s": fwd, "fit_s": fit_s,
                })
                _print_row(rows[-1])
    memory = [json.loads(subprocess.run(
        [sys.executable, __file__, "--memory-probe", str(n)], check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]) for n in (10_000, 60_000)]
    for m in memory:
        print(f"peak memory added by fit, n={m['n']:>6}: {m['peak_added_mb']:.0f} MiB "
              f"(of which kept reduced vectors: {m['stored_vectors_mb']:.0f} MiB)")
    result = {
        "benchmark": "fashion_mnist", "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                                 "torch": torch.__version__},
        "dnn_test_accuracy": dnn_acc, "layers": LAYERS, "batch_size": BATCH, "rows": rows, "memory": memory,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"DNN test accuracy {dnn_acc:.4f}; wrote {args.out}")
    return 0


_HEADER = False


def _print_row(r):
    global _HEADER
    if not _HEADER:
        print(f"{'k':>3} {'posterior':>10} {'weights':>7} | {'fid':>6} {'acc':>6} | "
              + " ".join(f"{l + ' fid':>9}" for l in LAYERS) + f" | {'fit/fwd':>7} | weights")
        _HEADER = True
    per = " ".join(f"{r['per_layer'][l]['fidelity']:>9.4f}" for l in LAYERS)
    w = " ".join(f"{v:.2f}" for v in r["layer_weights"].values())
    print(f"{r['n_clusters']:>3} {r['posterior']:>10} {r['weights']:>7} | {r['fidelity']:.4f} "
          f"{r['accuracy']:.4f} | {per} | {r['fit_over_forward']:>7.2f} | {w}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
