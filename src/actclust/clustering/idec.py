"""``clustering="idec"``: the paper's deep embedded clustering (IDEC, Guo et al. 2017).

A small fully connected autoencoder is trained on a layer's reduced vectors (standardised per
feature), k-means (:class:`~actclust.clustering.KMeans`) initialises centres in its embedding,
then the encoder and the centres are trained together on ``KL(p || q) + gamma * reconstruction``,
``q`` the Student-t soft assignment of each embedded vector to the centres and ``p`` the sharpened
target distribution, recomputed every ``update_interval`` steps. Training stops when fewer than
``tol`` of the samples change cluster between two target updates.

The official implementation uses a convolutional autoencoder on square maps (20-dim embedding,
``0.1 * KL + 1.0 * reconstruction``); here the reducers already turned each map into a vector,
so an MLP suffices and handles dense layers too. ``gamma = 10`` is the same balance as theirs.
"""

from __future__ import annotations

import itertools
import time
import warnings

import numpy as np

from .base import CHUNK, Clustering, KMeans, register
from ..exceptions import IDECTrainingError, IDECWarning, ParameterError

__all__ = ["IDEC", "IDECTrainingError", "IDECWarning"]




@register("idec")
class IDEC(Clustering):
    """Improved deep embedded clustering of one layer's vectors.

    Parameters
    ----------
    n_clusters : int
    random_state : int, default=0
    embed_dim : int, default=10
    hidden : int, default=64
    gamma : float, default=10.0
        Weight of the reconstruction loss against ``KL(p || q)``.
    pretrain_epochs : int, default=4
    max_iter : int, default=800
        Clustering steps (mini-batches) at most.
    update_interval : int, default=100
        Steps between recomputations of the target distribution ``p``.
    tol : float, default=0.01
        Stop when fewer than this share of samples change cluster between target updates.
    batch_size : int, default=256
    lr : float, default=1e-3
    max_samples : int, default=20000
        Training uses at most this many vectors (drawn once, seeded); ``scale_`` and
        ``cluster_sizes_`` are computed on all of them.
    n_threads : int or None, default=1
        torch threads while training (restored afterwards). The mini-batches are small; on 2
        shared cores two threads were several times slower than one. None keeps torch's setting.

    Attributes
    ----------
    centers_ : ndarray of shape (n_clusters, d)
        Mean of the training vectors of each cluster, in the input space (for "samples nearest
        the centroid"); the assignment itself is made in the embedding.
    embedded_centers_ : ndarray of shape (n_clusters, embed_dim)
    scale_ : float
        Mean squared **embedding** distance to the nearest centre.
    loss_history_ : list of dict
    converged_ : bool
    seconds_ : float

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    >>> IDEC(3, pretrain_epochs=1, max_iter=40, update_interval=20, tol=0.5).fit(X).distances(X).shape
    (300, 3)
    """


    def __init__(self, n_clusters: int, random_state: int = 0, *, embed_dim: int = 10, hidden: int = 64,
                 gamma: float = 10.0, pretrain_epochs: int = 4, max_iter: int = 800, update_interval: int = 100,
                 tol: float = 0.01, batch_size: int = 256, lr: float = 1e-3, max_samples: int = 20_000,
                 n_threads: int | None = 1):
        super().__init__(n_clusters, random_state)
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.gamma = gamma
        self.pretrain_epochs = pretrain_epochs
        self.max_iter = max_iter
        self.update_interval = update_interval
        self.tol = tol
        self.batch_size = batch_size
        self.lr = lr
        self.max_samples = max_samples
        self.n_threads = n_threads

    # ------------------------------------------------------------------ fitting
    requires = ("torch",)

    def fit(self, X, backend=None):  # trains with torch on the CPU whatever the backend (see the class)
        from ..deps import require

        torch = require("torch", "clustering='idec'")

        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or len(X) < self.n_clusters:
            raise ParameterError(f"IDEC needs a 2-D array of at least n_clusters={self.n_clusters} rows; got shape {X.shape}.")
        if not np.all(np.isfinite(X)):
            raise ParameterError("IDEC got non-finite values in X; clean the activations first.")
        start = time.perf_counter()
        old_threads = torch.get_num_threads()
        if self.n_threads:
            torch.set_num_threads(int(self.n_threads))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.random_state)
                self._fit(X)
        finally:
            torch.set_num_threads(old_threads)
        self._finish(X)
        self.seconds_ = time.perf_counter() - start
        return self

    def _fit(self, X):
        import torch
        from torch import nn

        rng = np.random.default_rng(self.random_state)
        train = X if len(X) <= self.max_samples else X[np.sort(rng.choice(len(X), self.max_samples, replace=False))]
        self.input_mean_ = train.mean(0)
        # Standardise: L2-normalised activations of an early layer vary by ~1e-2 per feature.
        self.input_std_ = np.maximum(train.std(0), 1e-6 * max(float(train.std(0).max()), 1e-12)).astype(np.float32)
        xt = torch.from_numpy(self._standardise(train))
        sizes = [X.shape[1], self.hidden, self.embed_dim]
        self.layer_sizes_ = np.asarray(sizes, dtype=np.int64)
        encoder, decoder = _mlp(sizes), _mlp(sizes[::-1])
        gen = torch.Generator().manual_seed(self.random_state)
        history: list = []

        # 1. pretrain the autoencoder on reconstruction alone.
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=self.lr)
        for epoch in range(self.pretrain_epochs):
            total = 0.0
            for idx in torch.randperm(len(xt), generator=gen).split(self.batch_size):
                xb = xt[idx]
                loss = nn.functional.mse_loss(decoder(encoder(xb)), xb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            history.append({"phase": "pretrain", "epoch": epoch, "reconstruction": total / len(xt)})
            if not np.isfinite(total):
                return self._give_up(encoder, history, "the pretraining loss became non-finite")

        # 2. k-means in the embedding.
        with torch.no_grad():
            z = encoder(xt).numpy()
        km = KMeans(self.n_clusters, random_state=self.random_state).fit(z)
        mu = nn.Parameter(torch.from_numpy(km.centers_.copy()))

        # 3. joint training on KL(p || q) + gamma * reconstruction.
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), mu], lr=self.lr)
        # Mini-batch noise alone keeps a few percent of the samples switching clusters; a linear
        # decay of the step size lets assignments settle within the short budget.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1.0 - s / max(self.max_iter, 1)))
        labels, converged, p_all = None, False, None
        order = torch.randperm(len(xt), generator=gen)
        pos, kl_sum, rec_sum, n_steps = 0, 0.0, 0.0, 0
        for step in range(self.max_iter + 1):
            if step % self.update_interval == 0 or step == self.max_iter:
                with torch.no_grad():
                    q_all = _student_t(encoder(xt), mu)
                p_all = _target(q_all)
                new = q_all.argmax(1).numpy()
                changed = 1.0 if labels is None else float((new != labels).mean())
                labels = new
                history.append({"phase": "cluster", "step": step, "kl": kl_sum / max(n_steps, 1),
                                "reconstruction": rec_sum / max(n_steps, 1), "changed": changed})
                kl_sum, rec_sum, n_steps = 0.0, 0.0, 0
                if not np.isfinite(history[-1]["kl"] + history[-1]["reconstruction"]) or not torch.isfinite(q_all).all():
                    return self._give_up(encoder, history, "the clustering loss became non-finite")
                if step > 0 and changed < self.tol:
                    converged = True
                    break
                if step == self.max_iter:
                    break
            if pos >= len(order):
                order, pos = torch.randperm(len(xt), generator=gen), 0
            idx = order[pos:pos + self.batch_size]
            pos += self.batch_size
            xb = xt[idx]
            zb = encoder(xb)
            q = _student_t(zb, mu)
            kl = (p_all[idx] * (torch.log(p_all[idx].clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12)))).sum(1).mean()
            rec = nn.functional.mse_loss(decoder(zb), xb)
            loss = kl + self.gamma * rec
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            kl_sum, rec_sum, n_steps = kl_sum + kl.item(), rec_sum + rec.item(), n_steps + 1

        self._set_encoder(encoder)
        self.embedded_centers_ = mu.detach().numpy().astype(np.float32)
        self.loss_history_ = history
        self.converged_ = converged
        self._input_space_centres(X)
        if not converged:
            warnings.warn(
                f"IDEC did not converge in max_iter={self.max_iter} steps: {history[-1]['changed']:.2%} of the "
                f"samples still changed cluster at the last target update (tol={self.tol:.2%}); its last clusters "
                "are used. (max_iter and tol are options of actclust.clustering.idec.IDEC, which ActivationClustering "
                f"runs with their defaults; clustering='kmeans' or 'distill' always converge.) Loss history: "
                f"{_short(history)}",
                IDECWarning, stacklevel=3,
            )

    def _give_up(self, encoder, history, why):
        """Non-finite loss: fail loudly rather than keep a broken model."""
        self.loss_history_ = history
        self.converged_ = False
        warnings.warn(f"IDEC training failed: {why}. Loss history: {_short(history)}", IDECWarning, stacklevel=4)
        raise IDECTrainingError(
            f"IDEC training failed: {why} (see the IDECWarning for the loss history); lower lr or use "
            "clustering='kmeans'."
        )

    def _input_space_centres(self, X):
        labels = self.distances(X).argmin(1)
        centres = np.zeros((self.n_clusters, X.shape[1]), dtype=np.float64)
        np.add.at(centres, labels, X)
        counts = np.bincount(labels, minlength=self.n_clusters)
        centres[counts > 0] /= counts[counts > 0, None]
        centres[counts == 0] = X.mean(0)
        self.centers_ = centres.astype(np.float32)

    # ------------------------------------------------------------------ encoder
    def _standardise(self, X):
        return ((X - self.input_mean_) / self.input_std_).astype(np.float32)

    def _set_encoder(self, encoder):
        self._weights = [(m.weight.detach().numpy().astype(np.float32).copy(),
                          m.bias.detach().numpy().astype(np.float32).copy())
                         for m in encoder if hasattr(m, "weight")]

    def embed(self, X: np.ndarray) -> np.ndarray:
        """Embedding ``(n, embed_dim)`` of vectors ``X``, computed in chunks."""
        X = np.asarray(X, dtype=np.float32)
        out = np.empty((len(X), self._weights[-1][0].shape[0]), dtype=np.float32)
        for start in range(0, len(X), CHUNK):
            h = self._standardise(X[start:start + CHUNK])
            for i, (w, b) in enumerate(self._weights):
                h = h @ w.T + b
                if i < len(self._weights) - 1:
                    np.maximum(h, 0.0, out=h)
            out[start:start + CHUNK] = h
        return out

    # Distances (Clustering.distances, chunked) are measured in the embedding.
    def _to_space(self, X: np.ndarray) -> np.ndarray:
        return self.embed(X)

    def _space_centers(self) -> np.ndarray:
        return self.embedded_centers_

    # ------------------------------------------------------------------ state
    def state_dict(self):
        state = super().state_dict()
        state.update({
            "embedded_centers": self.embedded_centers_,
            "layer_sizes": self.layer_sizes_.astype(np.int64),
            "input_mean": self.input_mean_.astype(np.float32),
            "input_std": self.input_std_.astype(np.float32),
        })
        for i, (w, b) in enumerate(self._weights):
            state[f"encoder.{i}.weight"], state[f"encoder.{i}.bias"] = w, b
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        sizes = [int(s) for s in np.asarray(state["layer_sizes"]).tolist()]
        weights = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            w = np.ascontiguousarray(state[f"encoder.{i}.weight"], dtype=np.float32)
            b = np.ascontiguousarray(state[f"encoder.{i}.bias"], dtype=np.float32)
            if w.shape != (n_out, n_in) or b.shape != (n_out,):
                raise ParameterError(
                    f"IDEC encoder layer {i} has weight {w.shape} and bias {b.shape}; layer_sizes {sizes} "
                    f"need ({n_out}, {n_in}) and ({n_out},)."
                )
            weights.append((w, b))
        self._weights = weights
        self.layer_sizes_ = np.asarray(sizes, dtype=np.int64)
        self.embedded_centers_ = np.ascontiguousarray(state["embedded_centers"], dtype=np.float32)
        self.input_mean_ = np.asarray(state["input_mean"], dtype=np.float32)
        self.input_std_ = np.asarray(state["input_std"], dtype=np.float32)


def _mlp(sizes):
    from torch import nn

    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _student_t(z, mu, alpha: float = 1.0):
    import torch

    d2 = ((z[:, None, :] - mu[None]) ** 2).sum(2)
    q = (1.0 + d2 / alpha) ** (-(alpha + 1) / 2)
    return q / q.sum(1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def _target(q):
    w = q ** 2 / q.sum(0)
    return (w / w.sum(1, keepdim=True)).detach()


def _short(history, keep: int = 10) -> str:
    rows = history if len(history) <= keep else history[:2] + history[-(keep - 2):]
    return "; ".join(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())
                     for h in rows)
