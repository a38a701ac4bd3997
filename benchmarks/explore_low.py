"""Exploration (issue 9, item 4): a retrieval-only representation under which "low" means looks alike.

    python benchmarks/explore_low.py            # 60k reference images, 1,000 test queries: ~5 min on 2 cores
    python benchmarks/explore_low.py --quick    # 20k reference images, 500 queries

Why. Similar-sample search ranks training samples by ``D(x, t) = sum_l w_l ||v_l(x) - v_l(t)||^2 / s_l``
(``actclust.retrieval``; ``s_l = 2 * sum of variances`` of layer ``l`` over the reference set,
presets "low" = ``10 ** -t_i``, "high" = ``10 ** t_i``, "equal", normalised to sum 1). With the
default reducer ("mean", L2-normalised) the conv layers are channel averages that keep no spatial
layout, so "low" neighbours (weight on conv1) are not closer in pixels than "high" ones. Clustering
stays on those "mean" vectors; this script measures *retrieval-only* summaries stored beside them.

Setup: the benchmark CNN (``benchmarks/_common.fashion_cnn``: trained once, cached), layers conv1,
conv2 (4-D maps, hooked at the module outputs like actclust does), fc1, fc2 (dense). Own forward
hooks compute, per batch, the clustering vectors (channel means for conv, the output itself for
dense, each L2-normalised: actclust's defaults) and the spatial grids
``F.adaptive_avg_pool2d(map, g).flatten(1)`` for g in {2, 3, 4}. A candidate gives each conv layer
either its clustering vector or a grid, raw or L2-normalised (the flattened grid as one vector),
optionally projected by a fixed Gaussian random matrix (``N(0, 1/r)``, seed 0) to ``r`` dims, and
stored as float16 (the search itself computes in float32); dense layers always use their clustering
vector. Exact search (faiss ``IndexFlatL2`` over the blocks scaled by ``sqrt(w_l / s_l)``, which is
the same ranking as ``D``) for k = 10 neighbours of test queries among the reference images.

Columns: mean Euclidean pixel distance (pixels in [0, 1], as ``fashion_mnist.py``) between each
query and its 10 neighbours under "low", "equal", "high"; ``low<high``: share of queries whose low
neighbours are closer in pixels on average than their high neighbours; agreement: share of
neighbours whose DNN prediction equals the query's DNN prediction ("high", and "low" for context);
extra floats per sample stored beside the clustering vectors (and bytes at float16); search width:
floats per row of the similar-sample index (the cost of exact search grows with it); extra time: the
summary's own ops (grid pooling, L2, projection, float16 copy) on captured conv maps, as a share of
one plain forward pass over the same batches of 256 test images (see ``timing``: each piece timed
separately, fastest of ``--repeats`` runs, because the 2 cores are shared and whole passes are too
noisy); ``fp16 recall``: top-10 overlap of "low" neighbours with float16 against float32 storage.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import RESULTS, fashion_cnn

from actclust.datasets import load_fashion_mnist
from actclust.analysis.retrieval import layer_scales, layer_weights

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
CONV = ["conv1", "conv2"]
GRIDS = (2, 3, 4)
BATCH = 256
K = 10
PRESETS = ("low", "equal", "high")


def _l2(v):
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def capture(model, x: np.ndarray, grids=GRIDS) -> dict:
    """Clustering vectors (``<layer>/mean``) and raw grids (``<conv>/grid<g>``), float32 numpy."""
    out: dict[str, list] = {}

    def hook(name):
        def fn(_, __, t):
            t = t.detach()
            if t.ndim == 4:
                out.setdefault(f"{name}/mean", []).append(_l2(t.flatten(2).mean(2)).numpy())
                for g in grids:
                    out.setdefault(f"{name}/grid{g}", []).append(F.adaptive_avg_pool2d(t, g).flatten(1).numpy())
            else:
                out.setdefault(f"{name}/mean", []).append(_l2(t).numpy())
        return fn

    handles = [getattr(model, l).register_forward_hook(hook(l)) for l in LAYERS]
    try:
        with torch.no_grad():
            for batch in torch.from_numpy(x).split(BATCH):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate(v) for k, v in out.items()}


def projection(d_in: int, r: int, layer: str) -> np.ndarray:
    rng = np.random.default_rng([0, LAYERS.index(layer), d_in, r])
    return (rng.standard_normal((d_in, r)) / np.sqrt(r)).astype(np.float32)


def summary(feats: dict, layer: str, spec: dict, dtype=np.float16) -> np.ndarray:
    """One layer's retrieval vectors for a candidate spec ``{"grid": g|None, "l2": bool, "proj": r|None}``."""
    if layer not in CONV or spec.get("grid") is None:
        return feats[f"{layer}/mean"]  # the clustering vector itself (float32, as stored today)
    v = feats[f"{layer}/grid{spec['grid']}"]
    if spec.get("l2", True):
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    if spec.get("proj"):
        v = v @ projection(v.shape[1], spec["proj"], layer)
    return v.astype(dtype).astype(np.float32)  # stored at ``dtype``, searched in float32


