"""``ActivationClustering``: distil a classifier into a clustering surrogate (the estimator facade).

The estimator stores its parameters; ``fit`` checks them (:mod:`actclust.validation`) and runs the
pipeline (:mod:`actclust.fitting`); the methods run one pass of the model (:meth:`query`) and hand
it to the analyses (:mod:`actclust.analysis`) with the fitted state.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .adapters import adapt
from .analysis import surrogate
from .exceptions import ActClustWarning, ModelMismatchWarning, NotFittedError, ParameterError
from .state import FittedState, Query

__all__ = ["ActivationClustering", "load", "SPATIAL_GRID"]

#: Default ``spatial_grid``: chosen on Fashion-MNIST by ``benchmarks/explore_low.py``.
SPATIAL_GRID = 4


class ActivationClustering:
    """Explain a classifier by clustering the activations of some of its layers.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, ONNX model or ModelAdapter
        A trained classifier. A PyTorch module is called as ``model(x)`` on tensor batches,
        ``model(*x)`` on tuples and ``model(**x)`` on dict batches (Hugging Face); wrappers
        (``DataParallel``, ``torch.compile``) are looked through. A Keras 3 model (any backend) or
        an ONNX model (a path, bytes or ``onnx.ModelProto``, run with onnxruntime) works the same
        way; see :mod:`actclust.adapters`.
    layers : list of str
        ``named_modules()`` names of the layers to cluster; see :func:`actclust.list_layers`.
        Names with a wrapper's prefix (``module.``, ``_orig_mod.``) are accepted.
    n_clusters : int or dict, default=15
        Clusters per layer (at least 2), or a dict ``layer -> int``.
    reducer : str, Reducer or dict, default="auto"
        How a layer's output becomes one vector per sample. ``"auto"`` reads the layout the model
        gives it: conv maps (channels-first or channels-last) are averaged over space, transformer
        token maps ``(N, T, D)`` over the tokens the attention mask keeps, dense ``(N, F)`` outputs
        pass through; ``actclust.list_layers(model, x)`` shows the choice per layer. Others:
        ``"mean"``, ``"max"``, ``"grid:g"``, ``"pca:d"``, ``"random:d"``, ``"token_mean"``,
        ``"token_first"`` (see :mod:`actclust.capture.reduction`), or a dict ``layer -> reducer``.
    normalize : {"l2", None}, default="l2"
        Scale each reduced vector to unit length before clustering (cluster by direction).
    posterior : {"prediction", "label"}, default="prediction"
        Class mix of each cluster taken from the DNN's predictions (distillation) or from the
        true labels (the paper's choice; needs ``y``).
    layer_weights : None, list, dict or "fit", default=None
        ``None`` weighs layers equally; ``"fit"`` learns non-negative weights on a held-out
        ``validation_fraction`` of the training data to maximise agreement with the DNN.
    temperature : float, default=0.0
        Soft-assignment temperature, relative to each layer's mean squared distance to the
        nearest centre; ``0`` is hard assignment. Unused by ``clustering="distill"``, which
        learns one temperature per layer.
    smoothing : float, default=1.0
        Pseudo-count pulling each cluster's class mix toward the overall class mix.
    clustering : {"kmeans", "distill", "idec"}, default="kmeans"
        ``"kmeans"``: k-means per layer. ``"distill"``: k-means, then centres, per-layer
        temperatures and (with ``layer_weights="fit"``) layer weights refined jointly by gradient
        descent so the surrogate matches the DNN's predicted distribution, with a k-means term
        that keeps clusters compact (:mod:`actclust.clustering.distill`). ``"idec"``: the paper's deep
        embedded clustering (:mod:`actclust.clustering.idec`).
    validation_fraction : float, default=0.2
        Share of the training data held out to learn ``layer_weights="fit"``.
    batch_size : int, default=256
    random_state : int, default=0
    progress : bool, default=True
        Show progress bars on passes over the data.
    label_key : "auto", None, int or str, default="auto"
        Which element of a tuple or dict batch (from a Dataset or DataLoader) is the label:
        ``"auto"`` takes the second of an ``(input, label)`` pair when it is a 1-D integer tensor and
        the ``"labels"``/``"label"`` entry of a dict; ``None``: batches hold no label (every element
        goes to the model); an int or a str names the element. Tuples of three or more need it.
    output : callable, optional
        ``output(model_output) -> logits`` when the logits are not the output, its ``.logits``,
        its ``["logits"]`` or its first element.
    search : {"auto", "exact", "approximate"}, default="auto"
        How neighbours are searched, for similar samples and trust signals: exactly (one pass
        over the stored vectors per call), or with a faiss IVF index (float32 codes, or 8-bit codes
        re-ranked exactly for large sets) calibrated per weighting for recall@10 >= 0.97 on held-out
        training rows (new inputs measured 0.96-0.98), saved with the run; ``"auto"`` is exact where
        that index cannot reach 0.97 on the data (a :class:`~actclust.SearchWarning` says so), below
        :data:`actclust.analysis.retrieval.AUTO_EXACT_ROWS` (2,000) training samples, and on a GPU
        (``device``), where it runs as chunked matrix products (not yet timed against an
        approximate index on a GPU: see docs/speed.md).
    spatial_grid : int or None, default=4
        Retrieval only: each layer with a ``(N, C, H, W)`` map also stores it average-pooled to
        ``spatial_grid x spatial_grid`` (projected to 64 values when wider; see
        :func:`actclust.capture.reduction.spatial_summary`), and similar-sample search compares those
        summaries for that layer instead of its clustering vector, so the "low" weights find
        training samples that look alike (where their early layers respond). Clustering, the
        surrogate and trust signals do not use them. ``None`` stores none.
    store : None or path, default=None
        Where the training vectors live: ``None`` keeps them in memory; a directory path writes
        them there while capturing (one raw file per layer) and memory-maps them, so the
        resident memory of ``fit``, ``explain`` and ``trust`` does not grow with the training set
        (see :mod:`actclust.store`). Each fit writes its own generation in that directory and
        keeps it while the explainer lives, so fits sharing a directory never change each other's
        vectors. They take ``n_samples x sum of layer widths x bytes`` (logged before the capture).
    store_dtype : {"float32", "float16"}, default="float32"
        Precision of the stored training vectors; ``"float16"`` halves memory and disk (the
        clustering and distances are computed in float32 either way).
    engine : {"local", "ray"}, default="local"
        Where ``fit``'s pass of the model runs: in this process, or with ``"ray"`` on a Ray cluster
        (``pip install "actclust[ray]"``): Ray Data ``map_batches`` on a pool of actors that each load
        the model once (:mod:`actclust.engines.ray`). ``fit`` then also takes a ``ray.data.Dataset``; the
        vectors come back to this process's store by sample position, and the rest of ``fit`` is
        the local code. Any method that runs the model takes a ``ray.data.Dataset`` whatever the
        engine, and runs it on Ray.
    ray_options : dict, optional
        For Ray passes: ``concurrency`` (actors; default one per GPU, else one per ``num_cpus`` CPUs of
        the cluster), ``num_cpus`` per actor (1), ``num_gpus`` per actor (default 1 when the cluster
        has GPUs, else 0), ``columns`` (which columns of a ``ray.data.Dataset`` are the model's
        inputs; by default every column but the label, see the README). ``batch_size`` is the
        estimator's.
    device : None, "cpu", "cuda", "cuda:N", torch.device or Backend, default=None
        Where the work after the model's pass runs: k-means (seeding and Lloyd iterations), the
        distances to the centres and exact neighbour searches. ``None``: the model's device (a
        PyTorch model on CUDA computes there, with :class:`actclust.adapters.torch_compute.TorchBackend`;
        everything else on the host with NumPy, scikit-learn and faiss). A device that is not here
        (``"cuda"`` without CUDA) is a :class:`ParameterError`. Not saved with a run: ``load`` takes
        its own, so a run fitted on a GPU loads and answers on a machine without one.

    Attributes
    ----------
    state_ : FittedState
        Everything ``fit`` learned, in one object (assigned once, at the end of ``fit``); the
        attributes below read it.
    layers_ : list of str
    n_classes_ : int
    n_samples_fit_ : int
    input_shape_ : tuple
        Shape of one training input (of the first, for tuple or dict inputs); inputs of another
        shape are refused.
    clusterings_ : dict of str to Clustering
    posteriors_ : dict of str to ndarray of shape (n_clusters, n_classes)
    weights_ : ndarray of shape (n_layers,), summing to 1
    train_vectors_ : dict of str to ndarray of shape (n_samples, d)
    train_predictions_ : ndarray of shape (n_samples,)
    train_labels_ : ndarray of shape (n_samples,) or None
    train_score_ : dict
        :meth:`score` on the training data (in-sample), computed during ``fit`` at no extra pass.
    fit_info_ : dict
        Timings of the fit stages and the sizes of empty clusters.

    Examples
    --------
    >>> import torch, actclust
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.randn(200, 4)
    >>> ac = actclust.ActivationClustering(net, layers=["0", "2"], n_clusters=4, progress=False)
    >>> ac.fit(x).score(x)["fidelity"] > 0.3
    True
    """

    def __init__(
        self, model, layers, *, n_clusters=15, reducer="auto", normalize="l2", posterior="prediction",
        layer_weights=None, temperature=0.0, smoothing=1.0, clustering="kmeans",
        validation_fraction=0.2, batch_size=256, random_state=0, progress=True, label_key="auto",
        output: Optional[Callable] = None, search="auto", spatial_grid=SPATIAL_GRID, store=None,
        store_dtype="float32", engine="local", ray_options=None, device=None,
    ):
        self.model = model
        self.layers = layers
        self.n_clusters = n_clusters
        self.reducer = reducer
        self.normalize = normalize
        self.posterior = posterior
        self.layer_weights = layer_weights
        self.temperature = temperature
        self.smoothing = smoothing
        self.clustering = clustering
        self.validation_fraction = validation_fraction
        self.batch_size = batch_size
        self.random_state = random_state
        self.progress = progress
        self.label_key = label_key
        self.output = output
        self.search = search
        self.spatial_grid = spatial_grid
        self.store = store
        self.store_dtype = store_dtype
        self.engine = engine
        self.ray_options = ray_options
        self.device = device

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> "ActivationClustering":
        """Capture the layers on ``X``, cluster them and build the surrogate.

        Everything learned is assigned at the end, as :attr:`state_`: a fit that fails leaves the
        explainer as it was. The pipeline is :func:`actclust.fitting.fit`.

        Parameters
        ----------
        X : array, DataFrame, dict of arrays, dataset or a framework's data loader
            Training inputs, in a fixed order; see ``label_key`` for batches that carry labels.
            With ``engine="ray"`` also a ``ray.data.Dataset``.
        y : array-like of int, optional
            True labels; required for ``posterior="label"`` unless ``X`` yields them (if both are
            given, they must agree).
        """
        from . import fitting
        from .validation import validate

        from .io.persistence import params_of
        from .store.vectors import is_generation

        adapter = self._adapter(check=False)  # a model changed since the last fit is this fit's to learn
        config = validate(self, adapter)
        params = params_of(self)
        replaced = self.__dict__.get("_fitted_state")
        self.state_ = fitting.fit(adapter, config, X, y, self._backend())  # the one assignment of what fit learned
        # what save() records (parameters set after fit were saved as if fitted with: an outside check), and the model
        # it was fitted with (another one bound later is said to be: ModelMismatchWarning)
        self.__dict__["_fitted_with"] = (params, id(self.model), adapter.fingerprint())  # an id: the model not held
        self.__dict__["_weights_seen"] = adapter.weights_version()
        if self.__dict__.pop("_display", None) is not None:  # its training pictures were the previous fit's
            warnings.warn("fit replaced the display that set_display() attached to the previous fit (its training "
                          "samples would be drawn for this one's); call set_display() again.", ActClustWarning,
                          stacklevel=2)
        # the generation of the state just replaced, where nothing holds it any more: in its own folder, wherever the
        # store parameter points now (a refit into another folder left it behind: an outside check)
        gone = getattr(getattr(replaced, "train_vectors", None), "directory", None)
        del replaced
        if gone is not None and is_generation(Path(gone)):  # a store folder's generation, not a loaded run's store
            fitting.release_replaced(Path(gone).parent)
        return self

    def _adapter(self, check: bool = True):
        """The adapter of ``model`` (made once per model and output: an ONNX or Keras file is read once). Another
        model bound after fit, or the same one changed in place, whose weights differ from the fitted one's is said
        to be, once (as ``load`` says it); not with ``check=False`` (``fit``, which fits it anew)."""
        cached = self.__dict__.get("_adapter_cache")
        if cached is None or cached[0] is not self.model or cached[1] is not self.output:
            cached = self.__dict__["_adapter_cache"] = (self.model, self.output, adapt(self.model, self.output))
            fitted = self.__dict__.get("_fitted_with")
            if check and fitted is not None and fitted[1] != id(self.model):
                self.__dict__["_weights_seen"] = cached[2].weights_version()
                self._check_weights(cached[2])
        elif check and self.__dict__.get("_fitted_with") is not None:
            # the same model, its weights changed in place since (trained on after fit: fidelity 0.90 -> 0.26
            # without a word, an outside check); a version counter says so cheaply, the fingerprint decides
            version = cached[2].weights_version()
            if version is not None and version != self.__dict__.get("_weights_seen"):
                self.__dict__["_weights_seen"] = version
                self._check_weights(cached[2])
        return cached[2]

    def _check_weights(self, adapter) -> None:
        """Warn where the model's weights differ from those the explainer was fitted with."""
        if adapter.fingerprint() != self.__dict__["_fitted_with"][2]:
            warnings.warn("The model's parameters differ from those of the model this explainer was fitted with; "
                          "predictions and explanations may not describe this model (fit again on it).",
                          ModelMismatchWarning, stacklevel=4)

    def _backend(self):
        """The compute backend of ``device`` (:func:`actclust.compute.backend_for`), made once per device and model."""
        from .compute import backend_for

        cached = self.__dict__.get("_backend_cache")
        adapter = self._adapter(check=False)  # where the work happens; the model is checked where it runs
        if cached is None or cached[0] is not self.device or cached[1] is not adapter:
            cached = self.__dict__["_backend_cache"] = (self.device, adapter,
                                                        backend_for(self.device, getattr(adapter, "device", None)))
        return cached[2]

    def _batches(self, X, y=None):
        from .fitting import batches
        from .validation import check

        check(type(self).__name__, {"batch_size": self.batch_size, "label_key": self.label_key})
        return batches(self, X, y)

    # ------------------------------------------------------------------ passes
    def query(self, X, y=None, *, vectors: bool = False) -> Query:
        """One pass of the model over ``X``: the DNN's outputs and each layer's distances to the centres.

        The analyses (:mod:`actclust.analysis.retrieval`, :mod:`actclust.analysis.trust`, :mod:`actclust.analysis.explanation`)
        take the fitted :attr:`state_` and such a :class:`~actclust.state.Query`; ``vectors=True``
        also keeps each layer's reduced vectors (needed by similar-sample search and trust).
        """
        from .capture import passes
        from .engines import ray

        state = self._state()
        if ray.is_dataset(X):
            return ray.query(state, ray.RayConfig.of(self), self._adapter(), X, y, keep_vectors=vectors)
        return passes.query(state, self._adapter(), self._batches(X, y), keep_vectors=vectors,
                            progress=self.progress)

    @property
    def state_(self) -> FittedState:
        """What ``fit`` learned (:class:`~actclust.state.FittedState`); :class:`NotFittedError` before."""
        state = self.__dict__.get("_fitted_state")
        if state is None:
            raise NotFittedError(
                "This ActivationClustering is not fitted yet. Call 'fit' with training data "
                "(or actclust.load a saved run) before using this method."
            )
        return state

    @state_.setter
    def state_(self, state: FittedState) -> None:
        if not isinstance(state, FittedState):
            raise ParameterError(f"state_ must be a FittedState; got {type(state).__name__}.")
        self.__dict__["_fitted_state"] = state

    def _state(self) -> FittedState:
        return self.state_

    # ------------------------------------------------------------------ public results
    def predict_proba(self, X) -> np.ndarray:
        """Surrogate class probabilities ``(n, n_classes)``; rows sum to 1."""
        state = self._state()
        return state.predict_proba(self.query(X).distances)

    def predict(self, X) -> np.ndarray:
        """Surrogate class predictions ``(n,)``."""
        return self.predict_proba(X).argmax(1)

    def cluster_paths(self, X) -> np.ndarray:
        """Cluster id ``(n, n_layers)`` of each input at each layer (nearest centre)."""
        return self.query(X).paths

    def score(self, X, y=None) -> dict:
        """Fidelity (agreement with the DNN) and, with labels, accuracy; combined and per layer.

        Returns
        -------
        dict
            ``{"n": int, "fidelity": float, "accuracy": float or None, "dnn_accuracy": float or None,
            "per_layer": {layer: {"fidelity": float, "accuracy": float or None}}}``
        """
        from .views.notebook import Scores  # a dict that also shows itself as a table in notebooks

        state = self._state()
        q = self.query(X, y)
        return Scores(surrogate.scores(q.dnn_pred, state.layer_probas(q.distances), q.labels, state.weights,
                                       state.layers), weights=state.weights,
                      n_clusters={l: c.n_clusters for l, c in state.clusterings.items()})

    def similar(self, X, k: int = 10, weights="equal", *, search=None):
        """The ``k`` training samples most similar to each input, over all layers (exact or approximate
        search: see ``search``).

        Parameters
        ----------
        X : ndarray, Tensor, DataFrame, dict of arrays, Dataset or DataLoader
        k : int, default=10
            Between 1 and the number of training samples (more is an error: ``explain``, which shows
            samples rather than returns them, shows the whole training set instead).
        weights : {"equal", "low", "high"}, list or dict, default="equal"
            Per-layer weights of the distance; ``"low"`` favours early layers (looks alike),
            ``"high"`` late ones (means alike). Each layer's distances are first divided by the
            mean squared distance between two training samples in that layer, so layers are
            comparable; see :mod:`actclust.analysis.retrieval` for the exact definitions.
        search : {"auto", "exact", "approximate"}, optional
            Overrides the estimator's ``search`` for this call (e.g. to check an approximate
            answer against the exact one).

        Returns
        -------
        Neighbours
            ``indices`` (n, k) into the training data (positions, not a DataFrame's index labels:
            ``X_train.index[nb.indices]`` gives those), ``distances`` (n, k), ``layer_shares``
            (n, k, n_layers): each layer's share of each distance.
        """
        from .analysis import retrieval

        state = self._state()
        k, w = retrieval.check_args(state, k, weights)  # before the pass over X
        method = retrieval.check_search(self.search if search is None else search)
        nb = retrieval.search(state, self.query(X, vectors=True), k, w, method=method, progress=self.progress,
                              backend=self._backend())
        nb._context = self._display_context(X)  # what its notebook display draws with
        return nb

    def concepts(self, layer: str, k: int = 10, n_edge: int = 3) -> list:
        """One :class:`~actclust.analysis.concepts.Concept` per cluster of ``layer``: its size, class mix,
        purity, the ``k`` training samples nearest its centre and the ``n_edge`` furthest ones."""
        from .analysis.concepts import concepts

        from .views.notebook import ConceptList  # a list that also shows itself as cards in notebooks

        state = self._state()
        layer = self._adapter().canonical(layer) if isinstance(layer, str) else layer
        return ConceptList(concepts(state, layer, k, n_edge, progress=self.progress, backend=self._backend()),
                           context=self._display_context())

    def explain(self, X, y=None, *, k: int = 5, class_names=None, trust=None, search=None) -> list:
        """One :class:`~actclust.analysis.explanation.Explanation` per input of ``X``.

        ``k`` similar training samples are given under "low" and "high" weights, and ``k``
        exemplars of each cluster on the input's path (a training set smaller than ``k`` shows all of
        itself, where :meth:`similar` refuses such a ``k``). ``trust=True`` adds the trust signals
        (:meth:`trust`); the default ``None`` adds them when the training set is large enough
        to calibrate them, ``False`` never; a dict gives their options, as :meth:`trust` takes them
        (``{"calibration": (X_val, y_val)}``). ``search`` overrides the estimator's for this call.
        """
        from .analysis import retrieval
        from .analysis.explanation import check_class_names, explain

        state = self._state()
        class_names = check_class_names(state, class_names)
        method = retrieval.check_search(self.search if search is None else search)
        trust = self._trust_arg(trust)
        out = explain(state, self.query(X, y, vectors=True), k=k, class_names=class_names, trust=trust,
                      meta=self.provenance(), search=method, progress=self.progress, backend=self._backend())
        from .views.notebook import ExplanationList  # a list that also shows itself in notebooks

        return ExplanationList(out, context=self._display_context(X))

    def prepare(self, *, trust=None) -> "ActivationClustering":
        """Build now what ``explain`` otherwise builds on its first call, so that a run saved afterwards keeps it
        and every load of the run answers at once: the similar-sample index, calibrated for explain's "low" and
        "high" weights, and trust's calibration with each layer's index (``trust`` as in :meth:`explain`: by
        default whenever the training set is large enough). ``actclust fit`` prepares the run it saves.
        Returns ``self``.
        """
        from .analysis import explanation, retrieval

        explanation.prepare(self._state(), trust=self._trust_arg(trust, "prepare"),
                            search=retrieval.check_search(self.search),
                            progress=self.progress, backend=self._backend())
        return self

    def trust(self, X, **options) -> dict:
        """Per-input trust signals; see :func:`actclust.analysis.trust.trust_signals` for ``options``.

        ``calibration`` may also be held-out inputs ``X_val`` or a pair ``(X_val, y_val)`` (a pair
        is read as inputs and labels; a model of tuple inputs passes ``((a, b), y_val)`` or a
        query), queried here; ``y_val`` makes ``stacked_trust`` available.

        Returns a dict of ``(n,)`` arrays, higher meaning more trustworthy: ``stacked_trust`` (the
        probability that the DNN is right; only where the calibration holds true labels and at
        least 10 DNN errors and 10 right predictions), ``dnn_confidence``, ``credibility``,
        ``surrogate_dnn_agreement``, ``surrogate_confidence``, ``layer_agreement`` (is the DNN
        right?), ``knn_typicality``, ``ood_typicality``, ``cluster_typicality`` (is the input like
        the training data?), and the classes ``dnn_prediction``, ``surrogate_prediction`` and
        ``dknn_prediction``; :data:`actclust.analysis.trust.MEANINGS` says each in a sentence.
        Without ``stacked_trust`` (misclassification AUROC 0.926 on the Fashion-MNIST benchmark of
        ``benchmarks/explain_cpu.py``), ``dnn_confidence`` (0.918) and ``credibility`` (0.875) rank the
        DNN's errors best there.
        """
        from .analysis.trust import calibrate, signals

        state = self._state()
        cal = calibrate(state, progress=self.progress, backend=self._backend(),
                        **{"search": self.search, **self._trust_arg(options, "trust")})  # before the pass
        return signals(state, cal, self.query(X, vectors=True), self._backend())

    def _trust_arg(self, options, where: str = "explain"):
        """``options`` of the trust signals (``trust=`` of :meth:`explain`, :meth:`prepare` and ``report``; the
        keywords of :meth:`trust`) checked, with held-out ``calibration`` inputs (``X_val``, or a pair ``(X_val,
        y_val)``) made the query the calibration takes; a bool or None as it is."""
        from .analysis.explanation import check_trust_options
        from .state import Query

        options = check_trust_options(options, where)
        held_out = options.get("calibration") if isinstance(options, dict) else None
        if held_out is None or isinstance(held_out, Query):
            return options
        x_val, y_val = held_out if isinstance(held_out, tuple) and len(held_out) == 2 else (held_out, None)
        return {**options, "calibration": self.query(x_val, y_val, vectors=True)}

    def provenance(self) -> dict:
        """What an explanation of this explainer records about where it came from (Alibi's ``meta``)."""
        from ._version import __version__

        return {"actclust_version": __version__, "model_class": self._adapter().model_class,
                "layers": list(self._state().layers)}

    def save(self, path, *, overwrite: bool = False, metadata: Optional[dict] = None) -> None:
        """Save the fitted explainer to directory ``path`` atomically; see :func:`actclust.load`.

        An existing run at ``path`` is replaced only with ``overwrite=True``; a directory that
        holds anything else is never written into. ``metadata`` is kept in the manifest. The
        approximate search indexes built so far are kept with the run (checked by SHA-256 and
        memory-mapped at load, not rebuilt).
        """
        from .analysis import saved
        from .io.persistence import params_of, save

        state = self._state()
        save(state, self._fitted_params(params_of(self)), self._adapter(), path, custom_output=self.output is not None,
             overwrite=overwrite, metadata=metadata, files=saved.saved_index_files(state), kept=saved.kept(state))

    def _fitted_params(self, now: dict) -> dict:
        """The parameters a save records: those the state was fitted with (``now``'s values for those that only
        apply to later calls), with a warning naming any set to other values since."""
        fitted = self.__dict__.get("_fitted_with")
        if fitted is None:  # loaded: its parameters are the run's
            return now
        out = {k: (now[k] if k in _LATER_CALLS else v) for k, v in fitted[0].items()}
        changed = sorted(k for k in out if out[k] != now.get(k))
        if changed:
            warnings.warn(f"The parameters {changed} were set after fit; the run saves those it was fitted with "
                          f"({', '.join(f'{k}={out[k]!r}' for k in changed)}). Call fit() again to use the new ones.",
                          ActClustWarning, stacklevel=3)
        return out

    # ------------------------------------------------------------------ notebook display
    def set_display(self, train=None, *, class_names=None, render=None, mean=None, std=None, feature_names=None,
                    tokenizer=None) -> "ActivationClustering":
        """How results draw themselves in notebooks (:mod:`actclust.views.notebook`); returns ``self``.

        ``train`` (the training inputs ``fit`` saw, in order) lets explanations, similar samples and
        concepts show training samples as pictures, tables or text instead of indices; the other
        options are :func:`actclust.report`'s. Kept with this object only (not saved, not a parameter).
        """
        from .views.notebook import Display, check_display
        from .views.render import check_train

        check_train(self, train)
        self.__dict__["_display"] = check_display(self._state(), Display(
            train=train, class_names=class_names, render=render, mean=mean, std=std, feature_names=feature_names,
            tokenizer=tokenizer), self._adapter().input_channel_axis)
        return self

    def _display_context(self, inputs=None):
        from .views.notebook import Context

        return Context(self._state(), self.__dict__.get("_display"), inputs, self.label_key)

    def _repr_html_(self) -> str:
        from .views.notebook import estimator_html

        return estimator_html(self)

    def __repr__(self) -> str:
        """The layers and every parameter set to another value than its default (as scikit-learn shows them)."""
        shown = [f"layers={self.layers!r}"] + [f"{k}={v!r}" for k, v in self.get_params().items()
                                               if k not in ("model", "layers") and not _is_default(k, v)]
        return f"ActivationClustering({', '.join(shown)})"

    # ------------------------------------------------------------------ scikit-learn's parameter API
    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters and their values (scikit-learn's API: ``clone`` and grid searches use it)."""
        return {k: getattr(self, k) for k in _PARAMS}

    def set_params(self, **params) -> "ActivationClustering":
        """Set constructor parameters (checked at the next ``fit``, as scikit-learn does); returns ``self``."""
        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise ParameterError(f"{type(self).__name__} has no parameters {unknown}; its parameters are {list(_PARAMS)}.")
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return self.__dict__.get("_fitted_state") is not None

    def __sklearn_tags__(self):
        """scikit-learn's tags (1.6 and later, which read them in ``check_is_fitted``; earlier ones never call this): an
        estimator that needs fit, no ``y``."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False), non_deterministic=False)


def load(path, model=None, *, output=None, progress: bool = True, verify: bool = True, device=None) -> ActivationClustering:
    """Load a run saved by :meth:`ActivationClustering.save`, bound to ``model``.

    ``model`` may be the fitted network wrapped or unwrapped (``DataParallel``, ``torch.compile``).
    A run fitted with ``output=`` needs the same function again. Raises
    :class:`InvalidSaveError` for a missing, truncated, tampered or inconsistent save, and warns
    with :class:`ModelMismatchWarning` when ``model``'s weights differ from the fitted model's.
    Loading parses JSON and safetensors only: it runs no code from the run's folder (see
    ``docs/security.md``). ``verify`` checks every file of the run against its SHA-256 in one
    streaming pass (a progress bar on large stores); ``verify=False`` skips it for runs you trust.
    ``device`` is where the analyses compute (see :class:`ActivationClustering`; by default the model's
    device): a run fitted on a GPU loads and answers on a machine without one.
    """
    if not isinstance(verify, (bool, np.bool_)):  # verify='no' was taken as True
        raise ParameterError(f"verify must be True or False. Got {verify!r} instead.")
    if model is None:  # a TypeError said only that an argument was missing
        kept = sorted(Path(path).glob("model-*.onnx")) if Path(path).is_dir() else []
        hint = (f" This run keeps its ONNX model (data, not code): actclust.load(path, {str(kept[0])!r})." if kept
                else "")
        raise ParameterError(
            f"load({str(path)!r}) needs the model the run explains: actclust.load(path, model). A run keeps no "
            f"code; the command line rebuilds a model a run records (docs/security.md).{hint}")
    from .analysis import saved
    from .exceptions import InvalidSaveError
    from .io.persistence import INDEX_FILE_RE, attached, check_model, read_run

    from .io import atomic

    with atomic.reading(path):  # one save's files: a save over the run waits, or is waited for
        try:
            state, params, manifest = read_run(path, verify=verify, progress=progress, restore=saved.RESTORE)
            saved.attach_saved_indexes(state, path, attached(manifest, Path(path), INDEX_FILE_RE))
        except FileNotFoundError as e:  # not by a save of ours (it takes turns with the lock): another program
            raise InvalidSaveError(f"A file of the run at {path} went missing while it was loaded ({e.filename}): "
                                   "something changed the folder meanwhile; load it again.") from None
    if manifest.get("custom_output") and output is None:
        raise ParameterError(
            f"The run at {path} was fitted with a custom output= function; pass the same one: "
            "actclust.load(path, model, output=...)."
        )
    try:
        ac = ActivationClustering(model, progress=progress, output=output, device=device, **params)
    except TypeError as e:
        raise InvalidSaveError(f"The saved run at {path} has parameters this actclust does not know ({e}).") from None
    check_model(state, manifest, adapt(model, output), path)
    ac._backend()  # a device that is not here (device="cuda" without CUDA) is refused now, not at first use
    ac.state_ = state
    if isinstance(manifest.get("model_fingerprint"), str):  # as after fit: a save records the run's parameters, and
        # another model bound later (or this one changed in place) is said to differ from the run's
        from .io.persistence import params_of

        ac.__dict__["_fitted_with"] = (params_of(ac), id(ac.model), manifest["model_fingerprint"])
        ac.__dict__["_weights_seen"] = ac._adapter(check=False).weights_version()
    return ac


def _fitted(name: str, doc: str):
    # a list is handed out as a copy: appending to layers_ changed the fitted state's own (a bare KeyError next)
    return property(lambda self: _copied(getattr(self._state(), name)), doc=doc)


def _copied(value):
    return list(value) if isinstance(value, list) else value


#: The constructor's parameters, in order, and their defaults.
_DEFAULTS = {p.name: p.default for p in inspect.signature(ActivationClustering.__init__).parameters.values()
             if p.name != "self"}
_PARAMS = tuple(_DEFAULTS)
#: Parameters that apply to the calls after fit, not to what it learned: a save records their values at save time.
_LATER_CALLS = ("batch_size", "search", "label_key", "engine", "ray_options")


def _is_default(name: str, value) -> bool:
    default = _DEFAULTS[name]
    try:
        return bool(value == default) if not isinstance(value, np.ndarray) else False
    except Exception:  # values that do not compare (arrays, objects): shown
        return False


for _attr, _field, _doc in (
    ("layers_", "layers", "Fitted layers (canonical names)."),
    ("n_classes_", "n_classes", "Number of classes of the model."),
    ("n_samples_fit_", "n_samples", "Number of training samples."),
    ("reducers_", "reducers", "Reducer of each layer."),
    ("clusterings_", "clusterings", "Clustering of each layer."),
    ("posteriors_", "posteriors", "Class mix (n_clusters, n_classes) of each layer's clusters."),
    ("weights_", "weights", "Layer weights of the surrogate, summing to 1."),
    ("train_vectors_", "train_vectors", "Reduced training vectors of each layer."),
    ("train_predictions_", "train_predictions", "The DNN's predictions on the training data."),
    ("train_labels_", "train_labels", "True training labels, or None."),
    ("train_score_", "train_score", "In-sample scores computed during fit."),
    ("fit_info_", "fit_info", "Timings of the fit stages and empty cluster counts."),
):
    setattr(ActivationClustering, _attr, _fitted(_field, _doc))
ActivationClustering.input_shape_ = property(lambda self: self._state().input_spec.shape,
                                             doc="Per-sample shape of the training inputs.")
