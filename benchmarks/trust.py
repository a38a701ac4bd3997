"""Trust signals on the Fashion-MNIST CNN against maximum softmax probability and Trust Score.

    python benchmarks/trust.py [--clustering kmeans|distill|idec]

Fits ``ActivationClustering(model, conv1..fc2, n_clusters=15, layer_weights="fit")`` on the
60,000 training images (true labels given, so the neighbour signals use them) and computes
``actclust.trust.trust_signals`` on:

* the 10,000 test images: AUROC of each signal for telling the DNN's right predictions (high)
  from its wrong ones (low);
* out-of-distribution inputs, each against the 10,000 test images (in-distribution high):
  scikit-learn's 1,797 digits (0..16 scaled to [0, 1], bilinearly upscaled from 8x8 to 28x28,
  the same [0, 1] pixel scale as Fashion-MNIST), and the test images with Gaussian noise of
  sigma 0.1 and 0.5, clipped to [0, 1];
* cluster-path metrics on the test images.

Baselines, from their papers' definitions:

* MSP (Hendrycks & Gimpel 2017): the DNN's largest softmax probability.
* Trust Score (Jiang et al. 2018): per class, the training points of that class whose distance
  to their 10th nearest same-class neighbour is within the (1 - alpha) quantile (the
  alpha-high-density set); score = distance to the nearest such set of another class over the
  distance to the set of the predicted class. It uses the same reference/calibration split of
  the training data as our signals; alpha is chosen from {0, 0.05, 0.1, 0.25, 0.5} by
  misclassification AUROC on the calibration split (not on test). Features: the explainer's own
  vectors (mean-pooled, L2-normalised) of fc1, of fc2 and of all four layers concatenated (the
  same layers and data as ours), and the raw penultimate features (relu3 output, unnormalised)
  and raw logits, as in the paper.

Writes ``benchmarks/results/trust.json`` and prints one table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from _common import RESULTS, fashion_cnn, forward_seconds
from sklearn.metrics import roc_auc_score

from actclust import ActivationClustering
from actclust.datasets import load_fashion_mnist

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
BATCH = 256
SIGNALS = ["surrogate_confidence", "surrogate_dnn_agreement", "layer_agreement", "credibility",
           "knn_typicality", "cluster_typicality", "stacked_trust"]
NEIGHBOUR = ["credibility", "knn_typicality", "cluster_typicality"]
ALPHAS = (0.0, 0.05, 0.1, 0.25, 0.5)


class TrustScore:
    """Jiang et al. (2018), Algorithm 1 and 2: alpha-high-density sets per class, then a ratio."""

    def __init__(self, k: int = 10):
        self.k = k

    def fit(self, X, y, n_classes):
        import faiss

        self.X, self.y, self.n_classes = np.ascontiguousarray(X, dtype=np.float32), y, n_classes
        self.radius = np.empty(len(X))
        for c in range(n_classes):
            idx = np.flatnonzero(y == c)
            index = faiss.IndexFlatL2(X.shape[1])
            index.add(self.X[idx])
            d, _ = index.search(self.X[idx], self.k + 1)  # the point itself comes first
            self.radius[idx] = np.sqrt(np.maximum(d[:, -1], 0))
        return self

    def set_alpha(self, alpha: float):
        import faiss

        self.indexes = []
        for c in range(self.n_classes):
            idx = np.flatnonzero(self.y == c)
            keep = idx[self.radius[idx] <= np.quantile(self.radius[idx], 1 - alpha)]
            index = faiss.IndexFlatL2(self.X.shape[1])
            index.add(self.X[keep])
            self.indexes.append(index)
        return self

    def score(self, X, pred):
        X = np.ascontiguousarray(X, dtype=np.float32)
        d = np.sqrt(np.maximum(np.stack([ix.search(X, 1)[0][:, 0] for ix in self.indexes], 1), 0))
        rows = np.arange(len(X))
        d_pred = d[rows, pred]
        d[rows, pred] = np.inf
        return d.min(1) / np.maximum(d_pred, 1e-12)


def raw_features(model, x, batch=1024):
    """Penultimate features (relu3 output) and logits of ``x``, unnormalised."""
    feats = []
    handle = model.relu3.register_forward_hook(lambda m, i, o: feats.append(o.detach().clone()))
    try:
        with torch.no_grad():
            logits = torch.cat([model(b) for b in torch.as_tensor(x).split(batch)])
    finally:
        handle.remove()
    return torch.cat(feats).numpy(), logits.numpy()


def upscaled_digits():
    from sklearn.datasets import load_digits

    d = torch.as_tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]
    return torch.nn.functional.interpolate(d, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1).numpy()


def noisy(x, sigma, seed):
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, sigma, x.shape).astype(np.float32), 0, 1)


def auroc(positive_high, negative_low):
    """AUROC of a score that should be higher on the first set than on the second."""
    s = np.concatenate([positive_high, negative_low])
    return float(roc_auc_score(np.r_[np.ones(len(positive_high)), np.zeros(len(negative_low))], s))


def path_metrics(paths, targets):
    """Distinct paths and weighted path purity: share of inputs in their path's majority class."""
    _, inverse = np.unique(paths, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    n_paths = int(inverse.max()) + 1
    counts = np.zeros((n_paths, int(targets.max()) + 1))
    np.add.at(counts, (inverse, targets), 1)
    return n_paths, float(counts.max(1).sum() / len(paths))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clustering", default="kmeans", help="kmeans | distill | idec, passed to ActivationClustering")
    ap.add_argument("--out", default=str(RESULTS / "trust.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = fashion_cnn()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    sets = {"test": x_te, "digits": upscaled_digits(), "noise0.1": noisy(x_te, 0.1, 1), "noise0.5": noisy(x_te, 0.5, 2)}
    forward_seconds(model, torch.from_numpy(x_te[:1024]), BATCH)  # warm-up

    t0 = time.perf_counter()
    ac = ActivationClustering(model, LAYERS, n_clusters=15, layer_weights="fit", clustering=args.clustering,
                              batch_size=BATCH, progress=False).fit(x_tr, y_tr)
    t1 = time.perf_counter()
    ac.trust(x_te[:10])  # builds and caches the calibration
    t2 = time.perf_counter()
    sig = {name: ac.trust(x) for name, x in sets.items()}
    # This machine is shared: time trust and a plain forward pass back to back, twice, keep the minima.
    fwd_runs, trust_runs = [], []
    for _ in range(2):
        fwd_runs.append(forward_seconds(model, torch.from_numpy(x_te), BATCH))
        t3 = time.perf_counter()
        ac.trust(x_te)
        trust_runs.append(time.perf_counter() - t3)
    fwd, t_trust_test = min(fwd_runs), min(trust_runs)
    # Deep k-NN as published: layers weighed equally in the neighbour signals.
    for name, x in sets.items():
        equal = ac.trust(x, layer_weights="equal")
        sig[name].update({f"{s} (equal layers)": equal[s] for s in NEIGHBOUR})

    # Baselines on the same split: reference (neighbours) and calibration (tuning alpha).
    n_cal = round(0.1 * len(x_tr))
    order = np.random.default_rng(ac.random_state).permutation(len(x_tr))
    cal, ref = order[:n_cal], order[n_cal:]
    feats = {"explainer fc1": lambda v: v["fc1"], "explainer fc2": lambda v: v["fc2"],
             "explainer all 4 layers": lambda v: np.concatenate([v[l] for l in LAYERS], 1)}
    train_feats = {k: f(ac.train_vectors_) for k, f in feats.items()}
    set_feats = {name: {k: f(ac.query(x, vectors=True).vectors) for k, f in feats.items()} for name, x in sets.items()}
    raw_tr, raw = raw_features(model, x_tr), {name: raw_features(model, x) for name, x in sets.items()}
    for k, i in (("raw penultimate (relu3)", 0), ("raw logits (fc2)", 1)):
        train_feats[k] = raw_tr[i]
        for name in sets:
            set_feats[name][k] = raw[name][i]
    msp = {name: torch.softmax(torch.as_tensor(v[1]), 1).max(1).values.numpy().astype(np.float64)
           for name, v in raw.items()}
    pred = {name: s["dnn_prediction"] for name, s in sig.items()}
    cal_pred = ac.train_predictions_[cal]
    cal_right = cal_pred == y_tr[cal]
    ours = SIGNALS + [f"{s} (equal layers)" for s in NEIGHBOUR]
    scores = {name: {s: sig[name][s] for s in ours} for name in sets}
    for name in sets:
        scores[name]["MSP (baseline)"] = msp[name]
    ts_alpha = {}
    for k in train_feats:
        ts = TrustScore().fit(train_feats[k][ref], y_tr[ref], 10)
        best = max(ALPHAS, key=lambda a: auroc(*_split(ts.set_alpha(a).score(train_feats[k][cal], cal_pred), cal_right)))
        ts.set_alpha(best)
        ts_alpha[k] = best
        for name in sets:
            scores[name][f"Trust Score {k} (baseline)"] = ts.score(set_feats[name][k], pred[name])

    right = pred["test"] == y_te
    rows = {}
    for s in scores["test"]:
        te = scores["test"][s]
        rows[s] = {"misclassification": auroc(*_split(te, right)),
                   **{f"ood_{name}": auroc(te, scores[name][s]) for name in ("digits", "noise0.1", "noise0.5")}}

    q_te, q_noise = ac.query(x_te), ac.query(sets["noise0.1"])
    p_te, p_noise = q_te.paths, q_noise.paths
    n_paths, purity_pred = path_metrics(p_te, q_te.dnn_pred)
    _, purity_label = path_metrics(p_te, y_te)
    n_paths_tr, purity_tr = path_metrics(np.stack([ac.clusterings_[l].predict(ac.train_vectors_[l]) for l in LAYERS], 1),
                                         ac.train_predictions_)
    paths = {"n_distinct_paths_test": n_paths, "n_distinct_paths_train": n_paths_tr,
             "weighted_purity_dnn_prediction_test": purity_pred, "weighted_purity_true_label_test": purity_label,
             "weighted_purity_dnn_prediction_train": purity_tr,
             "path_agreement_noise0.1": float((p_te == p_noise).all(1).mean()),
             "layer_agreement_noise0.1": {l: float((p_te[:, i] == p_noise[:, i]).mean()) for i, l in enumerate(LAYERS)}}

    best_ours = max(ours, key=lambda s: rows[s]["misclassification"])
    best_base = max((s for s in rows if "baseline" in s), key=lambda s: rows[s]["misclassification"])
    gain_ci = {base: _bootstrap_gain(scores["test"][best_ours], scores["test"][base], right)
               for base in (best_base, "MSP (baseline)")}
    result = {
        "clustering": args.clustering, "dnn_test_accuracy": float(right.mean()), "n_test_errors": int((~right).sum()),
        "dnn_accuracy_noise": {n: float((pred[n] == y_te).mean()) for n in ("noise0.1", "noise0.5")},
        "fidelity_test": float((sig["test"]["surrogate_prediction"] == pred["test"]).mean()),
        "auroc": rows, "trust_score_alpha": ts_alpha, "cluster_paths": paths,
        "best_ours_misclassification": [best_ours, rows[best_ours]["misclassification"]],
        "best_baseline_misclassification": [best_base, rows[best_base]["misclassification"]],
        "bootstrap_gain_95ci": gain_ci,
        "seconds": {"fit": t1 - t0, "calibration": t2 - t1, "trust_test_10k": t_trust_test, "forward_test_10k": fwd},
        "trust_over_forward": t_trust_test / fwd, "calibration_over_forward": (t2 - t1) / fwd,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    print(f"clustering={args.clustering}  DNN test accuracy {right.mean():.4f} ({(~right).sum()} errors), "
          f"surrogate fidelity {result['fidelity_test']:.4f}; DNN accuracy with noise 0.1 / 0.5: "
          f"{result['dnn_accuracy_noise']['noise0.1']:.4f} / {result['dnn_accuracy_noise']['noise0.5']:.4f}")
    print("| signal | misclassification | OOD digits | OOD noise 0.1 | OOD noise 0.5 |")
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        label = s.replace("(baseline)", f"(baseline, alpha={ts_alpha[s[12:-11]]})") if s.startswith("Trust Score") else s
        print(f"| {label} | {r['misclassification']:.4f} | {r['ood_digits']:.4f} | {r['ood_noise0.1']:.4f} | "
              f"{r['ood_noise0.5']:.4f} |")
    print(f"cluster paths (test): {n_paths} distinct (train {n_paths_tr}); weighted purity {purity_pred:.4f} "
          f"(DNN prediction), {purity_label:.4f} (true label); identical path under noise 0.1: "
          f"{paths['path_agreement_noise0.1']:.4f}; per layer {paths['layer_agreement_noise0.1']}")
    print(f"trust on 10k test: {t_trust_test:.1f} s = {result['trust_over_forward']:.2f}x a forward pass ({fwd:.1f} s); "
          f"calibration {t2 - t1:.1f} s; fit {t1 - t0:.1f} s")
    gap = rows[best_ours]["misclassification"] - rows[best_base]["misclassification"]
    print(f"misclassification: best ours {best_ours} {rows[best_ours]['misclassification']:.4f}, best baseline "
          f"{best_base} {rows[best_base]['misclassification']:.4f}: {gap:+.4f} (bar +0.02)")
    for base, (lo, hi) in gain_ci.items():
        print(f"  bootstrap 95% interval of the AUROC gain of {best_ours} over {base}: [{lo:+.4f}, {hi:+.4f}]")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


def _bootstrap_gain(ours, base, right, n_boot: int = 1000, seed: int = 0):
    """95% interval of AUROC(ours) - AUROC(base) for misclassification, resampling test inputs."""
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n_boot):
        i = rng.integers(0, len(right), len(right))
        gains.append(auroc(*_split(ours[i], right[i])) - auroc(*_split(base[i], right[i])))
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return float(lo), float(hi)


def _split(score, right):
    return score[right], score[~right]


if __name__ == "__main__":
    raise SystemExit(main())
