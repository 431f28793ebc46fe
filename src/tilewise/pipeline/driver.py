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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tilewise.errors import TilewiseError
from tilewise.pipeline.job import PreparedJob, build_model, prepare
from tilewise.pipeline.output import OutputStore
from tilewise.spec import ComputeSpec, PredictJob

__all__ = ["ActorLayout", "RunReport", "actor_layout", "run_job"]

# glibc returns large freed blocks to the OS on every free; with activations of tens of MB a
# forward pass then spends more time page-faulting than convolving (reference/performance.md).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
IN_FLIGHT_PER_ACTOR = 2


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

    @property
    def mpx_per_s(self) -> float:
        """Output megapixels per second of this run (0 when nothing was computed)."""
        return self.output_pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def overlap(self) -> float:
        """Computed pixels per output pixel (the price of the halo)."""
        return self.computed_pixels / self.output_pixels if self.output_pixels else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with the derived figures."""
        return {
            **asdict(self),
            "mpx_per_s": round(self.mpx_per_s, 4),
            "overlap": round(self.overlap, 4),
        }

    def lines(self) -> list[str]:
        """The one-screen report."""
        c, h, w = [*self.input_shape, 0, 0, 0][:3]
        return [
            f"tilewise run '{self.name}': {self.status}",
            f"  input    {c} x {h} x {w} (bands x height x width)",
            f"  model    {self.arch}: tile {self.tile}, halo {self.halo}, stitch {self.stitch}",
            f"  units    {self.units_computed} computed, {self.units_skipped} skipped (already "
            f"done), {self.units_total} in all",
            f"  pixels   {self.output_pixels / 1e6:.1f} Mpx written in {self.seconds:.1f} s: "
            f"{self.mpx_per_s:.2f} Mpx/s; overlap overhead {self.overlap:.2f}x",
            f"  workers  {self.workers} on {self.device or '-'}",
            f"  output   {self.output}",
        ]


def _connect(address: str | None) -> bool:
    """Join a cluster, or start an embedded one; return whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env: dict[str, Any] = {"env_vars": ALLOCATOR_ENV}
    if address:
        ray.init(
            address=address,
            runtime_env=runtime_env,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        return False
    ray.init(
        address="local",  # never attach to a stale /tmp/ray/ray_current_cluster by accident
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=128 * 1024**2,  # only unit indices travel through it
        runtime_env=runtime_env,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
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


def _actor_resources(job: PredictJob, workers: int | None) -> tuple[int, float, float, str]:
    import ray

    resources = ray.cluster_resources()
    layout = actor_layout(
        job.compute,
        cpus=float(resources.get("CPU", 1)),
        gpus=float(resources.get("GPU", 0)),
        workers=workers,
    )
    return layout.actors, layout.cpus_each, layout.gpus_each, layout.device


def _run_units(
    prepared: PreparedJob,
    todo: list[int],
    workers: int | None,
    on_done: Callable[[int, int], None],
) -> tuple[int, str]:
    import ray

    from tilewise.workers.predictor import Predictor

    job = prepared.job
    n, cpus_each, gpus_each, device = _actor_resources(job, workers)
    n = min(n, len(todo))
    actor_class: Any = ray.remote(Predictor)
    data = job.model_dump(mode="json")
    actors = [
        actor_class.options(
            num_cpus=cpus_each, num_gpus=gpus_each, max_restarts=-1, max_task_retries=-1
        ).remote(data, threads=int(cpus_each), device=device)
        for _ in range(n)
    ]
    queue = list(reversed(todo))
    pending: dict[Any, Any] = {}

    def submit(actor: Any) -> None:
        if queue:
            pending[actor.run_unit.remote(queue.pop())] = actor

    for actor in actors:
        for _ in range(IN_FLIGHT_PER_ACTOR):
            submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        actor = pending.pop(ref)
        try:
            index, pixels, _seconds = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, TilewiseError) else None
            if cause is not None:
                raise cause from None
            raise
        on_done(index, pixels)
        submit(actor)
    for actor in actors:
        ray.kill(actor)
    return n, device


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

    Args:
        job: the validated job.
        address: Ray cluster address (overrides ``compute.address`` and ``RAY_ADDRESS``).
        workers: predictor actors (overrides ``compute.workers``).
        overwrite: replace an existing output, even one of another job.
        progress: show a progress bar (units, Mpx/s, ETA).
        shuffle: hand out units in a random order with this seed (tests of order-freedom).

    Returns:
        The run's report (also stored in the output's attributes).
    """
    t0 = time.perf_counter()
    prepared = prepare(job)
    if job.model.weights:  # a weights file that does not fit fails here, before any output exists
        build_model(job, prepared.in_channels)
    out = OutputStore(job.output.path, job.output.storage_options)
    resumed = out.prepare(
        prepared.layout,
        fingerprint=prepared.fingerprint,
        job=job.model_dump(mode="json"),
        carried=prepared.image.carried_attributes(),
        overwrite=overwrite or job.output.overwrite,
    )
    grid, plan = prepared.grid, prepared.plan
    done = out.done_units() if resumed else set()
    todo = [k for k in range(len(grid)) if k not in done]
    if shuffle is not None:
        random.Random(shuffle).shuffle(todo)
    report = RunReport(
        name=job.name or "job",
        output=out.location,
        status="complete",
        units_total=len(grid),
        units_computed=0,
        units_skipped=len(done),
        output_pixels=0,
        computed_pixels=0,
        seconds=0.0,
        arch=job.model.arch,
        tile=plan.y.tile,
        halo=plan.y.halo,
        stitch=plan.stitch,
        input_shape=list(prepared.image.shape),
    )
    if todo:
        started = _connect(address or job.compute.address)
        try:
            report.workers, report.device = _run_with_progress(
                prepared, todo, workers, report, progress
            )
        finally:
            if started:
                import ray

                ray.shutdown()
    report.seconds = time.perf_counter() - t0
    out.finish(report.to_dict())
    return report


def _run_with_progress(
    prepared: PreparedJob,
    todo: list[int],
    workers: int | None,
    report: RunReport,
    progress: bool,
) -> tuple[int, str]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(report.name, total=len(todo), mpx=0.0)

        def on_done(index: int, pixels: int) -> None:
            unit = prepared.grid.unit(index)
            report.units_computed += 1
            report.output_pixels += pixels
            report.computed_pixels += prepared.plan.computed_pixels(unit)
            rate = report.output_pixels / 1e6 / max(1e-9, time.perf_counter() - start)
            bar.update(task, advance=1, mpx=rate)

        return _run_units(prepared, todo, workers, on_done)
