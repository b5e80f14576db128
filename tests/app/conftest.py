"""Fixtures for the service tests: small weights, settings over SQLite and PostgreSQL, a live client."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, text

from app.config import Settings
from app.db import Base
from models import ModelConfig, build_extractor, build_mask_generator, save_weights

POSTGRES_URL = os.environ.get("REID_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SMALL = ModelConfig(backbone="resnet18", feat_dim=64, unet_base_width=4, input_height=64, input_width=32)


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    extractor = build_extractor(SMALL)
    mask = build_mask_generator(SMALL)
    # Random BN statistics so that templates differ between images (fresh BN would flatten them).
    with torch.no_grad():
        for module in extractor.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    return save_weights(path, extractor.eval(), mask.eval(), {"note": "test weights"})


@pytest.fixture(scope="session")
def small_weights_no_mask(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "nomask.safetensors"
    return save_weights(path, build_extractor(SMALL).eval(), None)


def _postgres_schema_url() -> Iterator[str]:
    """A fresh schema per test, dropped afterwards: other helpers' tests may share the database."""
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    schema = f"reid_app_test_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
    else:
        yield from _postgres_schema_url()


@pytest.fixture
def settings(tmp_path: Path, small_weights: Path) -> Settings:
    # One runtime, so that a restart serves the same templates (auto's choice among near-equal runtimes follows
    # the machine's load); the choice itself: test_reduced_precision.py, test_ops.py. No API key: the tests' opt-out
    # (REID_ALLOW_UNAUTHENTICATED) is set once for the session in tests/conftest.py.
    return Settings(
        data_dir=tmp_path / "data",
        weights=small_weights,
        device="cpu",
        batch_max_wait_ms=2,
        backend_candidates="onnxruntime",
    )


def png_bytes(seed: int, size: tuple[int, int] = (32, 64), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


assert Base  # the tables the app creates
