"""FusionNet — Quan, Hildebrand, Jeong, "FusionNet: A deep fully residual convolutional neural
network for image segmentation in connectomics", arXiv:1612.05360, 2016 (Frontiers in Computer
Science, 2021).

An encoder-decoder like U-Net whose skips are *summed* instead of concatenated, and whose levels
are "conv → residual block → conv": a 3×3 convolution, a residual block of three 3×3 convolutions
with an identity skip, and a 3×3 convolution, all same-padded, each followed by batch
normalisation and a ReLU. Four encoder levels of 64, 128, 256 and 512 maps, each followed by a
2×2 max-pool, lead to a 1024-map bridge; every decoder level up-samples by a stride-2 transposed
convolution that halves the maps (+ BN + ReLU), adds the encoder feature of the same level and
applies conv → residual block → conv. A 1×1 convolution gives the class scores (raw scores: the
common PyTorch port's tanh output belongs to its image-to-image use).

The layer configuration follows the paper's description as summarised in the project reference
(§9, written from memory of the paper and a third-party port, GunhoChoi/FusionNet-Pytorch); the
paper's full text could not be checked here. ``up_kernel=3`` is that port's 3×3 stride-2
transposed convolution (padding 1, output padding 1), ``up_kernel=2`` the U-Net-style 2×2 one.
The paper prints no parameter count; 1 input and 1 output channel give 78,531,137 parameters
(``up_kernel=3``) or 75,049,537 (``up_kernel=2``), BN affine parameters included and BN running
statistics not.

Output size = input size, a multiple of 16. The halo is computed from the layers by
:class:`~tilewise.models.densenet.Reach`: 251 px with 3×3 up-convolutions (receptive field
506 px over all phases, the reference's figure; lead 256 on the 16-px grid), 235 px with 2×2
(receptive field 491 px; the reference's 476 leaves out the up-convolutions' own spread).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tilewise.models.densenet import Reach
from tilewise.models.layers import he_init
from tilewise.models.registry import SizeRule, TilingFacts, register_model

__all__ = ["FusionNet", "fusionnet"]

UpKernel = Literal[2, 3]
DEPTH = 4  # encoder levels, each followed by a 2×2 max-pool


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class ResidualBlock(nn.Module):
    """Three 3×3 conv + BN layers (ReLU after the first two) plus the identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels)
        self.conv2 = _conv_bn_relu(channels, channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x + F(x))``."""
        out: torch.Tensor = self.relu(x + self.bn3(self.conv3(self.conv2(self.conv1(x)))))
        return out


class ConvResConv(nn.Sequential):
    """One FusionNet level: conv 3×3 → residual block → conv 3×3."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            _conv_bn_relu(c_in, c_out), ResidualBlock(c_out), _conv_bn_relu(c_out, c_out)
        )


class UpConv(nn.Sequential):
    """Stride-2 transposed convolution halving the maps, + BN + ReLU; output 2n for n."""

    def __init__(self, c_in: int, c_out: int, kernel: UpKernel) -> None:
        if kernel == 3:
            up = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
        else:
            up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        super().__init__(up, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def fusionnet_reach(up_kernel: UpKernel) -> Reach:
    """The reach of FusionNet's layers (five 3×3 convolutions per level)."""
    x = Reach.image(2**DEPTH)
    skips = []
    for _ in range(DEPTH):
        x = x.conv(3, repeat=5)
        skips.append(x)
        x = x.pool(2)
    x = x.conv(3, repeat=5)  # bridge
    padding = 1 if up_kernel == 3 else 0
    for skip in reversed(skips):
        x = (x.up(kernel=up_kernel, padding=padding) | skip).conv(3, repeat=5)
    return x


class FusionNet(nn.Module):
    """FusionNet with ``base_width`` maps at the first level, doubled at each of four levels.

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        base_width: maps of the first level (the paper: 64; the bridge has 16×).
        up_kernel: 3 (3×3 stride-2 transposed convolution, padding 1, output padding 1) or 2
            (2×2 stride 2).
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, base_width: int = 64, up_kernel: UpKernel = 3
    ) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be at least 1; got {base_width}")
        if up_kernel not in (2, 3):
            raise ValueError(f"up_kernel must be 2 or 3; got {up_kernel!r}")
        widths = [base_width * 2**level for level in range(DEPTH + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(ConvResConv(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.bridge = ConvResConv(widths[-2], widths[-1])
        self.deconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for w_low, w in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.deconv.append(UpConv(w_low, w, up_kernel))
            self.up.append(ConvResConv(w, w))
        self.out = nn.Conv2d(widths[0], num_classes, 1)

        stride = 2**DEPTH
        he_init(self)
        self.tiling = TilingFacts(
            stride=stride,
            margin=0,
            halo=fusionnet_reach(up_kernel).halo(),
            size_rule=SizeRule(stride, stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W); H and W multiples of 16."""
        skips = []
        for level in self.down:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bridge(x)
        for deconv, level, skip in zip(self.deconv, self.up, reversed(skips), strict=True):
            x = level(deconv(x) + skip)  # summation-based skip connection
        out: torch.Tensor = self.out(x)
        return out


@register_model(
    family="fusionnet", paper="Quan, Hildebrand, Jeong, arXiv 2016", tiny={"base_width": 1}
)
def fusionnet(
    in_channels: int, num_classes: int, *, base_width: int = 64, up_kernel: UpKernel = 3
) -> FusionNet:
    """FusionNet: residual U-Net with summed skips, same padding, stride 16, halo 251."""
    return FusionNet(in_channels, num_classes, base_width=base_width, up_kernel=up_kernel)
