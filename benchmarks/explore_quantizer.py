"""Exploration: how an approximate index past 4,096 lists finds the lists to probe, flat or through a graph.

    python benchmarks/explore_quantizer.py                   # 1M rows (about 7 minutes on 2 cores)
    python benchmarks/explore_quantizer.py --n 200000        # a smoke run

Why. An index of many lists (:data:`actclust.analysis.indexes.HNSW_LISTS` and more) finds the lists
of its rows and of its queries through an HNSW graph over the lists' centres (a flat search of a
million rows against 10,000 centres would take minutes). On random centres of this shape the graph
costs several times a flat search of the centres (one matrix product for a batch of queries), which
suggested searching them flat at query time. This measures both in the same process on the same
index, the whole ``similar()`` call as a user pays it, and the centre search alone on random
(unclustered) centres, where a graph does worst. Finding (``results/explore_quantizer.json``, the
index built as the library did before, with the graph): at 1M rows the flat search took 4.92 ms per
query against 5.40 through the graph, faster in each of three rounds (an earlier run on an index
built flat: 5.15 against 5.10, equal within noise). The scan of the probed lists is over 90% of the
call either way; on the real, clustered centres the graph costs far less than on random ones
(2.24 ms alone). The library now searches the centres flat below 32,768 lists
(:data:`actclust.analysis.indexes.GRAPH_QUERY_LISTS`).

What it does: the wide MLP and Gaussian mixture of ``scale.py`` / ``search_scale.py`` (1,792 floats
per sample), one explainer fitted on ``--n`` samples (defaults, 15 clusters, store on disk);
the first approximate ``similar`` call with the "low" weights builds the index and calibrates it;
then ``--rounds`` timed calls over ``--queries`` held-out inputs with the centres searched flat,
the same with an HNSW graph (M = 32, efSearch as the library sets it: twice the lists probed, at
least 64) holding the same centres in the same order, alternating; recall@10 of each against the
exact search on 300 queries; the share of the faiss search in the call. Results: a table on stdout
and ``benchmarks/results/explore_quantizer.json``.
"""

from __future__ import annotations

import argparse
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
from scale import LAYERS, Mixture, add_data_arguments, teacher_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    import faiss

    import actclust

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default="low")
    add_data_arguments(ap)  # what teacher_model() and Mixture read (scale.py's defaults)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explore_quantizer.json"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)
    res = {"command": "python benchmarks/explore_quantizer.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
                       "load_average_start": os.getloadavg()}, "settings": vars(args)}
    model = teacher_model(args)
    mix = Mixture(args.seed, args.separation)
    x, y = mix.sample("train", args.n)
    xq, _ = mix.sample("query", args.queries)
    tmp = Path(tempfile.mkdtemp(prefix="actclust-quantizer-", dir=args.tmp))
    try:
        ac = actclust.ActivationClustering(model, LAYERS, n_clusters=15, store=str(tmp / "store"), progress=False,
                                           batch_size=1024).fit(x, y)
        t = time.perf_counter()
        ac.similar(xq[:10], k=10, weights=args.weights, search="approximate")
        res["first_call_s"] = time.perf_counter() - t
        index = ac.state_.cache["retrieval"]["retrieval", "approximate", "host"]
        nprobe, rerank = next(iter(index.settings.values()))
        built = faiss.downcast_index(index.index.quantizer)
        storage = faiss.downcast_index(built.storage) if isinstance(built, faiss.IndexHNSW) else built
        centres = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)
        flat = faiss.IndexFlat(storage.d, storage.metric_type)
        flat.add(np.ascontiguousarray(centres))
        if isinstance(built, faiss.IndexHNSW):
            graph = built
        else:  # fewer lists than HNSW_LISTS (a smoke run): a graph over the same centres, as the library builds it
            graph = faiss.IndexHNSWFlat(storage.d, 32, storage.metric_type)
            graph.add(np.ascontiguousarray(centres))
        res["index"] = {"lists": int(index.nlist), "codes": index.codes, "built_with": type(built).__name__,
                        "nprobe": int(nprobe), "rerank": int(rerank), "d": int(index.d)}
        exact = ac.similar(xq[:300], k=10, weights=args.weights, search="exact").indices
        quantizers = {"flat": flat, "graph": graph}
        res["ms_per_query"] = {q: [] for q in quantizers}
        res["faiss_share"] = {q: [] for q in quantizers}
        real_search = type(index.index).search

        for rnd in range(args.rounds):
            for name in (("flat", "graph") if rnd % 2 == 0 else ("graph", "flat")):
                index.index.quantizer = quantizers[name]
                spent = []

                def timed_search(self, *a, **k):
                    t0 = time.perf_counter()
                    try:
                        return real_search(self, *a, **k)
                    finally:
                        spent.append(time.perf_counter() - t0)
                type(index.index).search = timed_search
                try:
                    t = time.perf_counter()
                    ac.similar(xq, k=10, weights=args.weights, search="approximate")
                    s = time.perf_counter() - t
                finally:
                    type(index.index).search = real_search
                res["ms_per_query"][name].append(s / len(xq) * 1e3)
                res["faiss_share"][name].append(sum(spent) / s)
            print(f"round {rnd + 1}: " + ", ".join(f"{q} {v[-1]:.2f} ms" for q, v in res["ms_per_query"].items()),
                  flush=True)
        res["recall_at_10"] = {}
        for name, q in quantizers.items():
            index.index.quantizer = q
            got = ac.similar(xq[:300], k=10, weights=args.weights, search="approximate").indices
            res["recall_at_10"][name] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]))
        index.index.quantizer = built
        # the centre search alone, on random centres of the same shape (no clusters for a graph to follow)
        rng = np.random.default_rng(args.seed)
        rand = rng.standard_normal((int(index.nlist), int(index.d)), dtype=np.float32)
        qs = rng.standard_normal((args.queries, int(index.d)), dtype=np.float32)
        alone = {}
        rf = faiss.IndexFlatIP(rand.shape[1])
        rf.add(rand)
        t = time.perf_counter()
        rf.search(qs, nprobe)
        alone["flat"] = (time.perf_counter() - t) / len(qs) * 1e3
        rg = faiss.IndexHNSWFlat(rand.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        rg.add(rand)
        rg.hnsw.efSearch = max(2 * nprobe, 64)
        t = time.perf_counter()
        rg.search(qs, nprobe)
        alone["graph"] = (time.perf_counter() - t) / len(qs) * 1e3
        res["random_centres_search_ms_per_query"] = alone
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["machine"]["load_average_end"] = os.getloadavg()
    print(f"\n{res['index']['lists']:,} lists of {res['index']['d']} values, {nprobe} probed, "
          f"{args.weights} weights, n = {args.n:,}\n")
    print("| centres searched | ms per query (median) | faiss share of the call | recall@10 "
          "| random centres alone, ms |")
    print("|---|---|---|---|---|")
    for name in quantizers:
        print(f"| {name} | {np.median(res['ms_per_query'][name]):.2f} | {np.median(res['faiss_share'][name]):.2f} | "
              f"{res['recall_at_10'][name]:.3f} | {alone[name]:.2f} |")
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
