"""INT8 and bf16 backends: calibrated on real crops, cached by the weights' fingerprint, accepted only by the
retrieval parity check (cosine and the same nearest neighbours), and ``auto``'s timed choice logged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from app.backends import (
    MIN_COSINE_REDUCED,
    BackendError,
    cosines,
    nearest_neighbour_agreement,
    reference_crops,
    select_backend,
)
from app.backends.openvino import cpu_has_bf16
from app.backends.parity import run_batched
from app.backends.select import fastest
from app.config import Settings
from app.embedder import Embedder
from models import ModelConfig, build_extractor, build_mask_generator, load_weights, save_weights
from tests.conftest import MOBILENET_WEIGHTS, SHARED_DATA, require_shared


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibration folder of 200 real CUHK03 val crops (a copy, so that a test may take it away)."""
    source = require_shared(SHARED_DATA / "cuhk03-detected" / "val")
    folder = tmp_path_factory.mktemp("crops")
    for path in sorted(source.glob("*.jpg"))[:200]:
        shutil.copy(path, folder / path.name)
    return folder


# The small test networks (random weights) give templates too alike for INT8 to keep every nearest neighbour;
# these bars let them serve where a test needs a served INT8 backend. The defaults are tested against the figures.
LOW_BARS = {"parity_min_cosine_reduced": 0.9, "parity_min_nn_agreement": 0.2}


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small extractor on the real ImageNet MobileNetV2 trunk (and a small mask generator): templates of real
    crops that differ as a trained network's do. The random-BN ResNet-18 of the other tests has activations so
    wide that OpenVINO's INT8 kernels give other answers at each compilation; this one is deterministic."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="mobilenet_v2", feat_dim=64, unet_base_width=4, input_height=64, input_width=32)
    extractor = build_extractor(config, pretrained=require_shared(MOBILENET_WEIGHTS)).eval()
    path = tmp_path_factory.mktemp("weights") / "imagenet.safetensors"
    return save_weights(path, extractor, build_mask_generator(config).eval())


def _settings(tmp_path: Path, weights: Path, backend: str, crops: Path | None, **kw: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", weights=weights, device="cpu", backend=backend, calibration_dir=crops, **kw
    )


def _quantized_ops(graph: Path) -> tuple[int, str]:
    """(QuantizeLinear nodes, the op type that produces the graph's output)."""
    import onnx

    model = onnx.load(str(graph))
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    return sum(n.op_type == "QuantizeLinear" for n in model.graph.node), producer[model.graph.output[0].name]


@pytest.mark.parametrize("kind", ["onnxruntime-int8", "openvino-int8"])
def test_int8_is_calibrated_on_real_crops_and_judged_by_retrieval_parity(
    tmp_path: Path, imagenet_weights: Path, crops_dir: Path, kind: str
) -> None:
    embedder = Embedder.from_settings(_settings(tmp_path, imagenet_weights, kind, crops_dir, **LOW_BARS))
    selection = embedder.selections["extractor"]
    assert selection.kind == kind and "int8" in embedder.backend_name
    graph = tmp_path / "data" / "onnx" / f"extractor-{embedder.fingerprint}-{kind.replace('onnxruntime-', '')}.onnx"
    quantize_nodes, output_op = _quantized_ops(graph)
    assert quantize_nodes > 5 and output_op != "DequantizeLinear"  # INT8 inside, the template itself left fp32
    parity = selection.parity
    assert parity is not None and parity.min_cosine == 0.9 and parity.min_nn_agreement == 0.2
    assert parity.check_set.startswith(f"128 crops of {crops_dir}") and len(parity.cosines) == 128

    # The figures are what the served backend does to real crops, measured independently here.
    crops = reference_crops(crops_dir, embedder.config)
    assert crops is not None
    with torch.inference_mode():
        reference = embedder.extractor(crops.check).numpy()
    served = run_batched(embedder.backend, crops.check)  # as the check ran them: 32 crops a call
    assert cosines(reference, served).min() == pytest.approx(min(parity.cosines), abs=1e-6)
    assert nearest_neighbour_agreement(reference, served) == pytest.approx(parity.nn_agreement)
    # The mask generator is quantised too, and checked by cosine alone.
    masks = embedder.selections["mask_generator"]
    assert masks.kind == kind and masks.parity is not None and masks.parity.nn_agreement is None

    # At the service's own bars (cosine and nearest neighbours >= 0.99) the cached graph serves exactly when its
    # figures clear them; otherwise the start-up stops with them.
    clears = min(parity.cosines) >= MIN_COSINE_REDUCED and parity.nn_agreement >= 0.99
    if clears:
        assert Embedder.from_settings(_settings(tmp_path, imagenet_weights, kind, crops_dir)).selections["extractor"]
    else:
        with pytest.raises(BackendError, match=rf"same nearest neighbour for {100 * parity.nn_agreement:.1f}%"):
            Embedder.from_settings(_settings(tmp_path, imagenet_weights, kind, crops_dir))


