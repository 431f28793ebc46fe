"""The instance stage on Ray: :func:`run_instances` over a finished (or just written) output.

It distributes the per-unit functions of :mod:`tilewise.pipeline.instances` over a small pool of
actors, each of which builds its object source once (a Mask R-CNN loads its weights once), in
two phases:

1. *find and own*: every unit without a record runs :func:`~tilewise.pipeline.instances.find_unit`
   on its window and writes its record;
2. the driver lists the records' counts (one listing, no record is read here), prefix-sums them
   into id offsets, creates ``instances/0``, and every unit not yet painted paints its core from
   its neighbours' records and writes its table part.

Only unit indices and offsets pass through Ray; workers read and write the store themselves
(DESIGN.md rule 2). Both phases skip what earlier runs finished, so an interrupted stage resumes,
and the result does not depend on the worker count or the order units ran in. ``instances``
carries its OME-Zarr label metadata only once every unit is painted: an output whose stage
stopped (or failed on an object larger than the halo) is never presented as finished.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tilewise.errors import ClusterError, ConfigError, PlanError, StoreNotFoundError, TilewiseError
from tilewise.pipeline.instances import (
    InstanceStore,
    ObjectSource,
    TableFormat,
    UnitRecord,
    _check_geometry,
    find_unit,
    id_offsets,
    neighbour_units,
    paint_unit,
    table_schema,
    unit_table,
)
from tilewise.pipeline.output import _compressors, _ome_image
from tilewise.pipeline.units import UnitGrid

__all__ = ["InstanceReport", "InstanceWorker", "run_instances"]

log = logging.getLogger(__name__)

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
# Units per actor call: enough to amortise a call (~1 ms) and let neighbouring units share the
# records they both read, few enough that work still spreads evenly over the actors.
MAX_UNITS_PER_CALL = 16
CALLS_IN_FLIGHT = 2  # per actor: one computing, one queued behind it

# (unit, [(owner unit, id offset, object count)], own id offset, own object count)
PaintItem = tuple[int, list[tuple[int, int, int]], int, int]


@dataclass
class InstanceReport:
    """What an instance stage did; stored in ``instances``' attributes and printed."""

    output: str
    objects: int
    units: int
    units_found: int
    units_painted: int
    max_objects_per_unit: int
    seconds: float
    workers: int
    halo: int
    table: str

    @property
    def objects_per_s(self) -> float:
        """Objects per second of this run (0 when it found nothing new)."""
        return self.objects / self.seconds if self.seconds > 0 and self.units_found else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "objects_per_s": self.objects_per_s}

    def lines(self) -> list[str]:
        """The report as printable lines."""
        return [
            "instances",
            f"  objects  {self.objects} (at most {self.max_objects_per_unit} per unit), halo "
            f"{self.halo} px",
            f"  units    {self.units_found} searched, {self.units_painted} painted, "
            f"{self.units} in all, in {self.seconds:.1f} s on {self.workers} workers",
            f"  output   {self.output}/instances, table {self.table}",
        ]


class InstanceWorker:
    """A Ray actor of the stage: builds its object source once, then finds and paints units."""

    def __init__(
        self,
        location: str,
        storage_options: dict[str, Any] | None,
        table_format: TableFormat,
        source_factory: Callable[[], ObjectSource],
        image_shape: tuple[int, int],
        chunk: int,
        halo: int,
        class_names: list[str] | None,
    ) -> None:
        self.store = InstanceStore(location, table_format, storage_options)
        self.grid = UnitGrid(image_shape[0], image_shape[1], chunk)
        self.halo = halo
        self.class_names = class_names
        self.factory = source_factory
        self._source: ObjectSource | None = None  # built on the first find, not for painting

    def find(self, units: list[int]) -> list[tuple[int, int]]:
        """Phase 1 of ``units``: write each one's record; return ``(unit, objects owned)``."""
        if self._source is None:
            self._source = self.factory()
        done = []
        for u in units:
            record = find_unit(self._source, self.grid, u, self.halo)
            self.store.write_record(u, record)
            done.append((u, len(record)))
        return done

    def paint(self, items: list[PaintItem]) -> list[int]:
        """Phase 2 of the units in ``items``: pixels, table part, then the marker."""
        counts: dict[int, int] = {}
        cache: dict[int, UnitRecord] = {}  # neighbouring units of one call share most records

        def load(v: int) -> UnitRecord:
            if v not in cache:
                cache[v] = self.store.read_record(v, counts[v])
            return cache[v]

        for u, owners, offset, count in items:
            counts.update((v, n) for v, _, n in owners)
            counts[u] = count
            pixels = paint_unit(self.grid, u, [(v, off) for v, off, _ in owners], load)
            self.store.write_unit(self.grid.unit(u), pixels)
            # Unit 0 always writes a part, so the table exists (with its columns) when empty.
            if count or u == 0:
                record = load(u) if count else UnitRecord.from_objects([])
                self.store.write_part(u, unit_table(record, offset, self.class_names))
            self.store.mark_painted(u)
        return [item[0] for item in items]


