"""Compute backends (:mod:`actclust.compute`): the torch backend against the host, the ``device``
parameter, and running out of device memory.

The torch backend runs here on torch's CPU device, where the same code runs as on a GPU: each step
must give the host's answer within float32 rounding. Tolerances (measured on this file's data, torch
2.13 CPU, NumPy/faiss 1.15 host), each stated relative to the largest value compared:

- squared distances: at most 7.6e-7 of the largest distance (the ``||x||^2 - 2 x.c + ||c||^2``
  expansion in float32 on both sides); asserted 1e-5.
- inner products of the exact search: at most 2.3e-7 of the largest score; asserted 1e-5; ids equal
  (random data: no ties).
- k-means: k-means++ picks the same rows; Lloyd centres within 1e-6 (absolute, values of order 10)
  and objectives within 3e-6 relative; asserted 1e-4 and 1e-5.
- a whole estimator: cluster paths, predictions and exact similar() ids agree on 100% of the held-out
  digits, centres within 6e-8, trust signals equal; asserted >= 0.99 (ids: equal), 1e-5 and 0.05.

The CUDA tests at the end run only where torch sees a CUDA device.
"""

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import actclust
from actclust import ActivationClustering, DeviceMemoryWarning, ModelMismatchWarning, ParameterError
from actclust.adapters.torch_compute import TorchBackend
from actclust.compute import HOST, Backend, backend_for, check_device

# What the backend catches: torch.OutOfMemoryError (torch >= 2.5), torch.cuda's before.
OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

TOL = 1e-5  # float32 tolerance, relative to the largest value compared (measured: < 8e-7)
LAYERS = ["0", "2", "4"]
DEVICE_FORMS = (r"must be None \(the model's device\), 'cpu', 'cuda', 'cuda:N', a torch\.device or a "
                r"compute Backend\. Got {} instead\.")
NO_CUDA = r"is {}, but no CUDA device is available here; pass device='cpu' \(or None for the model's device\)\."

# The digits' border pixels are 0 in nearly every image: a hundred held-out ones differ from the
# training ones there, and the estimator says so (DataWarning); that is not what this file tests.
pytestmark = pytest.mark.filterwarnings("ignore::actclust.DataWarning")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def close(got, want, tol=TOL):
    """``got`` equals ``want`` within ``tol`` of the largest magnitude of ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(want).max(), 1e-30))


# ---------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensor operations in one thread: on a busy machine of few cores, torch's threads wait on
    faiss' (OpenMP) ones and this file takes several times as long."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def vecs():
    """Rows ``(1000, 24)`` off the origin (cancellation in the distance expansion), centres and queries."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 24)).astype(np.float32) + 3
    centers = rng.standard_normal((7, 24)).astype(np.float32) + 3
    queries = [rng.standard_normal((9, 24)).astype(np.float32), rng.standard_normal((9, 24)).astype(np.float32)]
    exclude = rng.random(1000) < 0.3
    return x, centers, queries, exclude


@pytest.fixture(scope="module")
def blobs():
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(600, n_features=10, centers=6, cluster_std=0.5, random_state=0)
    return x.astype(np.float32)


def reader(x, calls=None):
    """``rows(start, stop)`` of ``x`` as the index hands them (a fresh float32 array), counting calls."""
    def rows(a, b):
        if calls is not None:
            calls.append((a, b))
        return np.array(x[a:b], dtype=np.float32)
    return rows


def fail_to(monkeypatch, backend, when):
    """Make ``backend``'s host-to-device copies raise out of memory on the calls where ``when(i, a)``
    (``i`` counts the calls from 0, ``a`` the array copied); the list returned records each call's outcome."""
    calls = []

    def to(a):
        i = len(calls)
        calls.append(bool(when(i, a)))
        if calls[-1]:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return TorchBackend._to(backend, a)

    monkeypatch.setattr(backend, "_to", to)
    return calls


def memory_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, DeviceMemoryWarning)]


# ------------------------------------------------------------------------ 1. torch (CPU) vs host
@pytest.mark.parametrize("rows", [65536, 64, 7])
def test_sq_distances_match_host(vecs, rows):
    x, centers, _, _ = vecs
    tb = TorchBackend("cpu", rows=rows)
    got, want = tb.sq_distances(x, centers), HOST.sq_distances(x, centers)
    assert got.dtype == np.float32 and got.shape == (1000, 7)
    close(got, want)
    def shift(v):  # a transform applied to each chunk
        return (v - 3) * 2

    close(tb.sq_distances(x, centers, shift), HOST.sq_distances(x, centers, shift))
    # A centre that is a row: its distance is clamped at 0, never negative.
    d = tb.sq_distances(x[:50], x[:3])
    assert (d >= 0).all() and np.allclose(np.diag(d[:3]), 0, atol=TOL * d.max())


