"""Save and load fitted explainers without pickle.

A run is a directory holding ``manifest.json`` and one ``arrays-<hash>.safetensors`` file. The
manifest holds the format version, the estimator's parameters (every parameter of its
signature), the fitted state's scalars (layers, classes, input spec, reducers, clusterings), a
fingerprint of the model's weights, the SHA-256 of the array file, and a ``digest``: the SHA-256
of everything else in the manifest, so that an edit of any value that affects results is caught
at load. Loaded arrays are validated (shapes, finite values, weights that sum to 1). Loading
parses JSON and safetensors only, so a file cannot run code.

Writes are atomic: the array file is written under a temporary name and renamed, then the
manifest is swapped in with ``os.replace``; a crash at any point leaves the previous save whole.
Temporary files are removed when a save fails, and those left by a killed save are removed by
the next save to the same directory. One process should save to a directory at a time.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..clustering.base import make_clustering
from ..exceptions import InvalidSaveError, ModelMismatchWarning, ParameterError, RunExistsError
from ..capture.reduction import make_reducer
from ..state import SUMMARY_SUFFIX, FittedState, InputSpec
from ..store.vectors import MANIFEST as STORE_MANIFEST, VectorStore

__all__ = ["save", "read_run", "check_model", "read_manifest", "check_writable", "FORMAT_VERSION"]

FORMAT = "actclust-run"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_ARRAYS_RE = re.compile(r"^arrays-[0-9a-f]{16}\.safetensors$")
_TEMP_RE = re.compile(r"^\.(arrays|manifest|store)-[0-9a-f]{32}\.tmp$")
_RUNTIME = ("model", "progress", "output")  # parameters that are not part of a saved run
_TOL = 1e-4


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _own_leftovers(path: Path) -> list:
    """Files a failed or killed save of ours may leave behind in ``path``."""
    return [p for p in path.iterdir() if _TEMP_RE.match(p.name) or _ARRAYS_RE.match(p.name)]


def check_writable(path, overwrite: bool, *, flag: str = "pass overwrite=True") -> None:
    """Raise :class:`RunExistsError` unless a run may be saved at ``path`` (callers check before long work).

    ``flag`` says how the caller replaces a run (the CLI passes ``"add --overwrite"``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"Cannot save to {path}: it is a file, not a directory.")
    if not path.is_dir():
        return
    if (path / MANIFEST).exists():
        if not overwrite:
            raise RunExistsError(f"A saved run already exists at {path}; {flag} to replace it.")
        return
    others = sorted(p.name for p in path.iterdir() if p not in _own_leftovers(path))
    if others:
        raise RunExistsError(
            f"Cannot save to {path}: the directory holds other files ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}). Choose a new or empty directory."
        )


