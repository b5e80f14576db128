"""Schema fuzzing: schemathesis generates requests from the app's own OpenAPI schema, for every operation,
valid (positive) and invalid (negative) ones, and checks every answer: no 5xx, status code, content type,
headers and body as the schema documents them, invalid requests refused, valid ones accepted.

14 operations, 10 of them in both modes, 15 examples each: about 360 cases, derandomised so that CI sees
the same ones. Then sequences: enrol, then what the schema's links allow with the entry it made (read, image,
mask, list, delete, delete its identity), mixed with every other operation, from a new seed each run (printed
with a failure; ``REID_FUZZ_SEED`` replays one)."""

from __future__ import annotations

import io
import itertools
import os
import random
import warnings

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from PIL import Image
from schemathesis.specs.openapi.checks import ensure_resource_availability
from sqlalchemy import delete

from app.config import Settings
from app.db import IdempotentAnswer, PeopleApart, Person
from app.main import create_app
from tests.app.conftest import png_bytes

OPERATIONS = [
    ("POST", "/gallery"),
    ("GET", "/gallery"),
    ("GET", "/gallery/{entry_id}"),
    ("DELETE", "/gallery/{entry_id}"),
    ("GET", "/gallery/{entry_id}/image"),
    ("POST", "/sightings"),
    ("GET", "/people"),
    ("GET", "/people/count"),
    ("POST", "/people/regroup"),
    ("GET", "/people/{person_id}"),
    ("POST", "/people/{person_id}/name"),
    ("POST", "/people/{person_id}/merge"),
    ("POST", "/people/{person_id}/split"),
    ("POST", "/people/{person_id}/ignore"),
    ("GET", "/identities"),
    ("DELETE", "/identities/{identity}"),
    ("POST", "/query"),
    ("POST", "/embed"),
    ("GET", "/mask/{entry_id}"),
    ("POST", "/mask"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
]
# Operations with an input that can be made invalid; the others take nothing, or any string.
NEGATABLE = {
    "/gallery",
    "/gallery/{entry_id}",
    "/gallery/{entry_id}/image",
    "/identities",
    "/sightings",
    "/people",
    "/people/count",
    "/people/{person_id}",
    "/people/{person_id}/name",
    "/people/{person_id}/merge",
    "/people/{person_id}/split",
    "/people/{person_id}/ignore",
    "/query",
    "/embed",
    "/mask/{entry_id}",
    "/mask",
}
CASES = [(method, path, "positive") for method, path in OPERATIONS] + [
    (method, path, "negative") for method, path in OPERATIONS if path in NEGATABLE
]
EXAMPLES = 15
STATEFUL_EXAMPLES = 40  # sequences: with 26 operations to draw from, 20 sometimes never followed a link
FUZZ_SEED = int(os.environ.get("REID_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
# (format, mode) pairs a client may send; the service turns each into 8-bit RGB.
IMAGE_KINDS = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("JPEG", "CMYK")]
IMAGE_KINDS += [("JPEG", "L"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB")]


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """An encoded image of 1 to 96 pixels a side, in any allowed format and mode."""
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    fmt, mode = draw(st.sampled_from(IMAGE_KINDS))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, small_weights) -> schemathesis.BaseSchema:
    app_settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz"), weights=small_weights, device="cpu")
    # positive_data_acceptance gives way to schema_valid_request_passes_validation below. An invalid request may
    # also be refused 413: the form parser stops at REID_MAX_FORM_FIELDS before the schema is checked.
    refusals = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "positive_data_acceptance": {"enabled": False},
                "negative_data_rejection": {"expected-statuses": refusals},
            }
        }
    )
    # schemathesis starts the app's lifespan on its own event loop and ends it after each test.
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(app_settings), config=config)


def schema_valid_request_passes_validation(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """Stands in for schemathesis' positive_data_acceptance, which wants 2xx for any schema-valid request.

    The schema cannot say "an image" or "a JSON object in this text field", so a schema-valid upload of
    random bytes is rightly refused (400/413/415, or 422 ``invalid_metadata``). What must never happen is a
    request the schema allows failing the schema's own validation (``validation_error``)."""
    if case.meta is not None and case.meta.generation.mode.is_positive and response.status_code == 422:
        problem = response.json()
        assert problem["code"] != "validation_error", f"a schema-valid request was refused: {problem['detail']}"


def test_fuzzed_operations_are_all_of_them(api_schema: schemathesis.BaseSchema) -> None:
    found = sorted((op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations())
    assert found == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[" ".join(c) for c in CASES])
def test_operation_answers_as_documented(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: str
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)), data=st.data())
    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case: schemathesis.Case, data: st.DataObject) -> None:
        # The schema says "bytes" for an upload, so schemathesis sends random text; half the valid cases
        # carry real images instead, so that the answers to accepted uploads are checked as well.
        if mode == "positive" and isinstance(case.body, dict) and data.draw(st.booleans(), label="real images"):
            for field in ("files", "file"):
                if isinstance(case.body.get(field), list):
                    case.body[field] = [data.draw(images()) for _ in case.body[field]]
                elif field in case.body:
                    case.body[field] = data.draw(images())
        case.call_and_validate(additional_checks=[schema_valid_request_passes_validation])

    run()


