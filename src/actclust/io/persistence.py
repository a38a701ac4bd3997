"""Save and load fitted explainers without pickle.

A run is a folder holding ``manifest.json``, one ``arrays-<hash>.safetensors`` file, with
``store=`` a ``store-<hash>/`` folder of the vector store's files (hard links to the fit's
generation), and the files the caller asked to keep with it (``files=``: the CLI's model weights
``model-<hash>.safetensors``, the demo's ``report.html``). The manifest holds the format version,
the estimator's parameters (every parameter of its signature), the fitted state's scalars
(layers, classes, input spec, reducers, clusterings), a fingerprint of the model's weights, the
SHA-256 of the array file, of ``store.json`` and of every stored vector file, and a ``digest``:
the SHA-256 of everything else in the manifest, so that an edit of any value that affects results
is caught at load. :func:`read_run` checks every file against its SHA-256 in one streaming pass
(``verify=False`` skips it), then validates the arrays (shapes, finite values, weights that sum to
1). Loading parses JSON and safetensors only, so a file cannot run code; the digest is unkeyed, so
it catches accidents and damage, not a forger (see ``docs/security.md``).

Writes are atomic (:mod:`actclust.io.atomic`): every file is first written into a temporary folder
of ours inside the run folder, then renamed into place: the content-addressed entries first, which
the current manifest does not name, then the manifest (the commit), then files with fixed names;
so a crash or a kill at any point leaves the previous save, or the new one, whole. The leftovers of
a killed save are ours by name and removed by the next save. Saves into one folder take turns
(an ``flock`` on the folder). A folder is written into only if it is empty, holds only such
leftovers, or holds an actclust run (recognised by its manifest, not by a file name) of nothing
but its own files, and then only with ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import stat
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..clustering.base import make_clustering
from ..exceptions import InvalidSaveError, ModelMismatchWarning, ParameterError, RunExistsError
from ..capture.reduction import make_reducer
from ..state import SUMMARY_SUFFIX, FittedState, InputSpec
from ..store.vectors import MANIFEST as STORE_MANIFEST, VectorStore
from . import atomic
from .tensorfile import write_arrays

__all__ = ["save", "read_run", "check_model", "read_manifest", "check_writable", "hashed_name", "run_files",
           "FORMAT_VERSION", "VERIFY_BAR_BYTES", "SHA_PLACEHOLDER", "INDEX_FILE_RE", "attached"]

FORMAT = "actclust-run"
#: 3: the store's files and store.json in the digest, attached files, no store/ folder; layouts, input
#: statistics and summary seeds recorded.
FORMAT_VERSION = 3
#: Versions this actclust reads: 2 (every map read channels-first; only runs without a vector store,
#: whose one array file is pinned by its SHA-256) and 3.
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
_ARRAYS_RE = re.compile(r"^arrays-[0-9a-f]{16}\.safetensors$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_STORE_RE = re.compile(r"^store-[0-9a-f]{16}$")
_STORE_FILE_RE = re.compile(r"^(store\.json|layer-\d+\.bin)$")
# a file that carries its content's hash in its name (model weights, search indexes): the current manifest
# cannot name a file of the same name and other content, so it is put in place before the manifest
_HASHED_RE = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{16}\.(safetensors|faiss)$")
#: In a name given to ``files=``, replaced by the first 16 hex digits of the file's SHA-256 once written.
SHA_PLACEHOLDER = "{sha}"
#: Attached search indexes (:mod:`actclust.analysis.indexes`): checked at load with the store's files.
INDEX_FILE_RE = re.compile(r"^index_[A-Za-z0-9]+-[0-9a-f]{16}\.(faiss|safetensors)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_MANIFEST = 64 << 20  # a manifest is a few KiB; a larger file is not one of ours
_RUNTIME = ("model", "progress", "output", "device")  # parameters that are not part of a saved run
_TOL = 1e-4
#: Stores at least this large show a progress bar while their files are verified at load.
VERIFY_BAR_BYTES = 256 << 20


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def hashed_name(name: str, data: bytes) -> str:
    """``model.safetensors`` -> ``model-<16 hex of data's SHA-256>.safetensors``: a name for ``files=``
    that is put in place before the manifest."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}{dot}{suffix}"


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _parse(path: Path):
    """The manifest of the run at ``path`` if it is one of ours with an intact digest, else None."""
    f = path / MANIFEST
    if not _regular(f) or f.stat().st_size > _MAX_MANIFEST:
        return None
    try:
        m = json.loads(f.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("digest") != _digest(m):
        return None
    return m


def run_files(manifest: dict) -> set:
    """The names of the entries of a run folder that belong to the run of ``manifest``."""
    names = {MANIFEST}
    if isinstance(manifest.get("arrays_file"), str):
        names.add(manifest["arrays_file"])
    store = (manifest.get("state") or {}).get("store") if isinstance(manifest.get("state"), dict) else None
    if isinstance(store, dict):
        names.add(store.get("dir", "store"))  # format 2 kept its store in store/
    if isinstance(manifest.get("files"), dict):
        names.update(str(n) for n in manifest["files"])
    weights = (manifest.get("metadata") or {}).get("weights") if isinstance(manifest.get("metadata"), dict) else None
    if isinstance(weights, str) and _NAME_RE.match(weights):  # format 2: the CLI's weights beside the run
        names.add(weights)
    return {n for n in names if isinstance(n, str) and _NAME_RE.match(n)}


def _leftover(folder: Path, name: str) -> bool:
    """An entry a killed or failed save of ours may leave in ``folder`` without a (new) manifest: a temporary entry,
    or one named by its content's hash that holds that content (a file whose SHA-256 starts with the hex in its
    name; a store folder of ``store.json`` and ``layer-<i>.bin`` files whose ``store.json`` does). A name alone
    proves nothing: a user's ``ckpt-<16 hex>.safetensors``, or a ``store-<16 hex>/`` of their notes, was removed
    by a save that was not asked to overwrite anything."""
    if atomic.is_temp(name):
        return True
    entry = folder / name
    if _STORE_RE.match(name):
        if not _real_dir(entry) or not _regular(entry / STORE_MANIFEST):
            return False
        if not all(_STORE_FILE_RE.match(n) or atomic.is_temp(n) for n in os.listdir(entry)):
            return False
        return atomic.sha256_file(entry / STORE_MANIFEST).startswith(name[len("store-"):])
    if _ARRAYS_RE.match(name) or _HASHED_RE.match(name):
        return _regular(entry) and atomic.sha256_file(entry).startswith(name.rsplit("-", 1)[1].split(".")[0])
    return False


def check_writable(path, overwrite: bool, *, flag: str = "pass overwrite=True") -> None:
    """Raise unless a run may be saved at ``path`` (callers check before long work).

    Allowed: a new or empty folder, one holding only leftovers of our saves, or, with
    ``overwrite``, an actclust run recognised by its manifest (format and digest) that holds only
    its own files. ``flag`` says how the caller replaces a run (the CLI passes ``"add --overwrite"``).
    """
    path = _path(path)
    atomic.check_can_write(path, "save the run to")  # before long work, not after it
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"Cannot save to {path}: it is a file, not a directory.")
    if not path.is_dir():
        return
    with atomic.guard("read the folder", path):
        names = sorted(os.listdir(path))
    manifest = _parse(path) if MANIFEST in names else None
    if MANIFEST in names and manifest is None:
        raise RunExistsError(
            f"Cannot save to {path}: its {MANIFEST} is not the manifest of an actclust run (or was changed after "
            "saving), so the folder is not replaced, even when asked to. Choose a new or empty directory."
        )
    if manifest is None:
        others = [n for n in names if not _leftover(path, n)]
        if others:
            raise RunExistsError(
                f"Cannot save to {path}: the directory holds other files ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}). Choose a new or empty directory."
            )
        return
    if not overwrite:
        raise RunExistsError(f"A saved run already exists at {path}; {flag} to replace it.")
    own = run_files(manifest)
    others = [n for n in names if n not in own and not _leftover(path, n)]
    if others:
        raise RunExistsError(
            f"Cannot replace the run at {path}: the folder also holds files that are not part of the run "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), which would be left mixed with the new "
            "run. Move them away, or save to a new directory."
        )


