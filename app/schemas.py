"""Response models; every field documented with an example (they make the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class EntryOut(BaseModel):
    id: int = Field(description="entry id (also its FAISS id)", examples=[42])
    identity: str = Field(description="the person's identity label", examples=["0001"])
    camera: str | None = Field(None, description="camera the crop came from", examples=["c1"])
    metadata: dict[str, Any] = Field(default_factory=dict, description="free metadata", examples=[{"site": "A"}])
    created_at: datetime = Field(description="when it was enrolled (UTC)", examples=["2026-01-01T12:00:00Z"])
    captured_at: datetime = Field(
        description="when the crop was taken (UTC; the upload time unless given)", examples=["2026-01-01T11:58:03Z"]
    )
    width: int = Field(description="stored crop width in pixels", examples=[64])
    height: int = Field(description="stored crop height in pixels", examples=[128])


class EntryPage(BaseModel):
    total: int = Field(description="entries matching the filter", examples=[120])
    offset: int = Field(description="first entry of this page", examples=[0])
    limit: int = Field(description="page size", examples=[50])
    items: list[EntryOut] = Field(description="the entries, by id")


class Match(BaseModel):
    id: int = Field(description="matching entry id", examples=[42])
    identity: str = Field(description="its identity", examples=["0001"])
    camera: str | None = Field(None, description="its camera", examples=["c2"])
    captured_at: datetime = Field(description="when its crop was taken (UTC)", examples=["2026-01-01T11:58:03Z"])
    distance: float = Field(description="Euclidean (not squared) L2 distance between templates", examples=[3.2])
    similarity: float = Field(
        description="a score in [0, 1], higher = more alike; what it means is the result's `similarity_meaning`: "
        "1 - false_match_rate with calibrated weights, else 1 / (1 + distance)",
        examples=[0.998],
    )
    false_match_rate: float | None = Field(
        None,
        description="share of pairs of different people (the weights' calibration split) at this distance or closer: "
        "how often a stranger comes this close; none when the weights carry no calibration curve",
        examples=[0.002],
    )


class IdentityMatch(BaseModel):
    identity: str = Field(description="identity label", examples=["0001"])
    distance: float = Field(description="best (smallest) L2 distance among its matching entries", examples=[3.2])
    similarity: float = Field(description="its best match's similarity", examples=[0.998])
    false_match_rate: float | None = Field(None, description="its best match's false-match rate", examples=[0.002])
    hits: int = Field(description="how many of the top-k matches are this identity", examples=[3])
    match: bool = Field(description="false when the distance is over the threshold", examples=[True])


class QueryResult(BaseModel):
    filename: str | None = Field(
        None, description="the uploaded file's name (a track query: none, see `files`)", examples=["probe.jpg"]
    )
    files: int = Field(1, description="crops this ranking is made from (more than 1: a track query)", examples=[1])
    matches: list[Match] = Field(description="nearest entries first")
    identities: list[IdentityMatch] = Field(description="identities by best distance, nearest first")
    threshold: float | None = Field(None, description="L2 distance threshold used (none = all match)", examples=[5.0])
    threshold_source: str | None = Field(
        None,
        description='where the threshold came from: "request", "weights (FMR 0.01, val)" (calibrated), or none',
        examples=["weights (FMR 0.01, val)"],
    )
    similarity_meaning: str = Field(
        description="what `similarity` is here: 1 - the false-match rate (calibrated weights), or 1 / (1 + distance)"
    )
    mask_png_base64: str | None = Field(None, description="the query's attention mask (include_mask=true)")


class QueryResponse(BaseModel):
    results: list[QueryResult] = Field(description="one result per uploaded file, in order")


class EmbedResult(BaseModel):
    filename: str | None = Field(None, description="the uploaded file's name", examples=["crop.jpg"])
    embedding: list[float] = Field(description="the template (feat_dim values)", examples=[[0.0, 0.12, 1.3]])


class EmbedResponse(BaseModel):
    dim: int = Field(description="template length", examples=[512])
    results: list[EmbedResult] = Field(description="one per uploaded file, in order")


class IdentityOut(BaseModel):
    identity: str = Field(description="identity label", examples=["0001"])
    entries: int = Field(description="number of enrolled crops", examples=[4])
    # UI branch: the page's thumbnail; fetch it with GET /gallery/{thumbnail}/image.
    thumbnail: int | None = Field(None, description="entry id of its first enrolled crop", examples=[42])


class DeleteResult(BaseModel):
    deleted: int = Field(description="number of entries deleted", examples=[1])


class BackendParity(BaseModel):
    ok: bool = Field(description="whether the backend clears both bars (a served backend always does)")
    min_cosine: float = Field(description="smallest cosine of an output with fp32 PyTorch's on the check set")
    required_cosine: float = Field(
        description="the bar: 0.999 for fp32 backends, REID_PARITY_MIN_COSINE_REDUCED (0.99) for bf16 and INT8"
    )
    nn_agreement: float | None = Field(
        None, description="share of check crops whose nearest neighbour is unchanged (templates on real crops only)"
    )
    required_nn_agreement: float | None = Field(None, description="the bar: REID_PARITY_MIN_NN_AGREEMENT")
    check_set: str = Field(description="what the check ran on", examples=["128 crops of /data/crops"])


class BackendStatus(BaseModel):
    name: str = Field(description="what runs the network", examples=["openvino CPU int8 (NNCF)"])
    kind: str = Field(description="its REID_BACKEND value", examples=["openvino-int8"])
    parity: BackendParity | None = Field(None, description="null: the fp32 PyTorch reference itself")
    auto_timings_ms: dict[str, float] = Field(
        default_factory=dict, description="under auto: each candidate that passed, ms per crop at batch 1"
    )
    refused: dict[str, str] = Field(default_factory=dict, description="under auto: candidates refused, and why")


class Health(BaseModel):
    status: str = Field(description="always ok when the process answers", examples=["ok"])
    ready: bool = Field(description="model warmed up and index matching the database", examples=[True])
    trained_weights: bool = Field(description="false: no trained weights, matches are meaningless", examples=[True])
    warning: str | None = Field(None, description="why matches may be meaningless", examples=[None])
    weights: str | None = Field(
        None,
        description="the weights file served: REID_WEIGHTS, or without it the untrained one kept in the data folder",
        examples=["/weights/reid.safetensors"],
    )
    backbone: str = Field(description="extractor backbone", examples=["resnet50"])
    feat_dim: int = Field(description="template length", examples=[512])
    mask_generator: bool = Field(description="the weights hold a mask generator", examples=[True])
    provenance: dict[str, Any] = Field(default_factory=dict, description="what the weights file says about itself")
    device: str = Field(description="torch device", examples=["cuda:0"])
    backend: str = Field(
        description="what runs the extractor (REID_BACKEND)", examples=["onnxruntime CPUExecutionProvider"]
    )
    backends: dict[str, BackendStatus] = Field(
        default_factory=dict, description="per network (extractor, mask_generator): what serves it and why"
    )
    fingerprint: str = Field(description="sha256 of the extractor's config and tensors", examples=["3f2a..."])
    gallery_size: int = Field(description="entries in the index", examples=[1200])
    auth: Literal["api_key", "disabled"] = Field(
        description="api_key: every route but /health needs X-API-Key; disabled: REID_ALLOW_UNAUTHENTICATED=true, "
        "no authentication",
        examples=["api_key"],
    )


class Ready(BaseModel):
    ready: bool = Field(description="true when serving", examples=[True])


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every 4xx/5xx answer (``application/problem+json``)."""

    type: str = Field(description="URI naming the problem", examples=["https://reid.example/problems/entry_not_found"])
    title: str = Field(description="short summary of the problem", examples=["entry not found"])
    status: int = Field(description="the HTTP status", examples=[404])
    detail: str = Field(description="what was wrong and what is allowed", examples=["no gallery entry with id 7"])
    code: str = Field(description="stable machine-readable code", examples=["entry_not_found"])
    errors: list[dict[str, Any]] | None = Field(None, description="validation errors (422 only): loc, msg, type")


