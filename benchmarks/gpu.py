"""The CUDA path on a real GPU: one command, prints tables, writes JSON.

    python benchmarks/gpu.py [--cases resnet18,resnet50] [--out benchmarks/results/gpu.json]

Needs a CUDA device. Two cases, both run by default (``--cases`` picks):

**resnet18** (28x28, needs Fashion-MNIST; ``ACTCLUST_FASHION_MNIST`` may point at its IDX files).
Trains a ResNet-18 (torchvision's widths, BatchNorm, ``actclust.models.resnet18``) on the GPU, then:

- fits on the 60,000 training images with the model on the GPU (in memory, with a disk store,
  a float16 copy and ``torch.compile``), each time over one plain forward pass of the same model
  over the same CPU-held inputs (copied to the GPU per batch, as actclust does) in the same run;
- fits the same weights on the CPU over a 5,000-image subset, and the GPU model on the same
  subset: how many cluster assignments and predictions agree across devices;
- scores, searches similar samples (exact and approximate), explains and computes trust signals
  on ``--n-queries`` (10,000: all) test images with the GPU model, each over a forward pass over the
  same inputs (the issue's table counts 10k queries; the H100 run of ee1fc3f used 2,000);
- saves the GPU run and loads it on the CPU copy of the model: same predictions as the GPU run.

Its results are the top-level ``rows``, ``devices``, ``analyses`` and ``load_on_cpu`` of the JSON.
The JSON is rewritten after each step with ``"complete": false`` (``true`` at the end), so a run
stopped part-way (a time limit on a lent GPU) keeps what it measured.

**resnet50** (ImageNet-shaped: 224x224x3, 1,000 classes; needs no data set). torchvision's
ResNet-50 (``actclust.models.resnet50``, 25.6M parameters) **untrained**: torchvision's random
initialisation under ``torch.manual_seed(0)``, in eval mode, so its predictions are whatever the
random net says and the fit runs with ``y=None``. With BatchNorm's initial running statistics
(mean 0, variance 1) such a net predicts the same class for every input, so by default they are
first averaged over 2,048 training images (train-mode passes without gradients; no weight
changes; ``--raw-init`` skips this); the number of classes it then predicts is recorded. Inputs
are synthetic and generated on the fly: image ``i`` is a fixed mix of two of 512 seeded base
images (smooth Gaussian patterns plus white noise) chosen and weighted by ``i``, so no
100k x 3 x 224 x 224 array (60 GB) is ever held; a ``torch.utils.data.DataLoader`` (in order,
``--workers`` processes, pinned memory on CUDA) feeds both actclust and the plain forward
passes. Over ``--n-train`` (100,000) training images and ``--n-queries`` (10,000) query images,
layers ``layer1 .. layer4, fc``, with the disk store (a temporary folder), one run measures:

- the loader alone (generation), and one plain forward pass over the training images (same
  loader, same batches, same per-batch copy to the GPU as actclust's: pinned, non-blocking);
- ``fit`` (``fit/forward``);
- on the queries, each over a plain forward pass of them: ``explain`` (k=5, trust added as by
  default), ``similar`` (k=10, ``weights="high"``) and ``trust``. The indexes and calibration
  are cached with the fit and shared between methods, so the cache is emptied before each method:
  its first call (on the first 256 queries) builds what it needs and is timed apart from the
  second call, over all queries;
- peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each step; it includes the
  model's weights, ``model_device_bytes``).

Its results are under ``"resnet50_224"`` (``resnet50_<image size>``). The TF32 settings
(``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``, the float32
matmul precision) are recorded under ``machine`` and left at PyTorch's defaults.

On a GPU: ``python benchmarks/gpu.py --cases resnet50`` runs the ResNet-50 case alone. Its runtime
on an H100-class GPU has not been measured; a rough estimate from the FLOPs (ResNet-50 forward at
some thousands of images/s) is 5-15 minutes for the case (about four passes over 100k images:
loader alone, plain forward, fit, plus queries), host-side generation and copying permitting
(``--workers``). It needs about 2-3 GB of free disk for the store (measured: 20 KB per image) and
0.3 GB of host memory for the base images.

A dry run on the CPU: ``--limit N`` uses the first N Fashion-MNIST images for the ResNet-18 case,
and N training and N/2 query images for the ResNet-50 case; ``--image-size 64`` makes the latter
quick (the architecture takes any size of at least 32), e.g.

    python benchmarks/gpu.py --limit 256 --image-size 64 --epochs 1 --out /tmp/gpu_dry.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS

import actclust
from actclust.datasets import load_fashion_mnist
from actclust.models import resnet18, resnet50

LAYERS = ["layer1", "layer2", "layer3", "layer4", "fc"]
BATCH = 256
CASES = ("resnet18", "resnet50")
POOL = 512  # base images of the synthetic 224x224 data
FIRST = 256  # queries of each method's first call
BN_IMAGES = 2048  # images that set the untrained ResNet-50's BatchNorm statistics


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward(model, x: torch.Tensor) -> float:
    """One plain pass over CPU-held ``x``: each batch copied to the model's device, as actclust does."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in x.split(BATCH):
            model(b.to(device, dtype, non_blocking=True)).float().cpu()
    sync()
    return time.perf_counter() - t0


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def train(model, x, y, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    device = next(model.parameters()).device
    xg, yg = x.to(device), y.to(device)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            idx = idx.to(device)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xg[idx]), yg[idx]).backward()
            opt.step()
    return model.eval()


