"""PSPNet — Zhao, Shi, Qi, Wang, Jia, "Pyramid Scene Parsing Network", CVPR 2017.

A dilated ResNet with PSPNet's deep stem (output stride 8; see :mod:`tilewise.models.resnet`)
feeds the pyramid pooling module: the res5 features (2048 channels) are average-pooled into 1×1,
2×2, 3×3 and 6×6 bins, each reduced by a bias-free 1×1 convolution to 512 = 2048 / 4 channels with
BN and ReLU, and bilinearly resized back to the feature size; the four maps are concatenated with
the features (4096 channels), and conv5_4 (3×3, 512, bias-free, BN, ReLU, drop-out 0.1) and conv6
(1×1 to the classes) give the scores. Caffe's ``Interp`` layer, used for the pyramid maps and for
the final ×8 zoom, maps corner to corner (``align_corners=True``), so ``n`` feature pixels become
``8 (n - 1) + 1`` output pixels and inputs of ``8 k + 1`` pixels (473, 713) come out at their own
size. The concatenation order is the released prototxt's: features, then bins 6, 3, 2, 1.

The released prototxt pools with fixed windows (60, 30, 20, 10 on the 60×60 map of a 473 input);
adaptive average pooling is the same whenever the feature size is divisible by the bin, as for
473 (60) and 713 (90), and the paper's definition (bins relative to the map) otherwise.

Training adds an auxiliary head on res4 (3×3 conv 1024 → 256, bias-free, BN, ReLU, drop-out 0.1,
1×1 to the classes) weighted 0.4 in the loss; in training mode ``forward`` returns ``(main, aux)``,
in eval mode only ``main``. Drop-out is channel-wise (``Dropout2d``) as in the authors' PyTorch
reimplementation (hszhao/semseg).

Parameters (all weights, biases and BN scales/shifts; the paper prints no count): PSPNet-101 with
21 classes 65,708,501 deployed (the widely cited "65.7M"), 68,073,706 with the auxiliary head;
PSPNet-50 for ADE20K (150 classes) 46,782,550 deployed.

Tiling: the bins are fractions of the whole feature map and bin 1 is a global average, so every
output pixel depends on the whole window: no finite halo makes cropped tiles equal whole-image
inference. The paper itself evaluates by sliding 473/713 crops with a stride of 2/3 crop and
averaging — use ``stitch: blend``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from tilewise.models.deeplab import interp
from tilewise.models.layers import he_init, scaled
from tilewise.models.registry import SizeRule, TilingFacts, register_model
from tilewise.models.resnet import RESNET50_BLOCKS, RESNET101_BLOCKS, DilatedResNet

__all__ = ["PSPNet", "PyramidPooling", "pspnet50", "pspnet101"]

STRIDE = 8
AUX_WEIGHT = 0.4
NOTE = (
    "the pyramid pooling bins (1, 2, 3, 6) average over fractions of the whole feature map and "
    "bin 1 is global, so each output pixel depends on the whole window and no finite halo is "
    "exact; the paper slides 473/713 crops with stride 2/3 crop and averages (stitch: blend)"
)


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> OrderedDict[str, nn.Module]:
    return OrderedDict(
        conv=nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
        bn=nn.BatchNorm2d(c_out),
        relu=nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """Pyramid pooling module: pooled bins, 1×1 reduction, resize back, concatenate.

    Args:
        channels: input feature channels (2048).
        reduced: channels of each pooled branch (512 = 2048 / number of bins).
        bins: output sizes of the adaptive average poolings (1, 2, 3, 6).

    The output has ``channels + len(bins) * reduced`` channels.
    """

    def __init__(self, channels: int, reduced: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        # The released prototxt concatenates conv5_3, pool6, pool3, pool2, pool1.
        self.bins = tuple(sorted(bins, reverse=True))
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(channels, reduced, 1)) for _ in self.bins
        )
        self.out_channels = channels + len(self.bins) * reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features concatenated with the up-sampled pyramid maps."""
        size = x.shape[-2:]
        maps = [x]
        for b, stage in zip(self.bins, self.stages, strict=True):
            pooled = stage(F.adaptive_avg_pool2d(x, b))
            maps.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=True))
        return torch.cat(maps, dim=1)


