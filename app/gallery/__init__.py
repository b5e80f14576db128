"""The gallery: entries in SQL (the truth and its change log) and a FAISS index of them kept in step.

- ``core``: ``Gallery``, the one object callers use: open, catch up, snapshot, close; its writes (enrol,
  delete) in ``writes`` and its reads (entries, search) in ``reads``.
- ``binding``: the weights' fingerprint and the database's epoch; ``changelog``: the numbered log and the
  writers' lock; ``state``: the index with its columns and watermark; ``snapshots``: the index file;
  ``rebuild``: an index from the database; ``crops``: the stored crop files; ``locks``: the data folder's lock
  and the index's read/write lock; ``worker``: the background thread."""

from app.columns import EntryFilter
from app.faults import ModelMismatch
from app.gallery.binding import mismatch_message
from app.gallery.core import Gallery
from app.gallery.locks import lock_data_dir
from app.gallery.state import EntrySummary
from app.gallery.writes import BeforeInsert, Enrolled, NewEntry, StoredCrop

__all__ = [
    "BeforeInsert",
    "Enrolled",
    "EntryFilter",
    "EntrySummary",
    "Gallery",
    "ModelMismatch",
    "NewEntry",
    "StoredCrop",
    "lock_data_dir",
    "mismatch_message",
]
