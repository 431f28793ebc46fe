"""Mask R-CNN — He, Gkioxari, Dollár, Girshick, "Mask R-CNN", ICCV 2017 — in plain torch.

The network is torchvision's ``maskrcnn_resnet50_fpn`` (reference/architectures.md §10), with the
compiled operators replaced by :mod:`tilewise.models.detection`:

- **Backbone**: ResNet-50/101 (torchvision layout: stride in the 3×3 of a bottleneck, reusing
  :class:`tilewise.models.resnet.Bottleneck`) with FrozenBatchNorm (affine and statistics held
  as buffers), ``trainable_layers`` of the five stages (conv1, layer1..4) left trainable.
- **FPN**: lateral 1×1 convolutions to 256 channels, nearest ×2 top-down sums, 3×3 output
  convolutions: P2..P5 at strides 4..32; P6 = max-pool(P5, 1, stride 2).
- **RPN**: 3×3 conv + ReLU, 1×1 objectness (A) and deltas (4A); anchors 32..512 on P2..P6 with
  ratios 0.5/1/2; per level the pre-NMS top-k, NMS 0.7 per level, the post-NMS top-k. Training
  samples 256 anchors per image (half positive at IoU ≥ 0.7, negative < 0.3).
- **RoI heads**: each proposal is pooled from one level ``k = ⌊4 + log2(√(wh) / 224)⌋`` clamped
  to [2, 5] with RoIAlign (7×7 for boxes, 14×14 for masks, sampling ratio 2, not aligned), a
  two-layer MLP (1024) with class scores and class-specific deltas (weights 10, 10, 5, 5), and
  four 3×3 convolutions, a 2×2/2 transposed convolution and a 1×1 convolution to K masks of
  28×28. Training samples 512 proposals per image (a quarter foreground at IoU ≥ 0.5; ground-truth
  boxes join the proposals); the mask loss is the per-pixel BCE of the ground-truth class against
  the ground-truth mask RoIAligned to 28×28 on the proposal.
- **Inference**: per class, boxes scoring above 0.05, NMS 0.5, at most 100 detections per image;
  their masks are computed on the final boxes and pasted (bilinearly) into the image.

``num_classes`` counts the background as class 0 (91 for COCO). With 91 classes the ResNet-50
network has exactly torchvision's 44,401,393 parameters (FrozenBN as buffers): backbone 23,454,912,
FPN 3,344,384, RPN 593,935, box head 13,895,680, box predictor 466,375, mask head 2,360,320, mask
predictor 285,787. Submodule names follow torchvision's (``backbone.body.layer1.0.conv1``,
``backbone.fpn.inner_blocks.0.0``, ``rpn.head.conv.0.0``, ``roi_heads.box_head.fc6``,
``roi_heads.mask_predictor.conv5_mask``, ...), so a torchvision state dict has the same keys.

Differences from torchvision, on purpose: no resizing and no normalisation inside the model
(tilewise feeds windows at native resolution and normalises them itself); the input is padded
with zeros at the bottom and right to a multiple of 32 and nothing is cropped, so boxes are in
input pixels. Anchors use the nominal level strides 4..64 (torchvision divides the padded image
size by the feature size, which for P6 is not always 64).

``build_mask_rcnn(num_classes, "tiny")`` is the same network at toy size for tests and CPU
benches: a ResNet of one basic block per stage with widths 8/16/32/64, GroupNorm (trainable from
scratch; FrozenBN would be the identity without pretrained statistics), FPN 32 channels,
anchors 16..256, a 64-wide box MLP, a 32-channel mask head and fewer proposals. Mask R-CNN does
not tile seamlessly (an object crossing a window edge is cut); merging detections across windows
is the caller's job.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tilewise.errors import ConfigError, InputError, did_you_mean
from tilewise.models.detection import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    AnchorGenerator,
    BoxCoder,
    batched_nms,
    box_iou,
    clip_boxes,
    match_proposals,
    paste_masks,
    remove_small_boxes,
    roi_align,
    sample_balanced,
)
from tilewise.models.resnet import Bottleneck

__all__ = [
    "BACKBONES",
    "INSTANCE_ARCHS",
    "BasicBlock",
    "FeaturePyramid",
    "FrozenBatchNorm2d",
    "MaskRCNN",
    "MaskRCNNConfig",
    "ResNetBody",
    "build_mask_rcnn",
    "create_instance_model",
    "instance_arch_args",
    "instance_config",
    "is_instance_arch",
    "targets_from_instances",
]

BlockKind = Literal["bottleneck", "basic"]
NormKind = Literal["frozen", "bn", "gn"]
BackboneName = Literal["resnet50", "resnet101", "tiny"]

#: Backbone presets of :func:`build_mask_rcnn`.
BACKBONES: tuple[str, ...] = ("resnet50", "resnet101", "tiny")

#: Instance architectures jobs name in ``model.arch``, and their backbone presets. They are not in
#: the dense registry (:mod:`tilewise.models.registry`): they return objects, not score maps, and
#: have no tiling facts; predict jobs run them through the instance stage instead of the
#: overlap-tile engine.
INSTANCE_ARCHS: dict[str, str] = {
    "mask_rcnn_r50_fpn": "resnet50",
    "mask_rcnn_r101_fpn": "resnet101",
    "mask_rcnn_tiny": "tiny",
}

# Minimum box side kept after decoding (torchvision: RPN 1e-3, detections 1e-2).
_RPN_MIN_SIZE = 1e-3
_DET_MIN_SIZE = 1e-2


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Every setting of :class:`MaskRCNN`; the defaults are torchvision's R50-FPN.

    Backbone:
        block: ``"bottleneck"`` (ResNet-50/101, expansion 4) or ``"basic"`` (two 3×3, expansion 1).
        layers: blocks per stage (ResNet-50: 3, 4, 6, 3; ResNet-101: 3, 4, 23, 3).
        stem_channels: output channels of the 7×7/2 stem convolution.
        widths: per-stage block width (bottleneck: before the ×4 expansion).
        norm: ``"frozen"`` (FrozenBatchNorm, for pretrained weights; affine and statistics are
            buffers, not parameters), ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm; training
            from scratch).
        trainable_layers: how many of the stages (layer4, layer3, layer2, layer1, conv1) train,
            from the top; the others get ``requires_grad=False`` (still counted as parameters).
        fpn_channels: channels of P2..P6.

    RPN:
        anchor_sizes: one size per level P2..P6.
        aspect_ratios: height / width of the anchors at every position.
        rpn_pre_nms_top_n_train / _test: proposals kept per level before NMS.
        rpn_post_nms_top_n_train / _test: proposals kept per image after NMS.
        rpn_nms_thresh: NMS IoU threshold (per level).
        rpn_fg_iou_thresh / rpn_bg_iou_thresh: anchor positive at IoU ≥ fg, negative below bg.
        rpn_batch_size_per_image / rpn_positive_fraction: anchors sampled for the losses.
        rpn_score_thresh: proposals with a lower objectness probability are dropped.

    RoI heads:
        box_roi_size / mask_roi_size: RoIAlign output sizes (masks come out twice as large).
        sampling_ratio / aligned: RoIAlign settings of both heads.
        representation_size: width of the box head's two fully connected layers.
        mask_head_channels / mask_head_layers: the mask head's 3×3 convolutions.
        box_fg_iou_thresh / box_bg_iou_thresh: proposal foreground at IoU ≥ fg, background < bg.
        box_batch_size_per_image / box_positive_fraction: proposals sampled for the losses.
        bbox_reg_weights: box-head delta weights.
        mask_target_sampling_ratio: RoIAlign of the ground-truth masks onto the proposals (0:
            adaptive, as torchvision).

    Inference:
        box_score_thresh: detections must score above it.
        box_nms_thresh: per-class NMS threshold.
        box_detections_per_img: at most this many detections per image.
    """

    block: BlockKind = "bottleneck"
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    stem_channels: int = 64
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    norm: NormKind = "frozen"
    trainable_layers: int = 3
    fpn_channels: int = 256
    anchor_sizes: tuple[float, float, float, float, float] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    box_roi_size: int = 7
    mask_roi_size: int = 14
    sampling_ratio: int = 2
    aligned: bool = False
    representation_size: int = 1024
    mask_head_channels: int = 256
    mask_head_layers: int = 4
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    mask_target_sampling_ratio: int = 0
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100

    def __post_init__(self) -> None:
        # Tuples may arrive as lists from a YAML job; store them as tuples.
        for name in ("layers", "widths", "anchor_sizes", "aspect_ratios", "bbox_reg_weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.block not in ("bottleneck", "basic"):
            raise ConfigError(
                f"block must be 'bottleneck' or 'basic'; got {self.block!r}. Use one of them."
            )
        if self.norm not in ("frozen", "bn", "gn"):
            raise ConfigError(
                f"norm must be 'frozen', 'bn' or 'gn'; got {self.norm!r}. Use one of them."
            )
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ConfigError(
                f"layers must be 4 positive block counts (layer1..4); got {self.layers}."
            )
        if len(self.widths) != 4 or min(self.widths) < 1 or self.stem_channels < 1:
            raise ConfigError(
                f"widths must be 4 positive channel counts and stem_channels positive; got "
                f"{self.widths} and {self.stem_channels}."
            )
        if not 0 <= self.trainable_layers <= 5:
            raise ConfigError(
                f"trainable_layers counts stages from the top and must lie in 0..5; got "
                f"{self.trainable_layers}."
            )
        if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) <= 0:
            raise ConfigError(
                f"anchor_sizes needs one positive size per level P2..P6 (5); got "
                f"{self.anchor_sizes}."
            )
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ConfigError(
                f"aspect_ratios must be positive height/width ratios; got {self.aspect_ratios}."
            )
        positive = (
            "fpn_channels",
            "rpn_pre_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train",
            "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image",
            "box_roi_size",
            "mask_roi_size",
            "representation_size",
            "mask_head_channels",
            "mask_head_layers",
            "box_batch_size_per_image",
            "box_detections_per_img",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}.")
        unit = (
            "rpn_nms_thresh",
            "rpn_fg_iou_thresh",
            "rpn_bg_iou_thresh",
            "rpn_positive_fraction",
            "box_fg_iou_thresh",
            "box_bg_iou_thresh",
            "box_positive_fraction",
            "box_nms_thresh",
            "box_score_thresh",
            "rpn_score_thresh",
        )
        for name in unit:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1]; got {getattr(self, name)}.")
        if (
            self.rpn_bg_iou_thresh > self.rpn_fg_iou_thresh
            or self.box_bg_iou_thresh > self.box_fg_iou_thresh
        ):
            raise ConfigError(
                "the background IoU threshold must not exceed the foreground one; got rpn "
                f"{self.rpn_bg_iou_thresh} > {self.rpn_fg_iou_thresh} or box "
                f"{self.box_bg_iou_thresh} > {self.box_fg_iou_thresh}."
            )