def run_instances(
    output_path: str,
    source_factory: Callable[[], ObjectSource],
    *,
    chunk: int,
    halo: int,
    image_shape: Sequence[int],
    workers: int,
    class_names: list[str] | None = None,
    table_format: TableFormat = "parquet",
    storage_options: dict[str, Any] | None = None,
    fingerprint: str | None = None,
    actor_options: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    scale: Sequence[float] | None = None,
    attributes: dict[str, Any] | None = None,
) -> InstanceReport:
    """Find, number and paint the instances of an output store on Ray (already connected).

    Args:
        output_path: the output store (local path or fsspec URI); it must exist.
        source_factory: picklable; each worker calls it once to build its object source.
        chunk: side of the write units (the output's chunk, or its shard when sharded).
        halo: px around each unit's core in which objects must be seen whole.
        image_shape: ``(height, width)`` of the image.
        workers: actors to run.
        class_names: names of the class ids, for the table's ``class_name`` column.
        table_format: ``parquet`` (a dataset of parts ``instances.parquet/``) or ``csv``
            (``instances.csv``, the parts concatenated in unit order).
        storage_options: fsspec options of the output store.
        fingerprint: what determines the source's objects; stored records made with another
            fingerprint, chunk, halo or table settings are deleted, not resumed. Defaults to
            ``source_factory.fingerprint`` when it has one
            (:class:`~tilewise.pipeline.instances.ComponentsFactory` does).
        actor_options: extra Ray actor options (e.g. ``{"num_gpus": 1}``); default 1 CPU each.
        progress: called as ``progress(phase, units done, units to do)`` with phase ``find`` or
            ``paint``.
        scale: pixel size (y, x) for the label image's metadata; default: that of ``labels``.
        attributes: attributes the label image carries (CRS, transform); default: those of
            ``labels`` (an output without a class map passes its input's).

    Raises:
        PlanError: an object larger than the halo (nothing is marked finished; raise the halo
            and rerun), more than 2**32 - 1 objects, or a chunk that is not the output's.
    """
    import ray

    if not ray.is_initialized():
        raise ClusterError(
            "run_instances needs a connected Ray (ray.init or the predict driver's connection); "
            "none is. Connect first."
        )
    t0 = time.perf_counter()
    grid = _check_geometry(image_shape, chunk, halo)
    if workers < 1:
        raise ConfigError(f"instances need at least 1 worker; got workers={workers}.")
    if table_format not in ("parquet", "csv"):
        raise ConfigError(
            f"instances.table must be 'parquet' or 'csv'; got {table_format!r}. Use one of them."
        )
    store = InstanceStore(output_path, table_format, storage_options)
    root = _open_root(store)
    _check_output(root, grid)

    config = {
        "version": 1,
        "image_shape": [grid.height, grid.width],
        "chunk": grid.side,
        "halo": halo,
        "source": fingerprint if fingerprint is not None else _fingerprint(source_factory),
        "class_names": class_names,
        "table_format": table_format,
    }
    if store.config() != config:
        store.clear()  # records of other settings would give other objects: never mix them
        store.write_config(config)

    counts = store.counts()
    find_todo = [u for u in range(len(grid)) if u not in counts]
    painted = store.painted()
    paint_todo = [u for u in range(len(grid)) if u not in painted]
    complete = _status(root) == STATUS_COMPLETE
    if not find_todo and not paint_todo and complete:
        return _report(store, grid, halo, workers, counts, 0, 0, time.perf_counter() - t0)
    _mark_running(root)

    actors: list[Any] = []
    try:
        if find_todo or paint_todo:
            actors = _start_actors(
                store, source_factory, grid, halo, class_names, workers, actor_options
            )
        if find_todo:
            done_find = [0]

            def found(result: list[tuple[int, int]]) -> None:
                done_find[0] += len(result)
                if progress is not None:
                    progress("find", done_find[0], len(find_todo))

            _dispatch(actors, "find", _batches(find_todo, workers), found)
            counts = store.counts()
        missing = [u for u in range(len(grid)) if u not in counts]
        if missing:
            raise TilewiseError(
                f"instances: the records of units {missing[:5]} are missing after phase 1 "
                f"(deleted while the stage ran?); run the stage again."
            )
        ordered = [counts[u] for u in range(len(grid))]
        offsets = id_offsets(ordered)
        _create_array(root, grid)
        if paint_todo:
            items: list[PaintItem] = []
            for u in paint_todo:
                owners = [
                    (v, int(offsets[v]), ordered[v])
                    for v in neighbour_units(grid, halo, u)
                    if ordered[v]
                ]
                items.append((u, owners, int(offsets[u]), ordered[u]))
            done_paint = [0]

            def painted_units(result: list[int]) -> None:
                done_paint[0] += len(result)
                if progress is not None:
                    progress("paint", done_paint[0], len(paint_todo))

            _dispatch(actors, "paint", _batches(items, workers), painted_units)
    finally:
        for actor in actors:
            ray.kill(actor)

    if table_format == "csv":
        store.write_csv(table_schema(class_names))
    report = _report(
        store,
        grid,
        halo,
        workers,
        counts,
        len(find_todo),
        len(paint_todo),
        time.perf_counter() - t0,
    )
    _finish(store, root, report, scale, attributes)
    return report


