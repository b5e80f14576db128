"""The gallery's background work, on one thread: catch up with other replicas' changes (woken by PostgreSQL
NOTIFY, else every ``poll_interval_s``), resync when the database changed under the index, write snapshots
(after ``snapshot_every`` changes, every ``snapshot_interval_s``, at shutdown), start rebuilds the index asks
for, and sweep unused crops and expired idempotency keys. Its heartbeat tells liveness it is not stuck."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from app.faults import fatal_reason

if TYPE_CHECKING:
    from app.gallery.core import Gallery

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 3600.0  # crops and idempotency keys: hourly is plenty (their graces are hours)


class Worker:
    def __init__(self, gallery: Gallery, poll_interval_s: float, listen: bool) -> None:
        self.gallery = gallery
        self.poll_interval_s = poll_interval_s
        self.listen = listen
        self.heartbeat = time.monotonic()  # the loop's last turn
        self.fatal: str | None = None  # a database failure that retrying cannot heal: liveness fails
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rebuilder: threading.Thread | None = None
        self._last_sweep = 0.0

    def wake(self) -> None:
        self._wake.set()

    def alive(self, max_silence_s: float) -> bool:
        """The loop turned within ``max_silence_s`` (a turn waits at most ``poll_interval_s``), or was never
        started."""
        if not self._threads:
            return True
        return self._threads[0].is_alive() and time.monotonic() - self.heartbeat < max_silence_s

    def start(self) -> None:
        self._stopping.clear()
        self.heartbeat = time.monotonic()
        self._threads = [threading.Thread(target=self._run, name="gallery-background", daemon=True)]
        if self.listen:
            from app.replication import listen_for_changes

            self._threads.append(
                threading.Thread(
                    target=listen_for_changes,
                    args=(self.gallery.engine.url, self._wake, self._stopping),
                    name="gallery-listen",
                    daemon=True,
                )
            )
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(30)
        self._threads = []

    def start_rebuild(self, reason: str) -> None:
        if self._rebuilder is not None and self._rebuilder.is_alive():
            return
        logger.info("rebuilding the index in the background: %s", reason)
        self._rebuilder = threading.Thread(target=self.gallery._rebuild, name="gallery-rebuild", daemon=True)
        self._rebuilder.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.heartbeat = time.monotonic()
            try:
                self._turn()
            except DBAPIError as exc:
                reason = fatal_reason(exc)
                if reason is not None:
                    self.fatal = reason
                    logger.critical("the database failed and cannot heal by retrying: %s", reason)
                else:
                    logger.warning("database unreachable from the gallery's background thread (%s)", type(exc).__name__)
            except Exception:
                logger.exception("the gallery's background work failed; retrying")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def _turn(self) -> None:
        gallery = self.gallery
        if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            gallery.sweep_crops()
            gallery.forget_idempotency_keys()
        if self._stopping.is_set():
            return
        gallery.catch_up()
        reason = gallery.state.index.needs_rebuild()
        if reason:
            self.start_rebuild(reason)
        due = time.monotonic() - gallery.last_snapshot >= gallery.snapshot_interval_s
        if gallery.changes_since_snapshot >= gallery.snapshot_every or (gallery.changes_since_snapshot and due):
            gallery.snapshot()
