"""Scale benchmark (issue 9): fit, memory, disk, similar/trust/explain at 100k..1M samples, and Fashion-MNIST.

    python benchmarks/scale.py                       # 100k, 300k, 1M + Fashion-MNIST (target: < ~25 min, 2 cores)
    python benchmarks/scale.py --quick               # 20k, 60k + Fashion-MNIST: a smoke run
    python benchmarks/scale.py --sizes 100000 --no-fashion
    python benchmarks/scale.py --fashion-only
    python benchmarks/scale.py --size-timeout 900  # kill a size after 15 min, keep what it measured

Synthetic part. A wide but cheap MLP ``64 -> 256 -> 512 -> 1024 -> 10`` (ReLU; the three hidden
ReLU outputs ``h1, h2, h3`` are the clustered layers, 1,792 floats per sample) over a 64-d
Gaussian mixture (20 components, 2 per class, fixed seed: the teacher labels are the
component's class), trained briefly on 20,000 samples and cached under ``benchmarks/.cache``, so
that its predictions are meaningful and about a tenth are wrong. The training data of size ``n``
are generated from the seed in chunks (the first ``m`` rows are the same for every ``n >= m``);
the 1,000 similar/explain queries and the trust queries come from separate streams (held out).

Each size runs in a FRESH process, so that ``ru_maxrss`` is that process's own. In it, in order:
a plain forward pass over the ``n`` inputs (the baseline, same batch size and device as the fit)
and over 1,000 inputs; ``fit`` (time, ``ru_maxrss`` before and after, resident memory sampled
every 2 ms); disk used by the store (a temporary directory under /tmp, removed at the end);
``similar()`` per 1,000 queries with ``search="approximate"`` and ``"exact"`` for the weights
"low", "high", "equal" (the first call of each method, which builds its index, is timed apart),
recall@10 of approximate against exact; approximate ``trust()``: calibration time, time per 1,000
queries and misclassification AUROC of every signal on 3,000 held-out inputs; ``explain()`` per
1,000 queries (``trust=False``, k=10); save and load of the run (time, size, memory); last, the
slowest step, exact ``trust()`` as the AUROC reference (only up to ``--exact-trust-max``, 100k).
Every time is also given as a ratio to the forward pass of the same number of inputs in the same
process. Memory: ``ru_maxrss`` before and after ``fit``, and the peak of anonymous memory (resident
minus file-backed pages: touched pages of a memory-mapped store count in RSS but can be dropped).
``--size-timeout S`` kills a size's process after S seconds and keeps what it had measured.

Fashion-MNIST part (a fresh process): the cached benchmark CNN, ``ActivationClustering`` with
the library's default settings fitted on the 60,000 training images; explain throughput on the
10,000 test images as a ratio to a plain forward pass over them with ``search="exact"``,
``"approximate"`` and the default, capture excluded (the capture pass ``ac.query(X, vectors=True)``
is timed apart, and the analysis alone is timed on that query where the API allows), test
fidelity, and the mean L2 pixel distance from each test image to its 10 "low" and "high"
neighbours.

API. The script is written against the issue-9 contract (``store``, ``store_dtype``, ``search``
on the estimator; ``search=`` on ``similar``, ``trust`` and ``explain``) and passes only the
parameters the installed library accepts; the JSON lists those that were unavailable
(``api``). Results: a markdown table on stdout and ``benchmarks/results/scale.json``
(``scale_quick.json`` with ``--quick``), with the machine, the settings and the bars of the issue.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import CACHE, RESULTS, PeakRSS, rss_bytes
from torch import nn

import actclust
from actclust import ActivationClustering

LAYERS = ["h1", "h2", "h3"]
WIDTHS = (256, 512, 1024)
D_IN, N_CLASSES, N_COMPONENTS = 64, 10, 20
PRESETS = ("low", "high", "equal")
CHUNK = 65_536
FASHION_LAYERS = ["conv1", "conv2", "fc1", "fc2"]
# Test fidelity of the Fashion-MNIST CNN with the default settings before issue 9 (README, k-means,
# 15 clusters, equal weights, "mean" reducer): the "fidelity unchanged" bar compares against it.
FASHION_FIDELITY_REF = 0.9184
GB = 1e9
MiB = 2 ** 20


# ----------------------------------------------------------------------------- model and data

class WideMLP(nn.Module):
    """``64 -> 256 -> 512 -> 1024 -> 10`` with one ReLU module per hidden layer (``h1``, ``h2``, ``h3``)."""

    def __init__(self, d_in: int = D_IN, widths=WIDTHS, n_classes: int = N_CLASSES):
        super().__init__()
        self.fc1, self.h1 = nn.Linear(d_in, widths[0]), nn.ReLU()
        self.fc2, self.h2 = nn.Linear(widths[0], widths[1]), nn.ReLU()
        self.fc3, self.h3 = nn.Linear(widths[1], widths[2]), nn.ReLU()
        self.out = nn.Linear(widths[2], n_classes)

    def forward(self, x):
        return self.out(self.h3(self.fc3(self.h2(self.fc2(self.h1(self.fc1(x)))))))


class Mixture:
    """A 64-d Gaussian mixture (20 components, diagonal covariances), each component one of 10 classes.

    Streams: ``"train"`` (the data ``fit`` sees), ``"query"`` (similar/explain queries), ``"trust"``
    (trust queries), ``"teacher"`` (the MLP's own training sample). Each stream is generated in
    chunks of ``CHUNK`` rows seeded by ``(seed, stream, chunk)``, so it is the same in every process.
    """

    STREAMS = {"train": 1, "query": 2, "trust": 3, "teacher": 4}  # noqa: RUF012 (read only)

    def __init__(self, seed: int = 0, separation: float = 0.45):
        rng = np.random.default_rng([seed, 0])
        self.seed, self.separation = seed, separation
        self.means = (rng.standard_normal((N_COMPONENTS, D_IN)) * separation).astype(np.float32)
        self.stds = rng.uniform(0.6, 1.4, (N_COMPONENTS, D_IN)).astype(np.float32)
        self.p = rng.dirichlet(np.full(N_COMPONENTS, 5.0))
        self.component_class = np.arange(N_COMPONENTS) % N_CLASSES

    def _chunk(self, stream: str, i: int, n: int):
        rng = np.random.default_rng([self.seed, self.STREAMS[stream], i])
        c = rng.choice(N_COMPONENTS, n, p=self.p)
        x = rng.standard_normal((n, D_IN), dtype=np.float32)
        x *= self.stds[c]
        x += self.means[c]
        return x, self.component_class[c]

    def sample(self, stream: str, n: int):
        """``(x, y)``: float32 tensor ``(n, 64)`` and int64 array ``(n,)``, filled chunk by chunk."""
        x = torch.empty((n, D_IN), dtype=torch.float32)
        y = np.empty(n, dtype=np.int64)
        for i, start in enumerate(range(0, n, CHUNK)):
            xc, yc = self._chunk(stream, i, min(CHUNK, n - start))
            x[start:start + len(xc)] = torch.from_numpy(xc)
            y[start:start + len(yc)] = yc
        return x, y


def add_data_arguments(ap) -> None:
    """The options :func:`teacher_model` and :class:`Mixture` read, for every script that uses them."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--separation", type=float, default=0.45, help="scale of the mixture means")
    ap.add_argument("--teacher-samples", type=int, default=20_000)
    ap.add_argument("--teacher-epochs", type=int, default=1)