def _open_root(store: InstanceStore) -> Any:
    try:
        return store.group()
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        raise StoreNotFoundError(
            f"the instance stage needs an existing output store; '{store.location}' is not one. "
            f"Run the predict job first, or name its output.path."
        ) from None


def _check_output(root: Any, grid: UnitGrid) -> None:
    """The units must be the output's write units, and the image its size."""
    if "labels/0" not in root:
        return
    labels = root["labels/0"]
    if tuple(labels.shape) != (grid.height, grid.width):
        raise PlanError(
            f"instances: image_shape {(grid.height, grid.width)} differs from the output's "
            f"labels/0 {tuple(labels.shape)}. Pass the output's shape."
        )
    unit = tuple(labels.shards or labels.chunks)
    if unit != (grid.side, grid.side):
        raise PlanError(
            f"instances: chunk {grid.side} is not the output's write unit {unit} (its "
            f"{'shard' if labels.shards else 'chunk'}); writers would share chunks. Use chunk "
            f"{unit[0]}."
        )


def _fingerprint(factory: Callable[[], ObjectSource]) -> str | None:
    value = getattr(factory, "fingerprint", None)
    return value if isinstance(value, str) else None


def _status(root: Any) -> str | None:
    if "instances" not in root:
        return None
    state = root["instances"].attrs.get("tilewise", {})
    return state.get("status") if isinstance(state, dict) else None


def _mark_running(root: Any) -> None:
    """Withdraw the label metadata while units are (re)painted: a reader must not take a
    half-painted image for a finished one."""
    if "instances" not in root:
        return
    group = root["instances"]
    attrs = {k: v for k, v in group.attrs.items() if k != "ome"}
    state = dict(attrs.get("tilewise", {}))
    state["status"] = STATUS_RUNNING
    attrs["tilewise"] = state
    group.attrs.put(attrs)


def _create_array(root: Any, grid: UnitGrid) -> None:
    """``instances/0``: uint32, chunked (and sharded) as ``labels/0``; no OME metadata yet."""
    if "instances/0" in root:
        return
    chunks: tuple[int, ...] = (grid.side, grid.side)
    shards: tuple[int, ...] | None = None
    compressors: Any = _compressors("blosc-lz4")
    if "labels/0" in root:
        labels = root["labels/0"]
        chunks, shards, compressors = labels.chunks, labels.shards, labels.compressors
    group = root.require_group("instances")
    group.attrs["tilewise"] = {"status": STATUS_RUNNING}
    group.create_array(
        "0",
        shape=(grid.height, grid.width),
        chunks=chunks,
        shards=shards,
        dtype="uint32",
        compressors=compressors,
        fill_value=0,
        dimension_names=("y", "x"),
    )


