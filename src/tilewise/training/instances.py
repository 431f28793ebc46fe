"""Training an instance architecture (Mask R-CNN): patch targets and validation by AP.

An instance shard (:mod:`tilewise.training.shards`) gives each patch as an image and an (h, w)
map of object ids. :func:`patch_target` turns the map into what
:meth:`tilewise.models.maskrcnn.MaskRCNN.losses` takes (boxes, labels, masks, via
:func:`~tilewise.models.maskrcnn.targets_from_instances`), with one rule for objects that the
patch border cuts (see :data:`MIN_CUT_OBJECT_PIXELS`).

Validation (:func:`validate_instances`) cuts every held-out shard into windows of
``validation.tile`` px (the last row and column of windows shorter where the shard does not
divide), runs :meth:`~tilewise.models.maskrcnn.MaskRCNN.detect` on each window whole, and
compares its detections with the ground truth cut to the same window (by the same rule as the
patches). The score is COCO-style AP at IoU 0.5 for masks and for boxes, with the matching of
:func:`tilewise.models.detection.detection_ap`. A shard may be far larger than memory, so the
windows' detections are not collected for one ``detection_ap`` call: :class:`APCounter` matches
them window by window as ``detection_ap`` does per image (greedy, decreasing score, the
unmatched object of highest IoU) and keeps only each detection's score and whether it matched;
:func:`~tilewise.models.detection.average_precision` gives the AP at the end. A window is to
the counter what an image is to ``detection_ap``, so both give the same figures for the same
windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from tilewise.models.detection import average_precision, box_iou, greedy_matches, mask_iou
from tilewise.models.maskrcnn import targets_from_instances
from tilewise.training.shards import ObjectClasses

__all__ = [
    "DEFAULT_VALIDATION_TILE",
    "INSTANCE_METRICS",
    "LOSS_NAMES",
    "MIN_CUT_OBJECT_PIXELS",
    "APCounter",
    "patch_target",
    "validate_instances",
    "windows",
]

#: An object that touches the border of a patch (or validation window) is kept in the target
#: when at least this many of its pixels are inside; objects wholly inside are always kept,
#: however small. Why: a few pixels of an object cut by the border are a box one or two pixels
#: wide, smaller than any anchor (16 px for mask_rcnn_tiny, 32 for R50-FPN), whose mask target
#: is noise; kept, they teach the RPN to fire on slivers at every window edge. Larger parts are
#: kept because prediction windows cut objects too (the instance stage merges the pieces) and
#: the network must find a partly visible object. 16 px is a 4x4 corner: a fifth of a 10 px
#: nucleus, a sliver of anything larger.
MIN_CUT_OBJECT_PIXELS = 16

#: Side of the validation windows when ``validation.tile`` is null.
DEFAULT_VALIDATION_TILE = 256

#: The validation scores of an instance architecture, reported as ``val_<name>``.
INSTANCE_METRICS = ("mask_ap50", "box_ap50")

#: Mask R-CNN's five training losses, logged beside their sum ``loss``.
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
              "loss_mask")  # fmt: skip


def patch_target(
    ids: np.ndarray, objects: ObjectClasses, min_cut_pixels: int = MIN_CUT_OBJECT_PIXELS
) -> dict[str, Tensor]:
    """The Mask R-CNN target of a patch of object ids (0 = background).

    Objects touching the patch border with fewer than ``min_cut_pixels`` pixels inside are
    dropped (see :data:`MIN_CUT_OBJECT_PIXELS`); every other object becomes a box, a label (its
    class in ``objects``) and a mask, in increasing id order.

    Raises:
        InputError: an id with no class (the shard check refuses such shards first).
    """
    ids = np.asarray(ids)
    present, counts = np.unique(ids, return_counts=True)
    if min_cut_pixels > 1 and present.size:
        border = np.unique(np.concatenate([ids[0], ids[-1], ids[:, 0], ids[:, -1]]))
        small = present[(present != 0) & (counts < min_cut_pixels) & np.isin(present, border)]
        if small.size:
            ids = np.where(np.isin(ids, small), 0, ids)
            present = present[~np.isin(present, small)]
    return targets_from_instances(ids, objects.mapping(present[present != 0]))


class APCounter:
    """COCO-style AP per class at one IoU threshold, fed one image (window) at a time.

    :meth:`add` matches an image's detections as :func:`~tilewise.models.detection.detection_ap`
    does and keeps, per class, the detections' scores, whether each matched, and the number of
    ground-truth objects; :meth:`per_class` and :meth:`mean` compute the AP from them.

    Args:
        iou_type: compare ``"mask"`` or ``"box"``.
        iou_threshold: the IoU a match needs (0.5: AP50).
        max_detections: detections kept per image (the highest scores).
        mask_threshold: where predicted mask probabilities are binarised.
    """

    def __init__(
        self,
        iou_type: Literal["box", "mask"],
        *,
        iou_threshold: float = 0.5,
        max_detections: int = 100,
        mask_threshold: float = 0.5,
    ) -> None:
        self.iou_type = iou_type
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self.mask_threshold = mask_threshold
        self._scores: dict[int, list[Tensor]] = {}
        self._hits: dict[int, list[Tensor]] = {}
        self._objects: dict[int, int] = {}

    def add(self, pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        """One image's detections (``scores``, ``labels``, ``boxes`` or ``masks``) and ground
        truth (``labels``, ``boxes`` or ``masks``)."""
        key = "boxes" if self.iou_type == "box" else "masks"
        order = torch.sort(pred["scores"], descending=True, stable=True)[1][: self.max_detections]
        scores, labels, items = pred["scores"][order], pred["labels"][order], pred[key][order]
        if self.iou_type == "mask" and items.dtype != torch.bool:
            items = items >= self.mask_threshold
        truth = target[key]
        if self.iou_type == "mask":
            truth = truth.to(torch.bool)
        pair_iou = box_iou if self.iou_type == "box" else mask_iou
        for c in set(labels.tolist()) | set(target["labels"].tolist()):
            d = torch.where(labels == c)[0]
            g = torch.where(target["labels"] == c)[0]
            iou = pair_iou(items[d], truth[g])
            hit = greedy_matches(iou, self.iou_threshold)
            self._scores.setdefault(c, []).append(scores[d].detach().cpu())
            self._hits.setdefault(c, []).append(hit)
            self._objects[c] = self._objects.get(c, 0) + g.numel()

    def per_class(self) -> dict[int, float]:
        """``{class: AP}`` for every class with at least one ground-truth object."""
        return {
            c: average_precision(torch.cat(self._scores[c]), torch.cat(self._hits[c]), n)
            for c, n in sorted(self._objects.items())
            if n > 0
        }

    def mean(self) -> float:
        """The mean AP over the classes with ground truth; NaN when there was none."""
        values = list(self.per_class().values())
        return float(np.mean(values)) if values else math.nan


def windows(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the non-overlapping ``tile`` px windows covering an image, in
    row-major order; the last row and column are shorter where ``tile`` does not divide."""
    return [
        (y0, min(height, y0 + tile), x0, min(width, x0 + tile))
        for y0 in range(0, height, tile)
        for x0 in range(0, width, tile)
    ]


