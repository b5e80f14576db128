"""Adaptation to a site (training.adapt): pseudo-identities from clustering, the contrastive memories, and the
command itself: it runs, resumes, never reads identities, and records where its weights come from."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from models import ModelConfig, build_extractor, load_weights, save_weights
from models.clustering import camera_centred, dbscan
from training.adapt import AdaptConfig, ClusterSettings, adapt, pseudo_labels, read_site
from training.adapt.memory import CameraProxies, ClusterMemory
from training.adapt.pseudo_labels import reliable
from training.adapt.thresholds import default_calibration
from training.cli import main

TINY = ModelConfig(backbone="resnet18", feat_dim=16, input_height=64, input_width=32, unet_base_width=4)


def people_features(people: int, per_camera: int, cameras: int, shift: float, seed: int = 0):
    """Unit templates of ``people`` people seen ``per_camera`` times by each camera, every camera adding the same
    offset of norm ``shift`` to what it sees (its light and angle)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 64))
    offsets = rng.normal(size=(cameras, 64))
    offsets *= shift / np.linalg.norm(offsets, axis=1, keepdims=True)
    rows, pids, cams = [], [], []
    for person in range(people):
        for cam in range(cameras):
            for _ in range(per_camera):
                rows.append(centres[person] / np.linalg.norm(centres[person]) + 0.15 * rng.normal(size=64) / 8
                            + offsets[cam])  # fmt: skip
                pids.append(person)
                cams.append(cam)
    x = np.asarray(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array(pids), np.array(cams)


def pair_scores(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    kept = labels >= 0
    same_label = (labels[:, None] == labels[None, :]) & kept[:, None] & kept[None, :]
    same_truth = truth[:, None] == truth[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    together, truly = same_label & off, same_truth & off
    return (together & truly).sum() / max(together.sum(), 1), (together & truly).sum() / truly.sum()


def test_pseudo_labels_recover_people_that_cameras_shift_apart() -> None:
    x, pids, cams = people_features(people=60, per_camera=2, cameras=2, shift=1.2)
    settings = ClusterSettings(k1=6, k2=3, eps=0.6, min_samples=2, camera_centring=True)
    precision, recall = pair_scores(pseudo_labels(x, cams, settings)[0], pids)
    assert precision > 0.95 and recall > 0.9, (precision, recall)
    # Without the centring each camera's offset outweighs who a crop shows: clusters stay within one camera.
    labels, _ = pseudo_labels(x, cams, ClusterSettings(k1=6, k2=3, eps=0.6, min_samples=2, camera_centring=False))
    crossing = [len(np.unique(cams[labels == c])) > 1 for c in np.unique(labels[labels >= 0])]
    assert not any(crossing)
    centred = camera_centred(x, cams)
    assert np.allclose(np.linalg.norm(centred, axis=1), 1.0, atol=1e-5)


def spcl_distances() -> np.ndarray:
    """10 crops: {0,1,2} tight; {3,4,5} whose 5 joins only at eps 0.5; {6,7} and {8,9}, which merge at 0.6."""
    d = np.ones((10, 10))
    for a, b, distance in [(0, 1, 0.1), (0, 2, 0.1), (1, 2, 0.1), (3, 4, 0.1), (4, 5, 0.45), (6, 7, 0.1),
                           (8, 9, 0.1), (7, 8, 0.55)]:  # fmt: skip
        d[a, b] = d[b, a] = distance
    np.fill_diagonal(d, 0.0)
    return d


def test_spcl_reliability_keeps_compact_and_independent_clusters() -> None:
    d = spcl_distances()
    settings = ClusterSettings(eps=0.5, min_samples=2, reliability_delta=0.1, independence_quantile=0.25)
    labels = dbscan(d, settings.eps, settings.min_samples)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    # First round: the bar is the quantile of 1 - IoU with eps 0.6's clusters: [0, 0, 0.5, 0.5] -> 0 at 0.25.
    # {6,7} and {8,9} merge there, so they are not independent; 5 falls off at eps 0.4, so it is not compact.
    kept, bar = reliable(d, labels, settings, None)
    assert bar == 0.0 and kept.tolist() == [0, 0, 0, 1, 1, -1, -1, -1, -1, -1]
    # Later rounds keep the first round's bar: a higher one lets the merging pairs in.
    kept, bar = reliable(d, labels, settings, 0.5)
    assert bar == 0.5 and kept.tolist() == [0, 0, 0, 1, 1, -1, 2, 2, 3, 3]
    assert reliable(d, labels, dataclasses.replace(settings, independence_quantile=0.9), None)[1] == 0.5


def test_memories_have_the_right_shapes_and_pull_towards_the_own_cluster() -> None:
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    cams = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0])
    memory = ClusterMemory(feats, labels)
    proxies = CameraProxies(feats, labels, cams)
    assert memory.centroids.shape == (4, 8)
    assert proxies.proxies.shape == (8, 8) and proxies.proxy_label.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert proxies.proxy_index(labels, cams).tolist() == [0, 1, 0, 3, 2, 3, 4, 4, 5, 7, 7, 6]
    x = feats.clone().requires_grad_(True)
    loss = memory.loss(x, labels) + proxies.loss(x, labels, cams)
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and x.grad.abs().sum() > 0
    # A step down the gradient brings each crop nearer its own cluster's centroid.
    moved = torch.nn.functional.normalize(x - 0.05 * x.grad, dim=1)
    own = memory.centroids[labels]
    assert ((moved * own).sum(1) > (feats * own).sum(1)).float().mean() > 0.9
    before = memory.centroids.clone()
    memory.update(feats, labels)
    proxies.update(feats, labels, cams)
    assert torch.allclose(memory.centroids.norm(dim=1), torch.ones(4)) and not torch.equal(before, memory.centroids)


def make_site(root: Path, people: int = 12, shots: int = 2) -> Path:
    """A site folder with a manifest (path,camid,pid,split): two cameras, ``shots`` crops of each person by each,
    a person's crops alike (their own coarse pattern, a little noise), each camera with its own cast."""
    rng = np.random.default_rng(0)
    rows = []
    for person in range(people):
        pattern = rng.integers(0, 256, size=(8, 4, 3)).astype(np.float32)
        for cam in range(2):
            for shot in range(shots):
                pixels = np.kron(pattern, np.ones((8, 8, 1))) + rng.normal(0, 12, (64, 32, 3)) + 30 * cam
                name = f"images/{person:04d}_{cam}_{shot}.jpg"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name)
                rows.append({"path": name, "camid": cam, "pid": person + 1, "split": "val"})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "camid", "pid", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_weights(tmp_path / "source.safetensors", build_extractor(TINY).eval(), None, {"recipe": "test"})


