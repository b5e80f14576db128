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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, ids), each (n, k'), k' = min(k, len); missing slots are id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        distances, ids = self._searcher().search(queries, k)
        return distances, ids

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
