"""Trust signals on Fashion-MNIST CNNs against published baselines, over several trainings.

    python benchmarks/trust.py [--seeds 3] [--clustering kmeans|distill|idec] [--layers conv1,conv2,fc1,fc2]

For each seed s in 0..seeds-1 a CNN (``actclust.models.fashion_cnn``, 6 epochs, seed s) is
trained on 54,000 Fashion-MNIST training images (cached under ``benchmarks/.cache``; the
SHA-256 of its weights goes into the JSON, so a rerun can tell whether it used the same network).
The other 6,000 training images, the same for every seed and never seen by the network, are the
**calibration split**: every choice of every signal, ours and the baselines', is made on it.

``ActivationClustering(model, conv1..fc2, n_clusters=15, layer_weights="fit")`` is fitted on the
54,000 with their labels; its trust signals are calibrated on the calibration split
(``ac.trust(x, calibration=ac.query(x_cal, y_cal, vectors=True))``) and, for comparison, on
trust's own split of the training images (``ac.trust(x)``). AUROCs:

* misclassification: the DNN's right test predictions (high) against its wrong ones (low);
* out-of-distribution, each against the 10,000 test images: scikit-learn's digits upscaled to
  28x28 (far), the test images with Gaussian noise of sigma 0.1 (near) and 0.5, clipped to [0, 1].

Baselines (``actclust.baselines``), each at its published strength, settings chosen by
misclassification AUROC on the calibration split: maximum softmax probability; energy
(``logsumexp`` of the logits); Mahalanobis distance to class means with a shared covariance on
the penultimate features (relu3); Trust Score with the reference scoring, k in {1, 2, 5, 10},
alpha in {0, 0.05, 0.1}, on the penultimate features, the logits, or the explainer's own
vectors of fc1, fc2 or all four layers; deep k-NN credibility with equal layers and the
published k = 75. Per seed, the gain of our best signal over the best baseline (the best on
*test*, the strictest comparison) with a 95% bootstrap interval over test inputs.

Without labels: the same explainer fitted without ``y`` and calibrated without labels: which
signals it gives and warns about, and its best signal against max-softmax.

Writes ``benchmarks/results/trust.json`` (``--out``) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np
import torch
from _common import RESULTS, forward_seconds
from explore_trust import LAYERS, eval_sets, raw_features, sha256, split, trained_cnn
from sklearn.metrics import roc_auc_score

from actclust import ActivationClustering
from actclust.analysis.baselines import Mahalanobis, TrustScore, energy, max_softmax
from actclust.datasets import load_fashion_mnist

BATCH = 256
SIGNALS = ["stacked_trust", "credibility", "surrogate_dnn_agreement", "surrogate_confidence", "layer_agreement",
           "knn_typicality", "cluster_typicality", "ood_typicality", "dnn_confidence"]
OOD_SETS = ("digits", "noise0.1", "noise0.5")
TS_K, TS_ALPHA = (1, 2, 5, 10), (0.0, 0.05, 0.1)


def auroc(high, low):
    """AUROC of a score that should be higher on the first set than on the second."""
    return float(roc_auc_score(np.r_[np.ones(len(high)), np.zeros(len(low))], np.r_[high, low]))


def mis_auroc(score, right):
    return auroc(score[right], score[~right])


def bootstrap_gain(ours, base, right, n_boot: int = 1000, seed: int = 0):
    """95% interval of AUROC(ours) - AUROC(base) for misclassification, resampling test inputs."""
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n_boot):
        i = rng.integers(0, len(right), len(right))
        gains.append(mis_auroc(ours[i], right[i]) - mis_auroc(base[i], right[i]))
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return float(lo), float(hi)


def run_seed(seed: int, clustering: str, layers=LAYERS) -> dict:
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    fit_idx, cal_idx = split()
    x_fit, y_fit = x_tr[fit_idx], y_tr[fit_idx]
    model, wpath = trained_cnn(seed, x_fit, y_fit)
    sets = eval_sets(x_tr, x_te)  # cal, test, digits, noise0.1, noise0.5
    y_cal = y_tr[cal_idx]
    forward_seconds(model, torch.from_numpy(x_te[:1024]), BATCH)  # warm-up
    t0 = time.perf_counter()
    ac = ActivationClustering(model, layers, n_clusters=15, layer_weights="fit", clustering=clustering,
                              batch_size=BATCH, progress=False).fit(x_fit, y_fit)
    t_fit = time.perf_counter() - t0
    q_cal = ac.query(sets["cal"], y_cal, vectors=True)
    t0 = time.perf_counter()
    ac.trust(x_te[:10], calibration=q_cal)  # builds and caches the calibration
    t_cal = time.perf_counter() - t0
    queries = {name: ac.query(x, vectors=True) for name, x in sets.items() if name != "cal"}
    from actclust.analysis.trust import trust_signals

    ours = {name: trust_signals(ac.state_, q, calibration=q_cal) for name, q in queries.items()}
    own_split = {name: trust_signals(ac.state_, q) for name, q in queries.items()}
    fwd = forward_seconds(model, torch.from_numpy(x_te), BATCH)
    t0 = time.perf_counter()
    trust_signals(ac.state_, queries["test"], calibration=q_cal)
    t_trust = time.perf_counter() - t0

    pred = {name: q.dnn_pred for name, q in queries.items()}
    cal_pred = q_cal.dnn_pred
    right, cal_right = pred["test"] == y_te, cal_pred == y_cal
    scores = {name: {s: ours[name][s] for s in SIGNALS if s in ours[name]} for name in queries}
    for name in queries:
        scores[name].update({f"{s} (trust's own split)": own_split[name][s] for s in ("stacked_trust", "credibility")})

    # ---- baselines, settings chosen on the calibration split
    raw = {name: raw_features(model, x) for name, x in sets.items()}
    pen_fit, logits_fit = raw_features(model, x_fit)
    baseline, chosen = {name: {} for name in queries}, {}
    for name in queries:
        baseline[name]["max-softmax"] = max_softmax(raw[name][1])
        baseline[name]["energy"] = energy(raw[name][1])
    maha = Mahalanobis().fit(pen_fit, y_fit)
    for name in queries:
        baseline[name]["Mahalanobis (penultimate)"] = maha.score(raw[name][0])
    vec = {f"explainer {layers[-2]}": lambda v: v[layers[-2]], f"explainer {layers[-1]}": lambda v: v[layers[-1]],
           "explainer all layers": lambda v: np.concatenate([v[l] for l in layers], 1)}
    feats = {"penultimate": (pen_fit, {n: raw[n][0] for n in sets}),
             "logits": (logits_fit, {n: raw[n][1] for n in sets})}
    for k, f in vec.items():
        feats[k] = (f(ac.train_vectors_), {n: f(q.vectors) for n, q in [("cal", q_cal), *queries.items()]})
    best_cal, best_ts = -1.0, None
    for fname, (train_f, set_f) in feats.items():
        for alpha in TS_ALPHA:  # the alpha-filtered sets do not depend on k: one search serves every k
            ts = TrustScore(k=max(TS_K), alpha=alpha).fit(train_f, y_fit)
            for k, score in _trust_scores_by_k(ts, set_f["cal"], cal_pred).items():
                a = mis_auroc(score, cal_right)
                if a > best_cal:
                    best_cal, best_ts = a, (fname, k, alpha)
    fname, k, alpha = best_ts
    ts = TrustScore(k=k, alpha=alpha).fit(feats[fname][0], y_fit)
    chosen["Trust Score"] = {"features": fname, "k": k, "alpha": alpha, "calibration_auroc": best_cal}
    for name in queries:
        baseline[name]["Trust Score"] = ts.score(feats[fname][1][name], pred[name])
    # Trust Score k=2 (the reference default) on the same features, for the record
    ts2 = TrustScore(k=2).fit(feats[fname][0], y_fit)
    for name in queries:
        baseline[name]["Trust Score k=2, alpha=0"] = ts2.score(feats[fname][1][name], pred[name])
    for name, q in queries.items():
        baseline[name]["deep k-NN credibility (equal layers, k=75)"] = trust_signals(
            ac.state_, q, n_neighbors=75, layer_weights="equal", calibration=q_cal)["credibility"]

    rows = {}
    for group, table in (("ours", scores), ("baseline", baseline)):
        for s in table["test"]:
            rows[s] = {"group": group, "misclassification": mis_auroc(table["test"][s], right),
                       **{f"ood_{n}": auroc(table["test"][s], table[n][s]) for n in OOD_SETS}}
    best_base = max((s for s in rows if rows[s]["group"] == "baseline"), key=lambda s: rows[s]["misclassification"])
    best_ours = "stacked_trust"  # designated in advance (benchmarks/explore_trust.py), not picked on test
    gain = rows[best_ours]["misclassification"] - rows[best_base]["misclassification"]
    ci = bootstrap_gain(scores["test"][best_ours], baseline["test"][best_base], right)
    near_ours = max((s for s in rows if rows[s]["group"] == "ours"), key=lambda s: rows[s]["ood_noise0.1"])

    # ---- without labels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ac_nl = ActivationClustering(model, layers, n_clusters=15, layer_weights=None, clustering=clustering,
                                     batch_size=BATCH, progress=False).fit(x_fit)
        nl = trust_signals(ac_nl.state_, ac_nl.query(x_te, vectors=True), calibration=ac_nl.query(sets["cal"],
                                                                                                    vectors=True))
    unlabeled = {s: mis_auroc(v, right) for s, v in nl.items() if not s.endswith("_prediction")}
    return {
        "seed": seed, "weights_sha256": sha256(wpath), "dnn_test_accuracy": float(right.mean()),
        "n_test_errors": int((~right).sum()), "n_calibration_errors": int((~cal_right).sum()),
        "fidelity_test": float((ours["test"]["surrogate_prediction"] == pred["test"]).mean()),
        "auroc": rows, "baseline_settings": chosen, "best_baseline": best_base, "best_ours": best_ours,
        "gain_over_best_baseline": gain, "gain_95ci": ci, "best_near_ood": near_ours,
        "unlabeled": {"misclassification_auroc": unlabeled,
                      "max_softmax": rows["max-softmax"]["misclassification"],
                      "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught})},
        "seconds": {"fit": t_fit, "calibration": t_cal, "trust_test_10k": t_trust, "forward_test_10k": fwd},
        "trust_over_forward": t_trust / fwd, "calibration_over_forward": t_cal / fwd,
    }


def _trust_scores_by_k(ts: TrustScore, X, pred) -> dict:
    """``TrustScore(k).score(X, pred)`` for every k in TS_K from one search of depth max(TS_K) of
    ``ts``'s fitted per-class sets (the same sets for every k)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    d = np.sqrt(np.maximum(np.stack([ix.search(X, max(TS_K))[0] for ix in ts.indexes_], 1), 0))  # (n, C, K)
    rows, out = np.arange(len(X)), {}
    for k in TS_K:
        dk = d[:, :, k - 1].astype(np.float64)
        d_pred = dk[rows, pred].copy()
        dk[rows, pred] = np.inf
        out[k] = dk.min(1) / (d_pred + 1e-12)
    return out


