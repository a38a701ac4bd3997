"""Exploration: one shared similar-sample index for all weight presets, and approximate search.

    python benchmarks/explore_ann.py                          # 10k..300k: ~7 min on 2 cores, peak RSS 6.4 GB
    python benchmarks/explore_ann.py --sizes 1000000 --append # adds 1M to the JSON (streamed; exact and
                                                              # IVF-fp16 only): ~3.5 min, peak RSS 4 GB
    python benchmarks/explore_ann.py --quick                  # 5k and 20k, 500 queries: under a minute
    python benchmarks/explore_ann.py --vectors v.npz          # per-layer vectors saved from a real fit

Why. Similar-sample search ranks training samples by ``D(q, t) = sum_l w_l / s_l * ||q_l - t_l||^2``
and today builds one exact ``IndexFlatL2`` per weight preset over the weighted concatenation (a
full copy of the training vectors per preset). Every stored layer vector is unit length, so
``||q_l - t_l||^2 = 2 - 2 q_l.t_l`` and ``D = const(q) - 2 sum_l (w_l / s_l) q_l.t_l``: a
maximum-inner-product search over the UNWEIGHTED concatenation, with the query's layer blocks
scaled by ``c_l = w_l / s_l``, ranks exactly like the weighted L2 search. One index then serves
every preset (and custom weights); only the query changes. The same holds for any fixed per-block
rescaling of the stored data (the query takes the inverse); the shared index here stores the
scale-normalised blocks ``t_l / sqrt(s_l)`` and scales a query's blocks by ``w_l / sqrt(s_l)``,
because its partition (IVF) or graph (HNSW) then suits every preset, where one built on the
unweighted data loses recall for "low" (part 5). Where a block is not unit length (an all-zero
activation stays zero after normalisation; ``normalize=None``), appending per-layer columns
``||t_l||^2`` to the data and ``-c_l / 2`` to the query keeps the identity exact.

What it measures, on synthetic data shaped like actclust's stored vectors (four L2-normalised
blocks of widths 64/128/256/512 = 960 floats: a positive offset (as mean-reduced ReLU activations
have), 200 Dirichlet-weighted "class" components dominant in the deep blocks, 16 "style"
components dominant in the shallow ones, a 6-dimensional latent shared by all blocks and power-law
noise; ``DATA`` says how they compare with a ResNet-18's vectors, ``--data hard`` is an adversarial
setting), 1,000 queries from the same distribution, k = 10, faiss on 2 threads:

1. the identity: exact IndexFlatIP with scaled queries (unweighted and scale-normalised data)
   against IndexFlatL2 on weighted data (top-10 sets; differences checked in float64 to be float32
   ties), and the augmented form on data with zero blocks and unnormalised data against float64;
2. exact IndexFlatIP: build time, time per 1,000 queries, single-query latency;
3. IndexIVFFlat (inner product, nlist = 4 sqrt(n), the low end of faiss' 4..16 sqrt(n) advice,
   spherical k-means on 39 nlist sampled vectors, 10 iterations), nprobe swept: recall@10 against
   exact, time per 1,000 queries, build time and memory; the same inverted lists stored as fp16
   and 8-bit scalar codes (IndexIVFScalarQuantizer, same coarse quantizer);
4. IndexHNSWFlat (inner product, M = 32, efConstruction = 40), efSearch swept: same figures;
5. sharing: recall per preset of the shared scale-normalised index against a shared index on the
   unweighted data (spherical and plain k-means) and an index built per preset on its own
   weighted data (IVF at 100k, HNSW at 30k).

Sweeps stop once every preset reaches recall 0.995, and at nprobe = nlist / 2. The summary gives,
per n and preset, the smallest nprobe / efSearch reaching recall@10 >= 0.95, query-time ratios
across n (extrapolated to 1M as a power law from 100k and 300k where 1M was not run), and the n
below which exact search beats the cheapest setting reaching 0.95 for all three presets (1,000
queries per batch). Results go to ``results/explore_ann.json``. ``mem_mb`` counts codes, ids and
centroids (IVF) or vectors and links (HNSW); inverted lists grown by ``add`` may reserve up to 2x.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (64, 128, 256, 512)
PRESETS = ("equal", "low", "high")
K = 10
TARGET = 0.95
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EFS = (16, 32, 64, 128, 256, 512, 1024)
STOP = 0.995  # a sweep stops once every preset reaches this recall
HNSW_M = 32
CHUNK = 50_000
IP = faiss.METRIC_INNER_PRODUCT


# ---------------------------------------------------------------- synthetic data

DATA = {
    # Close to a ResNet-18 on Fashion-MNIST (layer1..layer4, mean reducer, 11k samples), where the
    # scales were 0.11/0.13/0.22/0.81 and the top-10 sets of equal/low, equal/high and low/high
    # shared 72%, 71% and 49%; these data give about 0.10/0.13/0.21/0.90 and 72%, 79% and 54%.
    # They are harder for approximate search than those vectors: at 11k, an IVF index of the
    # preset's own weighted data reaches recall 0.81 ("equal") and 0.53 ("low") at nprobe 8, where
    # the ResNet vectors reach 0.98, and HNSW at efSearch 16 0.85-0.90 where they reach 0.91-0.99.
    "calibrated": {"base": (3.5, 3.2, 2.5, 1.0), "cls": (0.4, 0.5, 0.6, 0.7), "style": (0.4, 0.3, 0.15, 0.05),
                   "noise": (0.1, 0.1, 0.1, 0.1), "shared": (0.6, 0.6, 0.6, 0.6), "zdim": 6},
    # Adversarial: shallow blocks carry only "style", deep ones only "class", independent noise;
    # low/high top-10 sets share about 7%, so no single partition of the data suits every preset.
    "hard": {"base": (3.0, 2.5, 1.8, 1.0), "cls": (0.2, 0.35, 0.5, 0.7), "style": (0.8, 0.6, 0.35, 0.15),
             "noise": (1.0, 1.0, 1.0, 1.0), "shared": (0.0, 0.0, 0.0, 0.0), "zdim": 8},
}


class Synth:
    """Per block: offset + class mean + style mean + shared latent + power-law noise, L2-normalised.

    Every sample draws a class (200, Dirichlet-weighted), a style (16) and a low-dimensional latent
    ``z`` shared by all blocks (what makes a sample's neighbours agree across layers), and, per
    block, noise with eigenvalues ~ 1/i in a random rotation. The positive offset makes blocks
    point mostly one way, as mean-reduced ReLU activations do, so the per-layer scales are small.
    """

    def __init__(self, seed=0, n_classes=200, n_styles=16, widths=WIDTHS, base=(), cls=(), style=(), noise=(),
                 shared=(), zdim=8):
        rng = np.random.default_rng(seed)
        self.widths, self.n_classes, self.n_styles, self.zdim = widths, n_classes, n_styles, zdim
        self.params = {"seed": seed, "n_classes": n_classes, "n_styles": n_styles, "widths": widths, "base": base,
                       "cls": cls, "style": style, "noise": noise, "shared": shared, "zdim": zdim,
                       "noise_spectrum": "lambda_i ~ 1/i, random rotation"}
        self.p_class = rng.dirichlet(np.full(n_classes, 2.0))
        self.p_style = rng.dirichlet(np.full(n_styles, 2.0))
        self.blocks = []
        for w, b, a, g, s, h in zip(widths, base, cls, style, noise, shared):
            offset = np.abs(rng.standard_normal(w))
            lam = 1.0 / np.arange(1, w + 1)
            lam *= s * s / lam.sum()
            rot, _ = np.linalg.qr(rng.standard_normal((w, w)))
            self.blocks.append({
                "offset": (b * offset / np.linalg.norm(offset)).astype(np.float32),
                "mu": (rng.standard_normal((n_classes, w)) / np.sqrt(w) * a).astype(np.float32),
                "nu": (rng.standard_normal((n_styles, w)) / np.sqrt(w) * g).astype(np.float32),
                "proj": (np.sqrt(lam)[:, None] * rot.T).astype(np.float32),
                "zproj": (rng.standard_normal((zdim, w)) / np.sqrt(zdim * w) * h).astype(np.float32)})
        self.dim = sum(widths)
        self.bounds = np.cumsum((0,) + tuple(widths))

    def _sample(self, n, seed):
        rng = np.random.default_rng(seed)
        c = rng.choice(self.n_classes, n, p=self.p_class)
        s = rng.choice(self.n_styles, n, p=self.p_style)
        z = rng.standard_normal((n, self.zdim), dtype=np.float32)
        x = np.empty((n, self.dim), np.float32)
        for (lo, hi), blk in zip(zip(self.bounds[:-1], self.bounds[1:]), self.blocks):
            v = rng.standard_normal((n, hi - lo), dtype=np.float32) @ blk["proj"]
            v += blk["offset"]
            v += blk["mu"][c]
            v += blk["nu"][s]
            v += z @ blk["zproj"]
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            x[:, lo:hi] = v
        return x

    def chunks(self, n, seed):
        """Training data in deterministic chunks (the first m rows are the same for every n >= m)."""
        for i, start in enumerate(range(0, n, CHUNK)):
            yield self._sample(min(CHUNK, n - start), seed * 100_003 + i)

    def train(self, n, seed=1):
        x = np.empty((n, self.dim), np.float32)
        o = 0
        for part in self.chunks(n, seed):
            x[o:o + len(part)] = part
            o += len(part)
        return x

    def queries(self, n, seed=7):
        return self._sample(n, 10_000_019 + seed)


class Stored:
    """Per-layer vectors saved from a fitted model (``--vectors``: an .npz of 2-D arrays, one per layer in
    order, e.g. ``ActivationClustering.train_vectors_``); the last ``n_queries`` rows are the queries."""

    def __init__(self, path, n_queries):
        z = np.load(path)
        keys = [k for k in z.files if z[k].ndim == 2]
        x = np.hstack([z[k].astype(np.float32) for k in keys])
        self.widths = tuple(z[k].shape[1] for k in keys)
        self.dim, self.bounds = x.shape[1], np.cumsum((0,) + self.widths)
        self._x, self._q = x[:-n_queries], x[-n_queries:]
        self.n = len(self._x)
        self.params = {"vectors": str(path), "layers": keys, "n_train": self.n, "n_queries": n_queries}

    def chunks(self, n, seed):
        for start in range(0, n, CHUNK):
            yield self._x[start:min(n, start + CHUNK)].copy()

    def train(self, n, seed=1):
        return self._x[:n].copy()

    def queries(self, n, seed=7):
        return self._q[:n].copy()


def preset_weights(name, n_layers):
    depth = np.arange(n_layers) / max(n_layers - 1, 1)
    w = {"equal": np.ones(n_layers), "low": 10.0 ** -depth, "high": 10.0 ** depth}[name]
    return w / w.sum()


def layer_scales(chunks, bounds):
    """``2 * sum of variances`` per block (actclust's s_l), float64, streamed."""
    s1 = s2 = None
    n = 0
    for x in chunks:
        x64 = x.astype(np.float64)
        s1 = x64.sum(0) if s1 is None else s1 + x64.sum(0)
        s2 = (x64 ** 2).sum(0) if s2 is None else s2 + (x64 ** 2).sum(0)
        n += len(x)
    var = s2 / n - (s1 / n) ** 2
    return np.array([max(2.0 * var[lo:hi].sum(), 1e-12) for lo, hi in itertools.pairwise(bounds)])


def scale_blocks(x, factors, bounds):
    y = np.array(x, dtype=np.float32, copy=True)
    for f, lo, hi in zip(factors, bounds[:-1], bounds[1:]):
        y[:, lo:hi] *= np.float32(f)
    return y


# ---------------------------------------------------------------- helpers

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, min_total=0.3, max_rep=3):
    """(result, best seconds): repeats short calls (up to ``max_rep``) and keeps the fastest."""
    best, total, reps, out = math.inf, 0.0, 0, None
    while reps < max_rep and (reps == 0 or total < min_total):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best, total, reps = min(best, dt), total + dt, reps + 1
    return out, best


def recall(found, truth):
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def single_query_ms(index, q, n=30):
    t = time.perf_counter()
    for i in range(n):
        index.search(q[i:i + 1], K)
    return (time.perf_counter() - t) / n * 1e3


def ivf_bytes(ivf):
    lists = sum(ivf.invlists.list_size(i) for i in range(ivf.nlist))
    return lists * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4


def hnsw_bytes(h):
    g = h.hnsw
    return h.ntotal * h.d * 4 + g.neighbors.size() * 4 + g.levels.size() * 4 + g.offsets.size() * 8


def train_ivf(xtrain, nlist, spherical=True):
    d = xtrain.shape[1]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, IP)
    ivf.cp.spherical = spherical
    ivf.cp.niter = 10
    t = time.perf_counter()
    ivf.train(xtrain)
    return ivf, time.perf_counter() - t


