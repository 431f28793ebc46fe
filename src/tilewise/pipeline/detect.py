"""Predict jobs with an instance architecture (Mask R-CNN): detections stitched across a mosaic.

A dense network goes through the overlap-tile engine; an instance network has no score maps to
stitch. Its job runs the instance stage (:mod:`tilewise.pipeline.instance_stage`) with a
:class:`DetectionSource`: every write unit runs the detector on its *window* (the unit grown by
``output.instances.halo`` px per side, clipped to the image), keeps the detections whose anchor —
the floored centre of the box — lies in its core, and refuses an object that reaches the window's
edge (the halo is too small for it). Ids are numbered across the whole mosaic and every unit
paints its own chunk of ``instances/0``, exactly as for connected components; nothing holds all
the labels at once.

Windows are read from the previous multiple of 32 px (Mask R-CNN's coarsest stride), so every
window sees the feature grid of whole-image detection; detections are cut back to the window the
stage asked for. A detector is translation-equivariant only up to its padding, so a detection can
differ slightly between two windows: an object whose box centre lies within a pixel of a unit
border may then be owned by both neighbours or by neither. Choose a halo of at least the largest
object plus the network's context (for the R50-FPN, ~100 px) to keep windows alike around every
object.

The output store holds ``instances/0`` (uint32 OME-Zarr label image), the object table and the
job's attributes (CRS and transform of the input carried over); no class map is written.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tilewise.errors import InputError, PlanError
from tilewise.models.detection import paste_masks
from tilewise.models.maskrcnn import MaskRCNN, create_instance_model
from tilewise.pipeline.instances import Obj, window_of
from tilewise.pipeline.job import Normalizer, expand_images, load_weights, open_input, weights_stamp
from tilewise.pipeline.output import OutputLayout, OutputStore, fingerprint_of
from tilewise.pipeline.stores import InputImage
from tilewise.pipeline.units import UnitGrid
from tilewise.spec import PredictJob

__all__ = [
    "ALIGN",
    "DetectionFactory",
    "DetectionPlan",
    "DetectionSource",
    "build_detector",
    "detector_args",
    "plan_detection",
    "run_detection_job",
]

#: Window origins are moved back to a multiple of this (Mask R-CNN's P5 stride): every window
#: then sees the pooling grid of whole-image detection.
ALIGN = 32
DEFAULT_CHUNK = 1024


def build_detector(job: PredictJob, in_channels: int) -> MaskRCNN:
    """The job's Mask R-CNN with its weights (``model.weights``, else seeded), in eval mode."""
    m = job.model
    torch.manual_seed(m.seed)
    model = create_instance_model(
        m.arch, in_channels=in_channels, num_classes=m.num_classes, **detector_args(job)
    )
    load_weights(model, job, in_channels)
    return model.eval()