def params_of(estimator) -> dict:
    """Every parameter of the estimator's signature, except the model and run-time options."""
    names = [p for p in inspect.signature(type(estimator).__init__).parameters
             if p != "self" and p not in _RUNTIME]
    params = {p: os.fspath(v) if isinstance(v, os.PathLike) else v
              for p, v in ((p, getattr(estimator, p)) for p in names)}
    return _jsonable({p: list(v) if p == "layers" else v for p, v in params.items()})


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(state: FittedState, params: dict, adapter, path, *, custom_output: bool = False,
         overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Write a fitted ``state`` (with the estimator's ``params`` and the model's ``adapter``) to
    directory ``path`` atomically; returns the path.

    ``metadata`` (JSON-serialisable) is stored as is in the manifest, e.g. how to rebuild the model.
    """
    from safetensors.numpy import save_file

    from .._version import __version__

    path = Path(path)
    check_writable(path, overwrite)
    for layer, r in state.reducers.items():
        if type(r).__module__ != "actclust.capture.reduction":
            raise ParameterError(
                f"Cannot save the custom reducer {r!r} of layer {layer!r}; only built-in reducers are saved.")
    arrays = {"weights": state.weights.astype(np.float64), "train_predictions": state.train_predictions}
    on_disk = getattr(state.train_vectors, "on_disk", False)
    if state.train_labels is not None:
        arrays["train_labels"] = state.train_labels
    for layer in state.layers:
        arrays[f"{layer}/posteriors"] = state.posteriors[layer]
        arrays[f"{layer}/temperature"] = np.array([state.temperatures[layer]], dtype=np.float64)
        if not on_disk:
            arrays[f"{layer}/train_vectors"] = state.train_vectors[layer]
        for k, v in state.clusterings[layer].state_dict().items():
            arrays[f"{layer}/clustering/{k}"] = v
        for k, v in state.reducers[layer].state_dict().items():
            arrays[f"{layer}/reducer/{k}"] = v
    summaries = [key for key in state.train_vectors if key not in state.layers]  # retrieval-only summaries
    if not on_disk:
        arrays.update({f"{key}/train_vectors": state.train_vectors[key] for key in summaries})
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "actclust_version": __version__,
        "model_class": adapter.model_class, "model_fingerprint": adapter.fingerprint(),
        "custom_output": bool(custom_output),
        "params": params,
        "state": _jsonable({
            "layers": state.layers, "n_classes": state.n_classes, "input_spec": state.input_spec.to_dict(),
            "normalize": state.normalize, "posterior": state.posterior, "random_state": state.random_state,
            "n_samples": state.n_samples,
            "reducers": {l: r.spec for l, r in state.reducers.items()},
            "clustering": {l: c.name for l, c in state.clusterings.items()},
            "n_clusters": {l: c.n_clusters for l, c in state.clusterings.items()},
            "train_score": state.train_score, "fit_info": state.fit_info,
            "spatial_grid": state.spatial_grid, "summaries": summaries,
            # A store on disk is linked into the run's store/ folder, not copied into the arrays.
            "store": {"dtype": state.train_vectors.dtype, "widths": state.train_vectors.widths} if on_disk else None,
        }),
        "metadata": _jsonable(metadata or {}),
    }
    # Trust-chip thresholds of the last trust calibration, when there was one (issue 21): kept so that
    # every view of the run states the same false-alarm thresholds; absent otherwise.
    if state.cache.get("trust_thresholds") is not None:
        manifest["trust_thresholds"] = _jsonable(state.cache["trust_thresholds"])
    json.dumps(manifest)  # fails here, before anything is written, if metadata is not JSON

    path.mkdir(parents=True, exist_ok=True)
    for stale in path.iterdir():  # temporary files of a killed earlier save
        if _TEMP_RE.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = path / f".arrays-{uuid.uuid4().hex}.tmp"
    tmp_manifest = path / f".manifest-{uuid.uuid4().hex}.tmp"
    arrays_path, replaced = None, False
    try:
        save_file(arrays, str(tmp))
        digest = _sha256(tmp)
        _fsync(tmp)
        arrays_path = path / f"arrays-{digest[:16]}.safetensors"
        replaced = arrays_path.exists()
        os.replace(tmp, arrays_path)
        if on_disk:
            _link_store(state.train_vectors.directory, path)
        manifest.update(arrays_file=arrays_path.name, arrays_sha256=digest)
        manifest["digest"] = _digest(manifest)
        tmp_manifest.write_text(json.dumps(manifest, indent=2))
        _fsync(tmp_manifest)
        mode = 0o666 & ~_umask()
        for f in (arrays_path, tmp_manifest):
            os.chmod(f, mode)  # the same permissions for both files, as for any file the user creates
        os.replace(tmp_manifest, path / MANIFEST)
        _fsync(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
        if on_disk and not (path / MANIFEST).exists():
            shutil.rmtree(path / "store", ignore_errors=True)
        if arrays_path is not None and not replaced and _referenced(path) != arrays_path.name:
            arrays_path.unlink(missing_ok=True)
        raise
    for old in path.glob("arrays-*.safetensors"):
        if old.name != arrays_path.name:
            old.unlink()
    return path


def _link_store(source: Path, path: Path) -> None:
    """Put the store's files in ``path/store`` as hard links (copies across file systems), atomically."""
    tmp = path / f".store-{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        for f in source.iterdir():
            if f.name == STORE_MANIFEST or f.name.endswith(".bin"):
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        old = path / f".store-{uuid.uuid4().hex}.tmp"
        if (path / "store").exists():
            os.replace(path / "store", old)
        os.replace(tmp, path / "store")
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _referenced(path: Path):
    try:
        return json.loads((path / MANIFEST).read_text()).get("arrays_file")
    except (OSError, ValueError, AttributeError):
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(path) -> dict:
    """The parsed, integrity-checked ``manifest.json`` of a saved run (no arrays loaded, nothing executed)."""
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
            f"{path} has format version {m.get('format_version')!r}; this actclust reads version "
            f"{FORMAT_VERSION}. Fit and save the run again with this version."
        )
    if m.get("digest") != _digest(m):
        raise InvalidSaveError(
            f"{manifest_path} does not match its digest: a value in it was changed after saving (or the file "
            "is damaged). Restore the saved manifest, or fit and save again."
        )
    return m


