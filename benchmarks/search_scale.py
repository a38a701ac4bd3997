"""Approximate search as the training set grows (issue 19): ``similar()`` at 1M training samples over
the same call at 100k, both in one process, taking turns, so that both meet the same load.

    python benchmarks/search_scale.py                  # 100k and 1M (about 6 minutes on 2 cores, the baseline included)
    python benchmarks/search_scale.py --small 20000 --large 100000 --rounds 2   # a smoke run

The wide MLP (``64 -> 256 -> 512 -> 1024 -> 10``, layers ``h1, h2, h3``: 1,792 floats per sample) and
Gaussian mixture of ``scale.py``; the generator gives the same first rows for every ``n``, so the
small training set is the first ``--small`` rows of the large one. Two explainers are fitted
(defaults, 15 clusters, the store on disk). Then, per explainer: the first approximate call of each
weighting preset (it builds the index, then calibrates the preset: timed apart); ``--rounds``
rounds, each timing ``ac.similar(xq, k=10, weights=preset, search="approximate")`` over the same
``--queries`` held-out inputs for both sizes (the order alternates between rounds), the whole call
as a user pays it, capture pass included; recall@10 against ``search="exact"`` on
``--recall-queries`` of them; save, load, and the loaded run's first approximate call (the index is
memory-mapped from the run, not rebuilt) with the neighbours it finds. The ratio is the median
large-size time over the median small-size time, per preset; the bar is <= 2 at recall@10 >= 0.95.

Baseline in the same run (``--no-baseline`` to skip): the same explainers' index without its 4-bit twin
(``actclust.analysis.fastscan``; principal-component codes only), calibrated again on its own, which scans the
lists' 8-bit codes as the code before the twin did; its calls take turns with the twin's in every round.
Results: a table on stdout and ``benchmarks/results/search_scale.json`` with the machine and load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import LAYERS, PRESETS, Mixture, add_data_arguments, teacher_model  # noqa: E402  (the same data and model)

import actclust  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--recall-queries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--no-baseline", action="store_true", help="skip the index without its 4-bit twin")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search_scale.json"))
    add_data_arguments(ap)  # what teacher_model() and Mixture read (scale.py's defaults)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)

    model = teacher_model(args)
    mix = Mixture(args.seed, args.separation)
    x, y = mix.sample("train", args.large)
    xq, _ = mix.sample("query", args.queries)
    sizes = {"small": args.small, "large": args.large}
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "load_average_start": os.getloadavg()},
           "settings": vars(args), "sizes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="actclust-search-scale-", dir=args.tmp))
    try:
        acs, indexes = {}, {}
        for name, n in sizes.items():
            ac = actclust.ActivationClustering(model, LAYERS, n_clusters=15, store=str(tmp / f"store-{name}"),
                                               progress=False, batch_size=1024)
            _, t = timed(lambda: ac.fit(x[:n], y[:n]))
            acs[name] = ac
            r = res["sizes"][name] = {"n": n, "fit_s": t, "first_call_s": {}, "s_per_query": {p: [] for p in PRESETS}}
            log(f"{name} (n = {n:,}): fit {t:.1f} s")
            for p in PRESETS:  # the first call builds the index (first preset) and calibrates the preset
                _, t = timed(lambda: ac.similar(xq[:10], k=args.k, weights=p, search="approximate"))
                r["first_call_s"][p] = t
                log(f"  first approximate call, {p}: {t:.1f} s")
            index = ac.state_.cache["retrieval"]["retrieval", "approximate", "host"]
            r["index"] = {"lists": int(index.nlist), "codes": index.codes,
                          "quantizer": type(__import__("faiss").downcast_index(index.index.quantizer)).__name__,
                          "dims": [int(d) for d in index.dims],  # values per layer in the codes
                          "probes": {p: int(index._settings(_weights(ac, p))[0]) for p in PRESETS},
                          "candidates": {p: int(index.n_candidates(args.k, _weights(ac, p))) for p in PRESETS},
                          "calibration_recall": {p: float(index.recall[_key(ac, p)]) for p in PRESETS}}
            log(f"  index: {r['index']}")
            if not args.no_baseline and index.fast is not None:  # the same lists, 8-bit scan, calibrated on its own
                base = copy.copy(index)
                base.fast, base.settings, base.recall = None, {}, {}
                r["baseline_calibration_s"] = timed(lambda: [base._settings(_weights(ac, p)) for p in PRESETS])[1]
                r["baseline_probes"] = {p: int(base._settings(_weights(ac, p))[0]) for p in PRESETS}
                r["baseline_candidates"] = {p: int(base.n_candidates(args.k, _weights(ac, p))) for p in PRESETS}
                r["s_per_query_8bit"] = {p: [] for p in PRESETS}
                indexes[name] = (index, base)
                log(f"  8-bit baseline: probes {r['baseline_probes']}, candidates {r['baseline_candidates']}")
        variants = ("twin", "8bit") if len(indexes) == 2 else ("twin",)
        for rnd in range(args.rounds):
            for name in (("small", "large") if rnd % 2 == 0 else ("large", "small")):
                for variant in (variants if rnd % 2 == 0 else variants[::-1]):
                    if name in indexes:
                        _use(acs[name], indexes[name][variant == "8bit"])
                    for p in PRESETS:
                        _, t = timed(lambda: acs[name].similar(xq, k=args.k, weights=p, search="approximate"))
                        r = res["sizes"][name]
                        r["s_per_query" if variant == "twin" else "s_per_query_8bit"][p].append(t / len(xq))
            log(f"round {rnd + 1}: " + "; ".join(
                f"{name} {v} " + ", ".join(f"{p} {r[key][p][-1] * 1e3:.2f} ms" for p in PRESETS)
                for name, r in res["sizes"].items()
                for v, key in (("twin", "s_per_query"), ("8-bit", "s_per_query_8bit")) if key in r))
        for name in indexes:
            _use(acs[name], indexes[name][0])
        m = min(args.recall_queries, len(xq))
        for name, ac in acs.items():
            r = res["sizes"][name]
            r["recall_at_10"], r["exact_s_per_query"] = {}, {}
            for p in PRESETS:
                exact, t = timed(lambda: ac.similar(xq[:m], k=args.k, weights=p, search="exact").indices)
                approx = ac.similar(xq[:m], k=args.k, weights=p, search="approximate").indices
                r["exact_s_per_query"][p] = t / m
                r["recall_at_10"][p] = _recall(approx, exact, args.k)
                if name in indexes:
                    _use(ac, indexes[name][1])
                    r.setdefault("recall_at_10_8bit", {})[p] = _recall(
                        ac.similar(xq[:m], k=args.k, weights=p, search="approximate").indices, exact, args.k)
                    _use(ac, indexes[name][0])
            log(f"{name}: recall@10 {r['recall_at_10']} (8-bit: {r.get('recall_at_10_8bit')}), "
                f"exact {r['exact_s_per_query']}")
            run = tmp / f"run-{name}"
            _, r["save_s"] = timed(lambda: ac.save(str(run)))
            r["index_files_bytes"] = sum(f.stat().st_size for f in run.iterdir() if f.name.startswith("index_"))
            loaded, r["load_s"] = timed(lambda: actclust.load(str(run), model, progress=False))
            got, r["loaded_first_call_s"] = timed(
                lambda: loaded.similar(xq[:10], k=args.k, weights="high", search="approximate").indices)
            r["loaded_same_neighbours"] = bool(np.array_equal(
                got, ac.similar(xq[:10], k=args.k, weights="high", search="approximate").indices))
            log(f"{name}: saved index files {r['index_files_bytes'] / 2**20:.0f} MiB, load {r['load_s']:.1f} s, "
                f"first call after load {r['loaded_first_call_s']:.2f} s, same neighbours {r['loaded_same_neighbours']}")
            del loaded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    s, lg = res["sizes"]["small"], res["sizes"]["large"]
    res["ratio_large_over_small"] = {p: float(np.median(lg["s_per_query"][p]) / np.median(s["s_per_query"][p]))
                                     for p in PRESETS}
    res["min_recall_at_10"] = min(min(r["recall_at_10"].values()) for r in res["sizes"].values())
    if "s_per_query_8bit" in s and "s_per_query_8bit" in lg:
        res["ratio_large_over_small_8bit"] = {p: float(np.median(lg["s_per_query_8bit"][p])
                                                       / np.median(s["s_per_query_8bit"][p])) for p in PRESETS}
    res["bar_ratio_le_2_at_recall_ge_0.95"] = bool(max(res["ratio_large_over_small"].values()) <= 2
                                                   and res["min_recall_at_10"] >= 0.95)
    res["machine"]["load_average_end"] = os.getloadavg()
    print()
    print(f"| preset | {s['n']:,}: ms per query (median) | {lg['n']:,} | ratio | recall@10 {s['n']:,} / {lg['n']:,} |")
    print("|---|---|---|---|---|")
    for p in PRESETS:
        print(f"| {p} | {np.median(s['s_per_query'][p]) * 1e3:.2f} | {np.median(lg['s_per_query'][p]) * 1e3:.2f} | "
              f"{res['ratio_large_over_small'][p]:.2f} | {s['recall_at_10'][p]:.3f} / {lg['recall_at_10'][p]:.3f} |")
    if "ratio_large_over_small_8bit" in res:
        print(f"\n8-bit scan (no twin), same run | {s['n']:,} | {lg['n']:,} | ratio | recall@10")
        print("|---|---|---|---|---|")
        for p in PRESETS:
            print(f"| {p} | {np.median(s['s_per_query_8bit'][p]) * 1e3:.2f} | "
                  f"{np.median(lg['s_per_query_8bit'][p]) * 1e3:.2f} | {res['ratio_large_over_small_8bit'][p]:.2f} | "
                  f"{s['recall_at_10_8bit'][p]:.3f} / {lg['recall_at_10_8bit'][p]:.3f} |")
    print(f"\nbar (ratio <= 2 at recall@10 >= 0.95): {'passes' if res['bar_ratio_le_2_at_recall_ge_0.95'] else 'fails'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


def _use(ac, index) -> None:
    """Make ``index`` the one ``ac``'s approximate searches use."""
    ac.state_.cache["retrieval"]["retrieval", "approximate", "host"] = index


def _recall(found, exact, k) -> float:
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)]))


def _weights(ac, preset):
    from actclust.analysis.retrieval import check_args

    return check_args(ac.state_, 10, preset)[1]


def _key(ac, preset):
    from actclust.analysis.indexes import _key as key

    return key(_weights(ac, preset))


if __name__ == "__main__":
    sys.exit(main())
