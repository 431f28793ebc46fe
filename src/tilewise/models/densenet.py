"""FC-DenseNet ("The One Hundred Layers Tiramisu") — Jégou, Drozdzal, Vázquez, Romero, Bengio,
"The One Hundred Layers Tiramisu: Fully Convolutional DenseNets for Semantic Segmentation",
CVPR Workshops 2017.

A 3×3 convolution (48 filters) is followed by five dense blocks on the down path, each followed by
a transition down (BN → ReLU → 1×1 conv → drop-out → 2×2 max-pool); a dense block concatenates
every layer's ``k`` new feature maps (BN → ReLU → 3×3 conv → drop-out) to its input stack. On the
up path only the *new* maps of the previous block are up-sampled (transition up: a 3×3 transposed
convolution of stride 2 without padding, output ``2n + 1``, centre-cropped to the skip), then
concatenated with the skip ``[up, skip]`` and fed to the next dense block. A 1×1 convolution maps
the final full stack to the classes. This follows the authors' release (``SimJeg/FC-DenseNet``).

Parameter counts, 11 classes (CamVid), counting BN running mean and variance as Lasagne's
``count_params()`` does ("+BN stats") or not ("trainable"):

* ``fc_densenet103``: 9,322,091 trainable, **9,425,163 with BN stats → the published 9.4M**.
* ``fc_densenet67``: 3,463,243 / 3,502,923; either rounds to the published 3.5M.
* ``fc_densenet56``: 1,376,795 / 1,397,963, i.e. 1.4M. **The published 1.5M reproduces under no
  documented configuration**; this file builds the authors' released configuration (k = 12,
  4 layers per block, 48 first filters).

Output size = input size. Forward accepts any H×W (the transition-up crop absorbs odd sizes), but
exact tiling needs the pooling grid of whole-image inference, so the declared size rule is
multiples of the total stride 32. The halo is computed from the block configuration by
:class:`Reach`: 413 / 508 / 1147 px for 56 / 67 / 103. The reference's 424 / 518 / 1156 are half
the receptive field taken over all output phases together (848 / 1036 / 2312 px, which
:class:`Reach` reproduces); a core that starts on the 32-px grid needs less, because the transition
ups make each phase reach less far than the union, and the tiler rounds the lead up to a multiple
of 32 anyway (416 / 512 / 1152 px).

The authors evaluated with *batch* statistics in BN (``batch_norm_use_averages=False`` in their
``test.py``); ``bn_inference="batch"`` reproduces that, at the price of tile-exactness: the output
then depends on everything else in the batch and in the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tilewise.models.layers import center_crop
from tilewise.models.registry import SizeRule, TilingFacts, register_model

__all__ = [
    "FCDenseNet",
    "Reach",
    "fc_densenet56",
    "fc_densenet67",
    "fc_densenet103",
]

BNInference = Literal["running", "batch"]

#: Layers per dense block of FC-DenseNet103: five down blocks, the bottleneck, five up blocks.
FC_DENSENET103_BLOCKS: tuple[int, ...] = (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4)


# --------------------------------------------------------------------------------------------
# Halo computation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reach:
    """The input pixels every feature of a same-padded network depends on, phase by phase.

    A feature map of ``scale`` input pixels per feature repeats its dependency pattern every
    ``period`` input pixels (the network's total stride). For feature ``c`` of phase
    ``q = c mod (period // scale)`` the input pixels read — counting the zero padding of a window
    edge as pixels outside the window — are ``[c * scale + lo[q], c * scale + hi[q]]``. Following
    the layers (:meth:`conv`, :meth:`pool`, :meth:`up`, ``|`` for a concatenation or a sum) gives
    the output's reach and from it the exact halo (:meth:`halo`). Transposed convolutions make the
    reach depend on the phase, which a single receptive-field radius would miss.
    """

    scale: int
    period: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @classmethod
    def image(cls, period: int) -> Reach:
        """The input itself: every pixel depends on itself only."""
        return cls(1, period, (0,) * period, (0,) * period)

    @property
    def phases(self) -> int:
        """Number of distinct phases at this scale."""
        return self.period // self.scale

    def _span(self, c: int) -> tuple[int, int]:
        q = c % self.phases
        return c * self.scale + self.lo[q], c * self.scale + self.hi[q]

    def _gather(self, scale: int, sources: Sequence[Sequence[int]]) -> Reach:
        # sources[q]: indices (at this scale) that feature q of the new map reads.
        lo, hi = [], []
        for q, cs in enumerate(sources):
            spans = [self._span(c) for c in cs]
            lo.append(min(a for a, _ in spans) - q * scale)
            hi.append(max(b for _, b in spans) - q * scale)
        return Reach(scale, self.period, tuple(lo), tuple(hi))

    def conv(self, kernel: int = 3, dilation: int = 1, repeat: int = 1) -> Reach:
        """``repeat`` same-padded stride-1 convolutions (odd ``kernel``)."""
        r = (kernel - 1) // 2
        out = self
        for _ in range(repeat):
            taps = [[q + t * dilation for t in range(-r, r + 1)] for q in range(out.phases)]
            out = out._gather(out.scale, taps)
        return out

    def pool(self, factor: int = 2) -> Reach:
        """A ``factor``×``factor`` pooling of stride ``factor``."""
        n = self.phases // factor
        cells = [[factor * q + u for u in range(factor)] for q in range(n)]
        return self._gather(self.scale * factor, cells)

    def up(self, kernel: int, padding: int, stride: int = 2) -> Reach:
        """A transposed convolution: output ``j`` reads inputs ``i`` with
        ``0 <= j + padding - stride * i < kernel`` (a crop at offset 0 keeps the indices)."""
        scale = self.scale // stride
        n = self.phases * stride
        first = [-(-(j + padding - kernel + 1) // stride) for j in range(n)]  # ceil division
        reads = [list(range(first[j], (j + padding) // stride + 1)) for j in range(n)]
        return self._gather(scale, reads)

    def __or__(self, other: Reach) -> Reach:
        """Both maps together (concatenation or sum)."""
        if (self.scale, self.period) != (other.scale, other.period):
            raise ValueError("only maps of the same scale can be joined")
        lo = tuple(map(min, self.lo, other.lo))
        hi = tuple(map(max, self.hi, other.hi))
        return Reach(self.scale, self.period, lo, hi)

    def halo(self) -> int:
        """Context per side that makes a stride-aligned window exact (full-resolution map).

        A window's core starts on phase 0 and spans whole periods, so output pixel ``q`` of a
        period needs ``-lo[q] - q`` pixels before the core and ``hi[q] - (period - 1 - q)``
        after it.
        """
        if self.scale != 1:
            raise ValueError("the halo is defined on the full-resolution output")
        p = self.period
        need = [
            max(-a - q, b - (p - 1 - q))
            for q, (a, b) in enumerate(zip(self.lo, self.hi, strict=True))
        ]
        return max(need)


def fc_densenet_reach(blocks: Sequence[int]) -> Reach:
    """The reach of an FC-DenseNet with ``blocks`` layers per dense block."""
    n_pool = len(blocks) // 2
    x = Reach.image(2**n_pool).conv(3)  # first convolution
    skips = []
    for n in blocks[:n_pool]:
        x = x.conv(3, repeat=n)  # the stack after a block reaches as far as its last layer
        skips.append(x)
        x = x.pool(2)  # transition down: 1×1 conv, then 2×2 max-pool
    new = x.conv(3, repeat=blocks[n_pool])
    for n, skip in zip(blocks[n_pool + 1 :], reversed(skips), strict=True):
        stack = new.up(kernel=3, padding=0) | skip
        new = stack.conv(3, repeat=n)
    return new  # the final stack and its 1×1 convolution reach as far as the last layer


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with Lasagne's defaults that can keep batch statistics at inference.

    ``batch_inference=True`` normalises by the statistics of the current batch in eval mode too
    (Lasagne's ``batch_norm_use_averages=False``), without updating the running averages.
    """

    def __init__(self, channels: int, *, batch_inference: bool = False) -> None:
        super().__init__(channels, eps=1e-4, momentum=0.1)  # Lasagne: epsilon 1e-4, alpha 0.1
        self.batch_inference = batch_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``; running statistics in eval mode unless ``batch_inference``."""
        if self.training or not self.batch_inference:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


class DenseLayer(nn.Sequential):
    """BN → ReLU → 3×3 conv (``growth_rate`` maps) → drop-out."""

    def __init__(self, c_in: int, growth_rate: int, dropout: float, batch_bn: bool) -> None:
        super().__init__(
            BatchNorm(c_in, batch_inference=batch_bn),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, growth_rate, 3, padding=1),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )


class DenseBlock(nn.Module):
    """``n_layers`` dense layers; every layer sees the concatenation of all maps before it.

    ``forward`` returns the full stack ``[input, new_1, ..., new_n]``; its last
    ``n_layers * growth_rate`` channels are the new maps.
    """

    def __init__(
        self, c_in: int, growth_rate: int, n_layers: int, dropout: float, batch_bn: bool
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(c_in + i * growth_rate, growth_rate, dropout, batch_bn)
            for i in range(n_layers)
        )
        self.new_channels = n_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stack with the block's new maps appended."""
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitionDown(nn.Sequential):
    """BN → ReLU → 1×1 conv (m → m) → drop-out → 2×2 max-pool."""

    def __init__(self, channels: int, dropout: float, batch_bn: bool) -> None:
        super().__init__(
            BatchNorm(channels, batch_inference=batch_bn),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.MaxPool2d(2),
        )


class TransitionUp(nn.ConvTranspose2d):
    """3×3 transposed convolution of stride 2 without padding (Lasagne ``crop='valid'``):
    ``n`` features become ``2n + 1``, centre-cropped to the skip's size by the caller."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class FCDenseNet(nn.Module):
    """FC-DenseNet with ``blocks[i]`` layers in dense block ``i`` (down, bottleneck, up).

    Args:
        in_channels: input bands.
        num_classes: output score maps.
        blocks: layers per dense block, ``2 * n_pool + 1`` entries (the paper: 11, n_pool = 5).
        growth_rate: maps each dense layer adds (the paper: 12 or 16).
        first_filters: maps of the first 3×3 convolution (the paper: 48).
        dropout: drop-out after every convolution but the first and the last (the paper: 0.2).
        bn_inference: ``"running"`` (running statistics in eval mode: deterministic and tile-exact)
            or ``"batch"`` (batch statistics, as the authors evaluated; not tile-exact).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        blocks: Sequence[int],
        growth_rate: int,
        first_filters: int = 48,
        dropout: float = 0.2,
        bn_inference: BNInference = "running",
    ) -> None:
        super().__init__()
        blocks = tuple(blocks)
        if len(blocks) < 3 or len(blocks) % 2 == 0 or min(blocks) < 1:
            raise ValueError(
                f"blocks must hold an odd number (>= 3) of positive layer counts; got {blocks}"
            )
        if growth_rate < 1 or first_filters < 1:
            raise ValueError(
                f"growth_rate and first_filters must be at least 1; got {growth_rate}, "
                f"{first_filters}"
            )
        if bn_inference not in ("running", "batch"):
            raise ValueError(f"bn_inference must be 'running' or 'batch'; got {bn_inference!r}")
        batch_bn = bn_inference == "batch"
        n_pool = len(blocks) // 2
        self.blocks = blocks

        self.first_conv = nn.Conv2d(in_channels, first_filters, 3, padding=1)
        m = first_filters
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        skip_channels = []
        for n in blocks[:n_pool]:
            self.down_blocks.append(DenseBlock(m, growth_rate, n, dropout, batch_bn))
            m += n * growth_rate
            skip_channels.append(m)
            self.transitions_down.append(TransitionDown(m, dropout, batch_bn))
        self.bottleneck = DenseBlock(m, growth_rate, blocks[n_pool], dropout, batch_bn)
        new = self.bottleneck.new_channels
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for n, skip in zip(blocks[n_pool + 1 :], reversed(skip_channels), strict=True):
            self.transitions_up.append(TransitionUp(new))
            m = new + skip
            block = DenseBlock(m, growth_rate, n, dropout, batch_bn)
            self.up_blocks.append(block)
            new = block.new_channels
        self.final = nn.Conv2d(m + new, num_classes, 1)
        self._init_weights()

        stride = 2**n_pool
        halo = fc_densenet_reach(blocks).halo()
        if batch_bn:
            self.tiling = TilingFacts(
                stride=stride,
                margin=0,
                halo=halo,
                size_rule=SizeRule(stride, stride),
                equivariant=False,
                note="BatchNorm uses batch statistics at inference (bn_inference='batch'): "
                "every output depends on the whole window and batch",
            )
        else:
            self.tiling = TilingFacts(
                stride=stride, margin=0, halo=halo, size_rule=SizeRule(stride, stride)
            )

    def _init_weights(self) -> None:
        # The release initialises every convolution with HeUniform(gain='relu') and zero biases.
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                if module.weight.is_meta:
                    return
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, num_classes, H, W) for any H×W."""
        stack = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down, strict=True):
            stack = block(stack)
            skips.append(stack)
            stack = down(stack)
        stack = self.bottleneck(stack)
        new = stack[:, stack.shape[1] - self.bottleneck.new_channels :]
        for up, block, skip in zip(
            self.transitions_up, self.up_blocks, reversed(skips), strict=True
        ):
            upsampled = center_crop(up(new), skip.shape[-2], skip.shape[-1])
            stack = block(torch.cat([upsampled, skip], dim=1))
            new = stack[:, stack.shape[1] - block.new_channels :]
        out: torch.Tensor = self.final(stack)
        return out


def _blocks(layers_per_block: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(layers_per_block, int):
        return (layers_per_block,) * 11
    return tuple(layers_per_block)


_TINY = {"growth_rate": 2, "first_filters": 3, "layers_per_block": 1}
_PAPER = "Jégou et al., CVPRW 2017"


@register_model(family="fc-densenet", paper=_PAPER, tiny=_TINY)
def fc_densenet56(
    in_channels: int,
    num_classes: int,
    *,
    growth_rate: int = 12,
    first_filters: int = 48,
    layers_per_block: int | Sequence[int] = 4,
    dropout: float = 0.2,
    bn_inference: BNInference = "running",
) -> FCDenseNet:
    """FC-DenseNet56: k = 12, 4 layers per block; output = input size, halo 413."""
    return FCDenseNet(
        in_channels,
        num_classes,
        blocks=_blocks(layers_per_block),
        growth_rate=growth_rate,
        first_filters=first_filters,
        dropout=dropout,
        bn_inference=bn_inference,
    )


@register_model(family="fc-densenet", paper=_PAPER, tiny=_TINY)
def fc_densenet67(
    in_channels: int,
    num_classes: int,
    *,
    growth_rate: int = 16,
    first_filters: int = 48,
    layers_per_block: int | Sequence[int] = 5,
    dropout: float = 0.2,
    bn_inference: BNInference = "running",
) -> FCDenseNet:
    """FC-DenseNet67: k = 16, 5 layers per block; output = input size, halo 508."""
    return FCDenseNet(
        in_channels,
        num_classes,
        blocks=_blocks(layers_per_block),
        growth_rate=growth_rate,
        first_filters=first_filters,
        dropout=dropout,
        bn_inference=bn_inference,
    )


@register_model(family="fc-densenet", paper=_PAPER, tiny=_TINY)
def fc_densenet103(
    in_channels: int,
    num_classes: int,
    *,
    growth_rate: int = 16,
    first_filters: int = 48,
    layers_per_block: int | Sequence[int] = FC_DENSENET103_BLOCKS,
    dropout: float = 0.2,
    bn_inference: BNInference = "running",
) -> FCDenseNet:
    """FC-DenseNet103: k = 16, blocks 4-5-7-10-12-15-12-10-7-5-4; halo 1147."""
    return FCDenseNet(
        in_channels,
        num_classes,
        blocks=_blocks(layers_per_block),
        growth_rate=growth_rate,
        first_filters=first_filters,
        dropout=dropout,
        bn_inference=bn_inference,
    )
