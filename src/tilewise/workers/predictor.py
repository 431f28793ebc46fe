"""The predictor: what runs inside each Ray actor of a predict job.

An actor gets the job once (one entry per image), opens the input and output stores itself,
builds the network once, and is then handed ``(image, unit)`` indices only: pixels never travel
through the driver or the object store (DESIGN.md rule 2).

It keeps the device busy by overlapping the three stages of a unit. The actor is threaded
(Ray's ``max_concurrency``); the driver keeps ``prefetch + 1`` calls in flight on it, so while
one call holds the device, the others read their units (Zarr decoding releases the GIL) or
write finished ones. Only the device stage is serialised: every unit's runs on one thread of
the actor's own, which also keeps each unit's arithmetic independent of what else is in flight
(bit-identical outputs). One thread rather than a lock passed between Ray's threads: torch's
OpenMP keeps a team of intra-op threads for each thread that starts parallel work, so the lock
ran three teams; the one thread was faster side by side (pipeline efficiency 0.90 against 0.88
on 2 cores).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tilewise.pipeline.engine import TileEngine
from tilewise.pipeline.job import PreparedJob, build_model, prepare
from tilewise.pipeline.output import OutputStore
from tilewise.pipeline.postprocess import (
    background_arrays,
    background_probabilities,
    labels_tensor,
    probabilities_tensor,
)
from tilewise.pipeline.pyramid import unit_levels
from tilewise.pipeline.units import BAND_ROWS
from tilewise.spec import PredictJob

__all__ = ["Predictor", "UnitResult", "blocks_to_keep", "precision_name", "resolve_precision"]

# Images whose stores and plans an actor keeps open at once (jobs over thousands of slides).
OPEN_IMAGES = 4
# At most this many bytes of decoded input blocks kept per image (16 blocks, 48 MB, for 1024 px
# RGB uint8 chunks; fewer for inputs of many bands or large chunks, which then decode more).
KEPT_BYTES = 256 * 1024**2


def blocks_to_keep(prepared: PreparedJob, band: int = BAND_ROWS) -> int:
    """Decoded input blocks an actor keeps per image: the blocks that the units of a band walked
    column by column need at once, the current column of units and the next one (their reads
    overlap by the halos), within :data:`KEPT_BYTES`."""
    grid, plan, image = prepared.grid, prepared.plan, prepared.image
    middle = grid.unit((grid.rows // 2) * grid.cols + grid.cols // 2)
    region = prepared.compute_region(middle)
    ry0, ry1 = plan.y.read_range(region.y0, region.y1)
    rx0, rx1 = plan.x.read_range(region.x0, region.x1)
    ch, cw = image.block_shape
    # + 1: a read that is not aligned with the chunk grid touches one more block.
    rows = -(-(ry1 - ry0 + (band - 1) * grid.side) // ch) + 1
    cols = -(-(rx1 - rx0 + grid.side) // cw) + 1
    block_bytes = image.shape[0] * ch * cw * np.dtype(image.dtype).itemsize
    return max(1, min(rows * cols, KEPT_BYTES // block_bytes))


def precision_name(precision: str, device_type: str, bf16_supported: bool) -> str:
    """``compute.precision`` with 'auto' resolved: bfloat16 on CUDA (float16 where the GPU has
    no bfloat16), float32 elsewhere."""
    if precision != "auto":
        return precision
    if device_type != "cuda":
        return "float32"
    return "bfloat16" if bf16_supported else "float16"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``compute.precision`` on ``device`` (None = no autocast)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    name = precision_name(precision, device.type, bf16)
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class UnitResult:
    """What a unit call reports to the driver."""

    image: int
    index: int
    pixels: int
    computed: bool  # False for a unit written as background without running the network
    seconds: float


@dataclass
class _Image:
    prepared: PreparedJob
    engine: TileEngine
    output: OutputStore
    nodata: float | None
    crf: Any = None  # CRFParams when the job refines its scores with DeepLab's CRF


class Predictor:
    """Computes and writes the write units of one job (one or several images).

    Args:
        jobs: one single-image job per image, as JSON-able data
            (``PredictJob.model_dump(mode="json")``, paths absolute).
        threads: torch intra-op threads (the CPUs Ray gave this actor).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    def __init__(
        self, jobs: list[dict[str, Any]], *, threads: int = 1, device: str = "auto"
    ) -> None:
        self.specs = [PredictJob.model_validate(j) for j in jobs]
        torch.set_num_threads(max(1, threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.precision = resolve_precision(self.specs[0].compute.precision, self.device)
        self._models: dict[int, nn.Module] = {}
        self._images: OrderedDict[int, _Image] = OrderedDict()
        self._open_lock = threading.Lock()
        # One thread runs every unit's device stage (see the module's docstring).
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilewise-device")

    # -- per image state -------------------------------------------------------------------
    def _model(self, in_channels: int) -> nn.Module:
        if in_channels not in self._models:
            # Built on the device thread, like every other torch op of the actor. libgomp keeps
            # an OpenMP team for each thread that has run parallel work (initialising and
            # loading the weights is), and while a process has more team threads than cores it
            # spins only ~100 times at a barrier before sleeping on a futex: built in a Ray call
            # thread, the network left a second team alive and the device thread's team slept
            # ~400 times a second for the actor's whole life, against almost never.
            model = self._device.submit(build_model, self.specs[0], in_channels).result()
            if self.device.type == "cuda" and torch.cuda.device_count() > 1:
                # gpus_per_worker >= 2: each batch is split over the actor's GPUs.
                model = nn.DataParallel(model)
            self._models[in_channels] = model
        return self._models[in_channels]

    def _image(self, image: int) -> _Image:
        with self._open_lock:
            state = self._images.get(image)
            if state is not None:
                self._images.move_to_end(image)
                return state
            spec = self.specs[image]
            prepared = prepare(spec)
            # Neighbouring units share input chunks through their halos (InputImage.keep_blocks).
            prepared.image.keep_blocks(blocks_to_keep(prepared))
            engine = TileEngine(
                self._model(prepared.in_channels),
                prepared.plan,
                batch_size=spec.tiling.windows_per_forward(self.device.type),
                device=self.device,
                preprocess=prepared.normalizer,
                precision=self.precision,
            )
            nodata = None
            mask = spec.input.mask
            if mask is not None and mask.method == "nodata":
                from tilewise.pipeline.masks import resolve_nodata

                nodata = resolve_nodata(prepared.image, mask)
            state = _Image(
                prepared,
                engine,
                OutputStore(spec.output.path, spec.output.storage_options),
                nodata,
                prepared.crf,
            )
            self._images[image] = state
            while len(self._images) > OPEN_IMAGES:
                self._images.popitem(last=False)
            return state

    # -- units -------------------------------------------------------------------------------
    def run_unit(self, image: int, index: int, background: bool = False) -> UnitResult:
        """Compute unit ``index`` of image ``image``, write it once, record it done.

        ``background`` units (no foreground in the job's mask) are written as the background
        class without reading or computing anything.
        """
        t0 = time.perf_counter()
        state = self._image(image)
        unit = state.prepared.grid.unit(index)
        if background:
            self._write_background(state, unit)
            return UnitResult(image, index, unit.pixels, False, time.perf_counter() - t0)
        # With a CRF the network computes the unit's CRF halo too (the region), else the unit.
        region = state.prepared.compute_region(unit)
        raw = state.engine.read_unit(state.prepared.image, region)
        nodata = None
        if state.nodata is not None:
            nodata = _nodata_pixels(raw, state, unit, region)
            if bool(nodata.all()):
                self._write_background(state, unit)
                return UnitResult(image, index, unit.pixels, False, time.perf_counter() - t0)
        label_dtype, prob_dtype = state.output.dtypes()
        labels, probs = self._device.submit(
            self._device_stage, state, raw, unit, region, nodata, label_dtype, prob_dtype
        ).result()
        # Written outside the device thread: the next unit computes meanwhile.
        if labels is not None and label_dtype == "uint16":
            labels = [a.astype(np.uint16) for a in labels]
        state.output.write_levels(unit, labels, probs)
        return UnitResult(image, index, unit.pixels, True, time.perf_counter() - t0)

    def _device_stage(
        self,
        state: _Image,
        raw: np.ndarray,
        unit: Any,
        region: Any,
        nodata: np.ndarray | None,
        label_dtype: str | None,
        prob_dtype: str | None,
    ) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        """Scores, labels, probabilities and their streamed pyramid levels of one unit, on the
        device; returned on the host (one unit at a time, on the device thread)."""
        scores = state.engine.compute_unit(raw, region)
        if state.crf is not None:
            scores = _crf_scores(scores, raw, state, unit, region)
        labels = labels_tensor(scores, label_dtype) if label_dtype else None
        probs = probabilities_tensor(scores, prob_dtype) if prob_dtype else None
        if nodata is not None and bool(nodata.any()):
            # No-data pixels of a scene stay background, like whole no-data units.
            self._blank(state, labels, probs, torch.from_numpy(nodata).to(self.device))
        # The streamed levels are reduced here too: 3.3 ms on a CPU actor's threads for a
        # 1024 px unit's labels and float16 probabilities, against 12 ms for numpy in the
        # writing thread, and on a GPU only the reduced pixels cross the bus.
        streamed = state.output.streamed_levels()
        pyramids = [
            None if t is None else unit_levels(t, streamed, labels=t is labels)
            for t in (labels, probs)
        ]
        host = [
            None if levels is None else [t.to("cpu", non_blocking=True) for t in levels]
            for levels in pyramids
        ]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        lab, prob = ([t.numpy() for t in levels] if levels else None for levels in host)
        return lab, prob

    @staticmethod
    def _blank(
        state: _Image, labels: torch.Tensor | None, probs: torch.Tensor | None, where: torch.Tensor
    ) -> None:
        mask = state.prepared.job.input.mask
        background = mask.background_class if mask is not None else 0
        if labels is not None:
            labels[where] = background
        if probs is not None:
            dtype = "uint8" if probs.dtype == torch.uint8 else "float16"
            column = background_probabilities(probs.shape[0], background, dtype)
            probs[:, where] = torch.from_numpy(column).to(probs.device)[:, None]

    def _write_background(self, state: _Image, unit: Any) -> None:
        mask = state.prepared.job.input.mask
        label_dtype, prob_dtype = state.output.dtypes()
        labels, probs = background_arrays(
            state.prepared.layout.num_classes,
            unit.y1 - unit.y0,
            unit.x1 - unit.x0,
            mask.background_class if mask is not None else 0,
            label_dtype,
            prob_dtype,
        )
        state.output.write_arrays(unit, labels, probs, dense=False)

    def describe(self) -> str:
        """Where this actor computes (for the report)."""
        precision = "float32" if self.precision is None else str(self.precision).split(".")[-1]
        return f"{self.device} ({precision})"


def _crf_scores(
    scores: torch.Tensor, raw: np.ndarray, state: _Image, unit: Any, region: Any
) -> torch.Tensor:
    """The unit's scores after DeepLab's CRF over ``region`` (the unit and its CRF halo, whose
    scores are exact): the CRF's marginals, as scores whose softmax (sigmoid) they are."""
    from tilewise.pipeline.crf import dense_crf

    # The appearance kernel compares the raw intensities of the region itself (no padding).
    image = _raw_part(raw, state, region, region)
    image_t = torch.from_numpy(np.ascontiguousarray(image)).to(scores.device, torch.float32)
    one_map = scores.shape[0] == 1
    probs = (
        torch.cat([torch.sigmoid(-scores), torch.sigmoid(scores)])
        if one_map
        else torch.softmax(scores, dim=0)
    )
    q = dense_crf(probs, image_t, state.crf)
    oy, ox = unit.y0 - region.y0, unit.x0 - region.x0
    q = q[:, oy : oy + unit.y1 - unit.y0, ox : ox + unit.x1 - unit.x0]
    eps = torch.finfo(torch.float32).tiny
    if one_map:
        return (torch.log(q[1:] + eps) - torch.log(q[:1] + eps)).contiguous()
    return torch.log(q + eps).contiguous()


def _raw_part(raw: np.ndarray, state: _Image, read: Any, part: Any) -> np.ndarray:
    """The image pixels of output rectangle ``part`` in ``raw``, the pixels read (with the
    network's halo, padded) for output rectangle ``read``."""
    plan = state.prepared.plan
    ry0, _ = plan.y.read_range(read.y0, read.y1)
    rx0, _ = plan.x.read_range(read.x0, read.x1)
    return raw[:, part.y0 - ry0 : part.y1 - ry0, part.x0 - rx0 : part.x1 - rx0]


def _nodata_pixels(raw: np.ndarray, state: _Image, unit: Any, region: Any = None) -> np.ndarray:
    """(h, w) bool: the unit's own pixels (not its halo) whose bands all equal no-data;
    ``raw`` was read for ``region`` (default: the unit)."""
    core = _raw_part(raw, state, region or unit, unit)
    from tilewise.pipeline.masks import nodata_pixels

    assert state.nodata is not None  # only called for nodata masks
    return nodata_pixels(core, state.nodata)