class TrackletOut(BaseModel):
    camera: str = Field(description="the tracklet's camera", examples=["c1"])
    track: str | None = Field(None, description="the tracker's id (none: a crop sent alone)", examples=["17"])
    identity: str = Field(
        description="who it was grouped with: a name, or a provisional person's label", examples=["unknown-42"]
    )
    person: int | None = Field(None, description="the person (GET /people/{id}); none: an identity enrolled by name")
    joined: Literal["track", "match", "new"] = Field(
        description="track: its track was already seen on this camera; match: nearest under the join threshold; "
        "new: nobody matched, a provisional person was started",
        examples=["match"],
    )
    distance: float | None = Field(None, description="L2 distance to what it joined (match only)", examples=[3.1])
    entries: list[int] = Field(description="the entries made of its crops, in file order", examples=[[101, 102]])


class SightingsResult(BaseModel):
    tracklets: list[TrackletOut] = Field(description="one per tracklet, in order of each one's first file")
    threshold: float | None = Field(
        None, description="the join threshold used (none: no weights' calibration, every tracklet new or continued)"
    )
    threshold_source: str | None = Field(
        None, description='"REID_JOIN_THRESHOLD", "weights (FMR 0.01, val)" or none', examples=["weights (FMR 0.01)"]
    )
    provisional_threshold: float | None = Field(
        None,
        description="the stricter threshold under which a tracklet joins a provisional person (the weights' "
        "one at REID_PROVISIONAL_JOIN_FMR, never above the join threshold); identities use the join one",
    )


