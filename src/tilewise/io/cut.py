"""``tilewise shards``: cut an image and its label raster into training shards.

A train job reads Zarr shard groups (:mod:`tilewise.training.shards`): ``image`` (C, H, W) with
``label`` (H, W) class ids, or ``instances`` (H, W) object ids for the instance architectures.
Annotations usually come as a raster beside the image instead: a class mask exported from QGIS or
GDAL for a scene, a label TIFF or PNG from an annotation tool for a slide. :func:`cut_shards`
turns the pair into shards without holding either whole:

* **The pair is checked first, and nothing is written when it is wrong.** Both must have the same
  height and width; when both are georeferenced, the same CRS and transform (a label raster on
  another grid must be warped onto the image's first). The label raster must have one band of
  integers (float rasters are accepted when every value is a whole number, as GIS tools often
  write them) and no negative values. Every label pixel is read once for this check, block by
  block, before the first shard is written.
* **Shards tile the image.** Rows and columns are split into ``max(1, side // size)`` near-equal
  parts, so every shard is at least ``size`` px on both sides (the whole side when the image is
  smaller) and below ``2 * size``: no thin remnants at the right and bottom edges that a training
  patch would not fit in.
* **Unlabelled pixels count nowhere.** Class labels: the label raster's no-data value, and the
  pixels where every band of the image is the image's no-data value (the collar of a scene),
  become ``ignore_index``; shards with no labelled pixel left are not written (``keep_empty``
  writes them). Instance labels have no ignore value: no-data becomes background (0).
* **U-Net's targets for touching cells** (``kind="unet"``, from object ids): ``label`` with
  background gaps where cells touch and ``weight``, U-Net's weight map
  (:func:`tilewise.losses.unet_targets`). Each shard is computed from its labels plus the border
  term's reach around it, with the whole image's class balance: it equals the whole image's
  map there, which a map computed per piece is not (cells cut at the piece's edge, another
  class balance in every piece).
* **Each shard is complete or absent.** Shards are written into a staging folder inside the
  destination and moved into place when all of them are written; a failure removes the staging
  folder and leaves the destination as it was. Existing shards of the same name are refused
  unless ``overwrite``, which then also removes the earlier cut's other shards of that name (a
  cut with another ``size`` has other shard names, and a train job's ``shards/*.zarr`` would
  otherwise read both).

Each shard keeps its place: its attributes hold the source files and its pixel offset, and a
georeferenced image gives every shard its own ``spatial:transform`` (and the CRS), as ingest does.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from tilewise.errors import ConfigError, InputError, OutputExistsError, StoreNotFoundError
from tilewise.io.ingest import _open_source, _run
from tilewise.losses import (
    balanced_class_weights,
    touching_cells,
    unet_border_reach,
    unet_targets,
)
from tilewise.pipeline.masks import input_nodata, nodata_pixels
from tilewise.pipeline.pyramid import spatial_attributes
from tilewise.pipeline.stores import InputImage, is_url, local_path

__all__ = [
    "CutReport",
    "Raster",
    "check_pair",
    "cut_shards",
    "label_ids",
    "open_raster",
    "shard_bounds",
]

LabelKind = Literal["classes", "instances", "unet"]

# The shard attribute that marks a group as written by cut_shards (an overwrite removes only such
# groups) and records where it came from.
SHARD_ATTRIBUTE = "shard"

# Transforms are compared to this fraction of a pixel: GIS tools round the origin and pitch of
# the "same" grid differently in the last digits.
_GRID_TOLERANCE = 1e-6

# Rows of labels checked per read in the first pass: whole rows of the raster keep reads
# sequential (PNG, stripped TIFF) and 4 Mpx keeps the int64 temporaries near 32 MB.
_CHECK_PIXELS = 1 << 22


@dataclass
class CutReport:
    """What :func:`cut_shards` wrote."""

    image: str
    labels: str
    destination: str
    kind: LabelKind
    shape: tuple[int, int, int]
    dtype: str
    shards: list[str]
    shard_sizes: list[tuple[int, int]]
    skipped_empty: int
    label_dtype: str
    class_pixels: dict[int, int] = field(default_factory=dict)
    ignored_pixels: int = 0
    ignore_index: int | None = 255
    objects: int = 0
    georeferenced: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """The report for people."""
        c, h, w = self.shape

        def span(values: list[int]) -> str:
            return (
                f"{min(values)}" if min(values) == max(values) else f"{min(values)}..{max(values)}"
            )

        heights, widths = [s[0] for s in self.shard_sizes], [s[1] for s in self.shard_sizes]
        size_text = f"{span(heights)} x {span(widths)}" if self.shard_sizes else "no"
        out = [
            f"cut {self.image} + {self.labels} ({c} x {h} x {w} {self.dtype}) "
            f"-> {len(self.shards)} shards in {self.destination}",
            f"  shards   {size_text} px each; array 'image' {self.dtype}, "
            f"'{'instances' if self.kind == 'instances' else 'label'}' {self.label_dtype}"
            + (", 'weight' float32 (U-Net's weight map)" if self.kind == "unet" else ""),
        ]
        if self.skipped_empty:
            out.append(
                f"  skipped  {self.skipped_empty} shards with no labelled pixel "
                f"(--keep-empty writes them)"
            )
        total = sum(self.class_pixels.values()) + self.ignored_pixels
        if self.kind != "instances":
            parts = [
                f"{k}: {100 * n / max(total, 1):.1f} %"
                for k, n in sorted(self.class_pixels.items())
            ]
            out.append(f"  classes  {', '.join(parts) or 'none'} of the pixels")
            if self.ignored_pixels:
                out.append(
                    f"  ignored  {100 * self.ignored_pixels / max(total, 1):.1f} % "
                    f"(label {self.ignore_index}: counted nowhere in training)"
                )
            classes = max(self.class_pixels, default=0) + 1
            out.append(
                f"  train    data.shards: [{self.destination}/*.zarr], num_classes >= {classes}"
            )
            if self.kind == "unet":
                out.append("           loss: {kind: weighted_cross_entropy} reads the weight maps")
        else:
            out.append(f"  objects  {self.objects} distinct ids (background 0)")
            out.append(f"  train    data.shards: [{self.destination}/*.zarr] with an instance arch")
        if self.georeferenced:
            out.append("  georeferencing kept: each shard has its own spatial:transform")
        out += [f"  {note}" for note in self.notes]
        out.append(f"  time     {self.seconds:.2f} s")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        data = asdict(self)
        data["class_pixels"] = {str(k): v for k, v in self.class_pixels.items()}
        return data


# -- sources -----------------------------------------------------------------------------------


@dataclass
class Raster:
    """A (C, H, W) raster read window by window: an image file or a Zarr image."""

    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    read: Callable[[int, int, int, int], np.ndarray]
    close: Callable[[], None]
    transform: list[float] | None = None
    crs: dict[str, Any] = field(default_factory=dict)  # proj:wkt2 / proj:code attributes
    nodata: float | None = None
    sequential: bool = False  # random access restarts decoding (PNG): read in order, one thread
    # Settings the reads run under, given the number of threads (GDAL's block cache for files).
    environment: Callable[[int], AbstractContextManager[Any]] = lambda _: nullcontext()


def _is_zarr(path: str) -> bool:
    if path.rstrip("/").endswith(".zarr"):
        return True
    folder = Path(path)
    return folder.is_dir() and any(
        (folder / name).exists() for name in ("zarr.json", ".zgroup", ".zarray")
    )


def _refuse_plain_group(path: str, role: str) -> None:
    """A Zarr group that is not an OME-Zarr image (a training shard, say) holds several arrays:
    the one meant is named in the path here (InputImage's advice names a job field)."""
    import zarr

    from tilewise.pipeline.stores import _ome_multiscales, open_node

    node = open_node(path, "r", None, role)
    if isinstance(node, zarr.Group) and not _ome_multiscales(dict(node.attrs)):
        arrays = sorted(name for name, _ in node.arrays())
        example = f", e.g. '{path.rstrip('/')}/{arrays[-1]}'" if arrays else ""
        raise InputError(
            f"{role} '{path}' is a Zarr group, not an image; give the array in it as part of "
            f"the path{example} (arrays in it: {', '.join(arrays) or 'none'})."
        )


def open_raster(path: str, role: str) -> Raster:
    """The image or the label raster at ``path``: a file any ingest reader opens, or a Zarr
    array / OME-Zarr image (level 0)."""
    if not is_url(path) and not Path(path).exists():
        raise StoreNotFoundError(f"{role} '{path}' does not exist; check the path.")
    if _is_zarr(path):
        _refuse_plain_group(path, role)
        image = InputImage(path)
        attrs = image.carried_attributes()
        transform = attrs.get("spatial:transform")
        return Raster(
            name=path,
            shape=image.shape,
            dtype=image.dtype,
            read=image.read,
            close=lambda: None,
            transform=[float(v) for v in transform] if transform else None,
            crs={k: v for k, v in attrs.items() if k in ("proj:wkt2", "proj:code")},
            nodata=input_nodata(image),
        )
    source = _open_source(path)
    h, w = source.level_shapes[0]
    geo = source.geo or {}
    crs = {f"proj:{k}": geo[k] for k in ("wkt2", "code") if geo.get(k)}
    return Raster(
        name=path,
        shape=(source.channels, h, w),
        dtype=source.dtype,
        read=lambda y0, y1, x0, x1: source.read(0, y0, y1, x0, x1),
        close=source.close,
        transform=geo.get("transform"),
        crs=crs,
        nodata=source.nodata,
        sequential=source.sequential,
        environment=source.environment,
    )


# -- the grid ----------------------------------------------------------------------------------


def shard_bounds(side: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the shards along a side of ``side`` px for shards of ``size`` px.

    ``max(1, side // size)`` near-equal parts: each at least ``size`` (or the whole side when it
    is shorter) and below ``2 * size``.
    """
    parts = max(1, side // size)
    cuts = [round(i * side / parts) for i in range(parts + 1)]
    return list(pairwise(cuts))


def _same_grid(a: list[float], b: list[float]) -> bool:
    pitch = max(abs(a[0]), abs(a[4]), 1e-300)
    return all(abs(x - y) <= _GRID_TOLERANCE * pitch for x, y in zip(a[:6], b[:6], strict=True))


def _shard_transform(transform: list[float], y0: int, x0: int) -> list[float]:
    a, b, c, d, e, f = transform[:6]
    return [a, b, c + a * x0 + b * y0, d, e, f + d * x0 + e * y0]


# -- checks ------------------------------------------------------------------------------------


def check_pair(image: Raster, labels: Raster, role: str = "image") -> None:
    """Refuse a label raster that does not cover ``image`` pixel for pixel: another size, more
    than one band, non-numeric values, or (when both are georeferenced) another grid or CRS.

    ``role`` is what ``image`` is called in the messages (``"image"``; ``"output"`` in scoring).
    """
    _, h, w = image.shape
    lc, lh, lw = labels.shape
    if (lh, lw) != (h, w):
        raise InputError(
            f"the labels '{labels.name}' are {lh} x {lw} px but the {role} '{image.name}' is "
            f"{h} x {w}; the label raster must cover the {role} pixel for pixel. Resample it onto "
            f"the {role}'s grid first (e.g. gdalwarp -r near -ts {w} {h} with the {role}'s "
            f"extent)."
        )
    if lc != 1:
        raise InputError(
            f"the labels '{labels.name}' have {lc} bands; a label raster has one band of class "
            f"(or object) ids. Give the band with the ids (e.g. gdal_translate -b 1)."
        )
    if labels.dtype.kind not in "uifb":
        raise InputError(
            f"the labels '{labels.name}' hold {labels.dtype} values; labels are integer ids."
        )
    if image.dtype.kind not in "uifb":
        raise InputError(
            f"the {role} '{image.name}' holds {image.dtype} pixels; shards take integer or "
            f"floating-point images."
        )
    if image.transform is not None and labels.transform is not None:
        if not _same_grid(image.transform, labels.transform):
            raise InputError(
                f"the labels '{labels.name}' lie on another grid than the {role} "
                f"'{image.name}': transform {labels.transform[:6]} against "
                f"{image.transform[:6]}. Warp the labels onto the {role}'s grid first "
                f"(gdalwarp -r near with the {role}'s extent and resolution)."
            )
        codes = (image.crs.get("proj:code"), labels.crs.get("proj:code"))
        if all(codes) and codes[0] != codes[1]:
            raise InputError(
                f"the labels '{labels.name}' are in {codes[1]} but the {role} '{image.name}' in "
                f"{codes[0]}; warp the labels to the {role}'s CRS and grid first "
                f"(gdalwarp -t_srs {codes[0]} -r near)."
            )


def label_ids(block: np.ndarray, labels: Raster, y0: int, x0: int) -> np.ndarray:
    """A block of the label raster as int64 ids; refuses fractions and negative values."""
    values = block[0]
    if labels.nodata is not None:
        nodata = nodata_pixels(block, labels.nodata)
    else:
        nodata = np.zeros(values.shape, bool)
    if values.dtype.kind == "f":
        bad = ~nodata & (~np.isfinite(values) | (values != np.round(values)))
        if bad.any():
            y, x = (int(v) for v in np.argwhere(bad)[0])
            raise InputError(
                f"the labels '{labels.name}' hold {values[y, x]} at row {y0 + y}, column "
                f"{x0 + x}; labels are whole-number ids. Round or rasterise them as integers."
            )
    # Cast before marking: -1 in the raster's own dtype (uint8) would wrap to 255.
    ids = np.where(nodata, 0, values).astype(np.int64)
    ids[nodata] = -1
    negative = ~nodata & (ids < 0)
    if negative.any():
        y, x = (int(v) for v in np.argwhere(negative)[0])
        raise InputError(
            f"the labels '{labels.name}' hold {ids[y, x]} at row {y0 + y}, column {x0 + x}; "
            f"ids are 0 or more. Set the label raster's no-data value to mark unlabelled pixels."
        )
    return ids  # -1 = no-data


@dataclass
class _Scan:
    counts: dict[int, int] = field(default_factory=dict)
    nodata: int = 0
    max_id: int = -1
    separated_cells: int = 0  # cell pixels once touching cells are parted (unet_targets' gaps)


def _scan(labels: Raster, gaps: bool = False) -> _Scan:
    """Every label pixel, checked once before anything is written; with ``gaps``, also the cell
    pixels left once touching cells are parted (read with one row more on each side, so that
    the gaps are the whole image's)."""
    _, h, w = labels.shape
    rows = max(1, _CHECK_PIXELS // max(w, 1))
    scan = _Scan()
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        top, bottom = (max(0, y0 - 1), min(h, y1 + 1)) if gaps else (y0, y1)
        ids = label_ids(labels.read(top, bottom, 0, w), labels, top, 0)
        if gaps:
            cells = np.maximum(ids, 0)
            kept = (cells > 0) & ~touching_cells(cells)
            scan.separated_cells += int(kept[y0 - top : y1 - top].sum())
            ids = ids[y0 - top : y1 - top]
        scan.nodata += int((ids < 0).sum())
        valid = ids[ids >= 0]
        if valid.size:
            scan.max_id = max(scan.max_id, int(valid.max()))
            if scan.max_id < (1 << 16):
                for k, n in enumerate(np.bincount(valid)):
                    if n:
                        scan.counts[k] = scan.counts.get(k, 0) + int(n)
    return scan


# -- the command -------------------------------------------------------------------------------


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _earlier_cut(folder: Path, stem: str) -> list[Path]:
    """The shards an earlier cut of ``stem`` wrote into ``folder``."""
    found = []
    for path in sorted(folder.glob(f"{stem}-*.zarr")):
        try:
            attrs = zarr.open_group(str(path), mode="r").attrs.get("tilewise")
        except Exception:  # not a Zarr group: not ours, left alone
            continue
        if isinstance(attrs, dict) and SHARD_ATTRIBUTE in attrs:
            found.append(path)
    return found


def cut_shards(
    image: str,
    labels: str,
    dest: str,
    *,
    size: int = 2048,
    chunk: int = 512,
    kind: LabelKind = "classes",
    ignore_index: int = 255,
    keep_empty: bool = False,
    name: str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
) -> CutReport:
    """Cut an image and its label raster into training shards (Zarr groups) in ``dest``.

    Args:
        image: the image: a file (GeoTIFF/COG, TIFF, OME-TIFF, SVS, PNG, ...) or a Zarr array /
            OME-Zarr image (its level 0), e.g. what ``tilewise ingest`` wrote.
        labels: the label raster, the same height and width (and grid, when georeferenced):
            one band of class ids (``kind="classes"``) or object ids (``kind="instances"``,
            0 = background).
        dest: a local folder for the shards ``NAME-R-C.zarr`` (created when missing).
        size: the shards' smallest side in px (sides are below ``2 * size``).
        chunk: the arrays' chunk side in px.
        kind: ``"classes"`` writes ``label`` arrays (semantic networks), ``"instances"``
            ``instances`` arrays (Mask R-CNN; every object of class 1), ``"unet"`` U-Net's
            targets for touching cells from object ids: ``label`` (cells 1 with background
            gaps where cells touch) and ``weight`` (:func:`tilewise.losses.unet_targets`,
            computed on each shard with the border term's reach around it and the whole
            image's class balance, so equal to the whole image's).
        ignore_index: the label of unlabelled pixels (``data.ignore_index`` of the train job).
        keep_empty: also write shards whose pixels are all unlabelled.
        name: the shards' name stem (default: the image's file name without its extension).
        overwrite: replace an earlier cut of the same name.
        workers: writer threads (default: up to 4, one per CPU).
        w0: ``"unet"``: the border weight (paper: 10).
        sigma: ``"unet"``: the border width in px (paper: about 5).

    Returns:
        A :class:`CutReport` (``lines()`` for people, ``to_dict()`` for JSON).

    Raises:
        StoreNotFoundError: the image or the labels do not exist.
        InputError: the pair does not fit together or a label is not an id (nothing written).
        OutputExistsError: shards of this name exist and ``overwrite`` is false.
        ConfigError: a setting is out of range.
    """
    started = time.perf_counter()
    if size < 16:
        raise ConfigError(f"size must be at least 16 px; got {size}. Use e.g. 1024 or 2048.")
    if chunk < 16:
        raise ConfigError(f"chunk must be at least 16 px; got {chunk}. Use e.g. 256 or 512.")
    if kind not in ("classes", "instances", "unet"):
        raise ConfigError(f"kind must be 'classes', 'instances' or 'unet'; got {kind!r}.")
    if not (sigma > 0 and w0 >= 0):
        raise ConfigError(
            f"sigma must be above 0 and w0 at least 0; got sigma {sigma}, w0 {w0}. The paper's "
            f"are sigma 5 and w0 10."
        )
    if not 0 <= ignore_index < (1 << 16):
        raise ConfigError(f"ignore_index must be within 0..65535; got {ignore_index}. Use 255.")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1; got {workers}.")
    dest = local_path(str(dest)).rstrip("/")
    if is_url(dest):
        raise ConfigError(
            f"shards are written to a local folder, not '{dest}'; cut them locally, then copy "
            f"the folder to the bucket (e.g. `aws s3 sync` or `gsutil -m rsync -r`)."
        )
    folder = Path(dest)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"'{dest}' is a file; shards go into a folder. Name a folder.")
    image_path, labels_path = local_path(str(image)), local_path(str(labels))
    stem = name or _stem(image_path)
    earlier = _earlier_cut(folder, stem) if folder.is_dir() else []
    if earlier and not overwrite:
        raise OutputExistsError(
            f"'{dest}' already holds {len(earlier)} shards of '{stem}' (e.g. {earlier[0].name}) "
            f"and they are left as they are; use --overwrite to replace that cut, or --name to "
            f"cut under another name."
        )
    nworkers = workers or max(1, min(4, os.cpu_count() or 1))

    source = open_raster(image_path, "image")
    try:
        target = open_raster(labels_path, "labels")
        try:
            settings = _Settings(
                size, chunk, kind, ignore_index, keep_empty, nworkers, float(w0), float(sigma)
            )
            with source.environment(nworkers), target.environment(nworkers):
                return _cut(source, target, folder, stem, earlier, settings, started)
        finally:
            target.close()
    finally:
        source.close()


@dataclass(frozen=True)
class _Settings:
    size: int
    chunk: int
    kind: LabelKind
    ignore_index: int
    keep_empty: bool
    workers: int
    w0: float = 10.0
    sigma: float = 5.0


def _cut(
    image: Raster,
    labels: Raster,
    folder: Path,
    stem: str,
    earlier: Sequence[Path],
    settings: _Settings,
    started: float,
) -> CutReport:
    size, chunk, kind = settings.size, settings.chunk, settings.kind
    ignore_index, keep_empty = settings.ignore_index, settings.keep_empty
    check_pair(image, labels)
    scan = _scan(labels, gaps=kind == "unet")
    notes: list[str] = []
    class_weights = (1.0, 1.0)
    if kind == "classes":
        top = max(scan.max_id, ignore_index)
        if top >= (1 << 16):
            raise InputError(
                f"the labels '{labels.name}' hold class id {scan.max_id}; class ids go up to "
                f"65535. Is this an instance raster? Cut it with --instances."
            )
        label_dtype = np.dtype(np.uint8 if top < 256 else np.uint16)
        if ignore_index in scan.counts:
            notes.append(
                f"note: label value {ignore_index} is the ignore index: its "
                f"{scan.counts[ignore_index]} pixels count nowhere in training"
            )
    else:
        if scan.max_id >= (1 << 32):
            raise InputError(
                f"the labels '{labels.name}' hold object id {scan.max_id}; ids go up to "
                f"4294967295. Renumber the objects."
            )
        label_dtype = np.dtype(np.uint32 if kind == "instances" else np.uint8)
        if scan.nodata:
            notes.append(f"note: {scan.nodata} no-data label pixels are background (0)")
        if kind == "unet":
            # w_c balanced over the whole image, as unet_targets does for one image: each
            # shard's weights are then the whole image's, not its own piece's.
            total = labels.shape[1] * labels.shape[2]
            class_weights = balanced_class_weights(total - scan.separated_cells, total)
    if image.dtype.kind == "b":
        image.dtype = np.dtype(np.uint8)

    c, h, w = image.shape
    bounds_y, bounds_x = shard_bounds(h, size), shard_bounds(w, size)
    grid = [(r, cc, y, x) for r, y in enumerate(bounds_y) for cc, x in enumerate(bounds_x)]
    rows, cols = len(bounds_y), len(bounds_x)
    digits = len(str(max(rows, cols) - 1))
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{stem}.cutting-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    class_pixels: dict[int, int] = {}
    ignored = 0
    objects: set[int] = set()
    written: dict[int, tuple[str, tuple[int, int]]] = {}
    array_name = "instances" if kind == "instances" else "label"
    lock = threading.Lock()
    reach = unet_border_reach(settings.sigma) + 1  # + 1: the gaps look at the next pixel

    def unet(y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's classes and weights, from its cells and ``reach`` px around them."""
        top, left = max(0, y0 - reach), max(0, x0 - reach)
        bottom, right = min(h, y1 + reach), min(w, x1 + reach)
        cells = np.maximum(label_ids(labels.read(top, bottom, left, right), labels, top, left), 0)
        # Renumbered 1..n (0 stays the background): the weight map indexes cells by id.
        found, compact = np.unique(cells, return_inverse=True)
        compact = compact.reshape(cells.shape) + (0 if found[0] == 0 else 1)
        classes, weight = unet_targets(
            compact, w0=settings.w0, sigma=settings.sigma, class_weights=class_weights
        )
        core = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        return classes[core], weight[core]

    def one(index: int) -> None:
        nonlocal ignored
        r, cc, (y0, y1), (x0, x1) = grid[index]
        pixels = image.read(y0, y1, x0, x1)
        weight = None
        if kind == "unet":
            out, weight = unet(y0, y1, x0, x1)
            counts = np.bincount(out.ravel(), minlength=2)
            local, local_ignored = {k: int(n) for k, n in enumerate(counts) if n}, 0
        elif kind == "classes":
            ids = label_ids(labels.read(y0, y1, x0, x1), labels, y0, x0)
            unlabelled = ids < 0
            if image.nodata is not None:
                unlabelled |= nodata_pixels(pixels, image.nodata)
            out = np.where(unlabelled, ignore_index, ids).astype(label_dtype)
            labelled = out != ignore_index
            if not labelled.any() and not keep_empty:
                return
            counts = np.bincount(out[labelled].ravel().astype(np.int64))
            local = {k: int(n) for k, n in enumerate(counts) if n}
            local_ignored = int((~labelled).sum())
        else:
            ids = label_ids(labels.read(y0, y1, x0, x1), labels, y0, x0)
            out = np.maximum(ids, 0).astype(label_dtype)
            local, local_ignored = {}, 0
        shard_name = f"{stem}-{r:0{digits}d}-{cc:0{digits}d}.zarr"
        group = zarr.open_group(str(staging / shard_name), mode="w")
        group.create_array(
            "image", data=pixels.astype(image.dtype, copy=False), chunks=(c, chunk, chunk)
        )
        group.create_array(array_name, data=out, chunks=(chunk, chunk))
        if weight is not None:
            group.create_array("weight", data=weight, chunks=(chunk, chunk))
        attrs: dict[str, Any] = {
            "tilewise": {
                SHARD_ATTRIBUTE: {
                    "image": image.name,
                    "labels": labels.name,
                    "kind": kind,
                    "y0": y0,
                    "x0": x0,
                    "height": y1 - y0,
                    "width": x1 - x0,
                    "ignore_index": ignore_index if kind == "classes" else None,
                    **(
                        {"w0": settings.w0, "sigma": settings.sigma, "class_weights": class_weights}
                        if kind == "unet"
                        else {}
                    ),
                }
            }
        }
        if image.transform is not None:
            attrs.update(image.crs)
            shifted = _shard_transform(image.transform, y0, x0)
            attrs.update(spatial_attributes(shifted, (y1 - y0, x1 - x0), 1.0))
        group.attrs.update(attrs)
        ids_here = set(np.unique(out).tolist()) - {0} if kind == "instances" else set()
        with lock:
            written[index] = (shard_name, (y1 - y0, x1 - x0))
            for k, n in local.items():
                class_pixels[k] = class_pixels.get(k, 0) + n
            ignored += local_ignored
            objects.update(ids_here)

    try:
        workers = 1 if image.sequential or labels.sequential else settings.workers
        _run([partial(one, i) for i in range(len(grid))], workers)
        # Only now is the destination touched: the earlier cut goes, the new one moves in.
        for path in earlier:
            shutil.rmtree(path)
        for index in sorted(written):
            shard_name = written[index][0]
            os.replace(staging / shard_name, folder / shard_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    names = [written[i][0] for i in sorted(written)]
    if not names:
        notes.append(
            "note: no shard was written: every pixel is unlabelled (--keep-empty writes them)"
        )
    return CutReport(
        image=image.name,
        labels=labels.name,
        destination=str(folder),
        kind=kind,
        shape=image.shape,
        dtype=str(image.dtype),
        shards=names,
        shard_sizes=[written[i][1] for i in sorted(written)],
        skipped_empty=len(grid) - len(written),
        label_dtype=str(label_dtype),
        class_pixels=dict(sorted(class_pixels.items())),
        ignored_pixels=ignored,
        ignore_index=ignore_index if kind == "classes" else None,
        objects=len(objects),
        georeferenced=image.transform is not None,
        notes=notes,
        seconds=time.perf_counter() - started,
    )
