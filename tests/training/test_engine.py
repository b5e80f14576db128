"""The stages' separation (each loss moves only its own network) and a short CPU run that learns."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from models import ModelConfig
from training.config import TrainConfig
from training.engine import Loaders, build_networks, fit, set_stage_modes, training_step
from training.evaluation import evaluate
from training.losses import extractor_loss, mask_loss

SMALL_MODEL = ModelConfig(
    backbone="resnet18", input_height=64, input_width=32, feat_dim=64, unet_base_width=4, unet_levels=3
)
SMALL = dict(
    model=SMALL_MODEL,
    device="cpu",
    workers=0,
    p=4,
    k=3,
)


class BlobIds(Dataset):
    """Identity i: a person-like box of colour i (top) and colour i' (bottom) on a noisy background."""

    def __init__(self, num_ids: int, per_id: int, seed: int, cams: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        colours = torch.Generator().manual_seed(1234)
        palette = torch.rand(num_ids, 2, 3, generator=colours) * 2 - 1
        self.items = []
        for pid in range(num_ids):
            for j in range(per_id):
                img = torch.randn(3, 64, 32, generator=g) * 1.0
                top = int(torch.randint(4, 12, (1,), generator=g))
                img[:, top : top + 22, 6:26] = palette[pid, 0, :, None, None] * 0.8
                img[:, top + 22 : top + 44, 6:26] = palette[pid, 1, :, None, None] * 0.8
                self.items.append((img, pid, j % cams))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img, pid, cam = self.items[i]
        return img, pid, cam, i


def _pk_batches(ds: BlobIds, p: int, k: int, seed: int) -> list[list[int]]:
    by_pid: dict[int, list[int]] = {}
    for i, (_img, pid, _cam) in enumerate(ds.items):
        by_pid.setdefault(pid, []).append(i)
    g = torch.Generator().manual_seed(seed)
    pids = [list(by_pid)[i] for i in torch.randperm(len(by_pid), generator=g)]
    return [[i for q in pids[s : s + p] for i in by_pid[q][:k]] for s in range(0, len(pids) - p + 1, p)]


def _batch(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    ds = BlobIds(config.p, config.k, seed=1)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return images, torch.tensor([ds[i][1] for i in range(len(ds))])


def test_stage2_leaves_the_extractor_and_its_buffers_unchanged() -> None:
    config = TrainConfig(**SMALL)
    nets = build_networks(config, torch.device("cpu"))
    images, pids = _batch(config)
    before = copy.deepcopy(nets.extractor.state_dict())
    gen_before = copy.deepcopy(nets.mask_generator.state_dict())
    set_stage_modes(2, nets)
    for _ in range(2):
        training_step(2, images, pids, nets, config, torch.device("cpu"))
    for name, value in nets.extractor.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(v, gen_before[k]) for k, v in nets.mask_generator.state_dict().items())


def test_stage3_each_loss_reaches_only_its_own_network() -> None:
    config = TrainConfig(**SMALL)
    nets = build_networks(config, torch.device("cpu"))
    images, pids = _batch(config)
    set_stage_modes(3, nets)
    ext, gen = nets.extractor, nets.mask_generator
    from models import hide_top

    mask = gen(images)
    clean = ext(images)
    l_ext = extractor_loss(clean, ext(hide_top(images, mask.detach(), 0.3)), pids)["loss_extractor"]
    ext_params, gen_params = list(ext.parameters()), list(gen.parameters())
    g_ext = torch.autograd.grad(l_ext, ext_params + gen_params, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in g_ext[len(ext_params) :])  # nothing reaches the generator
    assert any(g is not None and g.abs().sum() > 0 for g in g_ext[: len(ext_params)])
    # the engine's step: L_mask must leave the extractor alone, L_extractor the generator
    ext_before = copy.deepcopy(ext.state_dict())
    gen_before = copy.deepcopy(gen.state_dict())
    nets.opt_extractor.param_groups[0]["lr"] = 0.0  # only the mask generator may move
    training_step(3, images, pids, nets, config, torch.device("cpu"))
    assert all(
        torch.equal(ext.state_dict()[k], v)
        for k, v in ext_before.items()
        if "running" not in k and "num_batches" not in k
    )
    assert any(not torch.equal(gen.state_dict()[k], v) for k, v in gen_before.items())
    # and with the generator's lr at zero only the extractor moves
    nets.opt_extractor.param_groups[0]["lr"] = 2e-4
    nets.opt_mask.param_groups[0]["lr"] = 0.0
    gen_before = {k: v.clone() for k, v in gen.named_parameters()}
    ext_before = {k: v.clone() for k, v in ext.named_parameters()}
    training_step(3, images, pids, nets, config, torch.device("cpu"))
    assert all(torch.equal(gen.get_parameter(k), v) for k, v in gen_before.items())
    assert any(not torch.equal(ext.get_parameter(k), v) for k, v in ext_before.items())


def test_stage3_grads_of_each_loss_in_the_engine() -> None:
    """backward(inputs=...) as the engine does it: L_mask's grads land only on the generator."""
    config = TrainConfig(**SMALL)
    nets = build_networks(config, torch.device("cpu"))
    images, _pids = _batch(config)
    set_stage_modes(3, nets)
    mask = nets.mask_generator(images)
    l_mask = mask_loss(nets.extractor(images).detach(), nets.extractor(mask * images), mask)["loss_mask"]
    l_mask.backward(inputs=list(nets.mask_generator.parameters()))
    assert all(p.grad is None for p in nets.extractor.parameters())
    assert all(p.grad is not None for p in nets.mask_generator.parameters())


def test_nonfinite_loss_stops_with_the_loss_dict() -> None:
    from training.engine import NonFiniteLossError

    config = TrainConfig(**SMALL)
    nets = build_networks(config, torch.device("cpu"))
    images, pids = _batch(config)
    set_stage_modes(1, nets)
    with pytest.raises(NonFiniteLossError, match="loss_triplet"):
        training_step(1, images * float("nan"), pids, nets, config, torch.device("cpu"))


@pytest.mark.slow
def test_three_stages_lower_the_triplet_loss_and_raise_map(tmp_path) -> None:
    config = TrainConfig(**{**SMALL, "p": 6, "k": 3}, epochs=(6, 1, 2), eval_every=0, lr=1e-3, seed=0)
    train = BlobIds(12, 6, seed=2)
    test = BlobIds(16, 4, seed=3)
    query = torch.utils.data.Subset(test, [i for i in range(len(test)) if i % 4 == 0])
    gallery = torch.utils.data.Subset(test, [i for i in range(len(test)) if i % 4 != 0])
    batches = _pk_batches(train, config.p, config.k, seed=0)
    loaders = Loaders(
        train=DataLoader(train, batch_sampler=batches * 2),
        query=DataLoader(query, batch_size=32),
        gallery=DataLoader(gallery, batch_size=32),
        figure_images=torch.stack([test[i][0] for i in range(4)]),
    )
    torch.manual_seed(0)
    nets = build_networks(config, torch.device("cpu"))
    untrained = evaluate(nets.extractor, loaders.query, loaders.gallery, torch.device("cpu"))
    nets, state = fit(config, loaders, out=tmp_path, nets=nets)
    stage1 = [r for r in state.history if r["stage"] == 1]
    assert stage1[-1]["loss_triplet"] < stage1[0]["loss_triplet"]
    final = state.history[-1]
    assert final["mAP"] > untrained["mAP"] + 10
    assert {"loss_mask", "loss_extractor", "all_mAP", "mINP"} <= set(final)
    for name in ("last.pt", "best.pt", "log.csv", "config.json", "curves.png", "masks_stage2.png", "masks_stage3.png"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("hidden_bn_stats", ["clean", "both"])
def test_stage3_running_statistics_come_from_the_clean_view_or_both_never_the_mask_loss(hidden_bn_stats: str) -> None:
    """L_mask's forward never moves the extractor's running statistics; the hidden view does only with "both"
    (the default "clean" keeps them those of clean crops, the only ones the served forward sees)."""
    from models import hide_top

    config = TrainConfig(**SMALL, hidden_bn_stats=hidden_bn_stats)
    nets = build_networks(config, torch.device("cpu"))
    images, pids = _batch(config)
    set_stage_modes(3, nets)
    ext_copy, gen_copy = copy.deepcopy(nets.extractor), copy.deepcopy(nets.mask_generator)
    with torch.no_grad():
        mask = gen_copy(images)
        ext_copy(images)
        hidden_only = copy.deepcopy(ext_copy)
        hidden_only(hide_top(images, mask, config.model.mask_ratio))
    training_step(3, images, pids, nets, config, torch.device("cpu"))
    expected = dict((hidden_only if hidden_bn_stats == "both" else ext_copy).named_buffers())
    other = dict((ext_copy if hidden_bn_stats == "both" else hidden_only).named_buffers())
    stats = [(n, v) for n, v in nets.extractor.named_buffers() if n.endswith(("running_mean", "running_var"))]
    assert stats
    for name, value in stats:
        assert torch.allclose(value, expected[name]), name
    assert any(not torch.allclose(value, other[name]) for name, value in stats)  # the choice is visible
    assert all(m.momentum == 0.1 for m in nets.extractor.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_frozen_trunk_blocks_keep_weights_and_bn_statistics_in_stages_1_and_3() -> None:
    config = TrainConfig(**SMALL, freeze_blocks=2)  # ResNet-18: the stem and layer1
    nets = build_networks(config, torch.device("cpu"))
    images, pids = _batch(config)
    frozen = nets.extractor.trunk_blocks()[:2]
    trained = nets.extractor.trunk_blocks()[2]
    before = [copy.deepcopy(b.state_dict()) for b in (*frozen, trained)]
    for stage in (1, 3):
        set_stage_modes(stage, nets, config.freeze_blocks)
        training_step(stage, images, pids, nets, config, torch.device("cpu"))
    for block, state in zip(frozen, before, strict=False):
        assert not any(m.training for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d))
        for name, value in block.state_dict().items():
            assert torch.equal(value, state[name]), name
    assert any(not torch.equal(v, before[2][k]) for k, v in trained.state_dict().items())


def test_freeze_blocks_beyond_the_trunk_is_refused() -> None:
    with pytest.raises(ValueError, match="resnet18 trunk has 5 blocks"):
        build_networks(TrainConfig(**SMALL, freeze_blocks=6), torch.device("cpu"))


def test_warmup_rises_linearly_from_a_tenth_then_the_papers_lr_stays() -> None:
    from training.engine import lr_factor

    config = TrainConfig(**SMALL, warmup_epochs=2)
    assert lr_factor(config, 1, 0, 0, 10) == pytest.approx(0.1)
    assert lr_factor(config, 1, 1, 0, 10) == pytest.approx(0.55)  # half way through the 20 warm-up steps
    assert lr_factor(config, 1, 2, 0, 10) == 1.0
    assert lr_factor(config, 3, 0, 0, 10) == 1.0
    assert lr_factor(TrainConfig(**SMALL), 1, 0, 0, 10) == 1.0


def test_cosine_and_step_decay_run_over_the_extractors_epochs_of_stages_1_and_3() -> None:
    from training.engine import lr_factor

    cosine = TrainConfig(**SMALL, epochs=(5, 3, 4), warmup_epochs=1, lr_schedule="cosine")  # 9 extractor epochs
    assert lr_factor(cosine, 1, 1, 0, 10) == pytest.approx(1.0)  # the warm-up's end
    assert lr_factor(cosine, 1, 4, 5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3.5 / 8)))
    assert lr_factor(cosine, 2, 1, 0, 10) == 1.0  # stage 2 does not train the extractor
    assert lr_factor(cosine, 3, 0, 0, 10) == pytest.approx(0.5)  # goes on where stage 1 stopped
    assert lr_factor(cosine, 3, 3, 10, 10) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(**SMALL, epochs=(4, 1, 4), lr_steps=(2, 5), lr_schedule="step")
    assert [lr_factor(step, 1, e, 3, 10) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.1])
    assert [lr_factor(step, 3, e, 0, 10) for e in range(3)] == pytest.approx([0.1, 0.01, 0.01])
    # A stage-1 run that stops before stage 3 follows the same curve: rows may fork after it.
    alone = dataclasses.replace(cosine, stages=(1,))
    assert all(lr_factor(alone, 1, e, 0, 10) == lr_factor(cosine, 1, e, 0, 10) for e in range(5))


