"""Events (app/events): signed webhooks retried with back-off, a durable outbox that survives a restart, the
filter of what is worth telling, and MQTT against the real Mosquitto at 127.0.0.1:1883."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import Settings
from app.events import Events, Visits, build_event, parse_watch, sign, verify, wanted
from app.events.mqtt import parse_mqtt_url
from app.events.outbox import FAILED_FILE, Outbox
from app.events.webhook import EVENT_ID_HEADER, SIGNATURE_HEADER, backoff, retry_after
from app.main import create_app
from tests.app.conftest import png_bytes

SECRET = "0123456789abcdef-test-secret"
MOSQUITTO = ("127.0.0.1", 1883)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
Reply = tuple[int, dict[str, str], bytes]


class Receiver:
    """A real HTTP server on a free loopback port answering from a script (its last reply repeats)."""

    def __init__(self, script: list[Reply]) -> None:
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                status, headers, text = receiver.script.pop(0) if len(receiver.script) > 1 else receiver.script[0]
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(text))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/reid"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeClock:
    """Wall-clock time that only ``sleep`` moves: the back-off runs in no time and each wait is recorded."""

    def __init__(self, start: float = 1_767_268_800.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def settings_for(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"allow_unauthenticated": True, "data_dir": data_dir, "webhook_secret": SECRET}
    return Settings(**(values | overrides))


def tracklet(identity: str = "alice", person: int | None = None, track: str | None = "17", **more: Any) -> dict:
    return {"camera": "c1", "track": track, "identity": identity, "person": person, "joined": "match",
            "distance": 0.42, "entries": [101, 102]} | more  # fmt: skip


@pytest.fixture
def receivers() -> Iterator[Callable[[list[Reply]], Receiver]]:
    made: list[Receiver] = []

    def make(script: list[Reply]) -> Receiver:
        made.append(Receiver(script))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def started() -> Iterator[Callable[[Events], Events]]:
    """Start an Events and stop it after the test, whatever happens."""
    running: list[Events] = []

    def start(events: Events) -> Events:
        events.start()
        running.append(events)
        return events

    yield start
    for events in running:
        events.stop()


def journal(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data_dir / "events" / "outbox.jsonl").read_text().splitlines()]


# -- signing -------------------------------------------------------------------------------------------------------


def test_signature_verifies_with_its_secret_only() -> None:
    body = b'{"event":"person.seen","id":"e1"}'
    header = sign(SECRET, body, 1_767_268_800)
    assert header.startswith("t=1767268800,v1=") and len(header.partition("v1=")[2]) == 64
    assert verify(SECRET, body, header, now=1_767_268_800 + 10)
    assert not verify("another-secret-of-16+chars", body, header, now=1_767_268_800)
    assert not verify(SECRET, body + b" ", header, now=1_767_268_800)  # the body was changed
    assert not verify(SECRET, body, header, now=1_767_268_800 + 3600)  # an old request replayed
    assert not verify(SECRET, body, "v1=" + header.partition("v1=")[2], now=1_767_268_800)  # no time
    rotated = header + ",v1=" + sign("the-previous-secret-0000", body, 1_767_268_800).partition("v1=")[2]
    assert verify(SECRET, body, rotated, now=1_767_268_800)


def test_backoff_and_retry_after() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4, 9, 10, 20)] == [1, 2, 4, 8, 256, 300, 300]
    now = 1_767_268_800.0
    assert retry_after("7", now) == 7
    assert retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == pytest.approx(30)
    assert retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0  # in the past: at once
    assert retry_after("999999", now) == 3600  # capped
    assert retry_after("soon", now) is None and retry_after(None, now) is None


# -- settings ------------------------------------------------------------------------------------------------------


def test_settings_refuse_a_webhook_without_a_long_secret(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="REID_WEBHOOK_SECRET is not set"):
        Settings(allow_unauthenticated=True, webhook_url="https://example.net/hook")
    with pytest.raises(ValidationError, match="REID_WEBHOOK_SECRET has 15 characters"):
        settings_for(tmp_path, webhook_url="https://example.net/hook", webhook_secret="x" * 15)
    with pytest.raises(ValidationError, match="http:// or https://"):
        settings_for(tmp_path, webhook_url="ftp://example.net/hook")
    with pytest.raises(ValidationError, match="mqtt://"):
        settings_for(tmp_path, mqtt_url="http://127.0.0.1:1883/reid")
    with pytest.raises(ValidationError, match="wildcards"):
        settings_for(tmp_path, mqtt_url="mqtt://127.0.0.1/reid/#")
    ok = settings_for(tmp_path, webhook_url="https://example.net/hook", webhook_secret=f"  {SECRET}  ")
    assert ok.webhook_secret == SECRET and ok.webhook_max_attempts == 8
    assert settings_for(tmp_path, webhook_url="", mqtt_url="").webhook_url is None  # empty = off
    target = parse_mqtt_url("mqtt://user:p%40ss@broker:1884/reid/sightings/")
    assert (target.host, target.port, target.prefix, target.username, target.password) == (
        "broker", 1884, "reid/sightings", "user", "p@ss",
    )  # fmt: skip
    assert target.topic("lobby/2+#") == "reid/sightings/lobby%2F2%2B%23"  # one topic level, literally


# -- what is told --------------------------------------------------------------------------------------------------


def test_only_named_or_watched_identities_are_wanted() -> None:
    people, names = parse_watch(" 7, unknown-8 ,carol,")
    assert people == {7, 8} and names == {"carol"}
    assert wanted(tracklet("alice", None), people, names)  # enrolled by name
    assert wanted(tracklet("bob", 9), people, names)  # a person named since
    assert wanted(tracklet("unknown-12-the-client's-own", None), people, names)  # a name, not a label
    assert not wanted(tracklet("unknown-5", 5), people, names)  # provisional, not watched
    assert wanted(tracklet("unknown-7", 7), people, names)
    assert wanted(tracklet("unknown-8", 8), people, names)
    assert not wanted(tracklet("", None), people, names)


def test_a_track_is_announced_once_per_visit() -> None:
    visits = Visits(gap_s=600)
    minute = timedelta(minutes=1)
    assert visits.first_of_visit(tracklet(), (T0, T0 + minute))
    assert not visits.first_of_visit(tracklet(), (T0 + 2 * minute, T0 + 3 * minute))  # the same visit goes on
    assert visits.first_of_visit(tracklet(identity="bob", person=3), (T0 + 4 * minute, T0 + 5 * minute))  # named
    assert visits.first_of_visit(tracklet(camera="c2"), (T0 + 4 * minute, T0 + 5 * minute))  # another camera
    assert visits.first_of_visit(tracklet(), (T0 + 20 * minute, T0 + 21 * minute))  # back after the gap
    assert visits.first_of_visit(tracklet(track=None), (T0, T0))
    assert visits.first_of_visit(tracklet(track=None), (T0, T0))  # a crop alone is always news


def test_emit_filters_and_builds_the_payload(tmp_path: Path, receivers: Any, started: Any) -> None:
    receiver = receivers([(204, {}, b"")])
    events = started(Events(settings_for(tmp_path, webhook_url=receiver.url, webhook_watch="7")))
    answer = [tracklet("alice"), tracklet("unknown-5", 5, track="5"), tracklet("unknown-7", 7, track="7")]
    spans = [(T0, T0 + timedelta(seconds=3))] * 3
    ids = events.emit(answer, spans)
    assert len(ids) == 2
    wait_until(lambda: len(receiver.requests) == 2 and events.outbox.pending_count() == 0, "two deliveries")
    bodies = sorted((json.loads(body) for _, body in receiver.requests), key=lambda b: b["identity"])
    assert [b["identity"] for b in bodies] == ["alice", "unknown-7"]
    alice = bodies[0]
    assert set(alice) == {"event", "id", "at", "identity", "person", "camera", "track", "captured_at", "joined",
                          "distance", "entries"}  # fmt: skip
    assert alice["event"] == "person.seen" and alice["id"] in ids and uuid.UUID(alice["id"])
    assert datetime.fromisoformat(alice["at"]).tzinfo is not None
    assert alice["captured_at"] == {"first": "2026-01-01T12:00:00Z", "last": "2026-01-01T12:00:03Z"}
    assert (alice["camera"], alice["track"], alice["distance"], alice["entries"]) == ("c1", "17", 0.42, [101, 102])
    assert events.emit(answer[:1], [(T0 + timedelta(seconds=5), T0 + timedelta(seconds=8))]) == []  # same visit
    assert events.emit([tracklet("unknown-5", 5)], spans[:1]) == []


def test_emit_does_nothing_when_no_sink_is_set(tmp_path: Path, started: Any) -> None:
    events = started(Events(settings_for(tmp_path)))
    assert not events.enabled and events.emit([tracklet()]) == []
    assert not (tmp_path / "events").exists()


# -- webhook delivery ----------------------------------------------------------------------------------------------


def test_a_receiver_failing_twice_gets_the_event_once_after_back_off(
    tmp_path: Path, receivers: Any, started: Any
) -> None:
    receiver = receivers([(503, {"Retry-After": "7"}, b"busy"), (503, {}, b"still busy"), (200, {}, b"ok")])
    clock = FakeClock()
    events = Events(settings_for(tmp_path, webhook_url=receiver.url), clock=clock, sleep=clock.sleep)
    [event_id] = started(events).emit([tracklet()], [(T0, T0)])
    wait_until(lambda: events.outbox.pending_count() == 0, "the delivery")
    assert len(receiver.requests) == 3
    assert clock.sleeps == [7, 2]  # the receiver's Retry-After, then the back-off after 2 failures
    bodies = {body for _, body in receiver.requests}
    assert len(bodies) == 1  # the same event each time
    for headers, body in receiver.requests:
        assert headers[EVENT_ID_HEADER] == event_id and headers["Content-Type"] == "application/json"
        signature = headers[SIGNATURE_HEADER]
        assert verify(SECRET, body, signature, now=clock.now)
        assert not verify("some-other-secret-16chars", body, signature, now=clock.now)
    stamps = [int(h[SIGNATURE_HEADER].split(",")[0][2:]) for h, _ in receiver.requests]
    assert stamps[1] - stamps[0] == 7 and stamps[2] - stamps[1] == 2  # each attempt signed when it is sent
    ops = [(r["op"], r.get("attempts")) for r in journal(tmp_path)]
    assert ops == [("add", None), ("try", 1), ("try", 2), ("done", None)]
    assert not (tmp_path / "events" / FAILED_FILE).exists()


@pytest.mark.parametrize(
    ("reply", "attempts", "sleeps", "error"),
    [
        ((500, {}, b"boom"), 3, [1, 2], "HTTP 500: boom"),
        ((410, {}, b"gone"), 1, [], "HTTP 410: gone"),  # a 4xx: given up at once
        ((302, {"Location": "http://elsewhere/"}, b""), 1, [], "HTTP 302"),  # a redirect is not followed
    ],
)
def test_an_event_nobody_accepts_ends_in_the_failed_record(
    tmp_path: Path, receivers: Any, started: Any, reply: Reply, attempts: int, sleeps: list[float], error: str
) -> None:
    receiver = receivers([reply])
    clock = FakeClock()
    settings = settings_for(tmp_path, webhook_url=receiver.url, webhook_max_attempts=3)
    events = started(Events(settings, clock=clock, sleep=clock.sleep))
    [event_id] = events.emit([tracklet()], [(T0, T0)])
    failed = tmp_path / "events" / FAILED_FILE
    wait_until(lambda: events.outbox.pending_count() == 0 and failed.exists(), "the event to be given up")
    [record] = [json.loads(line) for line in failed.read_text().splitlines()]
    assert (record["event"]["id"], record["sink"], record["attempts"], record["last_error"]) == (
        event_id, "webhook", attempts, error,
    )  # fmt: skip
    assert len(receiver.requests) == attempts and clock.sleeps == sleeps
    assert journal(tmp_path)[-1] == {"op": "fail", "id": event_id, "sink": "webhook"}


def test_an_unreachable_receiver_is_retried(tmp_path: Path, started: Any) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = FakeClock()
    settings = settings_for(tmp_path, webhook_url=f"http://127.0.0.1:{port}/", webhook_max_attempts=2)
    events = started(Events(settings, clock=clock, sleep=clock.sleep))
    events.emit([tracklet()], [(T0, T0)])
    failed = tmp_path / "events" / FAILED_FILE
    wait_until(failed.exists, "the event to be given up")
    record = json.loads(failed.read_text())
    assert record["attempts"] == 2 and record["last_error"].startswith("ConnectError")
    assert clock.sleeps == [1]


def test_a_restart_delivers_what_was_pending(tmp_path: Path, receivers: Any, started: Any) -> None:
    down = receivers([(503, {"Retry-After": "3600"}, b"maintenance")])
    first = Events(settings_for(tmp_path, webhook_url=down.url))  # the real clock: it waits its hour
    [event_id] = started(first).emit([tracklet()], [(T0, T0)])
    wait_until(lambda: first.outbox.next_due("webhook")[1].attempts == 1, "the first attempt")  # type: ignore[index]
    assert [r["op"] for r in journal(tmp_path)] == ["add", "try"]
    first.stop()  # writes nothing: as far as the disk goes, this is a crash
    with (tmp_path / "events" / "outbox.jsonl").open("ab") as handle:
        handle.write(b'{"op":"done","id":"' + event_id.encode())  # a record torn by the crash, never acknowledged
    up = receivers([(200, {}, b"ok")])
    clock = FakeClock(start=time.time())
    second = Events(settings_for(tmp_path, webhook_url=up.url), clock=clock, sleep=clock.sleep)
    started(second)
    assert second.outbox.pending_count() == 1
    wait_until(lambda: second.outbox.pending_count() == 0, "the delivery after the restart")
    [(headers, body)] = up.requests
    assert headers[EVENT_ID_HEADER] == event_id and json.loads(body)["id"] == event_id
    assert len(clock.sleeps) == 1 and 3590 < clock.sleeps[0] <= 3600  # the receiver's hour was remembered
    assert [r["op"] for r in journal(tmp_path)] == ["add", "try", "done"]  # compacted at start, then done


def test_a_gone_replicas_outbox_is_adopted(tmp_path: Path, receivers: Any, started: Any) -> None:
    folder = tmp_path / "events"
    orphan = Outbox(folder)
    orphan.open()  # slot 0
    other = Outbox(folder)
    other.open()  # slot 1: a second process on the same data folder
    event = build_event(tracklet(), (T0, T0), T0)
    other.add([event], ["webhook"], now=0.0)
    assert (folder / "outbox-1.jsonl").exists()
    other.close()  # that replica is gone for good
    orphan.close()
    receiver = receivers([(200, {}, b"")])
    events = started(Events(settings_for(tmp_path, webhook_url=receiver.url)))
    wait_until(lambda: len(receiver.requests) == 1 and events.outbox.pending_count() == 0, "the adopted event")
    assert json.loads(receiver.requests[0][1])["id"] == event["id"]
    assert not (folder / "outbox-1.jsonl").exists()


# -- MQTT, against the real broker ---------------------------------------------------------------------------------


class Subscriber:
    """A paho client subscribed (QoS 1) to ``<prefix>/#`` on Mosquitto, collecting what arrives."""

    def __init__(self, prefix: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"reid-test-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda client, userdata, message: self.messages.append(message)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        try:
            self.client.connect(*MOSQUITTO, keepalive=10)
        except OSError as exc:
            pytest.fail(
                f"Mosquitto is not reachable at {MOSQUITTO[0]}:{MOSQUITTO[1]} ({exc}): the MQTT tests need it "
                "running (apt-get install mosquitto; it listens there by default)"
            )
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/#", qos=1)
        assert self.subscribed.wait(5), "Mosquitto did not acknowledge the subscription"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber() -> Iterator[tuple[str, Subscriber]]:
    prefix = f"reid-test/{uuid.uuid4().hex[:8]}"
    sub = Subscriber(prefix)
    yield prefix, sub
    sub.close()


def test_mqtt_publishes_each_event_to_its_cameras_topic(
    tmp_path: Path, subscriber: tuple[str, Subscriber], started: Any
) -> None:
    prefix, sub = subscriber
    events = started(Events(settings_for(tmp_path, mqtt_url=f"mqtt://127.0.0.1:1883/{prefix}")))
    [event_id] = events.emit([tracklet(camera="lobby/2")], [(T0, T0)])
    wait_until(lambda: len(sub.messages) == 1, "the MQTT message")
    message = sub.messages[0]
    assert message.topic == f"{prefix}/lobby%2F2" and message.qos == 1
    payload = json.loads(message.payload)
    assert payload["id"] == event_id and payload["event"] == "person.seen" and payload["camera"] == "lobby/2"
    wait_until(lambda: events.outbox.pending_count() == 0, "the broker's PUBACK")
    assert journal(tmp_path)[-1] == {"op": "done", "id": event_id, "sink": "mqtt"}


def test_mqtt_events_owed_from_before_are_published_at_start(
    tmp_path: Path, subscriber: tuple[str, Subscriber], started: Any
) -> None:
    prefix, sub = subscriber
    owed = Outbox(tmp_path / "events")
    owed.open()
    event = build_event(tracklet(), (T0, T0), T0)
    owed.add([event], ["mqtt"], now=0.0)
    owed.close()  # the process went away before the broker acknowledged it
    events = started(Events(settings_for(tmp_path, mqtt_url=f"mqtt://127.0.0.1/{prefix}")))
    wait_until(lambda: events.outbox.pending_count() == 0, "the owed event's PUBACK")
    wait_until(lambda: len(sub.messages) == 1, "the owed event at the subscriber")  # the broker's PUBACK may beat it
    assert [json.loads(m.payload)["id"] for m in sub.messages] == [event["id"]]
    assert sub.messages[0].topic == f"{prefix}/c1"


def test_the_route_tells_a_webhook_when_a_named_person_is_seen(settings: Settings, tmp_path: Path) -> None:
    receiver = Receiver([(204, {}, b"")])
    update = {"join_threshold": 1e-3, "backend": "torch", "webhook_url": receiver.url, "webhook_secret": SECRET}
    try:
        with TestClient(create_app(settings.model_copy(update=update))) as client:

            def send(seed: int, camera: str, track: str, at: str, key: str | None = None) -> Any:
                meta = [{"camera": camera, "track": track, "captured_at": at}]
                files = [("files", ("0.png", png_bytes(seed), "image/png"))]
                headers = {"Idempotency-Key": key} if key else {}
                answer = client.post("/sightings", files=files, data={"sightings": json.dumps(meta)}, headers=headers)
                assert answer.status_code == 201, answer.text
                return answer.json()["tracklets"][0]

            stranger = send(5, "c1", "1", "2026-03-01T10:00:00Z")
            assert stranger["joined"] == "new"
            assert client.post(f"/people/{stranger['person']}/name", json={"name": "Ann"}).status_code == 200
            seen = send(5, "c2", "4", "2026-03-01T11:00:00Z", key="k-1")
            assert (seen["joined"], seen["identity"]) == ("match", "Ann")
            assert send(5, "c2", "4", "2026-03-01T11:00:00Z", key="k-1") == seen  # replayed: no second event
            wait_until(lambda: len(receiver.requests) == 1, "the webhook")
            headers, body = receiver.requests[0]
            assert verify(SECRET, body, headers["X-Reid-Signature"])
            event = json.loads(body)
            assert (event["identity"], event["person"], event["camera"], event["track"]) == (
                "Ann",
                seen["person"],
                "c2",
                "4",
            )
            assert event["captured_at"] == {"first": "2026-03-01T11:00:00Z", "last": "2026-03-01T11:00:00Z"}
            assert event["entries"] == seen["entries"]
        assert len(receiver.requests) == 1  # the unknown stranger was not told
    finally:
        receiver.close()
