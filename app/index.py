"""The FAISS gallery index: a small interface (add / remove / search by int64 id, save / load) over three kinds
of index, each doing what it can and saying what it cannot.

- ``Flat``: exact search over an ``IndexIDMap2``; the default. ``SQ8`` (and ``,SQ8`` below): 8-bit scalar
  quantisation, 4x smaller, trained on ``SQ8_MIN_TRAIN`` vectors first (exact Flat until then).
- ``IVF<nlist>[,Flat|,SQ8]`` (``IVF`` alone: nlist sized from the data, 4 sqrt(n)): exact search until there are
  ``IVF_MIN_PER_LIST`` x nlist vectors to train on, then the caller rebuilds it trained (``needs_rebuild``); it
  asks again when the gallery has grown ``IVF_RETRAIN_GROWTH`` times past what it was trained on.
- ``HNSW<M>[,Flat|,SQ8]``: graph search on the CPU.

HNSW cannot remove, and a Flat (``IndexIDMap2``) removal compacts the whole array and rebuilds the id map, O(n):
so in both a deletion is a tombstone, excluded at search time by a FAISS ``IDSelector`` and compacted away by a
rebuild once ``COMPACT_FRACTION`` of the index is dead. IVF removes in place through its id hashtable.

Search parameters (nprobe, efSearch) and the filters' id selectors go through ``faiss.SearchParameters*`` on
each call (learned from txtai's FAISS backend: parameters set at search time, an exact fallback for small sets).
The caller (``Gallery``) serialises writes and lets searches run concurrently; a GPU copy is searched under
its own lock."""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from models.files import atomic_path

logger = logging.getLogger(__name__)

IVF_MIN_PER_LIST = 39  # FAISS warns below 39 training points per centroid
IVF_RETRAIN_GROWTH = 4  # retrain once the gallery is this many times what the lists were trained on
SQ8_MIN_TRAIN = 1000  # vectors SQ8 learns its per-dimension value ranges from
COMPACT_FRACTION = 0.1  # rebuild a Flat or HNSW index once this share of it is tombstones
GPU_MAX_K = 2048  # FAISS's GPU k-selection limit
FILE_MAGIC = b"REIDIDX1"
FACTORY_HELP = "choose Flat, SQ8, IVF<nlist>, IVF<nlist>,SQ8, IVF (nlist from the data), HNSW<M> or HNSW<M>,SQ8"
_FACTORY = re.compile(r"^(?:(?P<flat>Flat|SQ8)|IVF(?P<nlist>\d*)|HNSW(?P<m>\d+))(?:,(?P<storage>Flat|SQ8))?$")


@dataclass(frozen=True)
class IndexSpec:
    """A parsed REID_INDEX_FACTORY: the kind, how vectors are stored, and its size parameter."""

    kind: str  # "flat" | "ivf" | "hnsw"
    storage: str = "Flat"  # "Flat" (float32) | "SQ8" (8-bit scalar quantisation, 4x smaller)
    nlist: int | None = None  # IVF lists; None: sized from the data
    m: int = 32  # HNSW neighbours per node

    @classmethod
    def parse(cls, factory: str) -> IndexSpec:
        match = _FACTORY.match(factory.replace(" ", ""))
        if match is None:
            raise ValueError(f"unsupported index factory {factory!r}; {FACTORY_HELP}")
        if match["flat"] is not None:
            if match["storage"] is not None:
                raise ValueError(f"unsupported index factory {factory!r}; {FACTORY_HELP}")
            return cls("flat", match["flat"])
        storage = match["storage"] or "Flat"
        if match["m"] is not None:
            m = int(match["m"])
            if not 2 <= m <= 256:
                raise ValueError(f"HNSW M must be between 2 and 256, got {m}; e.g. HNSW32")
            return cls("hnsw", storage, m=m)
        nlist = int(match["nlist"]) if match["nlist"] else None
        if nlist is not None and nlist < 1:
            raise ValueError(f"IVF needs at least one list, got {factory!r}; e.g. IVF1024 or IVF (sized from the data)")
        return cls("ivf", storage, nlist=nlist)

    def lists_for(self, n: int) -> int:
        """IVF lists for a gallery of ``n`` vectors."""
        return self.nlist if self.nlist is not None else max(1, int(4 * math.sqrt(n)))

    @property
    def needs_training(self) -> bool:
        return self.kind == "ivf" or self.storage == "SQ8"

    def trainable(self, n: int) -> bool:
        """Enough vectors to train on: IVF_MIN_PER_LIST per list, or SQ8_MIN_TRAIN for SQ8's value ranges."""
        if self.kind == "ivf":
            return n >= max(IVF_MIN_PER_LIST * self.lists_for(n), SQ8_MIN_TRAIN if self.storage == "SQ8" else 1)
        return self.storage == "SQ8" and n >= SQ8_MIN_TRAIN

    def trained_factory(self, n: int) -> str:
        if self.kind == "ivf":
            return f"IVF{self.lists_for(n)},{self.storage}"
        if self.kind == "hnsw":
            return f"HNSW{self.m}" + ("" if self.storage == "Flat" else f"_{self.storage}")
        return self.storage


