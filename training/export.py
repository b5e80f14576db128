"""Export: the trained networks in the models' weights format (evaluation figures in the provenance),
and the extractor as ONNX with a dynamic batch axis, checked against PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import FeatureExtractor, MaskGenerator, ModelConfig, save_weights
from training.checkpoint import load_checkpoint
from training.config import TrainConfig

logger = logging.getLogger(__name__)


def networks_from_run(
    run_dir: str | Path, which: str = "best"
) -> tuple[FeatureExtractor, MaskGenerator | None, dict[str, Any]]:
    """The networks of ``run_dir/{best,last}.pt`` (best falls back to last) and a provenance dict. The mask
    generator is None when the checkpoint comes from before stage 2: it was never trained, and a service
    serving its masks would show noise as attention."""
    run_dir = Path(run_dir)
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run_dir / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir}: expected best.pt or last.pt")
    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    model_config = config.model_config()
    extractor = FeatureExtractor(model_config)
    extractor.load_state_dict(ckpt["extractor"])
    mask_generator = None
    if ckpt["stage"] >= 2:
        mask_generator = MaskGenerator(model_config)
        mask_generator.load_state_dict(ckpt["mask_generator"])
    evaluated = [r for r in ckpt["history"] if "mAP" in r]
    provenance = {
        "dataset": config.dataset,
        "checkpoint": path.name,
        "stage": ckpt["stage"],
        "epoch": ckpt["epoch"],
        "epochs": list(config.epochs),
        "seed": config.seed,
        "evaluation": evaluated[-1] if evaluated else None,
    }
    return extractor.eval(), mask_generator.eval() if mask_generator else None, provenance


def export_weights(
    source: str | Path | tuple[FeatureExtractor, MaskGenerator | None],
    path: str | Path,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the app's weights file from a run folder or from (extractor, mask_generator)."""
    if isinstance(source, (str, Path)):
        extractor, mask_generator, run_provenance = networks_from_run(source)
        provenance = {**run_provenance, **(provenance or {})}
    else:
        extractor, mask_generator = source
    path = save_weights(path, extractor, mask_generator, provenance or {})
    logger.info("wrote weights %s", path)
    return path


def export_onnx(
    extractor: FeatureExtractor,
    path: str | Path,
    config: ModelConfig | None = None,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """The extractor as ONNX (input ``images`` (N, 3, H, W), output ``features`` (N, feat_dim), N dynamic);
    with ``check``, onnxruntime's output on a batch of 3 must match PyTorch's within ``atol``."""
    config = config or extractor.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extractor = extractor.eval().cpu()
    example = torch.randn(2, 3, config.input_height, config.input_width)
    torch.onnx.export(
        extractor,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    if check:
        max_diff = onnx_max_difference(extractor, path, config)
        if max_diff > atol:
            raise ValueError(f"ONNX export {path} differs from PyTorch by {max_diff:.2e} (> {atol:.0e})")
        logger.info("ONNX %s matches PyTorch (max difference %.2e)", path, max_diff)
    return path


def onnx_max_difference(extractor: FeatureExtractor, path: str | Path, config: ModelConfig, batch: int = 3) -> float:
    import onnxruntime

    images = torch.randn(batch, 3, config.input_height, config.input_width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = extractor.eval()(images).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"images": images.numpy()})[0]
    return float(np.abs(got - expected).max())
