"""The service's ``POST /sightings`` seen from the client: retries, back-off, Retry-After and what a refusal means."""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported where used: httpx is in the dev extra only, and `reid-admin migrate` in the service's image (which
    # builds this parser too) must not need it.
    import httpx


from app.ingest.errors import IngestError

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})  # overloaded, starting, or a proxy without its upstream
MAX_RETRY_AFTER_S = 300.0  # a Retry-After past this is read as this: a run should not sleep for hours


# -- the service -----------------------------------------------------------------------------------------------


def idempotency_key(camera: str, tracks: Sequence[str], tracks_sha256: str) -> str:
    """The same request (camera, its tracks, the same tracks file) always gets the same key."""
    digest = hashlib.sha256("\0".join([camera, tracks_sha256, *tracks]).encode("utf-8", "surrogatepass"))
    return f"reid-ingest-{digest.hexdigest()}"


def _problem(response: httpx.Response) -> str:
    """The service's ``{"detail", "code"}`` as words; any other body, its start."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        code = f" {body['code']}" if body.get("code") else ""
        return f"{response.status_code}{code}: {body['detail']}"
    return f"{response.status_code}: {response.text[:200].strip() or response.reason_phrase}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, (when - datetime.now(UTC)).total_seconds()))


class Service:
    """``POST /sightings`` with retries: 429, 503 (and a proxy's 502/504) or a lost connection are retried with
    back-off, honouring Retry-After; any other error stops the run."""

    def __init__(self, client: httpx.Client, retries: int = 8, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client  # its base_url, and its headers: the API key
        self.retries = retries
        self.sleep = sleep
        self.requests = 0

    def check(self) -> None:
        """Fail before decoding anything when the service is unreachable or refuses the key."""
        import httpx

        try:
            response = self.client.get("/ready")
        except httpx.HTTPError as exc:
            raise IngestError(f"cannot reach the service at {self.client.base_url}: {exc}; is it running?") from None
        if response.status_code in (401, 403):
            raise IngestError(
                f"the service refused the API key ({_problem(response)}): pass --api-key or set REID_API_KEY"
            )

    def post(self, files: list[tuple[str, bytes]], sightings: list[dict[str, Any]], key: str) -> dict[str, Any]:
        """The 201 answer's JSON for one request, sent again until acknowledged or refused."""
        import httpx

        headers = {"Idempotency-Key": key}
        parts = [("files", (name, data, "image/jpeg")) for name, data in files]
        form = {"sightings": json.dumps(sightings)}
        for attempt in range(1, self.retries + 1):
            backoff = min(30.0, 2.0 ** (attempt - 1))
            try:
                response = self.client.post("/sightings", headers=headers, data=form, files=parts)
            except httpx.TransportError as exc:  # the answer may be lost: the same key makes the retry safe
                why, delay = f"{type(exc).__name__}: {exc}", backoff
            else:
                if response.status_code == 201:
                    self.requests += 1
                    return _answer(response)
                if response.status_code not in RETRY_STATUSES:
                    raise IngestError(_refusal(response))
                why, delay = _problem(response), _retry_after(response)
                delay = backoff if delay is None else delay
            if attempt == self.retries:
                raise IngestError(
                    f"the service at {self.client.base_url} still failed after {attempt} tries "
                    f"({why}); run again later: it resumes"
                )
            logger.warning(
                "POST /sightings failed (%s): retrying in %.1f s (try %d of %d)", why, delay, attempt, self.retries
            )
            self.sleep(delay)
        raise AssertionError("unreachable")


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise IngestError(f"the service answered 201 without a JSON object: {response.text[:200]!r}")
    return body


def _refusal(response: httpx.Response) -> str:
    problem = _problem(response)
    if "idempotency_key_reused" in problem:  # a stopped run's request, now with other crops
        return (
            f"the service refused the request ({problem}): these tracks were sent before with other crops (were "
            "--best-k, --min-box or the frames changed since a run that stopped?); rerun with the same options, "
            "or pass another --camera"
        )
    return f"the service refused the request ({problem})"


def track_persons(answer: dict[str, Any], camera: str, tracks: Sequence[str]) -> dict[str, str | None]:
    """Each sent track's person in the answer (None where the answer does not say)."""
    persons: dict[str, str | None] = dict.fromkeys(tracks)
    for tracklet in answer.get("tracklets") or []:
        if isinstance(tracklet, dict) and tracklet.get("camera") == camera and tracklet.get("track") in persons:
            persons[tracklet["track"]] = tracklet.get("person")
    return persons
