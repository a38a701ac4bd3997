"""The vector store: in memory or on disk, identical results; no partial store left by a failed fit."""

import json
import os
import time
import warnings

import numpy as np
import pytest
import torch

import actclust
from actclust import ActivationClustering, DataError, InvalidSaveError, ParameterError
from actclust.store import StoreWriter, VectorStore, estimate


def _fit(model, x, y, **kw):
    return ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=4, progress=False, **kw).fit(x, y)


# memory and disk stores give identical clusterings, scores, neighbours and trust with exact search
def test_disk_store_identical_to_memory(model, data, tmp_path):
    x, y = data
    mem = _fit(model, x, y)
    disk = _fit(model, x, y, store=tmp_path / "vectors")
    assert disk.state_.train_vectors.on_disk and not mem.state_.train_vectors.on_disk
    # one generation: three layers and the conv layer's spatial summary
    (gen,) = os.listdir(tmp_path / "vectors")
    assert gen.startswith("gen-") and disk.state_.train_vectors.directory == tmp_path / "vectors" / gen
    assert sorted(os.listdir(tmp_path / "vectors" / gen)) == ["layer-0.bin", "layer-1.bin", "layer-2.bin",
                                                              "layer-3.bin", "store.json"]
    for l in mem.layers_:
        np.testing.assert_array_equal(np.asarray(disk.train_vectors_[l]), mem.train_vectors_[l])
        np.testing.assert_array_equal(disk.clusterings_[l].centers_, mem.clusterings_[l].centers_)
    assert disk.score(x, y) == mem.score(x, y)
    a, b = mem.similar(x[:30], k=5, search="exact"), disk.similar(x[:30], k=5, search="exact")
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-6)
    ta = mem.trust(x[:30], n_neighbors=5, calibration_fraction=0.2)
    tb = disk.trust(x[:30], n_neighbors=5, calibration_fraction=0.2)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], err_msg=k)


# float16 halves the bytes and keeps clustering close; the size estimate is what is stored
def test_float16_store(model, data, tmp_path):
    x, y = data
    full = _fit(model, x, y, store=tmp_path / "a")
    half = _fit(model, x, y, store=tmp_path / "b", store_dtype="float16")
    size = lambda p: sum(f.stat().st_size for f in p.glob("gen-*/*.bin"))  # noqa: E731
    assert size(tmp_path / "b") * 2 == size(tmp_path / "a")
    widths = full.state_.train_vectors.widths
    assert size(tmp_path / "a") == estimate(len(x), widths, "float32")
    assert half.train_vectors_["fc1"].dtype == np.float16
    assert abs(half.score(x, y)["fidelity"] - full.score(x, y)["fidelity"]) <= 0.05


# a fit that fails after capturing leaves neither a partial store nor a changed earlier one
def test_failed_fit_leaves_no_partial_store(model, data, tmp_path, monkeypatch):
    x, y = data
    store = tmp_path / "vectors"
    ac = _fit(model, x, y, store=store)
    before = {str(f.relative_to(store)): f.read_bytes() for f in store.rglob("*") if f.is_file()}

    def boom(*a, **k):
        raise RuntimeError("clustering failed")

    import actclust.fitting

    monkeypatch.setattr(actclust.fitting, "learn", boom)
    with pytest.raises(RuntimeError, match="clustering failed"):
        ac.fit(x[::-1].copy(), y[::-1].copy())
    assert {str(f.relative_to(store)): f.read_bytes() for f in store.rglob("*") if f.is_file()} == before  # no partial
    fresh = tmp_path / "new"
    with pytest.raises(RuntimeError, match="clustering failed"):
        _fit(model, x, y, store=fresh)
    assert os.listdir(fresh) == []


