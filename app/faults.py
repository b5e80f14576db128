"""Failures the gallery raises and the HTTP layer answers. They sit below both, so that ``app.errors`` need not
import the gallery to name them, and the database errors are told apart once, here: an unreachable database
heals (retry), a corrupt, read-only or full one does not (stop, say why)."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError


class ModelMismatch(ValueError):
    """The gallery's embeddings were made by other weights than the loaded ones."""


class WriteBusy(RuntimeError):
    """The writers' lock was not granted within REID_WRITE_LOCK_TIMEOUT_S: another writer holds it."""


class DatabaseFatal(RuntimeError):
    """The database answers but cannot work: corrupt, read-only or full. Retrying cannot heal it."""


# SQLite says what is wrong only in its message (sqlite3 exposes no error code before Python 3.11's
# sqlite_errorname, which SQLAlchemy does not pass on reliably).
_SQLITE_FATAL = (
    "file is not a database",
    "database disk image is malformed",
    "attempt to write a readonly database",
    "database or disk is full",
    "disk i/o error",
    "unable to open database file",
)
_SQLITE_BUSY = ("database is locked", "database table is locked")
# PostgreSQL SQLSTATEs that retrying will not heal: a read-only transaction (a standby promoted nothing), disk
# full, out of memory on the server, corrupted data or index.
_POSTGRES_FATAL = {"25006", "53100", "53200", "XX001", "XX002"}
_POSTGRES_BUSY = {"55P03"}  # lock_not_available: lock_timeout expired


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def fatal_reason(exc: BaseException) -> str | None:
    """The driver's message when ``exc`` is a database failure that retrying cannot heal, else None."""
    if not isinstance(exc, DBAPIError):
        return None
    message = str(exc.orig).strip()
    if _sqlstate(exc) in _POSTGRES_FATAL or any(m in message.lower() for m in _SQLITE_FATAL):
        return message
    return None


def is_busy(exc: BaseException) -> bool:
    """A lock not granted in time (PostgreSQL's lock_timeout, SQLite's busy timeout): the write may be retried."""
    if not isinstance(exc, DBAPIError):
        return False
    return _sqlstate(exc) in _POSTGRES_BUSY or any(m in str(exc.orig).lower() for m in _SQLITE_BUSY)


class Resyncing(RuntimeError):
    """The database changed under this replica (restored, failed over): its index is being rebuilt from it."""


class IdempotencyKeyReused(ValueError):
    """An Idempotency-Key sent again with another request than the one it first came with."""
