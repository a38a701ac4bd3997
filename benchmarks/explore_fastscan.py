"""Exploration for issue 19: would 4-bit product-quantised codes scanned by faiss' fast-scan keep the
approximate search's query time flat from 100k to 1M training samples?

    python benchmarks/explore_fastscan.py                      # 100k and 1M (about 20 minutes on 2 cores)
    python benchmarks/explore_fastscan.py --small 20000 --large 100000   # a smoke run

The data, model and explainers of ``search_scale.py`` (the wide MLP, 1,792 values per sample, disk
store). Per size, the library's approximate index is built and calibrated as a user's first
``similar()`` calls do; then, **in the same process and over the same lists** (its centres, its
assignment of rows to lists, the lists it probes per preset), a second index holds each row as
4-bit PQ codes (``IndexIVFPQ``, one sub-quantiser per ``--dims-per-code`` values, not by residual, converted to
``IndexIVFPQFastScan``). A query takes the ``m`` best candidates by the PQ scores and re-ranks them
by exact distances read from the store. Reported per preset: the library's time per query (its
search only, no capture pass), and for ``m`` in ``--candidates`` the fast-scan time (search and
re-ranking) and recall@10 against exact search; and the fast-scan time at 1M over the library's time
at 100k (what the issue's bar compares) and over fast-scan's own at 100k.
Writes ``benchmarks/results/explore_fastscan.json``. Nothing here is used by the library yet.
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
from scale import LAYERS, PRESETS, Mixture, add_data_arguments, teacher_model  # noqa: E402

import actclust  # noqa: E402
from actclust.analysis import retrieval  # noqa: E402
from actclust.store.vectors import take  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fastscan_twin(index, dims_per_code: int):
    """The same lists as ``index`` (an ApproximateIndex), rows as 4-bit PQ codes, fast-scan."""
    import faiss

    ivf = faiss.extract_index_ivf(index.index)
    quantizer = faiss.IndexFlat(index.d, ivf.metric_type)
    quantizer.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    pq = faiss.IndexIVFPQ(quantizer, index.d, ivf.nlist, index.d // dims_per_code, 4, ivf.metric_type)
    pq.by_residual = False
    rng = np.random.default_rng(0)
    pq.train(index._index_rows(np.sort(rng.choice(index.n, min(index.n, 100_000), replace=False))))
    assign = np.empty(index.n, dtype=np.int64)
    invlists = ivf.invlists
    for i in range(ivf.nlist):
        size = invlists.list_size(i)
        if size:
            assign[faiss.rev_swig_ptr(invlists.get_ids(i), size).copy()] = i
    for start in range(0, index.n, 65536):
        stop = min(start + 65536, index.n)
        rows = index._index_rows(slice(start, stop))
        pq.add_core(stop - start, faiss.swig_ptr(rows), None,
                    faiss.swig_ptr(np.ascontiguousarray(assign[start:stop])))
    return faiss.IndexIVFPQFastScan(pq), (pq, quantizer)  # the twin uses their quantizer: keep them alive


def rerank(index, part, ids, w, k):
    """The ``k`` nearest of the candidates ``ids`` by exact weighted distances from the store."""
    ids = np.where(ids < 0, ids.max(1, keepdims=True), ids)
    total = np.zeros(ids.shape, np.float32)
    for j, l in enumerate(index.layers):
        if w[j] > 0:
            rows = take(index.train_vectors[l], ids)
            rows -= part[l][:, None, :]
            total += np.float32(w[j] / index.scales[j]) * np.einsum("bcd,bcd->bc", rows, rows)
    order = np.argsort(total, 1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1)


def main(argv=None) -> int:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--candidates", default="50,100,200")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dims-per-code", type=int, default=4, help="values per 4-bit PQ code (the row width must divide)")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explore_fastscan.json"))
    add_data_arguments(ap)  # what teacher_model() and Mixture read (scale.py's defaults)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)
    cands = [int(c) for c in args.candidates.split(",")]
    model = teacher_model(args)
    mix = Mixture(args.seed, args.separation)
    x, y = mix.sample("train", args.large)
    xq, _ = mix.sample("query", args.queries)
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
                       "load_average_start": os.getloadavg()}, "settings": vars(args), "sizes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="actclust-fastscan-", dir=args.tmp))
    try:
        for name, n in (("small", args.small), ("large", args.large)):
            ac = actclust.ActivationClustering(model, LAYERS, n_clusters=15, store=str(tmp / f"store-{name}"),
                                               progress=False, batch_size=1024)
            ac.fit(x[:n], y[:n])
            for p in PRESETS:
                ac.similar(xq[:10], k=args.k, weights=p, search="approximate")  # builds, calibrates
            st = ac.state_
            index = st.cache["retrieval"]["retrieval", "approximate", "host"]
            exact = retrieval._index(st, "exact")
            q = ac.query(xq, vectors=True)
            part = {l: np.ascontiguousarray(q.vectors[st.retrieval_key(l)], np.float32) for l in st.layers}
            t0 = time.perf_counter()
            twin, keep = fastscan_twin(index, args.dims_per_code)
            r = res["sizes"][name] = {"n": n, "lists": int(index.nlist), "codes": index.codes,
                                      "fastscan_build_s": time.perf_counter() - t0, "presets": {}}
            log(f"{name} (n = {n:,}): fast-scan twin built in {r['fastscan_build_s']:.0f} s")
            for p in PRESETS:
                w = retrieval.check_args(st, args.k, p)[1]
                truth = exact.search(part, args.k, w, shares=False)[0]
                nprobe = index._settings(w)[0]
                lib = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    got = index.search(part, args.k, w, shares=False)[0]
                    lib.append((time.perf_counter() - t0) / len(xq))
                out = {"probes": int(nprobe), "library_s_per_query": float(np.median(lib)),
                       "library_recall": float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got, truth)])),
                       "fastscan": {}}
                query = index._index_query(part, w)
                for m in cands:
                    ts = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        _, ids = twin.search(query, m, params=faiss.SearchParametersIVF(nprobe=nprobe))
                        top = rerank(index, part, ids, w, args.k)
                        ts.append((time.perf_counter() - t0) / len(xq))
                    out["fastscan"][m] = {"s_per_query": float(np.median(ts)), "recall": float(np.mean(
                        [len(set(a) & set(b)) / args.k for a, b in zip(top, truth)]))}
                r["presets"][p] = out
                log(f"  {p}: library {out['library_s_per_query'] * 1e3:.2f} ms (recall {out['library_recall']:.3f}); "
                    + ", ".join(f"fast-scan {m}: {v['s_per_query'] * 1e3:.2f} ms ({v['recall']:.3f})"
                                for m, v in out["fastscan"].items()))
            del ac, index, exact, twin, keep
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s, lg = res["sizes"]["small"], res["sizes"]["large"]
    res["ratios"] = {p: {"library_large_over_small": lg["presets"][p]["library_s_per_query"]
                         / s["presets"][p]["library_s_per_query"],
                         **{f"fastscan{m}_large_over_library_small": lg["presets"][p]["fastscan"][m]["s_per_query"]
                            / s["presets"][p]["library_s_per_query"] for m in cands},
                         **{f"fastscan{m}_large_over_fastscan_small": lg["presets"][p]["fastscan"][m]["s_per_query"]
                            / s["presets"][p]["fastscan"][m]["s_per_query"] for m in cands}} for p in PRESETS}
    res["machine"]["load_average_end"] = os.getloadavg()
    print("\n| preset | library 1M / 100k | " + " | ".join(f"fast-scan {m} at 1M: ms (recall), / library 100k, / own 100k"
                                                      for m in cands) + " |")
    print("|---|---|" + "---|" * len(cands))
    for p in PRESETS:
        rr, f = res["ratios"][p], lg["presets"][p]["fastscan"]
        print(f"| {p} | {rr['library_large_over_small']:.2f}x | " + " | ".join(
            f"{f[m]['s_per_query'] * 1e3:.2f} ({f[m]['recall']:.3f}), {rr[f'fastscan{m}_large_over_library_small']:.2f}x, "
            f"{rr[f'fastscan{m}_large_over_fastscan_small']:.2f}x" for m in cands) + " |")
    Path(args.out).write_text(json.dumps(res, indent=2))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