# a killed fit's hidden folder is removed by the next fit; a folder of other files is refused
def test_store_directory_checks(model, data, tmp_path):
    x, y = data
    store = tmp_path / "vectors"
    killed = store / f".gen.{'0' * 32}.actclust-tmp"  # a killed fit's generation: nobody holds it
    killed.mkdir(parents=True)
    (killed / "layer-0.bin").write_bytes(b"x" * 100)
    _fit(model, x, y, store=store)
    assert killed.name not in os.listdir(store)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ParameterError, match=r"holds files that are not an actclust vector store \(\['cat.jpg'\]\)"):
        _fit(model, x, y, store=other)
    with pytest.raises(ParameterError, match=r"is a file; give a directory"):
        _fit(model, x, y, store=other / "cat.jpg")
    # files named as a store of the layout before generations are one only where store.json is a store's manifest:
    # a user's own store.json and layer-0.bin are refused and kept; an old store's files are cleaned up
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "store.json").write_text('{"mine": 1}')
    (mine / "layer-0.bin").write_bytes(b"mine")
    with pytest.raises(ParameterError, match=r"holds files that are not an actclust vector store \(\['layer-0.bin', "
                                             r"'store.json'\]\)"):
        _fit(model, x, y, store=mine)
    assert sorted(os.listdir(mine)) == ["layer-0.bin", "store.json"] and (mine / "layer-0.bin").read_bytes() == b"mine"
    old = tmp_path / "old"
    old.mkdir()
    (old / "store.json").write_text('{"format": 1, "dtype": "float32", "n_samples": 2, "layers": ["conv"]}')
    (old / "layer-0.bin").write_bytes(b"x" * 8)
    _fit(model, x, y, store=old)
    assert not {"store.json", "layer-0.bin"} & set(os.listdir(old))
    with pytest.raises(ParameterError, match=r"'store_dtype' parameter of ActivationClustering must be one of \['float32', 'float16'\]"):
        _fit(model, x, y, store_dtype="int8")
    with pytest.raises(ParameterError, match=r"'store' parameter of ActivationClustering must be None \(in memory\) or a directory path"):
        _fit(model, x, y, store=3)


# a saved run links the store instead of copying it into the arrays, and loads it memory-mapped
def test_save_and_load_disk_store(model, data, tmp_path):
    x, y = data
    ac = _fit(model, x, y, store=tmp_path / "vectors", store_dtype="float16")
    ac.save(tmp_path / "run")
    (run_store,) = (tmp_path / "run").glob("store-*")
    assert (run_store / "store.json").is_file()
    from safetensors.numpy import load_file

    arrays = load_file(str(next((tmp_path / "run").glob("arrays-*.safetensors"))))
    assert not [k for k in arrays if k.endswith("train_vectors")]
    for f in (tmp_path / "vectors").glob("gen-*/*.bin"):  # hard links: the same file, not a copy
        assert os.path.samefile(f, run_store / f.name)
    # the run's store folder given as a store (to keep its vectors): refused, its files kept; it was taken for the
    # layout before generations and its vectors deleted, and the run no longer loaded (an outside check)
    kept = {f.name: f.read_bytes() for f in run_store.iterdir()}
    with pytest.raises(ParameterError, match=r"holds files that are not an actclust vector store"):
        _fit(model, x, y, store=run_store)
    assert {f.name: f.read_bytes() for f in run_store.iterdir()} == kept
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert loaded.state_.train_vectors.on_disk and loaded.state_.train_vectors.dtype == "float16"
    np.testing.assert_array_equal(loaded.similar(x[:10], k=3).indices, ac.similar(x[:10], k=3).indices)
    with open(run_store / "layer-1.bin", "ab") as f:  # damage the store
        f.write(b"\0" * 8)
    with pytest.raises(InvalidSaveError, match=r"layer-1.bin does not match its SHA-256 in manifest.json"):
        actclust.load(tmp_path / "run", model, progress=False)
    with pytest.raises(InvalidSaveError, match=r"layer-1.bin holds \d+ bytes; the store's manifest says"):
        actclust.load(tmp_path / "run", model, progress=False, verify=False)


