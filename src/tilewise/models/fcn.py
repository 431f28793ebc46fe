"""FCN — Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic Segmentation",
CVPR 2015 (extended in TPAMI 2017, which adds the "at-once" FCN-8s).

VGG16 (or CaffeNet) with its fully connected layers recast as convolutions — fc6 a 7×7 (6×6)
convolution, fc7 a 1×1 — a 1×1 ``score_fr`` layer and in-network up-sampling by transposed
convolutions. FCN-32s up-samples the stride-32 scores in one step; FCN-16s first fuses them with
scores of ``pool4`` and FCN-8s additionally with scores of ``pool3`` (the "skip" architecture).
As released (``shelhamer/fcn.berkeleyvision.org``), ``conv1_1`` pads by 100 px, pooling rounds
up (caffe), every deconvolution is frozen at bilinear interpolation, and fixed crops — offsets
19 (32s); 5 and 27 (16s); 5, 9 and 31 (8s); 18 (AlexNet) — align each map with the input, so the
output has the input's size for every H×W.

Parameter counts (C = 21 classes), as in ``reference/architectures.md`` §0:

- FCN Table 1 counts **without** the fixed up-sampling: FCN-VGG16 134M = FCN-32s, 134,346,581
  trainable (136,152,917 with the frozen 64×64 ``upscore``); FCN-AlexNet 57M = 56,954,261
  (58,704,590 with the 63×63 ``upscore``).
- The Tiramisu paper's CamVid table lists "FCN8 134.5M": FCN-8s **with** its three frozen
  deconvolutions and the 21-class VOC model, 134,489,759 (the 11-class CamVid net would be
  134,348,929, i.e. 134.3M).

The receptive field of one ``score_fr`` cell is 404 px (VGG16) and 355 px (AlexNet), as FCN
Table 1 states. The halo each net declares is traced through its layers, skips and crops included
(:func:`span_halo`): the farthest any output pixel reaches, over the 32 phases — FCN-32s 233,
FCN-16s 241, FCN-8s 245, FCN-AlexNet 208 px. The tiler rounds the leading context up to the
stride, which gives the 256 px that ``reference/architectures.md`` §1/§11 verified for the VGG
nets (RF radius 218/230 "rounded up to a multiple of 32"); the trailing side needs only the halo.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tilewise.models.layers import VGG16_BLOCKS, BilinearUpsample, he_init, scaled
from tilewise.models.registry import SizeRule, TilingFacts, register_model

__all__ = [
    "FCN",
    "FCNAlexNet",
    "Footprint",
    "crop_footprint",
    "fcn8s",
    "fcn16s",
    "fcn32s",
    "fcn_alexnet",
    "footprints",
    "input_span",
    "receptive_field",
    "span_halo",
]

Upsampling = Literal["bilinear", "learnable"]

# ------------------------------------------------------------------------------------------------
# Receptive fields, traced through the layers (also used by the DeconvNet and SegNet families).


@dataclass(frozen=True)
class Footprint:
    """Which input pixels one output pixel of a layer reads, along one axis.

    A convolution or pooling window: output ``j`` reads inputs ``[j*stride - pad, j*stride - pad
    + size - 1]``. A transposed one (deconvolution, unpooling): input ``i`` writes outputs
    ``[i*stride - pad, i*stride - pad + size - 1]``. A fixed crop at ``offset`` is a 1-px window
    with ``pad = -offset``.
    """

    size: int
    stride: int = 1
    pad: int = 0
    transposed: bool = False

    def back(self, lo: int, hi: int) -> tuple[int, int]:
        """The input pixels that output pixels ``[lo, hi]`` read."""
        if self.transposed:
            first = -(-(lo + self.pad - self.size + 1) // self.stride)
            return first, (hi + self.pad) // self.stride
        return lo * self.stride - self.pad, hi * self.stride - self.pad + self.size - 1


def crop_footprint(offset: int) -> Footprint:
    """A fixed crop: output ``j`` is input ``j + offset``."""
    return Footprint(1, 1, -offset)


def _pair(v: int | tuple[int, ...]) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"receptive fields are traced for square layers only; got {v}")
        return v[0]
    return v


def _padding(m: nn.Conv2d | nn.ConvTranspose2d, size: int) -> int:
    if isinstance(m.padding, str):  # "valid" or "same" (odd kernels pad symmetrically)
        return 0 if m.padding == "valid" else (size - 1) // 2
    return _pair(m.padding)


def footprints(*modules: nn.Module) -> list[Footprint]:
    """The footprints of the spatial layers in ``modules`` (and their children), in order.

    Convolutions, transposed convolutions, max-pooling and max-unpooling are spatial; activations,
    normalisations and drop-out act per pixel. The order is the registration order, which is the
    forward order of the sequential blocks the families build.
    """
    out: list[Footprint] = []
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.ConvTranspose2d):
                k = _pair(m.dilation) * (_pair(m.kernel_size) - 1) + 1
                out.append(Footprint(k, _pair(m.stride), _padding(m, k), transposed=True))
            elif isinstance(m, nn.Conv2d):
                k = _pair(m.dilation) * (_pair(m.kernel_size) - 1) + 1
                out.append(Footprint(k, _pair(m.stride), _padding(m, k)))
            elif isinstance(m, nn.MaxPool2d):
                k = _pair(m.dilation) * (_pair(m.kernel_size) - 1) + 1
                out.append(Footprint(k, _pair(m.stride or m.kernel_size), _pair(m.padding)))
            elif isinstance(m, nn.MaxUnpool2d):
                k, s = _pair(m.kernel_size), _pair(m.stride)
                out.append(Footprint(k, s, _pair(m.padding), transposed=True))
    return out


def input_span(paths: Iterable[Sequence[Footprint]], lo: int, hi: int) -> tuple[int, int]:
    """The input pixels that output pixels ``[lo, hi]`` depend on, over all paths to the input.

    Each path lists the footprints from the input to the output; a network with skips (FCN-8s)
    or unpooling switches (SegNet) has one path per route, and the span is their union.
    """
    first, last = lo, hi
    bounds = []
    for path in paths:
        a, b = lo, hi
        for f in reversed(path):
            a, b = f.back(a, b)
        bounds.append((a, b))
    if bounds:
        first, last = min(a for a, _ in bounds), max(b for _, b in bounds)
    return first, last


def receptive_field(path: Sequence[Footprint]) -> int:
    """The receptive field (input pixels along one axis) of one output pixel of ``path``."""
    lo, hi = input_span([path], 0, 0)
    return hi - lo + 1


def span_halo(paths: Iterable[Sequence[Footprint]], stride: int, margin: int = 0) -> int:
    """The context per side that every output pixel needs: the exact halo of a tiled network.

    Output ``j`` sits over input ``j + margin``; its span reaches ``j + margin - lo`` pixels to
    the left and ``hi - j - margin`` to the right. The geometry repeats with the total ``stride``,
    so one period of output pixels covers every phase.
    """
    paths = [list(p) for p in paths]
    reach = 0
    for j in range(stride):
        lo, hi = input_span(paths, j, j)
        reach = max(reach, j + margin - lo, hi - j - margin)
    return reach


# ------------------------------------------------------------------------------------------------
# FCN-32s / 16s / 8s on VGG16.

#: Crop offsets of the released nets (``val.prototxt``): they align each map with the input.
CROP_32S = 19
CROP_16S = {"score_pool4": 5, "score": 27}
CROP_8S = {"score_pool4": 5, "score_pool3": 9, "score": 31}
CROP_ALEXNET = 18
#: The at-once FCN-8s scales the skip features by fixed factors before scoring (TPAMI 2017).
AT_ONCE_SCALE = {"pool4": 0.01, "pool3": 1e-4}


def _crop(x: torch.Tensor, offset: int, h: int, w: int) -> torch.Tensor:
    return x[..., offset : offset + h, offset : offset + w]


def _vgg_block(index: int, c_in: int, widths: Sequence[int], first_pad: int) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, c in enumerate(widths, start=1):
        layers[f"conv{index}_{i}"] = nn.Conv2d(c_in, c, 3, padding=first_pad if i == 1 else 1)
        layers[f"relu{index}_{i}"] = nn.ReLU(inplace=True)
        c_in = c
    # Caffe rounds pooled sizes up; with pad 100 every size then leaves fc6 at least 7×7.
    layers[f"pool{index}"] = nn.MaxPool2d(2, stride=2, ceil_mode=True)
    return nn.Sequential(layers)


def _classifier(c_in: int, hidden: int, kernel: int, dropout: float) -> nn.Sequential:
    """fc6 (a ``kernel``×``kernel`` valid convolution), fc7 (1×1), ReLUs and drop-out."""
    return nn.Sequential(
        OrderedDict(
            fc6=nn.Conv2d(c_in, hidden, kernel),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout2d(dropout),
            fc7=nn.Conv2d(hidden, hidden, 1),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout2d(dropout),
        )
    )


def _check(width: float, upsampling: str) -> None:
    if not width > 0:
        raise ValueError(f"width must be positive; got {width}")
    if upsampling not in ("bilinear", "learnable"):
        raise ValueError(f"upsampling must be 'bilinear' or 'learnable'; got {upsampling!r}")


class FCN(nn.Module):
    """FCN on VGG16, fusing scores down to stride ``fusion`` (32, 16 or 8).

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        fusion: finest stride whose scores are fused: 32 (FCN-32s), 16 (FCN-16s) or 8 (FCN-8s).
        width: multiplier for every hidden channel count, fc6/fc7's 4096 included.
        upsampling: ``"bilinear"`` (frozen bilinear deconvolutions, as released) or
            ``"learnable"`` (bilinear-initialised and trained, as the paper allows).
        dropout: drop-out after fc6 and fc7 (the paper: 0.5).
        at_once: scale ``pool4`` by 0.01 and ``pool3`` by 1e-4 before scoring them, as the
            at-once FCN-8s does (caffe's fixed ``Scale`` layers); FCN-8s only.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        fusion: Literal[32, 16, 8] = 32,
        width: float = 1.0,
        upsampling: Upsampling = "bilinear",
        dropout: float = 0.5,
        at_once: bool = False,
    ) -> None:
        super().__init__()
        _check(width, upsampling)
        if fusion not in (32, 16, 8):
            raise ValueError(f"fusion must be 32, 16 or 8; got {fusion}")
        if at_once and fusion != 8:
            raise ValueError("at_once exists for FCN-8s only")
        self.fusion = fusion
        self.at_once = at_once
        c = in_channels
        widths = [[scaled(w, width) for w in block] for block in VGG16_BLOCKS]
        blocks = []
        for index, block in enumerate(widths, start=1):
            # conv1_1 pads by 100 so that even a 1-px input leaves fc6 a 7×7 window; the
            # crops below cut the excess away again.
            blocks.append(_vgg_block(index, c, block, first_pad=100 if index == 1 else 1))
            c = block[-1]
        self.block1, self.block2, self.block3, self.block4, self.block5 = blocks
        self.classifier = _classifier(c, scaled(4096, width), 7, dropout)
        # Score layers: the paper zero-initialises them for fine-tuning from ImageNet weights;
        # on a freshly initialised net that would make every score 0, so they get He's init too.
        self.score_fr = nn.Conv2d(scaled(4096, width), num_classes, 1)
        learn = upsampling == "learnable"
        if fusion == 32:
            self.upscore = BilinearUpsample(num_classes, 64, 32, learnable=learn)
        else:
            self.upscore2 = BilinearUpsample(num_classes, 4, 2, learnable=learn)
            self.score_pool4 = nn.Conv2d(widths[3][-1], num_classes, 1)
        if fusion == 16:
            self.upscore16 = BilinearUpsample(num_classes, 32, 16, learnable=learn)
        if fusion == 8:
            self.upscore_pool4 = BilinearUpsample(num_classes, 4, 2, learnable=learn)
            self.score_pool3 = nn.Conv2d(widths[2][-1], num_classes, 1)
            self.upscore8 = BilinearUpsample(num_classes, 16, 8, learnable=learn)
        he_init(self)
        self.tiling = TilingFacts(
            stride=32, margin=0, halo=span_halo(self.paths(), 32), size_rule=SizeRule(1, 1)
        )

    def paths(self) -> list[list[Footprint]]:
        """The routes from the input to the scores, as footprints (one per skip)."""
        to_pool3 = footprints(self.block1, self.block2, self.block3)
        to_pool4 = [*to_pool3, *footprints(self.block4)]
        to_fr = [*to_pool4, *footprints(self.block5, self.classifier, self.score_fr)]
        if self.fusion == 32:
            return [[*to_fr, *footprints(self.upscore), crop_footprint(CROP_32S)]]
        crops = CROP_16S if self.fusion == 16 else CROP_8S
        skip4 = [*to_pool4, *footprints(self.score_pool4), crop_footprint(crops["score_pool4"])]
        deep = [*to_fr, *footprints(self.upscore2)]
        if self.fusion == 16:
            tail = [*footprints(self.upscore16), crop_footprint(crops["score"])]
            return [[*deep, *tail], [*skip4, *tail]]
        tail = [*footprints(self.upscore8), crop_footprint(crops["score"])]
        skip3 = [*to_pool3, *footprints(self.score_pool3), crop_footprint(crops["score_pool3"])]
        up4 = footprints(self.upscore_pool4)
        return [[*deep, *up4, *tail], [*skip4, *up4, *tail], [*skip3, *tail]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W) for any H×W."""
        h, w = x.shape[-2:]
        pool3 = self.block3(self.block2(self.block1(x)))
        pool4 = self.block4(pool3)
        score_fr = self.score_fr(self.classifier(self.block5(pool4)))
        if self.fusion == 32:
            return _crop(self.upscore(score_fr), CROP_32S, h, w)
        crops = CROP_16S if self.fusion == 16 else CROP_8S
        upscore2 = self.upscore2(score_fr)
        if self.at_once:
            pool4 = pool4 * AT_ONCE_SCALE["pool4"]
        score_pool4 = _crop(self.score_pool4(pool4), crops["score_pool4"], *upscore2.shape[-2:])
        fuse_pool4 = upscore2 + score_pool4
        if self.fusion == 16:
            return _crop(self.upscore16(fuse_pool4), crops["score"], h, w)
        upscore_pool4 = self.upscore_pool4(fuse_pool4)
        if self.at_once:
            pool3 = pool3 * AT_ONCE_SCALE["pool3"]
        score_pool3 = _crop(
            self.score_pool3(pool3), crops["score_pool3"], *upscore_pool4.shape[-2:]
        )
        fuse_pool3 = upscore_pool4 + score_pool3
        return _crop(self.upscore8(fuse_pool3), crops["score"], h, w)


# ------------------------------------------------------------------------------------------------
# FCN-AlexNet (CaffeNet).


def _grouped(channels: int, width: float, groups: int = 2) -> int:
    """A channel count that stays divisible by the ``groups`` of CaffeNet's split layers."""
    return groups * scaled(channels // groups, width)


class FCNAlexNet(nn.Module):
    """FCN-AlexNet: CaffeNet (grouped convolutions, LRN) with a single 32× up-sampling.

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        width: multiplier for every hidden channel count (kept even for the 2-group layers).
        upsampling: ``"bilinear"`` (frozen, as released) or ``"learnable"``.
        dropout: drop-out after fc6 and fc7 (0.5).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: float = 1.0,
        upsampling: Upsampling = "bilinear",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check(width, upsampling)
        c1, c2, c3, c4, c5 = (_grouped(c, width) for c in (96, 256, 384, 384, 256))

        def lrn() -> nn.LocalResponseNorm:
            # caffe's across-channel LRN: x / (1 + alpha/n * sum of n squares)^beta, as torch's.
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, c1, 11, stride=4, padding=100),
                relu1=nn.ReLU(inplace=True),
                pool1=pool(),
                norm1=lrn(),
                conv2=nn.Conv2d(c1, c2, 5, padding=2, groups=2),
                relu2=nn.ReLU(inplace=True),
                pool2=pool(),
                norm2=lrn(),
                conv3=nn.Conv2d(c2, c3, 3, padding=1),
                relu3=nn.ReLU(inplace=True),
                conv4=nn.Conv2d(c3, c4, 3, padding=1, groups=2),
                relu4=nn.ReLU(inplace=True),
                conv5=nn.Conv2d(c4, c5, 3, padding=1, groups=2),
                relu5=nn.ReLU(inplace=True),
                pool5=pool(),
            )
        )
        hidden = scaled(4096, width)
        self.classifier = _classifier(c5, hidden, 6, dropout)
        self.score_fr = nn.Conv2d(hidden, num_classes, 1)
        self.upscore = BilinearUpsample(num_classes, 63, 32, learnable=upsampling == "learnable")
        he_init(self)
        self.tiling = TilingFacts(
            stride=32, margin=0, halo=span_halo(self.paths(), 32), size_rule=SizeRule(1, 1)
        )

    def paths(self) -> list[list[Footprint]]:
        """The route from the input to the scores, as footprints."""
        layers = footprints(self.features, self.classifier, self.score_fr, self.upscore)
        return [[*layers, crop_footprint(CROP_ALEXNET)]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W) for any H×W."""
        h, w = x.shape[-2:]
        score_fr = self.score_fr(self.classifier(self.features(x)))
        return _crop(self.upscore(score_fr), CROP_ALEXNET, h, w)


# ------------------------------------------------------------------------------------------------
# Registered builders.

_PAPER = "Long, Shelhamer, Darrell, CVPR 2015"
_TINY = {"width": 1 / 64}


@register_model(family="fcn", paper=_PAPER, tiny=_TINY)
def fcn32s(
    in_channels: int,
    num_classes: int,
    *,
    width: float = 1.0,
    upsampling: Upsampling = "bilinear",
    dropout: float = 0.5,
) -> FCN:
    """FCN-32s (VGG16): one 32× bilinear up-sampling of the scores; any H×W, halo from the RF."""
    return FCN(
        in_channels, num_classes, fusion=32, width=width, upsampling=upsampling, dropout=dropout
    )


@register_model(family="fcn", paper=_PAPER, tiny=_TINY)
def fcn16s(
    in_channels: int,
    num_classes: int,
    *,
    width: float = 1.0,
    upsampling: Upsampling = "bilinear",
    dropout: float = 0.5,
) -> FCN:
    """FCN-16s (VGG16): stride-32 scores fused with pool4 scores, then 16× up-sampling."""
    return FCN(
        in_channels, num_classes, fusion=16, width=width, upsampling=upsampling, dropout=dropout
    )


@register_model(family="fcn", paper=_PAPER + "; at-once: TPAMI 2017", tiny=_TINY)
def fcn8s(
    in_channels: int,
    num_classes: int,
    *,
    width: float = 1.0,
    upsampling: Upsampling = "bilinear",
    dropout: float = 0.5,
    at_once: bool = False,
) -> FCN:
    """FCN-8s (VGG16): scores fused with pool4 and pool3 scores, then 8× up-sampling."""
    return FCN(
        in_channels,
        num_classes,
        fusion=8,
        width=width,
        upsampling=upsampling,
        dropout=dropout,
        at_once=at_once,
    )


@register_model(family="fcn", paper=_PAPER, tiny=_TINY)
def fcn_alexnet(
    in_channels: int,
    num_classes: int,
    *,
    width: float = 1.0,
    upsampling: Upsampling = "bilinear",
    dropout: float = 0.5,
) -> FCNAlexNet:
    """FCN-AlexNet (CaffeNet, grouped convolutions and LRN): 32× up-sampling, crop 18."""
    return FCNAlexNet(in_channels, num_classes, width=width, upsampling=upsampling, dropout=dropout)
