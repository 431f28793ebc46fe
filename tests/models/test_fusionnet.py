"""FusionNet (Quan et al. 2016): parameter counts, size rule, the residual block, and the halo's
reach against a window cut from the image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilewise import models
from tilewise.models.fusionnet import FusionNet, ResidualBlock, fusionnet_reach
from tilewise.models.layers import count_parameters


@pytest.mark.parametrize(("up_kernel", "count"), [(3, 78_531_137), (2, 75_049_537)])
def test_parameter_count_for_one_input_and_one_output_channel(up_kernel: int, count: int) -> None:
    # The reference's counts (no published figure exists): BN affine parameters included.
    with torch.device("meta"):
        model = models.create("fusionnet", in_channels=1, num_classes=1, up_kernel=up_kernel)
    assert count_parameters(model) == count


@pytest.mark.parametrize("up_kernel", [2, 3])
def test_output_size_equals_input_size(up_kernel: int) -> None:
    # The paper's 640×640 tiles.
    with torch.device("meta"):
        model = models.create("fusionnet", in_channels=1, num_classes=2, up_kernel=up_kernel)
        y = model(torch.empty(1, 1, 640, 640))
    assert tuple(y.shape) == (1, 2, 640, 640)
    assert model.tiling.size_rule.is_valid(640) and not model.tiling.size_rule.is_valid(648)


def test_residual_block_adds_its_input() -> None:
    # With the last convolution of the residual branch zeroed, the block is relu(x + 0).
    torch.manual_seed(0)
    block = ResidualBlock(4).eval()
    with torch.no_grad():
        block.conv3.weight.zero_()
        assert block.conv3.bias is not None
        block.conv3.bias.zero_()
        x = torch.randn(1, 4, 8, 8)
        assert torch.allclose(block(x), x.clamp(min=0))


def test_skips_are_summed_not_concatenated() -> None:
    # Each decoder level sees as many maps as its encoder level produced.
    model = models.create("fusionnet", in_channels=1, num_classes=1, base_width=2)
    assert isinstance(model, FusionNet)
    first_convs = [level[0][0] for level in model.up]
    assert [c.in_channels for c in first_convs] == [16, 8, 4, 2]


@pytest.mark.parametrize(("up_kernel", "rf"), [(3, 506), (2, 491)])
def test_receptive_field(up_kernel: int, rf: int) -> None:
    # 506 is the reference's figure. For 2×2 up-convolutions it gives 476, which leaves out that
    # a 2×2 up-sampling widens the field by one fine pixel per level (8 + 4 + 2 + 1).
    reach = fusionnet_reach(up_kernel)  # type: ignore[arg-type]
    assert max(reach.hi) - min(reach.lo) + 1 == rf


def _linearised(up_kernel: int) -> FusionNet:
    """A tiny float64 net with ReLU removed and max-pools averaged: the reach is unchanged but no
    path is clipped, so every pixel in the reach has a non-zero derivative."""
    torch.manual_seed(0)
    model = models.create(
        "fusionnet", in_channels=2, num_classes=2, base_width=2, up_kernel=up_kernel
    )
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(2))
    assert isinstance(model, FusionNet)
    return model.double().eval()


@pytest.mark.parametrize("up_kernel", [2, 3])
def test_reach_is_the_support_of_the_derivative(up_kernel: int) -> None:
    # Output pixel start + q (one per phase q, one per sample) depends on exactly the input
    # columns [start + q + lo[q], start + q + hi[q]]. (Far from the image edges: a window's zero
    # padding stands for the columns that reach would read outside it. Comparing a window with
    # the whole image cannot show the far end of the reach here: its weight, a product over
    # some 45 layers, is below float64 rounding.)
    model = _linearised(up_kernel)
    reach = fusionnet_reach(up_kernel)  # type: ignore[arg-type]
    start, width = 16 * 17, 16 * 36
    x = torch.randn(16, 2, 16, width, dtype=torch.float64, requires_grad=True)
    q = torch.arange(16)
    model(x)[q, :, :, start + q].sum().backward()
    assert x.grad is not None
    support = x.grad.abs().sum(dim=(1, 2)) > 0  # (phase, column)
    lo = [int(s.nonzero()[0]) - start - p for p, s in enumerate(support)]
    hi = [int(s.nonzero()[-1]) - start - p for p, s in enumerate(support)]
    assert (lo, hi) == (list(reach.lo), list(reach.hi))
    assert all(
        bool(s[start + p + a : start + p + b + 1].all())
        for p, (s, a, b) in enumerate(zip(support, lo, hi, strict=True))
    )
    assert model.tiling.halo == reach.halo()