def tiny_config(weights: Path, site: Path, out: Path, **overrides) -> AdaptConfig:
    settings = dict(rounds=2, steps=2, p=4, k=2, cluster=ClusterSettings(k1=4, k2=2, eps=0.7, min_samples=2))
    return AdaptConfig(str(weights), str(site), str(out), **{**settings, **overrides})


def stopped_then_resumed(monkeypatch, config: AdaptConfig) -> Path:
    """Run ``config`` as if stopped when round 2 starts training, then run it again: the resumed weights."""
    from training.adapt import loop

    real = loop._train_round

    def stop_in_round_2(*args, **kwargs):
        if args[-1] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_round", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        adapt(config)
    monkeypatch.setattr(loop, "_train_round", real)
    return adapt(config)


def test_adapt_never_reads_identities_and_records_its_provenance(tmp_path: Path, tiny_weights: Path) -> None:
    site = make_site(tmp_path / "site")
    first = adapt(tiny_config(tiny_weights, site, tmp_path / "a"))
    # The same crops with their identities shuffled: the very same weights.
    manifest = site / "manifest.csv"
    lines = manifest.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    pids = [r[2] for r in rows]
    random.Random(1).shuffle(pids)
    manifest.write_text(
        "\n".join([lines[0], *(",".join([r[0], r[1], p, r[3]]) for r, p in zip(rows, pids, strict=True))]) + "\n"
    )
    second = adapt(tiny_config(tiny_weights, site, tmp_path / "b"))
    with safe_open(first, "pt") as a, safe_open(second, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in list(a.keys()))
    source, adapted = load_weights(tiny_weights), load_weights(first)
    assert source.fingerprint != adapted.fingerprint
    record = adapted.provenance["adaptation"]
    assert record["source_fingerprint"] == source.fingerprint and record["site_crops"] == 48
    assert record["site_crops_sha256"] == read_site(site).sha256() and record["settings"]["cluster"]["k1"] == 4
    assert adapted.provenance["threshold_split"] == "site pseudo-identities (adaptation)"
    # No true-match rate from pseudo-identities: their genuine pairs are the ones the clustering found close.
    assert adapted.provenance["thresholds"] and all("tmr" not in t for t in adapted.provenance["thresholds"])
    assert adapted.provenance["adaptation"]["source"]["recipe"] == "test" and "recipe" not in adapted.provenance


