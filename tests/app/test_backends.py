"""Inference backends: ONNX Runtime exported at first start, cached by the weights' fingerprint and checked
against fp32 PyTorch; a drifting graph refused with its figures; the CUDA path's pure logic on the CPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.backends import (
    MIN_COSINE,
    BackendError,
    TorchBackend,
    autocast_dtype,
    bucket_for,
    check_parity,
    cosines,
    load_backend,
    resolve_backend,
)
from app.config import Settings
from app.embedder import Embedder
from tests.app.conftest import png_bytes


def _images(n: int) -> list[Image.Image]:
    return [Image.open(io.BytesIO(png_bytes(i))).convert("RGB") for i in range(n)]


def _settings(tmp_path: Path, weights: Path, backend: str, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", weights=weights, device="cpu", backend=backend, **kw)


def _break(graph: Path) -> None:
    """Overwrite the largest weight tensor of an ONNX graph with noise: a graph that loads and runs, wrongly."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    noise = np.random.default_rng(0).normal(size=tuple(largest.dims)).astype(np.float32)
    largest.CopyFrom(numpy_helper.from_array(noise, largest.name))
    onnx.save(model, str(graph))


def test_auto_on_cpu_serves_onnx_runtime_matching_fp32_torch(tmp_path: Path, small_weights: Path) -> None:
    embedder = Embedder.from_settings(_settings(tmp_path, small_weights, "auto", backend_candidates="onnxruntime"))
    assert embedder.backend is not None and embedder.backend.name == "onnxruntime CPUExecutionProvider"
    assert embedder.mask_backend is not None and embedder.mask_backend.name.startswith("onnxruntime")
    graph = tmp_path / "data" / "onnx" / f"extractor-{embedder.fingerprint}.onnx"
    assert graph.is_file() and len(embedder.fingerprint) == 64

    images = _images(5)
    served = embedder.embed_sync(images)
    with torch.inference_mode():
        reference = embedder.extractor(embedder.preprocess(images)).numpy()
    assert served.shape == (5, 64) and served.dtype == np.float32
    assert cosines(reference, served).min() >= MIN_COSINE
    masks = embedder.masks_sync(images[:2])
    assert [m.shape for m in masks] == [(64, 32), (64, 32)] and all(0 <= m.min() <= m.max() <= 1 for m in masks)

    # The next start reuses the cached graph (same fingerprint, same file), and gives the same templates.
    mtime = graph.stat().st_mtime_ns
    again = Embedder.from_settings(_settings(tmp_path, small_weights, "auto", backend_candidates="onnxruntime"))
    assert graph.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.embed_sync(images), served)


def test_other_weights_get_their_own_graph(tmp_path: Path, small_weights: Path, small_weights_no_mask: Path) -> None:
    a = Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime"))
    b = Embedder.from_settings(_settings(tmp_path, small_weights_no_mask, "onnxruntime"))
    assert a.fingerprint != b.fingerprint
    graphs = sorted(p.name for p in (tmp_path / "data" / "onnx").glob("extractor-*.onnx"))
    assert graphs == sorted([f"extractor-{a.fingerprint}.onnx", f"extractor-{b.fingerprint}.onnx"])
    assert b.mask_backend is None and not b.has_mask_generator


def test_drifting_graph_is_refused_with_its_figures(tmp_path: Path, small_weights: Path) -> None:
    embedder = Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime"))
    graph = tmp_path / "data" / "onnx" / f"extractor-{embedder.fingerprint}.onnx"
    _break(graph)
    with pytest.raises(
        BackendError, match=r"drifts from fp32 PyTorch: onnxruntime .*cosine .* min -?\d\.\d+ .*>= 0\.999"
    ):
        Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime"))
    # auto does not serve the broken graph either: it says so and falls back to the fp32 reference.
    fallback = Embedder.from_settings(_settings(tmp_path, small_weights, "auto"))
    assert fallback.backend is not None and fallback.backend.name == "torch cpu fp32"
    # The mask generator's graph was not broken: auto serves it with the faster fp32 runtime that passes.
    assert fallback.selections["mask_generator"].kind in ("onnxruntime", "openvino")
    images = _images(3)
    with torch.inference_mode():
        reference = fallback.extractor(fallback.preprocess(images)).numpy()
    np.testing.assert_allclose(fallback.embed_sync(images), reference, rtol=1e-5, atol=1e-6)


