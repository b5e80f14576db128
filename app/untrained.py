"""The untrained networks served without REID_WEIGHTS. Built once, at the first start, and kept in the data
folder: a network built afresh at every start would have new random weights, so a new fingerprint, and the
gallery enrolled under the last one would refuse to open (``ModelMismatch``)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from models import ModelConfig, build_extractor, save_weights
from models.files import atomic_path

logger = logging.getLogger(__name__)

PREFIX = "untrained-"


def untrained_weights_path(data_dir: Path, backbone: str, pretrained: Path | None) -> Path:
    """One file per backbone and trunk source (random, or each ImageNet weights file by its content): changing
    REID_BACKBONE or REID_PRETRAINED builds new weights, and changing it back finds the earlier ones again."""
    if pretrained is None:
        return data_dir / f"{PREFIX}{backbone}.safetensors"
    return data_dir / f"{PREFIX}{backbone}-imagenet-{_source_tag(pretrained)}.safetensors"


def _source_tag(pretrained: Path) -> str:
    if str(pretrained) == "download":  # torchvision's fixed IMAGENET1K_V1 weights
        return "torchvision"
    if not pretrained.is_file():
        raise FileNotFoundError(f"REID_PRETRAINED={pretrained} does not exist")
    digest = hashlib.sha256()
    with pretrained.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def ensure_untrained_weights(data_dir: Path, backbone: str, pretrained: Path | None) -> Path:
    """The weights file to serve without REID_WEIGHTS: the one an earlier start wrote, or a new one (written
    atomically; where two processes race, the first file written is the one both serve)."""
    path = untrained_weights_path(data_dir, backbone, pretrained)
    if path.is_file():
        return path
    earlier = sorted(p.name for p in data_dir.glob(f"{PREFIX}*.safetensors"))
    source = f"ImageNet trunk from {pretrained}" if pretrained else "random initial weights"
    extractor = build_extractor(ModelConfig(backbone=backbone), pretrained).eval()
    try:
        with atomic_path(path, overwrite=False) as tmp:
            save_weights(tmp, extractor, None, {"source": source, "trained": False})
    except FileExistsError:
        return path  # another process wrote it meanwhile: serve theirs
    if earlier:
        logger.warning(
            "REID_BACKBONE=%s / REID_PRETRAINED=%s fit none of the untrained weights already in %s (%s): built new "
            "ones in %s. Entries enrolled under the earlier ones do not compare with these (the gallery refuses to "
            "open): go back to the earlier settings, re-embed (reid-admin reembed), or use another REID_DATA_DIR",
            backbone,
            pretrained or "(unset)",
            data_dir,
            ", ".join(earlier),
            path.name,
        )
    else:
        logger.info("built untrained %s weights (%s) and kept them in %s for later starts", backbone, source, path)
    return path
