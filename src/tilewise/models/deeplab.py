"""DeepLab v1 and v2 — Chen, Papandreou, Kokkinos, Murphy, Yuille, "Semantic Image Segmentation with
Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015 (v1), and "DeepLab: Semantic Image
Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs", TPAMI 2018
(v2, arXiv 2016).

DeepLab turns VGG16 into a dense predictor of output stride 8: pool1–3 are 3×3/2 with padding 1
(ceil mode), pool4 and pool5 3×3/1 with padding 1, conv5 is dilated by 2 and fc6 by the "atrous"
rate ``r``. The scores at stride 8 are bilinearly up-sampled ×8 by caffe's ``Interp`` layer, which
maps corner to corner (``align_corners=True``: ``n`` feature pixels give ``8 (n - 1) + 1``). For an
input of ``8 k + 1`` pixels every pooling keeps its windows centred (8k+1 → 4k+1 → 2k+1 → k+1), so
the output has exactly the input's size: 321 → 41 → 321, 513 → 65 → 513. The DenseCRF of the
papers is post-processing and is not part of these networks.

Networks (parameter counts with 21 classes, all weights and biases; there is no fixed up-sampling
to exclude, the ``Interp`` layer has no weights):

- ``deeplab_largefov``: v1 DeepLab-LargeFOV, fc6 3×3 rate 12 with 1024 channels, fc7 1×1 1024, fc8:
  20,505,429 — Table 1's **20.5M**.
- ``deeplab_v1``: the other fc6 variants of v1's Table 1, chosen by ``fc6_kernel``, ``fc6_dilation``
  and ``fc6_channels`` (fc7 has ``fc6_channels`` too). 7×7 rate 4, 4096 (the default, the direct
  dilated conversion of VGG's fc6): 134,346,581 → **134.3M**; 4×4 rate 4 or 8, 4096: 65,140,565 →
  **65.1M**; 3×3 rate 12, 1024 is LargeFOV.
- ``deeplab_aspp_l`` / ``deeplab_aspp_s``: v2 VGG16 ASPP, four LargeFOV-type branches (fc6 3×3 1024
  → fc7 1×1 1024 → fc8) at rates 6/12/18/24 and 2/4/8/12, their scores summed: 37,877,652. The
  "DeepLab-LFOV 37.3M" of the Tiramisu paper's CamVid table reproduces under no documented
  configuration: LargeFOV itself is 20.5M (20,495,179 with 11 classes), and ASPP-L, the nearest
  net, is 37,836,652 with 11 classes (+1.4%).
- ``deeplab_resnet101``: v2 ResNet-101 ASPP: a dilated caffe-style ResNet-101 (see
  :mod:`tilewise.models.resnet`) and four 3×3 convolutions 2048 → C with bias at rates 6/12/18/24
  (``fc1_voc12_c0..c3``), summed: 44,048,532 (body 42,500,160). The paper prints no count.

Tiling: same padding everywhere, so ``margin = 0``; window origins on multiples of 8 keep every
window on the pooling grid of whole-image inference. A feature at position ``j`` sits on input
pixel ``8 j`` and sees ``R`` pixels each side (LargeFOV: ``R = 209``, the receptive field 419 of the
reference); an output pixel interpolates the two features around it, the farther one up to 7 px
away, so the exact halo is ``R + 7`` (computed from the layers, so reduced variants get theirs).
The ResNet-101 ASPP net has ``R = 705`` (receptive field 1411) and halo 712: finite and exact, but
impractical, since the tile must then be at least 712 px and each window about 3 tiles wide.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from tilewise.models.layers import VGG16_BLOCKS, he_init, scaled
from tilewise.models.registry import SizeRule, TilingFacts, register_model
from tilewise.models.resnet import RESNET101_BLOCKS, DilatedResNet, receptive_radius

__all__ = [
    "DeepLabResNet",
    "DeepLabVGG",
    "deeplab_aspp_l",
    "deeplab_aspp_s",
    "deeplab_largefov",
    "deeplab_resnet101",
    "deeplab_v1",
    "interp",
]

#: Output stride of every DeepLab here.
STRIDE = 8
#: Valid input sizes: ``8 k + 1`` (k >= 1), where the output has the input's size.
SIZE_RULE = SizeRule(minimum=STRIDE + 1, step=STRIDE)


def interp(scores: torch.Tensor, factor: int = STRIDE) -> torch.Tensor:
    """Caffe's ``Interp`` with zoom ``f``: bilinear, corners aligned, ``n -> f (n - 1) + 1``."""
    h, w = scores.shape[-2:]
    size = (factor * (h - 1) + 1, factor * (w - 1) + 1)
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=True)