def test_sq_distances_of_a_memory_map(vecs, tmp_path):
    x, centers, _, _ = vecs
    path = tmp_path / "rows.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    tb = TorchBackend("cpu", rows=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from torch about a read-only array either
        got = tb.sq_distances(ro, centers)
        got_t = tb.sq_distances(ro, centers, lambda v: v * 0.5)
        centres, _ = tb.lloyd(ro, x[:7], 2, 0)  # the whole memory map handed to the device at once
    close(got, HOST.sq_distances(x, centers))
    close(got_t, HOST.sq_distances(x, centers, lambda v: v * 0.5))
    close(centres, HOST.lloyd(x, x[:7], 2, 0)[0], tol=1e-4)


@pytest.mark.parametrize("rows,block", [(65536, 1 << 26), (64, 256), (100, 9)])
def test_top_inner_products_match_host(vecs, rows, block):
    """One chunk; many row chunks and query blocks (256 scores: 4 queries of 64 rows); one query at a time."""
    x, _, queries, exclude = vecs
    tb = TorchBackend("cpu", rows=rows, block=block)
    for ex in (None, exclude):
        got = tb.top_inner_products(queries, reader(x), len(x), 10, exclude=ex)
        want = HOST.top_inner_products(queries, reader(x), len(x), 10, exclude=ex)
        assert len(got) == len(queries) == 2
        for (gi, gs), (wi, ws) in zip(got, want):
            assert gi.shape == wi.shape == (9, 10) and gi.dtype == np.int64 and gs.dtype == np.float32
            np.testing.assert_array_equal(gi, wi)
            close(gs, ws)
            assert (np.diff(gs, axis=1) <= 0).all()  # largest first
            if ex is not None:
                assert not exclude[gi].any()


# The host's exact search leaves excluded rows out of each chunk (faiss' matrix products, not a selector that
# scores row by row): the same top k as every row scored in NumPy with the excluded ones never chosen, over several
# chunks, one of them wholly excluded
# Rows are left out in place (wide rows, a chunk of its own: here every width) or from a copy (a view of the
# caller's array, which stays as it was); one left-out row before a long run moves that run a row at a time.
@pytest.mark.parametrize("in_place,view", [(False, False), (True, False), (True, True)])
def test_host_top_inner_products_leave_excluded_rows_out(vecs, monkeypatch, in_place, view):
    from actclust.compute import host

    x, _, queries, exclude = vecs
    ex = exclude.copy()
    ex[256:512] = True  # a whole chunk of 256 rows left out
    ex[512:768] = False
    ex[513] = True  # then one row, and 254 kept after it
    monkeypatch.setattr(host, "ROWS", 256)
    if in_place:
        monkeypatch.setattr(host, "IN_PLACE_WIDTH", 1)
    before = x.copy()
    for e in (None, ex):
        got = HOST.top_inner_products(queries, (lambda a, b: x[a:b]) if view else reader(x), len(x), 10, exclude=e)
        np.testing.assert_array_equal(x, before)
        for (gi, gs), q in zip(got, queries):
            scores = q.astype(np.float64) @ x.T.astype(np.float64)
            if e is not None:
                scores[:, e] = -np.inf
            want = np.argsort(-scores, axis=1, kind="stable")[:, :10]
            np.testing.assert_array_equal(gi, want)
            close(gs, np.take_along_axis(scores, want, 1))
            if e is not None:
                assert not e[gi].any()


def test_top_inner_products_pads_as_host(vecs):
    """Fewer rows left than ``k`` (most excluded, or ``k > n``): id -1, the host's padding score."""
    x, _, queries, _ = vecs
    x = x[:40]
    ex = np.ones(40, bool)
    ex[[3, 17, 18, 39]] = False  # four rows left, spread over chunks of 16
    tb = TorchBackend("cpu", rows=16)
    for k, e in ((10, ex), (50, None), (50, ex)):
        (gi, gs), = tb.top_inner_products(queries[:1], reader(x), 40, k, exclude=e)
        (wi, ws), = HOST.top_inner_products(queries[:1], reader(x), 40, k, exclude=e)
        assert gi.shape == wi.shape == (9, min(k, 40))
        np.testing.assert_array_equal(gi, wi)
        found = wi >= 0
        close(gs[found], ws[found])
        np.testing.assert_array_equal(gs[~found], ws[~found])  # the lowest float32, as faiss' heaps
        if e is not None:
            assert (found.sum(1) == 4).all() and set(np.unique(gi[found])) <= {3, 17, 18, 39}


def test_row_cache_reused(vecs):
    x, _, queries, exclude = vecs
    tb = TorchBackend("cpu", rows=128, block=512)
    cache, calls = {}, []
    first = tb.top_inner_products(queries, reader(x, calls), len(x), 8, exclude=exclude, cache=cache)
    assert calls and cache["chunk"] == 128 and len(cache["rows"]) == 8  # ceil(1000 / 128) chunks kept
    calls.clear()
    again = tb.top_inner_products(queries, reader(x, calls), len(x), 8, exclude=exclude, cache=cache)
    assert calls == []  # no row read: all from the cache
    for (i1, s1), (i2, s2) in zip(first, again):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
    # Other queries and another exclusion from the same cache: the host's answer.
    (gi, gs), = tb.top_inner_products(queries[1:], reader(x), len(x), 5, cache=cache)
    (wi, ws), = HOST.top_inner_products(queries[1:], reader(x), len(x), 5)
    np.testing.assert_array_equal(gi, wi)
    close(gs, ws)


