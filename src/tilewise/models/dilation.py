"""Dilation — Yu & Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions", ICLR 2016.

The *front-end* is VGG16 adapted for dense prediction: conv1_1 … conv4_3 are unpadded 3×3
convolutions, pool1–pool3 2×2 max-pools, pool4 and pool5 are removed and the layers after them
dilated instead (conv5_x by 2, the 7×7 fc6 by 4), followed by fc7 (1×1) and a 1×1 ``final`` layer
to the C classes: output stride 8, receptive field 380 px, so an input of ``8·n + 372`` px gives
``n`` score features (900 → 66). The *context module* (``dilation8``) stacks same-padded 3×3
convolutions of dilation 1, 1, 2, 4, 8, 16, 1 and a 1×1 layer on the C score maps (paper Table 1;
receptive field 67 features) and is initialised to the identity (paper eqs. 4–5). A fixed bilinear
deconvolution (16×16, stride 8, pad 4, one filter per class) up-samples the scores by 8, so the
output is the input minus 186 px per side (900 → 528).

Parameter counts, 11 classes (CamVid), excluding the fixed up-sampling (2,816 frozen weights,
``count_parameters(m, trainable_only=True)``):

* ``dilation8`` (front-end + basic context, the released ``dilation8_camvid_deploy``):
  134,313,443; the deploy network has no up-sampling layer, so this is the released net's count.
* ``dilation8_large`` (large context, channels 2C … 32C): 136,172,740.
* The 140.8M that the Tiramisu paper lists for Dilation8 reproduces under no documented
  configuration (large context with 20 classes is about 140.51M, with 21 classes 141,149,720).

Halo: the front-end is valid (margin 186); the zero-padded context module needs 33 features
(264 px) more on each side, and the bilinear up-sampling interpolates with the neighbouring
feature, which a window lacks at its edges for ``kernel - stride - pad = 4`` output pixels.
``dilation8_frontend`` therefore needs 190 px and ``dilation8`` 186 + 264 + 4 = 454 px (the
reference's 450 omits the up-sampling's 4 px). The authors' ``predict.py`` pads by 186 only and
stitches non-overlapping tiles, so its context module sees tile seams.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

from tilewise.models.layers import VGG16_BLOCKS, BilinearUpsample, he_init, scaled
from tilewise.models.registry import SizeRule, TilingFacts, register_model

__all__ = [
    "ContextModule",
    "DilationNet",
    "dilation8",
    "dilation8_frontend",
    "dilation8_large",
]

Context = Literal["none", "basic", "large"]

#: Dilations of the context module's 3×3 layers (paper Table 1); a 1×1 layer follows them.
CONTEXT_DILATIONS: tuple[int, ...] = (1, 1, 2, 4, 8, 16, 1)
#: Output channels of the large context module's eight layers, in multiples of C (Table 1).
LARGE_CONTEXT_MULTIPLIERS: tuple[int, ...] = (2, 2, 4, 8, 16, 32, 32, 1)
#: The released layer names (``network.build_context``).
CONTEXT_NAMES: tuple[str, ...] = (
    "ctx_conv1_1",
    "ctx_conv1_2",
    "ctx_conv2_1",
    "ctx_conv3_1",
    "ctx_conv4_1",
    "ctx_conv5_1",
    "ctx_fc1",
    "ctx_final",
)

STRIDE = 8  # pool1–pool3


class ContextModule(nn.Module):
    """The context module on C score maps: seven dilated 3×3 layers with ReLU and a 1×1 layer.

    Args:
        num_classes: C, the channels of its input and output.
        large: the large version (channels 2C, 2C, 4C, 8C, 16C, 32C, 32C, C) instead of the basic
            one (all C).
    """

    def __init__(self, num_classes: int, *, large: bool = False) -> None:
        super().__init__()
        mults = LARGE_CONTEXT_MULTIPLIERS if large else (1,) * len(CONTEXT_NAMES)
        c_in = num_classes
        for name, d, mult in zip(CONTEXT_NAMES, (*CONTEXT_DILATIONS, 1), mults, strict=True):
            c_out = num_classes * mult
            kernel = 1 if name == "ctx_final" else 3
            pad = d if kernel == 3 else 0  # pad = dilation keeps the size
            setattr(self, name, nn.Conv2d(c_in, c_out, kernel, padding=pad, dilation=d))
            c_in = c_out
        self.num_classes = num_classes
        self.identity_init()

    def convs(self) -> list[nn.Conv2d]:
        """The eight layers in order."""
        return [getattr(self, name) for name in CONTEXT_NAMES]

    def radius(self) -> int:
        """Context in features per side: half the module's receptive field (33 → RF 67)."""
        return sum(c.dilation[0] * (c.kernel_size[0] - 1) // 2 for c in self.convs())

    def identity_init(self, noise_std: float = 0.0) -> None:
        """Identity initialisation, paper eq. 5 (eq. 4 for the basic module).

        ``k(t, a) = C / c_out`` at the centre tap ``t = 0`` when ``⌊a·C / c_in⌋ = ⌊b·C / c_out⌋``
        (input channel ``a``, output channel ``b``), else 0, plus N(0, ``noise_std``²) noise
        (the paper: σ ≪ C / c_out); biases 0. With ``noise_std=0`` the module passes non-negative
        inputs through unchanged.
        """
        C = self.num_classes
        for conv in self.convs():
            if conv.weight.is_meta:
                return
            c_out, c_in, kh, kw = conv.weight.shape
            a = torch.arange(c_in)
            b = torch.arange(c_out)
            match = (a[None, :] * C // c_in) == (b[:, None] * C // c_out)
            with torch.no_grad():
                if noise_std > 0:
                    conv.weight.normal_(0.0, noise_std)
                else:
                    conv.weight.zero_()
                conv.weight[:, :, kh // 2, kw // 2] += match.to(conv.weight.dtype) * (C / c_out)
                assert conv.bias is not None
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same-size context aggregation: ReLU after every layer but ``ctx_final``."""
        *hidden, last = self.convs()
        for conv in hidden:
            x = torch.relu(conv(x))
        out: torch.Tensor = last(x)
        return out


def _frontend(in_channels: int, num_classes: int, width: float, dropout: float) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for block, channels in enumerate(VGG16_BLOCKS, start=1):
        dilation = 2 if block == 5 else 1  # pool4 removed: conv5_x dilated by 2
        for i, ch in enumerate(channels, start=1):
            out = scaled(ch, width)
            layers[f"conv{block}_{i}"] = nn.Conv2d(c, out, 3, dilation=dilation)  # unpadded
            layers[f"relu{block}_{i}"] = nn.ReLU(inplace=True)
            c = out
        if block <= 3:
            layers[f"pool{block}"] = nn.MaxPool2d(2, 2)
    fc = scaled(4096, width)
    layers["fc6"] = nn.Conv2d(c, fc, 7, dilation=4)  # pool5 removed: dilated by 4
    layers["relu6"] = nn.ReLU(inplace=True)
    layers["drop6"] = nn.Dropout(dropout)
    layers["fc7"] = nn.Conv2d(fc, fc, 1)
    layers["relu7"] = nn.ReLU(inplace=True)
    layers["drop7"] = nn.Dropout(dropout)
    layers["final"] = nn.Conv2d(fc, num_classes, 1)
    return nn.Sequential(layers)


def frontend_margin(frontend: nn.Sequential) -> int:
    """Pixels the valid front-end loses per side: Σ dilation·(k − 1)/2 · (input px per feature)."""
    margin, scale = 0, 1
    for layer in frontend:
        if isinstance(layer, nn.Conv2d):
            margin += layer.dilation[0] * (layer.kernel_size[0] - 1) // 2 * scale
        elif isinstance(layer, nn.MaxPool2d):
            scale *= 2
    return margin


class DilationNet(nn.Module):
    """The Dilation front-end, optionally with a context module, and the ×8 bilinear up-sampling.

    Args:
        in_channels: input bands.
        num_classes: output score maps (C).
        context: ``"none"`` (front-end only), ``"basic"`` or ``"large"``.
        width: multiplier of the front-end's channels (64 … 512, 4096); 1 is the paper's net.
        dropout: drop-out after fc6 and fc7 (the paper: 0.5).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        context: Context = "basic",
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if context not in ("none", "basic", "large"):
            raise ValueError(f"context must be 'none', 'basic' or 'large'; got {context!r}")
        if width <= 0:
            raise ValueError(f"width must be positive; got {width}")
        self.frontend = _frontend(in_channels, num_classes, width, dropout)
        he_init(self.frontend)
        final = self.frontend.final
        assert isinstance(final, nn.Conv2d) and final.bias is not None
        if not final.weight.is_meta:
            # The release initialises ``final`` with N(0, 0.001²) and zero bias.
            nn.init.normal_(final.weight, 0.0, 1e-3)
            nn.init.zeros_(final.bias)
        self.context = (
            ContextModule(num_classes, large=context == "large") if context != "none" else None
        )
        # Fixed bilinear ×8 deconvolution, one 16×16 filter per class: output 8·n for n features.
        k, s, p = 2 * STRIDE, STRIDE, STRIDE // 2
        self.upsample = BilinearUpsample(num_classes, k, s, padding=p, groups=num_classes)

        margin = frontend_margin(self.frontend)  # 186
        rf = 2 * margin + STRIDE  # 380: the smallest input gives one feature
        context_px = STRIDE * self.context.radius() if self.context is not None else 0  # 264
        # Output pixels next to a window's edge that the up-sampling interpolates with a feature
        # the window lacks: the first (k - s - p) and the last (k - s - p) = 4.
        upsample_px = k - s - p
        self.tiling = TilingFacts(
            stride=STRIDE,
            margin=margin,
            halo=margin + context_px + upsample_px,
            size_rule=SizeRule(rf, STRIDE),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape (N, C, H − 372, W − 372) for H, W ≡ 4 (mod 8), at least 380."""
        x = self.frontend(x)
        if self.context is not None:
            x = self.context(x)
        out: torch.Tensor = self.upsample(x)
        return out


_PAPER = "Yu & Koltun, ICLR 2016"
_TINY = {"width": 1 / 64}


@register_model(family="dilation", paper=_PAPER, tiny=_TINY)
def dilation8_frontend(
    in_channels: int, num_classes: int, *, width: float = 1.0, dropout: float = 0.5
) -> DilationNet:
    """Dilation front-end (dilated VGG16, stride 8) with ×8 bilinear up-sampling; halo 190."""
    return DilationNet(in_channels, num_classes, context="none", width=width, dropout=dropout)


@register_model(family="dilation", paper=_PAPER, tiny=_TINY)
def dilation8(
    in_channels: int, num_classes: int, *, width: float = 1.0, dropout: float = 0.5
) -> DilationNet:
    """Dilation8: front-end + basic context module (the released CamVid net); halo 454."""
    return DilationNet(in_channels, num_classes, context="basic", width=width, dropout=dropout)


@register_model(family="dilation", paper=_PAPER, tiny=_TINY)
def dilation8_large(
    in_channels: int, num_classes: int, *, width: float = 1.0, dropout: float = 0.5
) -> DilationNet:
    """Dilation8 with the large context module (2C … 32C channels); halo 454."""
    return DilationNet(in_channels, num_classes, context="large", width=width, dropout=dropout)