def test_train_one_epoch_applies_the_warmup_to_the_extractor_lr() -> None:
    from training.engine import train_one_epoch

    config = TrainConfig(**SMALL, warmup_epochs=1, lr=1e-3)
    nets = build_networks(config, torch.device("cpu"))
    images, pids = _batch(config)
    batches = [(images, pids, torch.zeros_like(pids), pids)] * 2
    train_one_epoch(1, batches, nets, config, torch.device("cpu"))
    assert nets.opt_extractor.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.55)  # the last of 2 steps


def test_the_id_classifier_gets_head_lr_factor_times_the_scheduled_lr() -> None:
    from training.engine import train_one_epoch

    model = dataclasses.replace(SMALL_MODEL, bnneck=True, neck_feat="after")
    config = TrainConfig(**{**SMALL, "model": model}, id_loss_weight=1.0, lr=1e-3, warmup_epochs=1, head_lr_factor=10)
    images, pids = _batch(config)
    nets = build_networks(config, torch.device("cpu"), train_pids=pids.tolist())
    body, head = nets.opt_extractor.param_groups
    assert [id(p) for p in head["params"]] == [id(nets.train_model.classifier.weight)]
    assert len(body["params"]) == len(list(nets.extractor.parameters()))
    train_one_epoch(1, [(images, pids, torch.zeros_like(pids), pids)] * 2, nets, config, torch.device("cpu"))
    assert body["lr"] == pytest.approx(1e-3 * 0.55) and head["lr"] == pytest.approx(1e-2 * 0.55)  # warm-up, both
    with pytest.raises(ValueError, match="head_lr_factor must be > 0"):
        TrainConfig(**SMALL, head_lr_factor=0)


