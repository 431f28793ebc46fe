"""Exact instance stitching over huge mosaics: ownership, ids, painting and the object table.

An *instance stage* turns a finished mosaic (class labels, or a detector's output) into an
instance label image ``instances/0`` (uint32, 0 = background) and an object table. It works on the
write units of the output (:class:`~tilewise.pipeline.units.UnitGrid`) in two parallel phases; this
module holds everything a unit needs, free of Ray, so that :func:`instances_in_memory` and the Ray
stage (:mod:`tilewise.pipeline.instance_stage`) run the very same per-unit code.

* **Find and own** (:func:`find_unit`): each unit runs an :class:`ObjectSource` on its *window*
  (its core grown by ``halo`` px per side, clipped to the image) and owns the objects whose
  *anchor* lies in its core. An object with pixels (or its anchor) in the core that touches a
  window edge inside the image was not seen whole, so the unit refuses with a
  :class:`~tilewise.errors.PlanError` asking for a larger halo instead of cutting it (StarDist's
  ownership rule, reference/anchors.md). Every true object is then seen whole by exactly one
  owner, whatever the worker count or order: no merging or union-find pass is needed.
* **Ids** (:func:`id_offsets`): the owners' counts, prefix-summed in unit order, give unit ``u``'s
  ``k``-th object (objects sorted by anchor in raster order) the id ``offset[u] + k + 1``: ids are
  unique, contiguous and reproducible.
* **Paint** (:func:`paint_unit`): each unit paints its own core from the records of the units
  whose windows can reach it (:func:`neighbour_units`), lowest score first, so higher scores win
  where detections overlap. One writer per chunk, as for the class labels (DESIGN.md rule 1).

Records, markers and the table live in the output store (:class:`InstanceStore`)::

    instances/0                                   uint32 label image (OME-Zarr image-label)
    instances.parquet/part-<unit:06d>.parquet     owned objects' rows, one part per unit
    instances.csv                                 (table_format csv) the parts concatenated
    .tilewise/instances/config.json               settings the records were made with
    .tilewise/instances/objects/<unit>.<n>.npz    phase 1 record: the unit's n owned objects
    .tilewise/instances/painted/<unit>            phase 2 done marker

A record's name carries its object count, so the driver learns every count from one listing and
never opens a record.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import fsspec
import numpy as np
import pyarrow as pa
import zarr
from scipy import ndimage

from tilewise.errors import ConfigError, PlanError, StoreNotFoundError
from tilewise.pipeline.engine import Unit
from tilewise.pipeline.stores import _storage, is_url, local_path
from tilewise.pipeline.units import UnitGrid

__all__ = [
    "MAX_ID",
    "ComponentsFactory",
    "ComponentsSource",
    "InstanceResult",
    "InstanceStore",
    "Obj",
    "ObjectSource",
    "TableFormat",
    "UnitRecord",
    "find_unit",
    "id_offsets",
    "instances_in_memory",
    "neighbour_units",
    "paint_unit",
    "table_schema",
    "unit_table",
    "window_of",
]

MAX_ID = 2**32 - 1  # ids are uint32 and 0 is the background
TableFormat = Literal["parquet", "csv"]


# -- objects and sources ------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    """One object found in a window: a boolean mask crop at a global origin, and its anchor.

    ``anchor`` is the global pixel ``(ay, ax)`` whose unit owns the object; it must not depend on
    the window the object was found in (the first pixel in raster order for connected
    components; the floored box centre for a detector).
    """

    cls: int
    score: float
    mask: np.ndarray
    y0: int
    x0: int
    anchor: tuple[int, int]

    @property
    def area(self) -> int:
        """Pixels of the mask."""
        return int(np.count_nonzero(self.mask))


@runtime_checkable
class ObjectSource(Protocol):
    """Finds the objects seen in a window of the image.

    A source may also have an ``int`` attribute ``min_area``: the stage drops objects smaller than
    that, after checking that they were seen whole.
    """

    def find(self, y0: int, y1: int, x0: int, x1: int) -> list[Obj]:
        """Objects seen in rows ``[y0, y1)`` and columns ``[x0, x1)``, with global coordinates.

        Masks must lie inside the window; an object cut by the window edge is returned cut (the
        stage decides whether that matters).
        """
        ...


class ComponentsSource:
    """Connected components of chosen classes of a class-label image (e.g. ``labels/0``).

    Each component of each listed class is one object, score 1.0, anchored at its first pixel in
    raster order (smallest row, then smallest column in that row): a pixel of the object itself,
    so the same object seen from any window whole gets the same anchor.
    """

    def __init__(
        self, labels: Any, classes: Sequence[int], connectivity: int = 1, min_area: int = 0
    ) -> None:
        if len(getattr(labels, "shape", ())) != 2:
            raise ConfigError(
                f"instances need a 2-D (H, W) class-label image; got shape "
                f"{tuple(getattr(labels, 'shape', ()))}. Pass the output's labels/0 array."
            )
        if connectivity not in (1, 2):
            raise ConfigError(
                f"instances.connectivity must be 1 (edge neighbours) or 2 (edges and corners); "
                f"got {connectivity}. Use 1 or 2."
            )
        if not classes or any(int(c) < 0 for c in classes):
            raise ConfigError(
                f"instances.classes must list one or more class ids (>= 0); got {list(classes)}. "
                f"List the classes whose connected components are objects, e.g. [1]."
            )
        if min_area < 0:
            raise ConfigError(f"instances.min_area must be >= 0 pixels; got {min_area}.")
        self.labels = labels
        self.classes = [int(c) for c in classes]
        self.connectivity = connectivity
        self.min_area = int(min_area)
        self._structure = ndimage.generate_binary_structure(2, connectivity)

    def find(self, y0: int, y1: int, x0: int, x1: int) -> list[Obj]:
        """The components of the listed classes in the window (cut ones included)."""
        window = np.asarray(self.labels[y0:y1, x0:x1])
        found: list[Obj] = []
        for c in self.classes:
            components, n = ndimage.label(window == c, structure=self._structure)
            if n == 0:
                continue
            for k, box in enumerate(ndimage.find_objects(components), start=1):
                if box is None:
                    continue
                mask = components[box] == k
                oy, ox = y0 + box[0].start, x0 + box[1].start
                # The crop is tight, so its first row holds the object's first raster pixel.
                anchor = (oy, ox + int(np.argmax(mask[0])))
                found.append(Obj(c, 1.0, mask, oy, ox, anchor))
        return found


@dataclass(frozen=True)
class ComponentsFactory:
    """A picklable recipe for a :class:`ComponentsSource` over an output store's label array.

    Ray workers call it once each; :attr:`fingerprint` tells the stage whether stored records
    were made with the same settings.
    """

    location: str
    classes: tuple[int, ...]
    connectivity: int = 1
    min_area: int = 0
    array: str = "labels/0"
    storage_options: dict[str, Any] | None = None

    def __call__(self) -> ComponentsSource:
        location = local_path(self.location).rstrip("/")
        try:
            group = zarr.open_group(
                store=location, mode="r", **_storage(location, self.storage_options)
            )
            labels = group[self.array]
        except (FileNotFoundError, KeyError) as exc:
            raise StoreNotFoundError(
                f"instances read the class labels from '{location}/{self.array}', which does not "
                f"exist ({type(exc).__name__}). Write labels (output.labels) or name another array."
            ) from None
        return ComponentsSource(labels, self.classes, self.connectivity, self.min_area)

    @property
    def fingerprint(self) -> str:
        """The settings that determine the objects."""
        return json.dumps(
            {
                "source": "components",
                "array": self.array,
                "classes": list(self.classes),
                "connectivity": self.connectivity,
                "min_area": self.min_area,
            },
            sort_keys=True,
        )


# -- geometry -----------------------------------------------------------------------------------
def window_of(unit: Unit, halo: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The unit's core grown by ``halo`` px per side, clipped to the image: ``(y0, y1, x0, x1)``."""
    return (
        max(0, unit.y0 - halo),
        min(height, unit.y1 + halo),
        max(0, unit.x0 - halo),
        min(width, unit.x1 + halo),
    )