def _path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ParameterError(f"The run's path must be a directory path (a str or os.PathLike). Got {path!r} instead.")
    return Path(path)


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


def _fill(name: str, value: str) -> str:
    """``name`` with :data:`SHA_PLACEHOLDER` filled in by ``value``."""
    return value.join(name.split(SHA_PLACEHOLDER))


def _check_files(files) -> dict:
    if files is None:
        return {}
    if not isinstance(files, dict):
        raise ParameterError(f"files must be a dict of file name -> bytes (or None). Got {type(files).__name__}.")
    for name, data in files.items():
        plain = _fill(name, "0" * 16) if isinstance(name, str) else name
        if (not isinstance(name, str) or not _NAME_RE.match(plain) or name == MANIFEST or _ARRAYS_RE.match(plain)
                or _STORE_RE.match(plain) or atomic.is_temp(plain)
                or (SHA_PLACEHOLDER in name and not _HASHED_RE.match(plain))):
            raise ParameterError(f"Cannot keep a file named {name!r} with the run: give a plain file name "
                                 "(letters, digits, '.', '_', '-'), not one of the run's own.")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)) and not callable(data):
            raise ParameterError(f"files[{name!r}] must be bytes, a function that streams them, or None. "
                                 f"Got {type(data).__name__}.")
    return files


