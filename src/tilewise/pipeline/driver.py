"""The driver of a predict job: plan, skip finished units, run the rest on Ray, report.

Ray is used here and in :mod:`tilewise.workers` only. Without an address the driver starts an
embedded single-node Ray; with ``--address``/``RAY_ADDRESS`` (or inside ``ray job submit``) it
joins that cluster. The driver hands out unit indices dynamically, a couple in flight per actor,
so faster actors take more units.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tilewise.errors import TilewiseError
from tilewise.pipeline.cluster import cluster_address, join
from tilewise.pipeline.job import PreparedJob, build_model, expand_images, prepare
from tilewise.pipeline.output import OutputStore
from tilewise.spec import ComputeSpec, PredictJob
from tilewise.workers.predictor import UnitResult

__all__ = ["ActorLayout", "RunReport", "actor_layout", "run_job"]

# glibc returns large freed blocks to the OS on every free; with activations of tens of MB a
# forward pass then spends more time page-faulting than convolving (reference/performance.md).
# Raising the thresholds fixes that for the main arena only: the predictor computes in Ray's
# actor threads, whose arenas grow in heaps of at most 64 MB, so any larger block (a U-Net's
# skip concatenation) is still mmap-ed and unmapped per forward, which made the threaded actor
# 2x slower than the same forwards on the main thread (bench/README.md). One arena sends every
# thread to the main heap; the few threads of an actor barely contend for it.
# The trim threshold is far above any heap (1 TiB): at 1 GiB, a network of 1.95 M weights (depth
# 4, base width 16, 736 px windows) let the heap's free top pass 1 GiB every few units in some
# runs, and glibc gave it back and faulted it in again: 1.1-14 M page faults and 63-77 s for an
# 8,192² job, against 0.59 M and 61-62 s with trimming off (bench/README.md).
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "1073741824",
    "MALLOC_TRIM_THRESHOLD_": "1099511627776",
    "MALLOC_ARENA_MAX": "1",
}
# A call waiting this much longer than a typical unit (and at least STALL_MIN_SECONDS) while
# other actors idle is copied to one of them (see _run_units).
STALL_FACTOR = 5.0
STALL_MIN_SECONDS = 10.0
STALL_CHECK_SECONDS = 2.0

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    """What a run did; printed at the end and stored in the output's attributes."""

    name: str
    output: str
    status: str
    units_total: int
    units_computed: int
    units_skipped: int
    output_pixels: int
    computed_pixels: int
    seconds: float
    workers: int = 0
    device: str = ""
    arch: str = ""
    tile: int = 0
    halo: int = 0
    stitch: str = ""
    input_shape: list[int] = field(default_factory=list)
    units_background: int = 0
    computed_output: int = 0  # output pixels of the units the network computed
    precision: str = ""
    images: list[dict[str, Any]] = field(default_factory=list)
    # Seconds from the start until the first unit was written: planning, starting Ray and the
    # actors (importing torch, building the network) and one unit. The rest of ``seconds`` is
    # the steady state.
    first_unit_seconds: float = 0.0
    preview: str | None = None  # the PNG quicklook, when the job asked for one
    instances: dict[str, Any] | None = None  # the instance stage's report, when asked for

    @property
    def mpx_per_s(self) -> float:
        """Output megapixels per second of this run (0 when nothing was computed)."""
        return self.output_pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def overlap(self) -> float:
        """Computed pixels per output pixel of the computed units (the price of the halo)."""
        return self.computed_pixels / self.computed_output if self.computed_output else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with the derived figures."""
        return {
            **asdict(self),
            "mpx_per_s": round(self.mpx_per_s, 4),
            "overlap": round(self.overlap, 4),
        }

    def lines(self) -> list[str]:
        """The one-screen report."""
        if self.input_shape:
            c, h, w = [*self.input_shape, 0, 0, 0][:3]
            source = f"{c} x {h} x {w} (bands x height x width)"
        else:  # a job over several images: each has its line below
            source = f"{len(self.images)} images"
        return [
            f"tilewise run '{self.name}': {self.status}",
            f"  input    {source}",
            f"  model    {self.arch}: tile {self.tile}, halo {self.halo}, stitch {self.stitch}",
            f"  units    {self.units_computed} computed, {self.units_background} background "
            f"(no foreground), {self.units_skipped} skipped (already done), {self.units_total} "
            f"in all",
            f"  pixels   {self.output_pixels / 1e6:.1f} Mpx written in {self.seconds:.1f} s: "
            f"{self.mpx_per_s:.2f} Mpx/s; overlap overhead {self.overlap:.2f}x",
            f"  workers  {self.workers} on {self.device or '-'}",
            f"  output   {self.output}",
            *([f"  preview  {self.preview}"] if self.preview else []),
            *(
                [
                    f"  objects  {self.instances['objects']} instances (halo "
                    f"{self.instances['halo']}) -> instances/ and {self.instances['table']}"
                ]
                if self.instances
                else []
            ),
            *(
                f"  image    {r['name']}: {r['units_computed']} computed, "
                f"{r['units_background']} background -> {r['output']}"
                for r in self.images
            ),
        ]


def _connect(address: str | None) -> bool:
    """Join a cluster, or start an embedded one; return whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    address, where = cluster_address(address)
    if address:
        join(address, where, runtime_env={"env_vars": ALLOCATOR_ENV})
        return False
    # An embedded cluster's processes inherit the allocator settings instead: a job runtime_env
    # makes Ray start every actor through its runtime-env set-up (a new process after
    # setup_worker.py) rather than in the workers it starts with ray.init, about 0.5 s later.
    # The driver's own allocator is set up already, so this does not change it.
    saved = {k: os.environ.get(k) for k in ALLOCATOR_ENV}
    os.environ.update(ALLOCATOR_ENV)
    try:
        ray.init(
            address="local",  # never attach to a stale /tmp/ray/ray_current_cluster by accident
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=128 * 1024**2,  # only unit indices travel through it
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


@dataclass(frozen=True)
class ActorLayout:
    """How many predictor actors a job gets and what each reserves."""

    actors: int
    cpus_each: float
    gpus_each: float
    device: str


def actor_layout(
    compute: ComputeSpec, *, cpus: float, gpus: float, workers: int | None = None
) -> ActorLayout:
    """Predictor actors for a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    ``workers`` overrides ``compute.workers``. With CUDA the default is one actor per GPU
    (``actors_per_gpu`` per GPU when set); on a CPU-only cluster one actor with every CPU,
    since torch already spreads one forward pass over all the threads it is given.
    """
    c = compute
    device = c.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise TilewiseError(
            "compute.device is 'cuda' but the Ray cluster has no GPU. Use device: auto (CPU "
            "when there is no GPU) or start the cluster on GPU nodes."
        )
    per_gpu = c.actors_per_gpu or 1
    if device == "cuda":
        n = workers or c.workers or max(1, int(gpus) * per_gpu)
        if c.gpus_per_worker is not None:
            gpus_each = c.gpus_per_worker
        elif c.actors_per_gpu is not None:
            gpus_each = 1.0 / per_gpu
        else:
            gpus_each = min(1.0, gpus / n)
    else:
        n = workers or c.workers or 1
        gpus_each = 0.0
    cpus_each = c.cpus_per_worker or max(1.0, float(int(cpus // n)))
    return ActorLayout(n, cpus_each, gpus_each, device)


def layout_shortfall(layout: ActorLayout, *, cpus: float, gpus: float) -> str | None:
    """Why some of ``layout``'s actors cannot start on a cluster of ``cpus`` and ``gpus`` now,
    with the fix; None when all fit.

    Ray keeps such actors pending until a node with room joins: an autoscaling cluster adds one,
    a fixed cluster never does, and the units handed to them wait until the others take them.
    """
    fit = layout.actors
    if layout.cpus_each > 0:
        fit = min(fit, int(cpus / layout.cpus_each + 1e-9))
    if layout.gpus_each > 0:
        fit = min(fit, int(gpus / layout.gpus_each + 1e-9))
    if fit >= layout.actors:
        return None
    return (
        f"{layout.actors} predictor actors of {layout.cpus_each:g} CPUs and {layout.gpus_each:g} "
        f"GPUs need {layout.actors * layout.cpus_each:g} CPUs and "
        f"{layout.actors * layout.gpus_each:g} GPUs, but the cluster has {cpus:g} and {gpus:g}: "
        f"{layout.actors - fit} would wait for a node with room (an autoscaling cluster adds "
        f"one; a fixed one never does). Use compute.workers: {max(fit, 1)} (or --workers), or "
        f"fewer compute.cpus_per_worker."
    )


@dataclass
class _Image:
    """Driver-side state of one image of the job."""

    prepared: PreparedJob
    output: OutputStore
    report: RunReport
    background: set[int]
    todo: list[int]
    # complete before this run (a rerun of a finished job): its stored report is kept
    finished: bool = False


def _connect_actors(jobs: list[dict[str, Any]], layout: ActorLayout, prefetch: int) -> list[Any]:
    import ray

    from tilewise.workers.predictor import Predictor

    actor_class: Any = ray.remote(Predictor)
    return [
        actor_class.options(
            num_cpus=layout.cpus_each,
            num_gpus=layout.gpus_each,
            # Threaded actor: the calls in flight read and write while one computes.
            max_concurrency=prefetch + 1,
            # A lost actor (its process or its node) is restarted and its calls retried; units
            # are idempotent (same bytes), so a retry is harmless.
            max_restarts=-1,
            max_task_retries=-1,
        ).remote(jobs, threads=int(layout.cpus_each), device=layout.device)
        for _ in range(layout.actors)
    ]


def _run_units(
    jobs: list[dict[str, Any]],
    todo: list[tuple[int, int, bool]],
    layout: ActorLayout,
    prefetch: int,
    on_done: Callable[[UnitResult], None],
) -> None:
    """Hand ``(image, unit, background)`` items to a pool of actors until all are done.

    Scheduling is dynamic: each actor has ``prefetch + 1`` calls in flight and gets the next
    item as soon as one returns, so faster actors take more units. An actor that dies for good
    (Ray gives up restarting it) has its items put back for the others. Once the queue is empty,
    a call that has waited far longer than units take (its actor lost with its node and waiting
    for a place to restart) is also given to an idle actor: units are idempotent, so whichever
    copy finishes first counts and the other rewrites the same bytes.
    """
    import statistics

    import ray

    actors = _connect_actors(jobs, layout, prefetch)
    queue = list(reversed(todo))
    pending: dict[Any, tuple[int, tuple[int, int, bool], float]] = {}
    alive = set(range(len(actors)))
    done: set[tuple[int, int, bool]] = set()
    copied: set[tuple[int, int, bool]] = set()
    durations: list[float] = []
    progress = [time.perf_counter(), 0.0]  # last unit finished, last stall warning

    def submit(a: int, item: tuple[int, int, bool] | None = None) -> None:
        if item is None:
            if not queue or a not in alive:
                return
            item = queue.pop()
        pending[actors[a].run_unit.remote(*item)] = (a, item, time.perf_counter())

    def in_flight(a: int) -> int:
        return sum(1 for b, _, _ in pending.values() if b == a)

    def copy_stalled() -> None:
        if queue:
            return
        typical = statistics.median(durations) if durations else 0.0
        limit = max(STALL_MIN_SECONDS, STALL_FACTOR * typical)
        now = time.perf_counter()
        for a, item, since in list(pending.values()):
            if item in done or item in copied or now - since < limit:
                continue
            idle = [b for b in alive if b != a and in_flight(b) <= prefetch]
            if idle:
                copied.add(item)
                submit(idle[0], item)

    def warn_stalled() -> None:
        # Ray retries the calls of a lost actor forever and never fails them: when no node can
        # take it (one actor, or every actor lost), the run would otherwise stop silently.
        typical = statistics.median(durations) if durations else 0.0
        limit = max(STALL_MIN_SECONDS, STALL_FACTOR * typical)
        now = time.perf_counter()
        if now - progress[0] > limit and now - progress[1] > limit:
            progress[1] = now
            log.warning(
                "no unit has finished for %.0f s (%d of %d done); Ray may be waiting for a node "
                "with the resources to restart lost predictor actors (`ray status` shows pending "
                "demands). Finished units are kept: stopping and rerunning the job resumes.",
                now - progress[0],
                len(done),
                len(todo),
            )

    try:
        for a in range(len(actors)):
            for _ in range(prefetch + 1):
                submit(a)
        while len(done) < len(todo):
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=STALL_CHECK_SECONDS)
            if not ready:
                copy_stalled()
                warn_stalled()
                continue
            progress[0] = time.perf_counter()
            ref = ready[0]
            a, item, since = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, TilewiseError) else None
                if cause is not None:
                    raise cause from None
                raise
            except ray.exceptions.ActorDiedError:
                alive.discard(a)
                if item not in done:
                    queue.append(item)
                if not alive:
                    raise TilewiseError(
                        "every predictor actor died and Ray could not restart them (lost nodes "
                        "or out of memory?); finished units are kept: run the job again to "
                        "resume."
                    ) from None
                for b in alive:
                    while in_flight(b) <= prefetch and queue:
                        submit(b)
                continue
            except ray.exceptions.RayActorError:
                if item not in done:
                    queue.append(item)  # the actor is restarting: whoever is free takes it
                submit(a)
                continue
            durations.append(time.perf_counter() - since)
            if item not in done:
                done.add(item)
                on_done(result)
            submit(a)
    finally:
        # Calls still in flight are cancelled first: a killed actor's calls would otherwise be
        # reported as "will be retried" (max_task_retries=-1) on the user's terminal.
        for ref in pending:
            ray.cancel(ref)
        for actor in actors:
            ray.kill(actor)


def run_job(
    job: PredictJob,
    *,
    address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shuffle: int | None = None,
) -> RunReport:
    """Run a predict job to completion (resuming a previous run of the same job).

    Every image of the job is opened and checked, and its mask planned, before any output is
    created; then all units of all images go to one pool of actors.

    Args:
        job: the validated job (one image, or a list or glob of images).
        address: Ray cluster address (overrides ``compute.address`` and ``RAY_ADDRESS``).
        workers: predictor actors (overrides ``compute.workers``).
        overwrite: replace existing outputs, even of another job.
        progress: show a progress bar (units, Mpx/s, ETA).
        shuffle: hand out units in a random order with this seed (tests of order-freedom).

    Returns:
        The run's report (each image's own report is stored in its output's attributes); for
        several images, the totals with one entry per image in ``images``.
    """
    if job.model.instance:  # Mask R-CNN: no score maps; the instance stage runs the detector
        from tilewise.pipeline.detect import run_detection_job

        report: RunReport = run_detection_job(
            job, address=address, workers=workers, overwrite=overwrite, progress=progress
        )
        return report
    t0 = time.perf_counter()
    singles = expand_images(job)
    prepared = [prepare(j) for j in singles]
    if job.model.weights:  # a weights file that does not fit fails here, before any output exists
        build_model(singles[0], prepared[0].in_channels)
    backgrounds = [_background_units(p) for p in prepared]
    outputs = [OutputStore(p.job.output.path, p.job.output.storage_options) for p in prepared]
    for out in outputs:  # every output can be created, before any is
        out.check_location()
    images: list[_Image] = []
    for p, background, out in zip(prepared, backgrounds, outputs, strict=True):
        j = p.job
        resumed = out.prepare(
            p.layout,
            fingerprint=p.fingerprint,
            job=j.model_dump(mode="json"),
            carried=p.image.carried_attributes(),
            overwrite=overwrite or j.output.overwrite,
        )
        done = out.done_units() if resumed else set()
        report = _report(j, p, out, skipped=len(done))
        # Handed out in bands (UnitGrid.band_order): an actor's next unit mostly shares the
        # input chunks it has just decoded.
        remaining = [k for k in p.grid.band_order() if k not in done]
        finished = out.was_complete and not remaining
        images.append(_Image(p, out, report, background, remaining, finished=finished))
    todo = [(i, k, k in im.background) for i, im in enumerate(images) for k in im.todo]
    if shuffle is not None:
        random.Random(shuffle).shuffle(todo)
    workers_used, device = 0, ""
    # The instance stage runs on Ray too, and decides itself whether a rerun has work left.
    if todo or (job.output.instances is not None and not all(im.finished for im in images)):
        started = _connect(address or job.compute.address)
        try:
            if todo:
                workers_used, device = _run_with_progress(images, todo, workers, job, progress, t0)
            # Complete as soon as every unit is written: an embedded Ray's shutdown (about
            # 1.4 s of stopping its processes one by one) is not part of the run.
            seconds = _finish(images, t0, workers_used, device, workers, progress)
        finally:
            if started:
                import ray

                ray.shutdown()
    else:
        seconds = _finish(images, t0, workers_used, device)
    if len(images) == 1:
        return images[0].report
    total = _report(job, prepared[0], images[0].output, skipped=0)
    total.output = job.output.path
    total.input_shape = []
    for name in (
        "units_total",
        "units_computed",
        "units_skipped",
        "units_background",
        "output_pixels",
        "computed_pixels",
        "computed_output",
    ):
        setattr(total, name, sum(getattr(im.report, name) for im in images))
    total.seconds, total.workers, total.device = seconds, workers_used, device
    total.first_unit_seconds = images[0].report.first_unit_seconds
    total.images = [im.report.to_dict() for im in images]
    return total


def _finish(
    images: list[_Image],
    t0: float,
    workers: int,
    device: str,
    requested_workers: int | None = None,
    progress: bool = False,
) -> float:
    """Build what follows the units (pyramid levels, instances, previews), then mark every
    image's output complete with its report; return the run's seconds. An output that was
    complete already is left as it is, its stored report included."""
    unfinished = [im for im in images if not im.finished]
    for im in unfinished:
        im.output.complete_levels()
        if im.prepared.job.output.instances is not None:
            im.report.instances = _instances(im, workers or requested_workers, progress)
        preview = im.prepared.job.output.preview
        if preview is not None:
            from tilewise.pipeline.preview import write_preview

            im.report.preview = write_preview(
                im.output.location,
                preview.path,
                level=preview.level,
                max_size=preview.max_size,
                alpha=preview.alpha,
                storage_options=im.output.storage_options,
                complete=True,  # every unit is written; the status follows below
            ).path
    # The levels and previews built at the end are part of the run's time.
    seconds = time.perf_counter() - t0
    for im in images:
        im.report.seconds = seconds
        im.report.workers, im.report.device = workers, device
    for im in unfinished:
        im.output.mark_complete(im.report.to_dict())
    return seconds


def _instances(im: _Image, workers: int | None, progress: bool) -> dict[str, Any]:
    """Run the instance stage of one image's output (Ray is connected); its report."""
    from tilewise.pipeline.instance_stage import run_instances
    from tilewise.pipeline.instances import ComponentsFactory

    job, layout = im.prepared.job, im.prepared.layout
    spec = job.output.instances
    assert spec is not None
    classes = spec.classes or list(range(1, max(2, layout.num_classes)))
    options = job.output.storage_options or None
    n = workers or job.compute.workers or _default_stage_workers()

    def show(phase: str, done: int, total: int) -> None:
        print(f"\r  instances: {phase} {done}/{total} units", end="", file=sys.stderr, flush=True)

    report = run_instances(
        im.output.location,
        ComponentsFactory(
            im.output.location,
            tuple(classes),
            spec.connectivity,
            spec.min_area,
            storage_options=options,
        ),
        chunk=im.prepared.grid.side,
        halo=spec.halo,
        image_shape=(layout.height, layout.width),
        workers=n,
        class_names=layout.class_names,
        table_format=spec.table,
        storage_options=options,
        progress=show if progress else None,
    )
    if progress:
        print(file=sys.stderr)
    return report.to_dict()


def _default_stage_workers() -> int:
    import ray

    return max(1, int(ray.available_resources().get("CPU", 1)))


def _background_units(prepared: PreparedJob) -> set[int]:
    """Units the job's tissue/array mask leaves without foreground (written, not computed)."""
    mask = prepared.job.input.mask
    if mask is None:
        return set()
    from tilewise.pipeline.masks import background_units

    units, _ = background_units(
        prepared.image, prepared.grid, mask, storage_options=prepared.job.input.storage_options
    )
    return units


def _report(job: PredictJob, p: PreparedJob, out: OutputStore, skipped: int) -> RunReport:
    return RunReport(
        name=job.name or "job",
        output=out.location,
        status="complete",
        units_total=len(p.grid),
        units_computed=0,
        units_skipped=skipped,
        output_pixels=0,
        computed_pixels=0,
        seconds=0.0,
        arch=job.model.arch,
        tile=p.plan.y.tile,
        halo=p.plan.y.halo,
        stitch=p.plan.stitch,
        input_shape=list(p.image.shape),
        precision=job.compute.precision,
    )


def _run_with_progress(
    images: list[_Image],
    todo: list[tuple[int, int, bool]],
    workers: int | None,
    job: PredictJob,
    progress: bool,
    t0: float,
) -> tuple[int, str]:
    import ray
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    resources = ray.cluster_resources()
    layout = actor_layout(
        job.compute,
        cpus=float(resources.get("CPU", 1)),
        gpus=float(resources.get("GPU", 0)),
        workers=workers,
    )
    layout = replace(layout, actors=min(layout.actors, len(todo)))
    short = layout_shortfall(
        layout, cpus=float(resources.get("CPU", 1)), gpus=float(resources.get("GPU", 0))
    )
    if short:
        log.warning("%s", short)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units"),
        TextColumn("{task.fields[mpx]:.2f} Mpx/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    start = time.perf_counter()
    jobs = [im.prepared.job.model_dump(mode="json") for im in images]
    written = 0
    # On stderr, like every other progress line: stdout carries only the report (--json).
    console = Console(stderr=True)
    with Progress(*columns, disable=not progress, transient=False, console=console) as bar:
        task = bar.add_task(job.name or "job", total=len(todo), mpx=0.0)

        def on_done(result: UnitResult) -> None:
            nonlocal written
            im = images[result.image]
            r = im.report
            if not written:
                first = time.perf_counter() - t0
                for other in images:
                    other.report.first_unit_seconds = first
            r.output_pixels += result.pixels
            written += result.pixels
            if result.computed:
                r.units_computed += 1
                r.computed_output += result.pixels
                r.computed_pixels += im.prepared.plan.computed_pixels(
                    im.prepared.compute_region(im.prepared.grid.unit(result.index))
                )
            else:
                r.units_background += 1
            rate = written / 1e6 / max(1e-9, time.perf_counter() - start)
            bar.update(task, advance=1, mpx=rate)

        _run_units(jobs, todo, layout, job.compute.prefetch, on_done)
    precision: str = job.compute.precision
    if precision == "auto":
        precision = "AMP bfloat16/float16" if layout.device == "cuda" else "float32"
    return layout.actors, f"{layout.device} ({precision})"