def neighbour_units(grid: UnitGrid, halo: int, index: int) -> list[int]:
    """Units whose windows can reach unit ``index``'s core (itself included), in unit order.

    An owned object lies inside its owner's window, so only owners at most ``ceil(halo / side)``
    units away (per axis) can have pixels in the core.
    """
    rings = -(-halo // grid.side)
    i, j = divmod(index, grid.cols)
    return [
        r * grid.cols + c
        for r in range(max(0, i - rings), min(grid.rows, i + rings + 1))
        for c in range(max(0, j - rings), min(grid.cols, j + rings + 1))
    ]


# -- records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitRecord:
    """The objects a unit owns, sorted by anchor in raster order, with their masks packed.

    Arrays are per object: ``cls`` int32, ``score`` float64, ``anchor`` (n, 2) int64, ``bbox``
    (n, 4) int64 global ``y0, x0, y1, x1`` (the mask's tight box, end exclusive), ``area`` int64,
    ``centroid`` (n, 2) float64 global ``y, x``. Mask ``k`` is the tight box's bits, packed
    (``numpy.packbits``) in ``bits[offsets[k]:offsets[k + 1]]``.
    """

    cls: np.ndarray
    score: np.ndarray
    anchor: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    centroid: np.ndarray
    bits: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.cls.shape[0])

    def mask(self, k: int) -> np.ndarray:
        """Object ``k``'s boolean mask over its box ``bbox[k]``."""
        y0, x0, y1, x1 = (int(v) for v in self.bbox[k])
        h, w = y1 - y0, x1 - x0
        packed = self.bits[self.offsets[k] : self.offsets[k + 1]]
        return np.unpackbits(packed, count=h * w).reshape(h, w).astype(bool)

    @classmethod
    def from_objects(cls, objects: Sequence[Obj]) -> UnitRecord:
        """Pack objects (already in their final order); masks are trimmed to their tight box."""
        n = len(objects)
        classes = np.zeros(n, np.int32)
        scores = np.zeros(n, np.float64)
        anchors = np.zeros((n, 2), np.int64)
        boxes = np.zeros((n, 4), np.int64)
        areas = np.zeros(n, np.int64)
        centroids = np.zeros((n, 2), np.float64)
        chunks: list[np.ndarray] = []
        offsets = np.zeros(n + 1, np.int64)
        for k, obj in enumerate(objects):
            ys, xs = np.nonzero(obj.mask)
            ty0, tx0 = int(ys.min()), int(xs.min())
            ty1, tx1 = int(ys.max()) + 1, int(xs.max()) + 1
            packed = np.packbits(obj.mask[ty0:ty1, tx0:tx1], axis=None)
            classes[k], scores[k], anchors[k] = obj.cls, obj.score, obj.anchor
            boxes[k] = (obj.y0 + ty0, obj.x0 + tx0, obj.y0 + ty1, obj.x0 + tx1)
            areas[k] = ys.size
            centroids[k] = (obj.y0 + ys.mean(), obj.x0 + xs.mean())
            chunks.append(packed)
            offsets[k + 1] = offsets[k] + packed.size
        bits = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
        return cls(classes, scores, anchors, boxes, areas, centroids, bits, offsets)

    def to_bytes(self) -> bytes:
        """The record as an ``.npz`` file (no pickles)."""
        buffer = io.BytesIO()
        np.savez(buffer, **{name: getattr(self, name) for name in _RECORD_FIELDS})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnitRecord:
        """Read a record written by :meth:`to_bytes`."""
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls(**{name: npz[name] for name in _RECORD_FIELDS})