def candidates() -> list:
    """(name, {conv layer: spec}); dense layers always use their clustering vector."""
    base = {"grid": None}
    out = [("baseline: mean (clustering vectors)", {"conv1": base, "conv2": base})]
    for g in GRIDS:
        for l2 in (True, False):
            s = {"grid": g, "l2": l2}
            out.append((f"grid{g}{' l2' if l2 else ' raw'} both conv", {"conv1": s, "conv2": s}))
    for g in GRIDS:
        out.append((f"grid{g} l2 conv1 only (conv2 mean)", {"conv1": {"grid": g, "l2": True}, "conv2": base}))
    out.append(("conv1 grid4 l2 + conv2 grid2 l2", {"conv1": {"grid": 4, "l2": True}, "conv2": {"grid": 2, "l2": True}}))
    out.append(("conv1 grid3 l2 + conv2 grid2 l2", {"conv1": {"grid": 3, "l2": True}, "conv2": {"grid": 2, "l2": True}}))
    for g, r in ((3, 64), (3, 128), (4, 64), (4, 128)):
        s = {"grid": g, "l2": True, "proj": r}
        out.append((f"grid{g} l2 -> random {r} both conv", {"conv1": s, "conv2": s}))
    for g, r in ((3, 64), (4, 64), (4, 128)):
        out.append((f"grid{g} l2 -> random {r} conv1 only (conv2 mean)",
                    {"conv1": {"grid": g, "l2": True, "proj": r}, "conv2": base}))
    out.append(("grid4 raw conv1 only (conv2 mean)", {"conv1": {"grid": 4, "l2": False}, "conv2": base}))
    for r in (64, 128):
        s = {"grid": 4, "l2": False, "proj": r}
        out.append((f"grid4 raw -> random {r} both conv", {"conv1": s, "conv2": s}))
    out.append(("grid4 raw -> random 64 conv1 only (conv2 mean)",
                {"conv1": {"grid": 4, "l2": False, "proj": 64}, "conv2": base}))
    return out


def scaled(blocks: dict, scales: dict, weights: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.hstack([blocks[l] * np.float32(np.sqrt(w / scales[l]))
                                           for l, w in zip(LAYERS, weights)]), dtype=np.float32)


def neighbours(train_blocks: dict, query_blocks: dict, weights, k: int = K) -> np.ndarray:
    import faiss

    scales = layer_scales(train_blocks)
    w = layer_weights(weights, LAYERS)
    index = faiss.IndexFlatL2(sum(v.shape[1] for v in train_blocks.values()))
    index.add(scaled(train_blocks, scales, w))
    _, idx = index.search(scaled(query_blocks, scales, w), k)
    return idx


def pixel_distances(idx, xq, xr) -> np.ndarray:
    """Per query, mean Euclidean pixel distance to its neighbours."""
    q = xq.reshape(len(xq), 1, -1)
    return np.sqrt(((xr.reshape(len(xr), -1)[idx] - q) ** 2).sum(2)).mean(1)


