"""The CLI's bad-input messages, and resume continuing exactly where a run stopped."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.data import DataLoader

from models import ModelConfig
from tests.training.test_engine import SMALL, BlobIds, _pk_batches
from training.allocator import allocator_advice
from training.cli import build_parser, config_from_args, main
from training.config import TrainConfig
from training.engine import Loaders, fit


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_missing_root_is_one_clear_sentence(tmp_path, capsys) -> None:
    code, err = _run(
        ["fit", "--dataset", "market1501", "--root", str(tmp_path / "nope"), "--out", str(tmp_path)], capsys
    )
    assert code != 0 and f"data set root {tmp_path / 'nope'} does not exist" in err


def test_unknown_dataset_names_the_choices(tmp_path, capsys) -> None:
    code, err = _run(["fit", "--dataset", "imagenet", "--root", str(tmp_path)], capsys)
    assert code != 0 and "invalid choice: 'imagenet'" in err and "market1501" in err


@pytest.mark.parametrize("epochs", ["50,25", "a,b,c", "1,-2,3"])
def test_bad_epochs_is_refused(tmp_path, capsys, epochs: str) -> None:
    code, err = _run(["fit", "--root", str(tmp_path), "--epochs", epochs], capsys)
    assert code != 0 and "--epochs" in err


def test_missing_weights_and_run_are_refused(tmp_path, capsys) -> None:
    code, err = _run(["evaluate", "--weights", str(tmp_path / "w.safetensors"), "--root", str(tmp_path)], capsys)
    assert code != 0 and "does not exist" in err
    code, err = _run(["export", "--run", str(tmp_path / "run")], capsys)
    assert code != 0 and "run folder" in err


def test_every_flag_has_help_and_defaults_are_the_papers() -> None:
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, action.dest
    config = config_from_args(parser.parse_args(["fit", "--root", "x"]))
    assert config.epochs == (50, 25, 100)
    assert (config.p, config.k, config.lr, config.margin, config.lambda1, config.lambda2) == (
        20,
        3,
        2e-4,
        0.3,
        0.9,
        0.95,
    )
    assert config.mask_lr == 1e-3 and config.model.mask_ratio == 0.3 and config.model == ModelConfig()
    assert (config.id_loss_weight, config.random_erasing, config.warmup_epochs, config.lr_schedule) == (
        0,
        0,
        0,
        "constant",
    )
    assert dataclasses.replace(config, root="data", dataset_kwargs={}, workers=4) == TrainConfig(root="data", workers=4)


def test_every_setting_of_both_dataclasses_is_a_flag() -> None:
    """The flags are derived from TrainConfig and ModelConfig: a new field is a new flag, typed once."""
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    dests = {a.dest for a in fit._actions}
    settings = {f.name for cls in (TrainConfig, ModelConfig) for f in dataclasses.fields(cls)}
    assert settings - dests == {"model", "dataset_kwargs", "mean", "std"}


def test_strong_recipe_flags_and_per_piece_overrides() -> None:
    parser = build_parser()
    strong = config_from_args(parser.parse_args(["fit", "--root", "x", "--recipe", "strong"]))
    assert strong.recipe == "strong" and strong.model.bnneck and strong.model.neck_feat == "after"
    assert not strong.model.normalize and strong.model.flip_average and strong.model.last_stride == 1
    assert (strong.id_loss_weight, strong.label_smoothing, strong.random_erasing) == (1.0, 0.1, 0.5)
    assert strong.warmup_epochs > 0 and strong.lr_schedule == "cosine"
    # each piece is its own flag, over either recipe, and the masks (stages 2, 3) stay with either
    argv = ["fit", "--root", "x", "--recipe", "strong", "--no-bnneck", "--neck-feat", "before", "--random-erasing", "0"]
    mixed = config_from_args(parser.parse_args([*argv, "--lr-schedule", "step", "--stages", "1,2,3"]))
    assert not mixed.model.bnneck and mixed.random_erasing == 0 and mixed.lr_schedule == "step"
    assert mixed.id_loss_weight == 1.0 and mixed.stages == (1, 2, 3)
    paper = config_from_args(parser.parse_args(["fit", "--root", "x", "--bnneck", "--id-loss-weight", "1"]))
    assert paper.recipe == "paper" and paper.model.bnneck and paper.id_loss_weight == 1 and paper.label_smoothing == 0


def test_serving_after_the_bnneck_without_one_is_refused(tmp_path, capsys) -> None:
    code, err = _run(["fit", "--root", str(tmp_path), "--neck-feat", "after"], capsys)
    assert code == 2 and "needs bnneck=True" in err


def _loaders(config: TrainConfig) -> Loaders:
    train, test = BlobIds(4, 3, seed=2), BlobIds(4, 3, seed=3)
    return Loaders(
        train=DataLoader(train, batch_sampler=_pk_batches(train, config.p, config.k, seed=0)),
        query=DataLoader(torch.utils.data.Subset(test, [0, 3, 6, 9]), batch_size=16),
        gallery=DataLoader(torch.utils.data.Subset(test, [1, 2, 4, 5, 7, 8, 10, 11]), batch_size=16),
    )


def test_resume_continues_where_it_stopped(tmp_path) -> None:
    base = {**SMALL, "epochs": (2, 1, 1), "eval_every": 0, "seed": 3}
    whole = TrainConfig(**base)
    nets_whole, state_whole = fit(whole, _loaders(whole), out=tmp_path / "whole")

    first = TrainConfig(**base, stages=(1,))
    fit(first, _loaders(first), out=tmp_path / "split")
    assert json.loads((tmp_path / "split" / "config.json").read_text())["stages"] == [1]
    torch.manual_seed(123)  # resume must restore the RNG, whatever the process did in between
    rest = TrainConfig(**base, stages=(1, 2, 3))
    nets_split, state_split = fit(rest, _loaders(rest), out=tmp_path / "split", resume=True)

    assert [(r["stage"], r["epoch"]) for r in state_split.history] == [(1, 1), (1, 2), (2, 1), (3, 1)]
    for a, b in ((nets_whole.extractor, nets_split.extractor), (nets_whole.mask_generator, nets_split.mask_generator)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.allclose(x.float(), y.float(), atol=1e-6), name
    assert state_split.history[-1]["loss_mask"] == pytest.approx(state_whole.history[-1]["loss_mask"], rel=1e-5)


def test_resume_with_networks_built_otherwise_is_refused(tmp_path) -> None:
    """The weights would load (a last stride changes no shape) but compute something else."""
    first = TrainConfig(**{**SMALL, "epochs": (1, 0, 0), "eval_every": 0}, stages=(1,))
    fit(first, _loaders(first), out=tmp_path)
    other = dataclasses.replace(first, model=dataclasses.replace(first.model, last_stride=1), epochs=(2, 0, 0))
    with pytest.raises(ValueError, match=r"cannot resume .*'last_stride': \(2, 1\)"):
        fit(other, _loaders(other), out=tmp_path, resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["last_stride"] == 2  # still the checkpoint's
    served = dataclasses.replace(first, model=dataclasses.replace(first.model, normalize=True), epochs=(2, 0, 0))
    _, state = fit(served, _loaders(served), out=tmp_path, resume=True)  # serving settings may change
    assert [r["epoch"] for r in state.history] == [1, 2]


def test_resume_without_a_checkpoint_is_refused(tmp_path) -> None:
    config = TrainConfig(**SMALL)
    with pytest.raises(FileNotFoundError, match=r"last\.pt"):
        fit(config, _loaders(config), out=tmp_path, resume=True)


def test_evaluate_prints_figures_thresholds_and_draws_the_histograms(tmp_path, capsys, manifest_root) -> None:
    from models import build_extractor, save_weights

    config = ModelConfig(backbone="resnet18", feat_dim=16, input_height=64, input_width=32, unet_base_width=4)
    # Thresholds calibrated elsewhere: one every pair passes, one none does.
    stored = [{"fmr": 0.01, "distance": 1e9, "tmr": 0.5}, {"fmr": 0.001, "distance": -1.0, "tmr": 0.2}]
    weights = save_weights(tmp_path / "w.safetensors", build_extractor(config).eval(), None, {"thresholds": stored})
    png = tmp_path / "hist.png"
    argv = ["evaluate", "--weights", str(weights), "--dataset", "folder", "--root", str(manifest_root.root)]
    code = main([*argv, "--workers", "0", "--device", "cpu", "--rerank", "--histogram", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert {"mAP", "rank1", "all_mAP", "rerank_mAP", "rerank_rank1"} <= set(report["figures"])
    assert [t["fmr"] for t in report["thresholds"]] == [0.01, 0.001]
    # val: 8 queries (2 per id in camera 0), 6 gallery images (ids 1000-1002, 2 each in camera 1)
    assert report["pairs"] == {"genuine": 3 * 2 * 2, "impostor": 8 * 6 - 3 * 2 * 2}
    # What the stored thresholds really give here, beside what they were calibrated to give.
    assert report["stored_thresholds"] == [
        {**stored[0], "here": {"fmr": 1.0, "tmr": 1.0}},
        {**stored[1], "here": {"fmr": 0.0, "tmr": 0.0}},
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_round_trips_with_its_nested_model_and_reads_the_flat_layout_of_older_runs() -> None:
    config = TrainConfig(model=ModelConfig(backbone="resnet18", bnneck=True), lr_schedule="step", stages=(1,))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    older = {"backbone": "resnet18", "input_height": 64, "input_width": 32, "epochs": [1, 2, 3], "flip_eval": True}
    migrated = TrainConfig.from_dict(older)
    assert migrated.model == ModelConfig(backbone="resnet18", input_height=64, input_width=32, flip_average=True)
    assert migrated.epochs == (1, 2, 3)
    with pytest.raises(ValueError, match=r"unknown training settings \['mystery'\]"):
        TrainConfig.from_dict({**older, "mystery": 1})


def test_cpu_training_under_glibcs_malloc_is_told_about_jemalloc() -> None:
    glibc = "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    jemalloc = "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    advice = allocator_advice(glibc)
    assert advice is not None and "LD_PRELOAD=" in advice and "libjemalloc" in advice
    assert allocator_advice(glibc + jemalloc) is None
    assert allocator_advice(glibc, on_gpu=True) is None
