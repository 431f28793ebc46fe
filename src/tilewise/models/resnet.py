"""Dilated ResNet-50/101 backbones of output stride 8 — He, Zhang, Ren, Sun, "Deep Residual Learning
for Image Recognition", CVPR 2016, as adapted for segmentation by DeepLab-v2 and PSPNet.

Both styles replace the strides of res4 and res5 by dilations 2 and 4, so the features have stride 8
and every position ``j`` of them sits on input pixel ``8 j`` (all convolutions and poolings are
centred and padded, and inputs are ``8 k + 1`` pixels):

- ``"caffe"`` (MSRA's released ResNet, used by DeepLab-v2): 7×7/2 stem convolution + BN + ReLU,
  3×3/2 max-pool with padding 1 and ceil mode (DeepLab's; MSRA's own pool has no padding, which
  would break the ``8 k + 1`` alignment), and the stride of a bottleneck in its first 1×1.
- ``"psp"`` (PSPNet's "deep stem"): conv1_1 3×3/2 (64), conv1_2 3×3 (64), conv1_3 3×3 (128), each
  bias-free + BN + ReLU, 3×3/2 max-pool with padding 1, and the stride in the bottleneck's 3×3.

Convolutions are bias-free and followed by BatchNorm (caffe's BatchNorm + Scale), so the body of
ResNet-101 has 42,500,160 parameters in either style except for the deep stem's extra weights
(torchvision's ResNet-101 without its classifier has the same 42,500,160). The module is a backbone
only and is not registered; DeepLab and PSPNet build on it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from tilewise.models.layers import scaled

__all__ = [
    "RESNET50_BLOCKS",
    "RESNET101_BLOCKS",
    "Bottleneck",
    "DilatedResNet",
    "ResNetStyle",
    "receptive_radius",
]

ResNetStyle = Literal["caffe", "psp"]

#: Bottlenecks per stage (res2, res3, res4, res5).
RESNET50_BLOCKS: tuple[int, int, int, int] = (3, 4, 6, 3)
RESNET101_BLOCKS: tuple[int, int, int, int] = (3, 4, 23, 3)

# Per stage: bottleneck width (before the ×4 expansion), stride, dilation. res4 and res5 trade
# their strides for dilations 2 and 4: output stride 8 instead of 32.
_STAGES: tuple[tuple[int, int, int], ...] = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))
_EXPANSION = 4


def _first(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


def receptive_radius(
    layers: Iterable[nn.Module], *, radius: int = 0, jump: int = 1
) -> tuple[int, int]:
    """Receptive-field radius and input stride after a chain of convolutions and poolings.

    Each layer of (effective) kernel ``k_eff = dilation * (k - 1) + 1`` applied at input stride
    ``jump`` widens the radius by ``jump * (k_eff - 1) / 2``; then ``jump`` grows by its stride.
    Layers other than convolutions and poolings (BN, ReLU, drop-out) do not change either.

    Args:
        layers: the convolutions and poolings of one path through the network, in order.
        radius: the radius before the chain (in input pixels).
        jump: the input stride before the chain.

    Returns:
        ``(radius, jump)`` after the chain.

    Raises:
        ValueError: a layer whose effective kernel is even (not centred on its output).
    """
    for m in layers:
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            k = _first(m.kernel_size)
            dilation = _first(m.dilation) if isinstance(m, nn.Conv2d | nn.MaxPool2d) else 1
            span = dilation * (k - 1)
            if span % 2:
                raise ValueError(f"{m} is not centred: its effective kernel {span + 1} is even")
            radius += jump * span // 2
            jump *= _first(m.stride)
    return radius, jump


def _conv_bn(
    c_in: int, c_out: int, k: int, *, stride: int = 1, dilation: int = 1
) -> list[nn.Module]:
    pad = dilation * (k - 1) // 2
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dilation, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (dilated) → 1×1 expand, each with BN, plus the identity or a projection.

    Args:
        c_in: input channels.
        mid: bottleneck width.
        c_out: output channels (``4 * mid`` in ResNet).
        stride: 1 or 2.
        dilation: of the 3×3 convolution (padding = dilation keeps the size).
        stride_in_1x1: MSRA/caffe put the stride in the first 1×1 (DeepLab-v2); PSPNet (and
            torchvision) in the 3×3.
    """

    def __init__(
        self, c_in: int, mid: int, c_out: int, *, stride: int, dilation: int, stride_in_1x1: bool
    ) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = _conv_bn(c_in, mid, 1, stride=s1)
        self.conv2, self.bn2 = _conv_bn(mid, mid, 3, stride=s3, dilation=dilation)
        self.conv3, self.bn3 = _conv_bn(mid, c_out, 1)
        self.relu = nn.ReLU(inplace=True)
        # res*a blocks project the shortcut (branch1) when the shape changes.
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride=stride))

    def main_path(self) -> list[nn.Module]:
        """The layers of the residual branch in order (the path that sets the receptive field)."""
        return [self.conv1, self.conv2, self.conv3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output, same size as ``x`` (halved when ``stride`` is 2)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        out: torch.Tensor = self.relu(y + shortcut)
        return out


class DilatedResNet(nn.Module):
    """A bottleneck ResNet with output stride 8 (res4 dilation 2, res5 dilation 4).

    An input of ``8 k + 1`` pixels gives ``k + 1`` feature pixels in res3–res5.

    Args:
        in_channels: input bands.
        style: ``"caffe"`` (DeepLab-v2) or ``"psp"`` (PSPNet); see the module docstring.
        blocks: bottlenecks per stage res2..res5: ``(3, 4, 23, 3)`` for ResNet-101, ``(3, 4, 6,
            3)`` for ResNet-50; fewer for quick trials (the receptive field follows).
        width: multiplier of every channel count (1 = the paper's network).

    Attributes:
        res4_channels: channels of the res4 output (1024 at width 1).
        out_channels: channels of the res5 output (2048 at width 1).
    """

    stride = 8

    def __init__(
        self,
        in_channels: int,
        *,
        style: ResNetStyle = "caffe",
        blocks: tuple[int, ...] = RESNET101_BLOCKS,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if style not in ("caffe", "psp"):
            raise ValueError(f"style must be 'caffe' or 'psp'; got {style!r}")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive counts (res2..res5); got {blocks}")
        if width <= 0:
            raise ValueError(f"width must be positive; got {width}")
        self.style = style
        stem: OrderedDict[str, nn.Module] = OrderedDict()
        if style == "caffe":
            c = scaled(64, width)
            stem["conv1"], stem["bn_conv1"] = _conv_bn(in_channels, c, 7, stride=2)
            stem["conv1_relu"] = nn.ReLU(inplace=True)
        else:
            c = in_channels
            for name, c_out, s in (("conv1_1", 64, 2), ("conv1_2", 64, 1), ("conv1_3", 128, 1)):
                c_out = scaled(c_out, width)
                stem[name], stem[f"{name}_bn"] = _conv_bn(c, c_out, 3, stride=s)
                stem[f"{name}_relu"] = nn.ReLU(inplace=True)
                c = c_out
        # Padding 1 (centred windows) and ceil mode as in caffe: 8k+1 -> 4k+1 -> 2k+1.
        stem["pool1"] = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.stem = nn.Sequential(stem)

        stages = []
        for n, (mid, stride, dilation) in zip(blocks, _STAGES, strict=True):
            mid = scaled(mid, width)
            c_out = _EXPANSION * mid
            layers = []
            for i in range(n):
                layers.append(
                    Bottleneck(
                        c if i == 0 else c_out,
                        mid,
                        c_out,
                        stride=stride if i == 0 else 1,
                        dilation=dilation,
                        stride_in_1x1=style == "caffe",
                    )
                )
            stages.append(nn.Sequential(*layers))
            c = c_out
        self.res2, self.res3, self.res4, self.res5 = stages
        self.res4_channels = _EXPANSION * scaled(256, width)
        self.out_channels = c

    def main_path(self) -> list[nn.Module]:
        """Convolutions and poolings of the longest path, in order (for the receptive field)."""
        path: list[nn.Module] = list(self.stem)
        for stage in (self.res2, self.res3, self.res4, self.res5):
            for block in stage:
                assert isinstance(block, Bottleneck)
                path += block.main_path()
        return path

    def receptive_radius(self) -> int:
        """Receptive-field radius of one res5 feature in input pixels (caffe ResNet-101: 513)."""
        radius, jump = receptive_radius(self.main_path())
        assert jump == self.stride
        return radius

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(res4, res5)`` features, both at stride 8 (res4 feeds PSPNet's auxiliary head)."""
        x = self.res3(self.res2(self.stem(x)))
        res4 = self.res4(x)
        return res4, self.res5(res4)
