"""The detection operators against literal, loop-by-loop implementations written here.

RoIAlign is compared with a direct port of the caffe2/torchvision CPU kernel (per RoI, per bin, per
sample point, with its ``bilinear_interpolate`` border rules); NMS with a brute-force greedy NMS;
mask pasting with ``grid_sample`` applied mask by mask; AP with hand-worked rankings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tilewise.models.detection import (
    BATCHED_NMS_LOOP_ABOVE,
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    AnchorGenerator,
    BoxCoder,
    average_precision,
    batched_nms,
    box_iou,
    detection_ap,
    mask_iou,
    match_proposals,
    nms,
    paste_masks,
    roi_align,
    sample_balanced,
)

# ---------------------------------------------------------------------------------------------
# RoIAlign: the reference kernel, literally


def bilinear_interpolate(fmap: np.ndarray, y: float, x: float) -> np.ndarray:
    """caffe2/torchvision ``bilinear_interpolate`` for one point of a (C, H, W) map."""
    _, height, width = fmap.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fmap.shape[0])
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[:, y_low, x_low]
        + hy * lx * fmap[:, y_low, x_high]
        + ly * hx * fmap[:, y_high, x_low]
        + ly * lx * fmap[:, y_high, x_high]
    )


def roi_align_reference(
    features: np.ndarray,
    rois: np.ndarray,
    pooled: tuple[int, int],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> np.ndarray:
    """The kernel's loops: per RoI, per output bin, per sample point."""
    ph_n, pw_n = pooled
    out = np.zeros((rois.shape[0], features.shape[1], ph_n, pw_n))
    offset = 0.5 if aligned else 0.0
    for r, roi in enumerate(rois):
        fmap = features[int(roi[0])]
        start_w, start_h = roi[1] * scale - offset, roi[2] * scale - offset
        end_w, end_h = roi[3] * scale - offset, roi[4] * scale - offset
        roi_w, roi_h = end_w - start_w, end_h - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph_n)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw_n)
        count = max(grid_h * grid_w, 1)
        for ph in range(ph_n):
            for pw in range(pw_n):
                acc = np.zeros(features.shape[1])
                for iy in range(grid_h):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc += bilinear_interpolate(fmap, y, x)
                out[r, :, ph, pw] = acc / count
    return out


def random_rois(rng: np.random.Generator, n: int, batch: int, h: float, w: float) -> np.ndarray:
    """RoIs inside, straddling and fully outside an ``h × w`` image, some sub-pixel."""
    rows = []
    for k in range(n):
        kind = k % 4
        if kind == 0:  # inside
            x1, y1 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
            x2, y2 = rng.uniform(x1, w), rng.uniform(y1, h)
        elif kind == 1:  # straddling a border
            x1, y1 = rng.uniform(-0.5 * w, w), rng.uniform(-0.5 * h, h)
            x2, y2 = x1 + rng.uniform(1, w), y1 + rng.uniform(1, h)
        elif kind == 2:  # fully outside (beyond the last row/column, or before the first)
            if rng.random() < 0.5:
                x1, y1 = rng.uniform(w + 2, 1.5 * w), rng.uniform(0, h)
            else:
                x1, y1 = rng.uniform(-1.5 * w, -w), rng.uniform(-1.5 * h, -h)
            x2, y2 = x1 + rng.uniform(1, w / 2), y1 + rng.uniform(1, h / 2)
        else:  # tiny, possibly sub-pixel at scale 0.25
            x1, y1 = rng.uniform(-2, w), rng.uniform(-2, h)
            x2, y2 = x1 + rng.uniform(0, 3), y1 + rng.uniform(0, 3)
        rows.append((rng.integers(batch), x1, y1, x2, y2))
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3, 0])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_roi_align_matches_the_reference_kernel(
    aligned: bool, sampling_ratio: int, scale: float
) -> None:
    rng = np.random.default_rng(1000 * sampling_ratio + int(aligned) + int(4 * scale))
    feats = rng.standard_normal((2, 3, 7, 9))
    img_h, img_w = 7 / scale, 9 / scale
    rois = random_rois(rng, 24, 2, img_h, img_w)
    expected = roi_align_reference(feats, rois, (3, 4), scale, sampling_ratio, aligned)
    got = roi_align(
        torch.from_numpy(feats),
        torch.from_numpy(rois),
        (3, 4),
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    # The cases are not vacuous: some RoIs lie fully outside (all zero), most do not.
    zero = np.all(expected == 0, axis=(1, 2, 3))
    assert 0 < zero.sum() < len(rois) // 2


def test_roi_align_float32_and_edge_rois() -> None:
    rng = np.random.default_rng(7)
    feats = rng.standard_normal((1, 2, 5, 6)).astype(np.float32)
    # Exactly on the borders, -1 and H (the kernel's limits), a degenerate RoI, the whole map.
    rois = np.array(
        [
            [0, -1.0, -1.0, 6.0, 5.0],
            [0, 0.0, 0.0, 6.0, 5.0],
            [0, 5.0, 4.0, 6.0, 5.0],
            [0, 2.0, 2.0, 2.0, 2.0],
            [0, -1.5, -1.5, -1.0, -1.0],
            [0, 5.9, 4.9, 7.0, 6.0],
        ]
    )
    for aligned in (False, True):
        expected = roi_align_reference(feats.astype(np.float64), rois, (2, 2), 1.0, 2, aligned)
        got = roi_align(torch.from_numpy(feats), torch.from_numpy(rois).float(), 2, 1.0, 2, aligned)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


def test_roi_align_zero_padding_would_be_wrong() -> None:
    # The reason for border padding: a constant map stays constant up to the kernel's limits.
    feats = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    # Samples from -0.47 to 3.87: all inside [-1, H], several outside the pixel centres [0, 3].
    rois = torch.tensor([[0, -0.9, -0.9, 4.3, 4.3]], dtype=torch.float64)
    got = roi_align(feats, rois, 3, 1.0, 2, False)
    torch.testing.assert_close(got, torch.ones(1, 1, 3, 3, dtype=torch.float64))


def test_roi_align_gradient() -> None:
    feats = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 3.9], [1, -0.6, 1.1, 2.5, 5.4]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, 2, 1.0, 2, True), (feats,))