def _check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ParameterError(f"metadata must be a dict (kept as JSON in the manifest). Got {type(metadata).__name__}.")
    value = _jsonable(metadata)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ParameterError(f"metadata must hold only JSON values (str, finite numbers, bool, None, lists and dicts "
                             f"of them): {e}. Convert the other values, e.g. to str.") from None
    return value


def _check_kept(kept, manifest: dict, arrays: dict) -> dict:
    """``kept`` of :func:`save`, checked: keys the manifest does not use, arrays named unlike the run's own."""
    kept = {} if kept is None else dict(kept)
    for key, (_, extra) in kept.items():
        if not isinstance(key, str) or key in manifest:
            raise ParameterError(f"Cannot keep {key!r} with the run: the manifest has that key already.")
        clash = sorted(set(extra) & set(arrays))
        if clash:
            raise ParameterError(f"Cannot keep {key!r} with the run: its arrays {clash} clash with the run's own.")
    return kept


def save(state: FittedState, params: dict, adapter, path, *, custom_output: bool = False,
         overwrite: bool = False, metadata: dict | None = None, files: dict | None = None,
         kept: dict | None = None, flag: str = "pass overwrite=True") -> Path:
    """Write a fitted ``state`` (with the estimator's ``params`` and the model's ``adapter``) to
    directory ``path`` atomically; returns the path.

    ``metadata`` (JSON values) is stored as is in the manifest, e.g. how to rebuild the model.
    ``files`` (name -> bytes, or ``fn(write)`` that streams them by calling ``write(buffer)``) are kept
    with the run and their SHA-256 recorded; a name made by :func:`hashed_name`, or one holding
    :data:`SHA_PLACEHOLDER` (replaced once the file is written: ``index_l0-{sha}.faiss``), is put in
    place before the manifest, any other after it. A value ``None``
    records a file the caller writes into the run after the save (the demo's report), so that a
    later overwrite knows the run owns it. ``kept`` (manifest key -> ``(JSON value, {array name: array})``)
    is what analyses built and keep with the run (trust's calibration, :mod:`actclust.analysis.saved`): the
    value goes into the manifest under its key, the arrays into the array file, and :func:`read_run` hands
    them to that key's ``restore`` callback (this module imports no analysis). Raises
    :class:`RunExistsError` (see :func:`check_writable`; ``flag`` says how to replace a run, in the caller's terms),
    :class:`ParameterError` and, for a system error (a
    full disk, no permission, no such folder), a :class:`StorageError` subclass; nothing partial is left behind.
    """
    from .._version import __version__

    path = _path(path)
    metadata, files = _check_metadata(metadata), _check_files(files)
    check_writable(path, overwrite, flag=flag)
    for layer, r in state.reducers.items():
        if type(r).__module__ != "actclust.capture.reduction":
            raise ParameterError(
                f"Cannot save the custom reducer {r!r} of layer {layer!r}; only built-in reducers are saved.")
    arrays = {"weights": state.weights.astype(np.float64), "train_predictions": state.train_predictions}
    store = state.train_vectors if getattr(state.train_vectors, "on_disk", False) else None
    if state.train_labels is not None:
        arrays["train_labels"] = state.train_labels
    for layer in state.layers:
        arrays[f"{layer}/posteriors"] = state.posteriors[layer]
        arrays[f"{layer}/temperature"] = np.array([state.temperatures[layer]], dtype=np.float64)
        if store is None:
            arrays[f"{layer}/train_vectors"] = state.train_vectors[layer]
        for k, v in state.clusterings[layer].state_dict().items():
            arrays[f"{layer}/clustering/{k}"] = v
        for k, v in state.reducers[layer].state_dict().items():
            arrays[f"{layer}/reducer/{k}"] = v
    summaries = [key for key in state.train_vectors if key not in state.layers]  # retrieval-only summaries
    if store is None:
        arrays.update({f"{key}/train_vectors": state.train_vectors[key] for key in summaries})
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
            "layouts": state.layouts, "input_stats": state.input_stats, "framework": adapter.framework,
            "summary_seeds": state.summary_seeds,
            "store": None,
        }),
        "metadata": metadata,
    }
    # What analyses keep with the run (trust's calibration on the run's own split: a loaded run does not search
    # its calibration samples again, a minute or two at 1M samples; the thresholds of its chips)
    for key, (value, extra) in _check_kept(kept, manifest, arrays).items():
        arrays.update(extra)
        manifest[key] = _jsonable(value)
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ParameterError(f"Cannot save the run: a parameter or fitted value is not JSON ({e}).") from None

    with atomic.guard("save the run to", path), atomic.folder(path) as made:
        turn = atomic.hold_folder(path)  # saves into one folder take turns
        try:
            check_writable(path, overwrite, flag=flag)  # again: another save may have finished meanwhile
            old = _parse(path)
            atomic.clean(path)  # the temporary folders of killed saves
            with atomic.temp_dir(path, "save") as stage:
                _commit(stage, path, manifest, arrays, store, files, old)
            _prune(path, manifest, old)
        except BaseException:
            made.remove()  # while holding the lock: a save waiting for it finds the folder gone and makes it again
            raise
        finally:
            turn.release()
    return path