_RECORD_FIELDS = ("cls", "score", "anchor", "bbox", "area", "centroid", "bits", "offsets")


# -- phase 1: find and own ----------------------------------------------------------------------
def find_unit(source: ObjectSource, grid: UnitGrid, index: int, halo: int) -> UnitRecord:
    """Phase 1 of one unit: the objects it owns, checked to have been seen whole.

    Raises:
        PlanError: an object with pixels or its anchor in the core touches a window edge that is
            not the image border, i.e. it may continue beyond the window: the halo is too small.
    """
    unit = grid.unit(index)
    height, width = grid.height, grid.width
    wy0, wy1, wx0, wx1 = window_of(unit, halo, height, width)
    owned: list[Obj] = []
    for obj in source.find(wy0, wy1, wx0, wx1):
        h, w = obj.mask.shape
        if obj.y0 < wy0 or obj.x0 < wx0 or obj.y0 + h > wy1 or obj.x0 + w > wx1:
            raise ValueError(
                f"object source returned a mask at rows {obj.y0}..{obj.y0 + h - 1}, columns "
                f"{obj.x0}..{obj.x0 + w - 1}, outside the window rows {wy0}..{wy1 - 1}, columns "
                f"{wx0}..{wx1 - 1} it was asked for (a bug in the source)"
            )
        if not obj.mask.any():
            continue
        ay, ax = obj.anchor
        anchored = unit.y0 <= ay < unit.y1 and unit.x0 <= ax < unit.x1
        if anchored or _has_pixels_in(obj, unit):
            _check_seen_whole(obj, unit, (wy0, wy1, wx0, wx1), halo, height, width)
        if anchored:
            owned.append(obj)
    min_area = int(getattr(source, "min_area", 0) or 0)
    owned = [o for o in owned if o.area >= min_area]
    # Raster order of anchors; class, score and box break ties (detections may share an anchor)
    # so that the order never depends on the order the source listed them in.
    owned.sort(key=lambda o: (o.anchor, o.cls, -o.score, o.y0, o.x0, o.mask.shape, o.area))
    return UnitRecord.from_objects(owned)


