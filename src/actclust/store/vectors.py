"""Where the training vectors live: in memory (``store=None``) or on disk (``store="dir"``).

A :class:`VectorStore` is a read-only mapping ``layer -> (n, d) array``. On disk each layer is one
raw file of ``n x d`` values (``store_dtype``: float32 or float16) written while the model runs,
so capturing never holds the vectors in memory, and read back through a memory map: pages come
from the operating system's file cache when touched, and the streaming passes (:meth:`chunks`)
and searches hand them back (:meth:`release`), so a process's resident memory does not grow with
``n``.

**Generations.** Each fit into a store folder writes its own *generation*, a subfolder
``gen-<32 hex>`` holding ``layer-<i>.bin`` files and ``store.json`` (which file holds which layer,
and each file's SHA-256, computed while writing). It is written as a hidden temporary folder of
ours (:mod:`actclust.io.atomic`) and renamed into place when the fit succeeds, so an interrupted
fit leaves no generation. Files of a committed generation are never written again: a second fit
into the folder, in this process or another, writes a new generation, so a fitted explainer (and
a run saved from it, which hard-links the files) keeps exactly the vectors it was fitted on.

**Clean-up rule.** The fitted store holds an exclusive ``flock`` on its generation for as long as
it lives (the kernel drops it when the process ends). Each fit, once its own generation is
committed, removes every other generation that no live store holds, the temporary folders of
killed fits, and the files of the earlier single-generation layout. A folder therefore holds at
most one generation per live explainer fitted into it, plus the one being written. Saved runs
are unaffected: their hard links keep the files' contents.

Disk and memory needed: ``n x sum(d_l) x bytes`` (4 for float32, 2 for float16), see :func:`estimate`.
This module needs NumPy only.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..exceptions import DataError, InvalidSaveError, ParameterError
from ..io import atomic

__all__ = ["VectorStore", "StoreWriter", "Collector", "is_generation", "STORE_DTYPES", "estimate", "check_store", "iter_rows", "take", "distances_fit_float32",
           "release", "runs", "clean_store", "generations", "chunk_rows", "CHUNK", "CHUNK_FLOATS"]

STORE_DTYPES = ("float32", "float16")
MANIFEST = "store.json"
FORMAT = 2  # 2: one generation per fit, each file's SHA-256 in store.json
CHUNK = 8192
#: Values in a chunk at most: rows wider than 2,048 values are read fewer than :data:`CHUNK` at a time (a
#: flattened map of 25,088 values would otherwise take 822 MB a chunk, and each temporary as much again).
CHUNK_FLOATS = 1 << 24
_TAKE = 512  # rows gathered between two hand-backs of a memory map's pages
_FILE_RE = re.compile(r"^layer-\d+\.bin$")
_GEN_RE = re.compile(r"^gen-[0-9a-f]{32}$")
_GEN_STEM = "gen"  # temporary name of a generation being written: .gen.<hex>.actclust-tmp


def check_store(store, store_dtype) -> None:
    """Raise :class:`ParameterError` unless ``store`` is None or a path and ``store_dtype`` is known."""
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise ParameterError(f"The 'store' parameter must be None (in memory) or a directory path. Got {store!r} instead.")
    if store_dtype not in STORE_DTYPES:
        raise ParameterError(f"The 'store_dtype' parameter must be one of {list(STORE_DTYPES)}. "
                             f"Got {store_dtype!r} instead.")


def estimate(n_samples: int, widths: dict, dtype: str) -> int:
    """Bytes the vectors of ``n_samples`` samples take in a store (memory or disk)."""
    return int(n_samples) * sum(int(d) for d in widths.values()) * np.dtype(dtype).itemsize


def chunk_rows(width: int, size: int = CHUNK, values: Optional[int] = None) -> int:
    """Rows per chunk of rows ``width`` values wide: ``size``, or fewer where they would hold more than
    ``values`` values (default :data:`CHUNK_FLOATS`; at least one row)."""
    return int(max(1, min(size, (CHUNK_FLOATS if values is None else values) // max(int(width), 1))))


def iter_rows(X, size: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, float32 rows)`` over any ``(n, d)`` array in order, at most ``size`` rows and
    :data:`CHUNK_FLOATS` values at a time (:func:`chunk_rows`); pages of a memory-mapped array are
    handed back to the OS after each chunk."""
    size = chunk_rows(X.shape[1] if X.ndim > 1 else 1, size)
    mm = _mmap_of(X)
    for start in range(0, len(X), size):
        part = X[start:start + size]
        yield start, (np.array(part, dtype=np.float32) if mm is not None else np.asarray(part, dtype=np.float32))
        if mm is not None:
            mm.madvise(mmap.MADV_DONTNEED)


