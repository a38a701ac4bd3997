"""Per-layer clustering of reduced activation vectors.

:class:`Clustering` is the small interface every clustering method implements (k-means now;
the paper's deep embedded clustering can join later): ``fit`` on an ``(n, d)`` float32 array,
then ``distances``, ``predict`` and ``soft_assign`` on new vectors, and its learned arrays
through ``state_dict`` / ``load_state_dict`` for saving.
"""

from __future__ import annotations

import numpy as np

from ..compute import HOST
from ..compute.host import CHUNK  # rows per chunk over a (possibly memory-mapped) array; IDEC reads it here
from ..exceptions import ParameterError
from ..store.vectors import take

__all__ = ["Clustering", "KMeans", "make_clustering", "register", "CLUSTERINGS", "CHUNK"]


class Clustering:
    """Interface of a clustering method; subclasses set ``centers_`` in ``fit``.

    ``scale_`` is the mean squared distance of the training vectors to their nearest centre;
    soft assignments divide squared distances by it, so that one temperature means the same
    thing for every layer whatever the scale of its activations.
    """

    name = "base"
    #: Modules a fit of this method needs beyond the core (a missing one is a MissingDependencyError naming its extra).
    requires: tuple = ()
    #: Whether the method also refines all layers' clusterings jointly toward the DNN after each is fitted
    #: (then the class implements ``refine(vectors, clusterings, dnn_proba, ...)`` and needs the DNN's softmax).
    refines = False

    def __init__(self, n_clusters: int, random_state: int = 0):
        self.n_clusters = n_clusters
        self.random_state = random_state

    def fit(self, X: np.ndarray, backend=None) -> "Clustering":
        """Learn the clusters of ``X``; ``backend`` (:mod:`actclust.compute`) says where to compute, if the method can."""
        raise NotImplementedError

    def distances(self, X: np.ndarray, backend=None) -> np.ndarray:
        """Squared Euclidean distances ``(n, n_clusters)`` from each vector to each centre, computed by
        ``backend`` (:mod:`actclust.compute`; the host by default) over ``X`` in chunks."""
        transform = None if type(self)._to_space is Clustering._to_space else self._to_space
        return (backend or HOST).sq_distances(X, self._space_centers(), transform)

    def _to_space(self, X: np.ndarray) -> np.ndarray:
        """Map vectors into the space where distances are measured (identity; IDEC embeds)."""
        return X

    def _space_centers(self) -> np.ndarray:
        return self.centers_

    def predict(self, X: np.ndarray, backend=None) -> np.ndarray:
        """Index of the nearest centre of each vector."""
        return self.distances(X, backend).argmin(1)

    def soft_assign(self, X: np.ndarray, temperature: float, backend=None) -> np.ndarray:
        """Assignment probabilities ``(n, n_clusters)``: ``softmax(-d^2 / (temperature * scale_))``.

        ``temperature=0`` gives hard (one-hot) assignment, the limit of small temperatures.
        """
        return self.soft_assign_from_distances(self.distances(X, backend), temperature)

    def soft_assign_from_distances(self, d: np.ndarray, temperature: float) -> np.ndarray:
        """:meth:`soft_assign` from squared distances already computed by :meth:`distances`."""
        if temperature <= 0:
            out = np.zeros_like(d)
            out[np.arange(len(d)), d.argmin(1)] = 1.0
            return out
        logits = -d / (temperature * self.scale_)
        logits -= logits.max(1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(1, keepdims=True)
        return logits

    def _finish(self, X: np.ndarray, backend=None) -> None:
        d = self.distances(X, backend)
        labels = d.argmin(1)
        self.scale_ = float(max(d[np.arange(len(d)), labels].mean(), 1e-12))
        self.cluster_sizes_ = np.bincount(labels, minlength=self.n_clusters)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "centers": self.centers_,
            "scale": np.array([self.scale_], dtype=np.float64),
            "cluster_sizes": self.cluster_sizes_.astype(np.int64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.centers_ = np.ascontiguousarray(state["centers"], dtype=np.float32)
        self.scale_ = float(state["scale"][0])
        self.cluster_sizes_ = np.asarray(state["cluster_sizes"])


class KMeans(Clustering):
    """k-means: k-means++ seeding (scikit-learn) on a sample, then Lloyd iterations with faiss.

    k-means++ seeding makes the result far less dependent on the seed than faiss' random
    initialisation (on Fashion-MNIST, combined fidelity varied by 0.02 between seeds with
    random initialisation). ``n_init`` restarts keep the solution of lowest inertia.

    Empty clusters are re-seeded by faiss during training (it splits the largest cluster);
    ``cluster_sizes_`` records the final sizes, zeros included, so they can be reported.
    """


    def __init__(self, n_clusters: int, random_state: int = 0, n_init: int = 1, max_iter: int = 25):
        super().__init__(n_clusters, random_state)
        self.n_init = n_init
        self.max_iter = max_iter

    def fit(self, X, backend=None):
        """k-means of the ``(n, d)`` vectors ``X`` (a memory map too), computed by ``backend`` (the host's
        scikit-learn seeding and faiss iterations by default; :mod:`actclust.compute`)."""
        backend = backend or HOST
        # Lloyd iterations see at most _POINTS_PER_CENTRE points per centre (faiss would subsample to
        # that itself), so only that sample is read into memory: X may be a memory-mapped store.
        # ... and at most _TRAIN_FLOATS values of them (a layer of 16,384 values: 512 per centre, not 1,024)
        n_train = min(len(X), self.n_clusters * _POINTS_PER_CENTRE,
                      max(self.n_clusters * _MIN_POINTS_PER_CENTRE, _TRAIN_FLOATS // max(X.shape[1], 1)))
        rows = np.sort(np.random.default_rng(self.random_state).choice(len(X), n_train, replace=False))
        train = np.ascontiguousarray(take(X, rows) if n_train < len(X) else X, dtype=np.float32)
        best = None
        for run in range(self.n_init):
            seed = self.random_state + run
            rng = np.random.default_rng(seed)
            sample = train[rng.choice(len(train), min(len(train), _SEED_SAMPLE), replace=False)]
            init = sample[backend.kmeans_plusplus(_coarse(sample), self.n_clusters, seed)]
            centers, obj = backend.lloyd(train, init, self.max_iter, seed)
            if best is None or obj < best[0]:
                best = (obj, np.ascontiguousarray(centers, dtype=np.float32))
        self.centers_ = best[1]
        self._finish(X, backend)
        return self


_SEED_SAMPLE = 20_000  # k-means++ seeding is O(n k d log k); a sample seeds as well.
_SEED_LEVELS = 2 ** 10  # k-means++ chooses its seeds on values rounded to this many steps of the largest


def _coarse(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to ``1 / _SEED_LEVELS`` of its largest absolute value, for choosing k-means++ seeds.

    k-means++ draws each seed with probability proportional to squared distances: a last-bit difference
    in the vectors (the same network in another framework, another summation order, a GPU) moves
    those probabilities and, now and then, a draw, and Lloyd's iterations from another seed can end
    in another local optimum. Measured on the Fashion CNN's 60,000 training images in PyTorch and in
    Keras on JAX (vectors equal to 4e-6): with seeds chosen on the exact values conv1's clusters
    agreed on 77.8% of the samples, with rounded values on 99.98% (the other layers 100% either way).
    A rounded value can still straddle a rounding step, so this makes a different draw rarer, not
    impossible. Seeds are then the exact rows chosen, and Lloyd's iterations run on exact values."""
    scale = float(max(x.max(), -x.min())) if x.size else 0.0
    if not np.isfinite(scale) or scale == 0.0:
        return x
    out = np.multiply(x, np.float32(_SEED_LEVELS / scale), dtype=np.float32)  # one copy, rounded in place
    np.round(out, out=out)
    out *= np.float32(scale / _SEED_LEVELS)
    return out
_POINTS_PER_CENTRE = 1024
_MIN_POINTS_PER_CENTRE = 256
#: Values of the rows a k-means trains on at most (512 MiB), however wide the layer: at least
#: ``_MIN_POINTS_PER_CENTRE`` rows per centre.
_TRAIN_FLOATS = 1 << 27
#: Clustering methods by name; each module registers its own with :func:`register`.
CLUSTERINGS: dict = {}


def register(name: str):
    """Class decorator: make a :class:`Clustering` subclass available as ``clustering=name``."""
    def add(cls):
        if name in CLUSTERINGS and CLUSTERINGS[name] is not cls:
            raise ParameterError(f"A clustering named {name!r} is already registered ({CLUSTERINGS[name].__name__}).")
        cls.name = name
        CLUSTERINGS[name] = cls
        return cls
    return add


register("kmeans")(KMeans)


def make_clustering(name, n_clusters: int, random_state: int = 0) -> Clustering:
    """Build a fresh clustering method by its registered name (``"kmeans"``, ``"distill"``, ``"idec"``).

    ``"idec"`` is the paper's deep embedded clustering (:class:`actclust.clustering.idec.IDEC`);
    ``"distill"`` a :class:`actclust.clustering.distill.DistillKMeans`, plain k-means per layer whose joint
    refinement toward the DNN (:func:`actclust.clustering.distill.refine`, run by the explainer) it then holds.
    """
    cls = CLUSTERINGS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ParameterError(
            f"The 'clustering' parameter of ActivationClustering must be one of "
            f"{list(CLUSTERINGS)}. Got {name!r} instead."
        )
    return cls(n_clusters, random_state=random_state)