def assign(ivf, x):
    _, a = ivf.quantizer.search(x, 1)
    return np.ascontiguousarray(a.ravel(), dtype=np.int64)


def add_preassigned(index, x, a):
    x = np.ascontiguousarray(x, dtype=np.float32)
    index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(a))


def sq_like(ivf, qtype, xtrain):
    idx = faiss.IndexIVFScalarQuantizer(faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, qtype, IP)
    t = time.perf_counter()
    idx.train(xtrain)  # the quantizer is trained already: only the scalar quantizer's ranges
    return idx, time.perf_counter() - t


def sweep(index, param, values, queries, truth, time_it=True):
    """recall and seconds per 1,000 queries for each value of ``param`` and each preset."""
    rows = []
    for v in values:
        if param == "nprobe":
            if v > index.nlist // 2:  # scanning half the lists: exact search is cheaper
                break
            index.nprobe = v
        else:
            index.hnsw.efSearch = v
        row = {param: v}
        for p in PRESETS:
            (_, found), sec = timed(lambda p=p: index.search(queries[p], K)) if time_it else \
                ((None, index.search(queries[p], K)[1]), float("nan"))
            row[p] = {"recall": recall(found, truth[p]), "s_per_1000": sec * 1000 / len(queries[p])}
        rows.append(row)
        if all(row[p]["recall"] >= STOP for p in queries):
            break
    return rows


