"""``tilewise score``: the FCN metrics of a finished output against a reference label raster.

A predict job over a labelled scene or slide is judged by the metrics of the FCN paper (pixel
accuracy, mean accuracy, mean IU, frequency-weighted IU; :mod:`tilewise.metrics`). The output and
the reference are both larger than memory, so :func:`score` streams them: it reads both block by
block (whole output chunks, a few Mpx at a time, on several threads) and adds each block's pixels
to an exact confusion matrix. The counts do not depend on the blocks or the threads, so the
metrics equal those of the two whole images compared at once.

* **The reference is checked as a shard cut's labels are** (:func:`tilewise.io.cut.check_pair`):
  the same height and width as the output, one band of whole, non-negative ids, and, when both
  are georeferenced, the same grid and CRS. A class id the model does not have is an error that
  names its row and column (and suggests ``--ignore-index`` when it marks unlabelled pixels).
* **Unlabelled pixels count nowhere**: the reference's no-data value and ``ignore_index``.
* **What the output says is what is scored**: pixels of units a foreground mask skipped were
  written as the mask's background class and count as predictions of it.
* Only a complete output is scored; an interrupted one has unwritten pixels.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from tilewise.errors import ConfigError, InputError, TilewiseError
from tilewise.io.cut import Raster, check_pair, label_ids, open_raster
from tilewise.io.export import open_output
from tilewise.io.ingest import _run
from tilewise.metrics import ConfusionMatrix
from tilewise.pipeline.stores import local_path

__all__ = [
    "InstanceScoreReport",
    "JobInstanceScoreReport",
    "JobScoreReport",
    "ObjectCounts",
    "ObjectMatch",
    "ScoreReport",
    "check_settings",
    "match_objects",
    "metric_lines",
    "score",
    "score_instances",
    "score_job",
]

# Pixels per block read: whole output chunks up to about this many (int64 ids: 32 MB a block).
BLOCK_PIXELS = 1 << 22


@dataclass
class ScoreReport:
    """The metrics of one output against its reference labels."""

    output: str
    labels: str
    height: int
    width: int
    class_names: list[str]
    confusion: ConfusionMatrix
    nodata_pixels: int = 0  # the reference's no-data: not counted
    ignored_pixels: int = 0  # the reference's ignore_index: not counted
    ignore_index: int | None = None
    seconds: float = 0.0
    blocks: int = 0
    workers: int = 1

    @cached_property
    def metrics(self) -> dict[str, float]:
        """:meth:`ConfusionMatrix.summary` of the counts: the FCN four, Dice, per class."""
        return self.confusion.summary()

    @property
    def counted_pixels(self) -> int:
        """Pixels with a reference class, the ones the metrics are over."""
        return self.confusion.total

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: its pixels in the reference and the output, accuracy, IoU, Dice."""
        counts = self.confusion.counts
        rows = []
        for i, name in enumerate(self.class_names):
            rows.append(
                {
                    "class": i,
                    "name": name,
                    "reference_pixels": int(counts[i].sum()),
                    "predicted_pixels": int(counts[:, i].sum()),
                    "accuracy": self.metrics[f"accuracy/{i}"],
                    "iou": self.metrics[f"iou/{i}"],
                    "dice": self.metrics[f"dice/{i}"],
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (NaN, for a class absent from both, becomes null)."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "output": self.output,
            "labels": self.labels,
            "height": self.height,
            "width": self.width,
            "counted_pixels": self.counted_pixels,
            "nodata_pixels": self.nodata_pixels,
            "ignored_pixels": self.ignored_pixels,
            "ignore_index": self.ignore_index,
            "pixel_accuracy": clean(self.metrics["pixel_accuracy"]),
            "mean_accuracy": clean(self.metrics["mean_accuracy"]),
            "mean_iu": clean(self.metrics["mean_iou"]),
            "frequency_weighted_iu": clean(self.metrics["frequency_weighted_iou"]),
            "mean_dice": clean(self.metrics["mean_dice"]),
            "per_class": [
                {k: clean(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in self.per_class()
            ],
            "confusion": self.confusion.to_dict(),
            "seconds": round(self.seconds, 3),
            "blocks": self.blocks,
            "workers": self.workers,
        }

    def lines(self) -> list[str]:
        """The report for people: totals, the FCN metrics, a table per class, the matrix."""
        left_out = []
        if self.nodata_pixels:
            left_out.append(f"{self.nodata_pixels:,} no-data")
        if self.ignored_pixels:
            left_out.append(f"{self.ignored_pixels:,} of ignore index {self.ignore_index}")
        return [
            f"scored '{self.output}' against '{self.labels}' ({self.height} x {self.width} px, "
            f"{len(self.class_names)} classes) in {self.seconds:.1f} s",
            f"counted {self.counted_pixels:,} px"
            + (f"; left out {', '.join(left_out)}" if left_out else ""),
            *metric_lines(self.confusion, self.class_names),
        ]


def metric_lines(confusion: ConfusionMatrix, class_names: list[str]) -> list[str]:
    """The FCN metrics, a table per class and (up to 12 classes) the matrix, for people."""

    def f(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.4f}"

    m = confusion.summary()
    counts = confusion.counts
    out = [
        f"pixel accuracy {f(m['pixel_accuracy'])}   mean accuracy {f(m['mean_accuracy'])}   "
        f"mean IU {f(m['mean_iou'])}   frequency-weighted IU {f(m['frequency_weighted_iou'])}",
    ]
    labels = [f"{i} {name}" for i, name in enumerate(class_names)]
    width = max(len("class"), *(len(label) for label in labels))
    out.append(
        f"{'class':<{width}}  {'reference px':>14}  {'predicted px':>14}  "
        f"{'accuracy':>8}  {'IoU':>6}  {'Dice':>6}"
    )
    for i, label in enumerate(labels):
        out.append(
            f"{label:<{width}}  {int(counts[i].sum()):>14,}  {int(counts[:, i].sum()):>14,}  "
            f"{f(m[f'accuracy/{i}']):>8}  {f(m[f'iou/{i}']):>6}  {f(m[f'dice/{i}']):>6}"
        )
    k = len(class_names)
    if k <= 12:
        cell = max(8, *(len(f"{int(v):,}") for v in counts.ravel()))
        out.append("confusion (rows: reference, columns: output)")
        out.append(" " * 4 + "".join(f"{j:>{cell + 2}}" for j in range(k)))
        for i in range(k):
            out.append(f"{i:>4}" + "".join(f"{int(v):>{cell + 2},}" for v in counts[i]))
    return out


def _output_raster(
    src: str, options: dict[str, Any] | None, what: str = "labels"
) -> tuple[Raster, list[str], int, tuple[int, int]]:
    """The output's class map (or, ``what="instances"``, its object ids) as a (1, H, W) raster,
    its class names, its class count and its chunk (rows, columns)."""
    source = open_output(src, what, options, verb="score")
    image = source.levels[0]
    h, w = (int(v) for v in image.shape[-2:])
    transform = source.attrs.get("spatial:transform")
    num_classes = source.num_classes
    if num_classes < 1 and what == "labels":
        raise InputError(
            f"output '{source.location}' does not record its number of classes; score reads "
            f"outputs that `tilewise run` writes."
        )
    names = list(source.class_names)[:num_classes]
    names += [f"class {i}" for i in range(len(names), num_classes)]
    raster = Raster(
        name=source.location,
        shape=(1, h, w),
        dtype=np.dtype(image.dtype),
        read=lambda y0, y1, x0, x1: np.asarray(image[y0:y1, x0:x1])[None],
        close=lambda: None,
        transform=[float(v) for v in transform] if transform else None,
        crs={k: v for k, v in source.attrs.items() if k in ("proj:wkt2", "proj:code")},
    )
    ch, cw = (int(v) for v in image.chunks[-2:])
    return raster, names, num_classes, (ch, cw)


def _blocks(h: int, w: int, chunk: tuple[int, int], whole_rows: bool) -> list[tuple[int, ...]]:
    """``(y0, y1, x0, x1)`` blocks of whole output chunks, about ``BLOCK_PIXELS`` each, in raster
    order; with ``whole_rows``, bands of whole rows (sources read in order)."""
    ch, cw = chunk
    if whole_rows:
        rows = max(1, BLOCK_PIXELS // max(w, 1) // ch) * ch
        return [(y0, min(h, y0 + rows), 0, w) for y0 in range(0, h, rows)]
    cols = max(1, BLOCK_PIXELS // (ch * cw)) * cw
    return [
        (y0, min(h, y0 + ch), x0, min(w, x0 + cols))
        for y0 in range(0, h, ch)
        for x0 in range(0, w, cols)
    ]


def check_settings(ignore_index: int | None, workers: int | None, instances: bool = False) -> None:
    """Refuse settings out of range, or ``ignore_index`` with ``instances`` (objects have no
    ignore value: the reference's no-data marks unlabelled pixels)."""
    if instances and ignore_index is not None:
        raise ConfigError(
            "--ignore-index is for class maps; with --instances the reference's no-data value "
            "marks unlabelled pixels (set it on the raster, e.g. gdal_edit.py -a_nodata)."
        )
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1; got {workers}.")
    if ignore_index is not None and ignore_index < 0:
        raise ConfigError(
            f"ignore_index is a label value, 0 or more; got {ignore_index}. Use e.g. 255, or "
            f"leave it out when only the labels' no-data marks unlabelled pixels."
        )


@dataclass
class _Pair:
    """An output's class map (or object ids) and its reference, checked to fit together."""

    predicted: Raster
    reference: Raster
    class_names: list[str]
    num_classes: int
    chunk: tuple[int, int]


def _open_pair(
    output: str, labels: str, options: dict[str, Any] | None, what: str = "labels"
) -> _Pair:
    """Open and check the pair; the caller closes ``reference``."""
    predicted, names, k, chunk = _output_raster(output, options, what)
    reference = open_raster(local_path(str(labels)), "labels")
    try:
        check_pair(predicted, reference, role="output")
    except BaseException:
        reference.close()
        raise
    return _Pair(predicted, reference, names, k, chunk)


def _each_block(
    pair: _Pair,
    workers: int | None,
    visit: Callable[[int, int, np.ndarray, np.ndarray], None],
) -> tuple[int, int]:
    """``visit(y0, x0, reference ids, output values)`` for every block of the pair, on threads
    (one, in raster order, for a reference read in order); returns (threads, blocks).

    Reference ids are int64 with -1 for its no-data."""
    predicted, reference = pair.predicted, pair.reference
    _, h, w = predicted.shape
    nworkers = 1 if reference.sequential else workers or max(1, min(4, os.cpu_count() or 1))
    blocks = _blocks(h, w, pair.chunk, whole_rows=reference.sequential)

    def one(block: tuple[int, ...]) -> None:
        y0, y1, x0, x1 = block
        ids = label_ids(reference.read(y0, y1, x0, x1), reference, y0, x0)
        visit(y0, x0, ids, predicted.read(y0, y1, x0, x1)[0])

    with reference.environment(nworkers):
        _run([partial(one, b) for b in blocks], nworkers)
    return nworkers, len(blocks)


def _count(
    pair: _Pair, ignore_index: int | None, workers: int | None, started: float
) -> ScoreReport:
    """Every pixel of the pair, block by block on threads, into one confusion matrix."""
    reference, k = pair.reference, pair.num_classes
    total = ConfusionMatrix(k)
    left_out = [0, 0]  # no-data, ignore_index
    lock = threading.Lock()

    def visit(y0: int, x0: int, ids: np.ndarray, pred: np.ndarray) -> None:
        nodata = ids < 0
        ignored = (ids == ignore_index) if ignore_index is not None else np.zeros_like(nodata)
        counted = ~nodata & ~ignored
        bad = counted & (ids >= k)
        if bad.any():
            y, x = (int(v) for v in np.argwhere(bad)[0])
            hint = (
                f" If {ids[y, x]} marks unlabelled pixels, give --ignore-index {ids[y, x]}."
                if ignore_index is None
                else ""
            )
            raise InputError(
                f"the labels '{reference.name}' hold class {ids[y, x]} at row {y0 + y}, "
                f"column {x0 + x}, but the output's model has {k} classes "
                f"(0..{k - 1}); the reference must use the model's class ids.{hint} A "
                f"reference of object ids is scored with --instances."
            )
        part = ConfusionMatrix(k).update(pred[counted], ids[counted])
        with lock:
            total.merge(part)
            left_out[0] += int(nodata.sum())
            left_out[1] += int(ignored.sum())

    nworkers, nblocks = _each_block(pair, workers, visit)
    _, h, w = pair.predicted.shape
    return ScoreReport(
        output=pair.predicted.name,
        labels=reference.name,
        height=h,
        width=w,
        class_names=pair.class_names,
        confusion=total,
        nodata_pixels=left_out[0],
        ignored_pixels=left_out[1],
        ignore_index=ignore_index,
        seconds=time.perf_counter() - started,
        blocks=nblocks,
        workers=nworkers,
    )


def score(
    output: str,
    labels: str,
    *,
    ignore_index: int | None = None,
    workers: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ScoreReport:
    """The FCN metrics of a finished output's class map against reference labels.

    Args:
        output: the output of a predict job (``OUT.zarr``), complete, with a class map
            (``output.labels``).
        labels: the reference: one band of class ids covering the output pixel for pixel
            (a GeoTIFF/COG, TIFF, PNG, ... or a Zarr array / OME-Zarr image). Its no-data value
            marks unlabelled pixels.
        ignore_index: a reference value that also marks unlabelled pixels (e.g. 255).
        workers: reader threads (default: up to 4, one per CPU).
        storage_options: fsspec options of an output in an object store.

    Returns:
        A :class:`ScoreReport`: the confusion matrix, the metrics (``metrics``, ``per_class()``),
        ``lines()`` for people and ``to_dict()`` for JSON.

    Raises:
        StoreNotFoundError: the output or the labels do not exist, or the output has no class
            map.
        InputError: the output is not complete, the labels do not cover it pixel for pixel, or
            they hold a value that is not one of the model's classes.
        ConfigError: a setting is out of range.
    """
    started = time.perf_counter()
    check_settings(ignore_index, workers)
    pair = _open_pair(output, labels, storage_options)
    try:
        return _count(pair, ignore_index, workers, started)
    finally:
        pair.reference.close()


@dataclass
class JobScoreReport:
    """The metrics of every output of a predict job, and of all of them together."""

    job: str
    labels: str  # the pattern, with {stem}
    images: list[ScoreReport]
    confusion: ConfusionMatrix
    class_names: list[str]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """All images' reports and the totals (the metrics of the summed confusion matrix)."""
        total = ScoreReport(
            output=self.job,
            labels=self.labels,
            height=0,
            width=0,
            class_names=self.class_names,
            confusion=self.confusion,
            nodata_pixels=sum(r.nodata_pixels for r in self.images),
            ignored_pixels=sum(r.ignored_pixels for r in self.images),
            ignore_index=self.images[0].ignore_index,
            seconds=self.seconds,
        ).to_dict()
        for key in ("output", "height", "width", "blocks", "workers"):
            total.pop(key)
        return {"job": self.job, **total, "images": [r.to_dict() for r in self.images]}

    def lines(self) -> list[str]:
        """A line per image, then the metrics of all images together."""

        def f(value: float) -> str:
            return "-" if math.isnan(value) else f"{value:.4f}"

        width = max(len("image"), *(len(Path(r.output).name) for r in self.images))
        out = [
            f"scored {len(self.images)} outputs of '{self.job}' against '{self.labels}' in "
            f"{self.seconds:.1f} s",
            f"{'image':<{width}}  {'counted px':>14}  {'pixel acc.':>10}  {'mean IU':>8}",
        ]
        for r in self.images:
            out.append(
                f"{Path(r.output).name:<{width}}  {r.counted_pixels:>14,}  "
                f"{f(r.metrics['pixel_accuracy']):>10}  {f(r.metrics['mean_iou']):>8}"
            )
        out.append(f"all {len(self.images)} images together ({self.confusion.total:,} px):")
        out += metric_lines(self.confusion, self.class_names)
        return out


# -- objects -----------------------------------------------------------------------------------

# IoU thresholds reported: 0.5, 0.55, ..., 0.95 (the Data Science Bowl 2018 / COCO range). At 0.5
# and above an object can match at most one object of the other image, so matches are unique.
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


class ObjectCounts:
    """Streamed object areas and overlaps: pixels of each output object, of each reference object
    and of each (output, reference) pair that overlaps, summed block by block (exact and
    order-free, as the confusion matrix is)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
            "pred": [],
            "ref": [],
            "pairs": [],
        }
        self._lock = threading.Lock()

    def add(self, pred: np.ndarray, ref: np.ndarray) -> None:
        """Add the counted pixels of a block: ``pred`` output ids, ``ref`` reference ids (both
        0 = background), as 1-D arrays of equal length."""
        pred = pred.astype(np.int64, copy=False)
        both = (pred > 0) & (ref > 0)
        parts = {
            "pred": np.unique(pred[pred > 0], return_counts=True),
            "ref": np.unique(ref[ref > 0], return_counts=True),
            # One int64 per pair, for ids below 2**31: the caller checks the reference's; the
            # output's are the instance stage's 1..N.
            "pairs": np.unique((pred[both] << 32) | ref[both], return_counts=True),
        }
        with self._lock:
            for name, part in parts.items():
                self._parts[name].append(part)

    def totals(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique keys and their summed pixel counts."""
        parts = self._parts[name]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = np.concatenate([k for k, _ in parts])
        counts = np.concatenate([n for _, n in parts])
        unique, inverse = np.unique(keys, return_inverse=True)
        return unique, np.bincount(inverse, weights=counts).astype(np.int64)


@dataclass
class ObjectMatch:
    """Objects matched one to one at ``IoU >= threshold``: the counts, and the metrics they give
    (those of StarDist's ``matching``; ``accuracy`` is the Data Science Bowl 2018's)."""

    threshold: float
    tp: int
    fp: int
    fn: int
    matched_iou: float  # the sum of the matched pairs' IoU

    def __add__(self, other: ObjectMatch) -> ObjectMatch:
        return ObjectMatch(
            self.threshold,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.matched_iou + other.matched_iou,
        )

    def metrics(self) -> dict[str, float]:
        """precision, recall, f1, accuracy = TP / (TP + FP + FN), mean matched IoU, and
        panoptic quality = sum of matched IoU / (TP + FP/2 + FN/2); NaN where undefined."""

        def ratio(a: float, b: float) -> float:
            return a / b if b else float("nan")

        tp, fp, fn = self.tp, self.fp, self.fn
        return {
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": ratio(tp, tp + fp + fn),
            "mean_matched_iou": ratio(self.matched_iou, tp),
            "panoptic_quality": ratio(self.matched_iou, tp + fp / 2 + fn / 2),
        }


def match_objects(
    counts: ObjectCounts, thresholds: tuple[float, ...] = THRESHOLDS
) -> tuple[list[ObjectMatch], int, int]:
    """The one-to-one matches at each threshold, and the numbers of output and reference objects.

    IoU of a pair = overlap / (area of one + area of the other - overlap). At each threshold
    (0.5 or more), pairs at or above it are taken in order of IoU, each object at most once.
    """
    pred_ids, pred_area = counts.totals("pred")
    ref_ids, ref_area = counts.totals("ref")
    codes, overlap = counts.totals("pairs")
    p = np.searchsorted(pred_ids, codes >> 32)
    r = np.searchsorted(ref_ids, codes & 0xFFFFFFFF)
    iou = overlap / (pred_area[p] + ref_area[r] - overlap)
    order = np.argsort(-iou, kind="stable")
    p, r, iou = p[order], r[order], iou[order]
    matches = []
    for t in thresholds:
        if t < 0.5:
            raise ConfigError(f"IoU thresholds must be 0.5 or more (matches unique); got {t}.")
        keep = iou >= t
        used_p: set[int] = set()
        used_r: set[int] = set()
        tp, total = 0, 0.0
        for pi, ri, value in zip(
            p[keep].tolist(), r[keep].tolist(), iou[keep].tolist(), strict=True
        ):
            if pi in used_p or ri in used_r:  # only a tie at exactly 0.5 gets here
                continue
            used_p.add(pi)
            used_r.add(ri)
            tp += 1
            total += value
        matches.append(ObjectMatch(t, tp, len(pred_ids) - tp, len(ref_ids) - tp, total))
    return matches, len(pred_ids), len(ref_ids)


def object_lines(matches: list[ObjectMatch]) -> list[str]:
    """A table of the matches, one row per threshold, and the DSB 2018 score, for people."""

    def f(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.4f}"

    out = [
        f"{'IoU >=':>6}  {'TP':>9}  {'FP':>9}  {'FN':>9}  {'precision':>9}  {'recall':>7}  "
        f"{'F1':>6}  {'accuracy':>8}  {'mean IoU':>8}  {'PQ':>6}"
    ]
    for m in matches:
        v = m.metrics()
        out.append(
            f"{m.threshold:>6.2f}  {m.tp:>9,}  {m.fp:>9,}  {m.fn:>9,}  {f(v['precision']):>9}  "
            f"{f(v['recall']):>7}  {f(v['f1']):>6}  {f(v['accuracy']):>8}  "
            f"{f(v['mean_matched_iou']):>8}  {f(v['panoptic_quality']):>6}"
        )
    dsb = _mean_accuracy(matches)
    if not math.isnan(dsb):
        out.append(f"accuracy averaged over the thresholds (Data Science Bowl 2018): {dsb:.4f}")
    return out


def _mean_accuracy(matches: list[ObjectMatch]) -> float:
    values = [m.metrics()["accuracy"] for m in matches]
    return float(np.mean(values)) if values and not any(map(math.isnan, values)) else float("nan")


def _match_dicts(matches: list[ObjectMatch]) -> list[dict[str, Any]]:
    return [
        {
            "threshold": m.threshold,
            "tp": m.tp,
            "fp": m.fp,
            "fn": m.fn,
            **{k: None if math.isnan(v) else v for k, v in m.metrics().items()},
        }
        for m in matches
    ]


@dataclass
class InstanceScoreReport:
    """The object metrics of one output's instances against reference object ids."""

    output: str
    labels: str
    height: int
    width: int
    matches: list[ObjectMatch]
    output_objects: int
    reference_objects: int
    nodata_pixels: int = 0
    seconds: float = 0.0
    blocks: int = 0
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (NaN becomes null)."""
        dsb = _mean_accuracy(self.matches)
        return {
            "output": self.output,
            "labels": self.labels,
            "height": self.height,
            "width": self.width,
            "output_objects": self.output_objects,
            "reference_objects": self.reference_objects,
            "nodata_pixels": self.nodata_pixels,
            "matches": _match_dicts(self.matches),
            "dsb2018_score": None if math.isnan(dsb) else dsb,
            "seconds": round(self.seconds, 3),
            "blocks": self.blocks,
            "workers": self.workers,
        }

    def lines(self) -> list[str]:
        """The report for people."""
        return [
            f"scored the objects of '{self.output}' against '{self.labels}' ({self.height} x "
            f"{self.width} px) in {self.seconds:.1f} s",
            f"objects: {self.output_objects:,} in the output, {self.reference_objects:,} in the "
            f"reference"
            + (
                f" (inside its labelled pixels; {self.nodata_pixels:,} no-data px left out)"
                if self.nodata_pixels
                else ""
            ),
            *object_lines(self.matches),
        ]


def _count_objects(pair: _Pair, workers: int | None, started: float) -> InstanceScoreReport:
    reference = pair.reference
    counts = ObjectCounts()
    nodata_total = [0]
    lock = threading.Lock()

    def visit(y0: int, x0: int, ids: np.ndarray, pred: np.ndarray) -> None:
        counted = ids >= 0
        big = ids >= (1 << 31)
        if big.any():
            y, x = (int(v) for v in np.argwhere(big)[0])
            raise InputError(
                f"the labels '{reference.name}' hold object id {ids[y, x]} at row {y0 + y}, "
                f"column {x0 + x}; object ids must be below 2**31. Renumber the objects "
                f"(e.g. skimage.segmentation.relabel_sequential)."
            )
        counts.add(pred[counted], ids[counted])
        with lock:
            nodata_total[0] += int((~counted).sum())

    nworkers, nblocks = _each_block(pair, workers, visit)
    matches, n_pred, n_ref = match_objects(counts)
    _, h, w = pair.predicted.shape
    return InstanceScoreReport(
        output=pair.predicted.name,
        labels=reference.name,
        height=h,
        width=w,
        matches=matches,
        output_objects=n_pred,
        reference_objects=n_ref,
        nodata_pixels=nodata_total[0],
        seconds=time.perf_counter() - started,
        blocks=nblocks,
        workers=nworkers,
    )


def score_instances(
    output: str,
    labels: str,
    *,
    workers: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> InstanceScoreReport:
    """Object metrics of a finished output's instances against reference object ids.

    Each output object is matched to at most one reference object at each IoU threshold of
    :data:`THRESHOLDS` (0.5 to 0.95); the report gives TP, FP, FN, precision, recall, F1,
    accuracy (TP / (TP + FP + FN), whose mean over the thresholds is the Data Science Bowl 2018
    score), the mean IoU of the matches and the panoptic quality. Objects are matched whatever
    their class. Areas and overlaps are summed block by block over the whole image, so an object
    that crosses blocks (or units) is one object, as the instance stage wrote it.

    Args:
        output: the output of a predict job with ``output.instances`` (or a Mask R-CNN job):
            complete, with its ``instances/`` image.
        labels: the reference: one band of object ids (0 = background), covering the output
            pixel for pixel. Its no-data pixels are left out of every object's area.
        workers: reader threads (default: up to 4, one per CPU).
        storage_options: fsspec options of an output in an object store.

    Raises:
        StoreNotFoundError, InputError, ConfigError: as :func:`score`.
    """
    started = time.perf_counter()
    check_settings(None, workers, instances=True)
    pair = _open_pair(output, labels, storage_options, what="instances")
    try:
        return _count_objects(pair, workers, started)
    finally:
        pair.reference.close()


def score_job(
    job: str,
    labels: str,
    *,
    ignore_index: int | None = None,
    workers: int | None = None,
    instances: bool = False,
) -> JobScoreReport | JobInstanceScoreReport:
    """The metrics of every output of a predict job, and of all of them together.

    The totals are those of the summed counts: the summed confusion matrix, as the FCN paper
    scores a dataset (not the mean of the images' metrics); with ``instances``, the summed
    matches.

    Args:
        job: the predict job's YAML file; a job over many images scores each one's output.
        labels: the reference of each image: a path in which ``{stem}`` stands for the image's
            name (as in the job's ``output.path``), e.g. ``truth/{stem}.tif``.
        ignore_index: a reference value that also marks unlabelled pixels (e.g. 255).
        workers: reader threads (default: up to 4, one per CPU).
        instances: score the outputs' objects against references of object ids
            (:func:`score_instances`) instead of their class maps.

    Returns:
        A :class:`JobScoreReport`, or with ``instances`` a :class:`JobInstanceScoreReport`.

    Raises:
        ConfigError: the job is not a predict job, or ``labels`` has no ``{stem}`` for a job
            over several images.
        StoreNotFoundError, InputError: as :func:`score`, naming the image; every pair is
            checked before any pixel is counted.
    """
    from tilewise.pipeline.job import expand_images, image_stem
    from tilewise.spec import PredictJob, load_job

    started = time.perf_counter()
    check_settings(ignore_index, workers, instances)
    spec = load_job(job)
    if not isinstance(spec, PredictJob):
        raise ConfigError(
            f"'{job}' is a {spec.kind} job; score reads the outputs of a predict job. Give a "
            f"predict job, or an output store (OUT.zarr)."
        )
    images = expand_images(spec)
    if len(images) > 1 and "{stem}" not in labels:
        raise ConfigError(
            f"the job '{job}' has {len(images)} images, so the labels must name one file per "
            f"image: put {{stem}} (each image's name) in the path, e.g. truth/{{stem}}.tif; "
            f"got '{labels}'."
        )
    pairs = []
    for image in images:
        stem = image_stem(str(image.input.path))
        reference = labels.replace("{stem}", stem)
        try:
            pair = _open_pair(
                image.output.path,
                reference,
                image.output.storage_options,
                "instances" if instances else "labels",
            )
        except TilewiseError as exc:
            raise type(exc)(f"image '{stem}': {exc}") from None
        pair.reference.close()  # opened again to count: a job can have many images
        pairs.append((image, reference))
    if instances:
        objects = [
            score_instances(
                image.output.path,
                reference,
                workers=workers,
                storage_options=image.output.storage_options,
            )
            for image, reference in pairs
        ]
        return JobInstanceScoreReport(
            job=str(job),
            labels=labels,
            images=objects,
            seconds=time.perf_counter() - started,
        )
    reports = [
        score(
            image.output.path,
            reference,
            ignore_index=ignore_index,
            workers=workers,
            storage_options=image.output.storage_options,
        )
        for image, reference in pairs
    ]
    total = ConfusionMatrix(reports[0].confusion.num_classes)
    for report in reports:
        total.merge(report.confusion)
    return JobScoreReport(
        job=str(job),
        labels=labels,
        images=reports,
        confusion=total,
        class_names=reports[0].class_names,
        seconds=time.perf_counter() - started,
    )


@dataclass
class JobInstanceScoreReport:
    """The object metrics of every output of a predict job, and of all of them together (the
    summed matches)."""

    job: str
    labels: str  # the pattern, with {stem}
    images: list[InstanceScoreReport]
    seconds: float = 0.0

    @property
    def matches(self) -> list[ObjectMatch]:
        """Each threshold's matches summed over the images."""
        total = self.images[0].matches
        for report in self.images[1:]:
            total = [a + b for a, b in zip(total, report.matches, strict=True)]
        return total

    def to_dict(self) -> dict[str, Any]:
        """All images' reports and the totals."""
        dsb = _mean_accuracy(self.matches)
        return {
            "job": self.job,
            "labels": self.labels,
            "output_objects": sum(r.output_objects for r in self.images),
            "reference_objects": sum(r.reference_objects for r in self.images),
            "nodata_pixels": sum(r.nodata_pixels for r in self.images),
            "matches": _match_dicts(self.matches),
            "dsb2018_score": None if math.isnan(dsb) else dsb,
            "seconds": round(self.seconds, 3),
            "images": [r.to_dict() for r in self.images],
        }

    def lines(self) -> list[str]:
        """A line per image (at IoU 0.5), then the matches of all images together."""

        def f(value: float) -> str:
            return "-" if math.isnan(value) else f"{value:.4f}"

        width = max(len("image"), *(len(Path(r.output).name) for r in self.images))
        out = [
            f"scored the objects of {len(self.images)} outputs of '{self.job}' against "
            f"'{self.labels}' in {self.seconds:.1f} s",
            f"{'image':<{width}}  {'output obj.':>11}  {'reference obj.':>14}  "
            f"{'F1 at 0.5':>9}  {'PQ at 0.5':>9}",
        ]
        for r in self.images:
            v = r.matches[0].metrics()
            out.append(
                f"{Path(r.output).name:<{width}}  {r.output_objects:>11,}  "
                f"{r.reference_objects:>14,}  {f(v['f1']):>9}  {f(v['panoptic_quality']):>9}"
            )
        data = self.to_dict()
        out.append(
            f"all {len(self.images)} images together ({data['output_objects']:,} output and "
            f"{data['reference_objects']:,} reference objects):"
        )
        return out + object_lines(self.matches)
