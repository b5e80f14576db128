from __future__ import annotations

import pytest
import torch

from models import hide_top, keep_map


def test_random_mask_hides_exactly_the_top_share_of_each_image():
    mask = torch.rand(3, 1, 224, 112)
    keep = keep_map(mask, 0.3)
    k = round(0.3 * 224 * 112)
    for i in range(3):
        hidden = mask[i][keep[i] == 0]
        kept = mask[i][keep[i] == 1]
        assert hidden.numel() == k
        assert hidden.min() >= kept.max()
        assert torch.equal(hidden.sort().values, mask[i].flatten().topk(k).values.sort().values)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_constant_and_tied_masks_still_hide_exactly_round_ratio_hw(ratio: float):
    constant = torch.full((2, 1, 20, 10), 0.5)
    tied = torch.randint(0, 3, (2, 1, 20, 10)).float()
    for mask in (constant, tied):
        keep = keep_map(mask, ratio)
        assert ((keep == 0).sum(dim=(1, 2, 3)) == round(ratio * 200)).all()


def test_hide_top_zeroes_hidden_pixels_in_every_channel_and_keeps_the_rest():
    images = torch.randn(2, 3, 16, 8)
    mask = torch.rand(2, 1, 16, 8)
    hidden = hide_top(images, mask, 0.25)
    keep = keep_map(mask, 0.25).expand_as(images).bool()
    assert torch.equal(hidden[keep], images[keep])
    assert (hidden[~keep] == 0).all()


def test_ratio_zero_hides_nothing_and_bad_ratio_is_refused():
    mask = torch.rand(1, 1, 8, 8)
    assert keep_map(mask, 0.0).all()
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        keep_map(mask, 1.0)


def test_no_gradient_flows_through_the_hiding_to_the_mask():
    mask = torch.rand(1, 1, 8, 8, requires_grad=True)
    images = torch.randn(1, 3, 8, 8, requires_grad=True)
    hide_top(images, mask).sum().backward()
    assert mask.grad is None and images.grad is not None