def smallest(rows, param, preset=None, target=TARGET):
    """Smallest setting whose recall (for ``preset`` or for all presets) reaches ``target``."""
    for r in rows:
        ok = r[preset]["recall"] >= target if preset else all(r[p]["recall"] >= target for p in PRESETS)
        if ok:
            return {param: r[param], "s_per_1000": max(r[p]["s_per_1000"] for p in PRESETS),
                    "recall_min": min(r[p]["recall"] for p in PRESETS)}
    return None


# ---------------------------------------------------------------- the parts

def identity_check(x, xq, scales, bounds):
    """Exact L2 on weighted data (today) vs exact IP with scaled queries on the unweighted data and on
    the scale-normalised data: top-10 sets, differences checked in float64 to be ties."""
    out = {}
    for p in PRESETS:
        c = preset_weights(p, len(bounds) - 1) / scales
        xw = scale_blocks(x, np.sqrt(c), bounds)
        flat = faiss.IndexFlatL2(x.shape[1])
        flat.add(xw)
        _, i_l2 = flat.search(scale_blocks(xq, np.sqrt(c), bounds), K)
        del flat, xw
        xs = scale_blocks(x, 1 / np.sqrt(scales), bounds)
        forms = {"ip_unweighted": faiss.knn(scale_blocks(xq, c, bounds), x, K, metric=IP)[1],
                 "ip_scale_normalised": faiss.knn(scale_blocks(xq, c * np.sqrt(scales), bounds), xs, K, metric=IP)[1]}
        del xs
        out[p] = {}
        # float32 rounding of ||q||^2 + ||t||^2 - 2 q.t (both forms expand it) is ~1e-7 of sum_l 2 c_l
        tol = 1e-5 * 2 * c.sum()
        for form, i_ip in forms.items():
            differ, non_ties, worst, ip_right, l2_right = 0, 0, 0.0, 0, 0
            for qi in range(len(xq)):
                a, b = set(i_l2[qi]), set(i_ip[qi])
                if a == b:
                    continue
                differ += 1
                cand = np.array(sorted(a | b))
                diff = (x[cand].astype(np.float64) - xq[qi].astype(np.float64)) ** 2
                d64 = np.array([diff[:, lo:hi].sum(1) for lo, hi in itertools.pairwise(bounds)]).T @ c
                kth = np.sort(d64)[K - 1]
                best = set(cand[np.argsort(d64)[:K]])
                ip_right += best == b
                l2_right += best == a
                swapped = np.array([j in (a ^ b) for j in cand])
                gap = float(np.max(np.abs(d64[swapped] - kth)))
                worst = max(worst, gap / (2 * c.sum()))
                non_ties += gap > tol
            out[p][form] = {"queries_with_different_top10": differ, "non_tie_differences": int(non_ties),
                            "max_gap_to_kth_over_2sum_c": worst, "float64_agrees_with_ip": int(ip_right),
                            "float64_agrees_with_l2": int(l2_right), "recall_vs_l2": recall(i_ip, i_l2)}
    return out