def test_adapt_resumes_where_it_stopped(tmp_path: Path, tiny_weights: Path, monkeypatch) -> None:
    site = make_site(tmp_path / "site")
    whole = adapt(tiny_config(tiny_weights, site, tmp_path / "whole", rounds=3))
    from training.adapt import loop

    real = loop._train_round
    calls = []

    def stop_in_round_2(*args, **kwargs):
        calls.append(args[-1])
        if args[-1] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_round", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        adapt(tiny_config(tiny_weights, site, tmp_path / "resumed", rounds=3))
    monkeypatch.setattr(loop, "_train_round", real)
    resumed = adapt(tiny_config(tiny_weights, site, tmp_path / "resumed", rounds=3))
    assert calls == [0, 1, 2]
    with safe_open(whole, "pt") as a, safe_open(resumed, "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in list(a.keys()))
    report = json.loads((tmp_path / "resumed" / "adapt.json").read_text())
    assert [r["index"] for r in report["rounds"]] == [0, 1, 2]
    with pytest.raises(ValueError, match="another adaptation's"):
        adapt(tiny_config(tiny_weights, site, tmp_path / "resumed", rounds=3, lr=1e-3))


def test_the_reliability_bar_of_the_first_round_holds_through_a_resume(
    tmp_path: Path, tiny_weights: Path, monkeypatch
) -> None:
    site = make_site(tmp_path / "site")
    cluster = ClusterSettings(k1=4, k2=2, eps=0.7, min_samples=2, reliability_delta=0.05, independence_quantile=0.5)
    whole = adapt(tiny_config(tiny_weights, site, tmp_path / "whole", rounds=3, cluster=cluster))
    rounds = json.loads((tmp_path / "whole" / "adapt.json").read_text())["rounds"]
    bars = {r["clusters"]["independence_bar"] for r in rounds}
    assert len(bars) == 1 and all(np.isfinite(r["loss"]) for r in rounds)  # one bar; every round trained
    config = tiny_config(tiny_weights, site, tmp_path / "resumed", rounds=3, cluster=cluster)
    resumed = stopped_then_resumed(monkeypatch, config)
    with safe_open(whole, "pt") as a, safe_open(resumed, "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in list(a.keys()))
    recorded = load_weights(whole).provenance["adaptation"]["settings"]["cluster"]
    assert recorded["reliability_delta"] == 0.05 and recorded["independence_quantile"] == 0.5
    with pytest.raises(ValueError, match="--reliability-delta must be >= 0"):
        adapt(tiny_config(tiny_weights, site, tmp_path / "bad", cluster=ClusterSettings(reliability_delta=-0.1)))


def test_the_command_adapts_a_folder_and_evaluates_a_manifest(tmp_path: Path, tiny_weights: Path, capsys) -> None:
    site = make_site(tmp_path / "site")
    code = main(["adapt", "--weights", str(tiny_weights), "--site", str(site), "--out", str(tmp_path / "run"),
                 "--rounds", "1", "--steps", "1", "--p", "4", "--k", "2", "--k1", "4", "--k2", "2", "--eps", "0.9",
                 "--min-samples", "2", "--device", "cpu", "--eval"])  # fmt: skip
    assert code == 0 and "weights:" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "adapt.json").read_text())
    assert {"rank1", "mAP", "centred_rank1", "centred_mAP"} <= set(report["final"])
    assert {row["candidate"] for row in report["thresholds"]} == {"pseudo-identities"}
    folder = tmp_path / "folder"  # the same crops, one subfolder per camera, no manifest
    for path in (site / "images").iterdir():
        target = folder / f"cam{path.stem.split('_')[1]}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    assert read_site(folder).cameras == ["cam0", "cam1"]
    argv = ["adapt", "--weights", str(tiny_weights), "--site", str(folder), "--out", str(tmp_path / "f"), "--eval"]
    assert main(argv) == 2
    assert "--eval needs a manifest with a pid column" in capsys.readouterr().err


