from __future__ import annotations

import pytest
import torch
from torch import nn

from models import ModelConfig, build_mask_generator


def test_full_size_mask_generator_gives_a_1x224x112_mask_in_0_1():
    generator = build_mask_generator(ModelConfig()).eval()
    with torch.no_grad():
        mask = generator(torch.randn(2, 3, 224, 112))
    assert mask.shape == (2, 1, 224, 112)
    assert mask.dtype == torch.float32
    assert ((mask >= 0) & (mask <= 1)).all()


def test_level_widths_and_layers_are_the_papers():
    generator = build_mask_generator(ModelConfig())
    convs3 = [m for m in generator.down.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs3] == [32, 32, 64, 64, 128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs3)
    assert all(isinstance(block[i], nn.BatchNorm2d) for block in generator.down for i in (1, 4))
    assert (generator.pool.kernel_size, generator.pool.stride) == (2, 2)
    ups = list(generator.up)
    assert [u.out_channels for u in ups] == [256, 128, 64, 32]
    assert all(u.kernel_size == (2, 2) and u.stride == (2, 2) for u in ups)
    decoder_convs = [m for m in generator.up_conv.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in decoder_convs] == [256, 256, 128, 128, 64, 64, 32, 32]
    # skip connections by concatenation: each decoder level's first conv takes twice its width
    assert [block[0].in_channels for block in generator.up_conv] == [512, 256, 128, 64]
    assert (generator.out.out_channels, generator.out.kernel_size) == (1, (1, 1))


@pytest.mark.parametrize("size", [(16, 16), (64, 32), (256, 128)])
def test_any_input_with_sides_multiple_of_16_works(size: tuple[int, int]):
    generator = build_mask_generator(ModelConfig(unet_base_width=4)).eval()
    with torch.no_grad():
        assert generator(torch.randn(1, 3, *size)).shape == (1, 1, *size)


def test_input_not_divisible_by_16_is_refused():
    generator = build_mask_generator(ModelConfig(unet_base_width=4))
    with pytest.raises(ValueError, match="divisible by 16"):
        generator(torch.randn(1, 3, 70, 32))


def test_small_width_every_parameter_learns():
    generator = build_mask_generator(ModelConfig(unet_base_width=4, input_height=64, input_width=32))
    generator(torch.randn(2, 3, 64, 32)).mean().backward()
    assert all(p.grad is not None for p in generator.parameters())