class PSPNet(nn.Module):
    """PSPNet on a dilated deep-stem ResNet.

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        blocks: bottlenecks per stage (ResNet-101 ``(3, 4, 23, 3)``, ResNet-50 ``(3, 4, 6, 3)``).
        bins: pyramid levels (1, 2, 3, 6).
        width: multiplier of every hidden channel count.
        dropout: after conv5_4 and in the auxiliary head (0.1).
        aux: build the auxiliary res4 head (used in training mode only).

    Attributes:
        aux_weight: weight of the auxiliary loss (0.4; 0 without the head).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        blocks: tuple[int, ...] = RESNET101_BLOCKS,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        width: float = 1.0,
        dropout: float = 0.1,
        aux: bool = True,
    ) -> None:
        super().__init__()
        if not bins or min(bins) < 1:
            raise ValueError(f"bins must be positive sizes; got {bins}")
        self.backbone = DilatedResNet(in_channels, style="psp", blocks=blocks, width=width)
        c = self.backbone.out_channels
        self.ppm = PyramidPooling(c, scaled(512, width), bins)
        hidden = scaled(512, width)
        self.conv5_4 = nn.Sequential(
            _conv_bn_relu(self.ppm.out_channels, hidden, 3) | {"drop": nn.Dropout2d(dropout)}
        )
        self.conv6 = nn.Conv2d(hidden, num_classes, 1)
        self.aux: nn.Sequential | None = None
        if aux:
            c4, hidden4 = self.backbone.res4_channels, scaled(256, width)
            self.aux = nn.Sequential(
                _conv_bn_relu(c4, hidden4, 3)
                | {"drop": nn.Dropout2d(dropout), "cls": nn.Conv2d(hidden4, num_classes, 1)}
            )
        self.aux_weight = AUX_WEIGHT if aux else 0.0
        # 8k+1 input pixels give k+1 feature pixels; at least one per bin of the finest level.
        minimum = STRIDE * (max(bins) - 1) + 1
        he_init(self)
        self.tiling = TilingFacts(
            stride=STRIDE,
            margin=0,
            halo=None,
            size_rule=SizeRule(minimum=minimum, step=STRIDE),
            equivariant=False,
            note=NOTE,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores (N, num_classes, H, W) for ``H, W = 8 k + 1``; ``(main, aux)`` in training."""
        res4, res5 = self.backbone(x)
        main = interp(self.conv6(self.conv5_4(self.ppm(res5))))
        if self.training and self.aux is not None:
            return main, interp(self.aux(res4))
        return main


_PAPER = "Zhao et al., CVPR 2017"
_TINY = {"width": 1 / 16}


@register_model(family="pspnet", paper=_PAPER, tiny=_TINY)
def pspnet101(
    in_channels: int,
    num_classes: int,
    *,
    bins: tuple[int, ...] = (1, 2, 3, 6),
    width: float = 1.0,
    dropout: float = 0.1,
    aux: bool = True,
) -> PSPNet:
    """PSPNet on dilated ResNet-101 (65.7M deployed), stride 8; global bins: stitch sliding."""
    return PSPNet(
        in_channels,
        num_classes,
        blocks=RESNET101_BLOCKS,
        bins=bins,
        width=width,
        dropout=dropout,
        aux=aux,
    )


@register_model(family="pspnet", paper=_PAPER, tiny=_TINY)
def pspnet50(
    in_channels: int,
    num_classes: int,
    *,
    bins: tuple[int, ...] = (1, 2, 3, 6),
    width: float = 1.0,
    dropout: float = 0.1,
    aux: bool = True,
) -> PSPNet:
    """PSPNet on dilated ResNet-50 (46.8M deployed, ADE20K), stride 8; global bins: sliding."""
    return PSPNet(
        in_channels,
        num_classes,
        blocks=RESNET50_BLOCKS,
        bins=bins,
        width=width,
        dropout=dropout,
        aux=aux,
    )
