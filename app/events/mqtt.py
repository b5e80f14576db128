"""MQTT delivery: each event published to ``<prefix>/<camera>`` with QoS 1, by paho-mqtt's own network thread.

``publish`` only queues (paho keeps QoS 1 messages while disconnected and sends them on reconnect), so a
request never waits for the broker. An event leaves the outbox when the broker's PUBACK arrives; events still
owed at a restart are published again (at least once: subscribers drop duplicates by ``id``).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from app.events.outbox import Outbox

logger = logging.getLogger(__name__)

SINK = "mqtt"
KEEPALIVE_S = 30
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 60
# Characters with a meaning in a topic: a camera named "lobby/2" or "#" must stay one topic level, literally.
TOPIC_ESCAPES = str.maketrans({"%": "%25", "/": "%2F", "+": "%2B", "#": "%23"})


@dataclass(frozen=True)
class MqttTarget:
    """What ``mqtt[s]://[user[:password]@]host[:port]/topic/prefix`` names."""

    host: str
    port: int
    prefix: str
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def topic(self, camera: str) -> str:
        level = camera.translate(TOPIC_ESCAPES) or "_"
        return f"{self.prefix}/{level}" if self.prefix else level


def parse_mqtt_url(url: str) -> MqttTarget:
    """The broker and topic prefix of REID_MQTT_URL; ValueError with a sentence when it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("must start with mqtt:// or mqtts://, e.g. mqtt://127.0.0.1:1883/reid/sightings")
    if not parts.hostname:
        raise ValueError("names no broker host, e.g. mqtt://127.0.0.1:1883/reid/sightings")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    prefix = unquote(parts.path).strip("/")
    if any(c in prefix for c in "+#\0") or "#" in url:  # an unescaped # is a URL fragment to urlsplit
        raise ValueError("its topic prefix may not hold the wildcards + or #")
    tls = parts.scheme == "mqtts"
    return MqttTarget(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        prefix=prefix,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class MqttPublisher:
    """Publishes the outbox's MQTT events; reconnects by itself (paho's loop thread) with back-off."""

    def __init__(self, target: MqttTarget, outbox: Outbox) -> None:
        self.target = target
        self.outbox = outbox
        self._lock = threading.Lock()
        self._inflight: dict[int, str] = {}  # paho message id -> event id, until its PUBACK
        self._acked_early: set[int] = set()  # a PUBACK that beat publish() returning its message id
        self._connected = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"reid-events-{uuid.uuid4().hex[:12]}", protocol=mqtt.MQTTv311
        )
        if target.username is not None:
            self._client.username_pw_set(target.username, target.password)
        if target.tls:
            self._client.tls_set_context(ssl.create_default_context())
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._client.max_queued_messages_set(0)  # unbounded: the outbox, not paho, bounds what is owed
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background (a broker that is down is retried, never waited for) and publish what the
        outbox still owes from before."""
        self._client.connect_async(self.target.host, self.target.port, keepalive=KEEPALIVE_S)
        self._client.loop_start()
        for event in self.outbox.owed(SINK):
            self.publish(event)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        info = self._client.publish(self.target.topic(str(event.get("camera") or "")), body, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued until connected
            logger.error("mqtt: event %s not queued (%s); it is sent at the next start", event["id"], info.rc)
            return
        with self._lock:
            early = info.mid in self._acked_early
            if early:
                self._acked_early.discard(info.mid)
            else:
                self._inflight[info.mid] = event["id"]
        if early:
            self.outbox.delivered(event["id"], SINK)

    # paho's callbacks run on its loop thread; they must not raise (paho would log and drop the connection).

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            logger.warning("mqtt: %s:%d refused the connection: %s", self.target.host, self.target.port, reason)
            return
        self._connected.set()
        logger.info("mqtt: connected to %s:%d", self.target.host, self.target.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        if reason.is_failure:
            logger.warning(
                "mqtt: connection to %s:%d lost (%s); reconnecting", self.target.host, self.target.port, reason
            )

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            event_id = self._inflight.pop(mid, None)
            if event_id is None:
                self._acked_early.add(mid)
                return
        try:
            self.outbox.delivered(event_id, SINK)
        except Exception:  # a full disk: the event is sent again at the next start
            logger.exception("mqtt: recording event %s as delivered failed", event_id)
