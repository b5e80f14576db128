"""Export: the trained networks in the models' weights format (evaluation figures and the calibrated open-set
thresholds in the provenance), and the extractor as ONNX with a dynamic batch axis, checked against PyTorch."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import FeatureExtractor, MaskGenerator, ModelConfig, save_weights
from models.onnx_export import export_onnx as export_graph
from training.checkpoint import checkpoint_config, load_checkpoint
from training.data.loaders import val_loaders
from training.evaluation import calibrate_thresholds, extract_features, pair_distances

logger = logging.getLogger(__name__)

# Target false-match rates of the calibrated thresholds; the service's default threshold is the first one's.
THRESHOLD_FMRS = (1e-2, 1e-3)


def networks_from_run(
    run_dir: str | Path, which: str = "last"
) -> tuple[FeatureExtractor, MaskGenerator | None, dict[str, Any]]:
    """The networks of ``run_dir/{last,best}.pt`` and a provenance dict. ``last`` is the default: the best-on-val
    checkpoint can be an earlier stage without a trained mask generator, and choosing on val inflates the
    figures. The mask generator is None when the checkpoint comes from before stage 2: it was never trained,
    and a service serving its masks would show noise as attention."""
    run_dir = Path(run_dir)
    if which not in ("last", "best"):
        raise ValueError(f"unknown checkpoint {which!r}; choose last or best")
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path.name} in {run_dir}")
    ckpt = load_checkpoint(path)
    config = checkpoint_config(ckpt)
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
        "recipe": config.recipe,
        "checkpoint": path.name,
        "stage": ckpt["stage"],
        "epoch": ckpt["epoch"],
        "epochs": list(config.epochs),
        "seed": config.seed,
        "evaluation": evaluated[-1] if evaluated else None,
    }
    return extractor.eval(), mask_generator.eval() if mask_generator else None, provenance


# False-match rates at which the curve records a distance: log-spaced, so that the rare-stranger end an operator
# decides on (1e-4..1e-2) is as fine as the common one.
CURVE_FMRS = tuple(float(f) for f in np.round(np.logspace(-4, 0, 41), 8))


def fmr_curve(impostor: np.ndarray) -> list[list[float]]:
    """``[[distance, fmr], ...]`` ascending: the share ``fmr`` of impostor pairs at or under ``distance``, at the
    CURVE_FMRS levels the pairs resolve (a level under one pair in all is left out). The service turns a match's
    distance into its false-match rate with it (app.search.ScoreCurve)."""
    ordered = np.sort(np.asarray(impostor, dtype=np.float64))
    curve = []
    for fmr in CURVE_FMRS:
        count = int(np.floor(fmr * len(ordered)))
        if count >= 1:
            curve.append([float(ordered[count - 1]), count / len(ordered)])
    return curve


def threshold_provenance(
    extractor: FeatureExtractor,
    query: Iterable,
    gallery: Iterable,
    device: torch.device | str = "cpu",
    fmrs: tuple[float, ...] = THRESHOLD_FMRS,
) -> dict[str, Any]:
    """The provenance entries of the open-set threshold, calibrated on the validation split's cross-camera
    query-gallery pairs (Euclidean distances between served templates, the service's space):
    ``thresholds`` = [{"fmr", "distance", "tmr"}, ...], ``threshold_split`` = "val" and the pair counts."""
    device = torch.device(device)
    qf, q_pids, q_camids = extract_features(extractor.to(device), query, device)
    gf, g_pids, g_camids = extract_features(extractor, gallery, device)
    genuine, impostor = pair_distances(qf, gf, q_pids, g_pids, q_camids, g_camids)
    thresholds = calibrate_thresholds(genuine, impostor, fmrs)
    logger.info("thresholds on val (%d genuine, %d impostor pairs): %s", len(genuine), len(impostor), thresholds)
    return {
        "thresholds": thresholds,
        "fmr_curve": fmr_curve(impostor),
        "threshold_split": "val",
        "threshold_pairs": {"genuine": len(genuine), "impostor": len(impostor)},
    }


def export_weights(
    source: str | Path | tuple[FeatureExtractor, MaskGenerator | None],
    path: str | Path,
    provenance: dict[str, Any] | None = None,
    which: str = "last",
    calibrate: bool = True,
    root: str | Path | None = None,
) -> Path:
    """Write the app's weights file from a run folder (its ``which`` checkpoint) or from (extractor,
    mask_generator). From a run, ``calibrate`` adds the open-set thresholds from the run's validation split
    (the run's data set, or the one under ``root``)."""
    if isinstance(source, (str, Path)):
        extractor, mask_generator, run_provenance = networks_from_run(source, which)
        provenance = {**run_provenance, **(provenance or {})}
        if calibrate:
            config = checkpoint_config(load_checkpoint(Path(source) / f"{which}.pt"))
            if root is not None:
                config = dataclasses.replace(config, root=str(root))
            if not Path(config.root).exists():
                raise FileNotFoundError(
                    f"data set root {config.root} does not exist: the thresholds are calibrated on its val split "
                    "(give the data with --root, or export without thresholds)"
                )
            query, gallery = val_loaders(config)
            provenance.update(threshold_provenance(extractor, query, gallery))
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
    path = export_graph(extractor.cpu(), path, (config.input_height, config.input_width), "features")
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