def validate(factory: str, nprobe: int, ef_search: int, use_gpu: bool) -> IndexSpec:
    """Refuse at start-up a combination that cannot work, saying what would."""
    spec = IndexSpec.parse(factory)
    if spec.kind == "ivf" and spec.nlist is not None and nprobe > spec.nlist:
        raise ValueError(
            f"REID_INDEX_NPROBE={nprobe} is more than the {spec.nlist} lists of {factory!r}; "
            f"set it to at most {spec.nlist} (e.g. {max(1, spec.nlist // 64)}), or use more lists"
        )
    if spec.kind == "hnsw" and use_gpu:
        raise ValueError(
            f"{factory!r} cannot run on a GPU (FAISS has no GPU HNSW); use Flat or IVF<nlist> on the GPU, "
            "or REID_DEVICE=cpu for HNSW"
        )
    if nprobe < 1 or ef_search < 1:
        raise ValueError("REID_INDEX_NPROBE and REID_INDEX_EF_SEARCH must be at least 1")
    return spec


def capped_k(k: int, on_gpu: bool) -> int:
    """The neighbours one search may ask for: FAISS's GPU k-selection stops at GPU_MAX_K."""
    return min(k, GPU_MAX_K) if on_gpu else k


def id_selector(ids: np.ndarray) -> tuple[faiss.IDSelector, Any]:
    """A selector that keeps exactly ``ids`` (int64, >= 0); (selector, buffer it reads, to be kept alive).

    A bitmap over 0..max id when ids are dense enough (one bit per id, O(1) per test), else FAISS's hash set."""
    if len(ids) == 0:
        return faiss.IDSelectorRange(0, 0), None
    top = int(ids.max()) + 1
    if top <= 64 * len(ids):
        flags = np.zeros(top, dtype=bool)
        flags[ids] = True
        bitmap = np.packbits(flags, bitorder="little")
        return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap  # n: bytes, not bits
    return faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)), None


