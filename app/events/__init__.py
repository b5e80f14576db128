"""Events: operators are told when a named or watched person is seen (``POST /sightings``).

``Events.emit`` is called by the route with the tracklets it answered, after their commit. It keeps those that
joined a named identity (or a person in REID_WEBHOOK_WATCH), builds one ``person.seen`` event each, and queues
them durably (``app/events/outbox.py``: fsynced before ``emit`` returns, replayed at start) for the webhook
(``webhook.py``: signed, retried with back-off, a record of what was given up) and MQTT (``mqtt.py``). The
senders run on their own threads: a request never waits for a receiver or a broker.

A track is announced once per visit: the tracklets of a camera's track that go on arriving (a tracker posts
every few seconds) are not announced again for the same identity while each starts within REID_TRACK_GAP_S of
the last one's end, the rule by which the gallery itself continues a track. A track whose person gets named
mid-visit is announced under its name.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from app.config import Settings
from app.db import UNNAMED_PREFIX
from app.events import mqtt, webhook
from app.events.mqtt import MqttPublisher, parse_mqtt_url
from app.events.outbox import Outbox
from app.events.webhook import WebhookSender, sign, verify

__all__ = ["EVENT_TYPE", "Events", "build_event", "parse_watch", "sign", "verify", "wanted"]

logger = logging.getLogger(__name__)

EVENT_TYPE = "person.seen"
MAX_VISITS = 10_000  # tracks remembered for the once-per-visit rule (the least recently seen are forgotten)
Span = tuple[datetime, datetime]


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_watch(text: str) -> tuple[frozenset[int], frozenset[str]]:
    """REID_WEBHOOK_WATCH's person ids (``42`` or ``unknown-42``) and identities (names)."""
    people: set[int] = set()
    names: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        label = item.removeprefix(UNNAMED_PREFIX)
        if label.isdigit():
            people.add(int(label))
        elif item:
            names.add(item)
    return frozenset(people), frozenset(names)


def is_named(tracklet: Mapping[str, Any]) -> bool:
    """Joined an identity with a name: enrolled by name (no person), or a person named since. A provisional
    person's identity is exactly its label ``unknown-<id>`` (a client's own name may merely start like one)."""
    identity, person = tracklet.get("identity") or "", tracklet.get("person")
    if not identity:
        return False
    return person is None or identity != f"{UNNAMED_PREFIX}{person}"


def wanted(tracklet: Mapping[str, Any], people: frozenset[int], names: frozenset[str]) -> bool:
    """Whether a tracklet is worth an event: every named identity, and the watched people and identities."""
    return is_named(tracklet) or tracklet.get("person") in people or tracklet.get("identity") in names


def build_event(tracklet: Mapping[str, Any], span: Span, at: datetime) -> dict[str, Any]:
    """The ``person.seen`` payload of one tracklet of the route's answer."""
    return {
        "event": EVENT_TYPE,
        "id": str(uuid.uuid4()),
        "at": rfc3339(at),
        "identity": tracklet.get("identity"),
        "person": tracklet.get("person"),
        "camera": tracklet.get("camera"),
        "track": tracklet.get("track"),
        "captured_at": {"first": rfc3339(span[0]), "last": rfc3339(span[1])},
        "joined": tracklet.get("joined"),
        "distance": tracklet.get("distance"),
        "entries": list(tracklet.get("entries") or []),
    }


class Visits:
    """The once-per-visit rule: the end of each (camera, track, identity) announced, bounded in size."""

    def __init__(self, gap_s: float, size: int = MAX_VISITS) -> None:
        self.gap_s = gap_s
        self.size = size
        self._last: OrderedDict[tuple[str, str, str], datetime] = OrderedDict()
        self._lock = threading.Lock()

    def first_of_visit(self, tracklet: Mapping[str, Any], span: Span) -> bool:
        """Whether the tracklet starts a visit (to announce); either way its end extends the visit."""
        track = tracklet.get("track")
        if track is None:
            return True  # a crop sent alone: nothing ties it to an earlier one
        key = (str(tracklet.get("camera")), str(track), str(tracklet.get("identity")))
        with self._lock:
            previous = self._last.pop(key, None)
            self._last[key] = max(span[1], previous) if previous is not None else span[1]
            while len(self._last) > self.size:
                self._last.popitem(last=False)
        return previous is None or (span[0] - previous).total_seconds() > self.gap_s


class Events:
    """The events of a service: ``start`` at start-up, ``emit`` per answered ``POST /sightings``, ``stop``."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.people, self.names = parse_watch(settings.webhook_watch)
        self.visits = Visits(settings.track_gap_s)
        self.outbox = Outbox(settings.data_dir / "events")
        self.webhook: WebhookSender | None = None
        self.mqtt: MqttPublisher | None = None
        if settings.webhook_url is not None:
            assert settings.webhook_secret is not None  # the settings' validator requires it
            self.webhook = WebhookSender(
                settings.webhook_url,
                settings.webhook_secret,
                self.outbox,
                settings.webhook_max_attempts,
                clock=clock,
                sleep=sleep,
            )
        if settings.mqtt_url is not None:
            self.mqtt = MqttPublisher(parse_mqtt_url(settings.mqtt_url), self.outbox)
        self._started = False

    @property
    def enabled(self) -> bool:
        return self.webhook is not None or self.mqtt is not None

    @property
    def sinks(self) -> list[str]:
        return [name for name, sender in ((webhook.SINK, self.webhook), (mqtt.SINK, self.mqtt)) if sender]

    def start(self) -> None:
        """Replay the outbox and start the senders (nothing at all when no sink is set)."""
        if not self.enabled or self._started:
            return
        self.outbox.open()
        self._started = True  # from here on stop() undoes what start did, should a sender fail to start
        try:
            if self.webhook is not None:
                self.webhook.start()
            if self.mqtt is not None:
                self.mqtt.start()
        except BaseException:
            self.stop()
            raise
        logger.info("events: %s, %d pending", " and ".join(self.sinks), self.outbox.pending_count())

    def stop(self) -> None:
        """Stop the senders after what is in flight; what is pending waits in the outbox for the next start."""
        if not self._started:
            return
        self._started = False
        if self.webhook is not None:
            self.webhook.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.outbox.close()

    def emit(self, tracklets: Sequence[Mapping[str, Any]], spans: Sequence[Span] | None = None) -> list[str]:
        """Queue a ``person.seen`` event for each of the answer's tracklets that is wanted and starts a visit;
        ``spans``: each tracklet's (first, last) capture time (default: now). Durable when it returns (it
        fsyncs: call it from a worker thread); returns the events' ids. Never raises: the sightings are
        committed already, and a failed event is logged, not turned into a failed request."""
        if not self._started or not tracklets:
            return []
        now = datetime.fromtimestamp(self.clock(), UTC)
        events = []
        for i, tracklet in enumerate(tracklets):
            span = spans[i] if spans is not None else (now, now)
            if wanted(tracklet, self.people, self.names) and self.visits.first_of_visit(tracklet, span):
                events.append(build_event(tracklet, span, now))
        if not events:
            return []
        try:
            self.outbox.add(events, self.sinks, self.clock())
        except Exception:
            logger.exception("events: %d events could not be queued and are lost: %s", len(events), events)
            return []
        if self.webhook is not None:
            self.webhook.wake()
        if self.mqtt is not None:
            for event in events:
                try:
                    self.mqtt.publish(event)
                except Exception:  # it stays owed in the outbox: published again at the next start
                    logger.exception("events: event %s not published to MQTT", event["id"])
        return [event["id"] for event in events]
