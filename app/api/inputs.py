"""What clients send as text, checked at the door: each refusal is a 422 with a sentence, before anything is
stored, so that nothing stored can make a later read fail.

The metadata form field is I-JSON (RFC 7493): a JSON object of at most ``max_bytes`` bytes (UTF-8), ``max_depth``
levels and ``max_keys`` keys in all; no NaN or Infinity (Python's ``json`` reads them, no JSON reader must), no
lone surrogate (PostgreSQL and a UTF-8 answer cannot hold one), no integer beyond +-(2**53 - 1) (a JavaScript
client would round it), no duplicate key. Its depth is counted before it is parsed: a 2,000-deep array would
otherwise reach Python's recursion limit inside ``json.loads``. Identities and camera names are printable text:
no control character (NUL included: PostgreSQL refuses it in text) and no lone surrogate."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from app.db import UNNAMED_PREFIX
from app.errors import ApiError

MAX_IDENTITY_LENGTH = 200
MAX_CAMERA_LENGTH = 100
MAX_SAFE_INTEGER = 2**53 - 1  # I-JSON's exact integers: those an IEEE 754 double holds

# A JSON string (escapes included; an unterminated one runs to the end, which keeps the scan linear) or a
# bracket: the brackets outside strings make the depth.
_DEPTH_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
_UNPRINTABLE = frozenset({"Cc", "Cs"})  # control characters (C0, DEL, C1) and surrogates


@dataclass(frozen=True)
class MetadataLimits:
    max_bytes: int
    max_depth: int  # the object itself is depth 1
    max_keys: int  # keys of all the objects in it together


def _invalid(detail: str) -> ApiError:
    return ApiError(422, "invalid_metadata", detail)


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, counted without parsing it (brackets inside
    strings do not count; unbalanced text is left for the parser to refuse)."""
    depth = deepest = 0
    for token in _DEPTH_TOKEN.findall(text):
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def _constant(name: str) -> Any:
    raise _invalid(f"metadata holds {name}: JSON has no such number (RFC 7493); send a finite number or a string")


def _integer(text: str) -> int:
    # Checked on the digits: int() of a 5,000-digit number raises ValueError (Python's digit limit).
    value = int(text) if len(text) <= 20 else None
    if value is None or abs(value) > MAX_SAFE_INTEGER:
        shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
        raise _invalid(
            f"metadata holds the integer {shown}, beyond +-(2**53 - 1), the integers every JSON reader keeps "
            "exactly (RFC 7493); send a smaller one or a string"
        )
    return value


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _invalid(f"metadata holds the number {text[:24]}, beyond a double's range (RFC 7493)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _invalid(f"metadata repeats the key {duplicate!r}: each key of an object at most once (RFC 7493)")
    return value


def _printable_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from the escape "\ud800"
        return False
    return True


def _check_tree(value: Any, limits: MetadataLimits) -> None:
    """Every key and string encodes as UTF-8, and the keys are within their number (the depth was counted)."""
    keys = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            keys += len(item)
            if keys > limits.max_keys:
                raise _invalid(f"metadata holds over {limits.max_keys} keys in all (REID_MAX_METADATA_KEYS)")
            for key in item:
                if not _printable_utf8(key):
                    raise _invalid(f"metadata has a key with a lone surrogate ({key!r}): not Unicode text")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not _printable_utf8(item):
            raise _invalid(f"metadata holds a string with a lone surrogate ({item[:40]!r}): not Unicode text")


def parse_metadata(text: str | None, limits: MetadataLimits) -> dict[str, Any]:
    """The metadata form field as a dict (absent or empty: ``{}``), or a 422 ``invalid_metadata`` saying why."""
    if not text:
        return {}
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise _invalid(f"metadata is {size} bytes: over the {limits.max_bytes}-byte limit (REID_MAX_METADATA_BYTES)")
    depth = _json_depth(text)
    if depth > limits.max_depth:
        raise _invalid(
            f"metadata nests {depth} levels deep: at most {limits.max_depth} (REID_MAX_METADATA_DEPTH), "
            "the object itself counting as one"
        )
    try:
        value = json.loads(
            text,
            parse_constant=_constant,
            parse_int=_integer,
            parse_float=_float,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise _invalid(f"metadata must be a JSON object: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # not expected past the checks above; never a 500
        raise _invalid(f"metadata is not I-JSON (RFC 7493): {type(exc).__name__}") from exc
    if not isinstance(value, dict):
        raise _invalid('metadata must be a JSON object, e.g. {"site": "A"}')
    _check_tree(value, limits)
    try:  # what the answer and the database will write: it must write
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"metadata cannot be written back as JSON: {exc}") from exc
    return value


def _check_label(value: str, what: str, code: str, max_length: int) -> str:
    if len(value) > max_length:
        raise ApiError(422, code, f"{what} is {len(value)} characters: at most {max_length}")
    bad = next((ch for ch in value if unicodedata.category(ch) in _UNPRINTABLE), None)
    if bad is not None:
        kind = "a lone surrogate" if unicodedata.category(bad) == "Cs" else "a control character"
        raise ApiError(422, code, f"{what} {value[:40]!r} holds {kind} (U+{ord(bad):04X}); use printable Unicode text")
    return value


def check_identity(value: str) -> str:
    """An identity label: 1 to 200 characters, not only whitespace, printable (422 ``invalid_identity``)."""
    if not value.strip():
        raise ApiError(422, "invalid_identity", "identity is empty or only whitespace; send a label, e.g. 0001")
    return _check_label(value, "identity", "invalid_identity", MAX_IDENTITY_LENGTH)


def check_camera(value: str) -> str:
    """A camera name: up to 100 characters, printable (422 ``invalid_camera``); empty stays "no camera"."""
    return _check_label(value, "camera", "invalid_camera", MAX_CAMERA_LENGTH)


def check_track(value: str) -> str:
    """A tracker's track id: up to 200 characters, printable (422 ``invalid_track``)."""
    return _check_label(value, "track", "invalid_track", MAX_IDENTITY_LENGTH)


def check_new_identity(value: str) -> str:
    """An identity a client gives: as ``check_identity``, and not of the form the service's provisional people
    carry (``unknown-42``), which would mix the client's crops into person 42."""
    check_identity(value)
    if re.fullmatch(re.escape(UNNAMED_PREFIX) + r"[0-9]+", value):
        raise ApiError(
            422,
            "reserved_identity",
            f"identity {value!r} has the form of a provisional person's label ({UNNAMED_PREFIX}<id>); "
            "name that person with POST /people/{id}/name, or choose another identity",
        )
    return value
