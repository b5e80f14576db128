"""The micro-batcher: a lone request never waits for company, requests arriving during a pass share the next
one, the queue has a bound (503 + Retry-After over HTTP), and work whose request is gone is never started."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.embedder import MicroBatcher, QueueFull, request_deadline
from app.main import create_app
from tests.app.conftest import png_bytes

HANG_GUARD_S = 60  # a hang fails the test instead of blocking it; never a timing assertion


class Gate:
    """A ``run`` for the batcher that records its batches and, while closed, blocks (a long forward pass)."""

    def __init__(self, closed: bool = False) -> None:
        self.open = threading.Event()
        if not closed:
            self.open.set()
        self.started = threading.Event()
        self.batches: list[list[Any]] = []

    def __call__(self, images: list[Any]) -> list[Any]:
        self.batches.append(list(images))
        self.started.set()
        assert self.open.wait(HANG_GUARD_S)
        return [f"out-{image}" for image in images]


async def _until(condition, what: str) -> None:
    for _ in range(HANG_GUARD_S * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_lone_request_runs_at_once_even_with_a_long_wait_setting() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = MicroBatcher(gate, max_size=32, max_wait_ms=3_600_000, max_queued=8)  # an hour of waiting
        batcher.start()
        try:
            # Had it waited for company it would wait an hour: the guard turns that into a failure.
            assert await asyncio.wait_for(batcher.submit(["a"]), HANG_GUARD_S) == ["out-a"]
            assert await asyncio.wait_for(batcher.submit(["b", "c"]), HANG_GUARD_S) == ["out-b", "out-c"]
            assert gate.batches == [["a"], ["b", "c"]]
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_requests_arriving_during_a_pass_share_the_next_one() -> None:
    async def main() -> None:
        gate = Gate(closed=True)
        batcher = MicroBatcher(gate, max_size=32, max_wait_ms=0, max_queued=64)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(["a"]))
            await _until(gate.started.is_set, "the first pass started")
            rest = [asyncio.ensure_future(batcher.submit([f"b{i}"])) for i in range(4)]
            await _until(lambda: batcher.queued == 4, "four requests queued")
            gate.open.set()
            assert await asyncio.wait_for(first, HANG_GUARD_S) == ["out-a"]
            answers = await asyncio.wait_for(asyncio.gather(*rest), HANG_GUARD_S)
            assert answers == [[f"out-b{i}"] for i in range(4)]  # each its own answer, in order
            assert gate.batches == [["a"], ["b0", "b1", "b2", "b3"]] and batcher.passes == 2
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_queue_bound_refuses_past_it_and_frees_up() -> None:
    async def main() -> None:
        gate = Gate(closed=True)
        batcher = MicroBatcher(gate, max_size=32, max_wait_ms=0, max_queued=3)
        batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit(["a"]))
            await _until(gate.started.is_set, "the first pass started")
            queued = asyncio.ensure_future(batcher.submit(["b", "c"]))
            await _until(lambda: batcher.queued == 2, "two images queued")
            with pytest.raises(QueueFull, match=r"2 images are waiting for the network \(limit 3\)"):
                await batcher.submit(["d", "e"])
            also = asyncio.ensure_future(batcher.submit(["f"]))  # 3 of 3: still within the bound
            await _until(lambda: batcher.queued == 3, "three images queued")
            gate.open.set()
            await asyncio.wait_for(asyncio.gather(running, queued, also), HANG_GUARD_S)
            assert await asyncio.wait_for(batcher.submit(["d", "e"]), HANG_GUARD_S) == ["out-d", "out-e"]
            assert ["d", "e"] in gate.batches and batcher.queued == 0
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_work_of_a_request_gone_is_never_started() -> None:
    async def main() -> None:
        gate = Gate(closed=True)
        batcher = MicroBatcher(gate, max_size=32, max_wait_ms=0, max_queued=64)
        batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit(["a"]))
            await _until(gate.started.is_set, "the first pass started")
            cancelled = asyncio.ensure_future(batcher.submit(["cancelled"]))
            token = request_deadline.set(time.monotonic() - 1)  # a request already past its time limit (504)
            try:
                late = asyncio.ensure_future(batcher.submit(["late"]))
            finally:
                request_deadline.reset(token)
            kept = asyncio.ensure_future(batcher.submit(["kept"]))
            await _until(lambda: batcher.queued == 3, "three requests queued")
            cancelled.cancel()
            gate.open.set()
            assert await asyncio.wait_for(kept, HANG_GUARD_S) == ["out-kept"]
            with pytest.raises(TimeoutError, match="time limit passed before its forward pass"):
                await late
            await running
            assert gate.batches == [["a"], ["kept"]] and batcher.dropped == 2
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_full_queue_answers_503_with_retry_after(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"batch_queue_size": 1}))
    release = threading.Event()
    with TestClient(app) as client:
        embedder = app.state.reid.embedder
        embed_sync = embedder.embed_sync
        entered = threading.Event()

        def stuck(images: list[Image.Image]) -> Any:
            entered.set()
            assert release.wait(HANG_GUARD_S)
            return embed_sync(images)

        embedder.embed_sync = stuck
        files = {"files": ("a.png", png_bytes(1), "image/png")}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/embed", files=files)  # runs, and blocks in the network
            assert entered.wait(HANG_GUARD_S)
            second = pool.submit(client.post, "/embed", files=files)  # waits in the queue: 1 of 1
            for _ in range(HANG_GUARD_S * 100):
                if embedder.templates.queued == 1:
                    break
                time.sleep(0.01)
            refused = client.post("/embed", files=files)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "overloaded" and refused.headers["retry-after"] == "1"
            query = client.post("/query", files={"file": ("q.png", png_bytes(2), "image/png")})
            assert query.status_code == 503 and query.json()["code"] == "overloaded"
            # An enrolment refused by the network: its crop, stored while the network was asked, is let go.
            enrol = client.post(
                "/gallery", files={"files": ("e.png", png_bytes(3), "image/png")}, data={"identity": "e"}
            )
            assert enrol.status_code == 503 and enrol.json()["code"] == "overloaded"
            assert sum(app.state.reid.gallery.crops._holds.values()) == 0
            release.set()
            assert first.result(HANG_GUARD_S).status_code == 200
            assert second.result(HANG_GUARD_S).status_code == 200
        embedder.embed_sync = embed_sync
        assert client.post("/embed", files=files).status_code == 200
        assert "reid_overloaded_total 3.0" in client.get("/metrics").text


def test_work_of_a_request_answered_504_is_never_started(settings: Settings) -> None:
    import httpx

    from tests.app.test_faults import serving

    # 2 s: time enough, on a busy machine, for the first request to reach its forward pass before its limit.
    app = create_app(settings.model_copy(update={"request_timeout_s": 2.0}))
    release = threading.Event()
    calls: list[int] = []
    with serving(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD_S) as client:
        embedder = app.state.reid.embedder
        embed_sync = embedder.embed_sync

        def stuck(images: list[Image.Image]) -> Any:
            calls.append(len(images))
            assert release.wait(HANG_GUARD_S)
            return embed_sync(images)

        embedder.embed_sync = stuck
        one = {"files": ("a.png", png_bytes(1), "image/png")}
        two = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in (2, 3)]
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/embed", files=one)  # its pass starts, and sticks
            for _ in range(HANG_GUARD_S * 100):
                if calls:
                    break
                time.sleep(0.01)
            second = pool.submit(client.post, "/embed", files=two)  # queued behind it
            assert first.result(HANG_GUARD_S).status_code == 504
            assert second.result(HANG_GUARD_S).status_code == 504
        release.set()
        for _ in range(HANG_GUARD_S * 100):
            if embedder.templates.dropped == 1:
                break
            time.sleep(0.01)
        assert embedder.templates.dropped == 1 and calls == [1]  # the queued work was dropped, never run
        embedder.embed_sync = embed_sync
        assert client.post("/embed", files=two).status_code == 200
