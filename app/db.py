"""The database, the gallery's truth: the entries (each with its embedding and stored crop), the change log that
numbers every add and delete, and the gallery's metadata (the fingerprint of the weights that made the
embeddings). The schema is created and upgraded by Alembic (app/migrations, ``app.migrate``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    create_engine,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

# Change-log operations: an entry added or deleted, and every embedding replaced at once (a re-embed).
OP_ADD = "add"
OP_DELETE = "delete"
OP_REEMBED = "reembed"
# What a person (reid_people) is: grouped sightings awaiting review, named by an operator, not a person, or
# merged into another.
PERSON_PROVISIONAL = "provisional"
PERSON_NAMED = "named"
PERSON_IGNORED = "ignored"
PERSON_MERGED = "merged"
# The identity a provisional person's sightings carry (search answers show it): "unknown-42" for person 42.
# POST /gallery refuses identities of this form.
UNNAMED_PREFIX = "unknown-"
# PostgreSQL NOTIFY channel on which writers announce a change (delivered when their transaction commits).
NOTIFY_CHANNEL = "reid_changes"
# PostgreSQL advisory lock keys, all here so that no two jobs share one.
MIGRATE_LOCK = 0x5E1D_0001  # replicas starting together migrate one at a time
WRITE_LOCK = 0x5E1D_0002  # every writer holds it until its commit: seq order = commit order
REEMBED_LOCK = 0x5E1D_0003  # the one re-embed run
REGROUP_LOCK = 0x5E1D_0004  # one replica re-groups at a time
# Keys of reid_meta.
META_FINGERPRINT = "fingerprint"
META_REEMBED_TARGET = "reembed_target"
# A random id given to the gallery when its database is created: a snapshot or replica of another database
# (a new one under the same URL) is told apart by it.
META_EPOCH = "epoch"


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend: SQLite keeps no offset, so its values are read back as
    UTC (a naive datetime would be served without one, which is not an RFC 3339 date-time)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo is not None else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData()


class Entry(Base):
    __tablename__ = "reid_entries"
    # SQLite hands the largest deleted id to the next row unless the table is AUTOINCREMENT. A sighting's track is
    # looked up by camera, track and time (app.sightings), never by a scan of the camera's entries.
    __table_args__ = (
        Index("ix_reid_entries_camera_track", "camera", "track", "captured_at"),
        {"sqlite_autoincrement": True},
    )

    # Also the FAISS id: SQLite's INTEGER PRIMARY KEY AUTOINCREMENT / PostgreSQL's identity, never reused ids.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    identity: Mapped[str] = mapped_column(String(200), index=True)
    camera: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    # When the camera took the crop (search filters on it); the upload time unless the client says otherwise.
    # Nullable in the schema only because galleries older than this column were backfilled in place.
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=True, default=_now)
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    crop_path: Mapped[str] = mapped_column(String(300))  # relative to data_dir, content-addressed
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, feat_dim values
    # A re-embed's new template, staged until every entry has one (then swapped in one transaction).
    embedding_next: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    # A sighting (enrolled without a name, POST /sightings): the person it is grouped into, and its tracklet (the
    # tracker's id, one camera); both None for crops enrolled under a name (POST /gallery).
    person_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    track: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Change(Base):
    """The gallery's log: one row per add or delete, written in the change's own transaction. ``seq`` orders
    them (writers serialise on a lock, so seq order is commit order); an index snapshot records the last seq it
    holds (its watermark) and replays the rows after it."""

    __tablename__ = "reid_changes"
    __table_args__ = ({"sqlite_autoincrement": True},)

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String(16))
    entry_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)


class Person(Base):
    """Someone seen but not enrolled: the sightings grouped together. ``provisional`` until an operator names it
    (``named``: its sightings carry the name as their identity), marks it ``ignored`` (not a person), or merges it
    into another (``merged``, ``merged_into`` says where). Its id is its label while it has no name, and stays
    the same across re-groupings."""

    __tablename__ = "reid_people"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=PERSON_PROVISIONAL)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    merged_into: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # An operator's decision made it (a merge's target, a split's two halves): re-grouping keeps it whole.
    reviewed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)


class PeopleApart(Base):
    """Two people an operator split apart: re-grouping never puts them back together (``person_a < person_b``)."""

    __tablename__ = "reid_people_apart"

    person_a: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    person_b: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)


class GalleryMeta(Base):
    """Key-value facts about the gallery as a whole, e.g. ``fingerprint``: the weights its embeddings belong to."""

    __tablename__ = "reid_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


class IdempotentAnswer(Base):
    """The answer to a ``POST /gallery`` that carried an ``Idempotency-Key``, committed with its entries: a retry
    of a request whose answer was lost (a timeout, a dropped connection) gets it again instead of enrolling twice."""

    __tablename__ = "reid_idempotency"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now, index=True)


def make_engine(url: str, connect_timeout_s: int = 5) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": connect_timeout_s}
    elif url.startswith("postgresql"):
        kwargs["connect_args"] = postgres_connect_args(connect_timeout_s)
        kwargs["pool_timeout"] = connect_timeout_s
    return create_engine(url, **kwargs)


def postgres_connect_args(connect_timeout_s: int) -> dict[str, Any]:
    # A server that vanishes without closing the connection (a network partition) would leave a query
    # waiting for ever: keepalives find an idle dead peer, tcp_user_timeout one that stopped acknowledging.
    return {
        "connect_timeout": connect_timeout_s,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": connect_timeout_s * 1000,  # ms
    }


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