def augmented_check(synth, n=20_000, nq=300, seed=3):
    """Zero blocks and unnormalised blocks: plain IP trick vs IP with ||t_l||^2 columns, vs float64."""
    rng = np.random.default_rng(seed)
    b = synth.bounds
    L = len(b) - 1
    n, nq = min(n, getattr(synth, "n", n)), min(nq, len(synth.queries(nq, seed=seed)))
    base, q0 = synth.train(n, seed=seed), synth.queries(nq, seed=seed)
    cases = {}
    x = base.copy()
    x[rng.random(n) < 0.05, b[0]:b[1]] = 0.0  # dead layer: normalised zero stays zero
    x[rng.random(n) < 0.05, b[1]:b[2]] = 0.0
    cases["zero_blocks_5pct"] = (x, q0)
    norms = np.exp(rng.normal(0, 0.5, (n, L))).astype(np.float32)
    qn = np.exp(rng.normal(0, 0.5, (nq, L))).astype(np.float32)
    xu, qu = base.copy(), q0.copy()
    for l in range(L):
        xu[:, b[l]:b[l + 1]] *= norms[:, l:l + 1]
        qu[:, b[l]:b[l + 1]] *= qn[:, l:l + 1]
    cases["unnormalised"] = (xu, qu)
    out = {}
    for name, (x, q) in cases.items():
        scales = layer_scales([x], b)
        sq_t = np.stack([(x[:, lo:hi].astype(np.float64) ** 2).sum(1) for lo, hi in itertools.pairwise(b)], 1)
        xa = np.hstack([x, sq_t.astype(np.float32)])
        res = {}
        for p in PRESETS:
            c = preset_weights(p, L) / scales
            d64 = np.zeros((nq, n))
            for l, (lo, hi) in enumerate(itertools.pairwise(b)):
                xl, ql = x[:, lo:hi].astype(np.float64), q[:, lo:hi].astype(np.float64)
                d64 += c[l] * ((ql ** 2).sum(1)[:, None] + (xl ** 2).sum(1)[None] - 2 * ql @ xl.T)
            truth = np.argsort(d64, 1)[:, :K]
            qs = scale_blocks(q, c, b)
            _, plain = faiss.knn(qs, x, K, metric=IP)
            qa = np.hstack([qs, np.tile((-c / 2).astype(np.float32), (nq, 1))])
            _, aug = faiss.knn(qa, xa, K, metric=IP)
            res[p] = {"recall_plain_ip": recall(plain, truth), "recall_augmented_ip": recall(aug, truth)}
        out[name] = res
    return out


