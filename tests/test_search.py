"""Approximate similar-sample search against exact search, and the choice between them."""

import json
import os

import numpy as np
import pytest

from actclust import ParameterError
from actclust.analysis.retrieval import (AUTO_EXACT_ROWS, ApproximateIndex, Index, layer_stats, layer_weights,
                                resolve_search)


def _clustered_vectors(n, widths=(16, 32, 64), n_clusters=60, seed=0):
    """Unit-length layer vectors with cluster structure shared across layers (like activations)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, n)
    out = {}
    for j, d in enumerate(widths):
        centres = rng.standard_normal((n_clusters, d))
        v = centres[labels] + (0.6 + 0.3 * j) * rng.standard_normal((n, d))
        out[f"layer{j}"] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return out



def _written(index, token: str, folder) -> dict:
    """The files that keep ``index`` with a run (``index_files``), written into ``folder``: ``{extension: path}``."""
    from actclust.analysis import indexes

    paths = {}
    for name, content in indexes.index_files(index, token).items():
        path = paths[name.rsplit(".", 1)[1]] = folder / name.replace("{sha}", "0")
        if callable(content):
            with open(path, "wb") as f:
                content(f.write)
        else:
            path.write_bytes(content)
    return paths

# the IVF index of 8-bit codes, calibrated per weighting and re-ranked exactly, finds >= 95% of the exact
# 10 nearest of held-out queries, for every preset
def test_approximate_recall_against_exact():
    both = _clustered_vectors(20500)  # queries from the same distribution, not in the index
    train = {l: v[:20000] for l, v in both.items()}
    queries = {l: v[20000:] for l, v in both.items()}
    scales = layer_stats(train)
    exact, approx = Index(train, scales), ApproximateIndex(train, scales, random_state=0)
    assert all(p <= approx.nlist for p, _ in approx.settings.values())
    layers = list(train)
    for preset in ("equal", "low", "high"):
        w = layer_weights(preset, layers)
        e_idx, e_dist, _ = exact.search(queries, 10, w)
        a_idx, a_dist, _ = approx.search(queries, 10, w)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(a_idx, e_idx)])
        assert recall >= 0.95, (preset, recall)
        # what it returns is re-ranked by exact distance, so it is never closer than the truth
        assert np.all(a_dist[:, 0] >= e_dist[:, 0] - 1e-5) and np.all(np.diff(a_dist, axis=1) >= 0)


# the estimator's search parameter, per call and as a default; bad names are refused with the choices
def test_search_parameter(model, data):
    from actclust import ActivationClustering

    x = data[0]
    ac = ActivationClustering(model, ["conv", "fc1", "fc2"], n_clusters=3, progress=False).fit(x)
    exact = ac.similar(x[:20], k=5, search="exact")
    approx = ac.similar(x[:20], k=5, search="approximate")
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx.indices, exact.indices)])
    assert overlap >= 0.8
    assert np.array_equal(ac.similar(x[:20], k=5).indices, exact.indices)  # "auto" on 120 samples: exact
    with pytest.raises(ParameterError, match=r"'search' parameter must be one of \['auto', 'exact', 'approximate'\]"):
        ac.similar(x[:2], search="fast")
    with pytest.raises(ParameterError, match=r"'search' parameter of ActivationClustering must be one of"):
        ActivationClustering(model, ["fc1"], search="ivf", progress=False).fit(x)
    es = ac.explain(x[:3], k=3, trust=False, search="approximate")
    assert len(es[0].similar["low"]) == 3


# "auto" is exact below the measured break-even size and approximate above it, on the host
def test_auto_threshold():
    assert resolve_search("auto", 1_797, 300) == "exact"  # scikit-learn's digits
    assert resolve_search("auto", 60_000, 266) == "approximate"  # Fashion-MNIST: summaries and 'mean' vectors
    assert resolve_search("auto", 54_000, 32) == "approximate"  # trust's search of one narrow layer
    assert resolve_search("auto", 1_281_167, 3840) == "approximate"  # ImageNet, ResNet-50 'mean'
    assert resolve_search("auto", AUTO_EXACT_ROWS, 1) == "approximate"
    assert resolve_search("auto", AUTO_EXACT_ROWS - 1, 10**4) == "exact"
    assert resolve_search("exact", 10**9, 10**3) == "exact"


# every kind of approximate index the library builds finds >= 95% of the exact 10 nearest for each preset,
# alone and as explain's shared search of "low" and "high": float32 codes, 8-bit codes re-ranked exactly,
# and (past HNSW_LISTS lists, lowered here) lists trained by two-level k-means with rows assigned through an
# HNSW graph, whose queries search the centres flat, or (past GRAPH_QUERY_LISTS, lowered too) through the graph
@pytest.mark.parametrize("codes, hnsw, graph", [("flat", False, False), ("sq8", False, False), ("sq8", True, False),
                                                ("sq8", True, True), ("pca", True, False), ("pca", True, True)])
def test_approximate_indexes_recall(codes, hnsw, graph, monkeypatch):
    from faiss.contrib import clustering

    from actclust.analysis import indexes

    if hnsw:
        monkeypatch.setattr(indexes, "HNSW_LISTS", 64)
    if graph:
        monkeypatch.setattr(indexes, "GRAPH_QUERY_LISTS", 64)
    two_level = []
    real = clustering.two_level_clustering
    monkeypatch.setattr(clustering, "two_level_clustering", lambda *a, **k: two_level.append(1) or real(*a, **k))
    both = _clustered_vectors(12300, n_clusters=40)
    train = {l: v[:12000] for l, v in both.items()}
    queries = {l: v[12000:] for l, v in both.items()}
    stats = layer_stats(train)
    exact, approx = Index(train, stats), ApproximateIndex(train, stats, random_state=0, codes=codes)
    assert approx.codes == codes and approx.nlist == indexes.n_lists(12000)
    import faiss

    assert bool(two_level) == hnsw
    assert isinstance(faiss.downcast_index(approx.index.quantizer), faiss.IndexHNSWFlat) == graph
    assert isinstance(faiss.downcast_index(approx.index.quantizer), faiss.IndexFlat) == (not graph)
    layers = list(train)
    ws = [layer_weights(p, layers) for p in ("low", "high", "equal")]
    truth = [exact.search(queries, 10, w)[0] for w in ws]
    alone = [approx.search(queries, 10, w)[0] for w in ws]
    shared = approx.search_many(queries, 10, ws[:2])
    for t, a in zip(truth + truth[:2], alone + [s[0] for s in shared]):
        recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, t)])
        assert recall >= 0.95, (codes, hnsw, graph, recall)


# the lists grow with n: 4 sqrt(n) up to about 160,000 rows, then 100 rows per list (at least 39 rows each)
def test_lists_grow_with_n():
    from actclust.analysis.indexes import n_lists

    assert [n_lists(n) for n in (10, 100, 10_000, 100_000, 1_000_000, 10_000_000)] == [1, 2, 256, 1265, 10_000,
                                                                                        100_000]


# several weightings without layer shares (explain's "low" and "high") on float32 codes: each searches alone at
# its own probes, no row gathered; the same answer as a search of that weighting by itself, distances close to
# the exact ones of the same rows, recall against exact search as calibrated; with shares, one shared search
def test_weightings_without_shares_search_alone(monkeypatch):
    both = _clustered_vectors(8300)
    train = {l: v[:8000] for l, v in both.items()}
    queries = {l: v[8000:] for l, v in both.items()}
    stats = layer_stats(train)
    exact, approx = Index(train, stats), ApproximateIndex(train, stats, random_state=0, codes="flat")
    ws = [layer_weights(p, list(train)) for p in ("low", "high")]
    for w in ws:
        approx._settings(w)  # calibrated on first use (which reads rows of the store)
    gathered = []
    monkeypatch.setattr("actclust.analysis.indexes.take", lambda v, i: gathered.append(i.shape) or v[i])
    found = approx.search_many(queries, 10, ws, shares=False)
    assert gathered == []  # no training row read: the scores are the distances
    assert all(shares is None for _, _, shares in found)
    for w, (idx, dist, _) in zip(ws, found):
        alone, alone_dist, _ = approx.search(queries, 10, w, shares=False)
        assert np.array_equal(idx, alone) and np.array_equal(dist, alone_dist)
        e_idx, _, _ = exact.search(queries, 10, w)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, e_idx)]) >= 0.95
        true = sum(np.float32(wl / s) * ((queries[l][:, None, :] - train[l][idx]) ** 2).sum(2)
                   for l, wl, s in zip(train, w, exact.scales))
        assert np.allclose(dist, true, rtol=1e-3, atol=1e-5)
    assert set(approx.settings) == {tuple(np.round(w, 12).tolist()) for w in ws}  # each calibrated alone
    approx.search_many(queries, 10, ws)  # with shares: one search of the group, calibrated as one
    assert len(approx.settings) == 3 and gathered


# a search with layer shares gathers its candidates' rows a bounded number of queries at a time, but finds the
# candidates of all its queries in one search (more queries share more of what a search reads): the same
# answers as gathering everything at once
@pytest.mark.parametrize("codes", ["flat", "sq8"])
def test_candidates_found_at_once_rows_gathered_in_chunks(codes, monkeypatch):
    from actclust.analysis import indexes

    both = _clustered_vectors(6500)
    train = {l: v[:6000] for l, v in both.items()}
    queries = {l: v[6000:] for l, v in both.items()}
    approx = ApproximateIndex(train, layer_stats(train), random_state=0, codes=codes)
    ws = [layer_weights(p, list(train)) for p in ("low", "high")]
    whole = approx.search_many(queries, 10, ws)
    calls = []
    real = approx.candidates
    monkeypatch.setattr(approx, "candidates",
                        lambda part, *a, **k: calls.append(len(part["layer0"])) or real(part, *a, **k))
    monkeypatch.setattr(indexes, "_GATHER_FLOATS", 64 * 50 * 64)  # a few dozen queries' rows at a time
    chunked = approx.search_many(queries, 10, ws)
    assert calls == [500]
    for (i1, d1, s1), (i2, d2, s2) in zip(whole, chunked):
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2) and np.array_equal(s1, s2)


# a deep search that leaves rows out (trust's neighbours among the reference rows, here 200) comes back full:
# no -1 ids, no excluded row, finite distances, and close to the exact answer
def test_deep_search_with_exclusion_is_never_short():
    train = {"layer1": _clustered_vectors(6000)["layer1"]}
    stats = layer_stats(train)
    exact, approx = Index(train, stats), ApproximateIndex(train, stats, random_state=0)
    exclude = np.zeros(6000, dtype=bool)
    exclude[np.random.default_rng(1).permutation(6000)[:600]] = True
    q = {"layer1": train["layer1"][:300] + 0.01}
    a_idx, a_dist, _ = approx.search(q, 200, np.ones(1), exclude=exclude, shares=False)
    e_idx, _, _ = exact.search(q, 200, np.ones(1), exclude=exclude, shares=False)
    assert (a_idx >= 0).all() and not exclude[a_idx].any() and np.isfinite(a_dist).all()
    assert np.mean([len(set(x) & set(y)) / 200 for x, y in zip(a_idx, e_idx)]) >= 0.85


# queries are scanned in the order of their nearest list (lists found first, then faiss' search of given lists
# on every thread): each query still gets exactly what faiss' own search finds for it, in the caller's order,
# for every kind of index (float32 and 8-bit codes, one layer with rows left out, the HNSW graph quantizer)
@pytest.mark.parametrize("kind", ["flat", "sq8", "one layer", "graph"])
def test_queries_taken_by_list_find_what_faiss_finds(kind, monkeypatch):
    from actclust.analysis import indexes

    if kind == "graph":
        monkeypatch.setattr(indexes, "HNSW_LISTS", 64)
        monkeypatch.setattr(indexes, "GRAPH_QUERY_LISTS", 64)
    both = _clustered_vectors(6600, n_clusters=30)
    if kind == "one layer":
        both = {"layer2": both["layer2"]}
    train = {l: v[:6000] for l, v in both.items()}
    rng = np.random.default_rng(2)
    order = rng.permutation(600)  # queries in no particular order: the answer must come back in the same one
    queries = {l: np.ascontiguousarray(v[6000:][order]) for l, v in both.items()}
    approx = ApproximateIndex(train, layer_stats(train), random_state=0, codes="sq8" if kind == "sq8" else "flat")
    assert approx.index.parallel_mode == 3
    keep = None
    if kind == "one layer":
        import faiss

        bits = np.packbits(rng.random(6000) > 0.1, bitorder="little")
        keep = faiss.IDSelectorBitmap(6000, faiss.swig_ptr(bits))
    w = np.ones(len(train)) if kind == "one layer" else layer_weights("low", list(train))
    q = approx._index_query(queries, w)
    for m, nprobe in ((10, 3), (50, 7)):
        scores, ids = approx._search_by_list(q, m, nprobe, keep)
        want_scores, want_ids = approx.index.search(q, m, params=indexes._quantizer_params(nprobe, keep))
        assert np.array_equal(ids, want_ids), kind
        assert np.allclose(scores, want_scores, rtol=1e-5, atol=1e-6), kind
        if keep is not None:
            assert np.unpackbits(bits, bitorder="little")[ids[ids >= 0]].all()


# an approximate index is saved with the run, checked by SHA-256 and memory-mapped at load, not rebuilt
def test_approximate_index_saved_with_the_run(fitted, data, model, tmp_path, monkeypatch):
    import json

    import actclust
    from actclust import InvalidSaveError
    from actclust.analysis import indexes

    x = data[0]
    want = fitted.similar(x[:8], k=4, weights="high", search="approximate").indices
    fitted.save(tmp_path / "run")
    names = sorted(f.name for f in (tmp_path / "run").iterdir() if f.name.startswith("index_"))
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["faiss", "safetensors"]  # names hold their SHA-256
    assert set(names) <= set(json.loads((tmp_path / "run" / "manifest.json").read_text())["files"])

    def no_build(self, progress):
        raise AssertionError("the saved index was rebuilt")

    monkeypatch.setattr(indexes.ApproximateIndex, "_build", no_build)
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert np.array_equal(loaded.similar(x[:8], k=4, weights="high", search="approximate").indices, want)
    assert loaded.state_.cache["retrieval"]["retrieval", "approximate", "host"].index.parallel_mode == 3
    # a loaded run saved again keeps its index (the mapped file is copied: faiss would write a reference to it)
    loaded.save(tmp_path / "again")
    again = actclust.load(tmp_path / "again", model, progress=False)
    assert np.array_equal(again.similar(x[:8], k=4, weights="high", search="approximate").indices, want)
    del again

    # the edit goes to a new file put in place (as an editor saves): the loaded run still maps the old
    # one, and truncating a mapped file in place would crash this process (SIGBUS), not test the check
    faiss_file = tmp_path / "run" / next(n for n in names if n.endswith(".faiss"))
    data_bytes = bytearray(faiss_file.read_bytes())
    data_bytes[-1] ^= 0xFF
    (tmp_path / "edited").write_bytes(bytes(data_bytes))
    os.replace(tmp_path / "edited", faiss_file)
    with pytest.raises(InvalidSaveError, match=r"index_retrieval-[0-9a-f]{16}\.faiss does not match its SHA-256"):
        actclust.load(tmp_path / "run", model, progress=False)


# rows of several layers wider than PCA_WIDTH are searched through each wide layer's PCA_DIMS leading principal
# components (8-bit codes) and re-ranked exactly: recall against exact search as calibrated for every preset and
# for explain's shared search, distances the exact ones of the rows returned; the principal axes are saved
# with the index and read back (same answers), and axes that do not fit the run are refused
def test_principal_component_codes_for_wide_rows(tmp_path):
    from safetensors.numpy import load_file, save_file

    from actclust import InvalidSaveError
    from actclust.analysis import indexes

    both = _clustered_vectors(12300, widths=(48, 160, 400), n_clusters=40)
    train = {l: v[:12000] for l, v in both.items()}
    queries = {l: v[12000:] for l, v in both.items()}
    stats = layer_stats(train)
    exact, approx = Index(train, stats), ApproximateIndex(train, stats, random_state=0)
    assert approx.codes == "pca" and sorted(approx.bases) == ["layer1", "layer2"]  # layer0 (48) kept whole
    assert approx.dims == [48, indexes.PCA_DIMS, indexes.PCA_DIMS] and approx.index.d == approx.d < 608
    for b in approx.bases.values():  # orthonormal axes
        assert np.allclose(b @ b.T, np.eye(indexes.PCA_DIMS), atol=1e-5)
    layers = list(train)
    ws = [layer_weights(p, layers) for p in ("low", "high", "equal")]
    truth = [exact.search(queries, 10, w)[0] for w in ws]
    found = [approx.search(queries, 10, w) for w in ws]
    shared = approx.search_many(queries, 10, ws[:2], shares=False)
    for t, (idx, dist, _), w in zip(truth + truth[:2], found + shared, ws + ws[:2]):
        assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(idx, t)]) >= 0.95
        true = sum(np.float32(wl / s) * ((queries[l][:, None, :] - train[l][idx]) ** 2).sum(2)
                   for l, wl, s in zip(train, w, exact.scales))
        assert np.allclose(dist, true, rtol=1e-4, atol=1e-5)
    assert all(r > 1 for _, r in approx.settings.values())  # approximate scores: candidates re-ranked
    narrow = {l: v[:3000] for l, v in _clustered_vectors(3000, n_clusters=10).items()}  # 112 values a row
    assert ApproximateIndex(narrow, layer_stats(narrow), random_state=0).codes == "flat"
    one = {"layer2": train["layer2"][:3000]}  # one layer (trust's searches): L2 over whole rows, never projected
    assert ApproximateIndex(one, layer_stats(one), random_state=0).codes == "flat"

    paths = _written(approx, "retrieval", tmp_path)
    loaded = indexes.load_index(train, paths["faiss"], paths["safetensors"])
    assert loaded.codes == "pca" and loaded.dims == approx.dims
    for w, (idx, dist, _) in zip(ws, found):
        again = loaded.search(queries, 10, w)
        assert np.array_equal(again[0], idx) and np.array_equal(again[1], dist)
    arrays = load_file(str(paths["safetensors"]))
    from safetensors import safe_open

    with safe_open(str(paths["safetensors"]), framework="numpy") as f:
        meta = f.metadata()
    arrays["basis/2"] = arrays["basis/2"][:, :399]  # axes of another width than the layer's
    save_file(arrays, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(InvalidSaveError, match=r"principal axes that do not fit its codes \(pca\) or this run's layers"):
        indexes.load_index(train, paths["faiss"], tmp_path / "bad.safetensors")


# principal-component codes get a 4-bit twin over the same lists (fastscan.py): its shortlist, scored again by the
# 8-bit codes, gives the 8-bit scan's own candidates with the 8-bit scan's own scores, but for the few the 4-bit
# scores rank too low; a search that leaves rows out scans the 8-bit codes (fast-scan takes no selector); the
# twin is saved with the run and read back to give the same answers; an older run without one scans its 8-bit
# codes; arrays that do not fit the index are refused
def test_four_bit_twin_of_principal_component_codes(tmp_path):
    import faiss
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from actclust import InvalidSaveError
    from actclust.analysis import fastscan, indexes

    both = _clustered_vectors(12300, widths=(48, 160, 400), n_clusters=40, seed=3)
    train = {l: v[:12000] for l, v in both.items()}
    queries = {l: v[12000:] for l, v in both.items()}
    approx = ApproximateIndex(train, layer_stats(train), random_state=0)
    assert approx.codes == "pca" and isinstance(approx.fast, fastscan.FastScan)
    assert approx.fast.index.ntotal == approx.n == approx.index.ntotal
    layers = list(train)
    for preset in ("low", "high", "equal"):
        w = layer_weights(preset, layers)
        q = approx._index_query(queries, w)
        m, nprobe = 30, 16
        params = indexes._quantizer_params(nprobe)
        near, lists = approx.index.quantizer.search(q, nprobe)
        eight_s, eight_i = np.empty((len(q), m), np.float32), np.empty((len(q), m), np.int64)
        approx.index.search_preassigned_c(len(q), faiss.swig_ptr(q), m, faiss.swig_ptr(lists), faiss.swig_ptr(near),
                                          faiss.swig_ptr(eight_s), faiss.swig_ptr(eight_i), False, params)
        four_s, four_i = approx.fast.search(q, m, lists, near, params)
        with pytest.MonkeyPatch.context() as patch:  # shortlists held a few queries at a time: the same answers
            patch.setattr(fastscan, "_SHORTLIST_ROWS", 7 * fastscan.SHORTLIST * m)
            blocks = approx.fast.search(q, m, lists, near, params)
        assert np.array_equal(blocks[0], four_s) and np.array_equal(blocks[1], four_i)
        held = np.mean([len(set(a) & set(b)) / m for a, b in zip(four_i, eight_i)])
        assert held >= 0.97, (preset, held)
        # rows both keep have the 8-bit scan's scores (its codes decoded, the list's centre score added)
        for a_i, a_s, b_i, b_s in zip(four_i, four_s, eight_i, eight_s):
            same = dict(zip(b_i.tolist(), b_s.tolist()))
            both_kept = [(s, same[i]) for i, s in zip(a_i.tolist(), a_s.tolist()) if i in same]
            assert np.allclose(*zip(*both_kept), rtol=1e-5, atol=1e-5)
        assert (np.diff(four_s, axis=1) <= 0).all()  # best first
    # a search that leaves rows out scans the 8-bit codes: the twin is never asked
    w = layer_weights("equal", layers)
    approx.search(queries, 10, w)  # calibrated first (its trial searches use the twin)
    calls = []
    real = approx.fast.search
    approx.fast.search = lambda *a: calls.append(1) or real(*a)
    leave = np.zeros(approx.n, bool)
    leave[::2] = True
    found = approx.search(queries, 10, w, exclude=leave)[0]
    assert not calls and not leave[found].any()
    approx.search(queries, 10, w)
    assert calls
    approx.fast.search = real

    paths = _written(approx, "retrieval", tmp_path)
    ws = [layer_weights(p, layers) for p in ("low", "high", "equal")]
    found = [approx.search(queries, 10, w) for w in ws]
    loaded = indexes.load_index(train, paths["faiss"], paths["safetensors"])
    assert loaded.fast is not None
    again_saved = loaded.fast.arrays()  # a loaded run saved again keeps the same 4-bit codes
    assert all(np.array_equal(again_saved[k], v) for k, v in approx.fast.arrays().items())
    for w, (idx, dist, _) in zip(ws, found):
        again = loaded.search(queries, 10, w)
        assert np.array_equal(again[0], idx) and np.array_equal(again[1], dist)

    arrays = load_file(str(paths["safetensors"]))
    with safe_open(str(paths["safetensors"]), framework="numpy") as f:
        meta = json.loads(f.metadata()["actclust"])

    def saved(arrays, meta, name="changed.safetensors"):
        save_file(arrays, str(tmp_path / name), metadata={"actclust": json.dumps(meta)})
        return tmp_path / name

    # an older run (no twin): its 8-bit codes are scanned, and the answers are as good
    older = saved({k: v for k, v in arrays.items() if not k.startswith("fastscan/")},
                  {k: v for k, v in meta.items() if k != "fastscan"}, "older.safetensors")
    old = indexes.load_index(train, paths["faiss"], older)
    assert old.fast is None
    exact = Index(train, layer_stats(train))
    for w in ws:
        truth = exact.search(queries, 10, w)[0]
        assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(old.search(queries, 10, w)[0], truth)]) >= 0.95
    for change, said in (
            (lambda a: a.update({"fastscan/codes": a["fastscan/codes"][:-1]}), "has 4-bit codes that do not fit"),
            (lambda a: a.update({"fastscan/centroids": np.full_like(a["fastscan/centroids"], np.nan)}),
             "has 4-bit codes that do not fit"),
            (lambda a: a.update({"fastscan/codes": a["fastscan/codes"].astype(np.int16)}), "has 4-bit codes that do not"),
            (lambda a: a.pop("fastscan/codes"), r"is damaged: KeyError")):
        bad = dict(arrays)
        change(bad)
        with pytest.raises(InvalidSaveError, match=r"saved search index .*changed\.safetensors " + said):
            indexes.load_index(train, paths["faiss"], saved(bad, meta))
    # one layer's 8-bit codes (trust's searches: distances, not inner products) never get a twin
    one = {"layer2": train["layer2"][:3000]}
    single = ApproximateIndex(one, layer_stats(one), random_state=0, codes="sq8")
    assert single.fast is None
    paths.update({"one." + k: v for k, v in _written(single, "one", tmp_path).items()})
    one_arrays = load_file(str(paths["one.safetensors"]))
    with safe_open(str(paths["one.safetensors"]), framework="numpy") as f:
        one_meta = json.loads(f.metadata()["actclust"])
    assert indexes.load_index(one, paths["one.faiss"], paths["one.safetensors"]).fast is None
    twin = {"fastscan/centroids": np.zeros(single.d * 16, np.float32),
            "fastscan/codes": np.zeros((3000, single.d // 2), np.uint8)}
    for codes in ("sq8", "pca"):  # (a one-layer index said to hold principal components loads: it has no axes)
        crafted = saved({**one_arrays, **twin}, {**one_meta, "codes": codes, "fastscan": True})
        with pytest.raises(InvalidSaveError, match=r"changed\.safetensors has 4-bit codes, which an index of "
                                                   f"'{codes}' codes and 'l2' scores never gets"):
            indexes.load_index(one, paths["one.faiss"], crafted)
    # the twin's arrays with any values load and are searched: the ids come from the 8-bit index's checked lists
    noisy = dict(arrays)
    rng = np.random.default_rng(0)
    noisy["fastscan/codes"] = rng.integers(0, 256, arrays["fastscan/codes"].shape, dtype=np.uint8)
    noisy["fastscan/centroids"] = np.float32(3e38) * np.sign(rng.standard_normal(arrays["fastscan/centroids"].shape,
                                                                                 dtype=np.float32))
    odd = indexes.load_index(train, paths["faiss"], saved(noisy, meta))
    ids = odd.search(queries, 10, ws[0])[0]
    assert ((ids >= 0) & (ids < approx.n)).all()


# a disk store's index is mapped from an unnamed file once built (keep_on_disk): its 4-bit twin follows it to the
# mapped lists (it held the index it was built on, whose quantizer the mapped one replaces), reads their 8-bit codes
# in the mapping, and answers the same as with the codes copied by row id before
def test_four_bit_twin_follows_its_index_onto_disk(tmp_path):
    from actclust.analysis import indexes

    both = _clustered_vectors(6100, widths=(48, 160, 400), n_clusters=40, seed=4)
    train = {l: v[:6000] for l, v in both.items()}
    queries = {l: v[6000:] for l, v in both.items()}
    approx = ApproximateIndex(train, layer_stats(train), random_state=0)
    w = layer_weights("low", list(train))
    before = approx.search(queries, 10, w)
    built = approx.index
    indexes.keep_on_disk(approx, tmp_path)
    assert approx.index is not built and approx.fast.ivf is approx.index and approx.source is not None
    del built
    after = approx.search(queries, 10, w)
    assert not approx.fast._code_rows()[0].flags.owndata  # the 8-bit codes read where the file is mapped, not copied
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


# a saved index is read by faiss: a crafted one is refused before any search, never searched (issue 17's threat: a
# run someone sends). Lists in faiss' on-disk format were left unmapped by read_index's mmap flag, and the first
# search read memory at addresses the file chose (a segmentation fault in the CLI); ids out of range wrapped to
# other rows; damaged files gave faiss' raw RuntimeError at the first search
def test_crafted_index_files_refused(tmp_path):
    import faiss
    from actclust.analysis import indexes
    from actclust.exceptions import InvalidSaveError

    train = {"layer2": _clustered_vectors(3000)["layer2"]}
    approx = ApproximateIndex(train, layer_stats(train), random_state=0)
    paths = _written(approx, "l0", tmp_path)
    good = paths["faiss"].read_bytes()
    indexes.load_index(train, paths["faiss"], paths["safetensors"])  # as written: loads

    def refused(data: bytes, message: str):
        paths["faiss"].write_bytes(data)
        with pytest.raises(InvalidSaveError, match=r"saved search index .*index_l0-0\.faiss " + message):
            indexes.load_index(train, paths["faiss"], paths["safetensors"])

    def edited(change) -> bytes:
        index = faiss.deserialize_index(np.frombuffer(good, np.uint8))
        change(index)
        return faiss.serialize_index(index).tobytes()

    def on_disk(index):  # the same rows in faiss' on-disk list format, their data in a file outside the run
        lists = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(tmp_path / "outside.ivfdata"))
        for i in range(index.nlist):
            if index.invlists.list_size(i):
                lists.add_entries(i, index.invlists.list_size(i), index.invlists.get_ids(i), index.invlists.get_codes(i))
        index.replace_invlists(lists, True)
        lists.this.disown()

    refused(edited(on_disk), r"is not one actclust writes: its lists are not stored in it")
    first = next(i for i in range(approx.nlist) if approx.index.invlists.list_size(i) >= 2)
    second = int(faiss.rev_swig_ptr(approx.index.invlists.get_ids(first), 2)[1])

    def set_id(new_id):
        def change(index):
            code = faiss.rev_swig_ptr(index.invlists.get_codes(first), index.code_size).copy()
            index.invlists.update_entry(first, 0, new_id, faiss.swig_ptr(code))
        return change

    for bad_id in (-7, 3000, second):  # before the rows, after them, a row twice (and one missing)
        refused(edited(set_id(bad_id)), r"is not one actclust writes: its lists do not hold each of the run's rows "
                                        r"exactly once")
    flat = faiss.IndexFlatL2(approx.d)
    flat.add(np.zeros((3000, approx.d), np.float32))
    refused(faiss.serialize_index(flat).tobytes(), r"is not one actclust writes: a IndexFlatL2, not the IndexIVFFlat")
    # a size field larger than the file: faiss allocated what it said before reading (2 GiB from 162 bytes: an outside
    # check); refused before faiss reads it
    at = good.index(b"IxF2") + 37  # the centres' count of floats, after the quantizer's header
    assert int.from_bytes(good[at:at + 8], "little") == approx.nlist * approx.d
    refused(good[:at] + (1 << 35).to_bytes(8, "little") + good[at + 8:], r"says 34359738368 values follow, where \d+ "
                                                                           r"bytes are left in it: it is damaged or crafted")
    refused(good[:len(good) // 2], r"is not a faiss index faiss can read: ")
    refused(b"IwFl" + bytes(range(256)) * 8, r"is not a faiss index faiss can read: ")
    paths["faiss"].write_bytes(good)
    assert indexes.load_index(train, paths["faiss"], paths["safetensors"]).search(
        {"layer2": train["layer2"][:5]}, 3, np.ones(1))[0][:, 0].tolist() == [0, 1, 2, 3, 4]

    # its parameters file damaged (an outside check: safetensors', JSON's and Python's own errors at the first search)
    import struct

    params = paths["safetensors"].read_bytes()

    def header(meta: str) -> bytes:
        h = json.dumps({"__metadata__": {"actclust": meta}}).encode()
        return struct.pack("<Q", len(h)) + h

    for data, said in ((b"\xff" * 64, "SafetensorError"), (header("[1, 2]"), "its metadata is a list"),
                       (header("{"), "JSONDecodeError"), (header("[" * 100000), "RecursionError")):
        paths["safetensors"].write_bytes(data)
        with pytest.raises(InvalidSaveError, match=r"saved search index .*index_l0-0\.safetensors is damaged: " + said):
            indexes.load_index(train, paths["faiss"], paths["safetensors"])
    paths["safetensors"].write_bytes(params)


# a layer wider than _EIGH_WIDTH (a flattened map passed through whole) gets its axes by randomized SVD of a
# bounded sample, not from a width x width covariance: they capture as much variance as the leading
# eigenvectors do, the search keeps its recall, and with fewer rows than axes the axes are completed
def test_principal_axes_of_very_wide_layers_by_randomized_svd(monkeypatch):
    from actclust.analysis import indexes

    monkeypatch.setattr(indexes, "_EIGH_WIDTH", 128)  # layers 1 and 2 (160, 400 values) take the SVD path
    monkeypatch.setattr(indexes, "_PCA_FLOATS", 400 * 3000)  # layer 2: a sample of 3,000 of the 6,000 rows
    both = _clustered_vectors(6100, widths=(48, 160, 400), n_clusters=40)
    train = {l: v[:6000] for l, v in both.items()}
    queries = {l: v[6000:] for l, v in both.items()}
    stats = layer_stats(train)
    approx = ApproximateIndex(train, stats, random_state=0)
    assert approx.codes == "pca" and sorted(approx.bases) == ["layer1", "layer2"]
    for l in ("layer1", "layer2"):
        centred = train[l].astype(np.float64) - train[l].mean(0)
        top = np.linalg.eigvalsh(centred.T @ centred)[::-1][:indexes.PCA_DIMS].sum()  # the best 64 axes can do
        b = approx.bases[l].astype(np.float64)
        assert np.allclose(b @ b.T, np.eye(indexes.PCA_DIMS), atol=1e-5)
        # (layer 2's axes come from half the rows: 98% of the optimum; 64 random axes would hold about 31%)
        assert ((centred @ b.T) ** 2).sum() >= 0.97 * top
    w = layer_weights("low", list(train))
    truth = Index(train, stats).search(queries, 10, w)[0]
    found = approx.search(queries, 10, w)[0]
    assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(found, truth)]) >= 0.95

    few = {l: v[:40] for l, v in train.items()}  # 40 rows: fewer than the 64 axes
    tiny = ApproximateIndex(few, layer_stats(few), random_state=0, codes="pca")
    for b in tiny.bases.values():
        assert b.shape[0] == indexes.PCA_DIMS and np.allclose(b @ b.T, np.eye(indexes.PCA_DIMS), atol=1e-5)


# Rows whose principal components keep little of their distances (a flat spectrum, no clusters): the approximate
# index falls short of recall@10 0.97 however many lists it probes. search="auto" then searches exactly (the
# exact answers) and says so once; search="approximate" keeps its own answers and says they are approximate.
@pytest.mark.slow
def test_auto_searches_exactly_where_the_approximate_index_falls_short():
    import warnings

    import torch

    from actclust import ActivationClustering, SearchWarning
    from actclust.analysis import retrieval

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 400), torch.nn.Linear(400, 300), torch.nn.Linear(300, 3)).eval()
    for layer in model[:2]:  # isotropic inputs stay isotropic: every direction counts as much
        torch.nn.init.orthogonal_(layer.weight)
    x = np.random.default_rng(0).standard_normal((5100, 600)).astype(np.float32)
    ac = ActivationClustering(model, ["0", "1"], progress=False).fit(x[:5000])
    exact = ac.similar(x[5000:], k=10, search="exact")
    with pytest.warns(SearchWarning, match=r"The approximate index of similar-sample search reaches recall@10 0\.\d+ "
                                           r"at most on this data \(target 0.97, pca codes of 136 values\): "
                                           r"searching exactly instead\.") as record:
        auto = ac.similar(x[5000:], k=10)
    assert len([w for w in record if issubclass(w.category, SearchWarning)]) == 1
    assert np.array_equal(auto.indices, exact.indices) and np.allclose(auto.distances, exact.distances)
    index = ac.state_.cache["retrieval"]["retrieval", "approximate", "host"]
    assert index.codes == "pca" and max(index.recall.values()) < 0.9  # calibrated to every list, and short
    with warnings.catch_warnings():
        warnings.simplefilter("error", SearchWarning)  # said once per index and weighting
        ac.similar(x[5000:], k=10)
    with pytest.warns(SearchWarning, match=r"recall@10 0\.\d+ at most .*: its neighbours are approximate; "
                                           r"search='exact' \(or 'auto'\) finds the exact ones\."):
        approx = ac.similar(x[5000:], k=10, weights="high", search="approximate")
    truth = ac.similar(x[5000:], k=10, weights="high", search="exact").indices
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.indices, truth)]) < 0.97
    assert retrieval.resolve_search("auto", 5000, 700) == "approximate"  # the fallback is the calibration's, not the size's


# search="auto" searches exactly where the approximate index reaches its target only by probing most of its lists
# of whole-row codes (a layer without structure the lists follow): the exact neighbours; a layer the lists do
# follow keeps its approximate index; "approximate" keeps it either way
def test_auto_searches_exactly_where_most_lists_are_probed():
    import torch

    from actclust import ActivationClustering
    from actclust.analysis import indexes, retrieval

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 3)).eval()
    torch.nn.init.orthogonal_(model[0].weight)  # isotropic inputs stay isotropic: 256 directions alike
    x = np.random.default_rng(0).standard_normal((3100, 64)).astype(np.float32)
    ac = ActivationClustering(model, ["0", "1"], progress=False).fit(x[:3000])
    st, q = ac.state_, ac.query(x[3000:], vectors=True)
    wide, narrow = (retrieval._index(st, "approximate", space=l) for l in ("0", "1"))
    assert wide.codes == narrow.codes == "flat"
    assert wide.scans_most([np.ones(1)], False) and not narrow.scans_most([np.ones(1)], False)
    assert wide._settings(np.ones(1))[0] >= indexes.EXACT_SHARE * wide.nlist
    for layer, approximate in (("0", False), ("1", True)):
        auto = retrieval.layer_neighbours(st, layer, q.vectors[layer], 10)
        exact = retrieval.layer_neighbours(st, layer, q.vectors[layer], 10, method="exact")
        forced = retrieval.layer_neighbours(st, layer, q.vectors[layer], 10, method="approximate")
        assert np.array_equal(auto[0], forced[0] if approximate else exact[0])
        if not approximate:  # (so that the check above tells the two apart)
            assert not np.array_equal(forced[0], exact[0])


# Calibration stops early where no setting can reach the target: once the fewest candidates fall short, one search
# with the most candidates from every list settles it; short there too, it stops at that setting (where trying
# every other number of candidates would end), with that setting's recall, checked here against exact search.
# Where that setting does reach the target, calibration goes on through the other numbers of candidates; where the
# fewest candidates needed few lists, there is no such search (it would cost more than the rest).
def test_calibration_stops_early_where_no_setting_reaches_the_target(monkeypatch):
    from actclust.analysis import indexes

    rng = np.random.default_rng(0)
    train = {l: rng.standard_normal((3000, d)).astype(np.float32) for l, d in (("a", 600), ("b", 600))}  # no structure
    stats = layer_stats(train)
    w = layer_weights("equal", list(train))
    key = indexes._key(w)

    def calibrate(target):
        monkeypatch.setattr(indexes, "TARGET_RECALL", target)
        approx = ApproximateIndex(train, stats, random_state=0, codes="pca")
        tried = []
        real = approx._recall_at
        monkeypatch.setattr(approx, "_recall_at", lambda k_, nprobe, rerank, *a, **kw:
                            tried.append((nprobe, rerank)) or real(k_, nprobe, rerank, *a, **kw))
        return approx, approx._settings(w), tried

    approx, settings, tried = calibrate(0.97)
    top = (approx.nlist, indexes._RERANKS[-1])
    assert settings == top and tried[-1] == top
    assert {r for _, r in tried[:-1]} == {indexes._RERANKS[0]}  # no other number of candidates tried
    assert max(p for p, _ in tried[:-1]) * indexes._SPREAD >= approx.nlist  # the fewest needed many lists
    recall = approx.recall[key]
    held = {l: v[approx.held] for l, v in train.items()}  # the calibration rows, each finding itself too
    found = approx.search(held, 11, w)[0]
    truth = Index(train, stats).search(held, 11, w)[0]
    expected = np.mean([len((set(a) - {o}) & (set(t) - {o})) / len(set(t) - {o})
                        for a, t, o in zip(found, truth, approx.held)])
    assert 0.3 < recall < 0.97 and recall == pytest.approx(expected, abs=1e-12)

    # where the fewest candidates fell short from few of the lists, no such search: every number of candidates tried
    monkeypatch.setattr(indexes, "_SPREAD", 0.5)  # as if every list were too few
    approx, settings, tried = calibrate(0.97)
    assert settings == top and {r for _, r in tried} == set(indexes._RERANKS) and approx.recall[key] == recall
    monkeypatch.setattr(indexes, "_SPREAD", 4)

    # a target the most candidates from every list reach: calibration tries the other numbers of candidates
    approx, settings, tried = calibrate(recall - 0.02)
    assert tried.index(top) < len(tried) - 1 and {r for _, r in tried} - {2, 64}
    assert approx.recall[key] >= recall - 0.02


# Calibration's bound: the share of the calibration queries' exact neighbours in the first p lists they probe (here
# found independently, by a faiss search returning every row of those lists) bounds the recall of any search of p
# lists, whatever its candidates; calibration starts each number of candidates at the fewest lists the bound allows,
# and ends at the same settings as when it starts from one list, in fewer trial searches.
@pytest.mark.parametrize("codes", ["flat", "sq8"])
def test_calibration_starts_at_the_lists_that_can_hold_the_neighbours(codes, monkeypatch):
    import faiss

    from actclust.analysis import indexes

    train = _clustered_vectors(12000)
    stats = layer_stats(train)
    ws = [layer_weights(p, list(train)) for p in ("low", "high", "equal")]

    def calibrated(bound: bool):
        approx = ApproximateIndex(train, stats, random_state=0, codes=codes)
        if not bound:
            monkeypatch.setattr(approx, "_coverage", lambda *a, **k: None)
        tried = []
        real = approx._recall_at
        monkeypatch.setattr(approx, "_recall_at", lambda key, nprobe, rerank, *a, **kw:
                            tried.append((nprobe, rerank)) or real(key, nprobe, rerank, *a, **kw))
        return approx, [approx._settings(w) for w in ws] + [approx._settings(ws[:2])], tried

    approx, settings, tried = calibrated(True)
    _, before, tried_before = calibrated(False)
    assert settings == before and len(tried) < len(tried_before)

    held = {l: v[approx.held] for l, v in train.items()}
    own = approx.held[:, None]
    w = ws[0]
    truth = Index(train, stats).search(held, 11, w)[0]
    cover = approx._coverage(held, [w], [truth], False)
    for nprobe in (1, 2, 4, 8):
        # every row of the first nprobe lists: faiss' own search of them, asked for more rows than they hold
        _, rows = approx.index.search(approx._index_query(held, w), 2000, params=faiss.SearchParametersIVF(nprobe=nprobe))
        assert (rows < 0).any(1).all()  # none cut off: each query's lists hold fewer than 2,000 rows
        inside = np.mean([len((set(r) & set(t)) - {o}) / len(set(t) - {o}) for r, t, o in zip(rows, truth, own[:, 0])])
        assert cover[nprobe] == pytest.approx(inside, abs=1e-9)
        for rerank in ((1,) if codes == "flat" else (2, 16)):
            approx.settings[indexes._key(w)] = (nprobe, rerank)
            found = approx.search(held, 11, w)[0]
            recall = np.mean([len((set(f) & set(t)) - {o}) / len(set(t) - {o}) for f, t, o in zip(found, truth, own[:, 0])])
            # (a search probes at least enough lists for _DEEP_ROWS times its candidates)
            probed = max(nprobe, int(np.ceil(indexes._DEEP_ROWS * approx._n_reranked(11, rerank) * approx.nlist / approx.n)))
            assert recall <= cover[probed] + 1e-9


# the exact search reads wide rows fewer at a time (at most CHUNK_FLOATS values a chunk): the same neighbours,
# distances and layer shares as in one chunk, and memory that follows the chunk, not the training set
def test_exact_search_of_wide_rows_in_bounded_chunks(monkeypatch):
    import tracemalloc

    from actclust.store import vectors

    rng = np.random.default_rng(0)
    train = {"a": rng.standard_normal((3000, 3000)).astype(np.float32),
             "b": rng.standard_normal((3000, 40)).astype(np.float32)}
    queries = {l: v[:10] + 0.05 * rng.standard_normal(v[:10].shape).astype(np.float32) for l, v in train.items()}
    stats, w = layer_stats(train), layer_weights("low", ["a", "b"])
    store_bytes = sum(v.nbytes for v in train.values())

    def search():
        tracemalloc.start()
        try:
            found = Index(train, stats).search(queries, 10, w)
            return found, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    (idx, dist, shares), whole_peak = search()  # 3,000 rows of 3,040 values: one chunk
    assert np.array_equal(idx[:, 0], np.arange(10))
    monkeypatch.setattr(vectors, "CHUNK_FLOATS", 1 << 18)  # 86 rows a chunk
    (idx2, dist2, shares2), chunked_peak = search()
    assert np.array_equal(idx2, idx) and np.allclose(dist2, dist, rtol=1e-5) and np.allclose(shares2, shares, atol=1e-5)
    assert whole_peak > store_bytes and chunked_peak < store_bytes / 4, (whole_peak / 2**20, chunked_peak / 2**20)


# a wide layer searched alone (trust) trains its lists on at most _TRAIN_FLOATS values, not 39 rows per list
# whatever their width (4,096 values at 1M rows: 4 GiB), and still finds its neighbours
def test_lists_of_wide_rows_trained_on_bounded_values(monkeypatch):
    from actclust.analysis import indexes

    seen = []
    real = indexes.ApproximateIndex._centres
    monkeypatch.setattr(indexes.ApproximateIndex, "_centres", lambda self, x: seen.append(x.shape) or real(self, x))
    monkeypatch.setattr(indexes, "_TRAIN_FLOATS", 1 << 21)
    both = {"wide": _clustered_vectors(12300, widths=(1024,), n_clusters=40)["layer0"]}
    train, queries = {"wide": both["wide"][:12000]}, {"wide": both["wide"][12000:]}
    stats = layer_stats(train)
    approx = ApproximateIndex(train, stats, random_state=0)
    assert approx.codes == "flat" and approx.nlist == 307 and seen == [(2048, 1024)]  # not 12,000 rows
    truth = Index(train, stats).search(queries, 10, np.ones(1))[0]
    found = approx.search(queries, 10, np.ones(1))[0]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]) >= 0.95


# a disk store's approximate indexes live beside it: built, written to an unnamed temporary file in the store's
# folder (no name appears there) and mapped from it, with the same answers as in memory; saved and loaded as before;
# where the file cannot be made, the index stays in memory and answers the same
def test_disk_store_indexes_are_mapped_from_unnamed_files(model, data, tmp_path, monkeypatch):
    import tempfile

    import actclust
    from actclust.analysis import indexes

    x, y = data

    def fitted_with(store):
        ac = actclust.ActivationClustering(model, ["conv", "fc1"], n_clusters=4, progress=False, store=store,
                                           search="approximate")
        return ac.fit(x, y)

    def approximate(ac):
        return ac.state_.cache["retrieval"]["retrieval", "approximate", "host"]

    in_memory = fitted_with(None)
    want = in_memory.similar(x[:10], k=4, weights="low").indices
    assert getattr(approximate(in_memory), "source", None) is None

    store = tmp_path / "store"
    on_disk = fitted_with(store)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    assert np.array_equal(on_disk.similar(x[:10], k=4, weights="low").indices, want)
    index = approximate(on_disk)
    assert isinstance(index.source, indexes.SavedFile)
    assert os.path.samefile(index.source.reading(), index.source.reading())  # open, unnamed
    assert os.fstat(index.source.fd).st_nlink == 0
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    on_disk.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", model, progress=False)
    assert np.array_equal(loaded.similar(x[:10], k=4, weights="low").indices, want)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    real = tempfile.TemporaryFile

    class Full:  # a disk that fills while the index is written
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def fileno(self):
            return self.file.fileno()

        def write(self, b):
            raise OSError(28, "No space left on device")

        def close(self):
            self.file.close()

    class FullOnFlush(Full):  # the writes buffered, the disk full at the flush, and again at the close that flushes
        def write(self, b):
            return len(b)

        def flush(self):
            raise OSError(28, "No space left on device")

        def close(self):
            self.file.close()
            raise OSError(28, "No space left on device")  # it escaped the handler: trust() failed (an outside check)

    for fails in (refused, Full, FullOnFlush):
        monkeypatch.setattr(tempfile, "TemporaryFile", fails)
        kept = fitted_with(tmp_path / f"store-{fails.__name__}")
        assert np.array_equal(kept.similar(x[:10], k=4, weights="low").indices, want)
        assert getattr(approximate(kept), "source", None) is None


# an index's lists are sized once, before any row is added, for exactly the rows each then holds (appended a block at
# a time, their storage grew by doubling: 40% over the rows); for whole-row and principal-component codes alike
@pytest.mark.parametrize("widths", [(16, 32, 64), (48, 160, 400)])
def test_lists_sized_once_for_their_rows(monkeypatch, widths):
    from actclust.analysis import indexes

    seen = []
    real = indexes._reserve
    monkeypatch.setattr(indexes, "_reserve", lambda index, sizes: seen.append(sizes.copy()) or real(index, sizes))
    train = {l: v[:6000] for l, v in _clustered_vectors(6000, widths=widths, n_clusters=30).items()}
    approx = ApproximateIndex(train, layer_stats(train), random_state=0)
    lists = faiss_lists(approx)
    assert len(seen) == 1 and seen[0].sum() == 6000
    assert np.array_equal(seen[0], [lists.list_size(i) for i in range(approx.nlist)])
    one = ApproximateIndex({"layer1": train["layer1"]}, layer_stats({"layer1": train["layer1"]}), random_state=0)
    assert np.array_equal(seen[1], [faiss_lists(one).list_size(i) for i in range(one.nlist)])


def faiss_lists(approx):
    import faiss

    return faiss.downcast_InvertedLists(approx.index.invlists)
