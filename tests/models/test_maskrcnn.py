"""Mask R-CNN: torchvision's parameter counts, the train/eval contracts, targets from instance
labels, and a short overfit on synthetic shapes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from tilewise.errors import ConfigError, InputError
from tilewise.models.detection import box_iou, mask_iou
from tilewise.models.maskrcnn import (
    FrozenBatchNorm2d,
    MaskRCNN,
    build_mask_rcnn,
    roi_levels,
    targets_from_instances,
)

R50_FPN_COCO = 44_401_393  # torchvision maskrcnn_resnet50_fpn COCO_V1 num_params


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta(num_classes: int, backbone: str = "resnet50", **kwargs: object) -> MaskRCNN:
    with torch.device("meta"):
        return build_mask_rcnn(num_classes, backbone, **kwargs)


@pytest.fixture
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Parameter counts


def test_r50_fpn_has_torchvisions_count_and_breakdown() -> None:
    m = meta(91)
    assert count(m) == R50_FPN_COCO
    # reference/architectures.md §10.
    assert count(m.backbone.body) == 23_454_912
    assert count(m.backbone.fpn) == 3_344_384
    assert sum(count(b) for b in m.backbone.fpn.inner_blocks) == 984_064
    assert sum(count(b) for b in m.backbone.fpn.layer_blocks) == 2_360_320
    assert count(m.rpn) == 593_935
    assert count(m.roi_heads.box_head) == 13_895_680
    assert count(m.roi_heads.box_predictor) == 466_375
    assert count(m.roi_heads.mask_head) == 2_360_320
    assert count(m.roi_heads.mask_predictor) == 285_787


def test_r50_fpn_counts_by_hand() -> None:
    # The same parts from their layer shapes (weights + biases), independently of the table.
    k = 91
    fpn = sum(c * 256 + 256 for c in (256, 512, 1024, 2048)) + 4 * (256 * 256 * 9 + 256)
    rpn = (256 * 256 * 9 + 256) + (256 * 3 + 3) + (256 * 12 + 12)
    box_head = (256 * 7 * 7 * 1024 + 1024) + (1024 * 1024 + 1024)
    box_predictor = (1024 * k + k) + (1024 * 4 * k + 4 * k)
    mask_head = 4 * (256 * 256 * 9 + 256)
    mask_predictor = (256 * 256 * 4 + 256) + (256 * k + k)
    m = meta(k)
    assert count(m.backbone.fpn) == fpn
    assert count(m.rpn) == rpn
    assert count(m.roi_heads.box_head) == box_head
    assert count(m.roi_heads.box_predictor) == box_predictor
    assert count(m.roi_heads.mask_head) == mask_head
    assert count(m.roi_heads.mask_predictor) == mask_predictor


def test_frozen_bn_is_buffers_and_variants_follow() -> None:
    m = meta(91)
    frozen = [x for x in m.modules() if isinstance(x, FrozenBatchNorm2d)]
    assert len(frozen) == 53  # stem + 16 bottlenecks × 3 + 4 projections
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    bn_channels = sum(x.num_features for x in frozen)
    # Trainable BN adds weight and bias per channel: §10's 44,454,513 (GroupNorm the same).
    assert 2 * bn_channels == 53_120
    assert count(meta(91, norm="bn")) == 44_454_513
    assert count(meta(91, norm="gn")) == 44_454_513
    # 81 classes (COCO without the unused ids): 10 fewer classes in both predictors.
    assert count(meta(81)) == 44_347_573 == R50_FPN_COCO - 10 * (1024 * 5 + 5 + 256 + 1)


def test_trainable_layers_freeze_the_stem_and_layer1() -> None:
    m = meta(91)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    conv1 = 3 * 64 * 7 * 7
    # layer1: block 0 (64->64, 3×3 64, 64->256, projection 64->256), blocks 1-2 (256->64, ...).
    layer1 = (64 * 64 + 64 * 64 * 9 + 64 * 256 + 64 * 256) + 2 * (256 * 64 + 64 * 64 * 9 + 64 * 256)
    assert trainable == R50_FPN_COCO - conv1 - layer1 == 44_178_993
    assert all(p.requires_grad for p in meta(91, trainable_layers=5).parameters())


def test_r101_is_r50_plus_17_bottlenecks() -> None:
    # ResNet-101 has 23 layer3 bottlenecks instead of 6; each repeated one is
    # 1024->256 (1×1), 256->256 (3×3), 256->1024 (1×1), bias-free (FrozenBN holds no parameters).
    bottleneck = 1024 * 256 + 256 * 256 * 9 + 256 * 1024
    assert count(meta(91, "resnet101")) == R50_FPN_COCO + 17 * bottleneck == 63_341_297


def test_state_dict_uses_torchvisions_key_names() -> None:
    keys = set(meta(91).state_dict())
    for key in (
        "backbone.body.conv1.weight",
        "backbone.body.bn1.running_var",
        "backbone.body.layer1.0.downsample.0.weight",
        "backbone.body.layer4.2.bn3.weight",
        "backbone.fpn.inner_blocks.3.0.weight",
        "backbone.fpn.layer_blocks.0.0.bias",
        "rpn.head.conv.0.0.weight",
        "rpn.head.cls_logits.weight",
        "rpn.head.bbox_pred.bias",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.box_head.fc7.bias",
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.mask_head.3.0.weight",
        "roi_heads.mask_predictor.conv5_mask.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
    ):
        assert key in keys, key


def test_builder_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="resnet50"):
        build_mask_rcnn(3, "resnet5")
    with pytest.raises(ConfigError, match="box_score_thresh"):
        build_mask_rcnn(3, "tiny", box_score_thres=0.5)
    with pytest.raises(ConfigError, match="background"):
        build_mask_rcnn(1, "tiny")
    with pytest.raises(ConfigError, match="norm"):
        build_mask_rcnn(3, "tiny", norm="layer")
    with pytest.raises(ConfigError, match="anchor_sizes"):
        build_mask_rcnn(3, "tiny", anchor_sizes=(8, 16))


def test_roi_levels_hand_values() -> None:
    # k = floor(4 + log2(sqrt(wh) / 224)) clamped to [2, 5].
    sides = torch.tensor([10.0, 56, 111, 112, 224, 447, 448, 2000])
    boxes = torch.stack((torch.zeros(8), torch.zeros(8), sides, sides), dim=1)
    assert roi_levels(boxes).tolist() == [2, 2, 2, 3, 4, 4, 5, 5]


# ---------------------------------------------------------------------------------------------
# Targets from instance labels


def test_targets_from_instances_hand_case() -> None:
    lab = np.zeros((6, 8), dtype=np.int32)
    lab[1:3, 2:5] = 7  # rows 1-2, columns 2-4
    lab[4, 0] = 3  # a single pixel
    lab[5, 6:8] = 7  # object 7 is in two pieces: one box around both
    t = targets_from_instances(lab, {3: 2, 7: 1, 99: 1})
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 4, 1, 5], [2, 1, 8, 6]]))
    assert t["labels"].tolist() == [2, 1] and t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, 6, 8)
    assert t["masks"][0].sum() == 1 and t["masks"][0, 4, 0] == 1
    assert t["masks"][1].sum() == 6 + 2
    empty = targets_from_instances(np.zeros((4, 5), dtype=np.int64), {})
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 5)


def test_targets_from_instances_errors() -> None:
    lab = np.zeros((4, 4), dtype=np.int64)
    lab[0, 0], lab[2, 2] = 1, 2
    with pytest.raises(InputError, match=r"ids \[2\]"):
        targets_from_instances(lab, {1: 1})
    with pytest.raises(InputError, match=">= 1"):
        targets_from_instances(lab, {1: 1, 2: 0})
    with pytest.raises(InputError, match="2-D integer"):
        targets_from_instances(lab.astype(np.float32), {1: 1, 2: 1})


# ---------------------------------------------------------------------------------------------
# Forward contracts (tiny configuration)

H = W = 64


def scene(
    objects: list[tuple[int, int, int, int]], seed: int = 0, size: tuple[int, int] = (H, W)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An image with squares (class 1, red) and discs (class 2, green): (class, cy, cx, r)."""
    h, w = size
    lab = np.zeros((h, w), np.int64)
    img = np.zeros((3, h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    classes = {}
    for i, (kind, cy, cx, r) in enumerate(objects, 1):
        if kind == 1:
            m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        else:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        lab[m] = i
        classes[i] = kind
        img[kind - 1][m] = 1.0
    img += 0.1 * np.random.default_rng(seed).standard_normal(img.shape).astype(np.float32)
    return torch.from_numpy(img), targets_from_instances(lab, classes)


def test_train_forward_gives_finite_losses_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_mask_rcnn(3, "tiny").train()
    a = scene([(1, 16, 16, 8), (2, 44, 40, 10)])
    b = scene([], seed=1)  # an image without objects is allowed
    losses = model(torch.stack((a[0], b[0])), [a[1], b[1]])
    assert isinstance(losses, dict)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_classifier"] > 0
    sum(losses.values()).backward()
    for name in (
        "backbone.body.conv1.weight",
        "backbone.fpn.inner_blocks.0.0.weight",
        "rpn.head.cls_logits.weight",
        "rpn.head.bbox_pred.weight",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_trains_and_detects(dtype: torch.dtype) -> None:
    # AMP as training and predict jobs run it (autocast; CPU here, CUDA on a GPU): RoIAlign
    # writes the pooled samples into a buffer of the features' dtype, whatever autocast chose.
    torch.manual_seed(0)
    model = build_mask_rcnn(3, "tiny").train()
    a = scene([(1, 16, 16, 8), (2, 44, 40, 10)])
    with torch.autocast("cpu", dtype=dtype):
        losses = model.losses(a[0][None], [a[1]])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.get_parameter("roi_heads.mask_predictor.mask_fcn_logits.weight").grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        (found,) = model.eval().detect(a[0][None])
    assert found["masks"].shape[1:] == a[0].shape[1:]


def test_train_mode_checks_targets() -> None:
    model = build_mask_rcnn(3, "tiny").train()
    img, t = scene([(1, 16, 16, 8)])
    with pytest.raises(InputError, match="needs targets"):
        model(img[None])
    with pytest.raises(InputError, match="one target per image"):
        model(img[None], [t, t])
    bad = dict(t, labels=torch.tensor([3]))
    with pytest.raises(InputError, match=r"1\.\.2"):
        model(img[None], [bad])
    with pytest.raises(InputError, match="masks"):
        model(img[None, :, :60], [t])


@pytest.mark.parametrize("size", [(64, 64), (70, 45)])
def test_eval_output_contract(size: tuple[int, int]) -> None:
    torch.manual_seed(1)
    model = build_mask_rcnn(4, "tiny").eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, list) and len(out) == 2
    h, w = size
    for det in out:
        d = det["scores"].shape[0]
        assert 0 < d <= 100  # an untrained net scores every class near 1/K > 0.05
        assert det["boxes"].shape == (d, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64
        assert det["masks"].shape == (d, h, w) and det["masks"].dtype == torch.float32
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        assert bool((det["scores"] > 0.05).all())
        assert set(det["labels"].tolist()) <= {1, 2, 3}
        b = det["boxes"]
        assert bool((b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all())
        assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())
        assert bool(((det["masks"] >= 0) & (det["masks"] <= 1)).all())


def test_inference_thresholds_are_settings() -> None:
    torch.manual_seed(1)
    images = torch.randn(1, 3, 64, 64)
    strict = build_mask_rcnn(4, "tiny", box_score_thresh=0.3, box_detections_per_img=5).eval()
    with torch.no_grad():
        det = strict(images)[0]
    assert det["scores"].numel() <= 5 and bool((det["scores"] > 0.3).all())
    # Per-class NMS at 0.5: no two kept boxes of one class overlap by more than 0.5.
    for c in det["labels"].unique():
        b = det["boxes"][det["labels"] == c]
        iou = box_iou(b, b).fill_diagonal_(0)
        assert bool((iou <= 0.5).all())


def test_overfits_two_images(one_thread: None) -> None:
    torch.manual_seed(0)
    a = scene([(1, 16, 16, 8), (2, 44, 40, 10), (1, 48, 12, 6)])
    b = scene([(2, 20, 44, 9), (1, 44, 24, 9)], seed=1)
    images, targets = torch.stack((a[0], b[0])), [a[1], b[1]]
    model = build_mask_rcnn(3, "tiny")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    model.train()
    for _ in range(120):
        losses = model(images, targets)
        assert isinstance(losses, dict)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert np.mean(totals[-10:]) < totals[0] / 8
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, list)
    for det, t in zip(out, targets, strict=True):
        # Every object is found: its best detection of the right class has mask IoU >= 0.5.
        for k in range(t["labels"].numel()):
            same = det["labels"] == t["labels"][k]
            pred = det["masks"][same] >= 0.5
            assert pred.shape[0] > 0
            assert mask_iou(t["masks"][k : k + 1].bool(), pred).max() >= 0.5
