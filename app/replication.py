"""Replicas in step through PostgreSQL: a writer's ``NOTIFY reid_changes`` goes out in its own transaction, so
it is delivered when the change commits; this LISTEN loop wakes the gallery's background thread, which applies
every change after its watermark. A missed notification or a dropped connection loses nothing: the thread also
polls, and after a reconnect it catches up at once."""

from __future__ import annotations

import logging
import threading

import psycopg
from sqlalchemy.engine import URL

from app.db import NOTIFY_CHANNEL, postgres_connect_args

logger = logging.getLogger(__name__)

RECONNECT_S = 2.0


def libpq_url(url: URL) -> str:
    """The SQLAlchemy URL as a libpq connection string (``postgresql+psycopg://`` -> ``postgresql://``)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def listen_for_changes(url: URL, wake: threading.Event, stopping: threading.Event, timeout_s: int = 5) -> None:
    """Set ``wake`` on every notification until ``stopping`` is set; reconnects after a lost connection."""
    while not stopping.is_set():
        try:
            with psycopg.connect(libpq_url(url), autocommit=True, **postgres_connect_args(timeout_s)) as conn:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                wake.set()  # whatever was committed while not listening
                while not stopping.is_set():
                    for _ in conn.notifies(timeout=0.5, stop_after=1):
                        wake.set()
        except psycopg.Error as exc:
            if stopping.is_set():
                return
            logger.warning("LISTEN %s lost (%s); reconnecting in %.0f s", NOTIFY_CHANNEL, exc, RECONNECT_S)
            stopping.wait(RECONNECT_S)
