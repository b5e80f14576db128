"""The service's settings, read once from ``REID_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.backends.base import BACKENDS, KINDS
from models import BACKBONES

MIN_API_KEY_LENGTH = 16
# Keys copied from examples and tutorials, compared lower-cased without separators: the first thing an attacker
# tries. Random keys (openssl rand -hex 32) never look like these.
PLACEHOLDER_KEYS = frozenset(
    {
        "admin", "apikey", "changeit", "changeme", "default", "dummy", "example", "fixme", "key", "letmein",
        "mysecret", "none", "password", "placeholder", "qwerty", "reid", "replaceme", "secret", "secretkey",
        "supersecret", "test", "testing", "todo", "token", "yourapikey", "yourkey", "yoursecret",
    }
)  # fmt: skip
PLACEHOLDER_MARKERS = ("changeme", "replaceme", "placeholder", "yourapikey", "yourkey", "yoursecret", "example")
KEY_HOW_TO = "generate one with `openssl rand -hex 32`"


class Settings(BaseSettings):
    """Every knob of the service; the environment variable is the field name upper-cased with ``REID_``."""

    # Errors never echo what was given: REID_API_KEY and the password in REID_DATABASE_URL are secrets.
    model_config = SettingsConfigDict(env_prefix="REID_", env_file=None, extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(Path("./data"), description="SQLite file, FAISS index file and stored crops")
    weights: Path | None = Field(None, description="weights file written by training (models.save_weights)")
    pretrained: Path | None = Field(None, description="ImageNet weights for the trunk when no weights file is set")
    backbone: str = Field("resnet50", description="backbone built when no weights file is set")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    backend: str = Field(
        "auto",
        description=f"{' | '.join(BACKENDS)}; auto: on a CPU the fastest of backend_candidates that passes the "
        "parity check, timed at start-up; on CUDA, PyTorch autocast",
    )
    backend_candidates: str = Field(
        ",".join(k for k in KINDS if k != "torch"),
        description="what auto times on a CPU, comma-separated (fp32 PyTorch is its fallback, never a candidate)",
    )
    parity_min_cosine_reduced: float = Field(
        0.99, gt=0, le=1, description="bf16 and INT8 backends: each check template's least cosine with fp32 PyTorch"
    )
    parity_min_nn_agreement: float = Field(
        0.99, gt=0, le=1, description="every backend: least share of check crops whose nearest neighbour is unchanged"
    )
    calibration_dir: Path | None = Field(
        None,
        description="crops for INT8 calibration and the backends' parity check; default: the gallery's stored crops",
    )
    cuda_dtype: str = Field(
        "auto", description="CUDA autocast of the torch backend: auto (bf16 where supported) | bf16 | fp16 | fp32"
    )
    cuda_graph_batches: str = Field(
        "1,2,4,8,16,32", description="CUDA graph batch-size buckets of the torch backend; empty = none"
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite under data_dir")
    index_factory: str = Field(
        "Flat",
        description="gallery index: Flat (exact), SQ8, IVF<nlist>[,SQ8], IVF (nlist from the data), HNSW<M>[,SQ8]",
    )
    index_nprobe: int = Field(16, ge=1, description="IVF lists searched per query (recall against speed)")
    index_ef_search: int = Field(64, ge=1, description="HNSW candidate list per query (recall against speed)")
    snapshot_every: int = Field(10_000, ge=1, description="write an index snapshot after this many changes")
    snapshot_interval_s: float = Field(300.0, gt=0, description="and at least this often (s) while there are changes")
    replica_poll_s: float = Field(
        1.0, gt=0, description="catch up with other replicas' changes at least this often (s); NOTIFY wakes sooner"
    )
    write_lock_timeout_s: float = Field(
        10.0, gt=0, description="a write waits at most this for the writers' lock, then answers 503 + Retry-After"
    )
    migrate_on_start: bool = Field(True, description="apply database migrations at start-up (else: reid-admin migrate)")
    api_key: str | None = Field(
        None,
        description=f"every route but /health needs it in X-API-Key; at least {MIN_API_KEY_LENGTH} characters, "
        f"{KEY_HOW_TO}; required unless allow_unauthenticated",
        repr=False,
    )
    allow_unauthenticated: bool = Field(
        False,
        description="serve with no API key at all (api_key unset): only on loopback or behind a proxy that "
        "authenticates; without a key and without this the service refuses to start",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(
        2048 * 2048, ge=1, description="pixels of one image, from its header before decoding (person crops are small)"
    )
    max_image_side: int = Field(
        1024, ge=16, description="a decoded image longer than this (px) is downscaled to it, keeping its aspect"
    )
    max_request_pixels: int = Field(
        32 * 1024 * 1024, ge=1, description="decoded pixels of all the images of one request (~100 MB as RGB)"
    )
    max_files_per_request: int = Field(64, ge=1)
    max_request_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="a whole request body, counted as it streams (never more than max_files_per_request x "
        "max_upload_bytes + 1 MiB): what a request can make the service spool to disk",
    )
    max_form_fields: int = Field(
        256, ge=16, description="text fields of one form, counted while it is parsed (a query's camera lists included)"
    )
    max_metadata_bytes: int = Field(16 * 1024, ge=64, description="the metadata JSON object, in UTF-8 bytes")
    max_metadata_depth: int = Field(
        8, ge=1, le=64, description="nesting of objects and arrays in the metadata (the object itself is 1)"
    )
    max_metadata_keys: int = Field(256, ge=1, description="keys in the metadata, its nested objects' included")
    batch_max_size: int = Field(32, ge=1)
    batch_max_wait_ms: float = Field(5.0, ge=0, description="a batch with company waits at most this for more")
    batch_queue_size: int = Field(256, ge=1, description="images waiting for the network; past it 503 + Retry-After")
    threshold_fmr: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="default query threshold: the weights' calibrated one at this false-match rate (at another rate, "
        "the distance their false-match curve gives it, 1e-4 and up)",
    )
    join_threshold: float | None = Field(
        None,
        ge=0,
        description="L2 distance under which an unnamed sighting joins a person or identity (POST /sightings); "
        "default: the weights' calibrated query threshold; weights without one: each tracklet starts a person",
    )
    # 1e-4: online, a sighting meets every person at once. Against 1e-3 it raised online BCubed F on the sets the
    # weights were not calibrated on (cuhk01-site 0.39 -> 0.56 with the source, 0.59 -> 0.69 adapted; the ingest
    # clip 0.32 -> 0.60) and precision everywhere, for 0.03 to 0.06 F on CUHK03 val's own (docs/RESULTS.md).
    provisional_join_fmr: float = Field(
        0.0001,
        gt=0,
        lt=1,
        description="false-match rate of the weights' threshold (calibrated, or from their false-match curve, which "
        "resolves 1e-4 and up) under which an unnamed sighting joins a provisional person online (never above the "
        "join threshold); a named identity is joined under the join threshold. A 1:N search meets every person "
        "once: at the query's rate, a stranger's sighting finds someone under it in most searches of a gallery of "
        "hundreds",
    )
    tracklet_spread_correction: bool = Field(
        True,
        description="add back to a tracklet's distances the part its template lost to averaging its crops (their "
        "scatter about their mean x (1 - 1/k)), so that they mean what the crop-pair thresholds mean, online and "
        "in re-grouping (each unit's mean); off: the mean's own distance, nearer to everyone",
    )
    tracklet_aggregation: Literal["mean", "quality"] = Field(
        "mean",
        description="a tracklet's template: the mean of its crops' templates, or weighted by box area x confidence",
    )
    track_gap_s: float = Field(
        600.0, gt=0, description="a sighting's track continues an earlier one of its camera this recently seen (s)"
    )
    transit_table: Path | None = Field(
        None,
        description="a CSV file of camera_a,camera_b,min_seconds rows: the least time anyone takes between two "
        "cameras; sightings at both closer in time than that are two people, online and in re-grouping "
        "(app/transit.py); unset: no such constraint",
    )
    regroup_interval_s: float = Field(
        3600.0, ge=0, description="re-group all sightings this often (s), repairing the online joins; 0 = never"
    )
    regroup_eps: float = Field(
        0.5,
        gt=0,
        le=1,
        description="re-grouping links two lone crops only within this k-reciprocal Jaccard distance (and under the "
        "join threshold): lower = fewer strangers put together, more people split",
    )
    regroup_track_eps: float = Field(
        0.3,
        gt=0,
        le=1,
        description="the same for a pair with a unit of several crops (a track, a person): a person seen in tracks "
        "is a few units, linked mostly as each other's nearest, where one seen in crops is many",
    )
    regroup_query_expansion: int = Field(
        2,
        ge=1,
        le=11,  # app.regroup.NEIGHBOURS + 1: the expansion draws on a unit's own neighbours only
        description="the k2 of re-grouping's Jaccard distance: each unit's neighbourhood is averaged with that of "
        "its k2 - 1 nearest units (Zhong et al.'s is 6; 2 groups better where people are seen a few times, "
        "docs/RESULTS.md); 1 = none",
    )
    # Events (app/events): a named or watched person seen by POST /sightings, told to a webhook and/or MQTT.
    webhook_url: str | None = Field(
        None,
        description="POST a signed person.seen event here (JSON) when a named or watched person is seen; "
        "unset = no webhook",
    )
    webhook_secret: str | None = Field(
        None,
        description=f"the HMAC-SHA256 key of the X-Reid-Signature header; at least {MIN_API_KEY_LENGTH} characters, "
        f"{KEY_HOW_TO}; required with webhook_url",
        repr=False,
    )
    webhook_watch: str = Field(
        "",
        description="comma-separated provisional person ids (42 or unknown-42) and identities to notify about, "
        "besides every named identity",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=100, description="tries of one event (back-off 1, 2, 4 ... 300 s), then it goes to failed.jsonl"
    )
    mqtt_url: str | None = Field(
        None,
        description="mqtt[s]://[user:password@]host[:port]/topic/prefix: each event is also published, QoS 1, "
        "to <prefix>/<camera>; unset = no MQTT",
        repr=False,  # it may hold a password
    )

    @field_validator("webhook_url", "mqtt_url", "webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # REID_WEBHOOK_URL= in an env file turns the feature off, as leaving it out does.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith(("http://", "https://")) and value.split("/")[2]):
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            from app.events.mqtt import parse_mqtt_url  # here: app.events imports this module

            parse_mqtt_url(value)  # its ValueError says what is wrong
        return value

    @model_validator(mode="after")
    def _webhook_signed(self) -> Settings:
        # An unsigned webhook lets anyone who finds the receiver's URL forge sightings: refuse to start.
        if self.webhook_url is not None:
            secret = (self.webhook_secret or "").strip()
            if len(secret) < MIN_API_KEY_LENGTH:
                said = f"has {len(secret)} characters" if secret else "is not set"
                raise ValueError(
                    f"REID_WEBHOOK_URL is set and REID_WEBHOOK_SECRET {said}: the events are signed with it, "
                    f"at least {MIN_API_KEY_LENGTH} characters ({KEY_HOW_TO})"
                )
            self.webhook_secret = secret  # what is checked is what signs
        return self

    request_timeout_s: float = Field(60.0, gt=0)
    db_connect_timeout_s: int = Field(5, ge=1)
    cors_origins: str = Field("", description="comma-separated allowed origins; empty = CORS off")
    log_level: str = Field("INFO")
    host: str = Field("127.0.0.1")
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose {', '.join(BACKBONES)}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"unknown device {value!r}; choose auto, cpu, cuda or cuda:N")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose {', '.join(BACKENDS)}")
        return value

    @field_validator("backend_candidates")
    @classmethod
    def _known_candidates(cls, value: str) -> str:
        unknown = [v.strip() for v in value.split(",") if v.strip() and v.strip() not in KINDS]
        if unknown:
            raise ValueError(f"unknown backend {unknown[0]!r} in backend_candidates; choose among {', '.join(KINDS)}")
        return value

    @field_validator("cuda_dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"unknown CUDA dtype {value!r}; choose auto, bf16, fp16 or fp32")
        return value

    @field_validator("cuda_graph_batches")
    @classmethod
    def _batch_list(cls, value: str) -> str:
        parts = [v.strip() for v in value.split(",") if v.strip()]
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"cuda_graph_batches must be positive integers separated by commas, got {value!r}")
        return value

    @model_validator(mode="after")
    def _auth_decided(self) -> Settings:
        key = self.api_key.strip() if self.api_key is not None else None
        if key:
            if problem := weak_key_problem(key):
                raise ValueError(problem)
            if self.allow_unauthenticated:
                raise ValueError(
                    "REID_API_KEY is set and REID_ALLOW_UNAUTHENTICATED=true asks for no authentication: "
                    "they contradict each other, unset one of them"
                )
        elif not self.allow_unauthenticated:
            said = "is empty, and an empty key does not turn authentication off" if key == "" else "is not set"
            raise ValueError(
                f"REID_API_KEY {said}: the service refuses to start with its routes open to anyone. Set "
                f"REID_API_KEY ({KEY_HOW_TO}), or set REID_ALLOW_UNAUTHENTICATED=true to serve without "
                "authentication (only on loopback or behind a proxy that authenticates)"
            )
        self.api_key = key or None
        return self

    @property
    def auth(self) -> Literal["api_key", "disabled"]:
        """How requests are authenticated: an X-API-Key header, or not at all (REID_ALLOW_UNAUTHENTICATED)."""
        return "api_key" if self.api_key is not None else "disabled"

    @property
    def body_limit(self) -> int:
        """The bytes a request body may have: its files at their limit and the form around them, within
        max_request_bytes (the multipart parser spools a file part whole before its own size is checked)."""
        return min(self.max_upload_bytes * self.max_files_per_request + 1024 * 1024, self.max_request_bytes)

    @property
    def backend_candidate_list(self) -> list[str]:
        return [v.strip() for v in self.backend_candidates.split(",") if v.strip()]

    @property
    def cuda_graph_batch_list(self) -> list[int]:
        return sorted({int(v) for v in self.cuda_graph_batches.split(",") if v.strip()})

    @property
    def cors_origin_list(self) -> list[str]:
        return [v.strip() for v in self.cors_origins.split(",") if v.strip()]

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'reid.db').resolve()}"


def weak_key_problem(key: str) -> str | None:
    """Why ``key`` must not be an API key (a placeholder, too short, too few distinct characters, or not fit for
    an HTTP header), or None. The key itself is named only when it is a public placeholder."""
    folded = "".join(c for c in key.lower() if c.isalnum())
    if folded in PLACEHOLDER_KEYS:
        return f"REID_API_KEY is a placeholder ({key!r}) that anyone can guess: {KEY_HOW_TO}"
    if marker := next((m for m in PLACEHOLDER_MARKERS if m in folded), None):
        return f"REID_API_KEY reads as a placeholder (it holds {marker!r}): {KEY_HOW_TO}"
    if len(key) < MIN_API_KEY_LENGTH:
        return f"REID_API_KEY has {len(key)} characters, fewer than {MIN_API_KEY_LENGTH}: {KEY_HOW_TO}"
    if len(set(key)) < 5:
        return f"REID_API_KEY uses only {len(set(key))} distinct characters: {KEY_HOW_TO}"
    if not all(33 <= ord(c) < 127 for c in key):
        return "REID_API_KEY may hold printable ASCII only, no spaces (it travels in an HTTP header)"
    return None


def load_settings() -> Settings:
    """Settings for an entry point (``app.main:app``, ``reid-serve``, ``reid-admin``): invalid ones stop the process
    (exit status 1) with one sentence per problem, and no traceback to read them from."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False):
            where = f"REID_{str(error['loc'][0]).upper()}: " if error["loc"] else ""
            problems.append(where + str(error["msg"]).removeprefix("Value error, "))
        raise SystemExit("invalid REID_* settings, nothing started:\n  " + "\n  ".join(problems)) from None