def exact_part(x, xq_scaled, chunks=None):
    """IndexFlatIP on the held data, or a streamed exact search over ``chunks`` (1M)."""
    if chunks is None:
        flat = faiss.IndexFlatIP(x.shape[1])
        _, build = timed(lambda: (flat.reset(), flat.add(x)), max_rep=1)
        truth, secs = {}, {}
        for p in PRESETS:
            (_, truth[p]), secs[p] = timed(lambda p=p: flat.search(xq_scaled[p], K))
        single = single_query_ms(flat, xq_scaled["equal"])
        del flat
        return truth, {"build_s": build, "s_per_1000": secs, "single_query_ms": single}
    best = {p: (np.full((len(xq_scaled[p]), K), -np.inf, np.float32),
                np.zeros((len(xq_scaled[p]), K), np.int64)) for p in PRESETS}
    secs = {p: 0.0 for p in PRESETS}
    o = 0
    for part in chunks:
        for p in PRESETS:
            t = time.perf_counter()
            d, i = faiss.knn(xq_scaled[p], part, K, metric=IP)
            secs[p] += time.perf_counter() - t
            dd, ii = np.hstack([best[p][0], d]), np.hstack([best[p][1], i + o])
            top = np.argsort(-dd, 1)[:, :K]
            best[p] = (np.take_along_axis(dd, top, 1), np.take_along_axis(ii, top, 1))
        o += len(part)
    return {p: best[p][1] for p in PRESETS}, {"build_s": None, "s_per_1000": secs, "single_query_ms": None,
                                              "note": "streamed faiss.knn over 50k chunks (no index copy)"}