def _has_pixels_in(obj: Obj, unit: Unit) -> bool:
    h, w = obj.mask.shape
    y0, y1 = max(obj.y0, unit.y0), min(obj.y0 + h, unit.y1)
    x0, x1 = max(obj.x0, unit.x0), min(obj.x0 + w, unit.x1)
    if y0 >= y1 or x0 >= x1:
        return False
    return bool(obj.mask[y0 - obj.y0 : y1 - obj.y0, x0 - obj.x0 : x1 - obj.x0].any())


def _check_seen_whole(
    obj: Obj,
    unit: Unit,
    window: tuple[int, int, int, int],
    halo: int,
    height: int,
    width: int,
) -> None:
    wy0, wy1, wx0, wx1 = window
    m = obj.mask
    h, w = m.shape
    cut = (
        (wy0 > 0 and obj.y0 == wy0 and bool(m[0].any()))
        or (wy1 < height and obj.y0 + h == wy1 and bool(m[-1].any()))
        or (wx0 > 0 and obj.x0 == wx0 and bool(m[:, 0].any()))
        or (wx1 < width and obj.x0 + w == wx1 and bool(m[:, -1].any()))
    )
    if not cut:
        return
    ys, xs = np.nonzero(m)
    span = int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1
    raise PlanError(
        f"instances: an object of class {obj.cls} at y={obj.anchor[0]}, x={obj.anchor[1]} "
        f"(seen over rows {obj.y0 + int(ys.min())}..{obj.y0 + int(ys.max())}, columns "
        f"{obj.x0 + int(xs.min())}..{obj.x0 + int(xs.max())}) reaches the edge of unit "
        f"{unit.index}'s window (halo {halo} px), so it was not seen whole: every object must "
        f"fit within the halo, and this one spans at least {span} px and needs a halo larger "
        f"than {halo} px. Raise instances.halo to at least the size of the largest object "
        f"(e.g. {max(2 * halo, span)})."
    )


