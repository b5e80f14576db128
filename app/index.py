"""The FAISS gallery index: a small interface over a CPU ``IndexIDMap2`` (the master copy), with an
optional GPU copy for search. Every call is made under one lock by the caller (``Gallery``)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

# STAND-IN: replaced by the gallery branch (its GPU k cap).
# GPU FAISS answers at most this many neighbours per query (faiss/gpu/utils/DeviceDefs.cuh, GPU_MAX_SELECTION_K).
GPU_MAX_K = 2048


def bounded_k(k: int, size: int, gpu: bool) -> int:
    """The k a search may ask for: at most the index's size, and on a GPU at most GPU_MAX_K (asking more is an
    error there, which the service would answer as a 500)."""
    k = min(int(k), size)
    return min(k, GPU_MAX_K) if gpu else k


class VectorIndex:
    """add / remove / search by int64 id; distances are FAISS's squared L2."""

    def __init__(self, dim: int, factory: str = "Flat", use_gpu: bool = False) -> None:
        self.dim = dim
        self.factory = factory
        self.index = faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss.METRIC_L2))
        self.use_gpu = use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self._gpu: faiss.Index | None = None
        self._gpu_res = faiss.StandardGpuResources() if self.use_gpu else None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def _train_if_needed(self, vectors: np.ndarray) -> None:
        if not self.index.is_trained:
            # IVF etc.: train on what we have (needs at least as many vectors as lists).
            self.index.train(vectors)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        self._train_if_needed(vectors)
        self.index.add_with_ids(vectors, ids)
        self._gpu = None

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        removed = int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
        self._gpu = None
        return removed

    def reconstruct(self, entry_id: int) -> np.ndarray:
        return self.index.reconstruct(int(entry_id))

    def _searcher(self) -> faiss.Index:
        if not self.use_gpu:
            return self.index
        if self._gpu is None:
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
        return self._gpu

    # STAND-IN: replaced by the gallery branch (filtered search with an IDSelector, the GPU k bound).
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, ids), each (n, k'), k' = ``bounded_k(k)``; missing slots are id -1.

        ``allowed``: only these ids may be answered, filtered inside FAISS by an ``IDSelectorBatch`` (one pass,
        no widening). Filtered searches run on the CPU master copy: GPU indexes take no selector."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = bounded_k(k, len(self), self.use_gpu) if allowed is None else min(int(k), len(allowed), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.full((len(queries), 0), -1, np.int64)
        if allowed is None:
            return self._searcher().search(queries, k)
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        return self.index.search(queries, k, params=self._params(selector))

    def _params(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        """Search parameters carrying ``selector`` and the index's own search-time settings (a bare
        SearchParameters would reset an IVF's nprobe or an HNSW's efSearch to FAISS's defaults)."""
        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
        if isinstance(inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
        return faiss.SearchParameters(sel=selector)

    def save(self, path: Path) -> None:
        """Atomically: write a temporary file beside ``path``, then ``os.replace``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path, dim: int, factory: str = "Flat", use_gpu: bool = False) -> VectorIndex:
        """Read an index file; raises ValueError when it is unreadable or of another dimension."""
        try:
            loaded = faiss.read_index(str(path))
        except Exception as exc:  # FAISS raises RuntimeError for corrupt files
            raise ValueError(f"index file {path} is unreadable: {exc}") from exc
        if loaded.d != dim or not isinstance(loaded, faiss.IndexIDMap2):
            raise ValueError(f"index file {path} has dimension {loaded.d} / type {type(loaded).__name__}")
        out = cls(dim, factory, use_gpu)
        out.index = loaded
        return out
