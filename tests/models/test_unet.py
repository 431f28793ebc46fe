"""U-Net against the paper's numbers (Ronneberger et al. 2015, Fig. 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilewise import models
from tilewise.models.layers import count_parameters


def _meta_unet(**args: object) -> nn.Module:
    with torch.device("meta"):
        return models.create("unet", in_channels=1, num_classes=2, **args)


def test_the_papers_net_has_31_030_658_weights_and_23_convolutions() -> None:
    net = _meta_unet()
    assert count_parameters(net) == 31_030_658
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert len(convs) == 23  # 18 3x3 + 4 up-convolutions + the final 1x1


@pytest.mark.parametrize(("size", "out"), [(572, 388), (188, 4), (204, 20)])
def test_valid_convolutions_shrink_572_to_388(size: int, out: int) -> None:
    net = _meta_unet()
    y = net(torch.empty(1, 1, size, size, device="meta"))
    assert tuple(y.shape) == (1, 2, out, out)


def test_size_rule_is_16k_plus_60_from_188() -> None:
    rule = models.facts("unet").size_rule
    valid = [n for n in range(150, 600) if rule.is_valid(n)]
    assert valid == [16 * k + 60 for k in range(8, 34)]
    assert models.facts("unet").halo == 92 == models.facts("unet").margin
