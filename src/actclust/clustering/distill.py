"""``clustering="distill"``: k-means refined jointly over layers to match the DNN's predictions.

Plain k-means places centres to compress each layer's activations; nothing asks the clusters to
separate the classes the DNN predicts. :func:`refine` starts from the k-means centres of every
layer and descends, with all layers at once,

``KL(DNN softmax || surrogate) + lambda_kmeans * sum_l mean_i sum_c A_lic ||v_li - c||^2 / scale_l``

over the centres, a per-layer assignment temperature (relative to ``scale_``, as in
:meth:`Clustering.soft_assign`) and, optionally, the layer weights (softmax-parameterised).

The posterior keeps its meaning: it is never a free parameter but, at every step, the soft-count
class mix ``normalise(A_l^T Y + smoothing * prior)`` of the targets ``Y`` (the DNN's predicted
classes, one-hot, as :func:`actclust.analysis.surrogate.fit_posteriors` computes it after fitting) over the
samples assigned to each cluster. The k-means term keeps the clusters compact, so they remain
groups of similar activations one can look at. Early stopping watches the loss on a held-out part.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .base import KMeans, register
from ..exceptions import DistillWarning, ParameterError
from ..store.vectors import take

__all__ = ["DistillKMeans", "DistillResult", "DistillWarning", "refine"]




@dataclass
class DistillResult:
    """What :func:`refine` learned.

    Attributes
    ----------
    centers : dict of str to ndarray of shape (k, d), float32
    temperatures : dict of str to float
        Assignment temperature per layer, relative to the **input** clustering's ``scale_``
        (``softmax(-d^2 / (t * scale_))``); see :func:`DistillKMeans.from_refinement` for the
        value relative to the scale of the refined centres.
    weights : ndarray of shape (n_layers,)
        Layer weights in the order of ``vectors``, summing to 1.
    loss_history : list of dict
        Per evaluation: ``step``, held-out ``val_kl`` and ``val_fidelity`` (agreement with the
        DNN's predicted class), and the training objective ``train`` (KL + spread terms).
    spread_ratio : dict of str to float
        Within-cluster mean squared distance (nearest centre) after refinement over plain k-means',
        on all the training vectors.
    converged : bool
    best_step : int
    seconds : float
    """

    centers: dict
    temperatures: dict
    weights: np.ndarray
    loss_history: list = field(default_factory=list)
    spread_ratio: dict = field(default_factory=dict)
    converged: bool = True
    best_step: int = 0
    seconds: float = 0.0


_DEFAULTS = {
    "init_temperature": 0.1, "lambda_kmeans": 0.1, "max_spread_ratio": 1.2, "lr": 0.2, "max_steps": 150, "eval_every": 10,
    "patience": 3, "tol": 2e-3, "validation_fraction": 0.15, "max_samples": 8_000, "n_threads": 1,
}
_SPREAD_PENALTY = 100.0


def refine(vectors, clusterings, dnn_proba, *, learn_weights: bool, smoothing: float = 1.0, targets=None,
           weights=None, random_state: int = 0, progress: bool = False, **options) -> DistillResult:
    """Refine k-means clusterings of several layers so that the surrogate matches the DNN.

    Parameters
    ----------
    vectors : dict of str to ndarray of shape (n, d_l)
        The training vectors of each layer (as clustered).
    clusterings : dict of str to Clustering
        Fitted clusterings of the same layers (``centers_`` and ``scale_`` are read, not changed).
    dnn_proba : ndarray of shape (n, n_classes)
        The DNN's softmax on the same samples; the loss is ``KL(dnn_proba || surrogate)``.
    learn_weights : bool
        Learn the layer weights (softmax-parameterised); otherwise keep ``weights`` fixed.
    smoothing : float, default=1.0
        Pseudo-count pulling each cluster's class mix toward the overall mix, as in the surrogate.
    targets : ndarray of shape (n,), optional
        Class indices whose soft counts make the posteriors (default: ``dnn_proba.argmax(1)``;
        pass true labels for ``posterior="label"``).
    weights : array of shape (n_layers,), optional
        Initial (or, with ``learn_weights=False``, fixed) layer weights; default equal.
    random_state : int, default=0
        Seeds the held-out split and the sub-sample.
    **options
        ``init_temperature`` (0.1), ``lambda_kmeans`` (0.1, weight of the spread term),
        ``max_spread_ratio`` (1.2: a steep penalty holds each layer's soft within-cluster spread
        below this multiple of k-means'), ``lr`` (0.2, Adam; centres move in units of
        their cluster radius), ``max_steps`` (150 full-batch
        steps), ``eval_every`` (10), ``patience`` (3 evaluations without improvement of the
        held-out KL by ``tol`` = 2e-3), ``validation_fraction`` (0.15), ``max_samples``
        (8,000: steps use at most this many training samples, drawn once; the held-out part is
        capped at a quarter of it),
        ``n_threads`` (1: torch threads during the refinement, restored afterwards; the tensors
        are small, and on 2 shared cores two threads ran 4-10x slower than one; None keeps
        torch's setting).

    Returns
    -------
    DistillResult

    Warns
    -----
    DistillWarning
        When the loss becomes non-finite (the best finite state is returned, or the k-means
        start) or the step budget ends while the held-out KL still improves.
    """
    from ..deps import require

    torch = require("torch", "clustering='distill'")
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ParameterError(f"refine() got unknown options {unknown}; allowed: {sorted(_DEFAULTS)}.")
    opt = {**_DEFAULTS, **options}
    layers = list(vectors)
    if not layers or set(layers) != set(clusterings):
        raise ParameterError(
            f"vectors and clusterings must name the same non-empty set of layers; got {sorted(vectors)} "
            f"and {sorted(clusterings)}."
        )
    proba = np.asarray(dnn_proba, dtype=np.float32)
    n = len(proba)
    if proba.ndim != 2 or not np.all(np.isfinite(proba)) or (proba < 0).any():
        raise ParameterError(f"dnn_proba must be a finite, non-negative (n, n_classes) array; got shape {proba.shape}.")
    bad = [l for l in layers if len(vectors[l]) != n]
    if bad:
        raise ParameterError(f"vectors of layers {bad} do not have one row per row of dnn_proba ({n}).")
    if not 0 < opt["validation_fraction"] < 1:
        raise ParameterError(
            f"The 'validation_fraction' option of refine must be in (0, 1). Got {opt['validation_fraction']!r} instead."
        )
    if opt["init_temperature"] <= 0:
        raise ParameterError(f"The 'init_temperature' option of refine must be > 0. Got {opt['init_temperature']!r} instead.")
    n_classes = proba.shape[1]
    y = proba.argmax(1) if targets is None else np.asarray(targets, dtype=np.int64)
    w0 = np.full(len(layers), 1.0 / len(layers)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w0.shape != (len(layers),) or (w0 < 0).any() or w0.sum() <= 0:
        raise ParameterError(f"weights must be {len(layers)} non-negative numbers, not all zero; got {weights!r}.")
    w0 = w0 / w0.sum()

    start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if opt["n_threads"]:
        torch.set_num_threads(int(opt["n_threads"]))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_state)
            result = _refine(layers, vectors, clusterings, proba, y, n_classes, w0, learn_weights, smoothing,
                             random_state, opt, progress=progress)
    finally:
        torch.set_num_threads(old_threads)
    result.seconds = time.perf_counter() - start
    return result


def _refine(layers, vectors, clusterings, proba, y, n_classes, w0, learn_weights, smoothing, seed, opt,
            progress=False):
    import torch

    rng = np.random.default_rng(seed)
    n = len(proba)
    order = rng.permutation(n)
    n_val = max(1, round(opt["validation_fraction"] * n))
    val, train = order[:n_val], order[n_val:]
    train = np.sort(train[: opt["max_samples"]])
    val = np.sort(val[: max(1, opt["max_samples"] // 4)])

    def tensors(idx):
        return ([torch.from_numpy(take(vectors[l], idx)) for l in layers],
                torch.from_numpy(proba[idx]), torch.from_numpy(y[idx]))

    xs_tr, p_tr, y_tr = tensors(train)
    xs_val, p_val, _y_val = tensors(val)
    onehot = torch.nn.functional.one_hot(y_tr, n_classes).float()
    prior = onehot.mean(0)
    scales = torch.tensor([c.scale_ for c in (clusterings[l] for l in layers)], dtype=torch.float32)
    # Centres move in units of their layer's cluster radius, so one learning rate suits layers
    # whose activations differ in scale by orders of magnitude (conv1's clusters here are 15x
    # tighter than fc1's): c = c0 + sqrt(scale_ / d) * delta.
    start = [torch.from_numpy(np.array(clusterings[l].centers_, dtype=np.float32)) for l in layers]
    unit = [float(np.sqrt(clusterings[l].scale_ / start[i].shape[1])) for i, l in enumerate(layers)]
    deltas = [torch.nn.Parameter(torch.zeros_like(c)) for c in start]
    centers = [None] * len(layers)

    def place():
        for i in range(len(layers)):
            centers[i] = start[i] + unit[i] * deltas[i]
    log_t = torch.nn.Parameter(torch.full((len(layers),), float(np.log(opt["init_temperature"]))))
    w_logit = torch.nn.Parameter(torch.from_numpy(np.log(np.maximum(w0, 1e-6)).astype(np.float32)))
    params = deltas + [log_t] + ([w_logit] if learn_weights else [])
    optim = torch.optim.Adam(params, lr=opt["lr"])
    lam, max_ratio = float(opt["lambda_kmeans"]), float(opt["max_spread_ratio"])

    def assign(x, i):
        c = centers[i]
        d2 = ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.t() + (c * c).sum(1)).clamp_min(0.0)
        return torch.softmax(-d2 / (log_t[i].exp() * scales[i]), 1), d2

    def loss_on(xs, p, post=None):
        """Loss, surrogate distribution and the posteriors (fitted on ``xs`` when not given)."""
        place()
        mix, kmeans_term, posts = 0.0, 0.0, []
        w = torch.softmax(w_logit, 0)
        for i in range(len(layers)):
            a, d2 = assign(xs[i], i)
            if post is None:
                counts = a.t() @ onehot
                posts.append((counts + smoothing * prior) / (counts.sum(1, keepdim=True) + smoothing + 1e-12))
            else:
                posts.append(post[i])
            mix = mix + w[i] * (a @ posts[-1])
            # Within-cluster spread (to the nearest centre) over k-means' (scale_ is k-means' mean
            # squared distance to the nearest centre), so exactly 1 at the start. The hard
            # spread, not the soft one: the soft one also grows with the temperature, and its
            # penalty would fight the temperature the KL term asks for.
            ratio = d2.min(1).values.mean() / scales[i]
            kmeans_term = kmeans_term + lam * ratio + _SPREAD_PENALTY * (ratio - max_ratio).clamp_min(0.0) ** 2
        kl = (p * (torch.log(p.clamp_min(1e-12)) - torch.log(mix.clamp_min(1e-12)))).sum(1).mean()
        return kl + kmeans_term / len(layers), kl, mix, posts

    def snapshot():
        place()
        return [c.detach().clone() for c in centers], log_t.detach().clone(), w_logit.detach().clone()

    history, best, best_val, bad_evals = [], snapshot(), np.inf, 0
    converged, nonfinite, best_step = False, False, 0
    steps = tqdm(range(opt["max_steps"] + 1), desc="distilling", disable=not progress, leave=False)
    for step in steps:
        evaluate = step % opt["eval_every"] == 0 or step == opt["max_steps"]
        if evaluate:
            with torch.no_grad():
                _, _, _, posts = loss_on(xs_tr, p_tr)
                _, val_kl, mix, _ = loss_on(xs_val, p_val, posts)
                record = {"step": step, "val_kl": float(val_kl),
                          "val_fidelity": float((mix.argmax(1) == p_val.argmax(1)).float().mean())}
            if not np.isfinite(record["val_kl"]):
                history.append(record)
                nonfinite = True
                break
            # Stop on the held-out KL alone: the spread terms are constraints on the training
            # clusters, and on a small held-out part their penalty is mostly noise.
            if record["val_kl"] < best_val - opt["tol"]:
                best_val, best, bad_evals, best_step = record["val_kl"], snapshot(), 0, step
            else:
                bad_evals += 1
            if bad_evals >= opt["patience"]:
                history.append(record)
                converged = True
                break
            if step == opt["max_steps"]:
                history.append(record)
                break
        optim.zero_grad()
        loss, *_ = loss_on(xs_tr, p_tr)
        if not torch.isfinite(loss):
            history.append({"step": step, "train": float(loss)})
            nonfinite = True
            break
        loss.backward()
        optim.step()
        if evaluate:
            record["train"] = loss.item()
            history.append(record)

    if nonfinite:
        warnings.warn(
            f"Distillation refinement stopped at step {step}: the loss became non-finite. Kept the state "
            f"of step {best_step} (the k-means start if 0). Loss history: {_short(history)}",
            DistillWarning, stacklevel=3,
        )
    elif not converged:
        warnings.warn(
            f"Distillation refinement did not converge within max_steps={opt['max_steps']}: the held-out "
            f"KL still improved by more than tol={opt['tol']}. Kept the best state (step {best_step}); "
            f"raise max_steps or lr. Loss history: {_short(history)}",
            DistillWarning, stacklevel=3,
        )
    c_best, t_best, w_best = best
    weights = torch.softmax(w_best, 0).double().numpy() if learn_weights else w0.copy()
    out_centers = {l: c_best[i].numpy().astype(np.float32) for i, l in enumerate(layers)}
    temperatures = {l: float(t_best[i].exp()) for i, l in enumerate(layers)}
    spread = {}
    for l in layers:  # on all training vectors, chunked
        x = vectors[l]
        spread[l] = float(_nearest_sq(x, out_centers[l]).mean() / max(_nearest_sq(x, clusterings[l].centers_).mean(), 1e-12))
    return DistillResult(centers=out_centers, temperatures=temperatures, weights=weights / weights.sum(),
                         loss_history=history, spread_ratio=spread, converged=converged and not nonfinite,
                         best_step=best_step)


def _nearest_sq(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    c = KMeans(len(centers))
    c.centers_ = np.asarray(centers, dtype=np.float32)
    return c.distances(x).min(1)


def _short(history, keep: int = 12) -> str:
    rows = history if len(history) <= keep else history[:3] + history[-(keep - 3):]
    return "; ".join(
        f"step {h['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in h.items() if k != "step") for h in rows
    )


@register("distill")
class DistillKMeans(KMeans):
    """k-means whose centres and soft-assignment temperature were refined by :func:`refine`.

    ``make_clustering("distill", ...)`` builds one; its ``fit`` is plain k-means (the refinement
    is a joint step over all layers, done by the explainer after every layer is clustered), and
    :meth:`set_refined` stores the refined centres and temperature. ``temperature_`` is relative
    to this object's ``scale_`` (recomputed on the refined centres) and is saved in
    ``state_dict`` as a float64 array, like ``scale``.
    """

    requires = ("torch",)
    refines = True

    @staticmethod
    def refine(vectors, clusterings, dnn_proba, **options) -> "DistillResult":
        """The joint refinement of every layer (:func:`refine`); each clustering then takes its result."""
        result = refine(vectors, clusterings, dnn_proba, **options)
        for l in vectors:
            clusterings[l].set_refined(vectors[l], result.centers[l], result.temperatures[l])
        return result


    def fit(self, X, backend=None):
        super().fit(X, backend)
        self.temperature_ = 0.0
        return self

    def set_refined(self, X: np.ndarray, centers: np.ndarray, temperature: float) -> DistillKMeans:
        """Take refined ``centers`` and a ``temperature`` relative to the scale *before* this call."""
        old_scale = self.scale_
        self.centers_ = np.ascontiguousarray(centers, dtype=np.float32)
        self._finish(X)
        # Same softmax(-d^2 / (t * scale)) as during refinement, expressed in the new scale_.
        self.temperature_ = float(temperature) * old_scale / self.scale_
        return self

    def state_dict(self):
        return {**super().state_dict(), "temperature": np.array([self.temperature_], dtype=np.float64)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.temperature_ = float(state["temperature"][0])