def timing(model, x: np.ndarray, specs: list, repeats: int) -> dict:
    """Seconds per batch of ``BATCH`` images: a plain forward pass, the clustering reduction, each spec's extra ops.

    The cores are shared with other processes, so whole hooked passes time too noisily to resolve a
    few percent. Instead the work is timed piece by piece on the same batches: the plain forward
    pass, the reduction to the clustering vectors (what actclust's hooks do today: channel means,
    L2, copy to numpy) and, per spec, only its extra ops on the captured conv maps (grid pooling,
    L2, projection, float16 copy); each piece keeps its fastest of ``repeats`` runs per batch (the
    uncontended time), summed over the batches.
    """
    batches = list(torch.from_numpy(x[: 8 * BATCH]).split(BATCH))
    maps = []
    with torch.no_grad():
        for b in batches:
            got = {}
            hs = [getattr(model, l).register_forward_hook(lambda m, i, o, l=l: got.__setitem__(l, o.detach().clone()))
                  for l in LAYERS]
            model(b)
            for h in hs:
                h.remove()
            maps.append(got)
    projs = {}

    def clustering(got):
        for l in LAYERS:
            t = got[l]
            _l2(t.flatten(2).mean(2) if t.ndim == 4 else t).numpy().copy()

    def extra(got, spec):
        for l in CONV:
            s = spec[l]
            if s.get("grid") is None:
                continue
            v = F.adaptive_avg_pool2d(got[l], s["grid"]).flatten(1)
            if s.get("l2", True):
                v = _l2(v)
            if s.get("proj"):
                key = (l, v.shape[1], s["proj"])
                if key not in projs:
                    projs[key] = torch.from_numpy(projection(v.shape[1], s["proj"], l))
                v = v @ projs[key]
            v.to(torch.float16).numpy().copy()

    plan = [("plain", lambda j: model(batches[j])), ("clustering", lambda j: clustering(maps[j]))]
    plan += [(str(i), (lambda j, s=s: extra(maps[j], s))) for i, s in enumerate(specs)]
    best = {name: np.full(len(batches), np.inf) for name, _ in plan}
    with torch.no_grad():
        for b in batches:
            model(b)  # warm-up
        for _ in range(repeats):
            for name, fn in plan:
                for j in range(len(batches)):
                    start = time.perf_counter()
                    fn(j)
                    best[name][j] = min(best[name][j], time.perf_counter() - start)
    return {name: float(v.sum()) / len(batches) for name, v in best.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k reference images, 500 queries")
    ap.add_argument("--n-ref", type=int, default=60_000)
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=15, help="timing repeats (fastest per batch)")
    ap.add_argument("--out", default=str(RESULTS / "explore_low.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n_ref, args.n_queries, args.repeats = 20_000, 500, 10
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = fashion_cnn().eval()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    rng = np.random.default_rng(0)
    ref = np.sort(rng.choice(len(x_tr), args.n_ref, replace=False)) if args.n_ref < len(x_tr) else np.arange(len(x_tr))
    qi = np.sort(rng.choice(len(x_te), args.n_queries, replace=False))
    xr, xq = x_tr[ref], x_te[qi]

    feats_r = capture(model, xr)
    feats_q = capture(model, xq)
    with torch.no_grad():
        pred_r = torch.cat([model(b).argmax(1) for b in torch.from_numpy(xr).split(BATCH)]).numpy()
        pred_q = torch.cat([model(b).argmax(1) for b in torch.from_numpy(xq).split(BATCH)]).numpy()
    print(f"captured {len(xr)} reference and {len(xq)} query images in {time.perf_counter() - t0:.0f} s", flush=True)

    import faiss
    faiss.omp_set_num_threads(torch.get_num_threads())
    pix = faiss.IndexFlatL2(784)
    pix.add(np.ascontiguousarray(xr.reshape(len(xr), -1)))
    _, raw_idx = pix.search(np.ascontiguousarray(xq.reshape(len(xq), -1)), K)
    raw = {"pixel_distance": float(pixel_distances(raw_idx, xq, xr).mean()),
           "agreement": float((pred_r[raw_idx] == pred_q[:, None]).mean())}

    rows = []
    for name, spec in candidates():
        blocks_r = {l: summary(feats_r, l, spec.get(l, {})) for l in LAYERS}
        blocks_q = {l: summary(feats_q, l, spec.get(l, {})) for l in LAYERS}
        per_query, agree, idxs = {}, {}, {}
        for preset in PRESETS:
            idx = neighbours(blocks_r, blocks_q, preset)
            idxs[preset] = idx
            per_query[preset] = pixel_distances(idx, xq, xr)
            agree[preset] = float((pred_r[idx] == pred_q[:, None]).mean())
        extra = sum(blocks_r[l].shape[1] for l in CONV if spec[l].get("grid") is not None)
        row = {"name": name, "spec": spec,
               "pixel_distance": {p: float(per_query[p].mean()) for p in PRESETS},
               "low_closer_than_high_share": float((per_query["low"] < per_query["high"]).mean()),
               "agreement": agree, "extra_floats": extra, "extra_bytes_fp16": 2 * extra,
               "dims": {l: int(blocks_r[l].shape[1]) for l in LAYERS}}
        if extra:
            # float16 against float32 storage of the same summaries: top-10 overlap under "low"
            b32 = {l: summary(feats_r, l, spec.get(l, {}), np.float32) for l in LAYERS}
            q32 = {l: summary(feats_q, l, spec.get(l, {}), np.float32) for l in LAYERS}
            i32 = neighbours(b32, q32, "low")
            row["fp16_recall_low"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(idxs["low"], i32)]))
        rows.append(row)
        print(f"{name:<40} low {row['pixel_distance']['low']:.3f} equal {row['pixel_distance']['equal']:.3f} "
              f"high {row['pixel_distance']['high']:.3f}  agree(high) {agree['high']:.4f}", flush=True)

    specs = [r["spec"] for r in rows[1:]]
    t = timing(model, x_te, specs, args.repeats)
    for i, r in enumerate(rows):
        key = "clustering" if i == 0 else str(i - 1)
        r["extra_time_over_forward"] = 0.0 if i == 0 else t[key] / t["plain"]
    base_high = rows[0]["pixel_distance"]["high"]

    print()
    print(f"Fashion-MNIST CNN, {len(xr)} reference (training) images, {len(xq)} test queries, k = {K}; "
          f"pixel distances: mean Euclidean, pixels in [0, 1]; raw-pixel neighbours {raw['pixel_distance']:.3f} "
          f"(agreement {raw['agreement']:.4f}); per batch of {BATCH}: plain forward {1e3 * t['plain']:.2f} ms, "
          f"reduction to the clustering vectors {1e3 * t['clustering']:.2f} ms "
          f"({t['clustering'] / t['plain']:.3f} of the forward pass)")
    print()
    print("| conv-layer retrieval summary | low px | equal px | high px | low<high (share) | low < baseline high "
          "| agree high | agree low | extra floats (fp16 bytes) | search width (x baseline) | extra time / fwd "
          "| fp16 recall (low) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    width0 = sum(rows[0]["dims"].values())
    for r in rows:
        p, a = r["pixel_distance"], r["agreement"]
        print(f"| {r['name']} | {p['low']:.3f} | {p['equal']:.3f} | {p['high']:.3f} | "
              f"{r['low_closer_than_high_share']:.2f} | {'yes' if p['low'] < base_high else 'no'} | "
              f"{a['high']:.4f} | {a['low']:.4f} | {r['extra_floats']} ({r['extra_bytes_fp16']} B) | "
              f"{sum(r['dims'].values())} ({sum(r['dims'].values()) / width0:.2f}) | "
              f"{r['extra_time_over_forward']:+.3f} | {r.get('fp16_recall_low', float('nan')):.4f} |")
    result = {"benchmark": "explore_low", "machine": {"platform": platform.platform(),
                                                      "cpus": torch.get_num_threads(), "torch": torch.__version__},
              "n_reference": int(len(xr)), "n_queries": int(len(xq)), "k": K, "layers": LAYERS,
              "raw_pixels": raw, "timing_s": t, "rows": rows, "seconds": time.perf_counter() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
