"""``Idempotency-Key`` on ``POST /gallery``: a retry gets the first answer, never a second enrolment, also when
the first was answered 504 but committed; a key sent with another request is refused."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.conftest import png_bytes


def post(client: TestClient, seed: int, key: str | None, identity: str = "a"):
    files = {"files": (f"{seed}.png", png_bytes(seed), "image/png")}
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/gallery", files=files, data={"identity": identity}, headers=headers)


def total(client: TestClient) -> int:
    return client.get("/gallery").json()["total"]


def test_a_retry_with_the_same_key_gets_the_first_answer(settings: Settings, database_url: str | None) -> None:
    settings = settings.model_copy(update={"database_url": database_url})
    with TestClient(create_app(settings)) as client:
        first = post(client, 1, "enrol-0001")
        assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
        again = post(client, 1, "enrol-0001")
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json() and total(client) == 1
        other = post(client, 2, "enrol-0001")  # another picture under the same key
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
        assert post(client, 1, None).status_code == 201 and total(client) == 2  # no key: a new enrolment
    with TestClient(create_app(settings)) as client:  # kept across a restart
        assert post(client, 1, "enrol-0001").json() == first.json() and total(client) == 2


def test_a_request_answered_504_that_committed_is_not_enrolled_twice_by_its_retry(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"request_timeout_s": 1.0})
    with TestClient(create_app(settings)) as client:
        gallery = client.app.state.reid.gallery
        enroll = gallery.enroll_held
        slow = threading.Event()
        slow.set()

        def commit_then_stall(*args, **kwargs):
            enrolled = enroll(*args, **kwargs)
            if slow.is_set():
                time.sleep(2.0)  # committed, then the answer is too late
            return enrolled

        monkeypatch.setattr(gallery, "enroll_held", commit_then_stall)
        timed_out = post(client, 3, "retry-me")
        assert timed_out.status_code == 504
        time.sleep(2.0)
        slow.clear()
        retry = post(client, 3, "retry-me")
        assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
        assert total(client) == 1 and retry.json()[0]["id"] == client.get("/gallery").json()["items"][0]["id"]


def test_concurrent_requests_with_one_key_enrol_once(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(post(client, 4, "same"))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [a.status_code for a in answers] == [201] * 4
        assert len({a.json()[0]["id"] for a in answers}) == 1 and total(client) == 1


def test_a_malformed_key_is_refused(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        for key in ("x" * 256, "two words"):
            response = post(client, 5, key)
            assert response.status_code == 422, key
        assert total(client) == 0