class CameraSeen(BaseModel):
    camera: str | None = Field(None, description="camera", examples=["c2"])
    sightings: int = Field(description="crops on this camera", examples=[5])
    first_seen: datetime = Field(description="earliest capture time on it (UTC)")
    last_seen: datetime = Field(description="latest capture time on it (UTC)")
    thumbnail: int = Field(description="an entry on this camera (GET /gallery/{id}/image)", examples=[101])


class PersonOut(BaseModel):
    id: int = Field(description="person id: stable across re-groupings", examples=[42])
    identity: str = Field(description="its sightings' identity: its name, or unknown-<id>", examples=["unknown-42"])
    status: Literal["provisional", "named", "ignored", "merged"] = Field(
        description="provisional: awaiting review; named; ignored: not a person; merged into another",
        examples=["provisional"],
    )
    merged_into: int | None = Field(None, description="where its sightings went (status merged)")
    sightings: int = Field(description="crops grouped into it", examples=[12])
    tracks: int = Field(description="distinct (camera, track) pairs among them", examples=[3])
    first_seen: datetime | None = Field(None, description="earliest capture time (UTC)")
    last_seen: datetime | None = Field(None, description="latest capture time (UTC)")
    cameras: list[CameraSeen] = Field(default_factory=list, description="per camera, most recent first")


class Visit(BaseModel):
    camera: str | None = Field(None, description="camera", examples=["c2"])
    first_seen: datetime = Field(description="start of the visit (UTC)")
    last_seen: datetime = Field(description="end of the visit (UTC)")
    sightings: int = Field(description="crops in the visit", examples=[4])
    entries: list[int] = Field(description="the visit's entries, by time")


class Timeline(BaseModel):
    person: PersonOut = Field(description="the person, as GET /people lists them")
    visits: list[Visit] = Field(
        description="consecutive sightings on one camera, split where the camera changes or REID_VISIT_GAP_S passes "
        "without one; by time"
    )


class PeopleCount(BaseModel):
    people: int = Field(description="distinct people (named or provisional, not ignored) seen", examples=[17])
    cameras: list[str] | None = Field(None, description="the cameras counted (none: all)")
    after: datetime | None = Field(None, description="from (inclusive)")
    before: datetime | None = Field(None, description="until (exclusive)")


class RegroupOut(BaseModel):
    units: int = Field(description="what was grouped: tracks, lone crops and fixed people (named, reviewed, ignored)")
    groups: int = Field(description="groups found")
    moved: int = Field(description="sightings whose person changed")
    new_people: int = Field(description="provisional people started")
    retired_people: int = Field(description="provisional people left without sightings (recorded as merged)")
    seconds: float = Field(description="how long it took")
    skipped: str | None = Field(None, description="why nothing was written (a review came in, another replica ran)")
    threshold: float = Field(description="the join threshold it grouped with")
