"""Building blocks shared by several families: VGG16 configuration, fixed bilinear up-sampling,
centre crops, and the parameter-counting conventions of the papers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

__all__ = [
    "VGG16_BLOCKS",
    "BilinearUpsample",
    "bilinear_kernel",
    "center_crop",
    "count_parameters",
    "he_init",
    "scaled",
]

#: VGG16's five convolution blocks (Simonyan & Zisserman, configuration D): output channels of
#: the 3×3 convolutions of each block; a 2×2 max-pool follows each block.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


def scaled(channels: int, width: float) -> int:
    """``channels`` scaled by a width multiplier (at least 1); ``width=1`` is the paper's net."""
    return max(1, round(channels * width))


def bilinear_kernel(in_channels: int, out_channels: int, size: int) -> torch.Tensor:
    """The (in, out, k, k) weight of a transposed convolution that up-samples bilinearly.

    As in FCN's ``surgery.upsample_filt``: each channel is up-sampled on its own (diagonal
    in/out), with the factor ``(k + 1) // 2``.
    """
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    kernel = (filt[:, None] * filt[None, :]).to(torch.float32)
    weight = torch.zeros(in_channels, out_channels, size, size)
    for c in range(min(in_channels, out_channels)):
        weight[c, c] = kernel
    return weight


class BilinearUpsample(nn.ConvTranspose2d):
    """A transposed convolution initialised to bilinear interpolation.

    ``learnable=False`` (the released FCN and Dilation nets) keeps the weight as a parameter with
    ``requires_grad=False`` — caffe stores it as a blob, so it is counted as a parameter but not
    trained, and papers that exclude "the fixed up-sampling" count only trainable parameters.
    ``groups=channels`` gives Dilation's per-channel deconvolution (one k×k filter per class).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int,
        *,
        padding: int = 0,
        learnable: bool = False,
        groups: int = 1,
    ) -> None:
        super().__init__(
            channels,
            channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
        )
        self.learnable = learnable
        self.reset_parameters()
        self.weight.requires_grad_(learnable)

    def reset_parameters(self) -> None:
        """Bilinear weights (called by ``nn.ConvTranspose2d.__init__`` and by re-initialisation)."""
        if self.weight.is_meta:
            return
        k = self.kernel_size[0]
        with torch.no_grad():
            if self.groups == 1:
                self.weight.copy_(bilinear_kernel(self.in_channels, self.out_channels, k))
            else:
                # (in, out/groups, k, k): every group up-samples its own channel.
                self.weight.copy_(bilinear_kernel(1, 1, k).expand_as(self.weight))


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The centre ``h × w`` of the last two axes (floor of the offset, as U-Net and Lasagne)."""
    dy, dx = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., dy : dy + h, dx : dx + w]


def count_parameters(
    model: nn.Module, *, trainable_only: bool = False, bn_statistics: bool = False
) -> int:
    """Parameter count under the papers' conventions (see reference/architectures.md §0).

    Args:
        model: any module (``meta`` device is fine: only shapes are read).
        trainable_only: skip parameters with ``requires_grad=False`` — the fixed bilinear
            up-sampling, which FCN's Table 1 does not count.
        bn_statistics: add BatchNorm running means and variances, which caffe and Lasagne store as
            parameters (SegNet's 29.5M, FC-DenseNet103's 9.4M).
    """
    params: Iterable[nn.Parameter] = model.parameters()
    n = sum(p.numel() for p in params if p.requires_grad or not trainable_only)
    if bn_statistics:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                assert m.running_var is not None
                n += m.running_mean.numel() + m.running_var.numel()
    return n


def he_init(module: nn.Module) -> None:
    """He-normal weights and zero biases for the learned (transposed) convolutions in ``module``.

    torch's default (uniform, a sixth of He's variance) shrinks the signal ~2.4× per ReLU layer,
    so a freshly built 16-layer VGG net predicts nearly constant scores (its biases), which would
    make every exactness check vacuous; He et al.'s initialisation keeps the variance through the
    depth. It is also what the papers trained from scratch use: U-Net draws from a Gaussian of
    standard deviation sqrt(2/N), FC-DenseNet uses HeUniform. Frozen bilinear up-sampling keeps
    its weights; meta tensors are skipped.
    """
    for m in module.modules():
        if isinstance(m, BilinearUpsample) or not isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            continue
        if m.weight.is_meta:
            continue
        # A transposed weight is (in, out, k, k): its "fan_out" is the in·k² inputs per output.
        mode: Literal["fan_in", "fan_out"] = (
            "fan_out" if isinstance(m, nn.ConvTranspose2d) else "fan_in"
        )
        nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