def summary(runs: list) -> dict:
    names = list(runs[0]["auroc"])
    cols = ["misclassification"] + [f"ood_{n}" for n in OOD_SETS]
    out = {}
    for s in names:
        out[s] = {c: {"mean": float(np.mean([r["auroc"][s][c] for r in runs])),
                      "min": float(np.min([r["auroc"][s][c] for r in runs])),
                      "max": float(np.max([r["auroc"][s][c] for r in runs]))} for c in cols}
        out[s]["group"] = runs[0]["auroc"][s]["group"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="train and measure seeds 0..N-1")
    ap.add_argument("--clustering", default="kmeans", help="kmeans | distill | idec, passed to ActivationClustering")
    ap.add_argument("--layers", default=",".join(LAYERS),
                    help="layers to explain (default conv1,conv2,fc1,fc2; relu1,relu2,relu3,fc2 hooks after the ReLUs)")
    ap.add_argument("--out", default=str(RESULTS / "trust.json"))
    args = ap.parse_args(argv)
    layers = args.layers.split(",")
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(seed, args.clustering, layers))
        r = runs[-1]
        print(f"seed {seed}: DNN test accuracy {r['dnn_test_accuracy']:.4f} ({r['n_test_errors']} errors; "
              f"{r['n_calibration_errors']} on the calibration split), fidelity {r['fidelity_test']:.4f}, "
              f"weights sha256 {r['weights_sha256'][:16]}", flush=True)
        print(f"  {r['best_ours']} {r['auroc'][r['best_ours']]['misclassification']:.4f} vs best baseline "
              f"{r['best_baseline']} {r['auroc'][r['best_baseline']]['misclassification']:.4f}: "
              f"{r['gain_over_best_baseline']:+.4f}, 95% interval [{r['gain_95ci'][0]:+.4f}, {r['gain_95ci'][1]:+.4f}]; "
              f"Trust Score chosen: {r['baseline_settings']['Trust Score']}", flush=True)
    table = summary(runs)
    print(f"\nAUROC, mean over {len(runs)} seeds [min, max]  (clustering={args.clustering}, layers={layers})")
    print("| signal | misclassification | OOD digits | OOD noise 0.1 | OOD noise 0.5 |")
    print("|---|---|---|---|---|")
    for s, v in table.items():
        label = s + (" (baseline)" if v["group"] == "baseline" else "")
        print(f"| {label} | " + " | ".join(f"{v[c]['mean']:.4f} [{v[c]['min']:.4f}, {v[c]['max']:.4f}]"
                                            for c in ("misclassification", "ood_digits", "ood_noise0.1",
                                                      "ood_noise0.5")) + " |")
    print("\n| seed | best baseline (test) | its AUROC | stacked_trust | gain | 95% interval | best near-OOD (ours) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['seed']} | {r['best_baseline']} | {r['auroc'][r['best_baseline']]['misclassification']:.4f} | "
              f"{r['auroc']['stacked_trust']['misclassification']:.4f} | {r['gain_over_best_baseline']:+.4f} | "
              f"[{r['gain_95ci'][0]:+.4f}, {r['gain_95ci'][1]:+.4f}] | {r['best_near_ood']} "
              f"{r['auroc'][r['best_near_ood']]['ood_noise0.1']:.4f} |")
    print("\nwithout labels (misclassification AUROC): " + "; ".join(
        f"seed {r['seed']}: best {max(r['unlabeled']['misclassification_auroc'].items(), key=lambda kv: kv[1])} "
        f"vs max-softmax {r['unlabeled']['max_softmax']:.4f}" for r in runs))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"clustering": args.clustering, "layers": layers, "seeds": runs, "summary": table,
                   "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                               "torch": torch.__version__}}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
