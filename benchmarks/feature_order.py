"""Which features should a table of one input show first? A measured choice (issue 21).

A report, notebook card or explorer page shows a tabular input as a table of at most 12 rows, so
the order decides what a reader sees. Candidates, each a score per feature (largest first):

* ``file``: the columns in file order (what the report did before);
* ``z``: departure from the training mean in training standard deviations, ``|x_j - m_j| / s_j``;
* ``cluster_first`` / ``cluster_last``: departure from the centre of the input's cluster in the first /
  last clustered layer, in input space (the mean of the cluster's training members), ``|x_j - c_j| / s_j``;
* ``cluster_mean``: the mean over all clustered layers of those departures;
* ``cluster_signature_last``: how the input's last-layer cluster departs from the mean, ``|c_j - m_j| / s_j``
  (the same for every member);
* ``z_along_cluster_last``: the input's departure along its cluster's, ``max(0, z_j g_j)`` with
  ``z_j = (x_j - m_j) / s_j`` and ``g_j = (c_j - m_j) / s_j``: what :mod:`actclust.views.features` uses.

Truth: how much the model's probability of its predicted class depends on the feature's value in
this input, per input: the mean absolute change when ``x_j`` is replaced by 32 values drawn from
the training data's column ``j``, in log-probability (an interventional, per-input permutation
importance; it takes no side between the training mean and the clusters). Score: precision@5 and @12 of each order against
the truth's top 5 / 12, and Spearman's rank correlation, averaged over 300 test inputs.

Data: scikit-learn's bundled breast cancer (30 features), wine (13) and digits (64 pixel features
read as a table), standardised on the training split; a small MLP trained on each (seeded); an
``ActivationClustering`` over its hidden layers. ``python benchmarks/feature_order.py`` (about a
minute on 2 cores); results in ``benchmarks/results/feature_order.json``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn import datasets
from sklearn.model_selection import train_test_split
from torch import nn

from _common import RESULTS
from actclust import ActivationClustering
from actclust.analysis.concepts import train_assignments

DRAWS, N_TEST, SEED = 32, 300, 0


def mlp(d_in: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, n_classes))


def train(model, x, y, epochs=60):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def proba(model, x):
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x, np.float32))), 1).numpy()


def truth(model, x_test, x_train, rng):
    """(n, F): mean |log p_pred(x) - log p_pred(x with x_j drawn from the training column)| over DRAWS draws
    (log probabilities: a confident model's probabilities hardly move, their logarithms do)."""
    n, f = x_test.shape
    p0 = proba(model, x_test)
    pred = p0.argmax(1)
    out = np.zeros((n, f))
    for j in range(f):
        draws = x_train[rng.integers(0, len(x_train), (n, DRAWS)), j]  # (n, DRAWS)
        x = np.repeat(x_test[:, None, :], DRAWS, 1)
        x[:, :, j] = draws
        p = proba(model, x.reshape(-1, f)).reshape(n, DRAWS, -1)
        lp, lp0 = np.log(p[np.arange(n), :, pred] + 1e-12), np.log(p0[np.arange(n), pred] + 1e-12)
        out[:, j] = np.abs(lp - lp0[:, None]).mean(1)
    return out


def one(name, x, y):
    x = x.astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    torch.manual_seed(SEED)
    n_classes = int(y.max()) + 1
    model = train(mlp(x.shape[1], n_classes), x_tr, y_tr.astype(np.int64))
    acc = float((proba(model, x_te).argmax(1) == y_te).mean())
    layers = ["1", "3", "4"]
    ac = ActivationClustering(model, layers, n_clusters=min(15, len(x_tr) // 10), progress=False).fit(x_tr, y_tr)
    rng = np.random.default_rng(SEED)
    x_q = x_te[rng.choice(len(x_te), min(N_TEST, len(x_te)), replace=False)]
    t = truth(model, x_q, x_tr, rng)
    s = x_tr.std(0) + 1e-12
    scores = {"file": np.tile(-np.arange(x.shape[1], dtype=float), (len(x_q), 1)),
              "z": np.abs(x_q - x_tr.mean(0)) / s}
    paths = ac.cluster_paths(x_q)
    per_layer = []
    for j, l in enumerate(layers):
        assign, _ = train_assignments(ac.state_, l)
        k = ac.clusterings_[l].n_clusters
        counts = np.bincount(assign, minlength=k)[:, None]
        centres = np.stack([np.bincount(assign, weights=x_tr[:, f], minlength=k) for f in range(x.shape[1])], 1)
        centres = np.where(counts > 0, centres / np.maximum(counts, 1), x_tr.mean(0))
        per_layer.append(np.abs(x_q - centres[paths[:, j]]) / s)
        signature = (centres[paths[:, j]] - x_tr.mean(0)) / s  # how the input's cluster departs from the mean
        if j == len(layers) - 1:
            scores["cluster_signature_last"] = np.abs(signature)
            scores["z_along_cluster_last"] = np.maximum(signature * (x_q - x_tr.mean(0)) / s, 0)
    scores["cluster_first"], scores["cluster_last"] = per_layer[0], per_layer[-1]
    scores["cluster_mean"] = np.mean(per_layer, 0)
    out = {"features": int(x.shape[1]), "train": int(len(x_tr)), "queries": int(len(x_q)), "dnn_test_accuracy": acc}
    for order, sc in scores.items():
        res = {}
        for top in (5, 12):
            top = min(top, x.shape[1])
            got = np.argsort(-sc, 1, kind="stable")[:, :top]
            want = np.argsort(-t, 1, kind="stable")[:, :top]
            res[f"precision@{top}"] = float(np.mean([len(set(a) & set(b)) / top for a, b in zip(got, want)]))
        res["spearman"] = float(np.nanmean([spearmanr(a, b)[0] for a, b in zip(sc, t)]))
        out[order] = res
    return out


def main():
    t0 = time.perf_counter()
    results = {}
    for name, loader in (("breast_cancer", datasets.load_breast_cancer), ("wine", datasets.load_wine),
                         ("digits", datasets.load_digits)):
        d = loader()
        results[name] = one(name, d.data, d.target)
    orders = ["file", "z", "cluster_first", "cluster_last", "cluster_mean", "cluster_signature_last",
              "z_along_cluster_last"]
    print(f"| data set | features | {' | '.join(orders)} |  (precision@5 / spearman)")
    print("|---|---|" + "---|" * len(orders))
    for name, r in results.items():
        print(f"| {name} | {r['features']} | " + " | ".join(f"{r[o]['precision@5']:.3f} / {r[o]['spearman']:.3f}"
                                                         for o in orders) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feature_order.json").write_text(json.dumps(
        {"results": results, "seconds": time.perf_counter() - t0, "draws": DRAWS, "seed": SEED}, indent=1))


if __name__ == "__main__":
    main()