def run_size(synth, n, nq, args, cmp_ivf, cmp_hnsw, log):
    """All measurements at one n. The shared index holds the scale-normalised data (block l times
    1 / sqrt(s_l)); a preset's query is block l times w_l / sqrt(s_l)."""
    b = synth.bounds
    L = len(b) - 1
    stream = n > args.hold_max
    t0 = time.perf_counter()
    x = None if stream else synth.train(n)
    scales = layer_scales(synth.chunks(n, 1) if stream else [x], b)
    dfac = 1 / np.sqrt(scales)
    xq = synth.queries(nq)
    xq_s = {p: scale_blocks(xq, preset_weights(p, L) / np.sqrt(scales), b) for p in PRESETS}
    res = {"n": n, "dim": synth.dim, "scales": scales.tolist(), "gen_s": time.perf_counter() - t0}
    log(f"n={n}: data {res['gen_s']:.1f}s, scales {np.round(scales, 3).tolist()}, rss {rss_mb():.0f} MB")
    if x is not None and n == args.identity_n:
        res["identity"] = identity_check(x, xq, scales, b)
        log(f"  identity: {res['identity']}")
    if x is not None:
        for f, lo, hi in zip(dfac, b[:-1], b[1:]):  # in place: the held data are now the shared index's
            x[:, lo:hi] *= np.float32(f)

    def main_chunks():
        for part in synth.chunks(n, 1):
            yield scale_blocks(part, dfac, b)

    truth, res["exact"] = exact_part(x, xq_s, main_chunks() if stream else None)
    log(f"  exact: {np.mean(list(res['exact']['s_per_1000'].values())):.2f}s/1000q")
    if x is not None:
        overlap = {f"{p}/{q}": recall(truth[p], truth[q]) for p, q in (("equal", "low"), ("equal", "high"), ("low", "high"))}
        res["preset_top10_overlap"] = overlap
        log(f"  top-10 overlap between presets: {overlap}")

    # IVF over the shared data: one coarse quantizer, lists stored as float32 / fp16 / 8-bit
    nlist = max(16, round(4 * math.sqrt(n)))
    ntrain = min(n, 39 * nlist)
    xtrain = (x[np.sort(np.random.default_rng(0).choice(n, ntrain, replace=False))] if x is not None
              else scale_blocks(synth.train(ntrain, seed=1), dfac, b))
    ivf, train_s = train_ivf(xtrain, nlist)
    # streamed (1M): fp16 lists only, float32 ones would not fit the memory budget
    variants = {} if stream else {"ivf_flat": ivf}
    for name, qt in (("ivf_sq_fp16", faiss.ScalarQuantizer.QT_fp16), ("ivf_sq8", faiss.ScalarQuantizer.QT_8bit)):
        if not stream or name == "ivf_sq_fp16":
            variants[name], _ = sq_like(ivf, qt, xtrain[:min(ntrain, 20_000)])
    assign_s = 0.0
    add_s = {k: 0.0 for k in variants}
    for part in (main_chunks() if stream else [x]):
        ta = time.perf_counter()
        a = assign(ivf, part)
        assign_s += time.perf_counter() - ta
        for name, idx in variants.items():
            ta = time.perf_counter()
            add_preassigned(idx, part, a)
            add_s[name] += time.perf_counter() - ta
    for name, idx in variants.items():
        sw = sweep(idx, "nprobe", NPROBES, xq_s, truth)
        res[name] = {"nlist": nlist, "train_n": ntrain, "train_s": train_s, "assign_s": assign_s,
                     "add_s": add_s[name], "build_s": train_s + assign_s + add_s[name],
                     "mem_mb": ivf_bytes(idx) / 2**20, "sweep": sw}
        if name in ("ivf_flat", "ivf_sq_fp16"):
            idx.nprobe = 32
            res[name]["single_query_ms_nprobe32"] = single_query_ms(idx, xq_s["equal"])
        log(f"  {name}: nlist {nlist}, build {res[name]['build_s']:.1f}s, {res[name]['mem_mb']:.0f} MB; " +
            ", ".join(f"np{r['nprobe']}:{min(r[p]['recall'] for p in PRESETS):.3f}/"
                      f"{np.mean([r[p]['s_per_1000'] for p in PRESETS]):.3f}s" for r in sw))
    variants.clear()
    del ivf, idx

    if x is not None and n == cmp_ivf:
        res["sharing_ivf"] = sharing_ivf(x, xq, xtrain, scales, nlist, truth, res["ivf_flat"]["sweep"], b, log)
    del xtrain

    # HNSW over the shared data
    if x is not None and n <= args.hnsw_max:
        h = faiss.IndexHNSWFlat(synth.dim, HNSW_M, IP)
        _, build = timed(lambda: h.add(x), max_rep=1)
        sw = sweep(h, "efSearch", EFS, xq_s, truth)
        h.hnsw.efSearch = 256
        res["hnsw"] = {"M": HNSW_M, "efConstruction": h.hnsw.efConstruction, "build_s": build,
                       "mem_mb": hnsw_bytes(h) / 2**20, "sweep": sw,
                       "single_query_ms_ef256": single_query_ms(h, xq_s["equal"])}
        log(f"  hnsw: build {build:.1f}s, {res['hnsw']['mem_mb']:.0f} MB; " +
            ", ".join(f"ef{r['efSearch']}:{min(r[p]['recall'] for p in PRESETS):.3f}/"
                      f"{np.mean([r[p]['s_per_1000'] for p in PRESETS]):.3f}s" for r in sw))
        del h
        if n == cmp_hnsw:
            res["sharing_hnsw"] = sharing_hnsw(x, xq, scales, truth, res["hnsw"]["sweep"], b, log)
    res["rss_mb"] = rss_mb()
    return res


def _recalls(rows, param):
    return [{param: r[param], **{p: round(r[p]["recall"], 4) for p in PRESETS if p in r}} for r in rows]


def sharing_ivf(x, xq, xtrain, scales, nlist, truth, shared_rows, b, log):
    """Recall per preset: the shared scale-normalised index (``x``, ``xtrain``) vs a shared index on the
    unweighted data vs one index per preset on its own weighted data (``dfac`` relative to raw data)."""
    L = len(b) - 1
    out = {"shared_scale_normalised": _recalls(shared_rows, "nprobe")}
    unweighted_q = {p: preset_weights(p, L) / scales for p in PRESETS}
    spaces = {"shared_unweighted_spherical": (np.ones(L), unweighted_q, True),
              "shared_unweighted_nonspherical": (np.ones(L), unweighted_q, False)}
    for p in PRESETS:
        cp = np.sqrt(preset_weights(p, L) / scales)
        spaces[f"own_index_{p}"] = (cp, {p: cp}, True)
    for name, (dfac, qfac, spherical) in spaces.items():
        rel = dfac * np.sqrt(scales)  # x and xtrain are scale-normalised already
        ivf, _ = train_ivf(scale_blocks(xtrain, rel, b), nlist, spherical)
        xs = scale_blocks(x, rel, b)
        add_preassigned(ivf, xs, assign(ivf, xs))
        del xs
        rows = sweep(ivf, "nprobe", NPROBES, {p: scale_blocks(xq, f, b) for p, f in qfac.items()},
                     truth, time_it=False) if len(qfac) == 3 else None
        if rows is None:  # one preset only
            p = next(iter(qfac))
            rows = []
            for v in NPROBES:
                if v > nlist // 2:
                    break
                ivf.nprobe = v
                rows.append({"nprobe": v, p: {"recall": recall(ivf.search(scale_blocks(xq, qfac[p], b), K)[1], truth[p])}})
                if rows[-1][p]["recall"] >= STOP:
                    break
        out[name] = _recalls(rows, "nprobe")
        log(f"  sharing ivf {name}: " + "; ".join(
            f"np{r['nprobe']}:" + "/".join(f"{r[p]:.3f}" for p in PRESETS if p in r) for r in out[name]))
        del ivf
    return out


