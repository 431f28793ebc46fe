"""DeconvNet — Noh, Hong, Han, "Learning Deconvolution Network for Semantic Segmentation",
ICCV 2015.

A VGG16 encoder with batch normalisation whose 2×2 max-pools keep their switches (argmax
positions), fc6 (7×7 valid convolution, 7×7 → 1×1) and fc7 (1×1), then a mirrored decoder:
``fc6_deconv`` (7×7 transposed convolution, 1×1 → 7×7) and, per stage, unpooling with the
switches of the matching pool followed by 3×3 deconvolutions; every layer but the 1×1 classifier
``seg_score`` has BN and ReLU (29 BN layers). Layer sizes follow the authors'
``DeconvNet_inference_deploy.prototxt`` (``HyeonwooNoh/DeconvNet``); names replace caffe's
hyphens (``fc6-deconv``, ``seg-score``) by underscores. There is no drop-out: neither the deploy
net nor the training nets (``stage_1_train``, ``stage_2_train``) have any — BN took its place.

The deploy input is 224×224; because fc6 is valid and ``fc6_deconv`` a full 7×7 transposed
convolution, every 224 + 32k also maps to its own size (the bottleneck is then (1 + k)²), so the
net is fully convolutional with zero padding and tiles exactly under shifts of 32 with the halo
of its receptive field through the decoder: 403 px, traced through fc6/``fc6_deconv`` (each
7 cells of 32 px), the unpoolings and the deconvolutions. (``reference/architectures.md`` §11
lists DeconvNet as a fixed-crop net, which is the paper's protocol — about 50 object proposals,
each resized to 224, aggregated by pixel-wise maximum — not a limit of the network.)

Parameters (21 classes, PASCAL VOC): 251,805,653 learned, 251,839,061 with the BN running
statistics; either rounds to the published **252M** (Tiramisu's CamVid table).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from tilewise.models.fcn import Footprint, footprints, span_halo
from tilewise.models.layers import VGG16_BLOCKS, he_init, scaled
from tilewise.models.registry import SizeRule, TilingFacts, register_model

__all__ = ["DeconvNet", "deconvnet"]

#: Output channels of the 3×3 deconvolutions of each decoder stage, deepest first
#: (deconv5_1..3, deconv4_1..3, ..., deconv1_1..2).
DECONV_BLOCKS: tuple[tuple[int, ...], ...] = (
    (512, 512, 512),
    (512, 512, 256),
    (256, 256, 128),
    (128, 64),
    (64, 64),
)

#: Valid input sizes per axis: the deploy size 224, and every 32 more.
SIZE_RULE = SizeRule(224, 32)


class DeconvNet(nn.Module):
    """DeconvNet: VGG16-BN encoder, fc6/fc7, and a mirrored unpooling/deconvolution decoder.

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        width: multiplier for every hidden channel count, fc6/fc7's 4096 included (the paper: 1).
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: float = 1.0) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be positive; got {width}")
        encoder = [[scaled(c, width) for c in block] for block in VGG16_BLOCKS]
        decoder = [[scaled(c, width) for c in block] for block in DECONV_BLOCKS]
        hidden = scaled(4096, width)

        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        c = in_channels
        for stage, block in enumerate(encoder, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for i, c_out in enumerate(block, start=1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(c, c_out, 3, padding=1)
                layers[f"bn{stage}_{i}"] = nn.BatchNorm2d(c_out)
                layers[f"relu{stage}_{i}"] = nn.ReLU(inplace=True)
                c = c_out
            self.encoders.append(nn.Sequential(layers))
            # The switches (indices) drive the decoder's unpooling.
            self.pools.append(nn.MaxPool2d(2, stride=2, return_indices=True))

        self.fc = nn.Sequential(
            OrderedDict(
                fc6=nn.Conv2d(c, hidden, 7),
                bnfc6=nn.BatchNorm2d(hidden),
                relu6=nn.ReLU(inplace=True),
                fc7=nn.Conv2d(hidden, hidden, 1),
                bnfc7=nn.BatchNorm2d(hidden),
                relu7=nn.ReLU(inplace=True),
                fc6_deconv=nn.ConvTranspose2d(hidden, c, 7),
                fc6_deconv_bn=nn.BatchNorm2d(c),
                fc6_deconv_relu=nn.ReLU(inplace=True),
            )
        )

        self.unpools = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for stage, block in zip(range(5, 0, -1), decoder, strict=True):
            self.unpools.append(nn.MaxUnpool2d(2, stride=2))
            layers = OrderedDict()
            for i, c_out in enumerate(block, start=1):
                layers[f"deconv{stage}_{i}"] = nn.ConvTranspose2d(c, c_out, 3, padding=1)
                layers[f"debn{stage}_{i}"] = nn.BatchNorm2d(c_out)
                layers[f"derelu{stage}_{i}"] = nn.ReLU(inplace=True)
                c = c_out
            self.decoders.append(nn.Sequential(layers))
        self.seg_score = nn.Conv2d(c, num_classes, 1)
        he_init(self)

        self.tiling = TilingFacts(
            stride=32, margin=0, halo=span_halo(self.paths(), 32), size_rule=SIZE_RULE
        )

    def paths(self) -> list[list[Footprint]]:
        """Routes from the input to the scores: the main one, and one per switch lookup.

        Unpooling at stage ``s`` reads the decoder's map and the switches of ``pool{s}``, which
        depend on the 2×2 window of the encoder's map before pooling.
        """
        down = [footprints(enc, pool) for enc, pool in zip(self.encoders, self.pools, strict=True)]
        up = [footprints(u, d) for u, d in zip(self.unpools, self.decoders, strict=True)]
        score = footprints(self.seg_score)
        main = [f for stage in down for f in stage] + footprints(self.fc)
        main += [f for stage in up for f in stage] + score
        routes = [main]
        for level in range(5):  # the switches of pool{level + 1}
            encoder_part: list[Footprint] = [f for stage in down[: level + 1] for f in stage]
            routes.append(encoder_part + [f for stage in up[4 - level :] for f in stage] + score)
        return routes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W) for H, W in 224, 256, 288, ..."""
        h, w = x.shape[-2:]
        if not (SIZE_RULE.is_valid(h) and SIZE_RULE.is_valid(w)):
            raise ValueError(
                f"DeconvNet needs an input of 224 + 32k px per side; got {h}x{w} "
                f"(use {SIZE_RULE.ceil(h)}x{SIZE_RULE.ceil(w)})."
            )
        switches: list[torch.Tensor] = []
        sizes: list[Sequence[int]] = []
        for encoder, pool in zip(self.encoders, self.pools, strict=True):
            x = encoder(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            switches.append(idx)
        x = self.fc(x)
        for unpool, decoder, idx, size in zip(
            self.unpools, self.decoders, reversed(switches), reversed(sizes), strict=True
        ):
            x = decoder(unpool(x, idx, output_size=size))
        out: torch.Tensor = self.seg_score(x)
        return out


@register_model(family="deconvnet", paper="Noh, Hong, Han, ICCV 2015", tiny={"width": 1 / 64})
def deconvnet(in_channels: int, num_classes: int, *, width: float = 1.0) -> DeconvNet:
    """DeconvNet (VGG16-BN, fc6/fc7, unpooling decoder): 224 + 32k px, output stride 32."""
    return DeconvNet(in_channels, num_classes, width=width)