def test_the_served_threshold_is_the_one_asked_for_or_else_the_estimate() -> None:
    source = {"thresholds": [{"fmr": 0.01, "distance": 29.3, "tmr": 0.6}], "fmr_curve": [[20.0, 1e-4]],
              "threshold_split": "val", "recipe": "strong"}  # fmt: skip
    pseudo = {"thresholds": [{"fmr": 0.01, "distance": 30.0, "tmr": 0.7}], "threshold_split": "site pseudo"}
    kept = default_calibration(source, pseudo, "source")
    assert kept["thresholds"] == source["thresholds"] and kept["fmr_curve"] == source["fmr_curve"]
    assert kept["threshold_split"] == "val (the source weights', kept by adaptation)" and "recipe" not in kept
    assert default_calibration(source, pseudo, "pseudo") == pseudo
    assert default_calibration({"recipe": "untrained"}, pseudo, "source") == pseudo


@pytest.mark.parametrize("adapt_bn", [True, False])
def test_frozen_blocks_keep_their_weights_and_their_bn_statistics_follow_the_site(
    tmp_path: Path, tiny_weights: Path, adapt_bn: bool
) -> None:
    site = make_site(tmp_path / "site")
    run = tiny_config(tiny_weights, site, tmp_path / "run", freeze_blocks=2, rounds=2, adapt_bn=adapt_bn)
    adapted = load_weights(adapt(run))
    before, after = load_weights(tiny_weights).extractor.state_dict(), adapted.extractor.state_dict()
    frozen = [k for k in before if k.startswith(("trunk.conv1", "trunk.bn1", "trunk.layer1."))]
    statistics = [k for k in frozen if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(before[k], after[k]) for k in frozen if k not in statistics)
    # Two rounds, the templates computed in between: the statistics are the source's only when asked.
    assert all(torch.equal(before[k], after[k]) for k in statistics) is not adapt_bn
    assert not torch.equal(before["trunk.layer2.0.bn1.running_mean"], after["trunk.layer2.0.bn1.running_mean"])