# -- ids ----------------------------------------------------------------------------------------
def id_offsets(counts: Sequence[int]) -> np.ndarray:
    """Prefix sums of per-unit object counts (unit order): unit ``u``'s ``k``-th object gets the
    id ``offsets[u] + k + 1``; ``offsets[-1]`` is the total.

    Raises:
        PlanError: more objects than uint32 ids (``2**32 - 1``; 0 is the background).
    """
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(np.asarray(counts, np.int64), out=offsets[1:])
    total = int(offsets[-1])
    if total > MAX_ID:
        raise PlanError(
            f"instances: {total} objects found, but instance ids are uint32 and allow at most "
            f"{MAX_ID}. Raise instances.min_area, list fewer instances.classes, or split the "
            f"image into several jobs."
        )
    return offsets


# -- phase 2: paint -----------------------------------------------------------------------------
def paint_unit(
    grid: UnitGrid,
    index: int,
    owners: Iterable[tuple[int, int]],
    load: Callable[[int], UnitRecord],
) -> np.ndarray:
    """Phase 2 of one unit: its core of the instance image (uint32).

    ``owners`` are ``(unit, id offset)`` of the neighbour units (:func:`neighbour_units`) that own
    objects; ``load`` gives a unit's record. Objects are painted in ascending score, then
    descending id, so the highest score (then the lowest id) ends on top.
    """
    unit = grid.unit(index)
    canvas = np.zeros((unit.y1 - unit.y0, unit.x1 - unit.x0), np.uint32)
    items: list[tuple[float, int, UnitRecord, int]] = []
    for v, offset in owners:
        record = load(v)
        if not len(record):
            continue
        b = record.bbox
        hits = np.flatnonzero(
            (b[:, 0] < unit.y1) & (b[:, 2] > unit.y0) & (b[:, 1] < unit.x1) & (b[:, 3] > unit.x0)
        )
        items.extend((float(record.score[k]), -(offset + int(k) + 1), record, int(k)) for k in hits)
    items.sort(key=lambda item: (item[0], item[1]))
    for _, negative_id, record, k in items:
        y0, x0, y1, x1 = (int(v) for v in record.bbox[k])
        mask = record.mask(k)
        cy0, cy1 = max(y0, unit.y0), min(y1, unit.y1)
        cx0, cx1 = max(x0, unit.x0), min(x1, unit.x1)
        part = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        canvas[cy0 - unit.y0 : cy1 - unit.y0, cx0 - unit.x0 : cx1 - unit.x0][part] = -negative_id
    return canvas


# -- the table ----------------------------------------------------------------------------------
def table_schema(class_names: Sequence[str] | None) -> pa.Schema:
    """Columns of the object table (``class_name`` only when the classes have names)."""
    fields = [
        pa.field("id", pa.uint32()),
        pa.field("class", pa.int32()),
        *([pa.field("class_name", pa.string())] if class_names is not None else []),
        pa.field("score", pa.float64()),
        pa.field("bbox_y0", pa.int64()),
        pa.field("bbox_x0", pa.int64()),
        pa.field("bbox_y1", pa.int64()),
        pa.field("bbox_x1", pa.int64()),
        pa.field("area", pa.int64()),
        pa.field("centroid_y", pa.float64()),
        pa.field("centroid_x", pa.float64()),
    ]
    return pa.schema(fields)


