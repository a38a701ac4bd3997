"""Where the training vectors live (memory or a memory-mapped directory) and how they are read."""

from .vectors import (CHUNK, CHUNK_FLOATS, MANIFEST, STORE_DTYPES, Collector, StoreWriter, VectorStore, check_store,
                      chunk_rows, clean_store, estimate, generations, iter_rows, release, runs, take)

__all__ = ["VectorStore", "StoreWriter", "Collector", "STORE_DTYPES", "MANIFEST", "estimate", "check_store",
           "iter_rows", "take", "release", "runs", "clean_store", "generations", "chunk_rows", "CHUNK", "CHUNK_FLOATS"]