def _tiling(radius: int) -> TilingFacts:
    # An output pixel between features j and j + 1 (input pixels 8j and 8j + 8) needs both, so up
    # to R + 7 px of context on one side. The reference's halo table rounds LargeFOV's 210 + 8 up
    # to 224 and gives ~705 (the bare radius) for ResNet-ASPP; R + 7 = 216 and 712 are exact
    # (the registry's tiled == whole-image test passes at 216).
    return TilingFacts(stride=STRIDE, margin=0, halo=radius + STRIDE - 1, size_rule=SIZE_RULE)


def _vgg_largefov_body(in_channels: int, width: float) -> nn.Sequential:
    """VGG16's 13 convolutions with DeepLab's poolings and dilated conv5 (output stride 8)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for block, channels in enumerate(VGG16_BLOCKS, start=1):
        dilation = 2 if block == 5 else 1  # conv5 follows two stride-1 poolings
        for i, c_out in enumerate(channels, start=1):
            c_out = scaled(c_out, width)
            layers[f"conv{block}_{i}"] = nn.Conv2d(c, c_out, 3, padding=dilation, dilation=dilation)
            layers[f"relu{block}_{i}"] = nn.ReLU(inplace=True)
            c = c_out
        # 3×3 windows with padding 1 stay centred (2×2 ones would not): 8k+1 maps to 4k+1.
        stride = 2 if block <= 3 else 1
        layers[f"pool{block}"] = nn.MaxPool2d(3, stride=stride, padding=1, ceil_mode=True)
    return nn.Sequential(layers)


def _fc_branch(
    c_in: int, num_classes: int, *, kernel: int, dilation: int, channels: int, dropout: float
) -> nn.Sequential:
    """fc6 (k×k, dilated) → fc7 (1×1) → fc8 (1×1 to the classes), ReLU and drop-out between."""
    span = dilation * (kernel - 1)
    if span % 2:
        raise ValueError(
            f"fc6 of kernel {kernel} and dilation {dilation} is not centred "
            f"(dilation * (kernel - 1) = {span} must be even)"
        )
    return nn.Sequential(
        OrderedDict(
            fc6=nn.Conv2d(c_in, channels, kernel, padding=span // 2, dilation=dilation),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout(dropout),
            fc7=nn.Conv2d(channels, channels, 1),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout(dropout),
            fc8=nn.Conv2d(channels, num_classes, 1),
        )
    )


class DeepLabVGG(nn.Module):
    """DeepLab on VGG16: v1 (one fc6 branch) or v2 ASPP (several branches, scores summed).

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        rates: the fc6 dilation of each branch: ``(12,)`` for LargeFOV, ``(6, 12, 18, 24)`` for
            ASPP-L.
        fc6_kernel: fc6 kernel size (LargeFOV 3; v1's Table 1 also 7 and 4).
        fc6_channels: channels of fc6 and fc7 (LargeFOV 1024; VGG's 4096).
        width: multiplier of every hidden channel count.
        dropout: after fc6 and fc7 (0.5).

    Attributes:
        radius: receptive-field radius of one stride-8 score, in input pixels (LargeFOV: 209).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        rates: tuple[int, ...] = (12,),
        fc6_kernel: int = 3,
        fc6_channels: int = 1024,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not rates or min(rates) < 1:
            raise ValueError(f"rates must be positive dilations; got {rates}")
        if fc6_kernel < 1 or fc6_channels < 1 or width <= 0:
            raise ValueError(
                f"fc6_kernel, fc6_channels and width must be positive; got "
                f"{fc6_kernel}, {fc6_channels}, {width}"
            )
        self.features = _vgg_largefov_body(in_channels, width)
        c = scaled(VGG16_BLOCKS[-1][-1], width)
        self.branches = nn.ModuleList(
            _fc_branch(
                c,
                num_classes,
                kernel=fc6_kernel,
                dilation=r,
                channels=scaled(fc6_channels, width),
                dropout=dropout,
            )
            for r in rates
        )
        body, jump = receptive_radius(self.features)
        assert jump == STRIDE
        self.radius = max(
            receptive_radius(branch.modules(), radius=body, jump=jump)[0]
            for branch in self.branches
        )
        he_init(self)
        self.tiling = _tiling(self.radius)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at stride 8: ``8 k + 1`` input pixels give ``k + 1``."""
        f = self.features(x)
        out: torch.Tensor = sum(branch(f) for branch in self.branches)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W) for ``H, W = 8 k + 1``."""
        return interp(self.scores(x))


class DeepLabResNet(nn.Module):
    """DeepLab-v2 on a dilated caffe-style ResNet with ASPP (3×3 convolutions to the classes).

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        blocks: bottlenecks per stage (ResNet-101: ``(3, 4, 23, 3)``).
        rates: ASPP dilations (ASPP-L: 6, 12, 18, 24).
        width: multiplier of every hidden channel count.

    Attributes:
        radius: receptive-field radius of one stride-8 score, in input pixels (ResNet-101: 705).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        blocks: tuple[int, ...] = RESNET101_BLOCKS,
        rates: tuple[int, ...] = (6, 12, 18, 24),
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not rates or min(rates) < 1:
            raise ValueError(f"rates must be positive dilations; got {rates}")
        self.backbone = DilatedResNet(in_channels, style="caffe", blocks=blocks, width=width)
        c = self.backbone.out_channels
        # fc1_voc12_c0..c3 of the released prototxt: one 3×3 convolution per rate, with bias.
        self.fc1 = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=r, dilation=r) for r in rates)
        body = self.backbone.receptive_radius()
        self.radius = max(
            receptive_radius([conv], radius=body, jump=STRIDE)[0] for conv in self.fc1
        )
        he_init(self)
        self.tiling = _tiling(self.radius)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at stride 8: ``8 k + 1`` input pixels give ``k + 1``."""
        _, f = self.backbone(x)
        out: torch.Tensor = sum(conv(f) for conv in self.fc1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W) for ``H, W = 8 k + 1``."""
        return interp(self.scores(x))


_V1 = "Chen et al., ICLR 2015 (DeepLab v1)"
_V2 = "Chen et al., TPAMI 2018 (DeepLab v2)"
_TINY_VGG = {"width": 1 / 32}


@register_model(family="deeplab", paper=_V1, tiny=_TINY_VGG)
def deeplab_largefov(
    in_channels: int, num_classes: int, *, width: float = 1.0, dropout: float = 0.5
) -> DeepLabVGG:
    """DeepLab-LargeFOV (VGG16, fc6 3×3 rate 12, 1024 ch): 20.5M, stride 8, halo 216."""
    return DeepLabVGG(
        in_channels,
        num_classes,
        rates=(12,),
        fc6_kernel=3,
        fc6_channels=1024,
        width=width,
        dropout=dropout,
    )


@register_model(family="deeplab", paper=_V1, tiny=_TINY_VGG)
def deeplab_v1(
    in_channels: int,
    num_classes: int,
    *,
    fc6_kernel: int = 7,
    fc6_dilation: int = 4,
    fc6_channels: int = 4096,
    width: float = 1.0,
    dropout: float = 0.5,
) -> DeepLabVGG:
    """DeepLab v1 with any fc6 of Table 1 (default 7×7 rate 4, 4096 ch: 134.3M), stride 8.

    Table 1's rows: ``fc6_kernel=7, fc6_dilation=4, fc6_channels=4096`` (134.3M),
    ``4, 4, 4096`` and ``4, 8, 4096`` (65.1M), ``3, 12, 1024`` (LargeFOV, 20.5M).
    """
    return DeepLabVGG(
        in_channels,
        num_classes,
        rates=(fc6_dilation,),
        fc6_kernel=fc6_kernel,
        fc6_channels=fc6_channels,
        width=width,
        dropout=dropout,
    )


@register_model(family="deeplab", paper=_V2, tiny=_TINY_VGG)
def deeplab_aspp_l(
    in_channels: int,
    num_classes: int,
    *,
    rates: tuple[int, ...] = (6, 12, 18, 24),
    width: float = 1.0,
    dropout: float = 0.5,
) -> DeepLabVGG:
    """DeepLab-v2 VGG16 ASPP-L (rates 6/12/18/24, summed): 37.9M, stride 8, halo 312."""
    return DeepLabVGG(
        in_channels, num_classes, rates=rates, fc6_channels=1024, width=width, dropout=dropout
    )


@register_model(family="deeplab", paper=_V2, tiny=_TINY_VGG)
def deeplab_aspp_s(
    in_channels: int,
    num_classes: int,
    *,
    rates: tuple[int, ...] = (2, 4, 8, 12),
    width: float = 1.0,
    dropout: float = 0.5,
) -> DeepLabVGG:
    """DeepLab-v2 VGG16 ASPP-S (rates 2/4/8/12, summed): 37.9M, stride 8, halo 216."""
    return DeepLabVGG(
        in_channels, num_classes, rates=rates, fc6_channels=1024, width=width, dropout=dropout
    )


@register_model(
    family="deeplab",
    paper=_V2,
    tiny={"width": 1 / 16, "blocks": (1, 1, 1, 1), "rates": (2, 4)},
)
def deeplab_resnet101(
    in_channels: int,
    num_classes: int,
    *,
    blocks: tuple[int, ...] = RESNET101_BLOCKS,
    rates: tuple[int, ...] = (6, 12, 18, 24),
    width: float = 1.0,
) -> DeepLabResNet:
    """DeepLab-v2 ResNet-101 ASPP (rates 6/12/18/24): 44.0M, stride 8, halo 712."""
    return DeepLabResNet(in_channels, num_classes, blocks=blocks, rates=rates, width=width)
