"""Page latency of the explorer (``actclust view``) on a run of 1,000,000 training samples with the disk store.

    python benchmarks/view_latency.py                       # 1M samples (fit once, kept in --run-dir), 10,000 test inputs
    python benchmarks/view_latency.py --n 100000 --test 2000  # a smaller run
    python benchmarks/view_latency.py --run-dir /tmp/view-1m  # reuse the run (and store) fitted by an earlier call

The model and data of ``benchmarks/scale.py``: the wide MLP ``64 -> 256 -> 512 -> 1024 -> 10`` (its three
hidden layers clustered, 1,792 floats per sample, 15 clusters each) on the 64-d Gaussian mixture, the
training vectors in a float32 store on disk, the default ``search="auto"`` (approximate at this size).
The run is fitted with labels and saved once (``--run-dir``, reused when it holds a run of the same
size), then loaded as ``actclust view`` loads it (``actclust.load``: the store memory-mapped, no caches)
and explored on ``--test`` held-out inputs with the training inputs given (their tables are drawn).

Start (timed apart, per stage): one pass of the model over the test inputs, the cluster of every
training vector per layer (streamed over the store), the feature statistics, the trust calibration
and signals, the search index. Then the app runs under uvicorn in this process and a client asks,
over HTTP on loopback, for pages of each type in a seeded random order: **cold** is the first request
of an address (nothing cached for it), **warm** a repeat (served from the page cache). Page types:
``run`` (/), ``layer`` (/layer/L?sort=S: 3 layers x 3 sorts), ``cluster`` (/cluster/L/c?page=p: random
clusters and pages), ``input`` (/input/i: random test inputs), ``inputs`` (/inputs?show=F&sort=S&page=p).
Latency is the client's wall time per request (HTTP included); the app's own time (``Server-Timing``)
is kept too. Target: p95 < 300 ms for every page type, cold and warm. Results: a table on stdout and
``benchmarks/results/view_latency.json`` with the machine, its load average and the start timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402
from scale import LAYERS, Mixture, log, teacher_model  # noqa: E402

TOKEN = "latency-benchmark"
TARGET_MS = 300.0


def fitted_run(args, model, x, y) -> Path:
    """The saved run of ``args.n`` samples in ``args.run_dir`` (fitted and saved there unless it already is)."""
    import actclust

    run = Path(args.run_dir) / "run"
    manifest = run / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["state"]["n_samples"] == args.n:
        log(f"reusing the run in {run}")
        return run
    store = Path(args.run_dir) / "store"
    ac = actclust.ActivationClustering(model, LAYERS, n_clusters=15, store=str(store), batch_size=1024,
                                       progress=not args.quiet)
    t0 = time.perf_counter()
    ac.fit(x, y)
    log(f"fitted {args.n:,} samples in {time.perf_counter() - t0:.0f} s")
    ac.save(run, overwrite=True)
    return run


class Server:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def addresses(ex, rng, args) -> dict:
    """The distinct addresses asked for, per page type."""
    from actclust.views.explorer.data import FILTERS, INPUT_SORTS, MEMBERS_PER_PAGE, PAGE_SIZE, SORTS

    st = ex.state
    out = {"run": ["/"], "layer": [f"/layer/{l}?sort={s}" for l in st.layers for s in SORTS]}
    clusters = []
    for l in st.layers:
        for c in range(st.clusterings[l].n_clusters):
            pages = max(1, -(-len(ex.layers[l].members(c)) // MEMBERS_PER_PAGE))
            clusters += [f"/cluster/{l}/{c}?page={p}" for p in sorted({1, int(rng.integers(1, pages + 1))})]
    out["cluster"] = [clusters[i] for i in rng.choice(len(clusters), min(args.cold, len(clusters)), replace=False)]
    out["input"] = [f"/input/{i}" for i in rng.choice(ex.n_test, min(args.cold, ex.n_test), replace=False)]
    lists = []
    for show in FILTERS:
        for sort in INPUT_SORTS:
            n = len(ex.select(show, sort))
            pages = max(1, -(-n // PAGE_SIZE))
            lists += [f"/inputs?show={show}&sort={sort}&page={p}" for p in sorted({1, int(rng.integers(1, pages + 1))})]
    out["inputs"] = [lists[i] for i in rng.choice(len(lists), min(args.cold, len(lists)), replace=False)]
    return out


def measure(base: str, urls: dict, args, rng) -> dict:
    import httpx

    plan = [(kind, u) for kind, us in urls.items() for u in us]
    cold_order = [plan[i] for i in rng.permutation(len(plan))]
    warm_order = [plan[i] for _ in range(args.warm) for i in rng.permutation(len(plan))]
    times = {kind: {"cold": [], "warm": [], "cold_app": [], "warm_app": [], "bytes": []} for kind in urls}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as client:
        for phase, order in (("cold", cold_order), ("warm", warm_order)):
            for kind, url in order:
                t0 = time.perf_counter()
                r = client.get(url)
                dt = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
                app = float(r.headers["server-timing"].split("dur=")[1])
                times[kind][phase].append(dt)
                times[kind][f"{phase}_app"].append(app)
                if phase == "cold":
                    times[kind]["bytes"].append(len(r.content))
    return times


def summary(times: dict) -> dict:
    out = {}
    for kind, t in times.items():
        row = {}
        for phase in ("cold", "warm"):
            v = np.asarray(t[phase])
            a = np.asarray(t[f"{phase}_app"])
            row[phase] = {"n": int(len(v)), "p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)),
                          "max_ms": float(v.max()), "app_p50_ms": float(np.percentile(a, 50)),
                          "app_p95_ms": float(np.percentile(a, 95))}
        row["mean_kib"] = float(np.mean(t["bytes"]) / 1024)
        row["meets_target"] = row["cold"]["p95_ms"] < TARGET_MS and row["warm"]["p95_ms"] < TARGET_MS
        out[kind] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="training samples")
    ap.add_argument("--test", type=int, default=10_000, help="test inputs explored")
    ap.add_argument("--run-dir", default="/tmp/actclust-view-latency", help="where the run and its store are kept")
    ap.add_argument("--cold", type=int, default=40, help="distinct addresses per page type (at most)")
    ap.add_argument("--warm", type=int, default=3, help="repeats of every address once cold")
    ap.add_argument("--no-trust", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--separation", type=float, default=0.45)
    ap.add_argument("--teacher-samples", type=int, default=20_000)
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "view_latency.json"))
    args = ap.parse_args()

    import torch

    import actclust
    from actclust.views.explorer import Explorer, make_app

    torch.manual_seed(args.seed)
    load_before = os.getloadavg()
    model = teacher_model(args, progress=True)
    mix = Mixture(args.seed, args.separation)
    log(f"generating {args.n:,} training and {args.test:,} test samples")
    x, y = mix.sample("train", args.n)
    xt, yt = mix.sample("query", args.test)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    run = fitted_run(args, model, x, y)
    x = x.numpy()  # the training inputs as the command has them: an array

    t0 = time.perf_counter()
    ac = actclust.load(run, model, progress=not args.quiet)
    load_s = time.perf_counter() - t0
    log("starting the explorer")
    t0 = time.perf_counter()
    ex = Explorer(ac, xt.numpy(), yt, train=x, trust=not args.no_trust, progress=not args.quiet,
                  title="view latency")
    start_s = time.perf_counter() - t0
    log(f"explorer ready in {start_s:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in ex.timings.items()))
    rng = np.random.default_rng(args.seed)
    urls = addresses(ex, rng, args)
    load_during = os.getloadavg()
    with Server(make_app(ex, TOKEN)) as server:
        times = measure(server.url, urls, args, rng)
    load_after = os.getloadavg()
    result = summary(times)

    print(f"\nexplorer page latency, {args.n:,} training samples (disk store), {args.test:,} test inputs; "
          f"ms, client wall time over HTTP")
    print("| page | cold n | cold p50 | cold p95 | warm n | warm p50 | warm p95 | page KiB | p95 < 300 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, r in result.items():
        print(f"| {kind} | {r['cold']['n']} | {r['cold']['p50_ms']:.1f} | {r['cold']['p95_ms']:.1f} | {r['warm']['n']} | "
              f"{r['warm']['p50_ms']:.1f} | {r['warm']['p95_ms']:.1f} | {r['mean_kib']:.0f} | "
              f"{'yes' if r['meets_target'] else 'NO'} |")
    print(f"start {start_s:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in ex.timings.items()) + f"); load {load_s:.1f} s; "
          f"load average before / during / after: {load_before[0]:.2f} / {load_during[0]:.2f} / {load_after[0]:.2f}")
    out = {
        "settings": {"n": args.n, "test": args.test, "layers": LAYERS, "n_clusters": 15, "store": "disk float32",
                     "search": ac.search, "cold_addresses_per_type": args.cold, "warm_repeats": args.warm,
                     "trust": not args.no_trust, "seed": args.seed},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_during": load_during, "load_average_after": load_after},
        "load_s": load_s, "start_s": start_s, "start_stages_s": ex.timings,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "target_p95_ms": TARGET_MS, "pages": result, "raw_ms": {k: {p: t[p] for p in ("cold", "warm")} for k, t in times.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
