"""Export a finished output to the files GIS tools and slide viewers open.

``export(OUT.zarr, out.tif)`` turns a predict job's output (``labels/0`` or ``probabilities/0``
of the output group, see :mod:`tilewise.pipeline.output`) into

* a **Cloud-Optimised GeoTIFF** (``.tif``): tiled 512, deflate, internal overviews (mode for
  labels, average for probabilities), the input's CRS and affine transform from the carried
  ``proj:`` / ``spatial:`` attributes; labels carry a colour table and the class names, and
  probabilities are K bands named after the classes;
* a **pyramidal OME-TIFF** (``.ome.tif``) for slide viewers such as QuPath: the full image with
  its 2x reductions as SubIFDs, tiled 512, with ``PhysicalSizeX/Y`` from the output's scale.

Nothing holds the whole image: the COG is written window by window into a temporary tiled GTiff
that GDAL's COG driver then copies (the COG driver cannot be written window by window), and the
OME-TIFF is written from iterators of tiles, its reductions built block by block in a temporary
Zarr (each level from the one above, so a level costs a quarter of the one before).
The result appears at ``dst`` only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from tilewise.errors import (
    ConfigError,
    InputError,
    OutputExistsError,
    StoreNotFoundError,
    did_you_mean,
)
from tilewise.pipeline.pyramid import downsample_mean, downsample_mode
from tilewise.pipeline.stores import _ome_multiscales, is_url, local_path, open_node

__all__ = ["PALETTE", "ExportReport", "check_cog_layout", "export", "open_output"]

TILE = 512
# Bytes of one window read from the Zarr and written to the GTiff: bounds export memory.
WINDOW_BYTES = 64 * 1024**2
GDAL_CACHE_MB = 128

# Class colours when the output names none: black for class 0 (background in most jobs),
# then the 20 colours of matplotlib's tab20 (distinct on maps and slides), repeated.
PALETTE: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
]

# NGFF axis units (UDUNITS names) as OME-XML unit symbols.
_OME_UNITS = {
    "micrometer": "µm",
    "micron": "µm",
    "nanometer": "nm",
    "millimeter": "mm",
    "centimeter": "cm",
    "meter": "m",
    "angstrom": "Å",
}

Format = Literal["cog", "ome-tiff"]
What = Literal["labels", "probabilities"]


@dataclass
class ExportReport:
    """What an export wrote."""

    source: str
    output: str
    what: str
    format: str
    shape: list[int]  # bands, height, width
    dtype: str
    levels: list[list[int]]  # (height, width) of the full image and each reduction
    crs: str | None = None
    transform: list[float] | None = None
    pixel_size: list[float] | None = None  # (y, x) physical size of a pixel, OME-TIFF
    pixel_unit: str | None = None
    class_names: list[str] = field(default_factory=list)
    colours: str | None = None  # where the colour table came from
    layout: str = ""
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as lines for the terminal."""
        bands, height, width = self.shape
        kind = "COG" if self.format == "cog" else "pyramidal OME-TIFF"
        out = [
            f"exported {self.what} of {self.source} -> {self.output} ({kind})",
            f"  image      {width} x {height} px, {bands} band(s) {self.dtype}, "
            f"{len(self.levels)} level(s): " + ", ".join(f"{w}x{h}" for h, w in self.levels),
        ]
        if self.format == "cog":
            if self.crs:
                out.append(f"  CRS        {self.crs}")
                out.append(f"  transform  {self.transform}")
            else:
                out.append("  CRS        none (the output carries no georeferencing)")
        elif self.pixel_size:
            out.append(
                f"  pixel size {self.pixel_size[1]:g} x {self.pixel_size[0]:g} {self.pixel_unit}"
            )
        if self.class_names:
            out.append(f"  classes    {', '.join(self.class_names)}")
        if self.colours:
            out.append(f"  colours    {self.colours}")
        if self.layout:
            out.append(f"  layout     {self.layout}")
        out.append(f"  size       {self.bytes / 1024**2:.2f} MiB in {self.seconds:.2f} s")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


# -- the output being exported -----------------------------------------------------------------


@dataclass
class _Source:
    location: str
    what: str
    levels: list[Any]  # zarr arrays: level 0, then the output's own 2x reductions
    attrs: dict[str, Any]  # carried attributes: the image group's over the root's
    num_classes: int
    class_names: list[str]
    colours: list[tuple[int, int, int, int]] | None
    scale: list[float] | None
    unit: str | None


