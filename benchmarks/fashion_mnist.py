"""Fashion-MNIST benchmark of the clustering surrogate (one command, prints a table, writes JSON).

    python benchmarks/fashion_mnist.py            # full run (about 5 min on 2 cores)
    python benchmarks/fashion_mnist.py --quick    # 15 clusters only (k-means, distill, idec)
    python benchmarks/fashion_mnist.py --explain-only   # only the explanation figures (issue 3)

Fits ``ActivationClustering`` on the 60,000 training images over conv1, conv2, fc1, fc2 of a
small CNN (trained once and cached), scores it on the 10,000 test images, for each number of
clusters, posterior and layer weighting with k-means, and at 15 clusters with the "distill" and
"idec" clusterings; within-cluster spread is reported relative to k-means with the same k. Fit time is reported as a ratio to one plain forward
pass over the same images with the same batch size, measured right before each fit. Peak memory
of ``fit`` (resident set above its start) is measured in fresh processes at 10k and 60k samples.

Explanations: similar-sample quality on test images (share of the 10 nearest training samples
whose DNN prediction equals the query's, for "high" weights against raw-pixel and last-layer-only
neighbours; mean pixel distance for "low" against "high"), explanation throughput for the 10,000
test inputs as a ratio to one plain forward pass over them, and the size and Chromium render time
of a 20-input report.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, PeakRSS, fashion_cnn, forward_seconds, test_accuracy

from actclust import ActivationClustering
from actclust.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
BATCH = 256


def memory_probe(n: int) -> dict:
    """Run in a fresh process: peak resident memory that ``fit`` adds on ``n`` training images."""
    model = fashion_cnn()
    x_tr = torch.from_numpy(load_fashion_mnist()[0][:n])
    forward_seconds(model, x_tr[:BATCH], BATCH)  # warm up allocator and kernels
    ac = ActivationClustering(model, LAYERS, n_clusters=15, batch_size=BATCH, progress=False)
    with PeakRSS() as mem:
        ac.fit(x_tr)
    stored = sum(v.nbytes for v in ac.train_vectors_.values())
    return {"n": n, "peak_added_mb": (mem.peak - mem.start) / 2**20, "stored_vectors_mb": stored / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="15 clusters only")
    ap.add_argument("--explain-only", action="store_true", help="only the explanation figures")
    ap.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "fashion_mnist.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0

    model = fashion_cnn()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    x_tr_t = torch.from_numpy(x_tr)
    dnn_acc = test_accuracy(model)
    forward_seconds(model, x_tr_t[: 4 * BATCH], BATCH)  # warm-up
    explanations = explanation_figures(model, x_tr, y_tr, x_te, y_te)
    if args.explain_only:
        _write(args.out, {"explanations": explanations}, merge=True)
        return 0
    configs = [("kmeans", k, posterior, weights) for k in ([15] if args.quick else [10, 15, 30])
               for posterior in ("prediction", "label") for weights in (None, "fit")]
    configs += [(method, 15, "prediction", weights) for method in ("distill", "idec") for weights in (None, "fit")]
    rows, kmeans_spread = [], {}
    for method, k, posterior, weights in configs:
        fwd = forward_seconds(model, x_tr_t, BATCH)
        ac = ActivationClustering(model, LAYERS, n_clusters=k, posterior=posterior, clustering=method,
                                  layer_weights=weights, batch_size=BATCH, progress=False)
        start = time.perf_counter()
        ac.fit(x_tr, y_tr)
        fit_s = time.perf_counter() - start
        s = ac.score(x_te, y_te)
        spread = _spread(ac)
        if method == "kmeans":
            kmeans_spread.setdefault(k, spread)
        rows.append({
            "clustering": method, "n_clusters": k, "posterior": posterior, "weights": weights or "equal",
            "fidelity": s["fidelity"], "accuracy": s["accuracy"],
            "per_layer": s["per_layer"], "layer_weights": dict(zip(LAYERS, ac.weights_.tolist())),
            "spread_vs_kmeans": {l: spread[l] / kmeans_spread[k][l] for l in LAYERS},
            "fit_over_forward": fit_s / fwd, "fit_stages_s": {
                k2: v for k2, v in ac.fit_info_.items() if k2.startswith("seconds")},
            "forward_s": fwd, "fit_s": fit_s,
            **({"distill": ac.fit_info_["distill"]} if "distill" in ac.fit_info_ else {}),
        })
        _print_row(rows[-1])
    memory = [json.loads(subprocess.run(
        [sys.executable, __file__, "--memory-probe", str(n)], check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]) for n in (10_000, 60_000)]
    for m in memory:
        print(f"peak memory added by fit, n={m['n']:>6}: {m['peak_added_mb']:.0f} MiB "
              f"(of which kept reduced vectors: {m['stored_vectors_mb']:.0f} MiB)")
    result = {
        "benchmark": "fashion_mnist", "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                                 "torch": torch.__version__},
        "dnn_test_accuracy": dnn_acc, "layers": LAYERS, "batch_size": BATCH, "rows": rows, "memory": memory,
        "explanations": explanations,
    }
    _write(args.out, result)
    print(f"DNN test accuracy {dnn_acc:.4f}")
    return 0


def _spread(ac) -> dict:
    """Per layer, mean squared distance of each training vector to the mean of its cluster.

    Measured in the reduced space for every method (for idec the clusters are assigned in its
    embedding but the spread is taken here), so methods compare on the same footing.
    """
    out = {}
    for l in LAYERS:
        v = ac.train_vectors_[l]
        assign = ac.clusterings_[l].predict(v)
        sums = np.zeros((ac.clusterings_[l].n_clusters, v.shape[1]))
        np.add.at(sums, assign, v)
        means = sums / np.maximum(np.bincount(assign, minlength=len(sums)), 1)[:, None]
        out[l] = float(((v - means[assign]) ** 2).sum(1).mean())
    return out


def _write(path, result: dict, merge: bool = False) -> None:
    if merge and Path(path).exists():
        result = {**json.loads(Path(path).read_text()), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def _agreement(neighbour_idx, query_pred, train_pred) -> float:
    """Share of the neighbours whose DNN prediction equals the query's."""
    return float((train_pred[neighbour_idx] == query_pred[:, None]).mean())