# the writer refuses batches whose width changes, and an unknown store is refused on open
def test_writer_and_open_errors(tmp_path):
    from actclust import DataError

    with pytest.raises(DataError, match=r"Layer 'a' gave 3 values per sample, 2 before"):
        with StoreWriter(tmp_path / "s") as w:
            w.add({"a": np.zeros((2, 2))})
            w.add({"a": np.zeros((2, 3))})
    assert [p for p in (tmp_path / "s").iterdir()] == []
    with pytest.raises(InvalidSaveError, match=r"No vector store at .*store.json is missing"):
        VectorStore.open(tmp_path / "s")
    (tmp_path / "s" / "store.json").write_text(json.dumps({"format": 7}))
    with pytest.raises(InvalidSaveError, match=r"is not an actclust vector store manifest"):
        VectorStore.open(tmp_path / "s")
    # a store's manifest with JSON's Infinity, or a list, where a whole number or a file name goes (an outside check:
    # Python's OverflowError, TypeError)
    good = _random_store(tmp_path / "g", 1, {"a": 4}).directory / "store.json"
    m = json.loads(good.read_text())
    for field, value in (("n_samples", float("inf")), ("n_samples", "x"), ("layers", [{**m["layers"][0], "width": 1e400}]),
                         ("layers", [{**m["layers"][0], "file": ["layer-0.bin"]}])):
        good.write_text(json.dumps({**m, field: value}))
        with pytest.raises(InvalidSaveError, match=r"store\.json is damaged \((OverflowError|ValueError)|lacks \['layer"):
            VectorStore.open(good.parent)