def test_roi_align_rejects_bad_batch_index() -> None:
    with pytest.raises(ValueError, match="batch indices"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[1.0, 0, 0, 2, 2]]), 2)


# ---------------------------------------------------------------------------------------------
# IoU and NMS


def iou_pair(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_nms(boxes: list[list[float]], scores: list[float], thr: float) -> list[int]:
    """Greedy NMS, as in the paper: take the best remaining box, drop those overlapping it."""
    remaining = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = []
    while remaining:
        best = remaining.pop(0)
        keep.append(best)
        remaining = [i for i in remaining if iou_pair(boxes[best], boxes[i]) <= thr]
    return keep


def random_boxes(rng: np.random.Generator, n: int, size: float = 50.0) -> torch.Tensor:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return torch.from_numpy(np.concatenate((xy, xy + wh), axis=1))


def test_box_iou_matches_pairwise() -> None:
    rng = np.random.default_rng(3)
    a, b = random_boxes(rng, 13), random_boxes(rng, 9)
    got = box_iou(a, b)
    for i in range(13):
        for j in range(9):
            assert got[i, j].item() == pytest.approx(iou_pair(a[i].tolist(), b[j].tolist()))
    # Hand-worked: two unit-offset 2×2 squares share 1 px of 7.
    sq = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3]])
    assert box_iou(sq, sq)[0, 1].item() == pytest.approx(1 / 7)


