"""Webhook delivery: a signed ``POST`` of each event, from one background thread, retried with back-off.

The signature is the one GitHub and Stripe receivers already know how to check:
``X-Reid-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, keyed with REID_WEBHOOK_SECRET.
Signing the time with the body lets a receiver refuse a replayed old request (``verify``'s tolerance).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from app.events.outbox import Delivery, Outbox

logger = logging.getLogger(__name__)

SINK = "webhook"
SIGNATURE_HEADER = "X-Reid-Signature"
EVENT_ID_HEADER = "X-Reid-Event-Id"
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
RETRY_AFTER_CAP_S = 3600.0  # a receiver's Retry-After is honoured, but cannot park the queue for days
TIMEOUT_S = 10.0  # per attempt: a receiver that hangs holds up the queue this long at most
RETRIABLE = frozenset({408, 429})  # besides 5xx: every other 4xx is the receiver refusing this event for good
ERROR_TEXT = 200  # characters of a refusal's body kept as its last error


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Reid-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, now: float | None = None, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: the header's HMAC matches (in constant time) and its time is recent."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    # Several v1 values are allowed: a sender rotating its secret signs with both for a while.
    return any(hmac.compare_digest(expected, given) for given in parts.get("v1", []))


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 1, 2, 4 ... capped at 5 min."""
    return min(BACKOFF_BASE_S * 2 ** (attempts - 1), BACKOFF_CAP_S)


def retry_after(value: str | None, now: float) -> float | None:
    """A Retry-After header in seconds from ``now`` (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


@dataclass(frozen=True)
class Outcome:
    """One attempt's result: delivered, or why not, and whether and when (seconds from now) to try again."""

    delivered: bool
    error: str = ""
    retry: bool = False
    delay: float | None = None  # the receiver's Retry-After; None: the back-off decides


def classify(response: httpx.Response, now: float) -> Outcome:
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(True)
    error = f"HTTP {status}: {response.text[:ERROR_TEXT]}".rstrip(": ")
    if status in RETRIABLE or status >= 500:
        return Outcome(False, error, retry=True, delay=retry_after(response.headers.get("Retry-After"), now))
    # A redirect is not followed (the signed body would go to a host nobody configured): like a 4xx, for good.
    return Outcome(False, error)


class WebhookSender:
    """Delivers the outbox's webhook events, one at a time, on its own thread.

    ``clock`` (Unix seconds) and ``sleep`` (wait that long, or less when woken) are injectable so that tests
    run the back-off in no time; by default ``sleep`` waits on the wake-up event, so a new event or ``stop``
    interrupts it.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        outbox: Outbox,
        max_attempts: int,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.url = url
        self.secret = secret
        self.outbox = outbox
        self.max_attempts = max_attempts
        self.clock = clock
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._sleep = sleep or self._wait
        self._client: httpx.Client | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._client = httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)
        self._thread = threading.Thread(target=self._run, name="reid-webhook", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _wait(self, seconds: float) -> None:
        self._wake.wait(seconds)  # cut short by a new event or by stop

    def stop(self, timeout_s: float = TIMEOUT_S + 1) -> None:
        """Stop after the attempt in flight, if any; what is pending stays in the outbox for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before looking: an event added after this is seen, or wakes the wait below
            due = self.outbox.next_due(SINK)
            if due is None:
                self._wake.wait()
                continue
            event, delivery = due
            delay = delivery.next_at - self.clock()
            if delay > 0:
                self._sleep(delay)
                continue
            try:
                self._attempt(event, delivery)
            except Exception:  # a full disk under the outbox, a bug: logged, and the thread lives on
                logger.exception("webhook: delivering event %s failed unexpectedly", event.get("id"))
                self._stopping.wait(BACKOFF_BASE_S)

    def _attempt(self, event: dict[str, Any], delivery: Delivery) -> None:
        event_id = event["id"]
        attempts = delivery.attempts + 1
        outcome = self.post(event)
        if outcome.delivered:
            self.outbox.delivered(event_id, SINK)
            logger.debug("webhook: event %s delivered at attempt %d", event_id, attempts)
        elif outcome.retry and attempts < self.max_attempts:
            delay = outcome.delay if outcome.delay is not None else backoff(attempts)
            self.outbox.attempted(event_id, SINK, attempts, self.clock() + delay, outcome.error)
            logger.info(
                "webhook: event %s attempt %d failed (%s); next in %.0f s", event_id, attempts, outcome.error, delay
            )
        else:
            self.outbox.failed(event_id, SINK, attempts, outcome.error)
            logger.error("webhook: event %s given up after %d attempts: %s", event_id, attempts, outcome.error)

    def post(self, event: dict[str, Any]) -> Outcome:
        """One signed ``POST`` of ``event``."""
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        now = self.clock()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "reid-gam-events/1",
            EVENT_ID_HEADER: event["id"],
            SIGNATURE_HEADER: sign(self.secret, body, int(now)),
        }
        assert self._client is not None, "start() first"
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:  # refused, reset, timed out, DNS: the receiver may be back later
            return Outcome(False, f"{type(exc).__name__}: {exc}"[:ERROR_TEXT], retry=True)
        return classify(response, now)