def test_id_loss_trains_the_classifier_on_the_bnneck_feature_and_off_it_gets_no_gradient() -> None:
    model = dataclasses.replace(SMALL_MODEL, bnneck=True, neck_feat="after")
    config = TrainConfig(**{**SMALL, "model": model}, id_loss_weight=1.0, label_smoothing=0.1)
    images, pids = _batch(config)
    nets = build_networks(config, torch.device("cpu"), train_pids=[7, *pids.tolist()])  # one pid not in the batch
    classifier = nets.train_model.classifier
    assert classifier.weight.shape == (config.p + 1, 64)  # (num training identities, feat_dim)
    set_stage_modes(1, nets)
    ((feat, logits),) = nets.model(images)
    assert feat.shape == (len(pids), 64) and logits.shape == (len(pids), config.p + 1)
    before = classifier.weight.detach().clone()
    losses = training_step(1, images, pids, nets, config, torch.device("cpu"))
    assert {"loss_triplet", "loss_id", "loss_extractor"} <= set(losses)
    assert losses["loss_extractor"] == pytest.approx(losses["loss_triplet"] + losses["loss_id"])
    assert classifier.weight.grad.abs().sum() > 0 and not torch.equal(classifier.weight, before)
    assert nets.train_model.labels(torch.tensor([7, pids[0].item()])).tolist() == [
        sorted({7, *pids.tolist()}).index(7),
        sorted({7, *pids.tolist()}).index(pids[0].item()),
    ]

    off = dataclasses.replace(config, id_loss_weight=0.0)
    before = classifier.weight.detach().clone()
    losses = training_step(1, images, pids, nets, off, torch.device("cpu"))
    assert "loss_id" not in losses and classifier.weight.grad is None and torch.equal(classifier.weight, before)
    assert all(p.grad is not None for p in nets.extractor.head.parameters())