def take(X, rows) -> np.ndarray:
    """``X[rows]`` as float32 (``rows`` any shape of ints). A store opened from disk reads the rows
    from its file, one ``pread`` each, into the result: no page of the file is mapped into the
    process (gathering 10,000 random rows of 1,024 values from a cached 4 GB file: 31 ms, against
    83 ms through the memory map). Other memory-mapped arrays are gathered ``_TAKE`` rows at a
    time, pages handed back in between: each touched row maps its 64 KiB neighbourhood (the
    kernel's fault-around), so one gather of 15,000 rows would otherwise hold about 1 GB of the
    file in resident memory."""
    mm = _mmap_of(X)
    if mm is None:
        return np.asarray(X[rows], dtype=np.float32)
    rows = np.asarray(rows)
    flat = rows.reshape(-1)
    reader = _READERS.get(id(mm))
    if reader is not None and X.ndim == 2 and X.strides == (X.shape[1] * X.itemsize, X.itemsize) and len(flat):
        return _pread_rows(X, flat, *reader).reshape(rows.shape + (X.shape[1],))
    out = np.empty((len(flat), X.shape[1]), dtype=np.float32)
    for start in range(0, len(flat), _TAKE):
        out[start:start + _TAKE] = X[flat[start:start + _TAKE]]
        release(X)
    return out.reshape(rows.shape + (X.shape[1],))


#: Per memory map of a store file opened by :meth:`VectorStore.open` (by ``id``, while it lives): a file
#: descriptor on the same file and the address the map starts at, for :func:`take`'s reads.
_READERS: dict = {}


def _keep_reader(mm: mmap.mmap, fd: int) -> None:
    """Keep ``fd``, the file ``mm`` maps, for reading rows without mapping them (closed with ``mm``); or close it
    where ``os.preadv`` is missing (Windows: the memory map serves)."""
    if not hasattr(os, "preadv"):
        os.close(fd)
        return
    _READERS[id(mm)] = (fd, np.frombuffer(mm, dtype=np.uint8).ctypes.data)
    weakref.finalize(mm, _close_reader, id(mm), fd)


def _close_reader(key: int, fd: int) -> None:
    _READERS.pop(key, None)
    os.close(fd)