class DetectionSource:
    """An :class:`~tilewise.pipeline.instances.ObjectSource` that runs Mask R-CNN on a window.

    Args:
        image: the input image (``read(y0, y1, x0, x1) -> (C, h, w)``).
        model: the detector, in eval mode, on ``device``.
        normalizer: raw pixels -> network input (:class:`~tilewise.pipeline.job.Normalizer`).
        classes: object classes kept (None: all).
        score_threshold: detections scoring below it are dropped.
        mask_threshold: a pixel belongs to a detection whose mask probability reaches it.
        min_area: the stage drops objects of fewer pixels (after checking they were seen whole).
        device: where the network runs.
    """

    def __init__(
        self,
        image: Any,
        model: MaskRCNN,
        normalizer: Any,
        *,
        classes: list[int] | None = None,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        min_area: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.image = image
        self.model = model
        self.normalizer = normalizer
        self.classes = None if classes is None else {int(c) for c in classes}
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.min_area = int(min_area)
        self.device = torch.device(device)

    def find(self, y0: int, y1: int, x0: int, x1: int) -> list[Obj]:
        """The detections in rows ``[y0, y1)``, columns ``[x0, x1)``, masks cut to the window."""
        ay0, ax0 = y0 // ALIGN * ALIGN, x0 // ALIGN * ALIGN
        raw = np.ascontiguousarray(self.image.read(ay0, y1, ax0, x1))
        block = torch.from_numpy(raw)[None].to(self.device)
        with torch.inference_mode():
            found = self.model.detect(self.normalizer(block), paste=False)[0]
        boxes = found["boxes"].double().cpu()
        scores = found["scores"].cpu()
        cap = self.model.config.box_detections_per_img
        if scores.numel() >= cap and float(scores.min()) >= self.score_threshold:
            # Detections come out best first: the cap cut some that may pass the threshold.
            raise PlanError(
                f"instances: the window rows {y0}..{y1 - 1}, columns {x0}..{x1 - 1} holds at "
                f"least {cap} detections scoring {self.score_threshold} or more, the most a "
                f"window keeps (output.instances.max_detections, or model.args "
                f"box_detections_per_img), so objects may be missing. Raise max_detections "
                f"(e.g. to {2 * cap}) or use a smaller output.chunk."
            )
        labels = found["labels"].cpu()
        probs = found["mask_probs"].float().cpu()
        objects: list[Obj] = []
        for k in range(int(boxes.shape[0])):
            score, cls = float(scores[k]), int(labels[k])
            if score < self.score_threshold or (
                self.classes is not None and cls not in self.classes
            ):
                continue
            bx0, by0, bx1, by1 = (float(v) for v in boxes[k])
            # The anchor is the box centre in image pixels: it does not depend on the window.
            anchor = (ay0 + math.floor((by0 + by1) / 2), ax0 + math.floor((bx0 + bx1) / 2))
            mask = self._paste(probs[k], (bx0, by0, bx1, by1), ay0, ax0, (y0, y1, x0, x1))
            if mask is None:
                continue
            crop, oy, ox = mask
            objects.append(Obj(cls, score, crop, oy, ox, anchor))
        return objects

    def _paste(
        self,
        prob: torch.Tensor,
        box: tuple[float, float, float, float],
        ay0: int,
        ax0: int,
        window: tuple[int, int, int, int],
    ) -> tuple[np.ndarray, int, int] | None:
        """The detection's binary mask, pasted into its box only, cut to the window, tight."""
        bx0, by0, bx1, by1 = box
        m = prob.shape[-1]
        # Bilinear pasting reaches half a mask cell beyond the box (paste_masks); one cell more
        # is kept as a margin. Rows and columns are in the aligned read's frame.
        my, mx = (by1 - by0) / m + 1, (bx1 - bx0) / m + 1
        wy0, wy1, wx0, wx1 = window
        r0 = max(wy0 - ay0, math.floor(by0 - my))
        r1 = min(wy1 - ay0, math.ceil(by1 + my))
        c0 = max(wx0 - ax0, math.floor(bx0 - mx))
        c1 = min(wx1 - ax0, math.ceil(bx1 + mx))
        if r0 >= r1 or c0 >= c1:
            return None
        local = torch.tensor([[bx0 - c0, by0 - r0, bx1 - c0, by1 - r0]], dtype=torch.float64)
        pasted = paste_masks(prob[None].double(), local, r1 - r0, c1 - c0)[0]
        binary = (pasted >= self.mask_threshold).numpy()
        rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
        if rows.size == 0:
            return None
        crop = binary[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        return np.ascontiguousarray(crop), ay0 + r0 + int(rows[0]), ax0 + c0 + int(cols[0])


@dataclass(frozen=True)
class DetectionFactory:
    """A picklable recipe for a :class:`DetectionSource`: each stage actor builds the image
    reader and the network once.

    Attributes:
        job: the single-image predict job, as ``PredictJob.model_dump(mode="json")``.
        device: ``cpu`` or ``cuda``.
        threads: torch CPU threads of the actor (a fixed count keeps CPU sums reproducible).
    """

    job: dict[str, Any]
    device: str = "cpu"
    threads: int = 1

    def __call__(self) -> DetectionSource:
        job = PredictJob.model_validate(self.job)
        if self.device == "cpu":
            torch.set_num_threads(max(1, self.threads))
        image = open_input(job)
        model = build_detector(job, image.shape[0]).to(self.device)
        spec = job.output.instances
        assert spec is not None  # an instance arch always has the stage (spec rule)
        return DetectionSource(
            image,
            model,
            Normalizer(job.input.normalize, image.dtype, image.shape[0]),
            classes=spec.classes,
            score_threshold=spec.score_threshold,
            mask_threshold=spec.mask_threshold,
            min_area=spec.min_area,
            device=self.device,
        )

    @property
    def fingerprint(self) -> str:
        """The settings that determine the detections (weights by size and time)."""
        job = PredictJob.model_validate(self.job)
        spec = job.output.instances
        assert spec is not None
        return json.dumps(
            {
                "source": "detections",
                "input": job.input.model_dump(mode="json", exclude={"storage_options"}),
                "model": job.model.model_dump(mode="json"),
                "weights": weights_stamp(job.model.weights),
                "instances": spec.model_dump(mode="json", exclude={"table", "halo"}),
                "device": self.device,
                "threads": self.threads,
            },
            sort_keys=True,
        )


def detector_args(job: PredictJob) -> dict[str, Any]:
    """``model.args`` with the detector's caps following output.instances.max_detections (per
    window) unless the job sets them: the detections, and the proposals they come from (the
    tiny preset keeps 75, too few for a window crowded with cells). The job itself is left as
    it is (a package's args must stay the package's)."""
    spec = job.output.instances
    assert spec is not None
    args = dict(job.model.args)
    args.setdefault("box_detections_per_img", spec.max_detections)
    args.setdefault("rpn_pre_nms_top_n_test", spec.max_detections)
    args.setdefault("rpn_post_nms_top_n_test", spec.max_detections)
    return args


def _detected_pixels(grid: UnitGrid, halo: int) -> tuple[int, int]:
    """Pixels the detector reads over all units (windows from their 32-aligned origins), and
    the largest window side."""
    computed = largest = 0
    for u in range(len(grid)):
        wy0, wy1, wx0, wx1 = window_of(grid.unit(u), halo, grid.height, grid.width)
        h, w = wy1 - wy0 // ALIGN * ALIGN, wx1 - wx0 // ALIGN * ALIGN
        computed += h * w
        largest = max(largest, h, w)
    return computed, largest


def run_detection_job(
    job: PredictJob,
    *,
    address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """Run a predict job whose network is an instance architecture (see the module docstring).

    Every image is opened and checked, and the network built once (a weights file that does not
    fit fails here), before any output is created. Returns the run's
    :class:`~tilewise.pipeline.driver.RunReport`.
    """
    from tilewise.pipeline.driver import RunReport, _connect, actor_layout

    t0 = time.perf_counter()
    singles = expand_images(job)
    images = [open_input(j) for j in singles]
    for j, image in zip(singles, images, strict=True):
        channels = image.shape[0]
        if j.model.in_channels is not None and j.model.in_channels != channels:
            raise InputError(
                f"the model takes {j.model.in_channels} input channels (model.in_channels) but "
                f"the input {j.input.path} has {channels}. Set model.in_channels: {channels}, or "
                f"check input.axes."
            )
    build_detector(singles[0], images[0].shape[0])  # weights that do not fit fail before output
    for j in singles:  # every output can be created, before any is
        OutputStore(j.output.path, j.output.storage_options).check_location()
    started = _connect(address or job.compute.address)
    reports: list[RunReport] = []
    try:
        import ray

        resources = ray.cluster_resources()
        layout = actor_layout(
            job.compute,
            cpus=float(resources.get("CPU", 1)),
            gpus=float(resources.get("GPU", 0)),
            workers=workers,
        )
        threads = max(1, int(layout.cpus_each))
        for j, image in zip(singles, images, strict=True):
            reports.append(_run_image(j, image, layout, threads, overwrite, progress, t0))
    finally:
        if started:
            import ray

            ray.shutdown()
    if len(reports) == 1:
        return reports[0]
    total = RunReport(
        name=job.name or "job",
        output=job.output.path,
        status="complete",
        units_total=sum(r.units_total for r in reports),
        units_computed=sum(r.units_computed for r in reports),
        units_skipped=sum(r.units_skipped for r in reports),
        output_pixels=sum(r.output_pixels for r in reports),
        computed_pixels=sum(r.computed_pixels for r in reports),
        seconds=time.perf_counter() - t0,
        workers=reports[0].workers,
        device=reports[0].device,
        arch=job.model.arch,
        tile=reports[0].tile,
        halo=reports[0].halo,
        stitch="instances",
        computed_output=sum(r.computed_output for r in reports),
        images=[r.to_dict() for r in reports],
    )
    total.instances = {
        "objects": sum(int((r.instances or {}).get("objects", 0)) for r in reports),
        "halo": reports[0].halo,
        "table": "per image",
    }
    return total


def _run_image(
    job: PredictJob,
    image: InputImage,
    layout: Any,
    threads: int,
    overwrite: bool,
    progress: bool,
    t0: float,
) -> Any:
    from tilewise.pipeline.driver import RunReport
    from tilewise.pipeline.instance_stage import run_instances

    o, spec = job.output, job.output.instances
    assert spec is not None
    channels, height, width = image.shape
    chunk = o.chunk or DEFAULT_CHUNK
    side = o.shard or chunk
    factory = DetectionFactory(job.model_dump(mode="json"), layout.device, threads)
    out_layout = OutputLayout(
        height=height,
        width=width,
        num_classes=job.model.num_classes,
        chunk=chunk,
        shard=o.shard,
        labels=None,
        probabilities=None,
        compressor=o.compressor,
        scale=image.scale,
        class_names=job.model.class_names,
        levels=1,
    )
    out = OutputStore(o.path, o.storage_options)
    fingerprint = fingerprint_of(
        {
            "detections": factory.fingerprint,
            "output": o.model_dump(
                mode="json", exclude={"overwrite", "storage_options", "path", "instances"}
            ),
        }
    )
    resumed = out.prepare(
        out_layout,
        fingerprint=fingerprint,
        job=job.model_dump(mode="json"),
        carried=image.carried_attributes(),
        overwrite=overwrite or o.overwrite,
    )

    def show(phase: str, done: int, total: int) -> None:
        print(f"\r  instances: {phase} {done}/{total} units", end="", file=sys.stderr, flush=True)

    stage = run_instances(
        out.location,
        factory,
        chunk=side,
        halo=spec.halo,
        image_shape=(height, width),
        workers=layout.actors,
        class_names=job.model.class_names,
        table_format=spec.table,
        storage_options=o.storage_options or None,
        actor_options={"num_cpus": layout.cpus_each, "num_gpus": layout.gpus_each},
        progress=show if progress else None,
        scale=image.scale,
        attributes=image.carried_attributes(),
    )
    if progress:
        print(file=sys.stderr)
    grid = UnitGrid(height, width, side)
    computed, _ = _detected_pixels(grid, spec.halo)
    found = stage.units_found
    report = RunReport(
        name=job.name or "job",
        output=out.location,
        status="complete",
        units_total=len(grid),
        units_computed=found,
        units_skipped=len(grid) - found if resumed else 0,
        output_pixels=height * width if found else 0,
        computed_pixels=computed if found else 0,
        seconds=time.perf_counter() - t0,
        workers=layout.actors,
        device=layout.device,
        arch=job.model.arch,
        tile=side,
        halo=spec.halo,
        stitch="instances",
        input_shape=[channels, height, width],
        computed_output=height * width if found else 0,
        precision="float32",
        first_unit_seconds=0.0,
    )
    report.instances = stage.to_dict()
    if not (out.was_complete and not found):
        # a rerun of a finished job computes nothing and keeps the stored report
        out.complete_levels()
        out.mark_complete(report.to_dict())
    return report


# -- plan ---------------------------------------------------------------------------------------
@dataclass
class DetectionPlan:
    """What ``tilewise run --plan`` shows for a job with an instance architecture."""

    name: str
    arch: str
    images: list[dict[str, Any]]
    actors: int
    cpus_each: float
    gpus_each: float
    device: str
    halo: int
    weights_bytes: int
    features_bytes: int
    heads_bytes: int
    window: int

    @property
    def actor_bytes(self) -> int:
        """Estimated peak tensor memory of one actor (weights, window, features, heads)."""
        return self.weights_bytes + self.features_bytes + self.heads_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**asdict(self), "actor_bytes": self.actor_bytes}

    def lines(self) -> list[str]:
        """The plan as text."""
        from tilewise.pipeline.plan import _mpx, _size

        out = [f"plan of '{self.name}': {self.arch}, objects stitched by the instance stage"]
        for im in self.images:
            out += [
                f"  image    {im['input']}: {im['height']} x {im['width']} px -> {im['output']}",
                f"  units    {im['units']} of {im['unit']} px; windows up to {self.window} px "
                f"(unit + halo {self.halo}, from a multiple of {ALIGN})",
                f"  overlap  {im['computed_pixels'] / max(1, im['output_pixels']):.2f}x "
                f"({_mpx(im['computed_pixels'])} detected for {_mpx(im['output_pixels'])})",
            ]
        where = "GPU" if self.device == "cuda" else "host"
        out += [
            f"  actors   {self.actors} on {self.device}, {self.cpus_each:g} CPU and "
            f"{self.gpus_each:g} GPU each",
            f"  memory   about {_size(self.actor_bytes)} of {where} memory per actor: weights "
            f"{_size(self.weights_bytes)}, window and feature maps {_size(self.features_bytes)}, "
            f"RoI heads {_size(self.heads_bytes)} (estimate)",
        ]
        return out


def plan_detection(
    job: PredictJob, *, address: str | None = None, workers: int | None = None
) -> DetectionPlan:
    """Plan an instance-architecture job without running it (nothing is created).

    The backbone's and FPN's tensor memory for the largest window is measured on the meta
    device; the RoI heads are estimated from ``max_detections`` proposals at their pooled sizes.
    """
    from tilewise.pipeline.cluster import cluster_address
    from tilewise.pipeline.driver import actor_layout
    from tilewise.pipeline.plan import LiveTensorTracker, _cluster_resources, _local_resources

    singles = expand_images(job)
    joined, where = cluster_address(address, job.compute.address)
    resources = _cluster_resources(joined, where) if joined else _local_resources()
    layout = actor_layout(job.compute, cpus=resources.cpus, gpus=resources.gpus, workers=workers)
    spec = job.output.instances
    assert spec is not None
    images, window, channels = [], 0, 3
    for j in singles:
        image = open_input(j)
        channels, height, width = image.shape
        side = j.output.shard or j.output.chunk or DEFAULT_CHUNK
        grid = UnitGrid(height, width, side)
        computed, largest = _detected_pixels(grid, spec.halo)
        window = max(window, largest)
        images.append(
            {
                "input": j.input.path,
                "output": j.output.path,
                "height": height,
                "width": width,
                "unit": side,
                "units": len(grid),
                "output_pixels": height * width,
                "computed_pixels": computed,
            }
        )
    m = singles[0].model
    with torch.device("meta"):
        model = create_instance_model(
            m.arch, in_channels=channels, num_classes=m.num_classes, **detector_args(singles[0])
        )
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    padded = -(-window // ALIGN) * ALIGN
    tracker = LiveTensorTracker()
    with torch.inference_mode(), torch.device("meta"):
        x = torch.empty((1, channels, padded, padded))
        with tracker:
            tracker.track(x)
            model.backbone(x)  # the pyramid P2..P6 stays alive while the heads run
    features = tracker.peak
    cfg = model.config
    # Per proposal: its pooled box features and MLP activations. Per detection: two of the mask
    # head's m x m maps alive at once, the up-sampled 2m x 2m map and the K mask logits.
    m2, k = cfg.mask_roi_size**2, m.num_classes
    per_box = (cfg.fpn_channels * cfg.box_roi_size**2 + 2 * cfg.representation_size) * 4
    per_mask = (2 * cfg.mask_head_channels * m2 + (cfg.mask_head_channels + k) * 4 * m2) * 4
    heads = cfg.rpn_post_nms_top_n_test * per_box + spec.max_detections * per_mask
    return DetectionPlan(
        name=job.name or "job",
        arch=m.arch,
        images=images,
        actors=layout.actors,
        cpus_each=layout.cpus_each,
        gpus_each=layout.gpus_each,
        device=layout.device,
        halo=spec.halo,
        weights_bytes=int(weights),
        features_bytes=int(features),
        heads_bytes=int(heads),
        window=window,
    )