def unit_table(record: UnitRecord, offset: int, class_names: Sequence[str] | None) -> pa.Table:
    """The rows of a unit's owned objects (global pixel coordinates; boxes end exclusive)."""
    n = len(record)
    columns: dict[str, Any] = {
        "id": np.arange(offset + 1, offset + n + 1, dtype=np.uint32),
        "class": record.cls.astype(np.int32),
    }
    if class_names is not None:
        names = list(class_names)
        columns["class_name"] = [names[c] if 0 <= c < len(names) else None for c in record.cls]
    columns.update(
        score=record.score,
        bbox_y0=record.bbox[:, 0],
        bbox_x0=record.bbox[:, 1],
        bbox_y1=record.bbox[:, 2],
        bbox_x1=record.bbox[:, 3],
        area=record.area,
        centroid_y=record.centroid[:, 0],
        centroid_x=record.centroid[:, 1],
    )
    return pa.table(columns, schema=table_schema(class_names))


# -- in memory ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceResult:
    """Instances computed in memory: the label image, the table, and the units' counts."""

    labels: np.ndarray
    table: pa.Table
    counts: list[int]

    @property
    def objects(self) -> int:
        """Objects found."""
        return int(sum(self.counts))


def _check_geometry(image_shape: Sequence[int], chunk: int, halo: int) -> UnitGrid:
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ConfigError(f"image_shape must be (height, width) >= 1; got {tuple(image_shape)}.")
    if chunk < 1:
        raise PlanError(f"instances: the unit side (chunk) must be >= 1 px; got {chunk}.")
    if halo < 0:
        raise ConfigError(f"instances.halo must be >= 0 px; got {halo}. Use e.g. halo: 64.")
    return UnitGrid(int(image_shape[0]), int(image_shape[1]), int(chunk))


def instances_in_memory(
    source: ObjectSource,
    image_shape: Sequence[int],
    chunk: int,
    halo: int,
    class_names: Sequence[str] | None = None,
) -> InstanceResult:
    """Instances of an image that fits in memory, through the same per-unit code as the stage.

    Records take the same encode/decode round trip as in a store, so this is the stage run
    sequentially in one process.
    """
    grid = _check_geometry(image_shape, chunk, halo)
    records = {
        u: UnitRecord.from_bytes(find_unit(source, grid, u, halo).to_bytes())
        for u in range(len(grid))
    }
    counts = [len(records[u]) for u in range(len(grid))]
    offsets = id_offsets(counts)
    labels = np.zeros((grid.height, grid.width), np.uint32)
    tables = []
    for u in range(len(grid)):
        owners = [(v, int(offsets[v])) for v in neighbour_units(grid, halo, u) if counts[v]]
        unit = grid.unit(u)
        labels[unit.y0 : unit.y1, unit.x0 : unit.x1] = paint_unit(
            grid, u, owners, records.__getitem__
        )
        tables.append(unit_table(records[u], int(offsets[u]), class_names))
    return InstanceResult(labels, pa.concat_tables(tables), counts)


# -- the store ----------------------------------------------------------------------------------
_RECORD_NAME = re.compile(r"^(\d+)\.(\d+)\.npz$")
_PART_NAME = re.compile(r"^part-(\d+)\.parquet$")


