"""The bench scripts at their smallest sizes: each prints a table and appends it, with the machine, to the results
file. No figure is checked: timings on a shared machine mean nothing in a test."""

from __future__ import annotations

import re
from pathlib import Path

from bench import index, networks


def test_index_bench_appends_its_tables_with_the_machine_and_command(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--sizes", "500", "--queries", "20", "--single-queries", "5", "--repeats", "1", "--results", str(results)]
    assert index.main(argv) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert "## Gallery search, " in text
    assert f"Command: `python -m bench.index {' '.join(argv)}`" in text
    for row in ("| 500 | flat |", "| 500 | IVF22 nprobe 16 |", "| 500 | HNSW32 efSearch 64 |", "| 500 | Flat |"):
        assert row in text
    assert "- cpu: " in text and "- versions: " in text


def test_networks_bench_reports_cuda_rows_or_figures_and_appends_nothing_when_asked(tmp_path: Path, capsys) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--net", "mask", "--unet-width", "4", "--unet-levels", "3", "--input-size", "32x16", "--batches", "2"]
    argv += ["--skip", "compile,onnx", "--rounds", "1", "--min-rounds", "1", "--results", str(results), "--no-append"]
    assert networks.main(argv) == 0
    assert not results.exists()
    out = capsys.readouterr().out
    assert "| eager fp32 | 2 |" in out
    assert "| channels_last fp32 | 2 |" in out
    assert "autocast bf16 + CUDA graph" in out


def test_gpu_bench_refuses_bad_arguments_with_a_sentence(capsys) -> None:
    import pytest
    import torch

    from bench import gpu

    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--sections", "backends,tpu"])
    assert (
        exit_.value.code == 2
        and "unknown section ['tpu']; choose among backends, faiss, training" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--device", "cpu", "--weights", "/no/such/file.safetensors"])
    assert exit_.value.code == 2 and "--weights /no/such/file.safetensors is not a file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_:
            gpu.main([])
        assert exit_.value.code == 2 and "no CUDA device is visible here" in capsys.readouterr().err


def test_gpu_bench_runs_its_code_path_on_the_cpu(tmp_path: Path, capsys) -> None:
    from bench import gpu

    argv = ["--device", "cpu", "--backbone", "resnet18", "--input-size", "32x16", "--unet-width", "4"]
    argv += ["--batches", "1,2", "--calls", "1", "--skip", "compile", "--faiss-size", "2000", "--faiss-queries", "10"]
    argv += ["--faiss-factories", "Flat", "--p", "2", "--k", "2", "--steps", "1", "--no-append"]
    assert gpu.main(argv) == 0  # no row failed
    out = capsys.readouterr().out
    assert "## Every CUDA path (bench.gpu)" in out
    assert (
        "| backends: extractor | torch cpu fp32 | 1 |" in out
        and "| backends: mask_generator | torch cpu fp32 | 2 |" in out
    )
    assert "| torch autocast bf16 + channels_last + CUDA graphs |  | n/a | images/s |  | n/a | n/a (no CUDA) |" in out
    assert "| faiss | Flat on the CPU, 2e+03 | 10 |" in out and "same top-10 as the CPU for 10 of 10" in out
    for stage in (1, 2, 3):
        assert f"| training | stage {stage}, amp none | 4 |" in out
    assert "0 row(s) failed." in out


def test_sightings_bench_scores_groupings_as_the_field_does() -> None:
    from bench.sightings import scores

    truth = [1, 1, 1, 2, 2, 3]
    perfect = scores(["a", "a", "a", "b", "b", "c"], truth)
    assert perfect["pair_precision"] == perfect["pair_recall"] == perfect["bcubed_f"] == 1.0
    assert (perfect["people"], perfect["true_people"]) == (3, 3)
    lumped = scores(["a"] * 6, truth)  # one group: every true pair found, 4 of 15 pairs right
    assert lumped["pair_recall"] == 1.0 and lumped["pair_precision"] == 4 / 15 and lumped["people"] == 1
    assert lumped["bcubed_precision"] == (3 * 3 / 6 + 2 * 2 / 6 + 1 / 6) / 6
    alone = scores(["a", "b", "c", "d", "e", "f"], truth)  # singletons: no pair claimed
    assert alone["pair_precision"] == 1.0 and alone["pair_recall"] == 0.0 and alone["bcubed_precision"] == 1.0


def test_grouping_bench_times_a_join_on_each_index_kind(tmp_path: Path, capsys) -> None:
    from bench import grouping

    argv = ["--n", "400", "--join-sizes", "2500", "--join-index", "Flat;IVF16;HNSW8", "--no-append"]
    assert grouping.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 400 | link: all of re-grouping's grouping" in out
    # Each row names the index its joins searched: IVF trained, as the service's worker leaves it, not exact.
    for served in ("Flat", "IVF16,Flat nprobe 16", "HNSW8 efSearch 64, 0 tombstones"):
        assert f"| {served} | 2500 |" in out


def test_grouping_bench_regroups_a_whole_gallery_through_the_service_path(capsys) -> None:
    from bench import grouping

    argv = ["--n", "1200", "--per-person", "4", "--constrained", "0", "--regroup-sizes", "1200", "--no-append"]
    assert grouping.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()

    def cells(prefix: str) -> list[str]:
        return [c.strip() for c in next(line for line in lines if line.startswith(prefix)).strip("|").split("|")]

    link_groups, link_ari = cells("| 1200 | link:")[5], cells("| 1200 | link:")[7]
    _, _, _, _, units, groups, moved, retired, ari = cells("| 1200 | 0")  # the service table's row: fill s next
    # The same grouping as link's over the same sightings (whose one random cannot-link, two sightings of two
    # people, changes nothing here); each sighting came in as its own person, so all but one of each group moved
    # and every person left empty was retired.
    assert int(units) == 1200 and groups == link_groups and ari == link_ari and float(ari) > 0.5
    assert int(moved) == 1200 - int(groups) and int(retired) == int(moved)


def test_parity_noise_bench_moves_templates_to_the_cosine_asked_and_reports_the_check_set(
    tmp_path: Path, capsys
) -> None:
    import numpy as np
    import pytest
    from PIL import Image

    from bench import parity_noise
    from models import ModelConfig, build_extractor, save_weights

    rng = np.random.default_rng(1)  # not noise_agreement's own seed, whose first draw would be these templates
    templates = rng.standard_normal((40, 16))
    moved = parity_noise.with_noise(templates, 0.99, rng)
    cos = (moved * templates).sum(1) / np.linalg.norm(moved, axis=1) / np.linalg.norm(templates, axis=1)
    assert np.allclose(cos, 0.99)
    assert parity_noise.noise_agreement(templates, 1.0, draws=2) == [1.0, 1.0]
    assert min(parity_noise.noise_agreement(templates, 0.5, draws=3)) < 1.0

    crops = tmp_path / "crops"
    crops.mkdir()
    for person in range(10):  # two crops a person, named as CUHK03's
        for shot in range(2):
            pixels = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(crops / f"{person:04d}_{shot:02d}.png")
    config = ModelConfig(backbone="resnet18", feat_dim=16, input_height=64, input_width=32)
    weights = save_weights(tmp_path / "w.safetensors", build_extractor(config).eval())
    argv = ["--weights", str(weights), "--crops", str(crops), "--cosines", "0.999,0.9", "--draws", "2"]
    assert parity_noise.main([*argv, "--no-append"]) == 0
    out = capsys.readouterr().out
    assert "| 0.999 |" in out and "| 0.9 |" in out
    assert "20 of 20 crops have another crop of their person in the set" in out
    with pytest.raises(SystemExit, match="--cosines must be numbers"):
        parity_noise.main(["--weights", str(weights), "--crops", str(crops), "--cosines", "a,b"])


def synthetic_val_set(tmp_path: Path, cameras_of: dict[int, tuple[int, ...]]) -> tuple[Path, Path]:
    """(a data set root whose manifest lists 2 random crops per person and camera as val, tiny untrained weights)."""
    import numpy as np
    from PIL import Image

    from models import ModelConfig, build_extractor, save_weights

    root = tmp_path / "data"
    (root / "val").mkdir(parents=True)
    rows, rng = ["path,pid,camid,split"], np.random.default_rng(0)
    for pid, cameras in cameras_of.items():
        for camid in cameras:
            for shot in range(2):
                name = f"val/{pid:04d}_{camid}{shot}.png"
                Image.fromarray(rng.integers(0, 256, (96, 48, 3), dtype=np.uint8)).save(root / name)
                rows.append(f"{name},{pid},{camid},val")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = ModelConfig(backbone="resnet18", feat_dim=16, input_height=64, input_width=32)
    return root, save_weights(tmp_path / "w.safetensors", build_extractor(config).eval())


def test_ingest_bench_sends_each_persons_track_from_every_camera_and_scores_the_people(tmp_path: Path, capsys) -> None:
    from bench import ingest

    # Person 3 is seen by one camera only.
    root, weights = synthetic_val_set(tmp_path, {0: (0, 1), 1: (0, 1), 2: (0, 1), 3: (0,)})

    argv = ["--weights", str(weights), "--root", str(root), "--best-k", "2", "--join-threshold", "1e-6"]
    assert ingest.main([*argv, "--no-append"]) == 0
    out = capsys.readouterr().out
    frames = 2 * 6 + ingest.WALK_FRAMES  # the third person enters 2 gaps after the first, then walks across
    for camera in ("camera0", "camera1"):  # 3 tracks of 2 crops, in one request; person 3 left out
        assert re.search(rf"\| {camera} \| {frames} \| \d+ \| 3 \| 6 \| 1 \|", out)
    # Under a threshold nothing reaches, every track is a person of its own, before and after re-grouping: all
    # pairs put together are right (each track's 2 crops), 1 in 3 of the true pairs.
    assert "| online | 1.00 | 0.333 | 1.00 | 0.500 | 0.667 | 6 | 3 |" in out
    assert "| regrouped | 1.00 | 0.333 | 1.00 | 0.500 | 0.667 | 6 | 3 |" in out


def test_linkage_bench_groups_each_way_of_sending_by_every_method(tmp_path: Path, capsys) -> None:
    import pytest

    from bench import linkage

    root, weights = synthetic_val_set(tmp_path, {pid: (0, 1) for pid in range(4)})

    argv = ["--weights", str(weights), "--root", str(root), "--no-append"]
    with pytest.raises(SystemExit) as refused:  # untrained weights carry no threshold to join under
        linkage.main(argv)
    assert refused.value.code == 2
    assert "carries no calibrated threshold: give --threshold" in capsys.readouterr().err
    assert linkage.main([*argv, "--threshold", "1e-6"]) == 0
    out = capsys.readouterr().out
    # Under a threshold nothing reaches, every thresholded method leaves each unit alone: 16 crops, or 8 tracklets
    # of 2 crops (a person's shots from one camera), which hold 2 of each person's 6 true pairs.
    for eps in linkage.EPS_SWEEP:
        for method in (f"components (the service), eps {eps}", f"DBSCAN min_samples 3, eps {eps}"):
            assert f"| crops | {method} | 1.00 | 0 | " in out and "| 16 (4) |" in out
            assert f"| tracklets | {method} | 1.00 | 0.333 | " in out and "| 8 (4) |" in out
    assert out.count("| crops | HDBSCAN") == out.count("| tracklets | HDBSCAN") == 6