def test_int8_cache_is_keyed_by_fingerprint(
    tmp_path: Path, small_weights: Path, small_weights_no_mask: Path, crops_dir: Path
) -> None:
    calibration = tmp_path / "calibration"
    shutil.copytree(crops_dir, calibration)
    a = Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime-int8", calibration, **LOW_BARS))
    b = Embedder.from_settings(_settings(tmp_path, small_weights_no_mask, "onnxruntime-int8", calibration, **LOW_BARS))
    cache = tmp_path / "data" / "onnx"
    graphs = sorted(p.name for p in cache.glob("extractor-*-int8.onnx"))
    assert graphs == sorted([f"extractor-{a.fingerprint}-int8.onnx", f"extractor-{b.fingerprint}-int8.onnx"])
    graph = cache / f"extractor-{a.fingerprint}-int8.onnx"
    mtime = graph.stat().st_mtime_ns
    expected = a.backend(_batch(a))

    # Without the calibration folder, and with no crops in the gallery, the cached graph cannot be checked.
    shutil.rmtree(calibration)
    with pytest.raises(BackendError, match="only served once checked on real crops"):
        Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime-int8", calibration, **LOW_BARS))
    # With crops in the gallery (the default source), the cached graph serves: checked, not calibrated again.
    gallery_crops = tmp_path / "data" / "crops" / "ab"
    shutil.copytree(crops_dir, gallery_crops)
    again = Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime-int8", None, **LOW_BARS))
    assert graph.stat().st_mtime_ns == mtime  # reused, not calibrated again
    np.testing.assert_array_equal(again.backend(_batch(again)), expected)


def _batch(embedder: Embedder) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, embedder.config.input_height, embedder.config.input_width, generator=generator)