def test_row_cache_not_reused_for_other_rows(vecs):
    """Rows kept for ``n`` rows are not served for more (an index that grew): all rows are searched."""
    x, _, queries, _ = vecs
    tb = TorchBackend("cpu", rows=128)
    cache = {}
    tb.top_inner_products(queries[:1], reader(x), 500, 5, cache=cache)
    (gi, _), = tb.top_inner_products(queries[:1], reader(x), 1000, 5, cache=cache)
    (wi, _), = HOST.top_inner_products(queries[:1], reader(x), 1000, 5)
    np.testing.assert_array_equal(gi, wi)
    assert (gi >= 500).any()  # the test means something: some best rows are past the first 500


@pytest.mark.parametrize("k", [6, 11])
def test_kmeans_match_host(blobs, k):
    rng = np.random.default_rng(1)
    rand = rng.standard_normal((800, 16)).astype(np.float32)
    tb = TorchBackend("cpu", rows=50, block=300)  # Lloyd's assignment in chunks of 300 // k rows
    for x in (blobs, rand):
        for seed in (0, 1, 2):
            chosen = tb.kmeans_plusplus(x, k, seed)
            want = HOST.kmeans_plusplus(x, k, seed)
            assert chosen.dtype == np.int64 and chosen.shape == (k,)
            np.testing.assert_array_equal(chosen, want)  # the same rows, in the same order
            init = x[want]
            got_c, got_obj = tb.lloyd(x, init, 15, seed)
            want_c, want_obj = HOST.lloyd(x, init, 15, seed)
            assert got_c.dtype == np.float32 and got_c.shape == (k, x.shape[1])
            np.testing.assert_allclose(got_c, want_c, rtol=0, atol=1e-4)
            assert got_obj == pytest.approx(want_obj, rel=1e-5)


@pytest.mark.parametrize("trial", range(4))
def test_lloyd_splits_empty_clusters_as_faiss(trial):
    """Three centres far from every row are empty after the first assignment: each takes half of a
    cluster drawn by size with faiss' own draws, so the centres are faiss' (not merely as good)."""
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(400, n_features=6, centers=4, cluster_std=1.0, random_state=0)
    x = x.astype(np.float32)
    init = x[np.random.default_rng(trial).choice(400, 8, replace=False)].copy()
    init[5:] = init[0] + 1000
    got_c, got_obj = TorchBackend("cpu").lloyd(x, init, 1, 0)
    want_c, want_obj = HOST.lloyd(x, init, 1, 0)
    np.testing.assert_allclose(got_c, want_c, rtol=0, atol=1e-4)
    assert got_obj == pytest.approx(want_obj, rel=1e-5)
    assert len(np.unique(got_c.round(3), axis=0)) == 8  # the split copies are moved apart


def test_lloyd_as_many_rows_as_centres():
    """faiss' corner case: the rows themselves, in their order, objective 0."""
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    got_c, got_obj = TorchBackend("cpu").lloyd(x, x[[3, 1, 0, 4, 2]], 5, 0)
    want_c, want_obj = HOST.lloyd(x, x[[3, 1, 0, 4, 2]], 5, 0)
    np.testing.assert_array_equal(got_c, want_c)
    assert got_obj == want_obj == 0.0