def teacher_model(args, progress: bool = False) -> WideMLP:
    """The MLP, trained briefly (one pass over 20,000 samples) with a fixed seed, cached as safetensors."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(args.seed)
    model = WideMLP()
    key = f"seed{args.seed}_sep{args.separation}_n{args.teacher_samples}_e{args.teacher_epochs}"
    path = CACHE / f"scale_mlp_{key}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x, y = Mixture(args.seed, args.separation).sample("teacher", args.teacher_samples)
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.teacher_epochs):
        for idx in torch.randperm(len(x), generator=gen).split(256):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    if progress:
        log(f"trained the MLP in {time.perf_counter() - t0:.1f} s; cached at {path}")
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


# ----------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def maxrss_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _statm() -> tuple:
    """``(resident, anonymous)`` bytes now: statm's resident minus its file-backed (shared) pages."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page


class PeakMemory(PeakRSS):
    """:class:`PeakRSS` that also keeps the peak of anonymous memory (resident minus file-backed pages).

    Pages of a memory-mapped store that the process has touched count in its RSS (and in
    ``ru_maxrss``) although the kernel can drop them at any time; the anonymous peak leaves them out.
    """

    def __enter__(self):
        self.anon_start = self.anon_peak = _statm()[1]
        return super().__enter__()

    def _watch(self):
        while not self._stop.is_set():
            rss, anon = _statm()
            self.peak, self.anon_peak = max(self.peak, rss), max(self.anon_peak, anon)
            time.sleep(0.002)

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self.anon_peak = max(self.anon_peak, _statm()[1])
        return out


def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def api_support() -> dict:
    """Which parameters of the issue-9 contract the installed library has."""
    from actclust.analysis import trust as trust_mod

    ctor = ("store", "store_dtype", "search", "progress", "batch_size", "n_clusters")
    trust_search = accepts(ActivationClustering.trust, "search") or accepts(trust_mod.calibrate, "search")
    return {
        "constructor": {p: accepts(ActivationClustering, p) for p in ctor},
        "similar_search": accepts(ActivationClustering.similar, "search"),
        "explain_search": accepts(ActivationClustering.explain, "search"),
        "explain_trust": accepts(ActivationClustering.explain, "trust"),
        "trust_search": trust_search,
        "save": hasattr(actclust, "save") or hasattr(ActivationClustering, "save"),
        "load": hasattr(actclust, "load"),
    }


def missing_params(api: dict) -> list:
    out = [f"ActivationClustering({p}=)" for p, ok in api["constructor"].items() if not ok]
    out += [name for name, key in (("similar(search=)", "similar_search"), ("explain(search=)", "explain_search"),
                                   ("trust(search=)", "trust_search")) if not api[key]]
    return out


def make_explainer(model, layers, api: dict, **wanted) -> ActivationClustering:
    """``ActivationClustering`` with the wanted parameters the library has (the others are dropped)."""
    kwargs = {k: v for k, v in wanted.items() if api["constructor"].get(k, accepts(ActivationClustering, k))}
    return ActivationClustering(model, layers, **kwargs)


def call_kwargs(fn, **wanted) -> dict:
    return {k: v for k, v in wanted.items() if v is not None and accepts(fn, k)}