def _mis_scale(graph: Path) -> None:
    """Multiply the per-channel weight scales of the first quantised convolution by 4: a graph that loads and
    runs, with one layer mis-scaled (what a broken calibration or a bad export gives)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            weights = numpy_helper.to_array(initializers[node.input[0]])
            if weights.ndim == 4:  # a convolution's weights
                scale = initializers[node.input[1]]
                scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 4, scale.name))
                onnx.save(model, str(graph))
                return
    raise AssertionError("no quantised convolution in the graph")


def test_mis_scaled_int8_graph_is_refused_by_retrieval_parity(
    tmp_path: Path, small_weights: Path, crops_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime-int8", crops_dir, **LOW_BARS))
    _mis_scale(tmp_path / "data" / "onnx" / f"extractor-{embedder.fingerprint}-int8.onnx")
    with pytest.raises(BackendError, match=r"drifts from fp32 PyTorch: onnxruntime .*int8.* same nearest neighbour"):
        Embedder.from_settings(_settings(tmp_path, small_weights, "onnxruntime-int8", crops_dir, **LOW_BARS))
    # auto does not serve it either: it is refused with its figures in the log, and another kind serves.
    caplog.set_level(logging.INFO, logger="app.backends")
    auto = Embedder.from_settings(
        _settings(
            tmp_path, small_weights, "auto", crops_dir, backend_candidates="onnxruntime,onnxruntime-int8", **LOW_BARS
        )
    )
    selection = auto.selections["extractor"]
    assert selection.kind == "onnxruntime" and "drifts from fp32 PyTorch" in selection.refused["onnxruntime-int8"]
    assert (
        "auto: onnxruntime-int8 for the extractor is not a candidate: the extractor's backend is refused" in caplog.text
    )


def test_auto_times_the_candidates_and_logs_its_choice(
    tmp_path: Path, imagenet_weights: Path, crops_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.backends")
    candidates = "onnxruntime,openvino,openvino-int8"
    embedder = Embedder.from_settings(
        _settings(tmp_path, imagenet_weights, "auto", crops_dir, backend_candidates=candidates, **LOW_BARS)
    )
    selection = embedder.selections["extractor"]
    assert set(selection.timings_ms) == {"onnxruntime", "openvino", "openvino-int8"}
    assert selection.kind == fastest(selection.timings_ms)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("auto: serving the extractor"))
    assert f"with {embedder.backend_name} (batch 1: " in line
    for name, ms in selection.timings_ms.items():
        assert f"{name} {ms:.2f} ms" in line
    health = selection.as_dict()
    assert health["kind"] == selection.kind and health["parity"]["ok"] and health["parity"]["nn_agreement"] >= 0.2


def test_reduced_precision_needs_real_crops(tmp_path: Path, small_weights: Path) -> None:
    with pytest.raises(BackendError, match="only served once checked on real crops"):
        Embedder.from_settings(_settings(tmp_path, small_weights, "openvino-int8", None))
    # auto, with no crops at all: only fp32 kinds are candidates; the others say why they are not.
    embedder = Embedder.from_settings(_settings(tmp_path, small_weights, "auto", None))
    selection = embedder.selections["extractor"]
    assert selection.kind in ("onnxruntime", "openvino")
    assert set(selection.refused) == {"openvino-bf16", "onnxruntime-int8", "openvino-int8"}
    assert all("real crops" in why for why in selection.refused.values())


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_openvino_bf16_serves_on_a_bf16_cpu(tmp_path: Path, imagenet_weights: Path, crops_dir: Path) -> None:
    embedder = Embedder.from_settings(_settings(tmp_path, imagenet_weights, "openvino-bf16", crops_dir, **LOW_BARS))
    parity = embedder.selections["extractor"].parity
    assert embedder.backend_name == "openvino CPU bf16" and parity is not None and parity.min_cosine == 0.9
    assert embedder.selections["mask_generator"].backend.name == "openvino CPU bf16"


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend 'tensorrt' in backend_candidates"):
        Settings(data_dir=tmp_path, backend_candidates="onnxruntime,tensorrt")
    with pytest.raises(ValueError, match="unknown backend 'int8'; choose auto, torch, onnxruntime"):
        Settings(data_dir=tmp_path, backend="int8")


def test_select_backend_directly(small_weights: Path, crops_dir: Path, tmp_path: Path) -> None:
    model = load_weights(small_weights)
    crops = reference_crops(crops_dir, model.config)
    assert crops is not None and len(crops.check) == 128 and len(crops.calibration) == 72  # 200 - 128, disjoint
    selection = select_backend(
        "openvino", model.extractor, "extractor", model.config, model.fingerprint, tmp_path, crops=crops
    )
    assert selection.backend.name == "openvino CPU fp32" and selection.parity is not None
    assert selection.parity.min_cosine == 0.999 and selection.parity.nn_agreement == 1.0


def test_auto_keeps_an_earlier_candidate_unless_a_later_one_is_clearly_faster() -> None:
    # Candidates in REID_BACKEND_CANDIDATES' order; a later one must beat the chosen one by more than 10%.
    assert fastest({"onnxruntime": 4.0, "openvino": 3.7}) == "onnxruntime"  # 7.5% faster: within the noise
    assert fastest({"onnxruntime": 4.0, "openvino": 3.5}) == "openvino"  # 12.5% faster
    assert fastest({"onnxruntime": 4.0, "openvino": 3.5, "openvino-int8": 1.0}) == "openvino-int8"
    assert fastest({"openvino": 3.0, "onnxruntime": 4.0}) == "openvino"
    assert fastest({"onnxruntime": 4.0}, margin=0.0) == "onnxruntime"