class InstanceStore:
    """The instance stage's files inside an output store (local path or fsspec URI).

    Every file is written atomically (a hidden temporary file renamed; object stores' PUTs are
    atomic), so a record, marker or part that exists is complete.
    """

    def __init__(
        self,
        location: str,
        table_format: TableFormat = "parquet",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.location = local_path(location).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.path = fsspec.core.url_to_fs(self.location, **self.storage_options)
        self.table_format = table_format
        self._array: Any = None

    # paths
    @property
    def base(self) -> str:
        """Folder of the stage's bookkeeping."""
        return f"{self.path}/.tilewise/instances"

    @property
    def parts_dir(self) -> str:
        """Folder of the table parts: the Parquet dataset itself, or hidden for a CSV table."""
        if self.table_format == "parquet":
            return f"{self.path}/instances.parquet"
        return f"{self.base}/table"

    @property
    def csv_path(self) -> str:
        """The CSV table (``table_format: csv``)."""
        return f"{self.path}/instances.csv"

    def _write(self, path: str, data: bytes) -> None:
        if is_url(self.location):
            self.fs.pipe_file(path, data)
            return
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        # A leading dot keeps a half-written part out of pyarrow's dataset listing.
        temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)

    def _names(self, folder: str) -> list[str]:
        try:
            return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []

    # settings
    def config(self) -> dict[str, Any] | None:
        """The settings stored records were made with (None when there are none)."""
        try:
            return dict(json.loads(self.fs.cat_file(f"{self.base}/config.json")))
        except FileNotFoundError:
            return None

    def write_config(self, config: dict[str, Any]) -> None:
        """Record the settings (after :meth:`clear` when they changed)."""
        self._write(f"{self.base}/config.json", json.dumps(config, sort_keys=True).encode())

    def clear(self) -> None:
        """Delete every file of the stage (records of other settings must not be reused)."""
        self._array = None
        for path in (
            self.base,
            f"{self.path}/instances",
            f"{self.path}/instances.parquet",
            f"{self.path}/instances.csv",
        ):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    # phase 1
    def counts(self) -> dict[int, int]:
        """Object count of every unit whose record is written (one listing, no reads)."""
        found = {}
        for name in self._names(f"{self.base}/objects"):
            match = _RECORD_NAME.match(name)
            if match:
                found[int(match[1])] = int(match[2])
        return found

    def write_record(self, index: int, record: UnitRecord) -> None:
        """Write a unit's phase-1 record; its presence marks the unit's phase 1 done."""
        self._write(f"{self.base}/objects/{index}.{len(record)}.npz", record.to_bytes())

    def read_record(self, index: int, count: int) -> UnitRecord:
        """Read a unit's record (its count, from :meth:`counts`, is part of its name)."""
        return UnitRecord.from_bytes(self.fs.cat_file(f"{self.base}/objects/{index}.{count}.npz"))

    # phase 2
    def painted(self) -> set[int]:
        """Units whose phase 2 (core painted, table part written) is done."""
        return {int(n) for n in self._names(f"{self.base}/painted") if n.isdigit()}

    def mark_painted(self, index: int) -> None:
        """Record that a unit's phase 2 is done (after its pixels and its part)."""
        self._write(f"{self.base}/painted/{index}", b"")

    def group(self) -> Any:
        """The output's root group."""
        return zarr.open_group(
            store=self.location, mode="r+", **_storage(self.location, self.storage_options)
        )

    def array(self) -> Any:
        """``instances/0``, opened once per store object."""
        if self._array is None:
            self._array = self.group()["instances/0"]
        return self._array

    def write_unit(self, unit: Unit, pixels: np.ndarray) -> None:
        """Write a unit's core of ``instances/0`` (whole chunks or shards, once)."""
        self.array()[unit.y0 : unit.y1, unit.x0 : unit.x1] = pixels

    def write_part(self, index: int, table: pa.Table) -> None:
        """Write a unit's rows as one Parquet part."""
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self._write(f"{self.parts_dir}/part-{index:06d}.parquet", sink.getvalue().to_pybytes())

    def write_csv(self, schema: pa.Schema) -> int:
        """Concatenate the parts in unit order into ``instances.csv``, one part at a time;
        return the rows written."""
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        parts = sorted(
            (int(m[1]), name)
            for name in self._names(self.parts_dir)
            if (m := _PART_NAME.match(name))
        )
        local = not is_url(self.location)
        target = self.csv_path
        if local:
            target = os.path.join(self.path, f".instances.csv.{uuid.uuid4().hex}.tmp")
        rows = 0
        with self.fs.open(target, "wb") as f, pcsv.CSVWriter(f, schema) as writer:
            for _, name in parts:
                with self.fs.open(f"{self.parts_dir}/{name}", "rb") as part:
                    table = pq.read_table(part)
                writer.write_table(table)
                rows += table.num_rows
        if local:
            os.replace(target, self.csv_path)
        return rows