def test_parity_check_measures_each_template(small_weights: Path) -> None:
    from models import load_weights

    model = load_weights(small_weights)
    torch_backend = TorchBackend(model.extractor, torch.device("cpu"))
    parity = check_parity(model.extractor, torch_backend, model.config)
    assert parity.ok and len(parity.cosines) == 4 and min(parity.cosines) > 0.999999

    class Halved:
        name = "halved"

        def __call__(self, x: torch.Tensor) -> np.ndarray:
            out = torch_backend(x)
            out[0] = -out[0]  # one template of four turned around: cosine -1 for it alone
            return out

    parity = check_parity(model.extractor, Halved(), model.config)
    assert not parity.ok and parity.cosines[0] == pytest.approx(-1.0) and min(parity.cosines[1:]) > 0.999999
    assert "min -1.000000 over 4 templates" in parity.describe()


def test_cosines_per_sample() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosines(a, b), [1.0, 0.0, 1.0])


def test_backend_choice_and_unknown_names(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "auto"  # timed among the candidates at start-up
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'; choose auto, torch, onnxruntime, openvino"):
        resolve_backend("tensorflow", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        Settings(data_dir=tmp_path, backend="tensorflow")


def test_cuda_graph_buckets_and_autocast_choice() -> None:
    buckets = [1, 2, 4, 8, 16, 32]
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert bucket_for(33, buckets) is None  # larger than every bucket: run without a graph
    assert bucket_for(3, [8, 2]) == 8
    assert autocast_dtype("bf16", torch.device("cpu")) is None  # CPU: always fp32
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16
    # On the CPU the torch backend ignores what only CUDA has.
    backend = TorchBackend(torch.nn.Conv2d(3, 2, 1), torch.device("cpu"), torch.bfloat16, True, [1, 8])
    assert backend.name == "torch cpu fp32" and backend.graph_batches == ()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_graphs_pass_parity(small_weights: Path, tmp_path: Path) -> None:
    from models import load_weights

    model = load_weights(small_weights, "cuda")
    backend = load_backend(
        "torch", model.extractor, "extractor", model.config, "f" * 64, tmp_path, graph_batches=[1, 4, 8]
    )
    assert "CUDA graphs 1,4,8" in backend.name and "channels_last" in backend.name
    x = torch.randn(3, 3, model.config.input_height, model.config.input_width)
    with torch.inference_mode():
        reference = model.extractor(x.cuda()).float().cpu().numpy()
    assert cosines(reference, backend(x)).min() >= MIN_COSINE  # a batch of 3 padded into the bucket of 4


def test_unreadable_cached_graph_is_exported_again(tmp_path: Path, small_weights: Path) -> None:
    embedder = Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime"))
    graph = tmp_path / "data" / "onnx" / f"extractor-{embedder.fingerprint}.onnx"
    expected = embedder.embed_sync(_images(2))
    graph.write_bytes(graph.read_bytes()[:1000])  # truncated
    again = Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime"))
    assert again.backend is not None and again.backend.name.startswith("onnxruntime")
    np.testing.assert_allclose(again.embed_sync(_images(2)), expected, rtol=1e-5, atol=1e-6)
    assert graph.stat().st_size > 1000


def test_failed_export_is_refused_by_name_and_falls_back_under_auto(
    tmp_path: Path, small_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_exporter(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no such operator")

    monkeypatch.setattr("torch.onnx.export", broken_exporter)
    with pytest.raises(BackendError, match=r"exporting the extractor to ONNX at .* failed: no such operator"):
        Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime"))
    fallback = Embedder.from_settings(_settings(tmp_path, small_weights, "auto"))
    assert fallback.backend is not None and fallback.backend.name == "torch cpu fp32"