def _pixel_distance(neighbour_idx, x_query, x_train) -> float:
    """Mean Euclidean pixel distance (pixels in [0, 1]) from each query to its neighbours."""
    q = x_query.reshape(len(x_query), 1, -1)
    return float(np.sqrt(((x_train.reshape(len(x_train), -1)[neighbour_idx] - q) ** 2).sum(2)).mean())


# "mean" pools the conv maps to channel averages, which keeps no spatial layout; grids keep some.
SPATIAL_REDUCER = {"conv1": "grid:4", "conv2": "grid:2", "fc1": "mean", "fc2": "mean"}


def explanation_figures(model, x_tr, y_tr, x_te, y_te) -> dict:
    """Similar-sample quality (default and spatial reducers), throughput and the 20-input report."""
    result = {}
    for name, reducer in (("default (mean)", "mean"), ("spatial (conv1 grid:4, conv2 grid:2)", SPATIAL_REDUCER),
                          ("grid:2", "grid:2")):
        ac = ActivationClustering(model, LAYERS, n_clusters=15, reducer=reducer, batch_size=BATCH,
                                  progress=False).fit(x_tr, y_tr)
        print(f"reducer {name}: test fidelity {ac.score(x_te, y_te)['fidelity']:.4f}")
        result[name] = {"fidelity": ac.score(x_te, y_te)["fidelity"], **_similar_quality(ac, x_tr, x_te),
                        "throughput": _throughput(ac, model, x_te, with_trust=reducer == "mean")}
        if reducer == "mean":
            result["throughput"] = result[name]["throughput"]
            result["report"] = _report_figures(ac, model, x_tr, x_te, y_te)
    return result


def _similar_quality(ac, x_tr, x_te, n_quality: int = 2000, k: int = 10) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    qi = np.sort(rng.choice(len(x_te), n_quality, replace=False))
    xq = x_te[qi]
    q = ac.query(xq)
    quality = {}
    for name, weights in (("high", "high"), ("equal", "equal"), ("low", "low"),
                          ("last layer only (fc2)", {"fc2": 1.0}), ("penultimate only (fc1)", {"fc1": 1.0})):
        nb = ac.similar(xq, k=k, weights=weights)
        quality[name] = {"prediction_agreement": _agreement(nb.indices, q.dnn_pred, ac.train_predictions_),
                         "pixel_distance": _pixel_distance(nb.indices, xq, x_tr)}
    index = faiss.IndexFlatL2(x_tr[0].size)
    index.add(np.ascontiguousarray(x_tr.reshape(len(x_tr), -1)))
    _, raw = index.search(np.ascontiguousarray(xq.reshape(len(xq), -1)), k)
    quality["raw pixels"] = {"prediction_agreement": _agreement(raw, q.dnn_pred, ac.train_predictions_),
                             "pixel_distance": _pixel_distance(raw, xq, x_tr)}
    print(f"similar samples: {n_quality} test queries, {k} nearest of {len(x_tr)} training samples")
    print(f"  {'neighbours by':<24} {'same DNN prediction':>20} {'mean pixel distance':>20}")
    for name, v in quality.items():
        print(f"  {name:<24} {v['prediction_agreement']:>20.4f} {v['pixel_distance']:>20.3f}")
    return {"similar_quality": quality, "n_quality_queries": n_quality, "k": k}