def _commit(stage: Path, path: Path, manifest: dict, arrays: dict, store, files: dict, old) -> None:
    """Write everything into ``stage``, then put it in place: hashed entries, manifest, named files."""
    digest = atomic.write_into(stage / "arrays", lambda write: write_arrays(arrays, write))
    manifest.update(arrays_file=f"arrays-{digest[:16]}.safetensors", arrays_sha256=digest)
    early = [(stage / "arrays", manifest["arrays_file"])]
    if store is not None:
        manifest["state"]["store"] = _stage_store(store, stage / "store")
        early.append((stage / "store", manifest["state"]["store"]["dir"]))
    recorded, late = {}, []
    for given, data in files.items():
        name = _fill(given, "pending")
        sha = None if data is None else atomic.write_into(stage / name, data if callable(data) else bytes(data))
        if SHA_PLACEHOLDER in given:
            final = _fill(given, sha[:16])
            atomic.publish(stage / name, stage / final)
            name = final
        recorded[name] = sha
        if data is not None:  # a name carrying its content's hash cannot be a file of the current run
            hashed = _HASHED_RE.match(name) and name.split(".")[0].endswith("-" + recorded[name][:16])
            (early if hashed else late).append((stage / name, name))
    manifest["files"] = recorded
    manifest["digest"] = _digest(manifest)
    atomic.write_into(stage / MANIFEST, json.dumps(manifest, indent=2))
    keep = run_files(old) if old is not None else set()
    placed = []
    try:
        for source, name in early:
            target = path / name
            if name in keep and _real_dir(target):
                continue  # the current run's store of the same content: hard links to the same files
            if _real_dir(target):  # a killed save's copy: replaced whole
                atomic.publish(target, stage / "replaced")
            atomic.publish(source, target)
            placed.append(target)
        atomic.publish(stage / MANIFEST, path / MANIFEST)  # the commit
    except BaseException:
        # Undone only if the commit did not happen: an interrupt in the folder's fsync after the manifest's rename
        # (the staged manifest gone: it is the run's now) deleted the files the new manifest names, leaving no run.
        if os.path.lexists(stage / MANIFEST):
            for target in placed:
                if target.name not in keep:
                    shutil.rmtree(target, ignore_errors=True) if _real_dir(target) else target.unlink(missing_ok=True)
        raise
    for source, name in late:
        atomic.publish(source, path / name)