_PRESETS: dict[str, dict[str, Any]] = {
    "resnet50": {},
    "resnet101": {"layers": (3, 4, 23, 3)},
    "tiny": {
        "block": "basic",
        "layers": (1, 1, 1, 1),
        "stem_channels": 8,
        "widths": (8, 16, 32, 64),
        "norm": "gn",
        "trainable_layers": 5,
        "fpn_channels": 32,
        "anchor_sizes": (16, 32, 64, 128, 256),
        "rpn_pre_nms_top_n_train": 300,
        "rpn_pre_nms_top_n_test": 150,
        "rpn_post_nms_top_n_train": 150,
        "rpn_post_nms_top_n_test": 75,
        "rpn_batch_size_per_image": 64,
        "representation_size": 64,
        "mask_head_channels": 32,
        "box_batch_size_per_image": 64,
    },
}


# ---------------------------------------------------------------------------------------------
# Backbone


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers (torchvision's).

    ``y = (x - running_mean) / sqrt(running_var + eps) · weight + bias``; freshly built it is the
    identity. Buffers are saved in the state dict but are not parameters and never train.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """The fixed affine map, per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A BatchNorm2d checkpoint (ImageNet ResNet weights) has a counter FrozenBN does not keep.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "frozen":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    # 32 groups for wide layers (Wu & He), fewer for narrow ones (at least 8 channels a group).
    return nn.GroupNorm(math.gcd(channels, min(32, max(1, channels // 8))), channels)


def _replace_batchnorm(module: nn.Module, kind: NormKind) -> None:
    """Swap every ``nn.BatchNorm2d`` under ``module`` for the chosen normalisation, in place."""
    if kind == "bn":
        return
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _norm(kind, child.num_features))
        else:
            _replace_batchnorm(child, kind)


class BasicBlock(nn.Module):
    """ResNet-18/34's block: 3×3 (stride) → 3×3, each with a norm, plus the identity or a
    1×1 projection.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: 1 or 2 (in the first 3×3 and the projection).
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output (half the size when ``stride`` is 2)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        out: Tensor = self.relu(y + shortcut)
        return out


class ResNetBody(nn.Module):
    """A ResNet of output stride 32 returning the outputs C2..C5 of its four stages.

    7×7/2 stem convolution + norm + ReLU, 3×3/2 max-pool (padding 1), then layer1..4 at strides
    4, 8, 16, 32 (the stride in the first block of layers 2..4; in a bottleneck, in its 3×3).

    Args:
        in_channels: input bands.
        config: the backbone fields of :class:`MaskRCNNConfig` are read.

    Attributes:
        out_channels: channels of C2..C5.
    """

    def __init__(self, in_channels: int, config: MaskRCNNConfig) -> None:
        super().__init__()
        stem = config.stem_channels
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c = stem
        self.out_channels: list[int] = []
        stages = []
        for n, width, stride in zip(config.layers, config.widths, (1, 2, 2, 2), strict=True):
            blocks: list[nn.Module] = []
            for k in range(n):
                s = stride if k == 0 else 1
                if config.block == "bottleneck":
                    c_out = 4 * width
                    blocks.append(
                        Bottleneck(c, width, c_out, stride=s, dilation=1, stride_in_1x1=False)
                    )
                else:
                    c_out = width
                    blocks.append(BasicBlock(c, c_out, stride=s))
                c = c_out
            stages.append(nn.Sequential(*blocks))
            self.out_channels.append(c)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        _replace_batchnorm(self, config.norm)
        # torchvision's rule: the top `trainable_layers` stages train; with all five the stem's
        # norm trains too.
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][: config.trainable_layers]
        if config.trainable_layers == 5:
            train.append("bn1")
        for name, p in self.named_parameters():
            if not any(name.startswith(t) for t in train):
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[C2, C3, C4, C5]`` at strides 4, 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c2, c3, c4, self.layer4(c4)]


