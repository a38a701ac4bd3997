"""A cheaper first pass over the approximate index's lists: 4-bit codes scanned by faiss' fast-scan, their best
candidates scored again by the index's own 8-bit codes.

An :class:`~actclust.analysis.indexes.ApproximateIndex` of principal-component codes (``"pca"``) scans the rows of
the lists a query probes: 8-bit codes, one byte per value. At 1M training rows the "low" weighting probes about
4x the lists it probes at 100k, and that scan grew to most of a query's time. :class:`FastScan` holds every row a
second time over the **same lists**, as a product-quantised code of one 4-bit value per column of the residual
from its list's centre (faiss ``IndexIVFPQFastScan``: half the bytes, scored by SIMD table lookups). A search
keeps :data:`SHORTLIST` times the candidates asked for by those scores, then scores them again exactly as the
8-bit scan would (the 8-bit codes of those rows, gathered by id) and keeps the best: the same candidates as the
8-bit scan but for the few the 4-bit scores rank too low. Measured on ``benchmarks/search_scale.py``'s data
(1M rows of 1,792 values, 1,000 queries, a ``/tmp`` script): the 8-bit scan of "low"'s 340 lists took 0.55 s,
the 4-bit scan 0.14 s and the second scoring 0.05 s.

Where a search leaves rows out (a faiss selector), the index scans its 8-bit codes as before.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["FastScan", "fits", "SHORTLIST", "NBITS"]

#: A search keeps this many times the candidates it asks for by the 4-bit scores, then scores those again by the
#: 8-bit codes. On ``benchmarks/search_scale.py``'s data, the 4-bit scan's best 4x held 93-99% of the 8-bit
#: scan's candidates (the "high" weighting at 1M rows the fewest), its best 8x 99.7-100%.
SHORTLIST = 8
#: Bits per code value (faiss' fast-scan takes 4).
NBITS = 4
_CHUNK = 256  # queries whose shortlisted rows are scored again at once
_SHORTLIST_ROWS = 1 << 23  # shortlisted rows held at once, over the queries (12 bytes each: 96 MiB)


def fits(ivf) -> bool:
    """Whether ``ivf`` is an index :class:`FastScan` can be the twin of: inner products, 8-bit codes (faiss'
    ``QT_8bit``: a range per column) of residuals from the lists' centres, whose scores :meth:`FastScan.search`
    computes again."""
    import faiss

    ivf = faiss.downcast_index(ivf)
    return isinstance(ivf, faiss.IndexIVFScalarQuantizer) and ivf.metric_type == faiss.METRIC_INNER_PRODUCT \
        and ivf.by_residual and ivf.sq.qtype == faiss.ScalarQuantizer.QT_8bit and ivf.sq.trained.size() == 2 * ivf.d \
        and ivf.code_size == ivf.d


class FastScan:
    """4-bit fast-scan codes of the rows of ``ivf`` (a faiss ``IndexIVFScalarQuantizer`` of 8-bit codes of
    residuals, inner product) over its lists; :meth:`search` gives what ``ivf``'s own search of the same lists
    would, but for the candidates the 4-bit scores rank below the shortlist.

    Built with the index (:meth:`build`: train, :meth:`add` each block of rows as the index adds it,
    :meth:`finish`), or read back from a saved run (:meth:`from_arrays`, the arrays of :meth:`arrays`)."""

    def __init__(self, ivf, lists_of):
        self.ivf = ivf
        self.lists_of = lists_of  # () -> (n,) each row's list, read from ivf's lists (ApproximateIndex._row_lists)
        self.index = None  # faiss IndexIVFPQFastScan, once finished
        self._building = None
        self._rows = None  # where each row's 8-bit code lies (_code_rows), found at the first search

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, ivf, residuals: np.ndarray, lists_of) -> "FastScan":
        """A fast-scan twin of ``ivf`` (its lists filled by :meth:`add`), its codes trained on ``residuals``:
        training rows minus their list's centre row."""
        import faiss

        out = cls(ivf, lists_of)
        pq = faiss.IndexIVFPQ(ivf.quantizer, ivf.d, ivf.nlist, ivf.d, NBITS, ivf.metric_type)
        pq.by_residual = True
        pq.pq.train(np.ascontiguousarray(residuals, dtype=np.float32))
        pq.is_trained = True
        out._building = pq
        return out

    def add(self, rows: np.ndarray, lists: np.ndarray, start: int) -> None:
        """Encode ``rows`` (ids ``start`` on) into the lists ``lists`` (the same as the 8-bit index's)."""
        import faiss

        rows = np.ascontiguousarray(rows, dtype=np.float32)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        ids = np.arange(start, start + len(rows), dtype=np.int64)
        self._building.add_core(len(rows), faiss.swig_ptr(rows), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    def finish(self, ivf) -> None:
        """Convert the lists to fast-scan blocks, once ``ivf`` (the 8-bit index, its final quantizer) holds every row."""
        pq, self._building = self._building, None
        pq.quantizer = ivf.quantizer
        self.index = _packed(pq)
        self.rebind(ivf)

    def rebind(self, ivf) -> None:
        """Follow the 8-bit index to ``ivf``, the same lists read from elsewhere (mapped from a file)."""
        self.ivf = ivf
        self._rows = None  # (a view of the former index's lists: never read again)
        self.index.quantizer = ivf.quantizer  # the same centres (the twin reads none: its lists are given)
        self.index.parallel_mode = ivf.parallel_mode

    # ------------------------------------------------------------------ saved with a run
    def arrays(self) -> dict:
        """``centroids`` (the 4-bit codes' values) and ``codes`` (each row's code, by row id) to save."""
        import faiss

        index, n = self.index, self.index.ntotal
        packer = index.get_CodePacker()
        codes = np.zeros((n, index.code_size), np.uint8)
        block, per = packer.block_size, packer.nvec
        invlists = index.invlists
        for j in range(index.nlist):
            size = invlists.list_size(j)
            if not size:
                continue
            ids = faiss.rev_swig_ptr(invlists.get_ids(j), size).copy()
            blocks = -(-size // per)
            packed = faiss.rev_swig_ptr(invlists.get_codes(j), blocks * block).copy()
            flat = np.empty((blocks * per, index.code_size), np.uint8)
            for b in range(blocks):
                packer.unpack_all(faiss.swig_ptr(packed[b * block:]), faiss.swig_ptr(flat[b * per:]))
            codes[ids] = flat[:size]
        return {"centroids": faiss.vector_to_array(index.pq.centroids).astype(np.float32), "codes": codes}

    @classmethod
    def from_arrays(cls, ivf, centroids: np.ndarray, codes: np.ndarray, lists_of) -> Optional["FastScan"]:
        """The twin of ``ivf`` saved by :meth:`arrays`, or None where the arrays do not fit it (checked by the
        caller, which refuses the run)."""
        import faiss

        d = ivf.d
        code_size = (d * NBITS + 7) // 8
        if not fits(ivf):
            return None
        if centroids.dtype != np.float32 or centroids.shape != (d * (1 << NBITS),) or not np.isfinite(centroids).all() \
                or codes.dtype != np.uint8 or codes.shape != (ivf.ntotal, code_size):
            return None
        out = cls(ivf, lists_of)
        pq = faiss.IndexIVFPQ(ivf.quantizer, d, ivf.nlist, d, NBITS, ivf.metric_type)
        pq.by_residual = True
        faiss.copy_array_to_vector(centroids, pq.pq.centroids)
        pq.is_trained = True
        # each row's code after its list number, as faiss' standalone codes are laid out; added to plain lists, then
        # packed in blocks (the fast-scan index's own add_sa_codes does not pack them: faiss 1.15)
        listno = lists_of().astype("<i8")  # little-endian, as faiss writes list numbers
        coarse = pq.coarse_code_size()
        sa = np.empty((len(codes), coarse + code_size), np.uint8)
        sa[:, :coarse] = listno.view(np.uint8).reshape(-1, 8)[:, :coarse]
        sa[:, coarse:] = codes
        pq.add_sa_codes(sa, np.arange(len(sa), dtype=np.int64))
        del sa
        index = _packed(pq)
        out.index = index
        out.rebind(ivf)
        return out

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, m: int, lists: np.ndarray, near: np.ndarray, params) -> tuple:
        """``(scores, ids)`` of the ``m`` best rows of each query among those of the lists ``lists`` (their
        centres' scores ``near``) by the 8-bit codes' scores, as ``ivf``'s search of those lists gives them;
        ``params``: faiss' search parameters (``nprobe``). Queries as the index holds them."""
        n = len(queries)
        wide = min(SHORTLIST * m, self.index.ntotal)
        step = max(1, _SHORTLIST_ROWS // wide)  # queries at once: their shortlists held in bounded memory
        if n <= step:
            return self._search(queries, m, wide, lists, near, params)
        parts = []
        for at in range(0, n, step):
            q, ls, ns = (np.ascontiguousarray(a[at:at + step]) for a in (queries, lists, near))
            parts.append(self._search(q, m, wide, ls, ns, params))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search(self, queries: np.ndarray, m: int, wide: int, lists: np.ndarray, near: np.ndarray, params) -> tuple:
        import faiss

        n = len(queries)
        scores, ids = np.empty((n, wide), np.float32), np.empty((n, wide), np.int64)
        self.index.search_preassigned_c(n, faiss.swig_ptr(queries), wide, faiss.swig_ptr(lists),
                                        faiss.swig_ptr(near), faiss.swig_ptr(scores), faiss.swig_ptr(ids), False,
                                        params)
        (rows, at), (vmin, vdiff) = self._code_rows(), self._ranges()
        base = vmin + vdiff * np.float32(0.5 / 255)
        out_s, out_i = np.empty((n, m), np.float32), np.full((n, m), -1, np.int64)
        row_lists = self.lists_of()
        nlist = self.ivf.nlist
        # Each shortlisted row's list's score, from the centres' scores ``near`` of the lists probed: a sorted
        # key (query, list) per probed list, found by one binary search for all.
        stride = nlist + 1  # (a list of -1, where a graph quantizer found fewer lists, keys as list nlist)
        keys = (np.arange(n, dtype=np.int64)[:, None] * stride + np.where(lists < 0, nlist, lists)).ravel()
        order = np.argsort(keys, kind="stable")
        keys, near_sorted = keys[order], near.ravel()[order]
        for a in range(0, n, _CHUNK):
            b = min(n, a + _CHUNK)
            i = ids[a:b]
            found = i >= 0
            safe = np.where(found, i, 0)
            q = queries[a:b]
            # 8-bit value c of a row's residual decodes to vmin + (c + 0.5) / 255 * vdiff
            s = np.einsum("bcd,bd->bc", rows[at[safe]], q * (vdiff / np.float32(255)))
            s += np.einsum("bd,d->b", q, base)[:, None]
            place = np.searchsorted(keys, np.arange(a, b, dtype=np.int64)[:, None] * stride + row_lists[safe])
            s += near_sorted[np.minimum(place, len(keys) - 1)]
            s[~found] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :m]
            out_s[a:b], out_i[a:b] = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        out_i[~np.isfinite(out_s)] = -1
        return out_s, out_i

    def _code_rows(self) -> tuple:
        """``(rows, at)``: ``rows[at[i]]`` is row ``i``'s 8-bit code. Where ``ivf``'s lists are mapped from a file (a
        loaded run's, a disk store's: faiss' on-disk lists, checked at load to lie in that file), ``rows`` is a view of
        the mapping, one row starting at each byte, and ``at`` each code's place in it: nothing is copied (at 1M rows a
        copy took 200 MB of memory and 0.97 s at a loaded run's first call). Else the codes are copied by row id."""
        if self._rows is None:
            import faiss

            ivf, size = self.ivf, self.ivf.code_size
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            mapped = isinstance(lists, faiss.OnDiskInvertedLists) and int(lists.ptr) and lists.totsize >= size
            at = np.empty(ivf.ntotal, np.int64)
            if mapped:
                whole = faiss.rev_swig_ptr(lists.ptr, lists.totsize)
                rows = np.lib.stride_tricks.as_strided(whole, (lists.totsize - size + 1, size), (1, 1), writeable=False)
            else:
                rows = np.empty((ivf.ntotal, size), np.uint8)
            for j in range(ivf.nlist):
                m = lists.list_size(j)
                if not m:
                    continue
                ids_ptr = lists.get_ids(j)
                ids = faiss.rev_swig_ptr(ids_ptr, m)
                if mapped:  # a list's codes, then its ids, from its offset in the file
                    at[ids] = lists.lists.at(j).offset + np.arange(m, dtype=np.int64) * size
                else:
                    codes_ptr = lists.get_codes(j)
                    rows[ids] = faiss.rev_swig_ptr(codes_ptr, m * size).reshape(m, size)
                    at[ids] = ids
                    lists.release_codes(j, codes_ptr)
                lists.release_ids(j, ids_ptr)
            self._rows = (rows, at)
        return self._rows

    def _ranges(self) -> tuple:
        import faiss

        trained = faiss.vector_to_array(self.ivf.sq.trained)
        d = self.ivf.d
        return trained[:d].astype(np.float32), trained[d:2 * d].astype(np.float32)


def _packed(pq):
    """A fast-scan index of the plain 4-bit index ``pq``'s lists, packed in blocks; ``pq`` (its plain lists: n x
    (code + id) bytes) freed. faiss' wrapper kept it alive through the new index's references, and the new index kept
    a pointer to its lists (read only by faiss' other scan implementations and ``reconstruct_orig_invlists``): both
    dropped."""
    import faiss

    index = faiss.IndexIVFPQFastScan(pq)
    index.orig_invlists = None
    index.referenced_objects = []
    return index
