"""Detection operators in plain torch: box IoU, NMS, RoIAlign, box coding, anchors, mask pasting,
proposal matching and sampling, and COCO-style average precision.

These are the pieces of Mask R-CNN (:mod:`tilewise.models.maskrcnn`) that torchvision implements
as compiled kernels; here every one is written with ordinary tensor operations so that it runs
wherever torch runs (torchvision is not a dependency). The rules follow torchvision's reference
implementation (see reference/architectures.md §10):

- Boxes are ``(x1, y1, x2, y2)`` in pixel coordinates with areas ``(x2 - x1) (y2 - y1)`` (no
  ``+ 1``); a box covering columns ``0..w-1`` is ``(0, ., w, .)``.
- :func:`nms` is greedy: boxes in decreasing score order, each kept box suppresses the later boxes
  whose IoU with it is **strictly greater** than the threshold. :func:`batched_nms` runs it per
  class by shifting each class's boxes by ``class × (max coordinate + 1)`` so that boxes of
  different classes never overlap.
- :func:`roi_align` reproduces the caffe2/torchvision kernel, including its border rules, with
  ``grid_sample``: sample points at ``y1 + (i + 0.5) · bin / sr`` in pixel-centre coordinates,
  sampled with ``padding_mode='border'`` and ``align_corners=True`` (which clamps a sample in
  ``[-1, 0]`` to row 0 and one in ``[H - 1, H]`` to row ``H - 1`` as the kernel does), the samples
  outside ``[-1, H] × [-1, W]`` zeroed, then averaged per bin. ``padding_mode='zeros'`` would be
  wrong near the borders.
- :class:`BoxCoder` encodes box deltas ``(dx, dy, dw, dh)`` with weights and clips ``dw, dh`` at
  ``log(1000 / 16)`` before ``exp`` when decoding.
- :class:`AnchorGenerator` centres ``len(ratios)`` anchors per size on every feature position
  ``(j · stride, i · stride)``; ratio is height / width, and the base anchors are rounded to whole
  pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BATCHED_NMS_LOOP_ABOVE",
    "BBOX_XFORM_CLIP",
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "AnchorGenerator",
    "BoxCoder",
    "average_precision",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "detection_ap",
    "greedy_matches",
    "mask_iou",
    "match_proposals",
    "nms",
    "paste_masks",
    "remove_small_boxes",
    "roi_align",
    "sample_balanced",
]

#: Largest ``dw``/``dh`` before ``exp`` when decoding: a box grows at most 1000/16 = 62.5 times.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

#: :func:`batched_nms` runs one NMS per category above this many boxes.
BATCHED_NMS_LOOP_ABOVE = 500

#: :func:`match_proposals` codes for proposals below the low threshold and between the two.
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


# ---------------------------------------------------------------------------------------------
# Boxes


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``(x2 - x1) (y2 - y1)`` of ``(N, 4)`` boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union of ``(N, 4)`` and ``(M, 4)`` xyxy boxes: ``(N, M)``.

    A pair whose union is empty (two degenerate boxes) has IoU 0, not NaN.
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Boxes ``(..., 4)`` clipped to the image ``[0, width] × [0, height]``."""
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the ``(N, 4)`` boxes whose width and height are both at least ``min_size``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((w >= min_size) & (h >= min_size))[0]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Boxes are visited in decreasing score order (a stable sort: equal scores keep their input
    order); a box is kept unless a kept box has IoU **greater than** ``iou_threshold`` with it.

    Args:
        boxes: ``(N, 4)`` xyxy boxes.
        scores: ``(N,)`` scores.
        iou_threshold: suppression threshold.

    Returns:
        ``int64`` indices of the kept boxes, in decreasing score order.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True)[1]
    # The whole IoU matrix at once (fine for the 1-2k boxes of a detector); the greedy pass itself
    # is sequential, so it runs on the CPU over a boolean matrix: one row read per kept box.
    over = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()
    n = over.shape[0]
    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        removed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS per category: boxes of different ``idxs`` never suppress each other.

    Each category's boxes are shifted by ``idx × (coordinate range + 1)``, which puts the
    categories in disjoint regions of the plane, and one :func:`nms` runs over all of them. Above
    :data:`BATCHED_NMS_LOOP_ABOVE` boxes each category gets its own :func:`nms` instead (same
    result: the IoU matrices of the categories are smaller than one matrix over all the boxes).

    Args:
        boxes: ``(N, 4)`` xyxy boxes.
        scores: ``(N,)`` scores.
        idxs: ``(N,)`` integer category of each box (class, image or pyramid level).
        iou_threshold: suppression threshold.

    Returns:
        ``int64`` indices of the kept boxes, in decreasing score order.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] > BATCHED_NMS_LOOP_ABOVE:
        kept = []
        for c in torch.unique(idxs):
            members = torch.where(idxs == c)[0]
            kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
        keep = torch.cat(kept).sort().values  # ties then keep the input order, as below
        return keep[torch.sort(scores[keep], descending=True, stable=True)[1]]
    offsets = idxs.to(boxes) * (boxes.max() - boxes.min().clamp(max=0) + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


# ---------------------------------------------------------------------------------------------
# RoIAlign


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _axis_samples(start: Tensor, bin_size: Tensor, bins: int, grid: int) -> Tensor:
    """``(R, bins · grid)`` sample coordinates along one axis, in the kernel's arithmetic order:
    ``start + p · bin + (i + 0.5) · bin / grid``."""
    k = torch.arange(bins * grid, device=start.device)
    p = (k // grid).to(start.dtype)
    i = (k % grid).to(start.dtype)
    return start[:, None] + p * bin_size[:, None] + (i + 0.5) * bin_size[:, None] / grid


def _roi_align_fixed_grid(
    features: Tensor,
    batch_idx: Tensor,
    y1: Tensor,
    x1: Tensor,
    bin_h: Tensor,
    bin_w: Tensor,
    out_h: int,
    out_w: int,
    grid_h: int,
    grid_w: int,
) -> Tensor:
    """RoIAlign of RoIs that share one sampling grid ``grid_h × grid_w`` per bin."""
    _, C, H, W = features.shape
    ys = _axis_samples(y1, bin_h, out_h, grid_h)  # (R, out_h·grid_h)
    xs = _axis_samples(x1, bin_w, out_w, grid_w)  # (R, out_w·grid_w)
    # The kernel returns 0 for a sample outside [-1, H] × [-1, W] and clamps the rest to the map;
    # grid_sample's border padding does the clamping, the mask the zeroing.
    valid = ((ys >= -1) & (ys <= H))[:, :, None] & ((xs >= -1) & (xs <= W))[:, None, :]
    # align_corners=True: -1 and +1 are the centres of the first and last pixel.
    gy = ys * (2.0 / (H - 1)) - 1 if H > 1 else torch.zeros_like(ys)
    gx = xs * (2.0 / (W - 1)) - 1 if W > 1 else torch.zeros_like(xs)
    R, sh, sw = ys.shape[0], ys.shape[1], xs.shape[1]
    out = features.new_empty(R, C, out_h, out_w)
    for b in torch.unique(batch_idx).tolist():
        # One grid_sample per image with its RoIs' grids stacked along the rows: no per-RoI copy
        # of the feature map.
        sel = torch.where(batch_idx == b)[0]
        grid = torch.stack(
            (gx[sel][:, None, :].expand(-1, sh, -1), gy[sel][:, :, None].expand(-1, -1, sw)),
            dim=-1,
        ).reshape(1, sel.numel() * sh, sw, 2)
        sampled = F.grid_sample(
            features[b : b + 1], grid, mode="bilinear", padding_mode="border", align_corners=True
        ).view(C, sel.numel(), sh, sw)
        sampled = sampled.transpose(0, 1) * valid[sel][:, None].to(sampled.dtype)
        # Under autocast the pooled samples may come out in another dtype than ``out``.
        out[sel] = F.avg_pool2d(sampled, kernel_size=(grid_h, grid_w)).to(out.dtype)
    return out


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (He et al., Mask R-CNN) with the caffe2/torchvision kernel's exact rules.

    Each RoI is divided into ``output_size`` bins; a bin's value is the mean of
    ``sampling_ratio²`` bilinear samples at the centres of a regular sub-grid of the bin.

    Args:
        features: ``(N, C, H, W)`` feature maps.
        rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image coordinates.
        output_size: bins per RoI, ``(height, width)`` or one int for both.
        spatial_scale: feature pixels per image pixel (1/4 for a stride-4 map).
        sampling_ratio: sample points per bin and axis; ``0`` (or less) is the adaptive rule
            ``ceil(roi size / bins)`` per RoI and axis (torchvision's ``-1``, Detectron2's ``0``).
        aligned: shift the RoI by -0.5 feature pixel (pixel-centre convention, Detectron2's
            ``ROIAlignV2``); ``False`` is torchvision's Mask R-CNN, which also widens RoIs
            smaller than one feature pixel to one.

    Returns:
        ``(R, C, out_h, out_w)`` features, differentiable with respect to ``features``.
    """
    out_h, out_w = _pair(output_size)
    N, C = features.shape[:2]
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be (R, 5) [batch_index, x1, y1, x2, y2]; got {tuple(rois.shape)}"
        )
    R = rois.shape[0]
    if R == 0:
        return features.new_zeros(0, C, out_h, out_w)
    rois = rois.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    batch_idx = rois[:, 0].round().long()
    if int(batch_idx.min()) < 0 or int(batch_idx.max()) >= N:
        raise ValueError(
            f"roi batch indices must lie in [0, {N - 1}] for {N} feature maps; got "
            f"{int(batch_idx.min())}..{int(batch_idx.max())}"
        )
    if sampling_ratio > 0:
        return _roi_align_fixed_grid(
            features, batch_idx, y1, x1, bin_h, bin_w, out_h, out_w, sampling_ratio, sampling_ratio
        )
    # Adaptive: the kernel's ceil(roi / bins) per RoI and axis. RoIs are grouped by their grid
    # so that each group is one vectorised call; an empty grid (a non-positive aligned RoI)
    # averages no sample and gives 0, as the kernel's count = max(grid_h · grid_w, 1) does.
    grids = torch.stack((torch.ceil(roi_h / out_h), torch.ceil(roi_w / out_w)), dim=1)
    grids = grids.clamp(min=0).long()
    out = features.new_zeros(R, C, out_h, out_w)
    for gh, gw in torch.unique(grids, dim=0).tolist():
        if gh <= 0 or gw <= 0:
            continue
        sel = torch.where((grids[:, 0] == gh) & (grids[:, 1] == gw))[0]
        out[sel] = _roi_align_fixed_grid(
            features, batch_idx[sel], y1[sel], x1[sel], bin_h[sel], bin_w[sel], out_h, out_w, gh, gw
        )
    return out


# ---------------------------------------------------------------------------------------------
# Box coding and anchors


class BoxCoder:
    """Box deltas relative to reference boxes (R-CNN's parametrisation).

    ``dx = wx (gx - rx) / rw``, ``dy = wy (gy - ry) / rh``, ``dw = ww log(gw / rw)``,
    ``dh = wh log(gh / rh)`` with ``(rx, ry)`` and ``(gx, gy)`` the box centres. Decoding divides
    by the weights and clips ``dw, dh`` at ``clip`` (``log(1000/16)``) so that ``exp`` cannot
    overflow. The RPN uses weights ``(1, 1, 1, 1)``, the box head ``(10, 10, 5, 5)``.
    """

    def __init__(
        self, weights: tuple[float, float, float, float], clip: float = BBOX_XFORM_CLIP
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """Deltas ``(N, 4)`` that take the ``reference`` boxes ``(N, 4)`` to ``boxes`` (N, 4)."""
        wx, wy, ww, wh = self.weights
        rw = reference[:, 2] - reference[:, 0]
        rh = reference[:, 3] - reference[:, 1]
        rx = reference[:, 0] + 0.5 * rw
        ry = reference[:, 1] + 0.5 * rh
        gw = boxes[:, 2] - boxes[:, 0]
        gh = boxes[:, 3] - boxes[:, 1]
        gx = boxes[:, 0] + 0.5 * gw
        gy = boxes[:, 1] + 0.5 * gh
        return torch.stack(
            (
                wx * (gx - rx) / rw,
                wy * (gy - ry) / rh,
                ww * torch.log(gw / rw),
                wh * torch.log(gh / rh),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes from deltas.

        Args:
            deltas: ``(N, 4 K)`` deltas, ``K`` boxes per reference (class-specific regression).
            reference: ``(N, 4)`` reference boxes (anchors or proposals).

        Returns:
            ``(N, K, 4)`` xyxy boxes (``K = 1`` for plain ``(N, 4)`` deltas).
        """
        wx, wy, ww, wh = self.weights
        d = deltas.reshape(deltas.shape[0], -1, 4)
        reference = reference.to(d.dtype)
        w = (reference[:, 2] - reference[:, 0])[:, None]
        h = (reference[:, 3] - reference[:, 1])[:, None]
        cx = reference[:, 0][:, None] + 0.5 * w
        cy = reference[:, 1][:, None] + 0.5 * h
        dx, dy = d[..., 0] / wx, d[..., 1] / wy
        dw = (d[..., 2] / ww).clamp(max=self.clip)
        dh = (d[..., 3] / wh).clamp(max=self.clip)
        px, py = dx * w + cx, dy * h + cy
        pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
        return torch.stack((px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph), dim=2)


class AnchorGenerator:
    """Anchors of a feature pyramid: one size per level, several aspect ratios.

    At every position ``(i, j)`` of a level of stride ``s`` sit ``len(aspect_ratios)`` anchors
    centred on ``(j s, i s)`` with area ``size²`` and height / width = ratio; their half-sizes are
    rounded to whole pixels (torchvision's base anchors). Anchors are ordered position-major,
    ratio-minor, which is the order of a head's ``(N, A, H, W)`` output permuted to
    ``(N, H, W, A)``.

    Args:
        sizes: anchor size per level (Mask R-CNN: 32, 64, 128, 256, 512 on P2..P6).
        aspect_ratios: height / width ratios (0.5, 1, 2).
    """

    def __init__(
        self,
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)

    @property
    def num_anchors(self) -> int:
        """Anchors per position (``A``)."""
        return len(self.aspect_ratios)

    def base_anchors(self, size: float) -> Tensor:
        """``(A, 4)`` anchors of one size centred on the origin (float32)."""
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws, hs = w_ratios * size, h_ratios * size
        return (torch.stack((-ws, -hs, ws, hs), dim=1) / 2).round()

    def __call__(
        self,
        grid_sizes: Sequence[tuple[int, int]],
        strides: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """Anchors per level.

        Args:
            grid_sizes: ``(H, W)`` of each level's feature map.
            strides: input pixels per feature pixel of each level.
            device: where to build them.

        Returns:
            One ``(H · W · A, 4)`` float32 tensor per level.
        """
        if not len(grid_sizes) == len(strides) == len(self.sizes):
            raise ValueError(
                f"{len(self.sizes)} anchor sizes need as many levels; got {len(grid_sizes)} grid "
                f"sizes and {len(strides)} strides"
            )
        out = []
        for (h, w), stride, size in zip(grid_sizes, strides, self.sizes, strict=True):
            base = self.base_anchors(size).to(device)
            sy = torch.arange(h, dtype=torch.float32, device=device) * stride
            sx = torch.arange(w, dtype=torch.float32, device=device) * stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)
            out.append((shifts + base[None]).reshape(-1, 4))
        return out


# ---------------------------------------------------------------------------------------------
# Masks


def _paste_weights(lo: Tensor, hi: Tensor, m: int, n: int) -> Tensor:
    """``(R, n, m)`` bilinear interpolation weights from ``m`` mask cells spanning ``[lo, hi]``
    to the ``n`` image pixels, sampled at the pixel centres; cells outside the mask weigh 0."""
    centres = torch.arange(n, dtype=lo.dtype, device=lo.device) + 0.5
    # Mask cell k covers [lo + k·step, lo + (k+1)·step]; its value sits on its centre.
    u = (centres[None, :] - lo[:, None]) / (hi - lo).clamp(min=1e-6)[:, None] * m - 0.5
    k0 = torch.floor(u)
    frac = u - k0
    cells = torch.arange(m, dtype=lo.dtype, device=lo.device)
    return (cells == k0[..., None]) * (1 - frac)[..., None] + (cells == k0[..., None] + 1) * frac[
        ..., None
    ]


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Paste ``M × M`` mask probabilities into the image frame, each into its box.

    A pixel's value is the bilinear interpolation of the mask at the pixel's centre, the mask's
    cells spanning the box evenly, with zeros beyond the mask's edge (``grid_sample`` with
    ``align_corners=False`` and zero padding, as Detectron2 pastes). Bilinear sampling of an
    axis-aligned box is separable, so each paste is ``Wy · mask · Wxᵀ``.

    Args:
        masks: ``(R, M, M)`` (or ``(R, Mh, Mw)``) probabilities.
        boxes: ``(R, 4)`` xyxy boxes in image pixels.
        height: image height.
        width: image width.

    Returns:
        ``(R, height, width)`` probabilities, 0 outside the boxes.
    """
    if masks.ndim != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(
            f"paste_masks takes (R, M, M) masks and (R, 4) boxes; got {tuple(masks.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    if masks.shape[0] == 0:
        return masks.new_zeros(0, height, width)
    boxes = boxes.to(masks.dtype)
    wy = _paste_weights(boxes[:, 1], boxes[:, 3], masks.shape[1], height)  # (R, H, Mh)
    wx = _paste_weights(boxes[:, 0], boxes[:, 2], masks.shape[2], width)  # (R, W, Mw)
    return wy @ masks @ wx.transpose(1, 2)


def mask_iou(masks1: Tensor, masks2: Tensor) -> Tensor:
    """Pairwise IoU ``(N, M)`` of binary masks ``(N, H, W)`` and ``(M, H, W)`` (0 when both are
    empty)."""
    a = masks1.flatten(1).to(torch.float32)
    b = masks2.flatten(1).to(torch.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), 0.0)


# ---------------------------------------------------------------------------------------------
# Training-time assignment


def match_proposals(
    quality: Tensor, high: float, low: float, allow_low_quality_matches: bool
) -> Tensor:
    """Assign each proposal (column) to its best ground-truth box (row) of an IoU matrix.

    Args:
        quality: ``(G, P)`` IoU between ``G`` ground-truth boxes and ``P`` proposals.
        high: a proposal whose best IoU is at least ``high`` is matched.
        low: below ``low`` it is background (:data:`BELOW_LOW_THRESHOLD`); in ``[low, high)`` it
            is ignored (:data:`BETWEEN_THRESHOLDS`).
        allow_low_quality_matches: also match, for every ground-truth box, the proposals that
            have the highest IoU with it (ties included) even under ``high``, so that every box
            gets at least one match (the RPN's rule).

    Returns:
        ``(P,)`` int64: the matched row, or one of the two negative codes.
    """
    P = quality.shape[1]
    if quality.shape[0] == 0:
        return torch.full((P,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=quality.device)
    best, matches = quality.max(dim=0)
    original = matches.clone()
    matches[best < low] = BELOW_LOW_THRESHOLD
    matches[(best >= low) & (best < high)] = BETWEEN_THRESHOLDS
    if allow_low_quality_matches:
        best_per_gt = quality.max(dim=1).values
        cols = torch.where(quality == best_per_gt[:, None])[1]
        matches[cols] = original[cols]
    return matches


def sample_balanced(
    labels: Tensor,
    batch_size: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw at most ``batch_size`` examples, at most ``positive_fraction`` of them positive.

    Args:
        labels: ``(P,)`` ``>= 1`` positive, ``0`` negative, ``-1`` ignored.
        batch_size: examples per image.
        positive_fraction: the largest share of positives; negatives fill the rest.
        generator: random source of the draw.

    Returns:
        ``(positive indices, negative indices)``, int64.
    """
    pos = torch.where(labels >= 1)[0]
    neg = torch.where(labels == 0)[0]
    n_pos = min(int(batch_size * positive_fraction), pos.numel())
    n_neg = min(batch_size - n_pos, neg.numel())
    pick_pos = torch.randperm(pos.numel(), generator=generator)[:n_pos].to(pos.device)
    pick_neg = torch.randperm(neg.numel(), generator=generator)[:n_neg].to(neg.device)
    return pos[pick_pos], neg[pick_neg]


# ---------------------------------------------------------------------------------------------
# Evaluation: COCO-style average precision at one IoU threshold


def average_precision(scores: Tensor, is_tp: Tensor, num_gt: int) -> float:
    """COCO's 101-point interpolated average precision of one class.

    Detections are ranked by decreasing score (stable); precision is made non-increasing in recall
    (the envelope), read at recalls ``0, 0.01, ..., 1`` (the first rank reaching each recall; 0
    where none does) and averaged.

    Args:
        scores: ``(D,)`` scores of all detections of the class over all images.
        is_tp: ``(D,)`` bool, whether each detection matched a ground-truth object.
        num_gt: ground-truth objects of the class (must be positive).

    Returns:
        AP in ``[0, 1]``.
    """
    if num_gt <= 0:
        raise ValueError(f"average precision needs at least one ground-truth object; got {num_gt}")
    order = np.argsort(-scores.detach().cpu().numpy(), kind="mergesort")
    tp = is_tp.detach().cpu().numpy().astype(bool)[order]
    tps = np.cumsum(tp, dtype=np.float64)
    fps = np.cumsum(~tp, dtype=np.float64)
    recall = tps / num_gt
    precision = tps / np.maximum(tps + fps, np.spacing(1))
    # The envelope: the best precision at this or any higher recall.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    if not precision.size:
        return 0.0
    thresholds = np.linspace(0.0, 1.0, 101)
    at = np.searchsorted(recall, thresholds, side="left")
    values = np.where(at < precision.size, precision[np.minimum(at, precision.size - 1)], 0.0)
    return float(values.mean())


def greedy_matches(iou: Tensor, iou_threshold: float) -> Tensor:
    """(D,) bool: which detections (rows of ``iou``, by falling score) are true positives,
    COCO-style: each takes the unmatched ground-truth object (column) it overlaps most, at
    least ``iou_threshold``."""
    d, g = iou.shape
    matched = np.zeros(g, dtype=bool)
    tp = torch.zeros(d, dtype=torch.bool)
    for i in range(d):
        best, m = iou_threshold, -1
        for j in range(g):
            if matched[j] or iou[i, j] < best:
                continue
            best, m = float(iou[i, j]), j
        if m >= 0:
            matched[m] = True
            tp[i] = True
    return tp


def detection_ap(
    predictions: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    *,
    iou_type: Literal["box", "mask"] = "box",
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    mask_threshold: float = 0.5,
) -> dict[int, float]:
    """COCO-style AP per class at one IoU threshold (no crowd regions, all areas).

    Per image and class, detections are matched greedily in decreasing score order, each to the
    unmatched ground-truth object of highest IoU if that IoU is at least ``iou_threshold``; then
    :func:`average_precision` over all images.

    Args:
        predictions: per image ``scores (D,)``, ``labels (D,)`` and ``boxes (D, 4)`` or ``masks
            (D, H, W)`` (probabilities, binarised at ``mask_threshold``, or bool).
        targets: per image ``labels (G,)`` and ``boxes (G, 4)`` or ``masks (G, H, W)``.
        iou_type: compare ``"box"`` or ``"mask"``.
        iou_threshold: the IoU a match needs (0.5 for AP50).
        max_detections: detections kept per image (the highest scores).
        mask_threshold: where predicted mask probabilities are binarised.

    Returns:
        ``{class: AP}`` for every class with at least one ground-truth object; their mean is the
        mean AP.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    key = "boxes" if iou_type == "box" else "masks"
    per_class: dict[int, tuple[list[Tensor], list[Tensor], int]] = {}
    for pred, tgt in zip(predictions, targets, strict=True):
        order = torch.sort(pred["scores"], descending=True, stable=True)[1][:max_detections]
        scores, labels, items = pred["scores"][order], pred["labels"][order], pred[key][order]
        if iou_type == "mask" and items.dtype != torch.bool:
            items = items >= mask_threshold
        classes = set(labels.tolist()) | set(tgt["labels"].tolist())
        for c in classes:
            d = torch.where(labels == c)[0]
            g = torch.where(tgt["labels"] == c)[0]
            iou = (box_iou if iou_type == "box" else mask_iou)(items[d], tgt[key][g])
            tp = greedy_matches(iou, iou_threshold)
            s, t, n = per_class.get(c, ([], [], 0))
            per_class[c] = ([*s, scores[d].cpu()], [*t, tp], n + g.numel())
    return {
        c: average_precision(torch.cat(s), torch.cat(t), n)
        for c, (s, t, n) in sorted(per_class.items())
        if n > 0
    }