def sharing_hnsw(x, xq, scales, truth, shared_rows, b, log):
    L = len(b) - 1
    out = {"shared_scale_normalised": _recalls(shared_rows, "efSearch")}
    spaces = {"shared_unweighted": (np.ones(L), {p: preset_weights(p, L) / scales for p in PRESETS})}
    for p in PRESETS:
        cp = np.sqrt(preset_weights(p, L) / scales)
        spaces[f"own_index_{p}"] = (cp, {p: cp})
    for name, (dfac, qfac) in spaces.items():
        h = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, IP)
        h.add(scale_blocks(x, dfac * np.sqrt(scales), b))
        rows = []
        for ef in EFS:
            h.hnsw.efSearch = ef
            rows.append({"efSearch": ef, **{p: {"recall": recall(h.search(scale_blocks(xq, f, b), K)[1], truth[p])}
                                            for p, f in qfac.items()}})
            if all(rows[-1][p]["recall"] >= STOP for p in qfac):
                break
        out[name] = _recalls(rows, "efSearch")
        log(f"  sharing hnsw {name}: " + "; ".join(
            f"ef{r['efSearch']}:" + "/".join(f"{r[p]:.3f}" for p in PRESETS if p in r) for r in out[name]))
        del h
    return out


# ---------------------------------------------------------------- summary

def summarise(sizes):
    methods = (("ivf_flat", "nprobe"), ("ivf_sq_fp16", "nprobe"), ("ivf_sq8", "nprobe"), ("hnsw", "efSearch"))
    per_n = []
    for r in sizes:
        row = {"n": r["n"], "exact_s_per_1000": float(np.mean(list(r["exact"]["s_per_1000"].values())))}
        for m, param in methods:
            if m not in r:
                continue
            row[m] = {"all_presets": smallest(r[m]["sweep"], param),
                      **{p: (smallest(r[m]["sweep"], param, p) or {}).get(param) for p in PRESETS}}
        per_n.append(row)
    out = {"per_n": per_n, "time_ratios": {}, "crossover_n": {}}
    by_n = {row["n"]: row for row in per_n}
    for m, _ in methods + (("exact", None),):
        pts = [(n, (row["exact_s_per_1000"] if m == "exact" else
                    (row.get(m) or {}).get("all_presets", {}) and row[m]["all_presets"]["s_per_1000"]))
               for n, row in by_n.items()]
        pts = [(n, t) for n, t in pts if t]
        ratios = {}
        for hi, lo in ((300_000, 100_000), (1_000_000, 100_000)):
            d = dict(pts)
            if hi in d and lo in d:
                ratios[f"{hi // 1000}k/{lo // 1000}k"] = d[hi] / d[lo]
        if len(pts) >= 2 and 1_000_000 not in dict(pts) and 300_000 in dict(pts) and 100_000 in dict(pts):
            d = dict(pts)
            expo = math.log(d[300_000] / d[100_000]) / math.log(3)
            ratios["1000k/100k_extrapolated"] = 10 ** expo
            ratios["exponent_100k_300k"] = expo
        out["time_ratios"][m] = ratios
        if m == "exact":
            continue
        # crossover: largest n where exact is still faster (log-log interpolation between sizes)
        ns = sorted(n for n, row in by_n.items() if (row.get(m) or {}).get("all_presets"))
        diff = [(n, math.log(by_n[n]["exact_s_per_1000"] / by_n[n][m]["all_presets"]["s_per_1000"])) for n in ns]
        cross = None
        for (n0, d0), (n1, d1) in itertools.pairwise(diff):
            if d0 <= 0 < d1:
                f = -d0 / (d1 - d0)
                cross = round(math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0))))
        if diff and cross is None:
            cross = f"< {diff[0][0]}" if diff[0][1] > 0 else (f">= {diff[-1][0]}" if diff[-1][1] <= 0 else None)
        out["crossover_n"][m] = cross
    return out


