"""Save and load fitted explainers without pickle.

A run is a directory holding ``manifest.json`` (format version, parameters, layer names,
reducers, a fingerprint of the model's parameters, and the SHA-256 of the array file) and one
``arrays-<hash>.safetensors`` file. Loading parses JSON and safetensors only, so a file cannot
run code. Writes are atomic: the new array file is written under a new name first, then the
manifest is swapped in with ``os.replace``; a crash at any point leaves the previous save whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .clustering import make_clustering
from .exceptions import InvalidSaveError, ModelMismatchWarning
from .reduction import make_reducer

__all__ = ["load", "model_fingerprint", "FORMAT_VERSION"]

FORMAT = "actclust-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ARRAYS_RE = re.compile(r"^arrays-[0-9a-f]{16}\.safetensors$")
_PARAMS = ("n_clusters", "reducer", "normalize", "posterior", "layer_weights", "temperature", "smoothing",
           "clustering", "validation_fraction", "batch_size", "random_state")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and values of the model's state dict."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_writable(path, overwrite: bool, *, flag: str = "pass overwrite=True") -> None:
    """Raise ``FileExistsError`` unless a run may be saved at ``path`` (callers check before long work).

    ``flag`` says how the caller replaces a run (the CLI passes ``"add --overwrite"``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Cannot save to {path}: it is a file, not a directory.")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST).exists():
            raise FileExistsError(
                f"Cannot save to {path}: the directory holds other files. Choose a new or empty directory."
            )
        if not overwrite:
            raise FileExistsError(f"A saved run already exists at {path}; {flag} to replace it.")


def save(ac, path, *, overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Write ``ac`` (fitted) to directory ``path`` atomically; returns the path.

    ``metadata`` (JSON-serialisable) is stored as is in the manifest, e.g. how to rebuild the model.
    """
    from safetensors.numpy import save_file

    ac._check_fitted()
    path = Path(path)
    check_writable(path, overwrite)
    for layer, r in ac.reducers_.items():
        if type(r).__module__ != "actclust.reduction":
            raise ValueError(f"Cannot save the custom reducer {r!r} of layer {layer!r}; only built-in reducers are saved.")
    path.mkdir(parents=True, exist_ok=True)

    arrays = {"weights": ac.weights_.astype(np.float64), "train_predictions": ac.train_predictions_}
    if ac.train_labels_ is not None:
        arrays["train_labels"] = ac.train_labels_
    for layer in ac.layers_:
        arrays[f"{layer}/posteriors"] = ac.posteriors_[layer]
        arrays[f"{layer}/train_vectors"] = ac.train_vectors_[layer]
        for k, v in ac.clusterings_[layer].state_dict().items():
            arrays[f"{layer}/clustering/{k}"] = v
        for k, v in ac.reducers_[layer].state_dict().items():
            arrays[f"{layer}/reducer/{k}"] = v
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    tmp = path / f".arrays-{uuid.uuid4().hex}.tmp"
    save_file(arrays, str(tmp))
    digest = _sha256(tmp)
    _fsync(tmp)
    arrays_name = f"arrays-{digest[:16]}.safetensors"
    os.replace(tmp, path / arrays_name)

    from . import __version__

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "actclust_version": __version__,
        "arrays_file": arrays_name, "arrays_sha256": digest,
        "model_class": f"{type(ac.model).__module__}.{type(ac.model).__qualname__}",
        "model_fingerprint": model_fingerprint(ac.model),
        "layers": ac.layers_, "n_classes": ac.n_classes_, "input_shape": list(ac.input_shape_), "n_samples_fit": ac.n_samples_fit_,
        "reducers": {l: r.spec for l, r in ac.reducers_.items()},
        "clustering": {l: c.name for l, c in ac.clusterings_.items()},
        "n_clusters": {l: c.n_clusters for l, c in ac.clusterings_.items()},
        "params": _jsonable({p: getattr(ac, p) for p in _PARAMS if p != "reducer"}),
        "fit_info": _jsonable(ac.fit_info_),
        "train_score": _jsonable(ac.train_score_),
        "metadata": _jsonable(metadata or {}),
    }
    tmp_manifest = path / f".manifest-{uuid.uuid4().hex}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    _fsync(tmp_manifest)
    os.replace(tmp_manifest, path / MANIFEST)
    _fsync(path)
    for old in path.glob("arrays-*.safetensors"):
        if old.name != arrays_name:
            old.unlink()
    return path


def read_manifest(path) -> dict:
    """The parsed ``manifest.json`` of a saved run (no arrays loaded, nothing executed)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise InvalidSaveError(f"No saved run at {path}: {MANIFEST} is missing.")
    try:
        m = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidSaveError(f"{manifest_path} is not valid JSON ({e}); the save is damaged.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InvalidSaveError(f"{manifest_path} is not an actclust run manifest.")
    if m.get("format_version") != FORMAT_VERSION:
        raise InvalidSaveError(
            f"{path} has format version {m.get('format_version')!r}; this actclust reads version {FORMAT_VERSION}."
        )
    return m


def load(path, model: nn.Module, *, progress: bool = True):
    """Load a run saved by :meth:`ActivationClustering.save`, bound to ``model``.

    Raises :class:`InvalidSaveError` for a missing, truncated or tampered save, and warns with
    :class:`ModelMismatchWarning` when ``model``'s parameters differ from the fitted model's.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from .explainer import ActivationClustering

    path = Path(path)
    m = read_manifest(path)
    manifest_path = path / MANIFEST
    try:
        arrays_name = m["arrays_file"]
        if not isinstance(arrays_name, str) or not _ARRAYS_RE.match(arrays_name):
            raise InvalidSaveError(f"{manifest_path} names an invalid array file {arrays_name!r}.")
        arrays_path = path / arrays_name
        if not arrays_path.is_file():
            raise InvalidSaveError(f"The array file {arrays_path} of the saved run is missing.")
        if _sha256(arrays_path) != m["arrays_sha256"]:
            raise InvalidSaveError(
                f"{arrays_path} does not match the checksum in {MANIFEST}: the save is truncated or was modified."
            )
        try:
            arrays = load_file(str(arrays_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidSaveError(f"{arrays_path} cannot be read as safetensors: {e}") from None
        ac = _rebuild(ActivationClustering, m, arrays, model, progress)
    except InvalidSaveError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InvalidSaveError(f"The saved run at {path} is inconsistent or incomplete ({type(e).__name__}: {e}).") from None
    if model_fingerprint(model) != m.get("model_fingerprint"):
        warnings.warn(
            f"The model's parameters differ from those of the model the run at {path} was fitted with "
            f"({m.get('model_class')}); predictions and explanations may not describe this model.",
            ModelMismatchWarning, stacklevel=2,
        )
    return ac


def _rebuild(cls, m, arrays, model, progress):
    layers = list(m["layers"])
    params = dict(m["params"])
    ac = cls(model, layers, reducer=dict(m["reducers"]), progress=progress, **params)
    n_classes = int(m["n_classes"])
    ac.layers_, ac.n_classes_, ac.n_samples_fit_ = layers, n_classes, int(m["n_samples_fit"])
    ac.input_shape_ = tuple(int(v) for v in m["input_shape"])
    ac.fit_info_ = m.get("fit_info", {})
    ac.train_score_ = m.get("train_score")
    ac.weights_ = np.asarray(arrays["weights"], dtype=np.float64)
    ac.train_predictions_ = arrays["train_predictions"]
    ac.train_labels_ = arrays.get("train_labels")
    if ac.weights_.shape != (len(layers),):
        raise ValueError(f"{len(layers)} layers but {ac.weights_.shape} weights")
    ac.reducers_, ac.clusterings_, ac.posteriors_, ac.train_vectors_ = {}, {}, {}, {}
    for layer in layers:
        reducer = make_reducer(m["reducers"][layer])
        reducer.load_state_dict(_prefixed(arrays, f"{layer}/reducer/"))
        clustering = make_clustering(m["clustering"][layer], int(m["n_clusters"][layer]))
        clustering.load_state_dict(_prefixed(arrays, f"{layer}/clustering/"))
        post = arrays[f"{layer}/posteriors"]
        if post.shape != (clustering.n_clusters, n_classes) or clustering.centers_.shape[0] != clustering.n_clusters:
            raise ValueError(f"arrays of layer {layer!r} do not fit {clustering.n_clusters} clusters and {n_classes} classes")
        ac.reducers_[layer], ac.clusterings_[layer], ac.posteriors_[layer] = reducer, clustering, post
        ac.train_vectors_[layer] = arrays[f"{layer}/train_vectors"]
    return ac


def _prefixed(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)