def test_masks_hide_the_salient_pixels_of_a_second_view_and_need_a_mask_generator(tmp_path: Path) -> None:
    from models import build_mask_generator

    site = make_site(tmp_path / "site")
    torch.manual_seed(0)
    extractor, generator = build_extractor(TINY).eval(), build_mask_generator(TINY).eval()
    plain = save_weights(tmp_path / "plain.safetensors", extractor, None, {"recipe": "test"})
    with pytest.raises(ValueError, match="needs a trained mask generator"):
        adapt(tiny_config(plain, site, tmp_path / "refused", mask_weight=0.1))
    masked = save_weights(tmp_path / "masked.safetensors", extractor, generator, {"recipe": "test"})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        adapt(tiny_config(masked, site, tmp_path / "whole", mask_weight=1.0))
    without = load_weights(adapt(tiny_config(masked, site, tmp_path / "without")))
    runs = [load_weights(adapt(tiny_config(masked, site, tmp_path / f"with{i}", mask_weight=0.5))) for i in (0, 1)]
    differ = lambda a, b: any(not torch.equal(v, b[k]) for k, v in a.items())  # noqa: E731
    trained = runs[0].extractor.state_dict()
    assert differ(trained, without.extractor.state_dict())  # the hidden view adds its own gradient
    assert not differ(trained, runs[1].extractor.state_dict())  # and the run is still fixed by its seed
    assert not differ(runs[0].mask_generator.state_dict(), generator.state_dict())  # the generator is only read
    assert runs[0].provenance["adaptation"]["settings"]["mask_weight"] == 0.5


def test_a_mean_teacher_clusters_is_saved_and_resumes(tmp_path: Path, tiny_weights: Path, monkeypatch) -> None:
    from training.adapt import loop

    site = make_site(tmp_path / "site")
    with pytest.raises(ValueError, match=r"--teacher-decay must be in \[0, 1\)"):
        adapt(tiny_config(tiny_weights, site, tmp_path / "refused", teacher_decay=1.0))
    whole = adapt(tiny_config(tiny_weights, site, tmp_path / "whole", rounds=3, teacher_decay=0.5))
    checkpoint = torch.load(tmp_path / "whole" / loop.CHECKPOINT, weights_only=True)
    saved = load_weights(whole).extractor.state_dict()
    student, teacher = checkpoint["extractor"], checkpoint["teacher"]
    weights = [k for k, v in student.items() if v.is_floating_point() and "running" not in k]
    # What is saved is the teacher: the average of the steps' weights, not the last step's.
    assert all(torch.equal(saved[k], teacher[f"module.{k}"]) for k in weights)
    assert any(not torch.equal(saved[k], student[k]) for k in weights)
    plain = adapt(tiny_config(tiny_weights, site, tmp_path / "plain", rounds=3, teacher_decay=0.0))
    plain = load_weights(plain).extractor.state_dict()
    assert any(not torch.equal(saved[k], plain[k]) for k in weights)
    assert load_weights(whole).provenance["adaptation"]["settings"]["teacher_decay"] == 0.5

    resumed = stopped_then_resumed(
        monkeypatch, tiny_config(tiny_weights, site, tmp_path / "resumed", rounds=3, teacher_decay=0.5)
    )
    with safe_open(whole, "pt") as a, safe_open(resumed, "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in list(a.keys()))


def test_channels_last_changes_the_memory_format_not_the_method(tmp_path: Path, tiny_weights: Path) -> None:
    site = make_site(tmp_path / "site")
    contiguous = adapt(tiny_config(tiny_weights, site, tmp_path / "contiguous"))
    channels_last = adapt(tiny_config(tiny_weights, site, tmp_path / "channels_last", channels_last=True))
    a, b = load_weights(contiguous), load_weights(channels_last)
    reports = [json.loads((tmp_path / run / "adapt.json").read_text()) for run in ("contiguous", "channels_last")]
    # Other kernels, so not bit-identical; but the same clusters each round, and the same templates to rounding.
    assert [r["clusters"] for r in reports[0]["rounds"]] == [r["clusters"] for r in reports[1]["rounds"]]
    crops = torch.rand(8, 3, TINY.input_height, TINY.input_width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        similarity = torch.nn.functional.cosine_similarity(a.extractor.eval()(crops), b.extractor.eval()(crops))
    assert similarity.min() > 0.999
    assert "channels_last" not in b.provenance["adaptation"]["settings"]  # how it ran, not what it learnt
    assert all(set(r["phases"]) == {"templates", "clustering", "steps"} for r in reports[1]["rounds"])
