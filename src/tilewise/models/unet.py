"""U-Net — Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015.

The contracting path repeats two unpadded 3×3 convolutions with ReLU and a 2×2 max-pool; the
expansive path an up-convolution (2×2 transposed convolution halving the channels), the
concatenation with the centre-cropped skip feature map, and two unpadded 3×3 convolutions. A 1×1
convolution maps the 64 features to the classes. With valid convolutions the output is smaller than
the input: 572 → 388, i.e. a margin of 92 px per side, which is exactly the context the paper's
overlap-tile strategy mirrors in at the image border. Drop-out sits at the end of the contracting
path. 1 input channel and 2 classes give 31,030,658 weights.

``unet_same`` is the widely used same-padded variant: output size = input size, which then must be
a multiple of 2**depth; its receptive field radius is 92 + 15 = 107 px (depth 4).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tilewise.models.layers import he_init
from tilewise.models.registry import SizeRule, TilingFacts, register_model

__all__ = ["UNet", "unet", "unet_same"]

Padding = Literal["valid", "same"]


def _double_conv(c_in: int, c_out: int, pad: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=pad),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=pad),
        nn.ReLU(inplace=True),
    )


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dy, dx = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., dy : dy + h, dx : dx + w]


def valid_unet_size_rule(depth: int) -> SizeRule:
    """Valid input sizes of the valid-convolution U-Net of ``depth`` poolings.

    Every pooling needs an even size, so ``n = 2**depth * b + 4 * (2**depth - 1)`` where ``b`` is
    the bottleneck's input size; the smallest ``b`` is the one that leaves at least one output px.
    """
    step = 2**depth
    for b in range(1, 64):
        n = step * b + 4 * (step - 1)
        if _valid_unet_output(n, depth) > 0:
            return SizeRule(minimum=n, step=step)
    raise AssertionError("unreachable: b = 8 always leaves 4 output pixels")


def _valid_unet_output(n: int, depth: int) -> int:
    """Output size of the valid U-Net for input ``n``, or 0 when ``n`` is not valid."""
    x = n
    for _ in range(depth):
        x -= 4
        if x <= 0 or x % 2:
            return 0
        x //= 2
    x -= 4
    if x <= 0:
        return 0
    for _ in range(depth):
        x = 2 * x - 4
        if x <= 0:
            return 0
    return x


class UNet(nn.Module):
    """U-Net with ``depth`` poolings and ``base_width`` features at the first level.

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        depth: number of 2×2 poolings (the paper: 4).
        base_width: features of the first level, doubled at every level (the paper: 64).
        padding: ``"valid"`` (the paper: unpadded convolutions, output smaller than input) or
            ``"same"`` (zero padding, output size = input size).
        dropout: drop-out probability at the end of the contracting path (the paper: 0.5).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        depth: int = 4,
        base_width: int = 64,
        padding: Padding = "valid",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1; got {depth}")
        if base_width < 1:
            raise ValueError(f"base_width must be at least 1; got {base_width}")
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same'; got {padding!r}")
        pad = 0 if padding == "valid" else 1
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(_double_conv(c, w, pad))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[-2], widths[-1], pad)
        # The paper puts drop-out "at the end of the contracting path": after the deepest
        # encoder level and the bottleneck. It is inactive in eval mode.
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for w_low, w in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.up_conv.append(_double_conv(2 * w, w, pad))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        he_init(self)

        stride = 2**depth
        if padding == "valid":
            margin = 6 * stride - 4  # depth 4: 92
            self.tiling = TilingFacts(
                stride=stride, margin=margin, halo=margin, size_rule=valid_unet_size_rule(depth)
            )
        else:
            # Same context as the valid net plus the pooling phase: 92..107 px at depth 4.
            self.tiling = TilingFacts(
                stride=stride, margin=0, halo=7 * stride - 5, size_rule=SizeRule(stride, stride)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H', W'); H' = H - 2 * margin."""
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level == self.depth - 1:
                x = self.drop(x)
            skips.append(x)
            x = self.pool(x)
        x = self.drop(self.bottleneck(x))
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = up(x)
            x = conv(torch.cat([_center_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1))
        out: torch.Tensor = self.classifier(x)
        return out


@register_model(family="unet", paper="Ronneberger et al., MICCAI 2015", tiny={"base_width": 2})
def unet(
    in_channels: int,
    num_classes: int,
    *,
    depth: int = 4,
    base_width: int = 64,
    dropout: float = 0.5,
) -> UNet:
    """U-Net as in the paper: valid 3×3 convolutions, 572 → 388, halo 92, origins on 16."""
    return UNet(
        in_channels,
        num_classes,
        depth=depth,
        base_width=base_width,
        padding="valid",
        dropout=dropout,
    )


@register_model(
    family="unet",
    paper="Ronneberger et al., MICCAI 2015 (same-padded variant)",
    tiny={"base_width": 2},
)
def unet_same(
    in_channels: int,
    num_classes: int,
    *,
    depth: int = 4,
    base_width: int = 64,
    dropout: float = 0.5,
) -> UNet:
    """Same-padded U-Net: output size = input size (a multiple of 16), halo 107."""
    return UNet(
        in_channels,
        num_classes,
        depth=depth,
        base_width=base_width,
        padding="same",
        dropout=dropout,
    )