def _pread_rows(X: np.ndarray, flat: np.ndarray, fd: int, start: int) -> np.ndarray:
    """Rows ``flat`` of ``X`` (rows laid out one after another in the file mapped from address ``start``),
    read from the file into a new float32 array."""
    n = len(X)
    flat = np.where(flat < 0, flat + n, flat)
    if flat.min() < 0 or flat.max() >= n:
        raise DataError(f"Row {int(flat[(flat < 0) | (flat >= n)][0])} is out of bounds for the store's {n} rows.")
    width = X.shape[1] * X.itemsize
    first = X.ctypes.data - start  # the file offset of row 0
    out = np.empty((len(flat), X.shape[1]), dtype=X.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    for j, r in enumerate(flat.tolist()):
        if os.preadv(fd, [view[j * width:(j + 1) * width]], first + r * width) != width:
            raise InvalidSaveError(f"A vector store file ended before row {r}: it changed after it was opened.")
    return out if out.dtype == np.float32 else out.astype(np.float32)


def runs(rows: np.ndarray) -> list:
    """``(a, b)`` slices of ``rows`` over which the positions are consecutive (``rows[a:b]`` = ``r..r+b-a-1``)."""
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *cuts.tolist(), len(rows)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def release(X) -> None:
    """Hand the resident pages of a memory-mapped array back to the OS (nothing for other arrays)."""
    mm = _mmap_of(X)
    if mm is not None:
        mm.madvise(mmap.MADV_DONTNEED)


def _mmap_of(X):
    base = X
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base if len(base) else None
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return None


class VectorStore(Mapping):
    """The training vectors of every layer, in memory or memory-mapped from a directory.

    On disk, ``directory`` is the folder of the files (a generation, or a run's store folder),
    ``files`` maps each file name (``store.json`` included) to its SHA-256, and ``hold`` (a
    store a fit just wrote) keeps its generation from being cleaned up while this object lives.
    """

    def __init__(self, arrays: dict, directory: Optional[Path] = None, files: Optional[dict] = None,
                 layer_files: Optional[dict] = None, manifest_bytes: bytes = b""):
        self._arrays = arrays
        self.directory = directory
        self.files = dict(files or {})  # file name -> SHA-256, store.json included
        self.layer_files = dict(layer_files or {})  # layer -> file name
        self.manifest_bytes = manifest_bytes  # store.json as written, to save it even if its folder is gone
        self.hold = None

    def __getitem__(self, layer) -> np.ndarray:
        return self._arrays[layer]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    @property
    def n_samples(self) -> int:
        return len(next(iter(self._arrays.values()))) if self._arrays else 0

    @property
    def widths(self) -> dict:
        return {l: int(a.shape[1]) for l, a in self._arrays.items()}

    @property
    def dtype(self) -> str:
        return str(next(iter(self._arrays.values())).dtype) if self._arrays else "float32"

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self._arrays.values())

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    def chunks(self, layer, size: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, float32 rows)`` over a layer's vectors in order; memory ``O(size x d)``."""
        yield from iter_rows(self._arrays[layer], size)

    def rows(self, layer, index) -> np.ndarray:
        """Float32 copies of some rows of a layer (any order, repeats allowed)."""
        return take(self._arrays[layer], index)

    @classmethod
    def open(cls, directory) -> "VectorStore":
        """Memory-map the store in ``directory`` (read-only); checks its manifest and file sizes
        (not the contents: a run's loader checks those against its digest)."""
        directory = Path(directory)
        manifest, raw = _read_manifest(directory)
        try:  # sizes as whole numbers: JSON's Infinity or a string is a damaged store, not an OverflowError
            n, dtype = int(manifest["n_samples"]), np.dtype(manifest["dtype"])
            entries = [(e["name"], e["file"], int(e["width"]), e.get("sha256")) for e in manifest["layers"]]
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            raise InvalidSaveError(f"{directory / MANIFEST} is damaged ({type(e).__name__}: {e}): fit again.") from None
        arrays, files, layer_files = {}, {MANIFEST: hashlib.sha256(raw).hexdigest()}, {}
        for layer, name, width, sha in entries:
            if not isinstance(name, str) or not _FILE_RE.match(name) or not _regular(directory / name):
                raise InvalidSaveError(f"The vector store at {directory} lacks {name!r} (layer {layer!r}), "
                                       "or it is not a regular file (a link out of the folder is refused).")
            file = directory / name
            files[name], layer_files[layer] = str(sha), name
            expected = n * width * dtype.itemsize
            if file.stat().st_size != expected:
                raise InvalidSaveError(f"{file} holds {file.stat().st_size} bytes; the store's manifest says "
                                       f"{n} x {width} {dtype} = {expected}. The store is damaged: fit again.")
            if expected == 0:
                arrays[layer] = np.zeros((n, width), dtype)
                continue
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except BaseException:
                os.close(fd)
                raise
            _keep_reader(mm, fd)  # the same file, for take()'s reads
            arrays[layer] = np.frombuffer(mm, dtype=dtype).reshape(n, width)
        return cls(arrays, directory, files, layer_files, raw)


#: Largest value times the square root of the width a stored vector may reach: beyond it, squared distances between
#: vectors come near float32's largest number (3.4e38), and k-means' sums of them overflow.
_MAX_MAGNITUDE = 1e17


def distances_fit_float32(v: np.ndarray) -> bool:
    """Whether squared distances between rows like those of ``v`` (finite) stay within float32 (:data:`_MAX_MAGNITUDE`)."""
    return float(np.abs(v).max(initial=0)) * np.sqrt(v.shape[1]) <= _MAX_MAGNITUDE


