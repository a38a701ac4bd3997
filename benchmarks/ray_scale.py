"""Local vs Ray (engine="ray") on one machine: fit time as a ratio to one forward pass, same results.

    python benchmarks/ray_scale.py                # about 6 minutes on 2 cores
    python benchmarks/ray_scale.py --mlp-n 20000  # a quicker run

Two workloads, each fitted with the local engine and with the Ray engine on 1 and 2 actors of a
local Ray cluster (``ray.init(num_cpus=2)``), the vectors on disk in a store (as at scale):

* Fashion-MNIST: the 60,000 training images through the benchmark CNN (``conv1, conv2, fc1, fc2``,
  default settings); also fitted from a ``ray.data.Dataset`` (``ray.data.from_numpy``, 2 actors).
* the synthetic wide MLP of ``benchmarks/scale.py`` (``64 -> 256 -> 512 -> 1024 -> 10``, 1,792 floats
  per sample clustered) on ``--mlp-n`` Gaussian-mixture samples.

``fit/fwd`` divides each fit's wall time by one plain ``model(x)`` pass over the same inputs in
this process (batch size 256, torch's default threads), timed right before that fit. A local fit
with one torch thread (each actor's share) is timed too, against its own one-thread forward pass. Each result is
checked against the local fit: vectors, centres and training cluster assignments equal bit for
bit. Also timed: assigning every training vector to its nearest centre on the driver (what a
distributed assignment pass would save), and what the actors send back per sample. The load
average (another job may share the machine) is recorded before and after. Results:
``benchmarks/results/ray_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from _common import RESULTS, fashion_cnn, forward_seconds

sys.path.insert(0, os.path.dirname(__file__))
from scale import LAYERS as MLP_LAYERS  # noqa: E402
from scale import Mixture, teacher_model  # noqa: E402

from actclust import ActivationClustering  # noqa: E402
from actclust.datasets import load_fashion_mnist  # noqa: E402

FASHION_LAYERS = ["conv1", "conv2", "fc1", "fc2"]
BATCH = 256


def fit(model, layers, x, y, store, **options):
    ac = ActivationClustering(model, layers, batch_size=BATCH, progress=False, store=store, **options)
    start = time.perf_counter()
    ac.fit(x, y)
    return ac, time.perf_counter() - start


def same(a, b) -> dict:
    """Bit-for-bit comparison of two fits: vectors, centres, training assignments, class mixes."""
    sa, sb = a.state_, b.state_
    vectors = all(np.array_equal(np.asarray(sa.train_vectors[k]), np.asarray(sb.train_vectors[k])) for k in sa.train_vectors)
    centres = all(np.array_equal(sa.clusterings[l].centers_, sb.clusterings[l].centers_) for l in sa.layers)
    assignments = all(np.array_equal(sa.clusterings[l].predict(sa.train_vectors[l]),
                                     sb.clusterings[l].predict(sb.train_vectors[l])) for l in sa.layers)
    posteriors = all(np.array_equal(sa.posteriors[l], sb.posteriors[l]) for l in sa.layers)
    return {"vectors": vectors, "centres": centres, "assignments": assignments, "posteriors": posteriors,
            "train_fidelity": [sa.train_score["fidelity"], sb.train_score["fidelity"]]}


def workload(name, model, layers, x, y, tmp, ray_dataset=None) -> list:
    """Forward pass timed right before each fit (the machine may be shared: its load varies)."""
    rows = []
    fwd = forward_seconds(model, torch.from_numpy(x), BATCH)
    local, seconds = fit(model, layers, x, y, os.path.join(tmp, f"{name}-local"))
    t = time.perf_counter()
    for l in local.state_.layers:  # the assignment a distributed pass would take off the driver
        local.state_.clusterings[l].predict(local.state_.train_vectors[l])
    assign = time.perf_counter() - t
    widths = local.state_.train_vectors.widths
    info = local.fit_info_
    rows.append({"workload": name, "engine": "local", "actors": None, "threads": torch.get_num_threads(),
                 "input": "array", "seconds": seconds, "forward_seconds": fwd,
                 "fit_over_forward": seconds / fwd, "seconds_capture": info["seconds_capture"],
                 "seconds_clustering": info["seconds_clustering"], "seconds_assign_all_on_driver": assign,
                 "floats_per_sample": sum(widths.values())})
    print(f"{name}: local fit {seconds:.1f} s ({seconds / fwd:.2f} x forward {fwd:.2f} s)", flush=True)
    # One thread, as each actor runs: the same compute as one actor, without Ray.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fwd1 = forward_seconds(model, torch.from_numpy(x), BATCH)
        one, seconds = fit(model, layers, x, y, os.path.join(tmp, f"{name}-local1"))
    finally:
        torch.set_num_threads(threads)
    rows.append({"workload": name, "engine": "local", "actors": None, "threads": 1, "input": "array",
                 "seconds": seconds, "forward_seconds": fwd1, "fit_over_forward": seconds / fwd1,
                 "seconds_capture": one.fit_info_["seconds_capture"],
                 "seconds_clustering": one.fit_info_["seconds_clustering"], "identical": same(local, one)})
    print(f"{name}: local fit, 1 thread {seconds:.1f} s ({seconds / fwd1:.2f} x its forward {fwd1:.2f} s)", flush=True)
    del one
    runs = [(1, "array", x), (2, "array", x)] + ([(2, "ray.data.from_numpy", ray_dataset)] if ray_dataset is not None else [])
    for actors, kind, data in runs:
        fwd = forward_seconds(model, torch.from_numpy(x), BATCH)
        ac, seconds = fit(model, layers, data, y, os.path.join(tmp, f"{name}-ray{actors}-{len(rows)}"),
                          engine="ray", ray_options={"concurrency": actors})
        check = same(local, ac)
        info = ac.fit_info_
        rows.append({"workload": name, "engine": "ray", "actors": actors, "threads": 1, "input": kind,
                     "seconds": seconds, "forward_seconds": fwd,
                     "fit_over_forward": seconds / fwd, "seconds_capture": info["seconds_capture"],
                     "seconds_clustering": info["seconds_clustering"], "ray": info["engine"], "identical": check})
        print(f"{name}: ray {actors} actor(s), {kind}: fit {seconds:.1f} s ({seconds / fwd:.2f} x forward), "
              f"identical {check}", flush=True)
        del ac
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlp-n", type=int, default=100_000, help="samples of the wide MLP workload")
    parser.add_argument("--out", default=str(RESULTS / "ray_scale.json"))
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}})
    ray_init = time.perf_counter() - t
    tmp = tempfile.mkdtemp(prefix="ray_scale-")
    rows = []
    try:
        x_tr, y_tr, _, _ = load_fashion_mnist()
        x_tr = np.ascontiguousarray(x_tr, dtype=np.float32)
        cnn = fashion_cnn()
        rows += workload("fashion-mnist", cnn, FASHION_LAYERS, x_tr, y_tr, tmp, ray_dataset=ray.data.from_numpy(x_tr))
        del x_tr

        class Settings:  # what scale.py's teacher needs (its defaults)
            seed, separation, teacher_samples, teacher_epochs = 0, 0.45, 20_000, 1

        mlp = teacher_model(Settings)
        x, y = Mixture(0, 0.45).sample("train", args.mlp_n)
        rows += workload("wide-mlp", mlp, MLP_LAYERS, x.numpy(), y, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "ray": ray.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "ray_init_seconds": ray_init, "batch_size": BATCH, "mlp_n": args.mlp_n, "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; ray.init {ray_init:.1f} s")
    print("| workload | engine | actors | threads | input | fit s | forward s | fit/fwd | capture s | clustering s | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ident = "" if "identical" not in r else ("yes" if all(v for k, v in r["identical"].items() if k != "train_fidelity")
                                                 else "NO")
        print(f"| {r['workload']} | {r['engine']} | {r['actors'] or ''} | {r['threads']} | {r['input']} | "
              f"{r['seconds']:.1f} | {r['forward_seconds']:.2f} | {r['fit_over_forward']:.2f} | "
              f"{r['seconds_capture']:.1f} | {r['seconds_clustering']:.1f} | {ident} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
