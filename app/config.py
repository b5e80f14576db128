"""The service's settings, read once from ``REID_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.backends.base import BACKENDS, KINDS
from models import BACKBONES


class Settings(BaseSettings):
    """Every knob of the service; the environment variable is the field name upper-cased with ``REID_``."""

    model_config = SettingsConfigDict(env_prefix="REID_", env_file=None, extra="ignore")

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
    migrate_on_start: bool = Field(True, description="apply database migrations at start-up (else: reid-admin migrate)")
    api_key: str | None = Field(None, description="when set, every route but /health needs X-API-Key", repr=False)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_request_pixels: int = Field(
        32 * 1024 * 1024, ge=1, description="decoded pixels of all the images of one request (~100 MB as RGB)"
    )
    max_files_per_request: int = Field(64, ge=1)
    batch_max_size: int = Field(32, ge=1)
    batch_max_wait_ms: float = Field(5.0, ge=0, description="a batch with company waits at most this for more")
    batch_queue_size: int = Field(256, ge=1, description="images waiting for the network; past it 503 + Retry-After")
    threshold_fmr: float = Field(
        0.01, gt=0, lt=1, description="default query threshold: the weights' calibrated one at this false-match rate"
    )
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