def _check_magnitude(layer, v: np.ndarray) -> None:
    """Refuse vectors whose squared distances overflow float32: faiss' k-means then aborted the whole process (a
    C++ error no ``except`` catches), and searches ranked by infinities (an outside check, ``normalize=None``)."""
    top = float(np.abs(v).max())
    if not distances_fit_float32(v):
        raise DataError(f"Layer {layer!r} gives values up to {top:.3g}: squared distances between its {v.shape[1]}-value "
                        "vectors overflow float32 (3.4e38). Keep normalize='l2' (the default: unit-length vectors), or "
                        "choose a layer whose values are smaller.")


def _regular(path: Path) -> bool:
    """A regular file, not a link (a link could point anywhere, e.g. out of a run folder), not a device."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _read_manifest(directory: Path) -> tuple:
    """``(manifest, its bytes)`` of the store in ``directory``."""
    path = directory / MANIFEST
    if not _regular(path):
        raise InvalidSaveError(f"No vector store at {directory}: {MANIFEST} is missing (an interrupted fit "
                               "leaves none) or is not a regular file. Fit again.")
    raw = path.read_bytes()
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidSaveError(f"{path} is not valid JSON ({e}); the store is damaged.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("dtype") not in STORE_DTYPES:
        raise InvalidSaveError(f"{path} is not an actclust vector store manifest of format {FORMAT}.")
    return m, raw


class StoreWriter:
    """Collects the vectors of a capture pass, batch by batch, into a :class:`VectorStore`.

    Use it as a context manager: leaving the block with an exception removes everything written.
    On disk, files go to a new generation of ``directory``: a hidden temporary folder of ours,
    renamed to ``gen-<id>`` by :meth:`commit`, which then cleans up the generations no live store
    holds (see the module's clean-up rule). Earlier generations are never written to.
    """

    def __init__(self, directory, dtype: str = "float32", n_samples: Optional[int] = None):
        self.dtype = np.dtype(dtype)
        # absolute: the generation is found again by its folder after the working directory changed (a refit after a
        # chdir cleaned the new relative folder and left the replaced generation behind: an outside check)
        self.directory = None if directory is None else Path(directory).absolute()
        self._collector = Collector(n_samples) if directory is None else None
        self._files, self._widths, self._hashes, self.n = {}, {}, {}, 0
        self._expected, self._seen = n_samples, None  # positions filled so far, when added by position
        self._partial = self._hold = None
        if self.directory is not None:
            with atomic.guard("create the vector store in", self.directory):
                _check_directory(self.directory)
                self.directory.mkdir(parents=True, exist_ok=True)
                clean_store(self.directory)  # before writing: a killed fit's bytes make room for this one
                self._partial, self._hold = atomic.make_temp_dir(self.directory, _GEN_STEM)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()

    def add(self, vectors: dict, rows: Optional[np.ndarray] = None) -> None:
        """Add one batch: ``layer -> (b, d)`` arrays with the same ``b``, appended, or at sample
        positions ``rows`` (any order; needs ``n_samples``): batches of a distributed pass arrive in
        the order their workers finish, and each lands at its samples' rows all the same."""
        sizes = {len(v) for v in vectors.values()}
        if len(sizes) > 1:
            raise DataError(f"A batch gave different numbers of vectors per layer: {sizes}.")
        if rows is not None:
            rows = self._check_rows(rows, sizes)
        for l, v in vectors.items():
            with np.errstate(over="ignore"):  # said below, as a DataError, not as NumPy's RuntimeWarning
                v = np.ascontiguousarray(v, dtype=self.dtype)
            if self.dtype == np.float16 and not np.isfinite(v).all():
                raise DataError(f"Layer {l!r} has values beyond float16's range (65504); use store_dtype='float32'.")
            if v.size and v.shape[1]:
                _check_magnitude(l, v)
            if self._widths.setdefault(l, v.shape[1]) != v.shape[1]:
                raise DataError(f"Layer {l!r} gave {v.shape[1]} values per sample, {self._widths[l]} before: "
                                "every sample must give the same width.")
            if self._collector is not None:
                self._collector.add(l, v) if rows is None else self._collector.put(l, v, rows)
            else:
                with atomic.guard("write the vector store", self.directory):
                    self._write(l, v, rows)
        self.n += sizes.pop() if sizes else 0

    def _write(self, l, v: np.ndarray, rows) -> None:
        if l not in self._files:  # unbuffered: nothing left to flush (and fail) when an error closes it
            self._files[l] = open(self._partial / f"layer-{len(self._files)}.bin", "wb", buffering=0)
            self._hashes[l] = hashlib.sha256()
        data = memoryview(v).cast("B")
        if rows is None:
            if self._hashes[l] is not None:
                self._hashes[l].update(data)
            while len(data):
                data = data[self._files[l].write(data):]
        else:
            self._hashes[l] = None  # rows land out of order: the file is hashed once complete
            row_bytes = v.shape[1] * self.dtype.itemsize
            for a, b in runs(rows):  # positioned writes: the file grows to n rows as batches land
                os.pwrite(self._files[l].fileno(), memoryview(v[a:b]).cast("B"), int(rows[a]) * row_bytes)

    def _check_rows(self, rows, sizes) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self._expected is None:
            raise DataError("Vectors added by sample position need the number of samples (n_samples) up front.")
        if sizes and len(rows) != next(iter(sizes)):
            raise DataError(f"A batch gave {len(rows)} sample positions for {next(iter(sizes))} vectors.")
        if len(rows) and (rows.min() < 0 or rows.max() >= self._expected):
            raise DataError(f"A batch gave sample positions outside 0..{self._expected - 1}.")
        if self._seen is None:
            self._seen = np.zeros(self._expected, dtype=bool)
        again = rows[self._seen[rows]]
        if len(again) or len(np.unique(rows)) != len(rows):
            row = int(again[0]) if len(again) else int(np.flatnonzero(np.bincount(rows) > 1)[0])
            raise DataError(f"Sample row {row} was given twice.")
        self._seen[rows] = True
        return rows

    def finish(self) -> VectorStore:
        """The store of everything added; on disk it stays hidden until :meth:`commit`."""
        if self._seen is not None and not self._seen.all():
            missing = np.flatnonzero(~self._seen)
            raise DataError(f"{len(missing)} of {self._expected} samples never arrived (first: row {missing[0]}).")
        if self._collector is not None:
            return VectorStore({l: self._collector.get(l) for l in self._widths})
        with atomic.guard("write the vector store", self.directory):
            for f in self._files.values():
                os.fsync(f.fileno())
                f.close()
            layers = []
            for l in self._widths:
                path = Path(self._files[l].name)
                h = self._hashes[l]
                layers.append({"name": l, "file": path.name, "width": self._widths[l],
                               "sha256": h.hexdigest() if h is not None else atomic.sha256_file(path)})
            manifest = {"format": FORMAT, "dtype": self.dtype.name, "n_samples": self.n, "layers": layers}
            atomic.write_into(self._partial / MANIFEST, json.dumps(manifest, indent=1))
        self._store = VectorStore.open(self._partial)
        return self._store

    def commit(self) -> None:
        """Rename the finished generation into place, keep it held by the store, and clean up the
        generations nobody holds."""
        if self._partial is None:
            return
        generation = self.directory / f"gen-{uuid.uuid4().hex}"
        with atomic.guard("commit the vector store", generation):
            atomic.publish(self._partial, generation)  # open memory maps follow the folder
        self._partial = None
        self._store.directory, self._store.hold, self._hold = generation, self._hold, None
        try:
            clean_store(self.directory)
        except OSError:  # the fit succeeded; what could not be removed now goes at the next fit
            pass

    def abort(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass  # the folder goes below whatever its files hold
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial = None
        if self._hold is not None:
            self._hold.release()
            self._hold = None


def generations(directory) -> list:
    """The committed generation folders of the store folder ``directory``, oldest name first."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if _GEN_RE.match(p.name) and p.is_dir()) if directory.is_dir() else []


def is_generation(path: Path) -> bool:
    """Whether ``path`` is a generation folder of a store folder (``gen-<...>``), not a saved run's ``store-<hash>``."""
    return bool(_GEN_RE.match(Path(path).name))


def clean_store(directory) -> int:
    """Apply the clean-up rule to the store folder ``directory``: remove every generation no live
    store holds, the temporary folders of killed fits and the files of the earlier single-generation
    layout; returns the bytes freed."""
    directory = Path(directory)
    freed = atomic.clean(directory)
    for gen in generations(directory):
        hold = atomic.Hold.attempt(gen)
        if hold is None:
            continue  # a live explainer's vectors
        try:
            freed += sum(f.stat().st_size for f in gen.iterdir())
            shutil.rmtree(gen, ignore_errors=True)
        finally:
            hold.release()
    for name in _legacy_files(directory):  # the layout before generations: one store at the top level
        p = directory / name
        if _regular(p):
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
    return freed


def _legacy_files(directory: Path) -> set:
    """The files of a store of the layout before generations at the top of ``directory``: its ``store.json``
    where that is an actclust store's manifest, and the ``layer-<i>.bin`` files of its layers. Files of those
    names that are not (a user's own ``store.json``) are no store's: never removed, and the folder refused."""
    try:
        m = json.loads((directory / MANIFEST).read_text()) if _regular(directory / MANIFEST) else None
    except (OSError, UnicodeDecodeError, ValueError):
        m = None
    # format 1 only: today's generations write store.json too (format 2), and one given as a store folder (a saved
    # run's store-<hash>, a copy kept of a generation) was taken for this layout and its vectors deleted (an outside
    # check); such a folder is now refused as holding files that are no store's
    if not (isinstance(m, dict) and m.get("format") == 1 and m.get("dtype") in STORE_DTYPES
            and isinstance(m.get("layers"), list)):
        return set()
    return {MANIFEST, *(p.name for p in directory.iterdir()
                        if _FILE_RE.match(p.name) and int(p.name[6:-4]) < len(m["layers"]))}


class Collector:
    """Gathers per-batch arrays into one array per key, along the first axis (``axis`` for some).

    When the number of samples is known, each key gets one buffer allocated at its first batch
    and later batches are copied in, so no per-batch array outlives its batch: many small
    retained arrays between the large, short-lived activation maps fragment the C heap, and
    resident memory then grows with the data set even though little is kept.
    """

    def __init__(self, n_samples: Optional[int]):
        self.n = n_samples
        self._buffers: dict = {}
        self._lists: dict = {}
        self._pos: dict = {}

    def add(self, key, array: np.ndarray, axis: int = 0) -> None:
        if self.n is None:
            self._lists.setdefault(key, []).append((np.array(array, copy=True), axis))
            return
        if key not in self._buffers:
            shape = list(array.shape)
            shape[axis] = self.n
            self._buffers[key] = np.empty(shape, dtype=array.dtype)
            self._pos[key] = 0
        pos, size = self._pos[key], array.shape[axis]
        if pos + size > self.n:
            raise DataError(f"The data yielded more than the {self.n} samples its length promised.")
        index = [slice(None)] * array.ndim
        index[axis] = slice(pos, pos + size)
        self._buffers[key][tuple(index)] = array
        self._pos[key] = pos + size

    def put(self, key, array: np.ndarray, rows: np.ndarray) -> None:
        """Place ``array``'s rows at sample positions ``rows`` (needs ``n_samples``; any order)."""
        if key not in self._buffers:
            self._buffers[key] = np.empty((self.n,) + array.shape[1:], dtype=array.dtype)
            self._pos[key] = 0
        self._buffers[key][rows] = array
        self._pos[key] += len(rows)

    def get(self, key) -> np.ndarray:
        if self.n is None:
            items = self._lists[key]
            return np.concatenate([a for a, _ in items], axis=items[0][1])
        if self._pos[key] != self.n:
            raise DataError(f"The data yielded {self._pos[key]} samples, fewer than the {self.n} its length promised.")
        return self._buffers[key]


def _check_directory(directory: Path) -> None:
    """Refuse a path that is a file or a folder holding anything but store generations."""
    if directory.exists() and not directory.is_dir():
        raise ParameterError(f"store={str(directory)!r} is a file; give a directory for the vector store.")
    if not directory.exists():
        return
    legacy = _legacy_files(directory)
    foreign = [p.name for p in directory.iterdir()
               if not (_GEN_RE.match(p.name) or atomic.is_temp(p.name) or p.name in legacy)]
    if foreign:
        raise ParameterError(
            f"store={str(directory)!r} holds files that are not an actclust vector store ({sorted(foreign)[:3]}); "
            "give an empty or new directory, or one an earlier fit used as its store."
        )