def test_the_id_loss_without_training_identities_is_refused() -> None:
    with pytest.raises(ValueError, match="needs the training identities"):
        build_networks(TrainConfig(**SMALL, id_loss_weight=1.0), torch.device("cpu"))


@pytest.mark.parametrize("stage", [1, 3])
def test_amp_bf16_runs_the_networks_in_bf16_on_the_cpu_and_keeps_fp32_weights(stage: int) -> None:
    """--amp bf16 is autocast on the CPU too (oneDNN's AMX / AVX-512 bf16 kernels); without it the convs stay fp32."""
    out_dtypes: dict[str, list[torch.dtype]] = {}
    # 128x64: at 64x32 a ResNet's layer4 meets oneDNN's bf16 fault that check_mixed_precision refuses.
    small = {**SMALL, "model": dataclasses.replace(SMALL_MODEL, input_height=128, input_width=64)}
    for amp in ("none", "bf16"):
        config = TrainConfig(**small, amp=amp, channels_last=True)
        nets = build_networks(config, torch.device("cpu"))
        images, pids = _batch(config)
        images = torch.nn.functional.interpolate(images, size=(128, 64))
        set_stage_modes(stage, nets)
        seen: list[torch.dtype] = []
        convs = [[m for m in nets.extractor.modules() if isinstance(m, torch.nn.Conv2d)][-1]]  # the 512-d head's
        if stage == 3:
            convs.append(next(m for m in nets.mask_generator.modules() if isinstance(m, torch.nn.Conv2d)))
        hooks = [c.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.dtype)) for c in convs]
        before = {k: v.clone() for k, v in nets.extractor.named_parameters()}
        losses = training_step(
            stage, images.contiguous(memory_format=torch.channels_last), pids, nets, config, torch.device("cpu")
        )
        for hook in hooks:
            hook.remove()
        out_dtypes[amp] = seen
        assert all(math.isfinite(v.item()) for v in losses.values())
        assert all(p.dtype == torch.float32 for p in (*nets.extractor.parameters(), *nets.mask_generator.parameters()))
        assert any(not torch.equal(nets.extractor.get_parameter(k), v) for k, v in before.items())
    assert set(out_dtypes["none"]) == {torch.float32}
    assert set(out_dtypes["bf16"]) == {torch.bfloat16}