def print_table(sizes):
    print(f"\n{'n':>8} {'method':<12} {'setting':<10} {'rec eq':>7} {'rec low':>7} {'rec high':>8} "
          f"{'s/1000q':>8} {'build s':>8} {'mem MB':>8}")
    for r in sizes:
        ex = r["exact"]
        print(f"{r['n']:>8} {'exact':<12} {'':<10} {1:>7.3f} {1:>7.3f} {1:>8.3f} "
              f"{np.mean(list(ex['s_per_1000'].values())):>8.3f} {ex['build_s'] or 0:>8.1f} {r['n'] * r['dim'] * 4 / 2**20:>8.0f}")
        for m, param in (("ivf_flat", "nprobe"), ("ivf_sq_fp16", "nprobe"), ("ivf_sq8", "nprobe"), ("hnsw", "efSearch")):
            if m not in r:
                continue
            for i, s in enumerate(r[m]["sweep"]):
                print(f"{'':>8} {m if i == 0 else '':<12} {param[:2] + str(s[param]):<10} "
                      + " ".join(f"{s[p]['recall']:>{w}.3f}" for p, w in zip(PRESETS, (7, 7, 8)))
                      + f" {np.mean([s[p]['s_per_1000'] for p in PRESETS]):>8.3f}"
                      + (f" {r[m]['build_s']:>8.1f} {r[m]['mem_mb']:>8.0f}" if i == 0 else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 5k and 20k only (under a minute)")
    ap.add_argument("--with-1m", action="store_true", help="add n = 1M (streamed; exact and IVF-Flat only)")
    ap.add_argument("--sizes", type=int, nargs="*", help="override the sizes")
    ap.add_argument("--queries", type=int, default=None, help="1,000 (500 with --quick)")
    ap.add_argument("--hold-max", type=int, default=400_000, help="above this n the data are streamed")
    ap.add_argument("--hnsw-max", type=int, default=300_000, help="largest n for HNSW (build is ~2.5 min at 300k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", choices=sorted(DATA), default="calibrated", help="synthetic data setting")
    ap.add_argument("--vectors", help="an .npz of per-layer vectors from a fitted model, instead of synthetic data")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true",
                    help="add these sizes to the existing JSON (e.g. --sizes 1000000 --append after a full run)")
    args = ap.parse_args(argv)
    args.queries = args.queries or (500 if args.quick else 1000)
    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or ([5_000, 20_000] if args.quick else [10_000, 30_000, 100_000, 300_000])
    if args.with_1m and 1_000_000 not in sizes:
        sizes = sizes + [1_000_000]
    args.identity_n = 20_000 if args.quick else 100_000
    cmp_ivf = 20_000 if args.quick else 100_000
    cmp_hnsw = 5_000 if args.quick else 30_000
    suffix = ("_quick" if args.quick else "") + ("" if args.data == "calibrated" else f"_{args.data}")
    if args.vectors:
        synth = Stored(args.vectors, args.queries)
        sizes = args.sizes or [synth.n]
        args.identity_n = cmp_ivf = cmp_hnsw = sizes[0]
        suffix = "_vectors"
    else:
        synth = Synth(**DATA[args.data])
    out_path = Path(args.out) if args.out else RESULTS / f"explore_ann{suffix}.json"
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
                          "threads": args.threads},
              "args": {"sizes": sizes, "queries": args.queries, "k": K, "target_recall": TARGET, "hnsw_M": HNSW_M,
                       "nlist_rule": "round(4*sqrt(n))", "ivf_train": "39*nlist random training vectors, 10 k-means "
                       "iterations, spherical (faiss default for inner product)"},
              "data": "vectors" if args.vectors else args.data, "synthetic": synth.params, "sizes": []}
    if args.append and out_path.exists():
        old = json.loads(out_path.read_text())
        result["augmented_identity"] = old["augmented_identity"]
        result["sizes"] = [r for r in old["sizes"] if r["n"] not in sizes]
        start -= old.get("total_s", 0.0)  # total_s covers both runs
        result["args"]["sizes"] = sorted({r["n"] for r in result["sizes"]} | set(sizes))
    else:
        result["augmented_identity"] = augmented_check(synth, n=5_000 if args.quick else 20_000,
                                                       nq=100 if args.quick else 300)
        log(f"augmented identity: {result['augmented_identity']}")
    for n in sizes:
        result["sizes"].append(run_size(synth, n, args.queries, args, cmp_ivf, cmp_hnsw, log))
        result["sizes"].sort(key=lambda r: r["n"])
        result["summary"] = summarise(result["sizes"])
        result["total_s"] = time.perf_counter() - start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=float))
    print_table(result["sizes"])
    s = result["summary"]
    print("\nsmallest setting with recall@10 >= 0.95 (all presets | equal/low/high), s per 1000 queries:")
    for row in s["per_n"]:
        parts = [f"exact {row['exact_s_per_1000']:.3f}s"]
        for m, param in (("ivf_flat", "nprobe"), ("ivf_sq_fp16", "nprobe"), ("ivf_sq8", "nprobe"), ("hnsw", "efSearch")):
            if m in row:
                a = row[m]["all_presets"]
                parts.append(f"{m} {a[param] if a else '-'}"
                             f"({'/'.join(str(row[m][p]) for p in PRESETS)})"
                             f" {a['s_per_1000']:.3f}s" if a else f"{m} -")
        print(f"  n={row['n']}: " + "; ".join(parts))
    print(f"query-time ratios: {json.dumps(s['time_ratios'], default=float)}")
    print(f"exact faster below n = {s['crossover_n']}")
    print(f"total {result['total_s']:.0f}s; wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