def test_nms_equals_brute_force_greedy() -> None:
    rng = np.random.default_rng(11)
    for case in range(120):
        n = int(rng.integers(0, 60))
        boxes = random_boxes(rng, n, size=60.0)
        scores = torch.from_numpy(rng.permutation(n) + rng.uniform(0, 0.5, n))  # no ties
        thr = float(rng.choice([0.3, 0.5, 0.7]))
        got = nms(boxes, scores, thr).tolist()
        expected = brute_nms(boxes.tolist(), scores.tolist(), thr)
        assert got == expected, case
    # Suppression is strict: IoU exactly at the threshold keeps the box.
    rect = torch.tensor([[0.0, 0, 3, 1], [1, 0, 4, 1]])  # IoU 2/4, exact in binary
    assert nms(rect, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(rect, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]


def test_batched_nms_equals_per_class_brute_force() -> None:
    rng = np.random.default_rng(12)
    for case in range(122):
        # The last two cases take the per-category path (more than BATCHED_NMS_LOOP_ABOVE boxes).
        n = int(rng.integers(1, 60)) if case < 120 else BATCHED_NMS_LOOP_ABOVE + 100
        boxes = random_boxes(rng, n, size=40.0 if case < 120 else 200.0)
        scores = torch.from_numpy(rng.permutation(n) + rng.uniform(0, 0.5, n))
        idxs = torch.from_numpy(rng.integers(0, 4, n))
        got = batched_nms(boxes, scores, idxs, 0.5).tolist()
        kept = []
        for c in range(4):
            members = [i for i in range(n) if idxs[i] == c]
            sub = brute_nms(
                [boxes[i].tolist() for i in members], [scores[i].item() for i in members], 0.5
            )
            kept += [members[k] for k in sub]
        expected = sorted(kept, key=lambda i: -scores[i].item())
        assert got == expected, case
    # The class offset also separates classes when boxes have negative coordinates.
    boxes = torch.tensor([[-10.0, -10, -2, -2], [-10, -10, -2, -2]])
    assert batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist() == [
        0,
        1,
    ]


# ---------------------------------------------------------------------------------------------
# Box coding and anchors


def test_box_coder_round_trip_and_hand_values() -> None:
    rng = np.random.default_rng(5)
    ref, boxes = random_boxes(rng, 50), random_boxes(rng, 50)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        coder = BoxCoder(weights)
        back = coder.decode(coder.encode(boxes, ref), ref)
        assert back.shape == (50, 1, 4)
        torch.testing.assert_close(back[:, 0], boxes, rtol=0, atol=1e-9)
    # Reference (0, 0, 10, 10) -> (5, 5, 25, 15): centre moves (10, 5), width ×2, height ×1.
    d = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(
        torch.tensor([[5.0, 5, 25, 15]]), torch.tensor([[0.0, 0, 10, 10]])
    )
    torch.testing.assert_close(d, torch.tensor([[10.0, 5.0, 5 * math.log(2), 0.0]]))
    # dw is clipped at log(1000/16) before exp: a box grows at most 62.5 times.
    big = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(
        torch.tensor([[0.0, 0, 100, 100]]), torch.tensor([[0.0, 0, 1, 1]])
    )
    assert big[0, 0, 2] - big[0, 0, 0] == pytest.approx(62.5)


def test_anchor_count_centres_and_shapes() -> None:
    gen = AnchorGenerator(sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0))
    levels = gen([(4, 5), (2, 3)], [4, 8])
    assert [a.shape for a in levels] == [(4 * 5 * 3, 4), (2 * 3 * 3, 4)]
    for anchors, (h, w), stride in zip(levels, [(4, 5), (2, 3)], [4, 8], strict=True):
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        # Position-major, ratio-minor: anchor k sits on position k // 3 of the row-major grid.
        pos = torch.arange(h * w).repeat_interleave(3)
        torch.testing.assert_close(centres[:, 0], (pos % w).float() * stride)
        torch.testing.assert_close(centres[:, 1], (pos // w).float() * stride)
    # Hand-worked base anchors of size 32: ratio 0.5 is 45.25 wide and 22.6 high -> ±23, ±11.
    base = gen.base_anchors(32)
    torch.testing.assert_close(
        base, torch.tensor([[-23.0, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])
    )


# ---------------------------------------------------------------------------------------------
# Mask pasting and mask IoU


def paste_by_grid_sample(masks: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One ``grid_sample`` per mask over the whole image (align_corners=False, zero padding)."""
    out = []
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tolist(), strict=True):
        xs = ((torch.arange(w, dtype=torch.float64) + 0.5 - x1) / (x2 - x1)) * 2 - 1
        ys = ((torch.arange(h, dtype=torch.float64) + 0.5 - y1) / (y2 - y1)) * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]
        out.append(F.grid_sample(m[None, None], grid, align_corners=False)[0, 0])
    return torch.stack(out)


def test_paste_masks_matches_grid_sample() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 28, 28, generator=g, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [3.2, 4.7, 30.5, 22.1],
            [-5.0, -3.0, 12.0, 40.0],  # partly outside
            [50.0, 10.0, 70.0, 35.0],  # past the right edge
            [10.0, 10.0, 11.5, 12.0],  # smaller than a pixel pair
            [0.0, 0.0, 64.0, 48.0],  # the whole image
            [20.0, 5.0, 48.0, 33.0],  # 28 px: one cell per pixel
        ],
        dtype=torch.float64,
    )
    got = paste_masks(masks, boxes, 48, 64)
    torch.testing.assert_close(got, paste_by_grid_sample(masks, boxes, 48, 64))
    # Hand-worked: a 28 px box on whole pixels reproduces the mask exactly, zeros around it.
    torch.testing.assert_close(got[5, 5:33, 20:48], masks[5])
    assert got[5].sum().item() == pytest.approx(masks[5].sum().item())


def test_mask_iou_hand_case() -> None:
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # 4 px
    a[1, :, :] = True  # 16 px
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    b[0, :2, :] = True  # 8 px
    torch.testing.assert_close(mask_iou(a, b), torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


# ---------------------------------------------------------------------------------------------
# Matching and sampling


def test_match_proposals_thresholds_and_low_quality() -> None:
    # 2 ground-truth boxes × 5 proposals.
    iou = torch.tensor([[0.8, 0.5, 0.1, 0.2, 0.0], [0.1, 0.2, 0.25, 0.6, 0.25]])
    m = match_proposals(iou, 0.7, 0.3, allow_low_quality_matches=False)
    assert m.tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, -1]
    assert BELOW_LOW_THRESHOLD == -1
    # Box 1's best proposal (3, IoU 0.6) is matched anyway; box 0's best is already matched.
    m = match_proposals(iou, 0.7, 0.3, allow_low_quality_matches=True)
    assert m.tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, 1, BELOW_LOW_THRESHOLD]
    # No ground truth: everything is background.
    assert match_proposals(torch.zeros(0, 3), 0.5, 0.5, False).tolist() == [-1, -1, -1]


def test_sample_balanced_counts() -> None:
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 20)
    g = torch.Generator().manual_seed(0)
    pos, neg = sample_balanced(labels, 64, 0.25, g)
    assert len(pos) == 10 and len(neg) == 54  # few positives: negatives fill the batch
    assert bool((labels[pos] == 1).all()) and bool((labels[neg] == 0).all())
    assert len(set(neg.tolist())) == 54
    pos, neg = sample_balanced(labels, 16, 0.25, g)
    assert (len(pos), len(neg)) == (4, 12)


# ---------------------------------------------------------------------------------------------
# Average precision


def test_average_precision_hand_worked() -> None:
    # 2 objects; ranked TP, FP, TP: recall 0.5 at precision 1, recall 1 at precision 2/3.
    # 101 points: r = 0..0.5 (51 points) read 1, r = 0.51..1 (50 points) read 2/3.
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True]), 2)
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)
    # The envelope: FP, TP ranks still read precision 1/2 at every recall up to 1.
    assert average_precision(torch.tensor([0.9, 0.8]), torch.tensor([False, True]), 1) == (
        pytest.approx(0.5)
    )
    # Half the objects never found: recalls above 0.5 read 0.
    assert average_precision(torch.tensor([0.9]), torch.tensor([True]), 2) == pytest.approx(
        51 / 101
    )
    assert average_precision(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 3) == 0.0


def test_detection_ap_two_images() -> None:
    gt = [
        {
            "labels": torch.tensor([1, 1]),
            "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
        },
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.0, 0, 10, 10]])},
    ]
    pred = [
        {
            # 0.9: a duplicate of object 0 (FP once object 0 is taken by 0.95), 0.95: object 0,
            # 0.6: object 1 at IoU 81/109; 0.99: a class-2 box where there is none (an FP).
            "scores": torch.tensor([0.9, 0.95, 0.6, 0.99]),
            "labels": torch.tensor([1, 1, 1, 2]),
            "boxes": torch.tensor(
                [[0.0, 0, 10, 10], [0.5, 0, 10, 10], [21, 20, 31, 29], [20, 20, 30, 30]]
            ),
        },
        {
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([2]),
            "boxes": torch.tensor([[0.0, 0, 10, 4]]),
        },
    ]
    ap = detection_ap(pred, gt, iou_type="box", iou_threshold=0.5)
    # Class 1 ranks TP (0.95), FP (0.9), TP (0.6): the hand-worked case above.
    assert ap[1] == pytest.approx((51 + 50 * 2 / 3) / 101)
    # Class 2: an FP (0.99) and a box of IoU 0.4 (FP): AP 0.
    assert ap[2] == 0.0
    # At IoU 0.3 the 0.5 box of image 2 matches: FP then TP, precision 1/2 everywhere.
    assert detection_ap(pred, gt, iou_threshold=0.3)[2] == pytest.approx(0.5)