def _fmt_of(dst: str, fmt: str | None) -> Format:
    if fmt is not None:
        if fmt not in ("cog", "ome-tiff"):
            raise ConfigError(
                f"export format must be 'cog' or 'ome-tiff'; got '{fmt}'."
                + did_you_mean(fmt, ["cog", "ome-tiff"])
            )
        return fmt  # type: ignore[return-value]
    name = dst.lower().rstrip("/")
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith((".tif", ".tiff")):
        return "cog"
    raise ConfigError(
        f"cannot tell the export format from '{dst}': name it '.tif' for a Cloud-Optimised "
        f"GeoTIFF or '.ome.tif' for a pyramidal OME-TIFF, or give the format (--format)."
    )


def _done_units(location: str, options: dict[str, Any] | None) -> int:
    from tilewise.pipeline.output import OutputStore

    try:
        return len(OutputStore(location, options).done_units())
    except Exception:  # only for the message; never hide the real error behind this
        return 0


def open_output(
    src: str, what: str, options: dict[str, Any] | None, verb: str = "export"
) -> _Source:
    """The ``what`` image (``"labels"``, ``"probabilities"`` or ``"instances"``) of the finished
    output ``src``.

    ``verb`` is the command reading it, for the messages (``"export"``, ``"score"``).

    Raises:
        StoreNotFoundError: no output there, or it lacks ``what``.
        InputError: not a tilewise output, or not complete.
    """
    from tilewise.pipeline.output import OUTPUT_FIX, output_state

    location = local_path(src).rstrip("/")
    root = open_node(location, "r", options, "output", OUTPUT_FIX)
    state = output_state(root, location, f"{verb} reads")
    status = state.get("status")
    if status != "complete":
        raise InputError(
            f"output '{location}' is not complete (status '{status}', "
            f"{_done_units(location, options)} units written), so it has unwritten pixels; "
            f"run the same job again (`tilewise run JOB.yaml`) to finish it, then {verb}."
        )
    # Looked up by name: listing the group's members warns about the .tilewise folder.
    names = [n for n in ("labels", "probabilities", "instances") if n in root]
    if what not in names:
        job_key = f"output.{what}"
        if verb == "export":
            fix = f"export another image, or set {job_key} in the job and run it again"
        elif what == "instances":
            fix = (
                f"{verb} reads the objects the instance stage paints: set {job_key} in the job "
                f"and run it again"
            )
        else:
            fix = (
                f"{verb} reads the '{what}' image: set {job_key} in the job and run it again "
                f"(an instance architecture's job writes none; its instances/ are objects)"
            )
        raise StoreNotFoundError(
            f"output '{location}' has no '{what}' image (it has: {', '.join(names) or 'none'}); "
            f"{fix}."
        )
    group: Any = root[what]
    if not isinstance(group, zarr.Group):
        raise InputError(
            f"'{what}' in output '{location}' is an array, not an OME-Zarr image group; "
            f"{verb} reads outputs that `tilewise run` writes."
        )
    image_attrs = dict(group.attrs)
    stage_state = image_attrs.get("tilewise")
    stage = stage_state.get("status") if isinstance(stage_state, dict) else None
    if what == "instances" and stage != "complete":
        raise InputError(
            f"output '{location}': its instance stage is not complete (status '{stage}'), so "
            f"instances/ has unpainted objects; run the same job again (`tilewise run JOB.yaml`) "
            f"to finish it, then {verb}."
        )
    multiscales = _ome_multiscales(image_attrs) or []
    datasets = multiscales[0].get("datasets", []) if multiscales else []
    try:
        levels = [group[d["path"]] for d in datasets] or [group["0"]]
    except KeyError as exc:
        raise StoreNotFoundError(
            f"output '{location}': the '{what}' image names a level {exc} that does not exist; "
            f"the output is damaged, run its job again with --overwrite."
        ) from None
    levels = _halving_levels(levels)

    scale: list[float] | None = None
    for transform in datasets[0].get("coordinateTransformations", []) if datasets else []:
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"][-2:]]
    axes = multiscales[0].get("axes", []) if multiscales else []
    units = [a.get("unit") for a in axes[-2:] if isinstance(a, dict)]
    unit = units[-1] if units and units[-1] else None

    # Carried attributes: the root's tilewise copy, then the root's, then the image group's.
    attrs: dict[str, Any] = {}
    for layer in (state, dict(root.attrs), image_attrs):
        attrs.update({k: v for k, v in layer.items() if k != "tilewise"})

    model = (state.get("job") or {}).get("model") or {}
    num_classes = model.get("num_classes")
    if not isinstance(num_classes, int):
        probs: Any = root["probabilities/0"] if "probabilities" in names else None
        num_classes = int(probs.shape[0]) if probs is not None else 0
    names_given = state.get("class_names") or model.get("class_names") or []
    label_info = _image_label(image_attrs) if what == "labels" else {}
    return _Source(
        location=location,
        what=what,
        levels=levels,
        attrs=attrs,
        num_classes=num_classes,
        class_names=[str(n) for n in names_given] or label_info.get("names", []),
        colours=label_info.get("colours") or _colours_attr(state),
        scale=scale,
        unit=unit,
    )


