"""The database, the gallery's truth: one table of entries, each with its embedding and stored crop."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, LargeBinary, MetaData, String, TypeDecorator, create_engine
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend: SQLite keeps no offset, so its values are read back as
    UTC (a naive datetime would be served without one, which is not an RFC 3339 date-time)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo is not None else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    metadata = MetaData()


class Entry(Base):
    __tablename__ = "reid_entries"
    # SQLite hands the largest deleted id to the next row unless the table is AUTOINCREMENT.
    __table_args__ = ({"sqlite_autoincrement": True},)

    # Also the FAISS id: SQLite's INTEGER PRIMARY KEY AUTOINCREMENT / PostgreSQL's identity, never reused ids.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    identity: Mapped[str] = mapped_column(String(200), index=True)
    camera: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=lambda: datetime.now(UTC))
    content_sha256: Mapped[str] = mapped_column(String(64))
    crop_path: Mapped[str] = mapped_column(String(300))  # relative to data_dir, content-addressed
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, feat_dim values
    # STAND-IN: replaced by the gallery branch. When the crop was taken (default: its upload time).
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=lambda: datetime.now(UTC), index=True)


def make_engine(url: str, connect_timeout_s: int = 5) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": connect_timeout_s}
    elif url.startswith("postgresql"):
        # A server that vanishes without closing the connection (a network partition) would leave a query
        # waiting for ever: keepalives find an idle dead peer, tcp_user_timeout one that stopped acknowledging.
        kwargs["connect_args"] = {
            "connect_timeout": connect_timeout_s,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": connect_timeout_s * 1000,  # ms
        }
        kwargs["pool_timeout"] = connect_timeout_s
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
