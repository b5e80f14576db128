"""Row 3 of docs/RESULTS.md in small: the three stages on the real CUHK03-detected crops in ../shared, then the
exported weights in the service. The full table (three rows, three seeds) is ``bench/cuhk03_table.py``, outside CI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
DATA = SHARED / "data" / "cuhk03-detected"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.safetensors"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "manifest.csv").is_file() or not WEIGHTS.is_file(), reason=f"{SHARED} is absent"),
]


def test_three_stages_on_real_crops_beat_the_imagenet_floor_and_the_service_agrees(tmp_path) -> None:
    from bench.cuhk03_table import build_table_loaders, floor_figures, service_check
    from training.config import TrainConfig
    from training.engine import fit
    from training.export import export_weights, networks_from_run

    # One seed of row 3 at the table's settings (bench/cuhk03_table.py's defaults): about four minutes.
    base = TrainConfig(
        dataset="folder",
        root=str(DATA),
        backbone="mobilenet_v2",
        pretrained=str(WEIGHTS),
        input_height=96,
        input_width=48,
        unet_base_width=8,
        freeze_blocks=4,
        lr=3.5e-4,
        epochs=(2, 1, 1),
        eval_every=0,
        device="cpu",
        workers=0,
        dataset_kwargs={"query_camid": 0},
    )
    base, loaders = build_table_loaders(base, train_ids=0)
    floor = floor_figures(base, loaders)
    _, state = fit(dataclasses.replace(base, out=str(tmp_path)), loaders, tmp_path)
    final = state.history[-1]
    assert final["stage"] == 3 and {"loss_mask", "loss_extractor"} <= set(final)
    assert final["mAP"] > floor["mAP"] + 10, (floor, final)
    assert final["rank1"] > floor["rank1"] + 10, (floor, final)

    extractor, mask_generator, provenance = networks_from_run(tmp_path, "last")
    weights = export_weights((extractor, mask_generator), tmp_path / "model.safetensors", provenance)
    check = service_check(weights, base)
    assert (check["queries"], check["gallery"]) == (451, 487)
    assert check["same_rank1_identity"] == check["queries"]
    assert check["offline_rank1"] == pytest.approx(final["rank1"], abs=1e-6)