def _throughput(ac, model, x_te, with_trust: bool, k: int = 10) -> dict:
    """Explaining all test inputs, against one plain forward pass over them (same run)."""
    from actclust.analysis.retrieval import check_args, search

    x_te_t = torch.from_numpy(x_te)
    times = {"forward": forward_seconds(model, x_te_t, BATCH)}
    start = time.perf_counter()
    q = ac.query(x_te, vectors=True)
    times["capture_pass"] = time.perf_counter() - start
    start = time.perf_counter()
    for preset in ("low", "high"):  # the exact searches explain runs, on the pass above
        search(ac.state_, q, *check_args(ac.state_, k, preset))
    times["similar_searches"] = time.perf_counter() - start
    for name, trust in (("explain", False), ("explain_with_trust", True))[:2 if with_trust else 1]:
        ac.explain(x_te[:BATCH], trust=trust)  # build the search indices and calibration first
        start = time.perf_counter()
        ac.explain(x_te, k=k, trust=trust)
        times[name] = time.perf_counter() - start
    times["forward_again"] = forward_seconds(model, x_te_t, BATCH)
    fwd = min(times["forward"], times["forward_again"])
    out = {"n": len(x_te), "forward_s": fwd, **{f"{key}_s": v for key, v in times.items()},
           "explain_minus_capture_over_forward": (times["explain"] - times["capture_pass"]) / fwd,
           "similar_searches_over_forward": times["similar_searches"] / fwd,
           "explanations_per_second": len(x_te) / (times["explain"] - times["capture_pass"])}
    if with_trust:
        out["explain_with_trust_minus_capture_over_forward"] = (times["explain_with_trust"] - times["capture_pass"]) / fwd
    print(f"explain {len(x_te)} test inputs: {out['explanations_per_second']:.0f}/s excluding the forward pass; "
          f"that time / one plain forward pass = {out['explain_minus_capture_over_forward']:.2f}, of which the two "
          f"exact searches {out['similar_searches_over_forward']:.2f}"
          + (f" (with trust signals {out['explain_with_trust_minus_capture_over_forward']:.2f})" if with_trust else ""))
    return out


def _report_figures(ac, model, x_tr, x_te, y_te) -> dict:
    from actclust import report

    fwd = forward_seconds(model, torch.from_numpy(x_te), BATCH)
    out = RESULTS / "fashion_report.html"
    start = time.perf_counter()
    report(ac, x_te, y_te, train=x_tr, out=out, n_correct=10, n_wrong=10,
           class_names=list(FASHION_MNIST_CLASSES), overwrite=True)
    build_s = time.perf_counter() - start
    page = {"inputs": 20, "bytes": out.stat().st_size, "build_over_forward": build_s / fwd,
            **_chromium_render(out)}
    print(f"report of 20 inputs: {page['bytes'] / 1e6:.2f} MB, built in {build_s / fwd:.2f} forward passes, "
          f"Chromium load {page.get('render_s', float('nan')):.2f} s, images {page.get('images')}, "
          f"broken {page.get('broken')}, console errors {page.get('console_errors')}")
    out.unlink()  # kept out of the repository: it is regenerated by each run
    return page


def _chromium_render(path) -> dict:
    """Time to load the report in headless Chromium until every image has decoded."""
    import shutil

    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"render_s": None, "note": "playwright not installed"}
    if chromium is None:
        return {"render_s": None, "note": "chromium not installed"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        start = time.perf_counter()
        page.goto(Path(path).resolve().as_uri(), wait_until="load")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        render_s = time.perf_counter() - start
        images = page.evaluate("document.images.length")
        broken = page.evaluate("Array.from(document.images).filter(i => !(i.naturalWidth > 0)).length")
        browser.close()
    return {"render_s": render_s, "images": images, "broken": broken, "console_errors": len(errors)}


_HEADER = False


def _print_row(r):
    global _HEADER
    if not _HEADER:
        print(f"{'method':>7} {'k':>3} {'posterior':>10} {'weights':>7} | {'fid':>6} {'acc':>6} | "
              + " ".join(f"{l + ' fid':>9}" for l in LAYERS) + f" | {'fit/fwd':>7} | {'max spread':>10} | weights")
        _HEADER = True
    per = " ".join(f"{r['per_layer'][l]['fidelity']:>9.4f}" for l in LAYERS)
    w = " ".join(f"{v:.2f}" for v in r["layer_weights"].values())
    print(f"{r['clustering']:>7} {r['n_clusters']:>3} {r['posterior']:>10} {r['weights']:>7} | {r['fidelity']:.4f} "
          f"{r['accuracy']:.4f} | {per} | {r['fit_over_forward']:>7.2f} | {max(r['spread_vs_kmeans'].values()):>10.2f} "
          f"| {w}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