def _halving_levels(levels: list[Any]) -> list[Any]:
    """The output's levels while each halves the one before (rounded either way)."""
    kept = [levels[0]]
    for arr in levels[1:]:
        (h0, w0), (h, w) = kept[-1].shape[-2:], arr.shape[-2:]
        if h not in (h0 // 2, -(-h0 // 2)) or w not in (w0 // 2, -(-w0 // 2)) or max(h, w) < 1:
            break
        kept.append(arr)
    return kept


def _rgba(value: Any) -> tuple[int, int, int, int] | None:
    if isinstance(value, str) and value.startswith("#") and len(value) in (7, 9):
        parts = [int(value[i : i + 2], 16) for i in range(1, len(value), 2)]
        return (*parts[:3], parts[3] if len(parts) > 3 else 255)  # type: ignore[return-value]
    if isinstance(value, (list, tuple)) and len(value) in (3, 4):
        c = [int(v) for v in value]
        return (c[0], c[1], c[2], c[3] if len(c) > 3 else 255)
    return None


def _image_label(attrs: dict[str, Any]) -> dict[str, Any]:
    """Colours and names from NGFF ``image-label`` metadata (0.5 under ``ome``, or 0.4)."""
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else {}
    info = (ome or {}).get("image-label") or attrs.get("image-label") or {}
    out: dict[str, Any] = {}
    colours: dict[int, tuple[int, int, int, int]] = {}
    for entry in info.get("colors", []) or []:
        rgba = _rgba(entry.get("rgba"))
        if rgba is not None and isinstance(entry.get("label-value"), int):
            colours[entry["label-value"]] = rgba
    if colours:
        out["colours"] = [colours.get(i, _palette(i)) for i in range(max(colours) + 1)]
    names: dict[int, str] = {}
    for entry in info.get("properties", []) or []:
        name = entry.get("name") or entry.get("class") or entry.get("class_name")
        if isinstance(entry.get("label-value"), int) and name:
            names[entry["label-value"]] = str(name)
    if names:
        out["names"] = [names.get(i, f"class {i}") for i in range(max(names) + 1)]
    return out


def _colours_attr(state: dict[str, Any]) -> list[tuple[int, int, int, int]] | None:
    for key in ("class_colours", "class_colors"):
        values = state.get(key)
        if isinstance(values, list) and values:
            rgba = [_rgba(v) for v in values]
            if all(c is not None for c in rgba):
                return rgba  # type: ignore[return-value]
    return None


def _label_classes(source: _Source) -> tuple[list[str], int]:
    """Names of the label values and how many there are (2 for a one-map sigmoid model)."""
    count = max(source.num_classes, 2) if source.num_classes == 1 else source.num_classes
    names = list(source.class_names)
    if source.num_classes == 1 and len(names) == 1:
        names = ["background", names[0]]
    count = max(count, len(names))
    if len(names) < count:
        names += [f"class {i}" for i in range(len(names), count)]
    return names, count


def _georeferencing(attrs: dict[str, Any], height: int, width: int) -> tuple[Any, Any, list[str]]:
    """CRS and affine transform from the ``proj:`` / ``spatial:`` attributes (None if absent)."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    notes: list[str] = []
    crs = None
    for key in ("proj:wkt2", "proj:projjson", "proj:code", "crs"):
        value = attrs.get(key)
        if not value:
            continue
        try:
            crs = CRS.from_user_input(json.dumps(value) if isinstance(value, dict) else value)
        except CRSError as exc:
            raise InputError(
                f"the output's '{key}' attribute is not a CRS that PROJ knows ({exc}); "
                f"correct it in the input store's attributes and run the job again."
            ) from None
        break
    transform = None
    coefficients = attrs.get("spatial:transform")
    if coefficients is not None:
        if not isinstance(coefficients, (list, tuple)) or len(coefficients) not in (6, 9):
            raise InputError(
                f"the output's 'spatial:transform' must be the 6 affine coefficients "
                f"[a, b, c, d, e, f]; got {coefficients!r}."
            )
        transform = Affine(*[float(v) for v in coefficients[:6]])
        if attrs.get("spatial:registration") == "node":
            # The coefficients place pixel centres; GeoTIFF's transform places corners.
            transform = transform * Affine.translation(-0.5, -0.5)
    shape = attrs.get("spatial:shape")
    if isinstance(shape, (list, tuple)) and list(shape)[-2:] != [height, width]:
        notes.append(
            f"the carried spatial:shape {list(shape)} differs from the output's "
            f"{[height, width]}; the transform is used as it is"
        )
    if crs is None and transform is None:
        notes.append("the output carries no CRS or transform: the GeoTIFF is not georeferenced")
    elif crs is None:
        notes.append("the output carries a transform but no CRS (proj:code/proj:wkt2)")
    elif transform is None:
        notes.append("the output carries a CRS but no spatial:transform")
    return crs, transform, notes


# -- windows, downsampling ---------------------------------------------------------------------


def _step(bands: int, itemsize: int, chunk: int) -> int:
    """Side of the square windows read at once: a multiple of the 512 tile (and of the Zarr
    chunk when it divides evenly), within WINDOW_BYTES."""
    step = TILE * max(1, math.isqrt(WINDOW_BYTES // (bands * itemsize * TILE * TILE)))
    if (
        chunk > 0
        and step % chunk
        and chunk % TILE == 0
        and chunk * chunk * bands * itemsize <= (4 * WINDOW_BYTES)
    ):
        step = chunk * max(1, step // chunk)
    return step


def _windows(height: int, width: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            yield y0, min(height, y0 + step), x0, min(width, x0 + step)


def _chunk_side(arr: Any) -> int:
    return int(arr.chunks[-1])


def _reduce(prev: Any, path: Path, labels: bool) -> Any:
    """The 2x reduction of ``prev`` written block by block to a temporary Zarr array."""
    height, width = (-(-n // 2) for n in prev.shape[-2:])
    lead = tuple(prev.shape[:-2])
    dtype = _export_dtype(prev.dtype)  # float16 means are kept in float32, as exported
    out = zarr.create_array(
        str(path),
        shape=(*lead, height, width),
        chunks=(*lead, TILE, TILE),
        dtype=dtype,
        fill_value=0,
    )
    bands = int(np.prod(lead)) if lead else 1
    # Reads 4x the output block, and the mode's masks and counts take as much again.
    step = _step(bands, dtype.itemsize * 16, TILE)
    for y0, y1, x0, x1 in _windows(height, width, step):
        block = np.asarray(prev[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]).astype(dtype)
        out[..., y0:y1, x0:x1] = downsample_mode(block) if labels else downsample_mean(block)
    return out


def _export_dtype(dtype: Any) -> np.dtype[Any]:
    # float16 rasters: GDAL 3.10 has no Float16 type and viewers rarely read half floats.
    return np.dtype("float32") if np.dtype(dtype) == np.float16 else np.dtype(dtype)


# -- COG ---------------------------------------------------------------------------------------


def _write_cog(source: _Source, tmpdir: Path, final: Path, report: ExportReport) -> None:
    import rasterio
    import rasterio.shutil
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    arr = source.levels[0]
    labels = source.what == "labels"
    height, width = (int(n) for n in arr.shape[-2:])
    bands = 1 if labels else int(arr.shape[0])
    dtype = _export_dtype(arr.dtype)
    crs, transform, notes = _georeferencing(source.attrs, height, width)
    report.notes += notes
    report.crs = crs.to_string() if crs is not None else None
    report.transform = list(transform)[:6] if transform is not None else None
    profile: dict[str, Any] = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=bands,
        dtype=dtype.name,
        tiled=True,
        blockxsize=TILE,
        blockysize=TILE,
        compress="ZSTD",
        zstd_level=1,  # a scratch file: fast beats small
        bigtiff="IF_SAFER",
    )
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    names, count = _label_classes(source) if labels else (list(source.class_names), bands)
    if not labels and len(names) != bands:
        names = [f"class {i}" for i in range(bands)] if bands > 1 else names[:1] or ["class 1"]
    report.class_names = names

    scratch = tmpdir / "scratch.tif"
    step = _step(bands, dtype.itemsize, _chunk_side(arr))
    # GDAL's block cache defaults to 5 % of the RAM; the windows are written once each.
    with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(scratch, "w", **profile) as out:
            for y0, y1, x0, x1 in _windows(height, width, step):
                window = Window(x0, y0, x1 - x0, y1 - y0)
                if labels:
                    out.write(np.asarray(arr[y0:y1, x0:x1]), 1, window=window)
                else:
                    out.write(np.asarray(arr[:, y0:y1, x0:x1]).astype(dtype), window=window)
            if labels:
                if dtype == np.uint8:
                    colours, report.colours = _colour_table(source, count)
                    out.write_colormap(1, {i: c for i, c in enumerate(colours)})
                else:
                    # A uint16 TIFF palette has 65536 entries: 768 KiB in every IFD, which a
                    # COG reader must fetch before any pixel.
                    report.notes.append("uint16 labels: no colour table (class names kept)")
                out.set_band_description(1, "class")
                out.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(names)})
            else:
                for b, name in enumerate(names, start=1):
                    out.set_band_description(b, name)
                if dtype == np.uint8:
                    # uint8 probabilities store round(255 p): GIS tools show p with this scale.
                    out.scales = [1 / 255] * bands
            out.update_tags(
                TILEWISE_SOURCE=source.location,
                TILEWISE_IMAGE=source.what,
                TILEWISE_CLASSES=json.dumps(names),
            )
        predictor = 3 if dtype.kind == "f" else (2 if not labels else 1)
        rasterio.shutil.copy(
            scratch,
            final,
            driver="COG",
            compress="DEFLATE",
            predictor=predictor,
            blocksize=TILE,
            overview_resampling="MODE" if labels else "AVERAGE",
            bigtiff="IF_SAFER",
        )
        scratch.unlink()
        with rasterio.open(final) as done:
            report.levels = [[height, width]] + [
                [-(-height // f), -(-width // f)] for f in done.overviews(1)
            ]
    problems = check_cog_layout(final)
    report.layout = "COG layout checked: " + ("valid" if not problems else "; ".join(problems))


def _colour_table(source: _Source, count: int) -> tuple[list[tuple[int, int, int, int]], str]:
    if source.colours:
        colours = list(source.colours[:count])
        origin = "from the output's metadata"
        if len(colours) < count:
            origin += f" (classes 0-{len(colours) - 1}; the rest from the fixed palette)"
    else:
        colours, origin = [], "fixed palette (the output names no colours)"
    colours += [_palette(i) for i in range(len(colours), count)]
    return colours, origin


def _palette(i: int) -> tuple[int, int, int, int]:
    """Class ``i``'s fallback colour: the output writer's palette where it has one."""
    try:
        from tilewise.pipeline.output import CLASS_COLOURS
    except ImportError:  # an output module without class colours
        return (*PALETTE[i % len(PALETTE)], 255)
    r, g, b, a = CLASS_COLOURS[i % len(CLASS_COLOURS)]
    return (int(r), int(g), int(b), int(a))


def check_cog_layout(path: str | os.PathLike[str]) -> list[str]:
    """Problems with a file's Cloud-Optimised GeoTIFF layout ([] when it is one).

    The rules of GDAL's ``validate_cloud_optimized_geotiff.py``: the image is tiled; overviews
    (if any) are tiled, smaller each time and follow the full image's IFD; all IFDs come before
    the image data; the data of the smallest overview comes first and the full image's last;
    each IFD's tiles lie in increasing order. It also wants GDAL's ghost header naming the layout.
    """
    import tifffile

    problems: list[str] = []
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if b"GDAL_STRUCTURAL_METADATA_SIZE" not in head or b"LAYOUT=IFDS_BEFORE_DATA" not in head:
        problems.append("no GDAL ghost header declaring LAYOUT=IFDS_BEFORE_DATA")
    with tifffile.TiffFile(path) as tif:
        pages: list[Any] = list(tif.pages)
        images = [p for p in pages if not (p.subfiletype & 4)]
        if not images or images[0].subfiletype & 1:
            return [*problems, "the first IFD is not the full-resolution image"]
        for i, page in enumerate(images):
            if not page.is_tiled:
                problems.append(f"IFD {i} is not tiled")
        for a, b in itertools.pairwise(images):
            if not (b.subfiletype & 1) or b.imagewidth >= a.imagewidth:
                problems.append("the overviews do not follow the image, each smaller")
                break
        data_start = min((o for p in pages for o in p.dataoffsets if o), default=0)
        if any(p.offset > data_start for p in pages):
            problems.append("an IFD lies after image data (IFDs must all come first)")
        firsts = [min((o for o in p.dataoffsets if o), default=0) for p in images]
        if firsts != sorted(firsts, reverse=True):
            problems.append("image data is not ordered from the smallest overview to the image")
        for i, page in enumerate(images):
            offsets = [o for o in page.dataoffsets if o]
            if offsets != sorted(offsets):
                problems.append(f"the tiles of IFD {i} are not in increasing order")
    return problems


# -- OME-TIFF ----------------------------------------------------------------------------------


def _tiles(arr: Any, dtype: np.dtype[Any], bands: bool) -> Iterator[np.ndarray]:
    """Tiles in TIFF order (plane by plane, rows of tiles); edge tiles are padded by tifffile."""
    height, width = (int(n) for n in arr.shape[-2:])
    planes = range(int(arr.shape[0])) if bands else [None]
    for c in planes:
        for y0 in range(0, height, TILE):
            for x0 in range(0, width, TILE):
                if c is None:
                    block = arr[y0 : y0 + TILE, x0 : x0 + TILE]
                else:
                    block = arr[c, y0 : y0 + TILE, x0 : x0 + TILE]
                yield np.ascontiguousarray(np.asarray(block), dtype=dtype)


def _write_ome_tiff(source: _Source, tmpdir: Path, final: Path, report: ExportReport) -> None:
    import tifffile

    labels = source.what == "labels"
    arr = source.levels[0]
    dtype = _export_dtype(arr.dtype)
    levels = list(source.levels)
    # Reductions down to one tile; missing ones built from the smallest the output has.
    while max(levels[-1].shape[-2:]) > TILE:
        levels.append(_reduce(levels[-1], tmpdir / f"level{len(levels)}.zarr", labels))
    report.levels = [[int(n) for n in lvl.shape[-2:]] for lvl in levels]

    names, _ = _label_classes(source) if labels else (list(source.class_names), 0)
    bands = 1 if labels else int(arr.shape[0])
    if not labels and len(names) != bands:
        names = [f"class {i}" for i in range(bands)]
    report.class_names = names
    metadata: dict[str, Any] = {"axes": "YX" if labels else "CYX", "Name": source.what}
    if not labels:
        metadata["Channel"] = {"Name": names}
    resolution: dict[str, Any] = {}
    unit_symbol = _OME_UNITS.get((source.unit or "micrometer").lower())
    if source.scale and (source.unit or source.scale != [1.0, 1.0]) and unit_symbol:
        py, px = source.scale
        metadata.update(
            PhysicalSizeX=px,
            PhysicalSizeXUnit=unit_symbol,
            PhysicalSizeY=py,
            PhysicalSizeYUnit=unit_symbol,
        )
        report.pixel_size, report.pixel_unit = [py, px], unit_symbol
        if unit_symbol == "µm":  # TIFF resolution tags for readers without OME-XML
            resolution = {"resolution": (1e4 / px, 1e4 / py), "resolutionunit": "CENTIMETER"}
    elif source.unit and not unit_symbol:
        report.notes.append(f"the output's unit '{source.unit}' has no OME-XML symbol; no size")
    else:
        report.notes.append(
            "the output has no physical pixel size (its input had none): no PhysicalSizeX/Y"
        )
    if labels:
        report.notes.append(
            "OME-TIFF labels are grey values (class index); the colour table is in the COG"
        )
    common: dict[str, Any] = {
        "dtype": dtype,
        "tile": (TILE, TILE),
        "compression": "zlib",  # deflate: what Bio-Formats (QuPath) and every TIFF reader decode
        "photometric": "minisblack",
    }
    with tifffile.TiffWriter(final, bigtiff=True, ome=True) as tif:
        tif.write(
            _tiles(levels[0], dtype, not labels),
            shape=tuple(int(n) for n in levels[0].shape),
            subifds=len(levels) - 1,
            metadata=metadata,
            software="tilewise",
            **resolution,
            **common,
        )
        for k, lvl in enumerate(levels[1:], start=1):
            res: dict[str, Any] = {}
            if resolution:
                rx, ry = resolution["resolution"]
                res = {"resolution": (rx / 2**k, ry / 2**k), "resolutionunit": "CENTIMETER"}
            tif.write(
                _tiles(lvl, dtype, not labels),
                shape=tuple(int(n) for n in lvl.shape),
                subfiletype=1,
                metadata=None,
                **res,
                **common,
            )
    report.layout = f"OME-TIFF, {len(levels) - 1} SubIFD reduction(s) per plane, tiled {TILE}"


# -- entry point -------------------------------------------------------------------------------


def export(
    src: str,
    dst: str,
    *,
    what: What = "labels",
    fmt: Format | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> ExportReport:
    """Export a finished output's labels or probabilities as a COG or a pyramidal OME-TIFF.

    Args:
        src: the output store (local path or fsspec URL) of a completed predict job.
        dst: the file to write (local path or fsspec URL); its extension picks the format when
            ``fmt`` is None: ``.ome.tif``/``.ome.tiff`` -> OME-TIFF, ``.tif``/``.tiff`` -> COG.
        what: ``labels`` (class per pixel) or ``probabilities`` (K bands).
        fmt: ``cog`` or ``ome-tiff``; overrides the extension.
        overwrite: replace an existing ``dst``.
        storage_options: fsspec options for URLs (``src`` and ``dst``).

    Returns:
        What was written: shape, levels, georeferencing or pixel size, classes, size, time.

    Raises:
        InputError: the output is not complete or not a tilewise output.
        StoreNotFoundError: ``src`` or its ``what`` image does not exist.
        OutputExistsError: ``dst`` exists and ``overwrite`` is False.
        ConfigError: ``what`` or the format is not one of the choices.
    """
    import fsspec

    t0 = time.perf_counter()
    if what not in ("labels", "probabilities"):
        raise ConfigError(
            f"export what must be 'labels' or 'probabilities'; got '{what}'."
            + did_you_mean(str(what), ["labels", "probabilities"])
        )
    fmt_ = _fmt_of(dst, fmt)
    dst = local_path(dst)
    fs, dst_path = fsspec.core.url_to_fs(dst, **(storage_options or {}))
    if fs.exists(dst_path) and not overwrite:
        raise OutputExistsError(
            f"'{dst}' exists and is left as it is; use --overwrite to replace it, or choose "
            f"another file name."
        )
    source = open_output(src, what, storage_options)
    arr = source.levels[0]
    report = ExportReport(
        source=source.location,
        output=dst,
        what=what,
        format=fmt_,
        shape=[1 if what == "labels" else int(arr.shape[0]), *(int(n) for n in arr.shape[-2:])],
        dtype=_export_dtype(arr.dtype).name,
        levels=[],
    )
    # Scratch files beside a local dst (same disk, so the final rename is atomic); in the
    # system's temp folder for a URL, uploaded at the end.
    parent = None if is_url(dst) else str(Path(dst).resolve().parent)
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tilewise-export-", dir=parent) as tmp:
        tmpdir = Path(tmp)
        final = tmpdir / ("export.ome.tif" if fmt_ == "ome-tiff" else "export.tif")
        if fmt_ == "cog":
            _write_cog(source, tmpdir, final, report)
        else:
            _write_ome_tiff(source, tmpdir, final, report)
        report.bytes = final.stat().st_size
        if is_url(dst):
            fs.put_file(str(final), dst_path)
        else:
            os.replace(final, dst)
    report.seconds = time.perf_counter() - t0
    return report