def _stage_store(store: VectorStore, into: Path) -> dict:
    """The store's files in ``into``: hard links to the fit's generation (copies across file systems,
    or written from the explainer's own memory maps if its generation is gone); their hashes."""
    into.mkdir()
    files = dict(store.files)
    atomic.write_into(into / STORE_MANIFEST, store.manifest_bytes)
    for layer, name in store.layer_files.items():
        source = store.directory / name
        try:
            os.link(source, into / name)
            continue
        except OSError:
            pass
        got = atomic.write_into(into / name, lambda write, a=store[layer]: _write_rows(a, write))
        if got != files[name]:
            raise InvalidSaveError(f"The stored vectors of layer {layer!r} ({source}) changed after fit: their SHA-256 "
                                   "no longer matches. Fit again.")
    return {"dir": f"store-{files[STORE_MANIFEST][:16]}", "dtype": store.dtype, "widths": store.widths,
            "sha256": files}


def _write_rows(a: np.ndarray, write, rows: int = 65536) -> None:
    for s in range(0, len(a), rows):
        write(memoryview(np.ascontiguousarray(a[s:s + rows])).cast("B"))


def _prune(path: Path, manifest: dict, old) -> None:
    """Remove what no longer belongs to the run: the previous save's entries and our leftovers."""
    keep = run_files(manifest)
    stale = run_files(old) if old is not None else set()
    for name in os.listdir(path):
        if name in keep or atomic.is_temp(name) or not (name in stale or _leftover(path, name)):
            continue  # temporary entries: atomic.clean, which leaves a live writer's alone
        target = path / name
        if _real_dir(target):
            atomic.discard_dir(target)
        else:
            target.unlink(missing_ok=True)
    atomic.clean(path)
    atomic.fsync_dir(path)