def test_stateful_sequences_answer_as_documented(api_schema: schemathesis.BaseSchema) -> None:
    answered: set[tuple[str, str, int]] = set()

    class Sequences(api_schema.as_state_machine()):
        def setup(self) -> None:
            # Every sequence starts from the same empty service and sends the same crops: Hypothesis replays a
            # sequence expecting the same answers (the same links to follow), which what the operation tests or
            # earlier sequences left (entries, people, an Idempotency-Key's stored answer) would change, and it
            # then fails with FlakyStrategyDefinition, as CI once did (REID_FUZZ_SEED=2601224738).
            self.pictures = itertools.count(1)
            gallery = api_schema.app.state.reid.gallery
            if gallery is not None:
                gallery.delete(gallery.db_ids().tolist())
                with gallery.sessions() as session, session.begin():
                    session.execute(delete(IdempotentAnswer))
                    session.execute(delete(PeopleApart))
                    session.execute(delete(Person))

        def before_call(self, case: schemathesis.Case) -> None:
            # Real crops, so that enrolments succeed and their links are followed.
            if isinstance(case.body, dict):
                for field in ("files", "file"):
                    if isinstance(case.body.get(field), list):
                        case.body[field] = [png_bytes(next(self.pictures)) for _ in case.body[field]]
                    elif field in case.body:
                        case.body[field] = png_bytes(next(self.pictures))

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            answered.add((case.method, case.path, response.status_code))
            checks = [*(additional_checks or []), schema_valid_request_passes_validation]
            if case.method == "DELETE" and case.path == "/identities/{identity}" and response.status_code == 200:
                self.identity_deleted = True
            # An entry enrolled, then its identity deleted (a link of the enrolment), then the entry read through
            # another link: 404 is right, but schemathesis counts only a DELETE under /gallery/{entry_id} as
            # removing it, and calls the 404 a lost entry. Losing none is tested in real processes (test_crash.py).
            excluded = [ensure_resource_availability] if getattr(self, "identity_deleted", False) else None
            case.validate_response(
                response, additional_checks=checks, excluded_checks=excluded, transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )  # fmt: skip

    def run(fuzz_seed: int) -> None:
        seed(fuzz_seed)(Sequences)
        try:
            Sequences.run(
                settings=settings(
                    max_examples=STATEFUL_EXAMPLES,
                    stateful_step_count=6,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
            )
        except BaseException as exc:
            exc.add_note(f"replay these sequences with REID_FUZZ_SEED={fuzz_seed}")
            raise

    def linked() -> set[tuple[str, str]]:
        """The links followed: an entry just enrolled, read or deleted through them."""
        return {(m, p) for m, p, status in answered if status == 200 and "{entry_id}" in p}

    try:
        run(FUZZ_SEED)
    except FlakyStrategyDefinition as exc:
        # Hypothesis could not replay a sequence: the live service answered it differently the second time (its
        # ids and background threads are state that setup() cannot rewind). schemathesis' own runner retries
        # such a suite; so does this test, once, from the next seed. A failed check is never retried.
        warnings.warn(
            f"REID_FUZZ_SEED={FUZZ_SEED}: a sequence could not be replayed ({exc}); ran the next seed", stacklevel=1
        )
        run(FUZZ_SEED + 1)
    if not linked():
        # Every enrolment these sequences drew was refused (422: fields the schema allows and the service does
        # not, e.g. a reserved identity), as one full run did (REID_FUZZ_SEED=2204682192, which alone passes):
        # they checked every answer but followed no link. Another seed's sequences, once (+2: the flaky retry
        # above may have run +1).
        warnings.warn(f"REID_FUZZ_SEED={FUZZ_SEED}: no sequence enrolled an entry; ran another seed", stacklevel=1)
        run(FUZZ_SEED + 2)
    assert linked(), f"no sequence reached an enrolled entry (REID_FUZZ_SEED={FUZZ_SEED}): {sorted(answered)}"
