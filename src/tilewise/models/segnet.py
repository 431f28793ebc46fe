"""SegNet — Badrinarayanan, Kendall, Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation", IEEE TPAMI 2017.

The encoder is VGG16's 13 convolutions, each with batch normalisation and ReLU; every 2×2 max-pool
keeps its argmax positions ("pooling indices"). The decoder mirrors it: each stage up-samples by
placing its input at the stored indices (zeros elsewhere) and densifies the sparse map with 3×3
convolutions, BN and ReLU; the last convolution, ``conv1_1_D``, maps 64 features to the classes
with neither BN nor ReLU. Layer names follow the authors' ``segnet_inference.prototxt``
(``alexgkendall/SegNet-Tutorial``).

Caffe rounds pooled sizes up (360 → 180 → 90 → 45 → 23 → 12), which is why the prototxt states
every unpooling size; here each unpooling is given the size its encoder stage had before pooling,
so any H×W works and the output always has the input's size.

Tiling: output stride 32; unpooling with indices is local, so the net tiles exactly with windows
on the pooling grid. The halo traced through encoder, unpoolings and decoder is 211 px (the widest
reach over the 32 phases; the reference's "radius ≈ 196 → 224" rounds a phase-free estimate up to
the stride, which the tiler's leading context does too).

Parameters: with 11 classes (CamVid) the net has 29,449,355 trainable parameters — 29.4M — and
29,465,227 with the BN running means and variances that caffe stores as blobs, which is the
published **29.5M** (SegNet paper; Tiramisu's CamVid table). Counting rule: BN statistics included.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from tilewise.models.fcn import Footprint, footprints, span_halo
from tilewise.models.layers import VGG16_BLOCKS, he_init, scaled
from tilewise.models.registry import SizeRule, TilingFacts, register_model

__all__ = ["SegNet", "segnet"]

#: Output channels of the decoder convolutions of each stage, deepest first (``conv5_3_D`` ...
#: ``conv1_2_D``); ``conv1_1_D`` then maps to the classes.
DECODER_BLOCKS: tuple[tuple[int, ...], ...] = (
    (512, 512, 512),
    (512, 512, 256),
    (256, 256, 128),
    (128, 64),
    (64,),
)


def _conv_bn_relu(c_in: int, c_out: int, name: str) -> OrderedDict[str, nn.Module]:
    return OrderedDict(
        [
            (name, nn.Conv2d(c_in, c_out, 3, padding=1)),
            (f"{name}_bn", nn.BatchNorm2d(c_out)),
            (f"relu{name[4:]}", nn.ReLU(inplace=True)),
        ]
    )


class SegNet(nn.Module):
    """SegNet: VGG16-BN encoder, decoder up-sampling with the encoder's pooling indices.

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        width: multiplier for every hidden channel count (the paper: 1).
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: float = 1.0) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be positive; got {width}")
        encoder = [[scaled(c, width) for c in block] for block in VGG16_BLOCKS]
        decoder = [[scaled(c, width) for c in block] for block in DECODER_BLOCKS]

        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        c = in_channels
        for stage, block in enumerate(encoder, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for i, c_out in enumerate(block, start=1):
                layers.update(_conv_bn_relu(c, c_out, f"conv{stage}_{i}"))
                c = c_out
            self.encoders.append(nn.Sequential(layers))
            # Ceil rounding as caffe; the indices drive the decoder's unpooling.
            self.pools.append(nn.MaxPool2d(2, stride=2, ceil_mode=True, return_indices=True))

        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for stage, block in zip(range(5, 0, -1), decoder, strict=True):
            self.upsamples.append(nn.MaxUnpool2d(2, stride=2))
            layers = OrderedDict()
            # Numbered down from the mirrored encoder layer: conv5_3_D, conv5_2_D, ...; stage 1
            # has conv1_2_D here and conv1_1_D, the classifier, below.
            first = len(encoder[stage - 1])
            for i, c_out in enumerate(block):
                layers.update(_conv_bn_relu(c, c_out, f"conv{stage}_{first - i}_D"))
                c = c_out
            if stage == 1:
                # The classifier: a 3×3 convolution straight to the scores (then softmax).
                layers["conv1_1_D"] = nn.Conv2d(c, num_classes, 3, padding=1)
            self.decoders.append(nn.Sequential(layers))
        he_init(self)

        self.tiling = TilingFacts(
            stride=32, margin=0, halo=span_halo(self.paths(), 32), size_rule=SizeRule(1, 1)
        )

    def paths(self) -> list[list[Footprint]]:
        """Routes from the input to the scores: the main one, and one per pooling-index lookup.

        Unpooling at stage ``s`` reads the decoder's map and the indices of ``pool{s}``; the
        indices depend on the 2×2 window of the encoder's map before pooling.
        """
        down = [footprints(enc, pool) for enc, pool in zip(self.encoders, self.pools, strict=True)]
        up = [footprints(u, d) for u, d in zip(self.upsamples, self.decoders, strict=True)]
        main = [f for stage in down + up for f in stage]
        routes = [main]
        for level in range(5):  # the indices of pool{level + 1}
            encoder_part: list[Footprint] = [f for stage in down[: level + 1] for f in stage]
            decoder_part = [f for stage in up[4 - level :] for f in stage]
            routes.append(encoder_part + decoder_part)
        return routes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W) for any H×W."""
        indices: list[torch.Tensor] = []
        sizes: list[Sequence[int]] = []
        for encoder, pool in zip(self.encoders, self.pools, strict=True):
            x = encoder(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            indices.append(idx)
        for upsample, decoder, idx, size in zip(
            self.upsamples, self.decoders, reversed(indices), reversed(sizes), strict=True
        ):
            x = decoder(upsample(x, idx, output_size=size))
        return x


@register_model(
    family="segnet",
    paper="Badrinarayanan, Kendall, Cipolla, TPAMI 2017",
    tiny={"width": 1 / 32},
)
def segnet(in_channels: int, num_classes: int, *, width: float = 1.0) -> SegNet:
    """SegNet (VGG16-BN encoder, index unpooling decoder): any H×W, output stride 32."""
    return SegNet(in_channels, num_classes, width=width)