def resnet18_case(args, res: dict, device: str, checkpoint) -> None:
    """The 28x28 Fashion-MNIST case: results into the top level of ``res`` (``checkpoint()`` writes them)."""
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    if args.limit:
        x_tr, y_tr, x_te, y_te = x_tr[:args.limit], y_tr[:args.limit], x_te[:args.limit], y_te[:args.limit]
    x, xt = torch.from_numpy(x_tr), torch.from_numpy(x_te)

    model, t_train = timed(lambda: train(resnet18(1, 10).to(device), x, torch.from_numpy(y_tr), args.epochs))
    res["train_seconds"] = t_train
    forward(model, x[:2048])  # warm-up (cuDNN autotuning, allocator)
    fwd = forward(model, x)
    res["forward_seconds_60k"] = fwd

    def fit_row(name, m, fwd_s, **kw):
        ac = actclust.ActivationClustering(m, LAYERS, batch_size=BATCH, progress=False, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, t = timed(lambda: ac.fit(x))
            score = ac.score(x_te, y_te)
        res["rows"][name] = {"fit_seconds": t, "forward_seconds": fwd_s, "fit_over_forward": t / fwd_s,
                             "fidelity": score["fidelity"], "accuracy": score["accuracy"],
                             "dnn_accuracy": score["dnn_accuracy"],
                             "stages": {k: v for k, v in ac.fit_info_.items() if k.startswith("seconds")},
                             "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})}
        print(f"{name:<22} fit/fwd {t / fwd_s:6.2f}  fidelity {score['fidelity']:.4f}  acc {score['accuracy']:.4f}"
              f"  DNN {score['dnn_accuracy']:.4f}", flush=True)
        checkpoint()
        return ac

    ac = fit_row("gpu float32", model, fwd)
    with tempfile.TemporaryDirectory() as tmp:
        fit_row("gpu float32, disk store", model, forward(model, x), store=f"{tmp}/store")
    half = copy.deepcopy(model).half()
    forward(half, x[:2048])
    fit_row("gpu float16 copy", half, forward(half, x))
    if not args.no_compile:
        try:
            compiled = torch.compile(copy.deepcopy(model))
            forward(compiled, x[:2048])  # compiles the plain graph
            base = forward(compiled, x)
            torch._dynamo.reset()  # actclust's hooks then compile their own graph inside the fit
            fit_row("gpu torch.compile", torch.compile(copy.deepcopy(model)), base)
        except Exception as e:  # noqa: BLE001  (a compile failure is a result to report, not a crash)
            res["rows"]["gpu torch.compile"] = {"error": repr(e)[:500]}
            print("compile failed:", repr(e)[:300], flush=True)

    # the same weights on both devices, on the same subset
    sub = x[:args.subset]
    cpu_model = copy.deepcopy(model).cpu()
    on_gpu = actclust.ActivationClustering(model, LAYERS, batch_size=BATCH, progress=False).fit(sub)
    on_cpu = actclust.ActivationClustering(cpu_model, LAYERS, batch_size=BATCH, progress=False).fit(sub)
    pg, pc = on_gpu.cluster_paths(x_te), on_cpu.cluster_paths(x_te)
    prob_g, prob_c = on_gpu.predict_proba(x_te), on_cpu.predict_proba(x_te)
    res["devices"] = {
        "n_fit": args.subset, "cluster_agreement_per_layer": dict(zip(LAYERS, (pg == pc).mean(0).tolist())),
        "prediction_agreement": float((prob_g.argmax(1) == prob_c.argmax(1)).mean()),
        "mean_abs_proba_diff": float(np.abs(prob_g - prob_c).mean()),
        "fidelity_gpu": on_gpu.score(x_te)["fidelity"], "fidelity_cpu": on_cpu.score(x_te)["fidelity"]}
    print("devices:", json.dumps(res["devices"]), flush=True)
    checkpoint()

    # analyses with the GPU model (fitted on 60k above), over a forward pass of their inputs
    q = xt[:args.n_queries]
    n_q = len(q)
    forward(model, q[:BATCH])
    fq = forward(model, q)
    an = {"n_queries": n_q, "forward_seconds": fq}
    for search in ("exact", "approximate"):
        ac.similar(q[:50], k=10, weights="high", search=search)  # builds (and calibrates) the index once
        nb, t = timed(lambda: ac.similar(q, k=10, weights="high", search=search))
        an[f"similar_{search}_over_forward"] = t / fq
    exact = ac.similar(q[:500], k=10, weights="high", search="exact").indices
    approx = ac.similar(q[:500], k=10, weights="high", search="approximate").indices
    an["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)]))
    ac.similar(q[:50], k=10, weights="low")  # explain searches "low" and "high": both calibrated before timing
    ac.trust(q[:10])  # trust's calibration, once
    _, t = timed(lambda: ac.explain(q, y_te[:n_q]))
    an["explain_over_forward"] = t / fq
    if args.profile:
        import cProfile
        import io
        import pstats
        prof = cProfile.Profile()
        prof.runcall(lambda: actclust.ActivationClustering(model, LAYERS, batch_size=BATCH, progress=False).fit(x))
        prof.runcall(lambda: ac.explain(q, y_te[:n_q]))
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
        Path(args.profile).write_text(buf.getvalue())
    tr, t = timed(lambda: ac.trust(q))
    an["trust_over_forward"] = t / fq
    dnn_wrong = tr["dnn_prediction"] != y_te[:n_q]
    from sklearn.metrics import roc_auc_score
    an["credibility_misclassification_auroc"] = float(roc_auc_score(~dnn_wrong, tr["credibility"]))
    res["analyses"] = an
    print("analyses:", json.dumps(an), flush=True)
    checkpoint()

    with tempfile.TemporaryDirectory() as tmp:
        ac.save(f"{tmp}/run")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = actclust.load(f"{tmp}/run", cpu_model, progress=False)
        pl, pgpu = loaded.predict_proba(x_te), ac.predict_proba(x_te)
        res["load_on_cpu"] = {"prediction_agreement": float((pl.argmax(1) == pgpu.argmax(1)).mean()),
                              "max_abs_proba_diff": float(np.abs(pl - pgpu).max()),
                              "warnings": [f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught]}
    print("load on cpu:", json.dumps(res["load_on_cpu"]), flush=True)


# ---------------------------------------------------------------- ResNet-50, 224x224

class SyntheticImages(torch.utils.data.Dataset):
    """``n`` synthetic ``3 x size x size`` float32 images, image ``i`` made from its index alone.

    ``pool`` base images are drawn once from ``seed``: a 4x4 Gaussian pattern upsampled (bilinear)
    plus half as much white noise, each scaled to unit variance. Image ``first + i`` is ``c * base[a]
    + (1 - c) * base[b]``, rescaled to unit variance, where ``a``, ``b`` (distinct) and ``c`` in
    [0.2, 0.8] follow from the index: no two images alike, nothing but the base images held.
    ``first`` offsets the indices, so query images differ from training images.
    """

    def __init__(self, n: int, size: int, *, first: int = 0, pool: int = POOL, seed: int = 0, base=None):
        self.n, self.size, self.first = n, size, first
        if base is None:
            gen = torch.Generator().manual_seed(seed)
            low = torch.nn.functional.interpolate(torch.randn(pool, 3, 4, 4, generator=gen), size=(size, size),
                                                  mode="bilinear", align_corners=False)
            base = low / low.std((1, 2, 3), keepdim=True) + 0.5 * torch.randn(pool, 3, size, size, generator=gen)
            base /= base.std((1, 2, 3), keepdim=True)
        self.base = base

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):  # a whole batch at once (DataLoader's batched fetch)
        idx = torch.as_tensor(indices, dtype=torch.int64) + self.first
        p = len(self.base)
        a = idx % p
        b = (a + 1 + (idx // p) % (p - 1)) % p
        c = 0.2 + 0.6 * torch.frac(idx.double() * 0.6180339887498949)
        scale = 1.0 / torch.sqrt(c ** 2 + (1 - c) ** 2)
        out = torch.lerp(self.base[b], self.base[a], c.float().view(-1, 1, 1, 1))
        return out.mul_(scale.float().view(-1, 1, 1, 1))


def _as_batch(batch):
    return batch  # __getitems__ returns the batch already stacked


def loader(data: SyntheticImages, workers: int, device: str) -> torch.utils.data.DataLoader:
    """The DataLoader both actclust and the plain passes read: in order, pinned on CUDA."""
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, num_workers=workers,
                                       collate_fn=_as_batch, pin_memory=device == "cuda")


def to_device(b: torch.Tensor, device: torch.device) -> torch.Tensor:
    """actclust's copy of a batch (``actclust.adapters.torch._to``): pinned, then non-blocking."""
    if device.type == "cuda" and not b.is_pinned():
        b = b.pin_memory()
    return b.to(device, non_blocking=True)


def forward_loader(model, batches) -> float:
    """One plain pass over ``batches`` (a loader), each copied to the model's device as actclust does."""
    device = next(model.parameters()).device
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(to_device(b, device)).float().cpu()
    sync()
    return time.perf_counter() - t0


def loader_seconds(batches) -> float:
    t0 = time.perf_counter()
    for _ in batches:
        pass
    return time.perf_counter() - t0


def set_batchnorm_stats(model, batches) -> None:
    """BatchNorm's running statistics, the cumulative average over ``batches`` (train-mode passes
    without gradients); the weights are left as they are. Then eval mode."""
    device = next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for b in batches:
            model(to_device(b, device))
    for m in bns:
        m.momentum = 0.1
    model.eval()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes():
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f}"


def resnet50_case(args, device: str, out: dict, checkpoint) -> dict:
    """The ImageNet-shaped case: an untrained ResNet-50 on synthetic images, disk store; results into
    ``out`` as they come (``checkpoint()`` writes them after each step)."""
    n_train, n_q, size = args.n_train, args.n_queries, args.image_size
    if args.limit:
        n_train, n_q = min(n_train, args.limit), min(n_q, max(2, args.limit // 2))
    n_first = min(FIRST, max(1, n_q // 4))
    gc.collect()  # what the ResNet-18 case left on the device, out of the peaks below
    if device == "cuda":
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() if device == "cuda" else None
    torch.manual_seed(0)
    model = resnet50().to(device).eval()  # random weights: no pretrained ones here
    base = SyntheticImages(1, size, pool=min(POOL, n_train + n_q)).base
    train_x = loader(SyntheticImages(n_train, size, base=base), args.workers, device)
    query_x = loader(SyntheticImages(n_q, size, first=n_train, base=base), args.workers, device)
    first_x = loader(SyntheticImages(n_first, size, first=n_train, base=base), args.workers, device)
    n_bn = 0 if args.raw_init else min(BN_IMAGES, n_train)
    if n_bn:  # freshly initialised (mean 0, variance 1), they make the net predict one class for every input
        set_batchnorm_stats(model, loader(SyntheticImages(n_bn, size, base=base), args.workers, device))
    model_desc = ("actclust.models.resnet50 (torchvision's ResNet-50), untrained: torchvision's random "
                  "initialisation under torch.manual_seed(0), eval mode; fitted with y=None")
    if n_bn:
        model_desc += (f"; BatchNorm running statistics averaged over the first {n_bn} training images "
                       "(train-mode passes, no gradients; weights untouched)")
    out.update({"model": model_desc, "batchnorm_stats_images": n_bn,
           "n_parameters": sum(p.numel() for p in model.parameters()), "image_size": size,
           "n_train": n_train, "n_queries": n_q, "first_call_queries": n_first, "batch_size": BATCH,
           "workers": args.workers, "layers": LAYERS, "store": "disk (a temporary folder)",
           "data": f"synthetic: each image a seeded mix of two of {len(base)} base images (smooth Gaussian "
                   "patterns plus white noise), made per batch "
                   "by a DataLoader (in order, pinned on CUDA); queries are images n_train.. of the same stream",
           "device_bytes_before_model": before,
           "model_device_bytes": torch.cuda.memory_allocated() - before if device == "cuda" else None})
    print(f"resnet50 {size}x{size}: {n_train} training, {n_q} query images, {args.workers} workers, on {device}",
          flush=True)
    forward_loader(model, loader(SyntheticImages(min(2 * BATCH, n_train), size, base=base), args.workers, device))
    out["loader_seconds"] = loader_seconds(train_x)  # generation alone, for scale
    reset_peak()
    fwd = forward_loader(model, train_x)
    out["forward_seconds"], out["forward_peak_bytes"] = fwd, peak_bytes()
    checkpoint()

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ac = actclust.ActivationClustering(model, LAYERS, batch_size=BATCH, progress=False, store=f"{tmp}/store")
        reset_peak()
        _, t = timed(lambda: ac.fit(train_x))  # y=None: the random net's predictions are the classes
        out["fit"] = {"seconds": t, "over_forward": t / fwd, "peak_bytes": peak_bytes(),
                      "stages": {k: v for k, v in ac.fit_info_.items() if k.startswith("seconds")},
                      "store_bytes": sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())}
        print(f"fit {t:.1f} s, forward {fwd:.1f} s", flush=True)
        checkpoint()

        reset_peak()
        fq = forward_loader(model, query_x)
        out["query_forward_seconds"], out["query_forward_peak_bytes"] = fq, peak_bytes()
        calls = {"explain": lambda x: ac.explain(x),
                 "similar": lambda x: ac.similar(x, k=10, weights="high"),
                 "trust": lambda x: ac.trust(x)}
        results = {}
        for name, call in calls.items():
            ac.state_.cache.clear()  # indexes and calibration are shared: each method builds its own
            reset_peak()
            _, t1 = timed(lambda c=call: c(first_x))
            p1 = peak_bytes()
            reset_peak()
            results[name], t = timed(lambda c=call: c(query_x))
            out[name] = {"first_call_seconds": t1, "first_call_peak_bytes": p1,
                         "first_call_build_seconds": max(0.0, t1 - t * n_first / n_q),  # less its share of queries
                         "seconds": t, "over_forward": t / fq, "peak_bytes": peak_bytes()}
            print(f"{name}: first call {t1:.1f} s, then {t:.1f} s ({t / fq:.2f} x forward)", flush=True)
            checkpoint()
        out["search"] = sorted({k[1] for k in ac.state_.cache.get("retrieval", {}) if len(k) == 3})
        pred = results["trust"]["dnn_prediction"]
        out["n_predicted_classes_queries"] = len(np.unique(pred))
        out["fidelity_queries"] = float((ac.predict(query_x) == pred).mean())
        out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})

    rows = [("loader alone (generation)", out["loader_seconds"], None, None),
            (f"forward, {n_train} train", fwd, 1.0, out["forward_peak_bytes"]),
            ("fit (disk store)", out["fit"]["seconds"], out["fit"]["over_forward"], out["fit"]["peak_bytes"]),
            (f"forward, {n_q} queries", fq, 1.0, out["query_forward_peak_bytes"])]
    for name in calls:
        r = out[name]
        rows += [(f"{name} first call ({n_first} q)", r["first_call_seconds"], None, r["first_call_peak_bytes"]),
                 (f"{name} ({n_q} q)", r["seconds"], r["over_forward"], r["peak_bytes"])]
    print(f"\nresnet50 {size}x{size} on {device} (untrained, seed 0; {n_train} train, {n_q} queries)")
    print(f"{'step':<32}{'seconds':>10}{'/forward':>10}{'peak GiB':>10}")
    for name, sec, ratio, peak in rows:
        print(f"{name:<32}{sec:>10.2f}{'' if ratio is None else f'{ratio:.2f}':>10}{_gib(peak):>10}")
    print(f"search: {out['search']}, predicted classes among queries: {out['n_predicted_classes_queries']}, "
          f"fidelity on queries: {out['fidelity_queries']:.4f}, warnings: {len(out['warnings'])}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    ap.add_argument("--epochs", type=int, default=2, help="resnet18: training epochs")
    ap.add_argument("--subset", type=int, default=5000, help="resnet18: images fitted on both devices")
    ap.add_argument("--no-compile", action="store_true", help="resnet18: skip the torch.compile row")
    ap.add_argument("--profile", help="resnet18: write a cProfile of fit and explain (top functions) to this file")
    ap.add_argument("--n-train", type=int, default=100_000, help="resnet50: training images")
    ap.add_argument("--n-queries", type=int, default=10_000, help="query images (resnet18: of the 10,000 test images)")
    ap.add_argument("--image-size", type=int, default=224, help="resnet50: image side (224; smaller for a dry run)")
    ap.add_argument("--workers", type=int, default=4, help="resnet50: DataLoader worker processes")
    ap.add_argument("--raw-init", action="store_true",
                    help="resnet50: keep BatchNorm's initial statistics (the net then predicts one class)")
    ap.add_argument("--limit", type=int,
                    help="a dry run (also on the CPU): N >= 200 images (resnet50: N train, N/2 queries)")
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - set(CASES):
        ap.error(f"--cases takes a comma-separated list of {', '.join(CASES)}; got {args.cases!r}")
    if args.limit is not None and args.limit < 200:
        ap.error("--limit must be at least 200: trust's calibration takes 10% of the training images, at least 20")
    if not torch.cuda.is_available() and not args.limit:
        print("no CUDA device: this benchmark checks the GPU path (--limit N runs it on the CPU)", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"machine": {"gpu": torch.cuda.get_device_name() if device == "cuda" else None, "platform": platform.platform(),
                       "torch": torch.__version__,
                       "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                       "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                       "float32_matmul_precision": torch.get_float32_matmul_precision(),
                       "cudnn_benchmark": torch.backends.cudnn.benchmark,
                       "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
           "cases": cases, "limit": args.limit}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(complete: bool = False):  # what is measured so far survives a run stopped part-way
        res["complete"] = complete
        Path(args.out).write_text(json.dumps(res, indent=2))

    if "resnet18" in cases:
        res["rows"] = {}
        resnet18_case(args, res, device, checkpoint)
    if "resnet50" in cases:
        resnet50_case(args, device, res.setdefault(f"resnet50_{args.image_size}", {}), checkpoint)
    checkpoint(complete=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