def read_run(path) -> tuple:
    """``(state, params, manifest)`` of the run saved at ``path``, every file checked; nothing executed.

    Raises :class:`InvalidSaveError` for a missing, truncated, tampered or inconsistent save.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    m = read_manifest(path)
    arrays_name = m.get("arrays_file")
    if not isinstance(arrays_name, str) or not _ARRAYS_RE.match(arrays_name):
        raise InvalidSaveError(f"{path / MANIFEST} names an invalid array file {arrays_name!r}.")
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
    try:
        state = _state(m["state"], arrays, path)
        params = dict(m["params"])
    except InvalidSaveError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InvalidSaveError(f"The saved run at {path} is inconsistent or incomplete ({type(e).__name__}: {e}).") from None
    if m.get("trust_thresholds") is not None:
        state.cache["trust_thresholds"] = _thresholds(m["trust_thresholds"], path)
    return state, params, m


def _thresholds(t, path) -> dict:
    """The saved trust-chip thresholds, checked: a rate in (0, 1) and finite numbers per signal."""
    try:
        rate, signals = float(t["false_alarm_rate"]), {str(k): float(v) for k, v in t["signals"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidSaveError(f"The saved run at {path} has malformed trust thresholds.") from None
    if not 0 < rate < 1 or not all(np.isfinite(v) for v in signals.values()):
        raise InvalidSaveError(f"The saved run at {path} has trust thresholds out of range.")
    return {**t, "false_alarm_rate": rate, "signals": signals}


def check_model(state: FittedState, manifest: dict, adapter, path) -> None:
    """Refuse a model without the run's layers; warn when its weights differ from the fitted model's."""
    missing = [l for l in state.layers if adapter.canonical(l) not in set(adapter.layer_names())]
    if missing:
        raise InvalidSaveError(f"The model has no layers {missing}, which the run at {path} was fitted on; "
                               f"is it the model of class {manifest.get('model_class')}?")
    if adapter.fingerprint() != manifest.get("model_fingerprint"):
        warnings.warn(
            f"The model's parameters differ from those of the model the run at {path} was fitted with "
            f"({manifest.get('model_class')}); predictions and explanations may not describe this model.",
            ModelMismatchWarning, stacklevel=3,
        )


def _state(s: dict, arrays: dict, path: Path) -> FittedState:
    """Rebuild the fitted state from the manifest's ``state`` section and the arrays, validating both."""
    layers = [str(l) for l in s["layers"]]
    n_classes, n = int(s["n_classes"]), int(s["n_samples"])

    def arr(key, shape=None, *, integer=False, finite=True):
        if key not in arrays:
            raise InvalidSaveError(f"The saved arrays lack {key!r}.")
        a = arrays[key]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise InvalidSaveError(f"The saved array {key!r} has shape {tuple(a.shape)}; expected {tuple(shape)}.")
        if integer:
            if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= n_classes)):
                raise InvalidSaveError(f"The saved array {key!r} must hold class ids in 0..{n_classes - 1}.")
        elif finite and not np.all(np.isfinite(a)):
            raise InvalidSaveError(f"The saved array {key!r} holds NaN or infinite values.")
        return a

    weights = arr("weights", (len(layers),)).astype(np.float64)
    if (weights < 0).any() or abs(weights.sum() - 1) > _TOL:
        raise InvalidSaveError(f"The saved layer weights {weights.tolist()} must be non-negative and sum to 1.")
    labels = arr("train_labels", (n,), integer=True) if "train_labels" in arrays else None
    reducers, clusterings, posteriors, temperatures, vectors = {}, {}, {}, {}, {}
    store = None
    if s.get("store") is not None:  # memory-mapped, not read: only its manifest and file sizes are checked
        store = VectorStore.open(path / "store")
        if store.n_samples != n or store.widths != {k: int(w) for k, w in s["store"]["widths"].items()}:
            raise InvalidSaveError(f"The vector store in {path / 'store'} holds {store.n_samples} samples of widths "
                                   f"{store.widths}; the run says {n} of {s['store']['widths']}.")
    for l in layers:
        k = int(s["n_clusters"][l])
        reducer = make_reducer(s["reducers"][l])
        reducer.load_state_dict(_prefixed(arrays, f"{l}/reducer/"))
        clustering = make_clustering(s["clustering"][l], k)
        clustering.load_state_dict(_prefixed(arrays, f"{l}/clustering/"))
        vectors[l] = store[l] if store is not None else arr(f"{l}/train_vectors")
        if vectors[l].ndim != 2 or len(vectors[l]) != n:
            raise InvalidSaveError(f"The saved training vectors of layer {l!r} have shape {vectors[l].shape}; "
                                   f"expected ({n}, d).")
        centers = clustering.centers_
        if centers.shape != (k, vectors[l].shape[1]) or not np.all(np.isfinite(centers)):
            raise InvalidSaveError(f"The saved centres of layer {l!r} have shape {centers.shape} or non-finite "
                                   f"values; expected finite ({k}, {vectors[l].shape[1]}).")
        if not np.isfinite(clustering.scale_) or clustering.scale_ <= 0:
            raise InvalidSaveError(f"The saved scale of layer {l!r} must be a positive number.")
        post = arr(f"{l}/posteriors", (k, n_classes))
        if (post < 0).any() or np.abs(post.sum(1) - 1).max() > _TOL:
            raise InvalidSaveError(f"The saved class mixes of layer {l!r} must be non-negative rows summing to 1.")
        t = float(arr(f"{l}/temperature", (1,))[0])
        if t < 0:
            raise InvalidSaveError(f"The saved temperature of layer {l!r} is negative.")
        reducers[l], clusterings[l], posteriors[l], temperatures[l] = reducer, clustering, post, t
    for key in s.get("summaries") or []:
        if str(key).split(SUMMARY_SUFFIX)[0] not in layers or not str(key).endswith(SUMMARY_SUFFIX):
            raise InvalidSaveError(f"The saved run names a spatial summary {key!r} of no fitted layer.")
        vectors[key] = store[key] if store is not None else arr(f"{key}/train_vectors")
        if vectors[key].ndim != 2 or len(vectors[key]) != n:
            raise InvalidSaveError(f"The saved summaries {key!r} have shape {vectors[key].shape}; expected ({n}, d).")
    return FittedState(
        layers=layers, n_classes=n_classes, input_spec=InputSpec.from_dict(s["input_spec"]),
        normalize=s["normalize"], posterior=str(s["posterior"]), reducers=reducers, clusterings=clusterings,
        temperatures=temperatures, posteriors=posteriors, weights=weights,
        train_vectors=store if store is not None else VectorStore(vectors),
        train_predictions=arr("train_predictions", (n,), integer=True), train_labels=labels,
        train_score=s.get("train_score") or {}, fit_info=s.get("fit_info") or {},
        random_state=int(s["random_state"]), spatial_grid=s.get("spatial_grid"),
    )


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
