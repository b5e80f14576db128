"""Faults: PostgreSQL stopped or unreachable (a TCP proxy on loopback in front of the real server, which is
never touched) answers 503 ``database_unavailable`` quickly, not a hang or a 500, and the service recovers
when the database comes back; a request over the time limit answers 504 and the service keeps serving."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.config import Settings
from app.main import create_app
from tests.app.conftest import _postgres_schema_url, png_bytes
from tests.app.server import free_port

# Far above the 1 s connect timeout used here: reaching it means the request hung.
HANG_GUARD_S = 60


class TcpProxy:
    """127.0.0.1:``port`` in front of the PostgreSQL server. ``stop()`` is the server going away (listener
    closed, every connection cut), ``start("blackhole")`` one that accepts connections and never answers
    (unreachable), ``start()`` the server coming back on the same address."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.running: threading.Event | None = None
        self.acceptor: threading.Thread | None = None

    def start(self, mode: str = "forward") -> None:
        self.stop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.running = threading.Event()
        self.running.set()
        self.acceptor = threading.Thread(target=self._accept, args=(listener, mode, self.running), daemon=True)
        self.acceptor.start()

    def _accept(self, listener: socket.socket, mode: str, running: threading.Event) -> None:
        with listener:
            while running.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                client.settimeout(None)
                with self.lock:
                    self.sockets.append(client)
                if mode == "blackhole":
                    continue  # held open, never answered
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
                with self.lock:
                    self.sockets.append(upstream)
                for src, dst in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.running is not None and self.acceptor is not None:
            self.running.clear()  # the accept loop ends and closes the listener within 0.1 s
            self.acceptor.join(HANG_GUARD_S)
            self.running = self.acceptor = None
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def proxied_postgres() -> Iterator[tuple[TcpProxy, str]]:
    for url in _postgres_schema_url():
        parsed = make_url(url)
        proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
        try:
            yield proxy, parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        finally:
            proxy.stop()


def _answer(call: Callable[[], Any]) -> Any:
    """The answer of ``call``, failing (instead of waiting for ever) if the service hangs."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=HANG_GUARD_S)
    finally:
        pool.shutdown(wait=False)  # a hung call is left behind, not waited for


def _assert_database_unavailable(client: TestClient, entry_id: int) -> None:
    calls = {
        "list": lambda: client.get("/gallery"),
        "get": lambda: client.get(f"/gallery/{entry_id}"),
        "enrol": lambda: client.post(
            "/gallery", files={"files": ("b.png", png_bytes(2), "image/png")}, data={"identity": "bob"}
        ),
        "query": lambda: client.post("/query", files={"file": ("q.png", png_bytes(1), "image/png")}),
        "delete": lambda: client.delete(f"/gallery/{entry_id}"),
        "identities": lambda: client.get("/identities"),
        "ready": lambda: client.get("/ready"),
    }
    for name, call in calls.items():
        response = _answer(call)
        assert response.status_code == 503, (name, response.text)
        problem = response.json()
        assert problem["code"] == "database_unavailable" and "database is unreachable" in problem["detail"], name
        assert "Traceback" not in response.text
    assert _answer(lambda: client.get("/health")).status_code == 200  # liveness does not need the database


@pytest.mark.postgres
def test_postgres_stopped_or_unreachable_gives_503_then_recovers(
    settings: Settings, proxied_postgres: tuple[TcpProxy, str]
) -> None:
    proxy, url = proxied_postgres
    proxy.start()
    settings = settings.model_copy(update={"database_url": url, "db_connect_timeout_s": 1})
    with TestClient(create_app(settings)) as client:
        files = {"files": ("a.png", png_bytes(1), "image/png")}
        [entry] = client.post("/gallery", files=files, data={"identity": "alice"}).json()

        proxy.stop()  # the server goes away: connections reset, new ones refused
        _assert_database_unavailable(client, entry["id"])
        proxy.start("blackhole")  # unreachable: connections accepted, never answered
        _assert_database_unavailable(client, entry["id"])

        proxy.start()  # back: the same entry, nothing half-written during the outage
        page = client.get("/gallery").json()
        assert [e["id"] for e in page["items"]] == [entry["id"]]
        assert client.get("/ready").status_code == 200
        query = client.post("/query", files={"file": ("q.png", png_bytes(1), "image/png")}).json()
        assert query["results"][0]["matches"][0]["id"] == entry["id"]
        assert client.post("/gallery", files=files, data={"identity": "alice"}).status_code == 201
        assert client.get("/gallery").json()["total"] == 2


@pytest.mark.postgres
def test_postgres_down_at_start_up_then_back(settings: Settings, proxied_postgres: tuple[TcpProxy, str]) -> None:
    proxy, url = proxied_postgres  # not started: nothing listens on its port yet
    settings = settings.model_copy(update={"database_url": url, "db_connect_timeout_s": 1})
    with TestClient(create_app(settings)) as client:
        for path in ("/ready", "/gallery"):
            response = client.get(path)
            assert response.status_code == 503 and response.json()["code"] == "not_ready"
        assert client.get("/health").json()["ready"] is False
        proxy.start()
        for _ in range(HANG_GUARD_S * 4):  # the start-up retries every 2 s
            if client.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.25)
        assert client.get("/ready").status_code == 200
        files = {"files": ("a.png", png_bytes(1), "image/png")}
        assert client.post("/gallery", files=files, data={"identity": "alice"}).status_code == 201


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` behind a real uvicorn server in a thread on 127.0.0.1; its base URL. (A TestClient answers only
    once the app has returned, so it cannot show a 504 sent while the work is still going on.)"""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(HANG_GUARD_S * 10):
            if server.started:
                break
            threading.Event().wait(0.1)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(HANG_GUARD_S)


def test_request_over_the_time_limit_gives_504_and_service_goes_on(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"request_timeout_s": 0.5}))
    release, finished = threading.Event(), threading.Event()
    with serving(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD_S) as client:
        embedder = app.state.reid.embedder
        embed_sync = embedder.embed_sync

        def stuck(images: list) -> Any:
            release.wait(HANG_GUARD_S)  # a forward pass that does not end before the request's time limit
            finished.set()
            return embed_sync(images)

        embedder.embed_sync = stuck
        response = client.post("/embed", files={"files": ("a.png", png_bytes(1), "image/png")})
        assert response.status_code == 504, response.text
        assert response.json()["code"] == "timeout" and "0.5 s" in response.json()["detail"]
        assert not finished.is_set()  # answered while the work was still stuck, not after it
        assert client.get("/health").status_code == 200
        embedder.embed_sync = embed_sync
        release.set()
        response = client.post("/embed", files={"files": ("a.png", png_bytes(1), "image/png")})
        assert response.status_code == 200, response.text
        assert client.get("/ready").status_code == 200
