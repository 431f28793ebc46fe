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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tilewise.errors import ConfigError, InputError, TilewiseError
from tilewise.io.cut import Raster, check_pair, label_ids, open_raster
from tilewise.io.export import open_output
from tilewise.io.ingest import _run
from tilewise.metrics import ConfusionMatrix
from tilewise.pipeline.stores import local_path

__all__ = ["JobScoreReport", "ScoreReport", "metric_lines", "score", "score_job"]

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
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            self.metrics = self.confusion.summary()

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
    src: str, options: dict[str, Any] | None
) -> tuple[Raster, list[str], int, tuple[int, int]]:
    """The output's class map as a (1, H, W) raster, its class names, its class count and its
    chunk (rows, columns)."""
    source = open_output(src, "labels", options, verb="score")
    labels = source.levels[0]
    h, w = (int(v) for v in labels.shape[-2:])
    transform = source.attrs.get("spatial:transform")
    num_classes = source.num_classes
    if num_classes < 1:
        raise InputError(
            f"output '{source.location}' does not record its number of classes; score reads "
            f"outputs that `tilewise run` writes."
        )
    names = list(source.class_names)[:num_classes]
    names += [f"class {i}" for i in range(len(names), num_classes)]
    raster = Raster(
        name=source.location,
        shape=(1, h, w),
        dtype=np.dtype(labels.dtype),
        read=lambda y0, y1, x0, x1: np.asarray(labels[y0:y1, x0:x1])[None],
        close=lambda: None,
        transform=[float(v) for v in transform] if transform else None,
        crs={k: v for k, v in source.attrs.items() if k in ("proj:wkt2", "proj:code")},
    )
    ch, cw = (int(v) for v in labels.chunks[-2:])
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


def _check_settings(ignore_index: int | None, workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1; got {workers}.")
    if ignore_index is not None and ignore_index < 0:
        raise ConfigError(
            f"ignore_index is a label value, 0 or more; got {ignore_index}. Use e.g. 255, or "
            f"leave it out when only the labels' no-data marks unlabelled pixels."
        )


@dataclass
class _Pair:
    """An output's class map and its reference, checked to fit together."""

    predicted: Raster
    reference: Raster
    class_names: list[str]
    num_classes: int
    chunk: tuple[int, int]


def _open_pair(output: str, labels: str, options: dict[str, Any] | None) -> _Pair:
    """Open and check the pair; the caller closes ``reference``."""
    predicted, names, k, chunk = _output_raster(output, options)
    reference = open_raster(local_path(str(labels)), "labels")
    try:
        check_pair(predicted, reference, role="output")
    except BaseException:
        reference.close()
        raise
    return _Pair(predicted, reference, names, k, chunk)


def _count(
    pair: _Pair, ignore_index: int | None, workers: int | None, started: float
) -> ScoreReport:
    """Every pixel of the pair, block by block on threads, into one confusion matrix."""
    predicted, reference, k = pair.predicted, pair.reference, pair.num_classes
    _, h, w = predicted.shape
    nworkers = 1 if reference.sequential else workers or max(1, min(4, os.cpu_count() or 1))
    blocks = _blocks(h, w, pair.chunk, whole_rows=reference.sequential)
    total = ConfusionMatrix(k)
    left_out = [0, 0]  # no-data, ignore_index
    lock = threading.Lock()

    def one(block: tuple[int, ...]) -> None:
        y0, y1, x0, x1 = block
        ids = label_ids(reference.read(y0, y1, x0, x1), reference, y0, x0)
        pred = predicted.read(y0, y1, x0, x1)[0]
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
                f"(0..{k - 1}); the reference must use the model's class ids.{hint}"
            )
        part = ConfusionMatrix(k).update(pred[counted], ids[counted])
        with lock:
            total.merge(part)
            left_out[0] += int(nodata.sum())
            left_out[1] += int(ignored.sum())

    with reference.environment(nworkers):
        _run([partial(one, b) for b in blocks], nworkers)
    return ScoreReport(
        output=predicted.name,
        labels=reference.name,
        height=h,
        width=w,
        class_names=pair.class_names,
        confusion=total,
        nodata_pixels=left_out[0],
        ignored_pixels=left_out[1],
        ignore_index=ignore_index,
        seconds=time.perf_counter() - started,
        blocks=len(blocks),
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
    _check_settings(ignore_index, workers)
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
        data = self.to_dict()

        def f(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        width = max(len("image"), *(len(Path(r.output).name) for r in self.images))
        out = [
            f"scored {len(self.images)} outputs of '{self.job}' against '{self.labels}' in "
            f"{self.seconds:.1f} s",
            f"{'image':<{width}}  {'counted px':>14}  {'pixel acc.':>10}  {'mean IU':>8}",
        ]
        for r in self.images:
            d = r.to_dict()
            out.append(
                f"{Path(r.output).name:<{width}}  {r.counted_pixels:>14,}  "
                f"{f(d['pixel_accuracy']):>10}  {f(d['mean_iu']):>8}"
            )
        out.append(f"all {len(self.images)} images together ({data['counted_pixels']:,} px):")
        out += metric_lines(self.confusion, self.class_names)
        return out


def score_job(
    job: str,
    labels: str,
    *,
    ignore_index: int | None = None,
    workers: int | None = None,
) -> JobScoreReport:
    """The FCN metrics of every output of a predict job, and of all of them together.

    The totals are those of the summed confusion matrix, as the FCN paper scores a dataset
    (not the mean of the images' metrics).

    Args:
        job: the predict job's YAML file; a job over many images scores each one's output.
        labels: the reference of each image: a path in which ``{stem}`` stands for the image's
            name (as in the job's ``output.path``), e.g. ``truth/{stem}.tif``.
        ignore_index: a reference value that also marks unlabelled pixels (e.g. 255).
        workers: reader threads (default: up to 4, one per CPU).

    Returns:
        A :class:`JobScoreReport`.

    Raises:
        ConfigError: the job is not a predict job, or ``labels`` has no ``{stem}`` for a job
            over several images.
        StoreNotFoundError, InputError: as :func:`score`, naming the image; every pair is
            checked before any pixel is counted.
    """
    from tilewise.pipeline.job import expand_images, image_stem
    from tilewise.spec import PredictJob, load_job

    started = time.perf_counter()
    _check_settings(ignore_index, workers)
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
            pair = _open_pair(image.output.path, reference, image.output.storage_options)
        except TilewiseError as exc:
            raise type(exc)(f"image '{stem}': {exc}") from None
        pair.reference.close()  # opened again to count: a job can have many images
        pairs.append((image, reference))
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