def forward_seconds(model, x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """One plain ``model(x)`` pass in batches, inputs moved to the device as the capture does: the baseline."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in x.split(batch_size):
            model(batch.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_forward(model, x, batch_size, device, repeats: int) -> float:
    return min(forward_seconds(model, x, batch_size, device) for _ in range(repeats))


def disk_usage(path) -> dict:
    """Allocated (``st_blocks``) and apparent bytes under ``path``, hard links counted once."""
    path, seen, allocated, apparent, files = Path(path), set(), 0, 0, 0
    if not path.exists():
        return {"allocated_bytes": 0, "apparent_bytes": 0, "files": 0}
    for root, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            allocated += st.st_blocks * 512
            apparent += st.st_size
            files += 1
    return {"allocated_bytes": allocated, "apparent_bytes": apparent, "files": files}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, truth)]))


def aurocs(signals: dict, right: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    if right.all() or not right.any():
        return {}
    skip = {"dnn_prediction", "surrogate_prediction", "dknn_prediction"}
    return {name: float(roc_auc_score(right, np.asarray(v, dtype=np.float64)))
            for name, v in signals.items() if name not in skip and np.asarray(v).ndim == 1}


class Stages:
    """Runs each stage guarded: an exception is recorded under ``errors[stage]`` and the run goes on."""

    def __init__(self, result: dict, partial: str | None = None):
        self.result, self.partial = result, partial
        result.setdefault("errors", {})
        result.setdefault("stage_seconds", {})

    @contextlib.contextmanager
    def __call__(self, name: str):
        log(f"  {name} ...")
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 (recorded and reported)
            self.result["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"  {name} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}")
        finally:
            self.result["stage_seconds"][name] = time.perf_counter() - t0
            gc.collect()
            self.save()

    def save(self) -> None:
        """What is measured so far, for the parent to read if this process is killed (``--size-timeout``)."""
        if self.partial:
            with contextlib.suppress(Exception):
                Path(self.partial).write_text(json.dumps(self.result, default=float))


# ----------------------------------------------------------------------------- one size (fresh process)

def run_size(n: int, args) -> dict:
    api = api_support()
    device = torch.device(args.device)
    model = teacher_model(args).to(device)
    mix = Mixture(args.seed, args.separation)
    result: dict = {"n": n, "device": str(device), "store_requested": args.store, "store_dtype": args.store_dtype}
    stage = Stages(result, args.partial)
    bs = args.batch_size

    x, y = mix.sample("train", n)
    xq, _ = mix.sample("query", args.queries)
    xt, yt = mix.sample("trust", args.trust_queries)
    with torch.no_grad():
        result["dnn_accuracy_train"] = float(np.mean(
            torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(8192)]).numpy() == y))
        result["dnn_accuracy_trust_queries"] = float(np.mean(model(xt.to(device)).argmax(1).cpu().numpy() == yt))

    # Baselines: plain forward passes over the n inputs and over 1,000 inputs, same batch size and device.
    forward_seconds(model, x[:4 * bs], bs, device)  # warm-up
    result["forward_s"] = forward_seconds(model, x, bs, device)
    fwd1000 = best_forward(model, xq[:1000], bs, device, repeats=7) * 1000 / min(1000, len(xq))
    result["forward_1000_s"] = fwd1000
    stage.save()

    tmp = Path(tempfile.mkdtemp(prefix="actclust-scale-", dir=args.tmp))
    result["tmp_dir"] = str(tmp)  # the parent removes it if this process is killed
    stage.save()
    store = None if args.store == "memory" else str(tmp / "store")
    result["store_used"] = "disk" if store and api["constructor"]["store"] else "memory"
    try:
        ac = make_explainer(model, LAYERS, api, n_clusters=args.n_clusters, store=store, store_dtype=args.store_dtype,
                            search="auto", progress=False, batch_size=bs)
        gc.collect()
        result["rss_before_fit_bytes"], result["anon_before_fit_bytes"] = _statm()
        result["maxrss_before_fit_bytes"] = maxrss_bytes()
        with stage("fit"), warnings.catch_warnings(record=True) as caught, PeakMemory() as mem:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            ac.fit(x, y)
            result["fit_s"] = time.perf_counter() - t0
        result["warnings_fit"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
        result["maxrss_after_fit_bytes"] = maxrss_bytes()
        result["fit_peak_added_bytes"] = result["maxrss_after_fit_bytes"] - result["rss_before_fit_bytes"]
        result["fit_peak_added_sampled_bytes"] = mem.peak - mem.start
        result["fit_peak_anon_bytes"] = mem.anon_peak
        result["fit_peak_anon_added_bytes"] = mem.anon_peak - mem.anon_start
        result["rss_after_fit_bytes"] = rss_bytes()
        if "fit" in result["errors"]:
            return result
        result["fit_over_forward"] = result["fit_s"] / result["forward_s"]
        with contextlib.suppress(Exception):
            result["fit_info"] = {k: v for k, v in ac.fit_info_.items() if isinstance(v, (int, float, str, dict))}
        with contextlib.suppress(Exception):
            result["train_score"] = {k: ac.train_score_[k] for k in ("fidelity", "accuracy", "dnn_accuracy")}
        result["vectors_floats_per_sample"] = sum(WIDTHS)
        result["vectors_bytes_float32"] = n * sum(WIDTHS) * 4
        result["store_disk"] = disk_usage(store) if result["store_used"] == "disk" else None
        log(f"  fit {result['fit_s']:.1f} s = {result['fit_over_forward']:.2f}x forward; peak RSS "
            f"{result['maxrss_after_fit_bytes'] / MiB:.0f} MiB (+{result['fit_peak_added_bytes'] / MiB:.0f}; "
            f"anonymous +{result['fit_peak_anon_added_bytes'] / MiB:.0f})")

        measure_similar(ac, xq, args, api, result, stage, fwd1000)
        measure_trust(ac, xt, yt, n, args, api, result, stage, fwd1000)
        measure_explain(ac, xq, args, api, result, stage, fwd1000)
        if not args.no_save:
            measure_save(ac, model, tmp, result, stage, xq, args)
        measure_trust(ac, xt, yt, n, args, api, result, stage, fwd1000, exact=True)
        result["maxrss_end_bytes"] = maxrss_bytes()
        result["tmp_disk_total"] = disk_usage(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def measure_similar(ac, xq, args, api, result, stage, fwd1000):
    if args.no_similar:
        return
    per = 1000 / len(xq)
    sim = result.setdefault("similar", {"queries": len(xq), "k": args.k})
    methods = ["approximate", "exact"] if api["similar_search"] else ["default"]
    if args.no_exact_similar and api["similar_search"]:
        methods = ["approximate"]
    found = {}
    with stage("query pass (capture of the similar queries)"):
        t0 = time.perf_counter()
        ac.query(xq, vectors=True)
        sim["capture_s_per_1000"] = (time.perf_counter() - t0) * per
    for method in methods:
        kw = {} if method == "default" else {"search": method}
        with stage(f"similar {method}"), PeakMemory() as mem:
            for i, preset in enumerate(PRESETS):
                # One-off costs apart: the first call builds the index; each weighting's first call may
                # calibrate it (timed on 10 queries: per-1,000 times below exclude them).
                t0 = time.perf_counter()
                ac.similar(xq[:10], k=args.k, weights=preset, **kw)
                first = time.perf_counter() - t0
                if i == 0:
                    sim.setdefault("index_build_s", {})[method] = first
                sim.setdefault("first_call_10_queries_s", {}).setdefault(method, {})[preset] = first
                t0 = time.perf_counter()
                nb = ac.similar(xq, k=args.k, weights=preset, **kw)
                s = (time.perf_counter() - t0) * per
                sim.setdefault("s_per_1000", {}).setdefault(method, {})[preset] = s
                sim.setdefault("over_forward_1000", {}).setdefault(method, {})[preset] = s / fwd1000
                found[(method, preset)] = np.asarray(nb.indices)
        sim.setdefault("peak_added_bytes", {})[method] = mem.peak - mem.start
        sim.setdefault("peak_anon_added_bytes", {})[method] = mem.anon_peak - mem.anon_start
        if method in sim.get("s_per_1000", {}):
            log("  similar {} per 1000: {}".format(method, ", ".join(
                f"{p} {sim['s_per_1000'][method][p]:.3f} s" for p in sim["s_per_1000"][method])))
    if ("approximate", "low") in found and ("exact", "low") in found:
        sim["recall_at_k"] = {p: recall_at_k(found[("approximate", p)], found[("exact", p)]) for p in PRESETS
                              if ("approximate", p) in found and ("exact", p) in found}
        sim["recall_at_k_min"] = min(sim["recall_at_k"].values())
        log(f"  recall@{args.k} approximate vs exact: {sim['recall_at_k']}")


def measure_trust(ac, xt, yt, n, args, api, result, stage, fwd1000, exact: bool = False):
    """``exact=False``: approximate trust (or the library's only trust when ``trust(search=)`` is missing);
    ``exact=True``: the exact reference, last of all, as it is the slowest step (up to ``--exact-trust-max``)."""
    if args.no_trust:
        return
    tr = result.setdefault("trust", {"queries": len(xt)})
    per = 1000 / len(xt)
    if api["trust_search"]:
        methods = (["exact"] if n <= args.exact_trust_max else []) if exact else ["approximate"]
    elif exact:
        return
    else:
        # trust(search=) is not there yet: the library's one trust is exact (O(n^2) calibration),
        # run only where exact trust is (``--exact-trust-max``).
        methods = ["default (exact)"] if n <= args.exact_trust_max else []
        tr["note"] = "trust(search=) unavailable; the library's trust is exact" + (
            "" if methods else f", skipped above --exact-trust-max={args.exact_trust_max}")
    for method in methods:
        kw = {"search": method} if api["trust_search"] else {}
        with stage(f"trust {method}"), PeakMemory() as mem:
            t0 = time.perf_counter()
            ac.trust(xt[:20], **kw)  # calibration (cached) + 20 queries
            tr.setdefault("calibration_s", {})[method] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sig = ac.trust(xt, **kw)
            s = (time.perf_counter() - t0) * per
        tr.setdefault("peak_added_bytes", {})[method] = mem.peak - mem.start
        tr.setdefault("peak_anon_added_bytes", {})[method] = mem.anon_peak - mem.anon_start
        if f"trust {method}" in result["errors"]:
            continue
        tr.setdefault("s_per_1000", {})[method] = s
        tr.setdefault("over_forward_1000", {})[method] = s / fwd1000
        right = np.asarray(sig["dnn_prediction"]) == yt
        tr["dnn_errors"] = int((~right).sum())
        tr.setdefault("auroc", {})[method] = aurocs(sig, right)
        log(f"  trust {method}: calibration {tr['calibration_s'][method]:.1f} s, {s:.3f} s per 1000, "
            f"credibility AUROC {tr['auroc'][method].get('credibility', float('nan')):.4f}")
    au = tr.get("auroc", {})
    if "approximate" in au and "exact" in au:
        tr["auroc_diff_approx_minus_exact"] = {k: au["approximate"][k] - au["exact"][k]
                                               for k in au["approximate"] if k in au["exact"]}


def measure_explain(ac, xq, args, api, result, stage, fwd1000):
    if args.no_explain:
        return
    ex = result.setdefault("explain", {"queries": len(xq), "k": args.explain_k, "trust": False})
    per = 1000 / len(xq)
    kw = call_kwargs(ac.explain, k=args.explain_k, trust=False)
    with stage("explain"), PeakMemory() as mem:
        ac.explain(xq[:10], **kw)  # any index or cache it needs, built once
        t0 = time.perf_counter()
        ac.explain(xq, **kw)
        s = (time.perf_counter() - t0) * per
        ex["s_per_1000"], ex["over_forward_1000"] = s, s / fwd1000
        log(f"  explain: {s:.3f} s per 1000 = {s / fwd1000:.1f}x forward of 1000")
    ex["peak_added_bytes"] = mem.peak - mem.start
    ex["peak_anon_added_bytes"] = mem.anon_peak - mem.anon_start


def measure_save(ac, model, tmp, result, stage, xq=None, args=None):
    sv = result.setdefault("save", {})
    run = tmp / "run"
    save = getattr(actclust, "save", None)
    with stage("save"):
        t0 = time.perf_counter()
        if save is not None:
            save(ac, str(run))
        else:
            ac.save(str(run))
        sv["save_s"] = time.perf_counter() - t0
        sv["run_disk"] = disk_usage(run)
    if "save" in result["errors"]:
        return
    with stage("load"):
        gc.collect()
        before = rss_bytes()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            loaded = actclust.load(str(run), model)
            sv["load_s"] = time.perf_counter() - t0
        sv["load_peak_added_bytes"] = mem.peak - before
        sv["load_peak_anon_added_bytes"] = mem.anon_peak - mem.anon_start
        sv["load_rss_added_bytes"] = rss_bytes() - before
        if xq is not None and not args.no_similar:
            # The approximate index saved with the run is memory-mapped, not rebuilt: the loaded run's
            # first approximate search costs a search, and finds what the fitted run found.
            t0 = time.perf_counter()
            got = loaded.similar(xq[:10], k=args.k, weights="high", search="approximate").indices
            sv["loaded_first_approximate_10_queries_s"] = time.perf_counter() - t0
            want = ac.similar(xq[:10], k=args.k, weights="high", search="approximate").indices
            sv["loaded_same_neighbours"] = bool(np.array_equal(np.asarray(got), np.asarray(want)))
            log(f"  loaded run: first approximate search of 10 queries {sv['loaded_first_approximate_10_queries_s']:.2f} s"
                f" (fitted run's index build: {result.get('similar', {}).get('index_build_s', {}).get('approximate')}),"
                f" same neighbours {sv['loaded_same_neighbours']}")
        del loaded


# ----------------------------------------------------------------------------- Fashion-MNIST (fresh process)

def run_fashion(args) -> dict:
    from _common import fashion_cnn

    from actclust.datasets import load_fashion_mnist

    api = api_support()
    model = fashion_cnn()
    x_tr, y_tr, x_te_all, y_te_all = load_fashion_mnist()
    bs = 256
    x_te = x_te_all[:args.fashion_test]  # explain timings and pixel distances; fidelity on every test input
    x_te_t = torch.from_numpy(x_te)
    out: dict = {"n_train": len(x_tr), "n_test": len(x_te_all), "n_explained": len(x_te), "layers": FASHION_LAYERS,
                 "explain_k": args.explain_k}
    stage = Stages(out, args.partial)
    device = torch.device("cpu")
    forward_seconds(model, x_te_t[:4 * bs], bs, device)  # warm-up
    fwd = [forward_seconds(model, x_te_t, bs, device)]
    # The library's default settings (only progress is turned off).
    ac = make_explainer(model, FASHION_LAYERS, api, progress=False)
    with stage("fashion fit"):
        t0 = time.perf_counter()
        ac.fit(x_tr, y_tr)
        out["fit_s"] = time.perf_counter() - t0
    if "fashion fit" in out["errors"]:
        return out
    with stage("fashion score"):
        s = ac.score(x_te_all, y_te_all)
        out["fidelity"], out["surrogate_accuracy"], out["dnn_accuracy"] = s["fidelity"], s["accuracy"], s["dnn_accuracy"]
        log(f"  Fashion-MNIST test fidelity {s['fidelity']:.4f}")
    with stage("fashion capture"):
        t0 = time.perf_counter()
        q = ac.query(x_te, vectors=True)
        out["capture_s"] = time.perf_counter() - t0
    methods = ["default", "exact", "approximate"] if api["explain_search"] else ["default"]
    from actclust.analysis import explanation as explanation_mod

    for method in methods:
        kw = call_kwargs(ac.explain, k=args.explain_k, trust=False, search=None if method == "default" else method)
        with stage(f"fashion explain {method}"):
            ac.explain(x_te[:bs], **kw)  # builds the index of this method first
            t0 = time.perf_counter()
            ac.explain(x_te, **kw)
            total = time.perf_counter() - t0
            row = {"explain_s": total, "explain_minus_capture_s": total - out["capture_s"]}
            # The analysis alone, on the query pass made above (where the module function takes it).
            try:
                akw = call_kwargs(explanation_mod.explain, k=args.explain_k, trust=False,
                                  meta=ac.provenance() if hasattr(ac, "provenance") else None,
                                  search=(kw.get("search") or getattr(ac, "search", None)))
                t0 = time.perf_counter()
                explanation_mod.explain(ac.state_, q, **akw)
                row["analysis_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 (then the subtraction above stands)
                row["analysis_error"] = f"{type(exc).__name__}: {exc}"[:500]
            out.setdefault("explain", {})[method] = row
    fwd.append(forward_seconds(model, x_te_t, bs, device))
    out["forward_s"] = min(fwd)
    out["forward_runs_s"] = fwd
    for method, row in out.get("explain", {}).items():
        row["explain_over_forward"] = row["explain_s"] / out["forward_s"]
        row["explain_minus_capture_over_forward"] = row["explain_minus_capture_s"] / out["forward_s"]
        if "analysis_s" in row:
            row["analysis_over_forward"] = row["analysis_s"] / out["forward_s"]
        row["capture_excluded_over_forward"] = row.get("analysis_over_forward", row["explain_minus_capture_over_forward"])
        log(f"  Fashion explain ({method}): {row['capture_excluded_over_forward']:.2f}x forward, capture excluded")
    out["capture_over_forward"] = out.get("capture_s", float("nan")) / out["forward_s"]
    with stage("fashion pixel distances"):
        n_pix = min(args.pixel_queries, len(x_te))
        qi = np.sort(np.random.default_rng(0).choice(len(x_te), n_pix, replace=False)) if n_pix < len(x_te) \
            else np.arange(len(x_te))
        flat_tr = x_tr.reshape(len(x_tr), -1)
        flat_q = x_te[qi].reshape(n_pix, -1)
        pix = {"queries": n_pix, "k": 10}
        for preset in ("low", "high"):
            nb = np.asarray(ac.similar(x_te[qi], k=10, weights=preset).indices)
            dist = [np.sqrt(((flat_tr[nb[i:i + 500]] - flat_q[i:i + 500, None]) ** 2).sum(2)).mean(1)
                    for i in range(0, n_pix, 500)]
            pix[preset] = float(np.concatenate(dist).mean())
        out["pixel_distance"] = pix
        log(f"  pixel distance low {pix['low']:.3f} vs high {pix['high']:.3f}")
    out["maxrss_bytes"] = maxrss_bytes()
    return out


# ----------------------------------------------------------------------------- driver

def child(flag: str, value, args, passthrough) -> dict:
    """Run one part in a fresh process; its progress goes to stderr, its result as one JSON line.

    After ``--size-timeout`` seconds the process is killed and what it had measured is kept
    (each stage writes it to a temporary file), marked with ``error``.
    """
    fd, partial = tempfile.mkstemp(prefix="actclust-scale-partial-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, str(value), f"--partial={partial}", *passthrough]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = proc.communicate(timeout=args.size_timeout)
        why = None
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        why = f"killed after --size-timeout={args.size_timeout} s"
    line = next((l for l in stdout.splitlines()[::-1] if l.startswith("RESULT ")), None)
    try:
        if why is None and proc.returncode == 0 and line is not None:
            res = json.loads(line[len("RESULT "):])
        else:
            why = why or ("killed (SIGKILL: out of memory?)" if proc.returncode in (-9, 137)
                          else f"exit code {proc.returncode}")
            log(f"{flag} {value}: failed, {why}; keeping what it had measured")
            text = Path(partial).read_text()
            res = {**(json.loads(text) if text.strip() else {}), "error": why}
    finally:
        Path(partial).unlink(missing_ok=True)
    if res.get("tmp_dir") and Path(res["tmp_dir"]).exists():  # left by a killed process
        shutil.rmtree(res["tmp_dir"], ignore_errors=True)
    res["wall_s"] = time.perf_counter() - t0
    return res


def bars(sizes: list, fashion: dict | None) -> dict:
    by_n = {r["n"]: r for r in sizes if "fit_s" in r}  # partial results (a killed process) count too
    out = {}
    lo, hi = 100_000, 1_000_000

    def at(n, *keys):
        r = by_n.get(n)
        for k in keys:
            if not isinstance(r, dict) or k not in r:
                return None
            r = r[k]
        return r

    # fit's own peak: resident memory sampled every 2 ms during fit (ru_maxrss also holds the peaks
    # of generating the data and the baseline forward passes, which at 1M exceed fit's).
    def fit_peak(n):
        before, added = at(n, "rss_before_fit_bytes"), at(n, "fit_peak_added_sampled_bytes")
        return None if before is None or added is None else before + added

    peak_hi, add_hi, add_lo = fit_peak(hi), at(hi, "fit_peak_added_sampled_bytes"), at(lo, "fit_peak_added_sampled_bytes")
    anon_hi, anon_lo = at(hi, "fit_peak_anon_added_bytes"), at(lo, "fit_peak_anon_added_bytes")
    raw_hi, raw_lo = at(hi, "maxrss_after_fit_bytes"), fit_peak(lo)
    out["fit_peak_rss_1M_le_2GB"] = _bar(
        None if peak_hi is None else peak_hi <= 2 * GB,
        f"resident memory at fit's peak at 1M = {peak_hi / GB:.2f} GB (process RSS before fit "
        f"{at(hi, 'rss_before_fit_bytes') / GB:.2f} GB + fit's own {add_hi / GB:.2f} GB, of it anonymous "
        f"{anon_hi / GB:.2f} GB); ru_maxrss of the whole process {raw_hi / GB:.2f} GB" if peak_hi is not None
        else "1M not measured")
    out["fit_peak_rss_1M_le_1.5x_100k"] = _bar(
        None if add_hi is None or add_lo is None else add_hi <= 1.5 * add_lo,
        f"memory added at fit's peak: 1M {add_hi / MiB:.0f} MiB / 100k {add_lo / MiB:.0f} MiB = {add_hi / add_lo:.2f}x "
        f"(anonymous {anon_hi / MiB:.0f} / {anon_lo / MiB:.0f} MiB = {anon_hi / anon_lo:.2f}x); resident at the "
        f"peak {peak_hi / MiB:.0f} / {raw_lo / MiB:.0f} MiB = {peak_hi / raw_lo:.2f}x"
        if None not in (add_hi, add_lo, peak_hi, raw_lo, anon_hi, anon_lo) else "1M or 100k not measured")
    recalls = [(r["n"], p, v) for r in by_n.values() for p, v in r.get("similar", {}).get("recall_at_k", {}).items()]
    out["approximate_recall_at_10_ge_0.95"] = _bar(
        None if not recalls else min(v for _, _, v in recalls) >= 0.95,
        "min over sizes and presets {:.4f} ({})".format(min(v for _, _, v in recalls), ", ".join(
            f"{n}/{p} {v:.4f}" for n, p, v in recalls)) if recalls else "no approximate vs exact comparison")
    q_hi, q_lo = at(hi, "similar", "s_per_1000", "approximate"), at(lo, "similar", "s_per_1000", "approximate")
    if q_hi and q_lo:
        ratios = {p: q_hi[p] / q_lo[p] for p in q_hi if p in q_lo}
        out["approximate_query_time_1M_le_2x_100k"] = _bar(
            max(ratios.values()) <= 2, "per preset " + ", ".join(f"{p} {v:.2f}x" for p, v in ratios.items()))
    else:
        out["approximate_query_time_1M_le_2x_100k"] = _bar(None, "1M or 100k approximate similar not measured")
    cal_hi, cal_lo = at(hi, "trust", "calibration_s", "approximate"), at(lo, "trust", "calibration_s", "approximate")
    limit = (hi * math.log(hi)) / (lo * math.log(lo))
    out["trust_1M_calibration_n_log_n"] = _bar(
        None if cal_hi is None or cal_lo is None else cal_hi / cal_lo <= limit,
        f"approximate calibration 1M {cal_hi:.1f} s / 100k {cal_lo:.1f} s = {cal_hi / cal_lo:.2f}x "
        f"(n log n allows {limit:.1f}x)" if cal_hi is not None and cal_lo is not None
        else "approximate trust at 1M or 100k not measured")
    diff = at(lo, "trust", "auroc_diff_approx_minus_exact")
    out["trust_auroc_within_0.005_of_exact_at_100k"] = _bar(
        None if not diff or "credibility" not in diff else abs(diff["credibility"]) <= 0.005,
        "credibility AUROC approximate - exact = {:+.4f}{}".format(diff["credibility"], (
            "; stacked_trust {:+.4f}".format(diff["stacked_trust"])) if "stacked_trust" in diff else "")
        if diff and "credibility" in diff else "approximate and exact trust at 100k not both measured")
    if fashion and "explain" in fashion:
        row = fashion["explain"].get("default", {})
        r = row.get("capture_excluded_over_forward")
        fid = fashion.get("fidelity")
        out["fashion_explain_lt_1x_forward_defaults"] = _bar(
            None if r is None or fid is None else (r < 1 and fid >= FASHION_FIDELITY_REF - 0.002),
            f"explain {fashion.get('n_explained', 10_000):,} test inputs, capture excluded = {r:.2f}x forward; fidelity {fid:.4f} "
            f"(before issue 9: {FASHION_FIDELITY_REF}, tolerance 0.002)" if r is not None and fid is not None
            else "not measured")
        pix = fashion.get("pixel_distance", {})
        out["fashion_low_closer_than_high"] = _bar(
            None if "low" not in pix else pix["low"] < pix["high"],
            f"mean pixel distance low {pix['low']:.3f} vs high {pix['high']:.3f}" if "low" in pix else "not measured")
    else:
        out["fashion_explain_lt_1x_forward_defaults"] = _bar(None, "Fashion-MNIST part not run")
        out["fashion_low_closer_than_high"] = _bar(None, "Fashion-MNIST part not run")
    return out


def _bar(passed, detail: str) -> dict:
    return {"pass": passed, "detail": detail}


def _f(v, fmt="{:.2f}"):
    return "" if v is None else fmt.format(v)


def print_tables(sizes, fashion, bar_results, api):
    print("\n### Synthetic MLP (64-256-512-1024-10, layers h1/h2/h3 = 1,792 floats per sample)\n")
    print("| n | fit / forward | resident at fit's peak | added by fit | anonymous added by fit | store on disk | saved run "
          "| load: time, RSS added |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sizes:
        if "fit_s" not in r:
            print(f"| {r.get('n')} | failed: {r.get('error') or r.get('errors')} | | | | | | |")
            continue
        store = r.get("store_disk") or {}
        run = r.get("save", {}).get("run_disk") or {}
        sv = r.get("save", {})
        print(f"| {r['n']:,}{' (partial: ' + r['error'] + ')' if 'error' in r else ''} | {_f(r.get('fit_over_forward'))} | {_f((r.get('rss_before_fit_bytes', 0) + r.get('fit_peak_added_sampled_bytes', 0)) / MiB, '{:.0f}')} MiB "
              f"| {_f(r.get('fit_peak_added_sampled_bytes', 0) / MiB, '{:.0f}')} MiB "
              f"| {_f(r.get('fit_peak_anon_added_bytes', 0) / MiB, '{:.0f}')} MiB "
              f"| {_f(store.get('allocated_bytes', 0) / MiB, '{:.0f}') + ' MiB' if store else r.get('store_used')} "
              f"| {_f(run.get('allocated_bytes', 0) / MiB, '{:.0f}') + ' MiB' if run else ''} "
              + (f"| {sv['load_s']:.2f} s, {sv.get('load_peak_added_bytes', 0) / MiB:.0f} MiB |" if "load_s" in sv else "| |"))
    print("\nPer 1,000 queries: seconds (and x forward of 1,000 inputs, same process).\n")
    print("| n | similar approx. low / high / equal | similar exact low / high / equal | recall@10 low / high / equal "
          "| trust approx. (calibration) | trust exact (calibration) | credibility AUROC approx. / exact | explain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sizes:
        if "fit_s" not in r:
            continue
        sim, tr, ex = r.get("similar", {}), r.get("trust", {}), r.get("explain", {})

        def sims(method, sim=sim):
            s, o = sim.get("s_per_1000", {}).get(method), sim.get("over_forward_1000", {}).get(method)
            return " / ".join(f"{s[p]:.3f} ({o[p]:.0f}x)" for p in PRESETS if p in s) if s else ""

        def trusts(method, tr=tr):
            s = tr.get("s_per_1000", {}).get(method)
            if s is None:
                return ""
            return f"{s:.2f} ({tr['over_forward_1000'][method]:.0f}x) ({tr['calibration_s'][method]:.1f} s)"

        rec = sim.get("recall_at_k", {})
        au = tr.get("auroc", {})
        exact_key = "exact" if "exact" in tr.get("s_per_1000", {}) else "default (exact)"
        print(f"| {r['n']:,} | {sims('approximate') or sims('default')} | {sims('exact')} "
              f"| {' / '.join(f'{rec[p]:.3f}' for p in PRESETS if p in rec)} | {trusts('approximate')} "
              f"| {trusts(exact_key)} | {_f(au.get('approximate', {}).get('credibility'), '{:.4f}')} / "
              f"{_f(au.get(exact_key, {}).get('credibility'), '{:.4f}')} "
              + (f"| {ex['s_per_1000']:.2f} ({ex['over_forward_1000']:.0f}x) |" if "s_per_1000" in ex else "| |"))
    if fashion:
        print(f"\n### Fashion-MNIST (default settings, 60,000 training images, {fashion.get('n_explained', 0):,} "
              "test inputs explained)\n")
        if "error" in fashion:
            print(f"failed or partial: {fashion['error']}\n")
        if "fidelity" in fashion:
            print(f"test fidelity {_f(fashion.get('fidelity'), '{:.4f}')} (before issue 9: {FASHION_FIDELITY_REF}); "
                  f"capture pass {_f(fashion.get('capture_over_forward'))}x forward; pixel distance low "
                  f"{_f(fashion.get('pixel_distance', {}).get('low'), '{:.3f}')} vs high "
                  f"{_f(fashion.get('pixel_distance', {}).get('high'), '{:.3f}')}\n")
            print("| search | explain / forward (capture excluded) | explain incl. capture / forward |")
            print("|---|---|---|")
            for method, row in fashion.get("explain", {}).items():
                print(f"| {method} | {_f(row.get('capture_excluded_over_forward'))} | {_f(row.get('explain_over_forward'))} |")
    print("\n### Bars (issue 9)\n")
    print("| bar | pass | measured |")
    print("|---|---|---|")
    for name, b in bar_results.items():
        print(f"| {name} | {'n/a' if b['pass'] is None else ('yes' if b['pass'] else 'NO')} | {b['detail']} |")
    missing = missing_params(api)
    print(f"\nAPI parameters unavailable in this library: {', '.join(missing) if missing else 'none'}")


def machine_info() -> dict:
    import faiss

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "faiss": getattr(faiss, "__version__", "?"), "numpy": np.__version__,
            "actclust": getattr(actclust, "__version__", "?"), "cuda": torch.cuda.is_available(),
            "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parent.parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                            text=True, check=False).stdout.strip()
        info["git_dirty_src"] = bool(subprocess.run(["git", "status", "--porcelain", "src"], cwd=root,
                                                    capture_output=True, text=True, check=False).stdout.strip())
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", help="training set sizes, comma-separated (default 100000,300000,1000000)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: sizes 20000,60000 and 2,000 Fashion-MNIST test inputs unless given")
    ap.add_argument("--fashion", dest="fashion", action="store_true", default=True,
                    help="run the Fashion-MNIST part (default)")
    ap.add_argument("--no-fashion", dest="fashion", action="store_false")
    ap.add_argument("--fashion-only", action="store_true", help="only the Fashion-MNIST part")
    ap.add_argument("--rebar", metavar="JSON",
                    help="measure nothing: recompute the bars of a results file from its measurements, rewrite it")
    ap.add_argument("--store", default="disk", choices=("disk", "memory"),
                    help="store=<temp dir> (disk, default) or store=None (memory)")
    ap.add_argument("--store-dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--n-clusters", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=1024, help="fit and the forward baseline (synthetic part)")
    ap.add_argument("--queries", type=int, default=1000, help="held-out similar/explain queries")
    ap.add_argument("--trust-queries", type=int, default=3000,
                    help="held-out trust queries (AUROC over about 10%% DNN errors); times are per 1,000")
    ap.add_argument("--k", type=int, default=10, help="neighbours for similar() and recall@k")
    ap.add_argument("--explain-k", type=int, default=10, help="k of explain() (similar samples and exemplars)")
    ap.add_argument("--exact-trust-max", type=int, default=100_000,
                    help="run exact trust only up to this n (its calibration is O(n^2))")
    ap.add_argument("--no-similar", action="store_true")
    ap.add_argument("--no-exact-similar", action="store_true", help="skip exact similar (and so recall)")
    ap.add_argument("--no-trust", action="store_true")
    ap.add_argument("--no-explain", action="store_true")
    ap.add_argument("--no-save", action="store_true", help="skip save/load of the fitted run")
    ap.add_argument("--fashion-test", type=int, help="Fashion-MNIST test inputs explained (default 10000; 2000 with "
                    "--quick); fidelity is always on all 10,000")
    ap.add_argument("--pixel-queries", type=int, default=10_000, help="Fashion-MNIST test inputs for pixel distances "
                    "(at most --fashion-test)")
    ap.add_argument("--device", default="cpu", help="model device for the synthetic part (cpu, cuda)")
    add_data_arguments(ap)
    ap.add_argument("--tmp", default="/tmp", help="where the temporary store and saved runs go")
    ap.add_argument("--size-timeout", type=float, help="kill a size's (or Fashion-MNIST's) process after this many "
                    "seconds, keeping what it had measured")
    ap.add_argument("--out", help="JSON path (default results/scale.json, results/scale_quick.json with --quick)")
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)  # one size in this process
    ap.add_argument("--fashion-part", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--partial", help=argparse.SUPPRESS)  # where a child keeps what it has measured so far
    args = ap.parse_args(argv)
    if args.rebar:
        saved = json.loads(Path(args.rebar).read_text())
        saved["bars"] = bars(saved["results"], saved.get("fashion_mnist"))
        Path(args.rebar).write_text(json.dumps(saved, indent=2, default=float))
        for name, b in saved["bars"].items():
            print(f"| {name} | {b} |")
        return 0
    if args.size or args.fashion_part:  # SIGTERM unwinds (temporary store removed) instead of dying at once
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.fashion_test is None:
        args.fashion_test = 2000 if args.quick else 10_000
    if args.size:
        print("RESULT " + json.dumps(run_size(args.size, args)))
        return 0
    if args.fashion_part:
        print("RESULT " + json.dumps(run_fashion(args)))
        return 0

    default_sizes = "20000,60000" if args.quick else "100000,300000,1000000"
    sizes = [] if args.fashion_only else [int(s) for s in (args.sizes or default_sizes).replace("_", "").split(",")
                                          if s.strip()]
    out = Path(args.out or RESULTS / ("scale_quick.json" if args.quick else "scale.json"))
    api = api_support()
    log(f"sizes {sizes}, Fashion-MNIST {'yes' if args.fashion else 'no'}; unavailable API parameters: "
        f"{missing_params(api) or 'none'}")
    skip = {"sizes", "quick", "fashion", "fashion_only", "out", "size", "fashion_part", "partial", "size_timeout"}
    passthrough = []
    for k, v in vars(args).items():
        if k in skip:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            passthrough += [flag] if v else []
        elif v is not None:
            passthrough.append(f"{flag}={v}")
    t_start = time.perf_counter()
    if sizes:
        model = teacher_model(args, progress=True)  # trained once here, loaded by every size
        del model
    results = []
    for n in sizes:
        log(f"n = {n:,} (fresh process)")
        r = child("--size", n, args, passthrough)
        r.setdefault("n", n)
        results.append(r)
        log(f"n = {n:,} done in {r['wall_s']:.0f} s")
    fashion = None
    if args.fashion or args.fashion_only:
        log("Fashion-MNIST (fresh process)")
        fashion = child("--fashion-part", 1, args, passthrough)
        log(f"Fashion-MNIST done in {fashion['wall_s']:.0f} s")
    good = [r for r in results if "fit_s" in r]
    ratios = {}
    if len(good) >= 2:
        a, b = good[0], good[-1]
        for method in ("approximate", "exact"):
            sa, sb = a.get("similar", {}).get("s_per_1000", {}).get(method), b.get("similar", {}).get("s_per_1000", {}).get(method)
            if sa and sb:
                ratios[f"similar_{method}_{b['n']}_over_{a['n']}"] = {p: sb[p] / sa[p] for p in sa if p in sb}
        ca, cb = a.get("trust", {}).get("calibration_s", {}), b.get("trust", {}).get("calibration_s", {})
        for method in set(ca) & set(cb):
            ratios[f"trust_calibration_{method}_{b['n']}_over_{a['n']}"] = cb[method] / ca[method]
            ratios[f"trust_calibration_{method}_exponent"] = math.log(cb[method] / ca[method]) / math.log(b["n"] / a["n"])
    bar_results = bars(results, fashion)
    print_tables(results, fashion, bar_results, api)
    result = {
        "benchmark": "scale", "machine": machine_info(), "settings": {
            k: v for k, v in vars(args).items() if k not in ("size", "fashion_part", "partial")},
        "sizes": sizes,
        "synthetic": {"model": "WideMLP 64-256-512-1024-10 (ReLU)", "layers": LAYERS, "widths": list(WIDTHS),
                      "data": f"Gaussian mixture, {N_COMPONENTS} components in {D_IN}-d (component % 10 = class), "
                              f"separation {args.separation}, seed {args.seed}",
                      "teacher": f"{args.teacher_epochs} epoch(s) of Adam on {args.teacher_samples} samples"},
        "api": {**api, "unavailable": missing_params(api)},
        "results": results, "ratios_largest_over_smallest": ratios, "fashion_mnist": fashion, "bars": bar_results,
        "wall_s": time.perf_counter() - t_start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwrote {out} ({result['wall_s'] / 60:.1f} min)")
    return 0 if all("error" not in r for r in results) and not (fashion and "error" in fashion) else 1


if __name__ == "__main__":
    sys.exit(main())