def read_manifest(path) -> dict:
    """The parsed, integrity-checked ``manifest.json`` of a saved run (no arrays loaded, nothing executed)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    with atomic.guard("read the run at", path):  # a name too long, say: said, not a traceback
        exists = manifest_path.exists()
    if not exists:
        raise InvalidSaveError(f"No saved run at {path}: {MANIFEST} is missing.")
    if not _regular(manifest_path) or manifest_path.stat().st_size > _MAX_MANIFEST:
        raise InvalidSaveError(f"{manifest_path} is not a regular file of at most {_MAX_MANIFEST >> 20} MiB (a link "
                               "or a device is refused): not an actclust run manifest.")
    try:
        m = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidSaveError(f"{manifest_path} is not valid JSON ({e}); the save is damaged.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InvalidSaveError(f"{manifest_path} is not an actclust run manifest.")
    if m.get("format_version") not in READABLE_VERSIONS:
        raise InvalidSaveError(
            f"{path} has format version {m.get('format_version')!r}; this actclust reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Fit and save the run again with this version."
        )
    if m.get("digest") != _digest(m):
        raise InvalidSaveError(
            f"{manifest_path} does not match its digest: a value in it was changed after saving (or the file "
            "is damaged). Restore the saved manifest, or fit and save again."
        )
    return m


def read_run(path, *, verify: bool = True, progress: bool = True, restore: dict | None = None) -> tuple:
    """``(state, params, manifest)`` of the run saved at ``path``, every file checked; nothing executed.

    ``restore`` (manifest key -> ``fn(state, arrays, value)``) puts back what :func:`save` kept under that key
    (``kept=``) where the manifest has it; an error it raises (a value or array that does not fit the
    state) becomes an :class:`InvalidSaveError` naming the run.

    With ``verify`` (default) the array file and every file of the vector store are checked
    against their SHA-256 in the manifest, in one streaming pass (a progress bar from
    :data:`VERIFY_BAR_BYTES`, when ``progress``); ``verify=False`` skips that pass for runs you
    trust (sizes, ``store.json`` and the manifest's digest are still checked). Raises
    :class:`InvalidSaveError` for a missing, truncated, tampered or inconsistent save.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    m = read_manifest(path)
    arrays_name = m.get("arrays_file")
    if not isinstance(arrays_name, str) or not _ARRAYS_RE.match(arrays_name):
        raise InvalidSaveError(f"{path / MANIFEST} names an invalid array file {arrays_name!r}.")
    arrays_path = path / arrays_name
    if not arrays_path.exists():
        raise InvalidSaveError(f"The array file {arrays_path} of the saved run is missing.")
    if not _regular(arrays_path):
        raise InvalidSaveError(f"The array file {arrays_path} is not a regular file (a link or a device is refused).")
    try:
        store_dir, store_files = _store_files(m, path)
        index_files = attached(m, path, INDEX_FILE_RE)
        if not (isinstance(m.get("arrays_sha256"), str) and _SHA256_RE.match(m["arrays_sha256"])):
            raise InvalidSaveError(f"{path / MANIFEST} gives no SHA-256 of its array file.")
        if verify:
            _verify([(arrays_path, m["arrays_sha256"])] + [(store_dir / f, h) for f, h in store_files.items()]
                    + [(path / f, h) for f, h in index_files.items()], progress)
        with atomic.guard("read the run", arrays_path):
            arrays = load_file(str(arrays_path))
    except SafetensorError as e:
        raise InvalidSaveError(f"{arrays_path} cannot be read as safetensors: {e}") from None
    try:
        state = _state(m["state"], arrays, path)
        params = dict(m["params"])
    except InvalidSaveError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:  # Overflow: int(Infinity)
        raise InvalidSaveError(f"The saved run at {path} is inconsistent or incomplete ({type(e).__name__}: {e}).") from None
    for key, put_back in (restore or {}).items():
        if m.get(key) is None:
            continue
        try:
            put_back(state, arrays, m[key])
        except (KeyError, TypeError, ValueError, AttributeError, ParameterError, InvalidSaveError) as e:
            raise InvalidSaveError(f"The saved run at {path} has malformed {' '.join(key.split('_'))} "
                                   f"({type(e).__name__}: {e}).") from None
    return state, params, m


def _store_files(m: dict, path: Path) -> tuple:
    """``(folder, {file: SHA-256})`` of the run's vector store (``(None, {})`` without one), names checked."""
    info = m.get("state", {}).get("store") if isinstance(m.get("state"), dict) else None
    if info is None:
        return None, {}
    if m.get("format_version") == 2:
        raise InvalidSaveError(
            f"The run at {path} has format version 2, saved by an earlier actclust with its vectors in a store folder "
            "whose files carry no checksums (and which a later fit into the same store folder could have changed); fit "
            "and save it again.")
    name, files = info.get("dir") if isinstance(info, dict) else None, info.get("sha256") if isinstance(info, dict) else None
    if not isinstance(name, str) or not _STORE_RE.match(name) or not isinstance(files, dict) or STORE_MANIFEST not in files \
            or not all(isinstance(f, str) and _STORE_FILE_RE.match(f) and isinstance(h, str) for f, h in files.items()):
        raise InvalidSaveError(f"{path / MANIFEST} describes its vector store wrongly ({name!r}).")
    if not _real_dir(path / name):
        raise InvalidSaveError(f"The vector store folder {path / name} of the saved run is missing or is a link.")
    for f in files:
        if not _regular(path / name / f):
            raise InvalidSaveError(f"The stored vector file {path / name / f} is missing or not a regular file "
                                   "(a link or a device is refused).")
    return path / name, files


def attached(m: dict, path: Path, pattern=None) -> dict:
    """``{name: SHA-256}`` of the files attached to the run of manifest ``m`` at ``path`` (those whose name
    matches ``pattern``), each checked to be a regular file in the run folder."""
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    out = {}
    for name, sha in files.items():
        if not isinstance(name, str) or (pattern is not None and not pattern.match(name)):
            continue
        if not isinstance(sha, str) or not _regular(path / name):
            raise InvalidSaveError(f"The attached file {path / name} of the saved run is missing or not a regular "
                                   "file (a link or a device is refused).")
        out[name] = sha
    return out


def _verify(files: list, progress: bool) -> None:
    """Check each ``(file, SHA-256)`` in one streaming pass over them all (1 MiB reads, one buffer)."""
    from tqdm.auto import tqdm

    total = sum(f.stat().st_size for f, _ in files)
    buffer = bytearray(1 << 20)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying the run's files", leave=False,
              disable=not progress or total < VERIFY_BAR_BYTES) as bar:
        for f, expected in files:
            with atomic.guard("read the run", f):
                got = atomic.sha256_file(f, bar.update, buffer)
            if got != expected:
                raise InvalidSaveError(
                    f"{f} does not match its SHA-256 in {MANIFEST}: the save is truncated or was modified after "
                    "saving (or the disk damaged it). Restore the file or fit and save again; "
                    "load(..., verify=False) skips this check for runs you trust."
                )


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
    if s.get("store") is not None:  # memory-mapped; its contents were checked by read_run's verify pass
        where = path / s["store"]["dir"]
        store = VectorStore.open(where)
        if store.files != s["store"]["sha256"]:  # store.json's own hash: checked even without verify
            raise InvalidSaveError(f"{where / STORE_MANIFEST} does not match its SHA-256 in {MANIFEST}: the store's "
                                   "manifest was changed after saving. Restore it, or fit and save again.")
        if store.n_samples != n or store.widths != {k: int(w) for k, w in s["store"]["widths"].items()}:
            raise InvalidSaveError(f"The vector store in {where} holds {store.n_samples} samples of widths "
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
        normalize=_one_of(s["normalize"], ("l2", None), "normalize"),
        posterior=_one_of(s["posterior"], ("prediction", "label"), "posterior"), reducers=reducers,
        clusterings=clusterings,
        temperatures=temperatures, posteriors=posteriors, weights=weights,
        train_vectors=store if store is not None else VectorStore(vectors),
        train_predictions=arr("train_predictions", (n,), integer=True), train_labels=labels,
        train_score=s.get("train_score") or {}, fit_info=s.get("fit_info") or {},
        random_state=int(s["random_state"]), spatial_grid=_spatial_grid(s.get("spatial_grid")),
        layouts=_layouts(s, layers), input_stats=_input_stats(s.get("input_stats")),
        summary_seeds=_seeds(s, layers),
    )