class FeaturePyramid(nn.Module):
    """FPN (Lin et al. 2017): P2..P5 from C2..C5 by lateral 1×1 convolutions, nearest ×2 top-down
    sums and 3×3 output convolutions, and P6 = max-pool(P5, kernel 1, stride 2).

    Args:
        in_channels: channels of C2..C5.
        out_channels: channels of every P level.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        # One-element Sequentials: torchvision's Conv2dNormActivation, hence its key names.
        self.inner_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels
        )
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta and m.bias is not None:
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``[P2, P3, P4, P5, P6]``."""
        last = self.inner_blocks[-1](features[-1])
        out = [self.layer_blocks[-1](last)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            out.insert(0, self.layer_blocks[i](last))
        out.append(F.max_pool2d(out[-1], kernel_size=1, stride=2))
        return out


class ResNetFPN(nn.Module):
    """The backbone: :class:`ResNetBody` (``body``) and :class:`FeaturePyramid` (``fpn``)."""

    def __init__(self, in_channels: int, config: MaskRCNNConfig) -> None:
        super().__init__()
        self.body = ResNetBody(in_channels, config)
        self.fpn = FeaturePyramid(self.body.out_channels, config.fpn_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[P2, ..., P6]`` at strides 4..64."""
        out: list[Tensor] = self.fpn(self.body(x))
        return out


# ---------------------------------------------------------------------------------------------
# RPN


class RPNHead(nn.Module):
    """Shared over levels: 3×3 conv + ReLU, then 1×1 to A objectness logits and 4A deltas."""

    def __init__(self, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        )
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, 4 * num_anchors, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta and m.bias is not None:
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level ``(N, A, H, W)`` logits and ``(N, 4A, H, W)`` deltas."""
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten_head(x: Tensor, channels: int) -> Tensor:
    """``(N, A·c, H, W)`` → ``(N, H·W·A, c)``: position-major, anchor-minor, as the anchors."""
    n, ac, h, w = x.shape
    return x.view(n, ac // channels, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)


def _smooth_l1_sum(x: Tensor, y: Tensor, beta: float = 1 / 9) -> Tensor:
    return F.smooth_l1_loss(x, y, beta=beta, reduction="sum")


class RegionProposalNetwork(nn.Module):
    """Anchors, the RPN head, proposal selection and the RPN losses."""

    def __init__(self, config: MaskRCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.anchor_generator = AnchorGenerator(config.anchor_sizes, config.aspect_ratios)
        self.head = RPNHead(config.fpn_channels, self.anchor_generator.num_anchors)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(
        self,
        features: Sequence[Tensor],
        strides: Sequence[int],
        image_size: tuple[int, int],
        gt_boxes: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image (and the two RPN losses when ``gt_boxes`` is given).

        Args:
            features: P2..P6, ``(N, C, H_l, W_l)``.
            strides: input pixels per feature pixel of each level.
            image_size: ``(H, W)`` of the unpadded input (proposals are clipped to it).
            gt_boxes: per image ``(G, 4)`` ground-truth boxes, for training.

        Returns:
            ``(proposals, losses)``: per image ``(P, 4)`` boxes in decreasing objectness;
            ``losses`` is empty without ``gt_boxes``.
        """
        cfg = self.config
        logits, deltas = self.head(features)
        grid_sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        anchors_per_level = self.anchor_generator(grid_sizes, strides, features[0].device)
        level_counts = [a.shape[0] for a in anchors_per_level]
        anchors = torch.cat(anchors_per_level).to(features[0].dtype)
        objectness = torch.cat([_flatten_head(x, 1) for x in logits], dim=1)[..., 0]
        box_deltas = torch.cat([_flatten_head(x, 4) for x in deltas], dim=1)

        training = gt_boxes is not None
        pre_n = cfg.rpn_pre_nms_top_n_train if training else cfg.rpn_pre_nms_top_n_test
        post_n = cfg.rpn_post_nms_top_n_train if training else cfg.rpn_post_nms_top_n_test
        with torch.no_grad():
            # Proposals are not differentiated through (torchvision detaches them too).
            proposals = self.box_coder.decode(
                box_deltas.detach().reshape(-1, 4), anchors.repeat(objectness.shape[0], 1)
            ).view(objectness.shape[0], -1, 4)
            scores = objectness.detach()
            out = []
            for b in range(objectness.shape[0]):
                out.append(
                    self._select(proposals[b], scores[b], level_counts, image_size, pre_n, post_n)
                )
        losses: dict[str, Tensor] = {}
        if gt_boxes is not None:
            losses = self._losses(anchors, objectness, box_deltas, gt_boxes)
        return out, losses

    def _select(
        self,
        boxes: Tensor,
        logits: Tensor,
        level_counts: Sequence[int],
        image_size: tuple[int, int],
        pre_n: int,
        post_n: int,
    ) -> Tensor:
        """Top-k per level, clip, drop tiny and low-scoring boxes, NMS per level, top-k."""
        cfg = self.config
        picked, levels = [], []
        start = 0
        for lvl, count in enumerate(level_counts):
            top = logits[start : start + count].topk(min(pre_n, count)).indices + start
            picked.append(top)
            levels.append(torch.full_like(top, lvl))
            start += count
        idx = torch.cat(picked)
        lvl_of = torch.cat(levels)
        b = clip_boxes(boxes[idx], *image_size)
        s = torch.sigmoid(logits[idx])
        keep = remove_small_boxes(b, _RPN_MIN_SIZE)
        b, s, lvl_of = b[keep], s[keep], lvl_of[keep]
        keep = torch.where(s >= cfg.rpn_score_thresh)[0]
        b, s, lvl_of = b[keep], s[keep], lvl_of[keep]
        keep = batched_nms(b, s, lvl_of, cfg.rpn_nms_thresh)[:post_n]
        return b[keep]

    def _losses(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, gt_boxes: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        cfg = self.config
        n_anchors = anchors.shape[0]
        labels, targets, pos_all, neg_all = [], [], [], []
        for b, gt in enumerate(gt_boxes):
            if gt.numel() == 0:
                lab = anchors.new_zeros(n_anchors)
                matched = anchors.new_zeros(n_anchors, 4)
            else:
                m = match_proposals(
                    box_iou(gt, anchors), cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, True
                )
                matched = gt[m.clamp(min=0)]
                lab = (m >= 0).to(anchors.dtype)
                lab[m == BETWEEN_THRESHOLDS] = -1.0
            pos, neg = sample_balanced(lab, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction)
            pos_all.append(pos + b * n_anchors)
            neg_all.append(neg + b * n_anchors)
            labels.append(lab)
            targets.append(matched)
        pos = torch.cat(pos_all)
        sampled = torch.cat((pos, torch.cat(neg_all)))
        flat_labels = torch.cat(labels)
        flat_targets = torch.cat(targets)
        flat_anchors = anchors.repeat(len(gt_boxes), 1)
        reg = self.box_coder.encode(flat_targets[pos], flat_anchors[pos])
        n = max(sampled.numel(), 1)
        return {
            "loss_objectness": F.binary_cross_entropy_with_logits(
                objectness.reshape(-1)[sampled], flat_labels[sampled]
            ),
            "loss_rpn_box_reg": _smooth_l1_sum(deltas.reshape(-1, 4)[pos], reg) / n,
        }


# ---------------------------------------------------------------------------------------------
# RoI heads


class TwoMLPHead(nn.Module):
    """Flatten the pooled RoI, two fully connected layers with ReLU."""

    def __init__(self, in_features: int, representation: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation)
        self.fc7 = nn.Linear(representation, representation)

    def forward(self, x: Tensor) -> Tensor:
        """``(R, C, 7, 7)`` → ``(R, representation)``."""
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class FastRCNNPredictor(nn.Module):
    """Class logits (K) and class-specific box deltas (4K) from the box representation."""

    def __init__(self, representation: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(representation, num_classes)
        self.bbox_pred = nn.Linear(representation, 4 * num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, K)`` logits and ``(R, 4K)`` deltas."""
        return self.cls_score(x), self.bbox_pred(x)


def _mask_head(in_channels: int, channels: int, layers: int) -> nn.Sequential:
    """``layers`` × (3×3 conv + ReLU), as torchvision's ``MaskRCNNHeads`` (keys ``0.0``, ...)."""
    blocks = []
    c = in_channels
    for _ in range(layers):
        blocks.append(nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(inplace=True)))
        c = channels
    return nn.Sequential(*blocks)


def _mask_predictor(channels: int, num_classes: int) -> nn.Sequential:
    """2×2/2 transposed conv + ReLU, then 1×1 to one mask logit map per class."""
    return nn.Sequential(
        OrderedDict(
            conv5_mask=nn.ConvTranspose2d(channels, channels, 2, stride=2),
            relu5=nn.ReLU(inplace=True),
            mask_fcn_logits=nn.Conv2d(channels, num_classes, 1),
        )
    )


def _kaiming_fan_out(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and not m.weight.is_meta:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def roi_levels(boxes: Tensor, k_min: int = 2, k_max: int = 5) -> Tensor:
    """FPN level of each RoI: ``⌊4 + log2(√area / 224) + 1e-6⌋`` clamped to ``[k_min, k_max]``."""
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    k = torch.floor(4 + torch.log2(s / 224) + 1e-6)
    return k.clamp(k_min, k_max).long()


class RoIHeads(nn.Module):
    """Box and mask heads over the proposals: losses in training, detections in inference."""

    def __init__(self, num_classes: int, config: MaskRCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        c = config.fpn_channels
        self.box_head = TwoMLPHead(c * config.box_roi_size**2, config.representation_size)
        self.box_predictor = FastRCNNPredictor(config.representation_size, num_classes)
        self.mask_head = _mask_head(c, config.mask_head_channels, config.mask_head_layers)
        self.mask_predictor = _mask_predictor(config.mask_head_channels, num_classes)
        _kaiming_fan_out(self.mask_head)
        _kaiming_fan_out(self.mask_predictor)
        self.box_coder = BoxCoder(config.bbox_reg_weights)

    def pool(
        self, features: Sequence[Tensor], strides: Sequence[int], boxes: Sequence[Tensor], size: int
    ) -> Tensor:
        """MultiScaleRoIAlign: each box pooled from P2..P5 by :func:`roi_levels`.

        Args:
            features: P2..P5 (P6 is not pooled).
            strides: their strides.
            boxes: per image ``(R_i, 4)`` boxes.
            size: output bins per side.

        Returns:
            ``(ΣR_i, C, size, size)`` in the order of the images and boxes.
        """
        rois = torch.cat(
            [torch.cat((b.new_full((b.shape[0], 1), i), b), dim=1) for i, b in enumerate(boxes)]
        )
        out = features[0].new_zeros(rois.shape[0], features[0].shape[1], size, size)
        if rois.shape[0] == 0:
            return out
        level = roi_levels(rois[:, 1:]) - 2
        for lvl, (f, s) in enumerate(zip(features[:4], strides[:4], strict=True)):
            sel = torch.where(level == lvl)[0]
            if sel.numel():
                out[sel] = roi_align(
                    f, rois[sel], size, 1.0 / s, self.config.sampling_ratio, self.config.aligned
                )
        return out

    def _mask_logits(
        self, features: Sequence[Tensor], strides: Sequence[int], boxes: Sequence[Tensor]
    ) -> Tensor:
        x = self.pool(features, strides, boxes, self.config.mask_roi_size)
        out: Tensor = self.mask_predictor(self.mask_head(x))
        return out

    def losses(
        self,
        features: Sequence[Tensor],
        strides: Sequence[int],
        proposals: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """The classifier, box-regression and mask losses on sampled proposals."""
        cfg = self.config
        boxes, labels, reg_targets, matched_idx = [], [], [], []
        for props, t in zip(proposals, targets, strict=True):
            gt, gt_labels = t["boxes"].to(props.dtype), t["labels"].long()
            props = torch.cat((props, gt))
            if gt.shape[0] == 0:
                m = torch.full((props.shape[0],), BELOW_LOW_THRESHOLD, device=props.device)
                lab = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
            else:
                m = match_proposals(
                    box_iou(gt, props), cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, False
                )
                lab = gt_labels[m.clamp(min=0)].clone()
                lab[m == BELOW_LOW_THRESHOLD] = 0
                lab[m == BETWEEN_THRESHOLDS] = -1
            pos, neg = sample_balanced(lab, cfg.box_batch_size_per_image, cfg.box_positive_fraction)
            keep = torch.cat((pos, neg))
            props, lab, m = props[keep], lab[keep], m[keep].clamp(min=0)
            if gt.shape[0]:
                reg = self.box_coder.encode(gt[m], props)
            else:
                reg = props.new_zeros(props.shape[0], 4)
            boxes.append(props)
            labels.append(lab)
            reg_targets.append(reg)
            matched_idx.append(m)

        x = self.box_head(self.pool(features, strides, boxes, cfg.box_roi_size))
        class_logits, box_regression = self.box_predictor(x)
        all_labels = torch.cat(labels)
        all_targets = torch.cat(reg_targets)
        loss_classifier = F.cross_entropy(class_logits, all_labels)
        pos = torch.where(all_labels > 0)[0]
        reg = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, all_labels[pos]]
        loss_box = _smooth_l1_sum(reg, all_targets[pos]) / max(all_labels.numel(), 1)

        pos_boxes = [b[lab > 0] for b, lab in zip(boxes, labels, strict=True)]
        mask_logits = self._mask_logits(features, strides, pos_boxes)
        if mask_logits.shape[0] == 0:
            loss_mask = mask_logits.sum() * 0
        else:
            size = mask_logits.shape[-1]
            mask_targets = []
            for b, lab, m, t in zip(boxes, labels, matched_idx, targets, strict=True):
                sel = lab > 0
                if not bool(sel.any()):
                    continue
                rois = torch.cat((m[sel][:, None].to(b.dtype), b[sel]), dim=1)
                gt_masks = t["masks"][:, None].to(b.dtype)
                mask_targets.append(
                    roi_align(gt_masks, rois, size, 1.0, cfg.mask_target_sampling_ratio, False)[
                        :, 0
                    ]
                )
            pos_labels = all_labels[pos]
            picked = mask_logits[torch.arange(pos_labels.numel(), device=pos.device), pos_labels]
            loss_mask = F.binary_cross_entropy_with_logits(picked, torch.cat(mask_targets))
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box,
            "loss_mask": loss_mask,
        }

    def detect(
        self,
        features: Sequence[Tensor],
        strides: Sequence[int],
        proposals: Sequence[Tensor],
        image_size: tuple[int, int],
        paste: bool = True,
    ) -> list[dict[str, Tensor]]:
        """Final detections per image with pasted mask probabilities (or, with ``paste=False``,
        the ``M × M`` probabilities of each box as ``mask_probs``)."""
        cfg = self.config
        x = self.box_head(self.pool(features, strides, proposals, cfg.box_roi_size))
        class_logits, box_regression = self.box_predictor(x)
        ref = torch.cat(list(proposals))
        pred_boxes = clip_boxes(self.box_coder.decode(box_regression, ref), *image_size)
        pred_scores = F.softmax(class_logits, dim=-1)
        K = class_logits.shape[1]
        results = []
        start = 0
        for props in proposals:
            n = props.shape[0]
            b = pred_boxes[start : start + n, 1:].reshape(-1, 4)
            s = pred_scores[start : start + n, 1:].reshape(-1)
            lab = torch.arange(1, K, device=b.device).repeat(n)
            start += n
            keep = torch.where(s > cfg.box_score_thresh)[0]
            b, s, lab = b[keep], s[keep], lab[keep]
            keep = remove_small_boxes(b, _DET_MIN_SIZE)
            b, s, lab = b[keep], s[keep], lab[keep]
            keep = batched_nms(b, s, lab, cfg.box_nms_thresh)[: cfg.box_detections_per_img]
            results.append({"boxes": b[keep], "labels": lab[keep], "scores": s[keep]})
        boxes = [r["boxes"] for r in results]
        logits = self._mask_logits(features, strides, boxes)
        start = 0
        for r in results:
            n = r["boxes"].shape[0]
            rows = torch.arange(n, device=logits.device)
            probs = torch.sigmoid(logits[start : start + n][rows, r["labels"]])
            if paste:
                r["masks"] = paste_masks(probs, r["boxes"], *image_size)
            else:
                r["mask_probs"] = probs
            start += n
        return results


# ---------------------------------------------------------------------------------------------
# The network


class MaskRCNN(nn.Module):
    """Mask R-CNN with a ResNet-FPN backbone (see the module docstring).

    ``forward(images, targets)`` in ``train()`` mode returns the five losses ``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``, ``loss_mask`` (sum them to
    train); in ``eval()`` mode it returns, per image, ``boxes (D, 4)`` xyxy float in input pixels,
    ``labels (D,)`` int64 in ``1..K-1``, ``scores (D,)`` in decreasing order and ``masks (D, H,
    W)`` float probabilities pasted into the image (threshold at 0.5 for binary masks).

    Args:
        num_classes: classes including the background (class 0): K.
        config: the settings; the defaults are torchvision's R50-FPN.
        in_channels: input bands.

    Attributes:
        strides: input pixels per feature pixel of P2..P6.
        size_divisible: inputs are zero-padded (bottom, right) to a multiple of this.
    """

    size_divisible = 32
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)

    def __init__(
        self, num_classes: int, config: MaskRCNNConfig | None = None, *, in_channels: int = 3
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(
                f"num_classes counts the background as class 0 and must be at least 2; got "
                f"{num_classes}. Use 1 + the number of object classes."
            )
        if in_channels < 1:
            raise ConfigError(f"in_channels must be at least 1; got {in_channels}.")
        self.config = config or MaskRCNNConfig()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone = ResNetFPN(in_channels, self.config)
        self.rpn = RegionProposalNetwork(self.config)
        self.roi_heads = RoIHeads(num_classes, self.config)

    def _features(self, images: Tensor) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise InputError(
                f"Mask R-CNN takes (N, {self.in_channels}, H, W) images; got "
                f"{tuple(images.shape)}. Pass a batch of {self.in_channels}-band images."
            )
        h, w = images.shape[-2:]
        d = self.size_divisible
        padded = F.pad(images, (0, -w % d, 0, -h % d))
        feats: list[Tensor] = self.backbone(padded)
        return feats

    def _check_targets(self, images: Tensor, targets: Sequence[dict[str, Tensor]]) -> None:
        n, _, h, w = images.shape
        if len(targets) != n:
            raise InputError(
                f"Mask R-CNN needs one target per image; got {len(targets)} targets for {n} images."
            )
        for i, t in enumerate(targets):
            missing = {"boxes", "labels", "masks"} - set(t)
            if missing:
                raise InputError(
                    f"target {i} lacks {sorted(missing)}; a target holds boxes (G, 4), labels "
                    "(G,) and masks (G, H, W) (see targets_from_instances)."
                )
            g = t["boxes"].shape[0]
            if (
                t["boxes"].shape != (g, 4)
                or t["labels"].shape != (g,)
                or t["masks"].shape != (g, h, w)
            ):
                raise InputError(
                    f"target {i} must hold boxes ({g}, 4), labels ({g},) and masks ({g}, {h}, "
                    f"{w}) for a {h}×{w} image; got {tuple(t['boxes'].shape)}, "
                    f"{tuple(t['labels'].shape)} and {tuple(t['masks'].shape)}."
                )
            if g and (int(t["labels"].min()) < 1 or int(t["labels"].max()) >= self.num_classes):
                raise InputError(
                    f"target {i} labels must lie in 1..{self.num_classes - 1} (0 is the "
                    f"background); got {sorted(set(t['labels'].tolist()))}."
                )
            b = t["boxes"]
            if g and bool(((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any()):
                raise InputError(
                    f"target {i} has boxes without positive width and height; boxes are "
                    "(x1, y1, x2, y2) with x2 > x1 and y2 > y1."
                )

    def losses(self, images: Tensor, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The five training losses of a batch (see the class docstring)."""
        self._check_targets(images, targets)
        feats = self._features(images)
        size = (images.shape[-2], images.shape[-1])
        gt_boxes = [t["boxes"].to(images.dtype) for t in targets]
        proposals, rpn_losses = self.rpn(feats, self.strides, size, gt_boxes)
        roi_losses = self.roi_heads.losses(feats, self.strides, proposals, targets)
        return {**rpn_losses, **roi_losses}

    def detect(self, images: Tensor, *, paste: bool = True) -> list[dict[str, Tensor]]:
        """Detections per image (see the class docstring); use in ``eval()`` mode.

        With ``paste=False`` each image's ``masks (D, H, W)`` are replaced by ``mask_probs (D,
        28, 28)``, the probabilities on each box's own grid: a window crowded with objects would
        otherwise hold D full-size masks at once (paste each into its box with
        :func:`~tilewise.models.detection.paste_masks`).
        """
        feats = self._features(images)
        size = (images.shape[-2], images.shape[-1])
        proposals, _ = self.rpn(feats, self.strides, size)
        return self.roi_heads.detect(feats, self.strides, proposals, size, paste)

    def forward(
        self, images: Tensor, targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in ``train()`` mode (``targets`` required), detections in ``eval()`` mode.

        Args:
            images: ``(N, C, H, W)`` normalised float images (any ``H``, ``W``).
            targets: per image ``boxes (G, 4)`` xyxy float, ``labels (G,)`` int64 in
                ``1..K-1`` and ``masks (G, H, W)`` uint8 or bool (see
                :func:`targets_from_instances`); ignored in ``eval()`` mode.
        """
        if self.training:
            if targets is None:
                raise InputError(
                    "Mask R-CNN in train() mode needs targets (boxes, labels, masks per image); "
                    "got none. Pass targets, or call eval() to detect."
                )
            return self.losses(images, targets)
        return self.detect(images)


def build_mask_rcnn(
    num_classes: int,
    backbone: str = "resnet50",
    *,
    in_channels: int = 3,
    **kwargs: Any,
) -> MaskRCNN:
    """A Mask R-CNN with freshly initialised weights.

    Args:
        num_classes: classes including the background (91 for COCO).
        backbone: ``"resnet50"``, ``"resnet101"`` (torchvision's R50/R101-FPN) or ``"tiny"``.
        in_channels: input bands.
        **kwargs: :class:`MaskRCNNConfig` fields overriding the preset's (e.g. ``norm="gn"``,
            ``trainable_layers=5`` to train a ResNet from scratch, ``box_score_thresh=0.3``).

    Raises:
        ConfigError: an unknown backbone or setting, or a value out of range.
    """
    if backbone not in _PRESETS:
        raise ConfigError(
            f"Mask R-CNN backbone must be one of {list(BACKBONES)}; got {backbone!r}."
            + did_you_mean(backbone, BACKBONES)
        )
    fields = {f.name for f in dataclasses.fields(MaskRCNNConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(
            f"Mask R-CNN has no setting {unknown[0]!r}; the settings are the fields of "
            f"MaskRCNNConfig." + did_you_mean(unknown[0], fields)
        )
    config = MaskRCNNConfig(**{**_PRESETS[backbone], **kwargs})
    return MaskRCNN(num_classes, config, in_channels=in_channels)


def targets_from_instances(
    instance_labels: np.ndarray, classes: dict[int, int]
) -> dict[str, Tensor]:
    """A Mask R-CNN target from an instance label image.

    Args:
        instance_labels: ``(H, W)`` integers: 0 is background, every other value one object.
        classes: the class (``>= 1``) of every object id in the image (extra ids are ignored).

    Returns:
        ``boxes (G, 4)`` float32 xyxy with ``x2`` = last column + 1 and ``y2`` = last row + 1,
        ``labels (G,)`` int64 and ``masks (G, H, W)`` uint8, objects in increasing id order.

    Raises:
        InputError: a label image that is not 2-D integers, a negative id, an object without a
            class, or a class below 1.
    """
    a = np.asarray(instance_labels)
    if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise InputError(
            f"instance labels must be a 2-D integer array (one id per object, 0 background); got "
            f"{a.ndim}-D {a.dtype}."
        )
    ids = np.unique(a)
    if ids.size and ids[0] < 0:
        raise InputError(f"instance ids must be >= 0 (0 is background); got {int(ids[0])}.")
    ids = ids[ids != 0]
    missing = [int(i) for i in ids if int(i) not in classes]
    if missing:
        raise InputError(
            f"every object needs a class: ids {missing[:10]} have none in the class map. Add them "
            "to classes (id -> class >= 1)."
        )
    bad = {int(i): classes[int(i)] for i in ids if classes[int(i)] < 1}
    if bad:
        raise InputError(
            f"object classes must be >= 1 (0 is the background); got {bad}. Use 1..K-1, or "
            "relabel those objects 0 to drop them."
        )
    h, w = a.shape
    masks = np.zeros((ids.size, h, w), dtype=np.uint8)
    boxes = np.zeros((ids.size, 4), dtype=np.float32)
    for k, i in enumerate(ids):
        m = a == i
        masks[k] = m
        rows, cols = np.where(m.any(axis=1))[0], np.where(m.any(axis=0))[0]
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.tensor([classes[int(i)] for i in ids], dtype=torch.int64),
        "masks": torch.from_numpy(masks),
    }


def is_instance_arch(name: str) -> bool:
    """Whether ``name`` is an instance architecture (:data:`INSTANCE_ARCHS`)."""
    return name in INSTANCE_ARCHS


def instance_arch_args() -> list[str]:
    """The ``model.args`` an instance architecture takes: the :class:`MaskRCNNConfig` fields."""
    return [f.name for f in dataclasses.fields(MaskRCNNConfig)]


def instance_config(name: str, **arch_args: Any) -> MaskRCNNConfig:
    """The :class:`MaskRCNNConfig` the instance architecture ``name`` gets with ``arch_args``.

    Raises:
        ConfigError: an unknown architecture or setting, or a value out of range.
    """
    return MaskRCNNConfig(**{**_PRESETS[_backbone_of(name)], **arch_args})


def _backbone_of(name: str) -> str:
    if name not in INSTANCE_ARCHS:
        raise ConfigError(
            f"unknown instance architecture {name!r}; known: {sorted(INSTANCE_ARCHS)}."
            + did_you_mean(name, INSTANCE_ARCHS)
        )
    return INSTANCE_ARCHS[name]


def create_instance_model(
    name: str, *, in_channels: int, num_classes: int, **arch_args: Any
) -> MaskRCNN:
    """Build the instance architecture ``name`` as jobs do (weights freshly initialised).

    Args:
        name: a key of :data:`INSTANCE_ARCHS`.
        in_channels: input bands.
        num_classes: classes including the background 0 (at least 2).
        **arch_args: :class:`MaskRCNNConfig` fields overriding the preset's.
    """
    return build_mask_rcnn(num_classes, _backbone_of(name), in_channels=in_channels, **arch_args)