def drop_ids(distances: np.ndarray, ids: np.ndarray, dead: set[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row of a search result without ``dead`` ids, nearest first, cut or -1 padded to ``k``."""
    if not dead:
        return distances[:, :k], ids[:, :k]
    keep = ~np.isin(ids, np.fromiter(dead, np.int64, len(dead))) & (ids >= 0)
    out_d = np.full((len(ids), k), np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for row in range(len(ids)):
        found = np.flatnonzero(keep[row])[:k]
        out_d[row, : len(found)], out_i[row, : len(found)] = distances[row, found], ids[row, found]
    return out_d, out_i


class VectorIndex:
    """add / remove / search by int64 id; distances are FAISS's squared L2."""

    def __init__(
        self, dim: int, factory: str = "Flat", use_gpu: bool = False, nprobe: int = 16, ef_search: int = 64
    ) -> None:
        self.dim = dim
        self.factory = factory
        self.spec = IndexSpec.parse(factory)
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.trained_on = 0  # IVF / SQ8: vectors it was trained on; 0 while searching exactly
        self.dead: set[int] = set()  # tombstones (Flat, HNSW): ids still in FAISS that no longer exist
        self._dead_selector: tuple[Any, ...] | None = None
        # What FAISS holds now: an index that must train starts as an exact Flat one.
        self.mode = "flat" if self.spec.needs_training else self.spec.kind
        self.index = self._make(self.spec.trained_factory(0) if self.mode == "hnsw" else "Flat")
        self.use_gpu = use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self.use_gpu = self.use_gpu and self.spec.kind != "hnsw"
        self._gpu: faiss.Index | None = None
        self._gpu_res = faiss.StandardGpuResources() if self.use_gpu else None
        self._gpu_lock = threading.Lock()

    def _make(self, factory: str) -> faiss.Index:
        index = faiss.index_factory(self.dim, factory, faiss.METRIC_L2)
        if isinstance(index, faiss.IndexIVF):
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove by id without scanning every list
            return index  # IVF keeps its own ids
        return faiss.IndexIDMap2(index)

    @property
    def description(self) -> str:
        if self.spec.needs_training and not self.trained_on:
            return f"{self.factory} (exact until it can train)"
        if self.mode == "ivf":
            return f"IVF{faiss.extract_index_ivf(self.index).nlist},{self.spec.storage} nprobe {self.nprobe}"
        if self.mode == "hnsw":
            return f"{self.factory} efSearch {self.ef_search}, {len(self.dead)} tombstones"
        return self.factory

    @property
    def ntotal(self) -> int:
        """Vectors FAISS holds, tombstones included."""
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal - len(self.dead)

    def ids(self) -> np.ndarray:
        """Every live id, unordered."""
        if self.ntotal == 0:
            return np.zeros(0, dtype=np.int64)
        if isinstance(self.index, faiss.IndexIDMap2):
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        else:
            invlists = faiss.extract_index_ivf(self.index).invlists
            ids = np.concatenate(
                [
                    faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                    for i in range(invlists.nlist)
                    if invlists.list_size(i)
                ]
            ).astype(np.int64)
        if self.dead:
            ids = ids[~np.isin(ids, np.fromiter(self.dead, np.int64, len(self.dead)))]
        return ids

    # -- writes -------------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        self.index.add_with_ids(vectors, ids)
        with self._gpu_lock:
            if self._gpu is not None:
                try:  # the GPU copy grows with the master instead of being copied whole again
                    self._gpu.add_with_ids(vectors, ids)
                except RuntimeError:
                    self._gpu = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``, which must be live (Flat, HNSW: tombstone them); the number removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        if self.mode != "ivf":  # Flat and HNSW removal rewrites the whole index: a tombstone instead
            before = len(self.dead)
            self.dead.update(int(i) for i in ids)
            self._dead_selector = None
            return len(self.dead) - before
        # IVF's id hashtable removes only through an IDSelectorArray.
        removed = int(self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
        with self._gpu_lock:
            self._gpu = None  # IVF on a GPU: copied again at the next search
        return removed

    def needs_rebuild(self) -> str | None:
        """Why this index should be rebuilt in the background now, or None."""
        n = len(self)
        if self.spec.needs_training and not self.trained_on and self.spec.trainable(n):
            return f"{n} vectors are enough to train {self.spec.trained_factory(n)}"
        if self.mode == "ivf" and n >= IVF_RETRAIN_GROWTH * self.trained_on and self.spec.trainable(n):
            return f"the gallery ({n}) has outgrown IVF lists trained on {self.trained_on} vectors"
        if len(self.dead) > max(16, COMPACT_FRACTION * self.ntotal):
            return f"{len(self.dead)} of {self.ntotal} vectors are tombstones"
        return None

    @classmethod
    def build(cls, dim: int, factory: str, ids: np.ndarray, vectors: np.ndarray, **kwargs: Any) -> VectorIndex:
        """A new index holding ``vectors``: IVF trained on them when there are enough."""
        out = cls(dim, factory, **kwargs)
        if out.spec.trainable(len(ids)):
            out.index = out._make(out.spec.trained_factory(len(ids)))
            out.index.train(np.ascontiguousarray(vectors, dtype=np.float32))
            out.mode, out.trained_on = out.spec.kind, len(ids)
        for start in range(0, len(ids), 100_000):
            out.add(ids[start : start + 100_000], vectors[start : start + 100_000])
        return out

    # -- search ---------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, ids), each (n, k'), k' = min(k, len); missing slots are id -1.

        ``allowed``: only these ids may be returned (a filter); tombstones are never returned."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        # The GPU copy takes no selector: it serves unfiltered searches while the tombstones fit in its k.
        on_gpu = self.use_gpu and allowed is None and int(k) + len(self.dead) <= GPU_MAX_K
        k = min(capped_k(int(k), on_gpu), len(self) if allowed is None else min(len(self), len(allowed)))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if on_gpu:
            return self._search_gpu(queries, k)
        keep: list[Any] = []  # selectors and buffers FAISS reads during the call
        selector = None
        if allowed is not None:
            selector, buffer = id_selector(allowed)
            keep += [selector, buffer]
        if self.dead:
            cached = self._dead_selector
            if cached is None:
                dead = faiss.IDSelectorBatch(np.fromiter(self.dead, np.int64, len(self.dead)))
                cached = self._dead_selector = (faiss.IDSelectorNot(dead), dead)
            keep.append(cached)
            selector = cached[0] if selector is None else faiss.IDSelectorAnd(selector, cached[0])
            keep.append(selector)
        if self.mode == "ivf":
            # FAISS splits an IVF search over its queries: a lone query (the service's usual request) would run
            # on one core. Fewer queries than threads: split each query's lists instead. Only speed depends on
            # it, so concurrent searches setting it differently cannot change an answer.
            few = len(queries) < faiss.omp_get_max_threads()
            faiss.extract_index_ivf(self.index).parallel_mode = 1 if few else 0
        return self.index.search(queries, k, params=self._parameters(selector, k))

    def _search_gpu(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k + tombstones nearest on the GPU copy, tombstones dropped, the first k kept (-1 padded)."""
        with self._gpu_lock:
            if self._gpu is None:
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
            if self.mode == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self.nprobe)
            distances, ids = self._gpu.search(queries, min(k + len(self.dead), self.ntotal))
        return drop_ids(distances, ids, self.dead, k)

    def _parameters(self, selector: faiss.IDSelector | None, k: int) -> faiss.SearchParameters:
        if self.mode == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))
        if self.mode == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
        return faiss.SearchParameters(sel=selector)

    # -- files ----------------------------------------------------------------------------------------

    def save(self, path: Path, meta: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> int:
        """Write atomically and durably (``models.files.atomic_path``): a JSON header (``meta``,
        the index's own state), named ``arrays`` and the FAISS index; the bytes written."""
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(arrays or {})
        arrays["_dead"] = np.fromiter(self.dead, np.int64, len(self.dead))
        header = {
            "dim": self.dim,
            "factory": self.factory,
            "trained_on": self.trained_on,
            "mode": self.mode,
            "meta": meta or {},
            "arrays": [[name, a.dtype.str, len(a)] for name, a in arrays.items()],
        }
        with atomic_path(path, durable=True) as tmp, tmp.open("wb") as f:
            encoded = json.dumps(header).encode()
            f.write(FILE_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
            for a in arrays.values():
                f.write(np.ascontiguousarray(a).tobytes())
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(self.index, writer)
            del writer
            return f.tell()

    @classmethod
    def read(cls, path: Path, **kwargs: Any) -> tuple[VectorIndex, dict[str, Any], dict[str, np.ndarray]]:
        """(index, meta, arrays) of a file written by ``save``; ValueError when it is unreadable."""
        try:
            with open(path, "rb") as f:
                return cls._read(f, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, struct.error) as exc:  # FAISS: RuntimeError
            raise ValueError(f"index file {path} is unreadable: {exc}") from exc

    @classmethod
    def _read(cls, f: BinaryIO, **kwargs: Any) -> tuple[VectorIndex, dict[str, Any], dict[str, np.ndarray]]:
        if f.read(len(FILE_MAGIC)) != FILE_MAGIC:
            raise ValueError("not a gallery index file")
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        arrays = {}
        for name, dtype, count in header["arrays"]:
            size = np.dtype(dtype).itemsize * count
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated")
            arrays[name] = np.frombuffer(data, dtype=dtype).copy()
        reader = faiss.PyCallbackIOReader(f.read)
        index = faiss.read_index(reader)
        del reader
        out = cls(int(header["dim"]), header["factory"], **kwargs)
        if index.d != out.dim:
            raise ValueError(f"the FAISS index has dimension {index.d}, the header {out.dim}")
        out.index = index
        out.trained_on = int(header["trained_on"])
        out.mode = header["mode"]
        out.dead = {int(i) for i in arrays.pop("_dead")}
        return out, header["meta"], arrays

    @classmethod
    def load(cls, path: Path, dim: int, factory: str | None = None, use_gpu: bool = False) -> VectorIndex:
        """Read an index file; raises ValueError when it is unreadable or of another dimension / factory."""
        index, _, _ = cls.read(path, use_gpu=use_gpu)
        if index.dim != dim or (factory is not None and index.factory != factory):
            raise ValueError(f"index file {path} holds a {index.dim}-d {index.factory!r} index")
        return index