# ------------------------------------------------------------------- 2. a whole estimator
@pytest.fixture(scope="module")
def digits():
    """A small MLP trained briefly on 600 digits (94% right on them); 100 held-out digits to query."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))  # held-out digits like the training ones
    x, y = (x[order] / 16).astype(np.float32), y[order]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x[:600]), torch.from_numpy(y[:600])
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval(), x[:600], y[:600], x[600:700], y[600:700]


def _estimator(model, **kw):
    return ActivationClustering(model, LAYERS, n_clusters=8, progress=False, random_state=0, **kw)


@pytest.fixture(scope="module")
def pair(digits):
    """The same fit on the host (the default for a CPU model) and with the torch backend."""
    model, x, y, _, _ = digits
    host = _estimator(model).fit(x, y)
    dev = _estimator(model, device=TorchBackend("cpu", rows=128, block=4096)).fit(x, y)
    return host, dev


def test_estimator_on_torch_backend_matches_host(pair, digits):
    host, dev = pair
    xq = digits[3]
    assert host._backend() is HOST and isinstance(dev._backend(), TorchBackend)
    assert host.fit_info_["device"] == dev.fit_info_["device"] == "cpu"
    for l in host.layers_:
        close(dev.clusterings_[l].centers_, host.clusterings_[l].centers_)
        np.testing.assert_array_equal(dev.clusterings_[l].cluster_sizes_, host.clusterings_[l].cluster_sizes_)
    assert (dev.cluster_paths(xq) == host.cluster_paths(xq)).mean() >= 0.99  # measured: 1.0
    assert (dev.predict(xq) == host.predict(xq)).mean() >= 0.99  # measured: 1.0
    got, want = dev.similar(xq, k=5, search="exact"), host.similar(xq, k=5, search="exact")
    np.testing.assert_array_equal(got.indices, want.indices)
    close(got.distances, want.distances, tol=1e-4)
    # A device's search="auto" is exact: the same neighbours again.
    np.testing.assert_array_equal(dev.similar(xq, k=5).indices, want.indices)


def test_explain_and_trust_on_torch_backend(pair, digits):
    host, dev = pair
    xq, yq = digits[3][:20], digits[4][:20]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small calibration split: stacked_trust may be unavailable
        got, want = dev.trust(xq, n_neighbors=10), host.trust(xq, n_neighbors=10, search="exact")
        ex_got = dev.explain(xq[:3], yq[:3], k=4, trust=False)
        ex_want = host.explain(xq[:3], yq[:3], k=4, trust=False, search="exact")
    assert got.keys() == want.keys()
    for name in ("dnn_prediction", "surrogate_prediction", "dknn_prediction"):
        np.testing.assert_array_equal(got[name], want[name])
    for name in got:
        # p-values move in steps of one calibration sample; a near tie may move one (measured: 0 here,
        # 0.011 with another split of the digits).
        assert np.abs(np.asarray(got[name], float) - np.asarray(want[name], float)).max() <= 0.05, name
    assert len(ex_got) == 3
    for a, b in zip(ex_got, ex_want):
        for side in ("low", "high"):
            assert [s["index"] for s in a.similar[side]] == [s["index"] for s in b.similar[side]]
        assert a.surrogate["prediction"] == b.surrogate["prediction"]


def test_saved_run_loads_on_the_host(pair, digits, tmp_path):
    from actclust.io.persistence import read_run

    _, dev = pair
    model, xq = digits[0], digits[3]
    dev.save(tmp_path / "run")
    _, params, manifest = read_run(tmp_path / "run", progress=False)
    assert "device" not in params and "device" not in manifest["params"]  # where it ran is no parameter
    want_pred, want_near = dev.predict(xq), dev.similar(xq, k=5).indices
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert loaded.device is None and loaded._backend() is HOST  # the model's device: the CPU
    np.testing.assert_array_equal(loaded.predict(xq), want_pred)
    np.testing.assert_array_equal(loaded.cluster_paths(xq), dev.cluster_paths(xq))
    np.testing.assert_array_equal(loaded.similar(xq, k=5, search="exact").indices, want_near)
    for device in ("cpu", TorchBackend("cpu")):
        again = actclust.load(tmp_path / "run", model, progress=False, device=device)
        np.testing.assert_array_equal(again.predict(xq), want_pred)
        np.testing.assert_array_equal(again.similar(xq, k=5, search="exact").indices, want_near)


# ------------------------------------------------------------------------- 3. out of memory
def test_oom_halves_chunks_and_sq_distances_restart(vecs, monkeypatch):
    x, centers, _, _ = vecs
    want = TorchBackend("cpu", rows=64).sq_distances(x, centers)
    tb = TorchBackend("cpu", rows=64, block=4096)
    calls = fail_to(monkeypatch, tb, lambda i, a: i == 3)  # centres, two chunks written, then out of memory
    with pytest.warns(DeviceMemoryWarning, match=r"The device cpu ran out of memory; actclust goes on in "
                                                 r"smaller chunks \(32 rows, 2048 scores at once\)\.") as record:
        got = tb.sq_distances(x, centers)
    assert len(memory_warnings(record)) == 1
    assert (tb.rows, tb.block) == (32, 2048)
    assert calls.count(True) == 1 and len(calls) == 4 + 1 + 1000 // 32 + 1  # restarted from the start
    close(got, want)


def test_oom_in_search_restarts_without_a_stale_cache(vecs, monkeypatch):
    x, _, queries, exclude = vecs
    want = TorchBackend("cpu", rows=128).top_inner_products(queries, reader(x), len(x), 10, exclude=exclude)
    tb = TorchBackend("cpu", rows=128, block=1024)
    # The queries (2 copies), 3 row chunks kept, then out of memory in the middle of the rows.
    fail_to(monkeypatch, tb, lambda i, a: i == 5)
    cache = {}
    with pytest.warns(DeviceMemoryWarning, match=r"ran out of memory.*\(64 rows, 512 scores at once\)") as record:
        got = tb.top_inner_products(queries, reader(x), len(x), 10, exclude=exclude, cache=cache)
    assert len(memory_warnings(record)) == 1
    assert (tb.rows, tb.block) == (64, 512) and cache["chunk"] == 64 and len(cache["rows"]) == 16
    for (gi, gs), (wi, ws) in zip(got, want):
        np.testing.assert_array_equal(gi, wi)
        close(gs, ws)
    # Out of memory again, in a later call: the chunks halve again, but the warning was said once.
    fail_to(monkeypatch, tb, lambda i, a: i == 0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = tb.top_inner_products(queries, reader(x), len(x), 10, exclude=exclude, cache=cache)
    assert memory_warnings(record) == [] and (tb.rows, tb.block) == (32, 256)
    for (gi, _), (wi, _) in zip(again, want):
        np.testing.assert_array_equal(gi, wi)


def test_oom_in_kmeans(blobs, monkeypatch):
    want_ids = TorchBackend("cpu").kmeans_plusplus(blobs, 6, 0)
    want_c, want_obj = TorchBackend("cpu").lloyd(blobs, blobs[want_ids], 10, 0)
    tb = TorchBackend("cpu", rows=1024, block=1 << 16)
    # k-means++ holds every row at once (smaller chunks cannot help): the host's seeding, the same rows
    calls = fail_to(monkeypatch, tb, lambda i, a: i == 0)
    with pytest.warns(DeviceMemoryWarning, match=r"The device cpu ran out of memory even in the smallest chunks; "
                                                 r"actclust computes this step \(kmeans_plusplus\) on the host, and "
                                                 r"tries the device again at the next\.") as record:
        ids = tb.kmeans_plusplus(blobs, 6, 0)
    assert len(memory_warnings(record)) == 1 and calls == [True] and (tb.rows, tb.block) == (1024, 1 << 16)
    np.testing.assert_array_equal(ids, want_ids)
    # Lloyd's distances are chunked: halved twice, then on the device
    fail_to(monkeypatch, tb, lambda i, a: i in (0, 2))  # the rows, then the centres of the second try
    with pytest.warns(DeviceMemoryWarning, match=r"ran out of memory.*\(512 rows, 32768 scores at once\)") as record:
        c, obj = tb.lloyd(blobs, blobs[want_ids], 10, 0)
    assert len(memory_warnings(record)) == 1
    assert (tb.rows, tb.block) == (256, 16384)
    np.testing.assert_allclose(c, want_c, rtol=0, atol=1e-5)
    assert obj == pytest.approx(want_obj, rel=1e-6)


@pytest.mark.parametrize("step", ["sq_distances", "top_inner_products", "kmeans_plusplus", "lloyd"])
def test_oom_at_the_smallest_chunks_runs_on_the_host(vecs, monkeypatch, step):
    """Out of memory on every try: halved down to 16 rows and 256 scores, then the host's answer (said once), and
    the chunks of before for the next step."""
    x, centers, queries, exclude = vecs
    tb = TorchBackend("cpu", rows=64, block=1024)
    if step == "top_inner_products":  # every copy fails but the queries' and the first chunk of rows' (kept)
        calls = fail_to(monkeypatch, tb, lambda i, a: len(a) != 9 and not np.array_equal(a[0], x[0]))
    else:
        calls = fail_to(monkeypatch, tb, lambda i, a: True)
    cache = {}
    run = {"sq_distances": lambda b: b.sq_distances(x, centers),
           "top_inner_products": lambda b: b.top_inner_products(queries, reader(x), len(x), 5, exclude=exclude,
                                                                cache=cache if b is tb else None),
           "kmeans_plusplus": lambda b: b.kmeans_plusplus(x[:100], 4, 0),
           "lloyd": lambda b: b.lloyd(x[:100], x[:4], 3, 0)}[step]
    with pytest.warns(DeviceMemoryWarning) as record:
        got = run(tb)
    said = [str(w.message) for w in memory_warnings(record)]
    host = (r"The device cpu ran out of memory even in the smallest chunks; actclust computes this step "
            rf"\({step}\) on the host")
    if step == "kmeans_plusplus":  # not chunked: the host at once
        assert len(said) == 1 and re.match(host, said[0]) and calls == [True]
    else:
        assert len(said) == 2 and "smaller chunks" in said[0] and re.match(host, said[1])
        assert calls.count(True) == 3  # 64 -> 32 -> 16 rows, then the host
    assert (tb.rows, tb.block) == (64, 1024)  # as before the step
    want = run(HOST)
    if step == "top_inner_products":
        assert cache == {}  # nothing half-kept
        for (gi, gs), (wi, ws) in zip(got, want):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gs, ws)
    elif step == "lloyd":
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]
    else:
        np.testing.assert_array_equal(got, want)
    # said once per backend: the next step that runs out of memory says nothing more
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(tb)
    assert memory_warnings(record) == []


def test_oom_never_enlarges_small_chunks(vecs, monkeypatch):
    x, centers, _, _ = vecs
    tb = TorchBackend("cpu", rows=8, block=1 << 12)  # rows below the minimum chunk of 16
    fail_to(monkeypatch, tb, lambda i, a: i == 0)
    with pytest.warns(DeviceMemoryWarning, match=r"\(8 rows, 2048 scores at once\)"):
        got = tb.sq_distances(x[:100], centers)
    assert (tb.rows, tb.block) == (8, 2048)
    close(got, HOST.sq_distances(x[:100], centers))
    tiny = TorchBackend("cpu", rows=4, block=64)  # nothing left to halve: the host at once
    fail_to(monkeypatch, tiny, lambda i, a: True)
    with pytest.warns(DeviceMemoryWarning, match=r"even in the smallest chunks") as record:
        got = tiny.sq_distances(x[:100], centers)
    assert len(memory_warnings(record)) == 1 and (tiny.rows, tiny.block) == (4, 64)
    np.testing.assert_array_equal(got, HOST.sq_distances(x[:100], centers))


def test_steps_run_in_full_float32(vecs, monkeypatch):
    """A caller that allows TF32 ("high") gets full float32 products in every step, and its setting back."""
    x, centers, queries, _ = vecs
    tb = TorchBackend("cpu", rows=64)
    seen = []

    def to(a):
        seen.append(torch.get_float32_matmul_precision())
        return TorchBackend._to(tb, a)

    monkeypatch.setattr(tb, "_to", to)
    saved = torch.get_float32_matmul_precision()
    try:
        for caller in ("high", "medium", "highest"):
            torch.set_float32_matmul_precision(caller)
            tb.sq_distances(x, centers)
            tb.top_inner_products(queries, reader(x), len(x), 5)
            tb.lloyd(x[:100], x[:4], 2, 0)
            tb.kmeans_plusplus(x[:100], 4, 0)
            assert torch.get_float32_matmul_precision() == caller
        fail_to(monkeypatch, tb, lambda i, a: True)  # restored on the way out of a failed step too
        torch.set_float32_matmul_precision("high")
        with pytest.warns(DeviceMemoryWarning):
            tb.sq_distances(x, centers)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
    assert seen and set(seen) == {"highest"}


def test_rows_kept_on_the_device_within_one_budget(vecs):
    """Each index keeps its rows on the device only within memory_fraction of the free memory and, with what the
    backend's other indexes keep there, of the whole; an index dropped gives its share back."""
    x, _, queries, _ = vecs
    tb = TorchBackend("cpu", rows=256, memory_fraction=0.5)
    size = x.nbytes  # 1000 rows of 24 float32
    tb._memory = lambda: (3 * size, 3 * size)  # half of it holds one index's rows
    first, second = {}, {}
    tb.top_inner_products(queries, reader(x), len(x), 5, cache=first)
    assert len(first["rows"]) == 4
    tb.top_inner_products(queries, reader(x), len(x), 5, cache=second)
    assert "rows" not in second  # the budget, 1.5 indexes' rows, is spent: streamed on each call
    got = tb.top_inner_products(queries, reader(x), len(x), 5, cache=second)
    want = HOST.top_inner_products(queries, reader(x), len(x), 5)
    np.testing.assert_array_equal(got[0][0], want[0][0])
    np.testing.assert_array_equal(got[1][0], want[1][0])
    del first  # the first index dropped: its rows freed, its share given back
    tb._memory = lambda: (0.9 * size, 3 * size)  # but too little free memory, whatever the budget
    tb.top_inner_products(queries, reader(x), len(x), 5, cache=second)
    assert "rows" not in second
    tb._memory = lambda: (3 * size, 3 * size)
    tb.top_inner_products(queries, reader(x), len(x), 5, cache=second)
    assert len(second["rows"]) == 4
    # another backend on the same device (a second explainer) shares the budget; one on another device does not
    other, elsewhere, third = TorchBackend("cpu", rows=256), TorchBackend("meta", rows=256), {}
    other._memory = elsewhere._memory = tb._memory
    other.top_inner_products(queries, reader(x), len(x), 5, cache=third)
    assert "rows" not in third
    assert elsewhere._fits(len(x), reader(x))


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    """"cuda" names the calling thread's current device: the backend fixes it when made."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert TorchBackend("cuda").device == "cuda:1" and TorchBackend("cuda:0").device == "cuda:0"
    assert TorchBackend(torch.device("cuda")).torch_device == torch.device("cuda", 1)


def test_other_errors_are_not_retried(vecs, monkeypatch):
    x, centers, _, _ = vecs
    tb = TorchBackend("cpu", rows=64, block=1024)

    def broken(a):
        raise ValueError("not a memory error")

    monkeypatch.setattr(tb, "_to", broken)
    with pytest.raises(ValueError, match="not a memory error"):
        tb.sq_distances(x, centers)
    assert (tb.rows, tb.block) == (64, 1024)


# --------------------------------------------------------------------- 4. the device parameter
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_backend_for_the_cpu_is_the_host():
    tb = TorchBackend("cpu")
    assert backend_for("cpu") is HOST
    assert backend_for(None) is HOST and backend_for(None, torch.device("cpu")) is HOST
    assert backend_for(torch.device("cpu")) is HOST and backend_for("cpu", torch.device("cuda:0")) is HOST
    assert backend_for(None, torch.device("mps")) is HOST  # other device types: the host, as before
    assert backend_for(tb) is tb and backend_for(tb, torch.device("cuda:0")) is tb
    assert isinstance(HOST, Backend) and HOST.device == "cpu" and not HOST.on_device
    assert tb.on_device and tb.device == "cpu" and repr(tb) == "TorchBackend('cpu')"


@pytest.mark.parametrize("device,name", [("cuda", "cuda"), ("cuda:0", "cuda:0"), (torch.device("cuda:1"), "cuda:1")])
def test_cuda_without_cuda_refused(no_cuda, device, name):
    with pytest.raises(ParameterError, match="The 'device' parameter of ActivationClustering "
                                             + NO_CUDA.format(f"'{name}'")):
        backend_for(device)
    with pytest.raises(ParameterError, match=NO_CUDA.format(f"'{name}'")):
        backend_for(None, torch.device(name))  # a model said to be on CUDA


def test_missing_cuda_device_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParameterError, match=r"is 'cuda:3', but this machine has 1 CUDA device\(s\); "
                                             r"pass one of 'cuda:0'\.\.'cuda:0' or 'cpu'\."):
        backend_for("cuda:3")


@pytest.mark.parametrize("device", ["gpu", 3, "cuda:x", "CUDA", "cuda:", " cpu", True, 0.5, ["cpu"]])
def test_invalid_device_refused(device):
    assert not check_device(device)
    with pytest.raises(ParameterError, match="The 'device' parameter of ActivationClustering "
                                             + DEVICE_FORMS.format(re.escape(repr(device)))):
        backend_for(device)


@pytest.mark.parametrize("device", ["gpu", 3, "cuda:x"])
def test_estimator_refuses_invalid_device(digits, device):
    model, x, y, _, _ = digits
    with pytest.raises(ParameterError, match="The 'device' parameter of ActivationClustering "
                                             + DEVICE_FORMS.format(repr(device))):
        _estimator(model, device=device).fit(x[:50], y[:50])


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_estimator_refuses_cuda_without_cuda(digits, no_cuda, device):
    model, x, y, _, _ = digits
    ac = _estimator(model, device=device)
    with pytest.raises(ParameterError, match=NO_CUDA.format(f"'{device}'")):
        ac.fit(x[:50], y[:50])
    assert "_fitted_state" not in ac.__dict__  # refused before anything was learned


def test_device_not_saved_and_load_on_cpu(digits, tmp_path, monkeypatch):
    from actclust.io.persistence import read_run

    model, x, y, xq, _ = digits
    ac = _estimator(model, device="cpu").fit(x[:200], y[:200])
    assert ac._backend() is HOST
    ac.save(tmp_path / "run")
    _, params, _ = read_run(tmp_path / "run", progress=False)
    assert "device" not in params
    loaded = actclust.load(tmp_path / "run", model, progress=False, device="cpu")
    assert loaded.device == "cpu" and loaded._backend() is HOST
    np.testing.assert_array_equal(loaded.predict(xq), ac.predict(xq))
    with pytest.raises(ParameterError, match=DEVICE_FORMS.format("'gpu'")):
        actclust.load(tmp_path / "run", model, progress=False, device="gpu").similar(xq, k=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParameterError, match=NO_CUDA.format("'cuda'")):
        actclust.load(tmp_path / "run", model, progress=False, device="cuda").similar(xq, k=3)


# ---------------------------------------------------------------------------------- 5. CUDA
@needs_cuda
def test_torch_backend_on_cuda_matches_host(vecs, blobs, no_tf32):
    x, centers, queries, exclude = vecs
    tb = TorchBackend("cuda", rows=256, block=1024)
    assert tb.device.startswith("cuda") and backend_for("cuda").device.startswith("cuda")
    close(tb.sq_distances(x, centers), HOST.sq_distances(x, centers))
    cache = {}
    got = tb.top_inner_products(queries, reader(x), len(x), 10, exclude=exclude, cache=cache)
    want = HOST.top_inner_products(queries, reader(x), len(x), 10, exclude=exclude)
    assert cache["rows"][0][1].device.type == "cuda"  # the rows stay on the device
    again = tb.top_inner_products(queries, reader(x), len(x), 10, exclude=exclude, cache=cache)
    for (gi, gs), (wi, ws), (ai, as_) in zip(got, want, again):
        np.testing.assert_array_equal(gi, wi)
        close(gs, ws)
        np.testing.assert_array_equal(ai, gi)
        np.testing.assert_array_equal(as_, gs)
    ids = tb.kmeans_plusplus(blobs, 6, 0)
    np.testing.assert_array_equal(ids, HOST.kmeans_plusplus(blobs, 6, 0))
    got_c, got_obj = tb.lloyd(blobs, blobs[ids], 10, 0)
    want_c, want_obj = HOST.lloyd(blobs, blobs[ids], 10, 0)
    np.testing.assert_allclose(got_c, want_c, rtol=0, atol=1e-4)
    assert got_obj == pytest.approx(want_obj, rel=1e-5)


@needs_cuda
def test_fit_on_cuda_matches_cpu(digits, no_tf32):
    model, x, y, xq, _ = digits
    cpu = _estimator(model).fit(x, y)
    gpu = _estimator(copy.deepcopy(model).cuda()).fit(x, y)
    assert isinstance(gpu._backend(), TorchBackend) and gpu.fit_info_["device"].startswith("cuda")
    for l in cpu.layers_:
        np.testing.assert_allclose(gpu.clusterings_[l].centers_, cpu.clusterings_[l].centers_, rtol=0, atol=1e-4)
    assert (gpu.cluster_paths(xq) == cpu.cluster_paths(xq)).mean() >= 0.99
    assert (gpu.predict(xq) == cpu.predict(xq)).mean() >= 0.99
    # One training row assigned otherwise (a near tie) would move a class mix by 1 / 75 at most.
    np.testing.assert_allclose(gpu.predict_proba(xq), cpu.predict_proba(xq), rtol=0, atol=0.02)
    near_gpu, near_cpu = gpu.similar(xq, k=5).indices, cpu.similar(xq, k=5, search="exact").indices
    assert (near_gpu == near_cpu).mean() >= 0.99


@needs_cuda
def test_cuda_run_loads_on_a_cpu_model(digits, no_tf32, tmp_path):
    model, x, y, xq, _ = digits
    gpu_model = copy.deepcopy(model).cuda()
    gpu = _estimator(gpu_model).fit(x, y)
    gpu.save(tmp_path / "run")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = actclust.load(tmp_path / "run", copy.deepcopy(model).cpu(), progress=False)
    assert not [w for w in record if issubclass(w.category, ModelMismatchWarning)]  # the same weights
    assert loaded._backend() is HOST
    assert (loaded.predict(xq) == gpu.predict(xq)).mean() >= 0.99
    assert (loaded.cluster_paths(xq) == gpu.cluster_paths(xq)).mean() >= 0.99
    assert (loaded.similar(xq, k=5, search="exact").indices == gpu.similar(xq, k=5).indices).mean() >= 0.99


def test_rows_kept_again_for_a_grown_index_within_the_budget(vecs):
    """An index that grew keeps its rows again: its former rows are freed first, not counted against the budget (with
    them counted, the rows were refused and the stale ones stayed on the device: an outside review)."""
    x, _, queries, _ = vecs
    tb = TorchBackend("cpu", rows=256, memory_fraction=0.5)
    tb._memory = lambda: (2.4 * x[:900].nbytes, 2.4 * x[:900].nbytes)  # room for one index of 1,000 rows, not two
    cache = {}
    tb.top_inner_products(queries, reader(x[:900]), 900, 5, cache=cache)
    assert cache["n"] == 900
    got = tb.top_inner_products(queries, reader(x), 1000, 5, cache=cache)
    assert cache["n"] == 1000 and len(cache["rows"]) == 4
    np.testing.assert_array_equal(got[0][0], HOST.top_inner_products(queries, reader(x), 1000, 5)[0][0])


def test_full_float32_across_threads(vecs, monkeypatch):
    """Steps at once in two threads, the first to start ending first: it leaves full float32 to the other (it
    restored the caller's TF32 under it: an outside review); the last to end restores the caller's precision."""
    import threading

    x, centers, _, _ = vecs
    backends = {name: TorchBackend("cpu") for name in "ab"}
    inside = {name: threading.Event() for name in "ab"}
    release = {name: threading.Event() for name in "ab"}

    def held(name):
        def to(arr):  # the step waits inside, after its precision is set, until released
            inside[name].set()
            release[name].wait(10)
            return TorchBackend._to(backends[name], arr)
        return to

    for name, tb in backends.items():
        monkeypatch.setattr(tb, "_to", held(name))
    threads = {name: threading.Thread(target=lambda tb=tb: tb.sq_distances(x[:10], centers))
               for name, tb in backends.items()}
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    seen = []
    try:
        for name in "ab":  # a's step starts, then b's
            threads[name].start()
            assert inside[name].wait(10)
        release["a"].set()
        threads["a"].join(10)  # a's step ends while b's runs
        seen.append(torch.get_float32_matmul_precision())
        release["b"].set()
        threads["b"].join(10)
        seen.append(torch.get_float32_matmul_precision())
    finally:
        for e in release.values():
            e.set()
        torch.set_float32_matmul_precision(saved)
    assert seen == ["highest", "high"]


def test_host_step_after_oom_holds_no_device_rows(vecs, monkeypatch):
    """The host's step runs once the failed device step is let go: the rows it had copied are freed, not held (by the
    exception's frames) while the host computes."""
    import weakref

    x, _, _, _ = vecs
    tb = TorchBackend("cpu", rows=16, block=256)  # the smallest chunks: out of memory goes to the host
    copied = []

    def to(arr):
        if copied:  # the second copy (the centres) fails; the first (the rows) is on the "device"
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        t = TorchBackend._to(tb, arr)
        copied.append(weakref.ref(t))
        return t

    alive = []
    real = HOST.lloyd
    monkeypatch.setattr(tb, "_to", to)
    monkeypatch.setattr(HOST, "lloyd", lambda *args: (alive.append(copied[0]() is not None), real(*args))[1])
    with pytest.warns(DeviceMemoryWarning, match="even in the smallest chunks"):
        tb.lloyd(x[:100], x[:4], 2, 0)
    assert alive == [False]