def _one_of(value, allowed: tuple, name: str):
    """A saved choice among ``allowed`` (another value failed, or was taken as the default, at the first query)."""
    if value not in allowed or isinstance(value, bool):
        raise InvalidSaveError(f"The saved {name} {value!r} must be one of {list(allowed)}.")
    return value


def _spatial_grid(grid) -> Optional[int]:
    """The spatial summaries' grid: None or an int >= 1 (another value failed inside the first query, where it was
    blamed on the model)."""
    if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 1):
        raise InvalidSaveError(f"The saved spatial_grid {grid!r} must be None or an int >= 1.")
    return grid


def _seeds(s: dict, layers: list) -> dict:
    """The spatial summaries' seeds; runs saved before format 3 drew them from the layers' names."""
    from ..capture.passes import summary_seeds

    seeds = s.get("summary_seeds")
    if seeds is None:
        return summary_seeds(layers, int(s["random_state"]), by_name=True)
    if sorted(seeds) != sorted(layers) or not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds.values()):
        raise InvalidSaveError(f"The saved summary seeds {seeds} must give an int for each layer.")
    return {l: int(seeds[l]) for l in layers}


def _input_stats(stats) -> Optional[dict]:
    """The training inputs' statistics (:class:`actclust.capture.stats.InputStats`), checked: per input, equally long
    lists of finite numbers, a sample count and an axis (a run edited to hold others failed at its first query)."""
    if not stats:
        return None
    columns = ("mean", "std", "sample_mean_std", "lo", "hi")
    if not isinstance(stats, dict) or not all(isinstance(v, dict) for v in stats.values()):
        raise InvalidSaveError("The saved input statistics must map each input to its statistics.")
    for key, part in stats.items():
        lists = [part.get(c) for c in columns] + ([part["m4"]] if part.get("m4") is not None else [])
        if not (all(isinstance(v, list) and v and len(v) == len(lists[0]) for v in lists)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for v in lists for x in v)
                and isinstance(part.get("n"), int) and part["n"] >= 0 and isinstance(part.get("axis"), int)):
            raise InvalidSaveError(f"The saved input statistics of input {key!r} are malformed: they need equally long "
                                   f"lists {list(columns)} of finite numbers, a count 'n' and an 'axis'.")
    return stats


def _layouts(s: dict, layers: list) -> dict:
    """Each layer's layout; a run saved before layouts were recorded read every map channels-first."""
    from ..capture.reduction import LAYOUTS, LEGACY_LAYOUT

    layouts = s.get("layouts") or {l: LEGACY_LAYOUT for l in layers}
    if sorted(layouts) != sorted(layers) or any(v not in LAYOUTS for v in layouts.values()):
        raise InvalidSaveError(f"The saved layouts {layouts} must give one of {list(LAYOUTS)} for each layer.")
    return {l: str(layouts[l]) for l in layers}


def _prefixed(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
