"""The CUDA path on a real GPU: one command, prints a table, writes JSON.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json]

Needs a CUDA device and Fashion-MNIST (``ACTCLUST_FASHION_MNIST`` may point at its IDX files).
Trains a ResNet-18 (torchvision's widths, BatchNorm, ``actclust.models.resnet18``) on the GPU, then:

- fits on the 60,000 training images with the model on the GPU (in memory, with a disk store,
  a float16 copy and ``torch.compile``), each time over one plain forward pass of the same model
  over the same CPU-held inputs (copied to the GPU per batch, as actclust does) in the same run;
- fits the same weights on the CPU over a 5,000-image subset, and the GPU model on the same
  subset: how many cluster assignments and predictions agree across devices;
- scores, searches similar samples (exact and approximate), explains and computes trust signals
  on test images with the GPU model, each over a forward pass over the same inputs;
- saves the GPU run and loads it on the CPU copy of the model: same predictions as the GPU run.
"""

from __future__ import annotations

import argparse
import copy
import json
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
from actclust.models import resnet18

LAYERS = ["layer1", "layer2", "layer3", "layer4", "fc"]
BATCH = 256


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=5000, help="images fitted on both devices")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", help="write a cProfile of fit and explain (top functions) to this file")
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # a dry run on the CPU: first N images
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.limit:
        print("no CUDA device: this benchmark checks the GPU path", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    if args.limit:
        x_tr, y_tr, x_te, y_te = x_tr[:args.limit], y_tr[:args.limit], x_te[:args.limit], y_te[:args.limit]
    x, xt = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    res = {"machine": {"gpu": torch.cuda.get_device_name() if device == "cuda" else None, "platform": platform.platform(),
                       "torch": torch.__version__,
                       "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cpu_threads": torch.get_num_threads()}, "rows": {}}

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

    # analyses with the GPU model (fitted on 60k above), over a forward pass of their inputs
    q = xt[:2000]
    n_q = len(q)
    fq = forward(model, q)
    an = {"forward_seconds_2k": fq}
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