def _scale_of_labels(root: Any) -> list[float] | None:
    """The pixel size of ``labels`` (its level 0), for the instance image's metadata."""
    if "labels" not in root:
        return None
    try:
        dataset = root["labels"].attrs["ome"]["multiscales"][0]["datasets"][0]
        return [float(v) for v in dataset["coordinateTransformations"][0]["scale"][-2:]]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _finish(
    store: InstanceStore,
    root: Any,
    report: InstanceReport,
    scale: Sequence[float] | None = None,
    attributes: dict[str, Any] | None = None,
) -> None:
    """Present the instance image as a finished OME-Zarr label image."""
    group = root["instances"]
    carried = dict(attributes or {})
    if attributes is None and "labels" in root:  # CRS, transform and the like, as labels have
        carried = {k: v for k, v in root["labels"].attrs.items() if k not in ("ome", "tilewise")}
    yx = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    pixel = [float(v) for v in scale] if scale is not None else _scale_of_labels(root)
    ome = _ome_image("instances", yx, pixel)
    # Ids are arbitrary and may number billions: no per-id colours; the background is clear.
    ome["image-label"] = {
        "version": "0.5",
        "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],
    }
    _remove_partial_writes(store)
    group.attrs.put(
        {
            **carried,
            "ome": ome,
            "tilewise": {"status": STATUS_COMPLETE, "report": report.to_dict()},
        }
    )


def _remove_partial_writes(store: InstanceStore) -> None:
    """Temporary files a killed worker left: zarr's chunk files (see OutputStore.finish) and
    the stage's own hidden ones. Local stores only: object stores write objects whole."""
    from pathlib import Path

    from tilewise.pipeline.stores import is_url

    if is_url(store.location):
        return
    root = Path(store.path)
    for pattern in (
        "instances/0/c/**/*.partial",
        ".tilewise/instances/**/.*.tmp",
        "instances.parquet/.*.tmp",
        ".instances.csv.*.tmp",
    ):
        for leftover in root.glob(pattern):
            leftover.unlink(missing_ok=True)


def _report(
    store: InstanceStore,
    grid: UnitGrid,
    halo: int,
    workers: int,
    counts: dict[int, int],
    found: int,
    painted: int,
    seconds: float,
) -> InstanceReport:
    table = store.csv_path if store.table_format == "csv" else store.parts_dir
    return InstanceReport(
        output=store.location,
        objects=int(sum(counts.values())),
        units=len(grid),
        units_found=found,
        units_painted=painted,
        max_objects_per_unit=max(counts.values(), default=0),
        seconds=seconds,
        workers=workers,
        halo=halo,
        table=table,
    )


def _start_actors(
    store: InstanceStore,
    source_factory: Callable[[], ObjectSource],
    grid: UnitGrid,
    halo: int,
    class_names: list[str] | None,
    workers: int,
    actor_options: dict[str, Any] | None,
) -> list[Any]:
    import ray

    options: dict[str, Any] = {
        "num_cpus": 1,
        # A lost actor is restarted and its calls retried: every write is idempotent.
        "max_restarts": -1,
        "max_task_retries": -1,
        **(actor_options or {}),
    }
    actor_class: Any = ray.remote(InstanceWorker)
    return [
        actor_class.options(**options).remote(
            store.location,
            store.storage_options,
            store.table_format,
            source_factory,
            (grid.height, grid.width),
            grid.side,
            halo,
            class_names,
        )
        for _ in range(workers)
    ]


def _batches(items: Sequence[Any], workers: int) -> list[list[Any]]:
    """Consecutive runs of items (neighbours share records), about four calls per actor."""
    size = max(1, min(MAX_UNITS_PER_CALL, -(-len(items) // (4 * workers))))
    return [list(items[k : k + size]) for k in range(0, len(items), size)]


def _dispatch(
    actors: list[Any], method: str, batches: list[Any], on_result: Callable[[Any], None]
) -> None:
    """Hand batches to the actors, a couple in flight each, the next to whichever is free."""
    import ray

    queue = list(reversed(batches))
    pending: dict[Any, int] = {}

    def submit(a: int) -> None:
        if queue:
            pending[getattr(actors[a], method).remote(queue.pop())] = a

    for a in range(len(actors)):
        for _ in range(CALLS_IN_FLIGHT):
            submit(a)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        a = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            # Let the calls in flight end before the actors are killed: ray.kill does not wait,
            # and a call still writing a record could land in the next run's fresh records.
            _drain(list(pending))
            if isinstance(exc.cause, TilewiseError):
                raise exc.cause from None  # a user's mistake (the halo): no Ray traceback
            raise
        on_result(result)
        submit(a)


def _drain(refs: list[Any]) -> None:
    """Wait for calls to end, whatever they return (at most a couple of batches per actor)."""
    import ray

    for ref in refs:
        with contextlib.suppress(Exception):  # their outcome no longer matters, only their end
            ray.get(ref)