def test_fp16_off_cuda_is_refused_with_a_pointer_to_bf16() -> None:
    with pytest.raises(ValueError, match="--amp fp16 needs CUDA, not cpu; use --amp bf16"):
        build_networks(TrainConfig(**SMALL, amp="fp16"), torch.device("cpu"))


class _WrongUnderAutocast(torch.nn.Conv2d):
    """A convolution that is right in fp32 and negated under autocast: a kernel that is wrong in low precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x) if torch.is_autocast_enabled(x.device.type) else super().forward(x)


def test_mixed_precision_that_gives_wrong_outputs_is_refused_before_training() -> None:
    from training.engine import check_mixed_precision

    config = TrainConfig(**SMALL, amp="bf16")
    healthy = build_networks(
        dataclasses.replace(config, model=dataclasses.replace(SMALL_MODEL, input_height=128, input_width=64)),
        torch.device("cpu"),
    )  # its own check passed: bf16 keeps every layer close to fp32
    wrong = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), _WrongUnderAutocast(4, 4, 3, stride=2))
    with pytest.raises(
        ValueError, match=r"--amp bf16 gives wrong outputs in the mask generator 1 layer on cpu at 64x32"
    ):
        check_mixed_precision({"extractor": healthy.extractor, "mask generator": wrong}, config, torch.device("cpu"))
    assert wrong.training and not any(m._forward_hooks for m in wrong.modules())  # mode and hooks put back
    check_mixed_precision({"mask generator": wrong}, TrainConfig(**SMALL), torch.device("cpu"))  # fp32: no check
