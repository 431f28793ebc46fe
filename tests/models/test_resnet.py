"""The dilated ResNet backbones: sizes, parameter count, and the receptive field they declare."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from torch import nn

from tilewise.models.layers import count_parameters
from tilewise.models.resnet import RESNET101_BLOCKS, DilatedResNet, ResNetStyle, receptive_radius

M = TypeVar("M", bound=nn.Module)


def positive(model: M) -> M:
    """``model`` in eval mode and float64 with every convolution averaging its inputs (weights
    1 / fan-in, no bias): an impulse then reaches exactly the outputs whose receptive field holds it
    (ReLU and max-pooling pass positive values, BN at its initial statistics only scales)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return model.eval().double()


def reach(features: Callable[[torch.Tensor], torch.Tensor], radius: int) -> tuple[bool, bool]:
    """Whether a stride-8 feature sees a unit impulse ``radius`` px above and below it, and whether
    it sees one ``radius + 1`` px above or below (the receptive-field radius is ``radius`` iff
    the answer is ``(True, False)``). The impulse moves along the rows only, so the image is narrow.
    """
    j = -(-(radius + 1) // 8)  # a feature row whose field fits in the image
    row = 8 * j
    n = 8 * -(-(row + radius + 1) // 8) + 1
    x = torch.zeros(4, 3, n, 129, dtype=torch.float64)
    for b, p in enumerate((row - radius, row + radius, row - radius - 1, row + radius + 1)):
        x[b, :, p, 64] = 1.0
    with torch.no_grad():
        seen = features(x)[:, :, j, 8].amax(dim=1) > 0
    return bool(seen[:2].all()), bool(seen[2:].any())


def test_resnet101_body_has_the_published_count() -> None:
    # Reference §7: the caffe ResNet-101 body of DeepLab-v2 is 42,500,160 (= torchvision's
    # ResNet-101 without its classifier): where the stride sits does not change the count.
    with torch.device("meta"):
        body = DilatedResNet(3, style="caffe", blocks=RESNET101_BLOCKS)
    assert count_parameters(body) == 42_500_160


@pytest.mark.parametrize("style", ["caffe", "psp"])
@pytest.mark.parametrize("n, features", [(321, 41), (473, 60), (713, 90)])
def test_output_stride_is_8_on_8k_plus_1_inputs(style: ResNetStyle, n: int, features: int) -> None:
    with torch.device("meta"):
        body = DilatedResNet(3, style=style)
        res4, res5 = body(torch.empty(1, 3, n, n))
    assert res4.shape == (1, 1024, features, features)
    assert res5.shape == (1, 2048, features, features)


@pytest.mark.parametrize(
    "style, radius",
    [
        # 7×7/2 stem 3, pool 2, res2 3×4, res3 4×8, res4 23×16, res5 3×32.
        ("caffe", 513),
        # conv1_1..1_3 1+2+2, pool 2, res2 3×4, res3 4+3×8 (stride in the 3×3), res4, res5 as above.
        ("psp", 511),
    ],
)
def test_receptive_radius_is_measured_radius(style: ResNetStyle, radius: int) -> None:
    body = positive(DilatedResNet(3, style=style, width=1 / 32))
    assert body.receptive_radius() == radius
    assert reach(lambda x: body(x)[1], radius) == (True, False)


def test_receptive_radius_follows_the_depth() -> None:
    body = positive(DilatedResNet(3, blocks=(1, 2, 1, 1), width=1 / 32))
    radius = 3 + 2 + 4 + 2 * 8 + 16 + 32
    assert body.receptive_radius() == radius
    assert reach(lambda x: body(x)[1], radius) == (True, False)


def test_receptive_radius_rejects_an_uncentred_kernel() -> None:
    with pytest.raises(ValueError, match="not centred"):
        receptive_radius([nn.Conv2d(1, 1, 2)])