def validate_instances(
    model: nn.Module,
    shards: list[Any],
    normalizer: Any,
    device: torch.device,
    *,
    tile: int = DEFAULT_VALIDATION_TILE,
    batch_size: int = 4,
) -> dict[str, float]:
    """``mask_ap50`` and ``box_ap50`` of a Mask R-CNN on instance shards, window by window
    (see the module docstring). Windows of one size go through ``detect`` together, up to
    ``batch_size`` at a time."""
    masks, boxes = APCounter("mask"), APCounter("box")
    was_training = model.training
    model.eval()

    def run(shard: Any, batch: list[tuple[int, int, int, int]]) -> None:
        raw = np.stack([shard.read_array("image", y0, y1, x0, x1) for y0, y1, x0, x1 in batch])
        x = normalizer(torch.from_numpy(raw).to(device))
        with torch.no_grad():
            found = model.detect(x)  # type: ignore[operator]
        objects = shard.object_classes()
        for det, (y0, y1, x0, x1) in zip(found, batch, strict=True):
            det = {k: v.detach().cpu() for k, v in det.items()}
            truth = patch_target(shard.read_array("instances", y0, y1, x0, x1), objects)
            masks.add(det, truth)
            boxes.add(det, truth)

    try:
        for shard in shards:
            batch: list[tuple[int, int, int, int]] = []
            for window in windows(shard.height, shard.width, tile):
                size = (window[1] - window[0], window[3] - window[2])
                if batch and (
                    len(batch) == batch_size or (batch[0][1] - batch[0][0],
                                                 batch[0][3] - batch[0][2]) != size
                ):  # fmt: skip
                    run(shard, batch)
                    batch = []
                batch.append(window)
            if batch:
                run(shard, batch)
    finally:
        model.train(was_training)
    return {"mask_ap50": masks.mean(), "box_ap50": boxes.mean()}
