"""ImageDataset: files of any mode -> (transformed RGB tensor, pid, camid, index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import ModelConfig
from training.data import ImageDataset, Sample
from training.transforms import build_eval_transform, build_train_transform, split_train_transform


def test_reads_rgb_jpg_and_greyscale_png_files(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.jpg")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "c.png")  # mode L
    samples = [Sample(tmp_path / "a.png", 3, 1), Sample(tmp_path / "b.jpg", 4, 0), Sample(tmp_path / "c.png", 5, 2)]
    config = ModelConfig(backbone="resnet18", input_height=64, input_width=32)
    dataset = ImageDataset(samples, build_eval_transform(config))
    assert len(dataset) == 3
    image, pid, camid, index = dataset[0]
    assert image.shape == (3, 64, 32) and (pid, camid, index) == (3, 1, 0)
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(config.mean).view(3, 1, 1)) / (
        torch.tensor(config.std).view(3, 1, 1)
    )
    assert torch.allclose(image, expected, atol=1e-5)  # lossless PNG, resize to its own size: the pixels
    grey, pid, _, _ = dataset[2]
    assert pid == 5 and grey.shape == (3, 64, 32)
    assert torch.allclose(grey[0] * config.std[0] + config.mean[0], grey[1] * config.std[1] + config.mean[1], atol=1e-5)
    train = ImageDataset(samples, build_train_transform(config))
    loader = torch.utils.data.DataLoader(train, batch_size=3)
    images, pids, camids, indices = next(iter(loader))
    assert camids.tolist() == [1, 0, 2]
    assert images.shape == (3, 3, 64, 32) and pids.tolist() == [3, 4, 5] and indices.tolist() == [0, 1, 2]


def test_prepared_images_are_kept_and_give_the_same_crops_as_the_whole_transform(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (90, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        samples.append(Sample(tmp_path / f"{i}.jpg", i, 0))
    config = ModelConfig(backbone="resnet18", input_height=64, input_width=32)
    whole = ImageDataset(samples, build_train_transform(config, erasing_p=0.5))
    prepare, augment = split_train_transform(config, erasing_p=0.5)
    calls = []
    cached = ImageDataset(samples, augment, lambda image: calls.append(1) or prepare(image))
    for epoch in range(3):  # the same random draws give the same crops, flips and erased boxes
        torch.manual_seed(epoch)
        expected = [whole[i][0] for i in range(4)]
        torch.manual_seed(epoch)
        got = [cached[i][0] for i in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert len(calls) == 4  # each file decoded and resized once, not once an epoch
    assert cached._prepared[0].dtype == torch.uint8 and cached._prepared[0].shape == (3, 67, 33)