# streaming passes hand the memory-mapped pages back: resident memory does not hold the store
def _statm(field: int) -> int:
    """Bytes of one field of /proc/self/statm: 1 resident, 2 of them file-backed."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")


def _random_store(folder, blocks: int, widths: dict):
    """A committed disk store of ``blocks`` blocks of 4,096 random rows, ``widths`` values per layer."""
    rng = np.random.default_rng(0)
    with StoreWriter(folder, "float32") as w:
        for _ in range(blocks):
            w.add({l: rng.standard_normal((4096, d), dtype=np.float32) for l, d in widths.items()})
        store = w.finish()
        w.commit()
    return store


def test_streaming_keeps_resident_memory_flat(tmp_path):
    def rss():
        return _statm(1)

    store = _random_store(tmp_path / "s", 40, {"a": 512})
    assert store.nbytes == 40 * 4096 * 512 * 4  # 320 MiB
    before, peak, total = rss(), 0, 0.0
    for _, chunk in store.chunks("a"):
        total += float(chunk[:, 0].sum())
        peak = max(peak, rss())
    assert peak - before < 64 * 2**20, (peak - before) / 2**20
    np.testing.assert_allclose(total, np.asarray(store["a"][:, 0], np.float64).sum(), rtol=1e-4)


# chunks of wide rows hold at most CHUNK_FLOATS values (a flattened 25,088-value map: 668 rows, not 8,192), and
# cover every row once, in order
def test_chunks_of_wide_rows_are_bounded_in_values():
    from actclust.store import CHUNK, CHUNK_FLOATS, chunk_rows, iter_rows

    assert chunk_rows(64) == CHUNK and chunk_rows(2048) == CHUNK and chunk_rows(4096) == CHUNK // 2
    assert chunk_rows(25088) == CHUNK_FLOATS // 25088 == 668 and chunk_rows(10 ** 9) == 1
    assert chunk_rows(16, 100) == 100  # a smaller size asked for stays
    x = np.arange(1000 * 30000, dtype=np.float32).reshape(1000, 30000)
    starts = []
    for start, rows in iter_rows(x):
        assert rows.size <= CHUNK_FLOATS and np.array_equal(rows, x[start:start + len(rows)])
        starts.append(start)
    assert starts == list(range(0, 1000, 559))


# float16 cannot hold values beyond 65504: refused with what to use instead, nothing left behind
def test_float16_overflow_refused(tmp_path):
    from actclust import DataError

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's overflow warning in the cast was shown beside the error
        with pytest.raises(DataError, match=r"Layer 'a' has values beyond float16's range \(65504\); use "
                                            r"store_dtype='float32'"):
            with StoreWriter(tmp_path / "s", "float16") as w:
                w.add({"a": np.array([[1.0, 1e6]])})
    assert list((tmp_path / "s").iterdir()) == []
    # float32: values whose squared distances overflow it (normalize=None) are refused; faiss' k-means aborted the process
    with pytest.raises(DataError, match=r"Layer 'a' gives values up to 1e\+19: squared distances between its 4-value "
                                        r"vectors overflow float32 \(3.4e38\). Keep normalize='l2'"):
        with StoreWriter(tmp_path / "t", "float32") as w:
            w.add({"a": np.array([[1.0, 2.0, 3.0, 4.0]])})
            w.add({"a": np.array([[1.0, 2.0, 3.0, 1e19]])})


# before the capture, fit logs what the vectors will take and where (n x sum of widths x bytes)
def test_fit_logs_store_estimate(model, data, tmp_path, caplog):
    import logging

    x, y = data
    with caplog.at_level(logging.INFO, logger="actclust"):
        _fit(model, x, y, store=tmp_path / "v", store_dtype="float16", spatial_grid=None)
    width = sum(ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=4, progress=False, spatial_grid=None)
                .fit(x, y).state_.train_vectors.widths.values())
    message = [r.getMessage() for r in caplog.records if r.name == "actclust"][0]
    assert f"storing {width} float16 values per sample (3 layers) for {len(x)} samples on disk in" in message
    assert message.endswith(f": {len(x) * width * 2 / 1024:.1f} KiB")
    caplog.clear()  # a map's spatial summary (kept for retrieval) is named as one, not counted as a layer
    with caplog.at_level(logging.INFO, logger="actclust"):
        _fit(model, x, y)
    assert "values per sample (3 layers and 1 spatial summary) for" in caplog.records[0].getMessage()


# gathering rows of a memory-mapped store in blocks gives exactly X[rows], any index shape, and
# does not leave the file's pages resident (each touched row maps its neighbourhood)
def test_take_from_disk_store(tmp_path):
    from actclust.store import take

    def rss_file():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("RssFile:")).split()[1]) * 1024

    rng = np.random.default_rng(1)
    with StoreWriter(tmp_path / "s") as w:
        for _ in range(20):
            w.add({"a": rng.standard_normal((4096, 1024), dtype=np.float32)})  # 320 MiB
        store = w.finish()
    x = store["a"]
    rows = np.sort(rng.choice(len(x), 6000, replace=False))
    before = rss_file()
    got = take(x, rows)
    assert rss_file() - before < 48 * 2**20
    np.testing.assert_array_equal(got, np.asarray(x)[rows])
    np.testing.assert_array_equal(take(x, rows[:12].reshape(3, 4)), np.asarray(x)[rows[:12].reshape(3, 4)])


# a store opened from disk reads gathered rows from its file (no page mapped), float32 or float16: the same
# values as indexing the array, negative indices as NumPy reads them, a bad index refused; the descriptor
# lives as long as the store's memory map; without it (platforms lacking os.preadv) the map serves, alike
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_take_reads_store_rows_from_the_file(tmp_path, dtype, monkeypatch):
    import gc

    from actclust.store import take, vectors

    rng = np.random.default_rng(3)
    with StoreWriter(tmp_path / "s", dtype=dtype) as w:
        for _ in range(3):
            w.add({"a": rng.standard_normal((1000, 24), dtype=np.float32), "b": rng.standard_normal((1000, 8),
                                                                                                dtype=np.float32)})
        store = w.finish()
    rows = rng.integers(-3000, 3000, (40, 7))
    for layer in ("a", "b"):
        x = store[layer]
        key = id(vectors._mmap_of(x))
        assert key in vectors._READERS
        got = take(x, rows)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(x)[rows].astype(np.float32))
        with pytest.raises(DataError, match=r"Row 3000 is out of bounds for the store's 3000 rows\."):
            take(x, np.array([0, 3000]))
        with monkeypatch.context() as m:
            m.setattr(vectors, "_READERS", {})
            np.testing.assert_array_equal(take(x, rows), got)
    fd = vectors._READERS[key][0]
    del store, x, w
    gc.collect()
    assert key not in vectors._READERS
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with its map


# a bad spatial_grid is refused before any pass, naming the parameter and the value
@pytest.mark.parametrize("bad", [0, 2.5, True, "4"])
def test_spatial_grid_checked(model, data, bad):
    with pytest.raises(ParameterError, match=r"'spatial_grid' parameter of ActivationClustering must be None or an "
                                             r"int >= 1\. Got .* instead"):
        _fit(model, *data, spatial_grid=bad)


# a refitted explainer keeps one generation, not the one it replaced as well (twice the disk until a later fit);
# a state the user still holds keeps its generation, and its vectors stay readable
def test_refit_releases_the_replaced_generation(model, data, tmp_path):
    import gc

    x, y = data
    store = tmp_path / "vectors"
    ac = ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=3, store=store, progress=False)
    ac.fit(x, y)
    ac.fit(x[:60], y[:60])
    gc.collect()  # nothing should need it; here only to rule it out as what freed the old state
    assert len([g for g in os.listdir(store) if g.startswith("gen-")]) == 1
    kept = ac.state_
    before = np.asarray(kept.train_vectors["conv"]).copy()
    ac.fit(x, y)
    assert len([g for g in os.listdir(store) if g.startswith("gen-")]) == 2  # the user's reference holds it
    np.testing.assert_array_equal(np.asarray(kept.train_vectors["conv"]), before)
    # a refit into another folder (the store parameter changed, or a relative one after a chdir) releases the replaced
    # generation in its own folder (it was left behind there, held by nothing: an outside check)
    del kept
    ac.fit(x, y)
    assert len([g for g in os.listdir(store) if g.startswith("gen-")]) == 1
    ac.store = tmp_path / "elsewhere"
    ac.fit(x, y)
    assert [g for g in os.listdir(store) if g.startswith("gen-")] == []
    assert len([g for g in os.listdir(tmp_path / "elsewhere") if g.startswith("gen-")]) == 1


# building an approximate index over a disk store hands the store's pages back as it goes: its two passes over the
# rows (their lists, then the rows added) leave no more of the file mapped in than a block (the first pass of a
# several-layer index did not: at 1M rows, 8 GB of the store stayed resident)
def test_index_build_keeps_the_store_out_of_resident_memory(tmp_path):
    import threading

    from actclust.analysis.indexes import ApproximateIndex
    from actclust.analysis.retrieval import layer_stats

    def file_backed():
        return _statm(2)

    store = _random_store(tmp_path / "s", 12, {"a": 256, "b": 256, "c": 256})
    assert store.nbytes == 3 * 12 * 4096 * 256 * 4  # 144 MiB
    stats = layer_stats(store)
    before, peak, done = file_backed(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], file_backed())
            time.sleep(0.002)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        ApproximateIndex(store, stats, random_state=0)
    finally:
        done.set()
        thread.join()
    assert peak[0] - before < 80 * 2**20, (peak[0] - before) / 2**20


# a prepared explainer whose indexes are mapped from files beside its disk store copies and pickles: the copy gets an
# empty cache and builds what it needs again, with the same answers (faiss could not copy the mapped index: an
# outside check)
def test_prepared_disk_store_explainer_copies(model, data, tmp_path):
    import copy
    import pickle

    x, y = data
    ac = ActivationClustering(model, ["conv", "fc1"], n_clusters=3, store=tmp_path / "v", progress=False,
                              search="approximate").fit(x, y)
    ac.prepare()
    want = ac.similar(x[:5], k=3).indices
    for twin in (copy.deepcopy(ac), pickle.loads(pickle.dumps(ac))):
        assert twin.state_.cache == {} and np.array_equal(twin.similar(x[:5], k=3).indices, want)
    assert ac.state_.cache  # the original keeps its own
