"""Foreground masks: which write units hold anything worth segmenting.

A whole-slide image is mostly bright glass and a satellite scene often has a no-data collar;
units without foreground are written as the background class without running the network
(``input.mask``, :class:`tilewise.spec.MaskSpec`). Three methods:

- ``tissue``: the driver reads a low-resolution OME-Zarr level (or streams level 0 block-averaged
  when there is no pyramid), thresholds its darkness (Otsu by default), cleans the result up and
  dilates it by one mask pixel (:func:`plan_foreground`).
- ``array``: the driver reads a user's mask of any resolution; non-zero is foreground.
- ``nodata``: decided per unit by the predictor actor on the pixels it reads anyway
  (:func:`unit_is_nodata`, :func:`resolve_nodata`), so the driver reads no pixels for it.

Skipping is **conservative**: a unit's pixel rectangle maps to every mask pixel that covers any
part of it (floor of the start, ceiling of the end), so a unit is skipped only when no
full-resolution pixel of it can be foreground. ``min_fraction`` > 0 is the user's explicit
trade-off: units whose foreground covers at most that share of their area are skipped too.

Everything here is numpy, zarr and scikit-image; memory stays bounded by reading blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zarr
from skimage.filters import threshold_otsu
from skimage.morphology import dilation, remove_small_holes, remove_small_objects

from tilewise.errors import ConfigError, InputError, StoreNotFoundError
from tilewise.pipeline.engine import Unit
from tilewise.pipeline.stores import InputImage, _axes_from_names, _ome_multiscales, open_node
from tilewise.pipeline.units import UnitGrid
from tilewise.spec import MaskSpec

__all__ = [
    "Foreground",
    "background_units",
    "choose_level",
    "nodata_pixels",
    "plan_foreground",
    "resolve_nodata",
    "unit_is_nodata",
]

MASK_LONG_SIDE = 2048
"""Most mask pixels along the long side: a level longer than this is block-averaged further."""

MIN_SHORT_SIDE = 512
"""Default tissue level: the coarsest whose short side keeps at least this many pixels."""

_BLOCK = 2048
"""Side of the blocks a level is streamed in (about 12 MB for 3 uint8 bands)."""

_MIN_CONTRAST = 8 / 255
"""Otsu splits any histogram, noise included: below this gap between the mean darkness of the
two classes (8 grey levels of 255) the level is taken as blank rather than as half tissue."""

_SPECK = 8
"""Connected foreground of at most this many mask pixels is dust, not tissue."""

_HOLE = 64
"""Holes of at most this many mask pixels inside tissue are filled (only adds foreground)."""

_NODATA_KEYS = ("nodata", "proj:nodata", "_FillValue")


def _span(lo: float, hi: float, scale: float, n: int) -> tuple[int, int]:
    """Mask pixels ``[a, b)`` that cover any part of full-resolution ``[lo, hi)``.

    Clamped to the mask, so a rectangle past the mask's end (a pyramid level rounded down) maps
    to the last mask pixel, the nearest information there is.
    """
    a = min(max(math.floor(lo / scale), 0), n - 1)
    b = max(min(math.ceil(hi / scale), n), a + 1)
    return a, b


def _spans(lo: np.ndarray, hi: np.ndarray, scale: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_span` for arrays of rectangles (one axis)."""
    a = np.clip(np.floor(lo / scale).astype(np.int64), 0, n - 1)
    b = np.maximum(np.minimum(np.ceil(hi / scale).astype(np.int64), n), a + 1)
    return a, b


def _overlaps(lo: np.ndarray, hi: np.ndarray, a: int, b: int, scale: float, n: int) -> np.ndarray:
    """(len(lo), b - a): length of each ``[lo, hi)`` that mask pixels ``a..b-1`` cover (one axis).

    The last mask pixel stands for everything past the mask's end (see :func:`_span`).
    """
    starts = np.arange(a, b, dtype=np.float64) * scale
    ends = starts + scale
    if b == n:
        ends[-1] = np.inf
    lengths = np.minimum(ends[None, :], hi[:, None]) - np.maximum(starts[None, :], lo[:, None])
    return np.clip(lengths, 0.0, None)


@dataclass(frozen=True, eq=False)
class Foreground:
    """Foreground of one image at a coarse resolution, and what it means for write units.

    Mask pixel ``(i, j)`` stands for the full-resolution rectangle
    ``[i * scale[0], (i + 1) * scale[0]) × [j * scale[1], (j + 1) * scale[1])``.
    """

    mask: np.ndarray
    """bool (h, w) at the mask's resolution."""
    scale: tuple[float, float]
    """Full-resolution pixels per mask pixel along (y, x); need not be integers."""
    source: str
    """What the mask was made from, for the report (level, size, threshold, or why it is empty)."""

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"a foreground mask is a non-empty 2-D array; got shape {mask.shape}")
        if not all(s > 0 and math.isfinite(s) for s in self.scale):
            raise ValueError(f"mask scale must be positive; got {self.scale}")
        object.__setattr__(self, "mask", mask.astype(bool, copy=False))
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))

    @property
    def fraction(self) -> float:
        """Share of the mask that is foreground (for reports)."""
        return float(self.mask.mean())

    @cached_property
    def _integral(self) -> np.ndarray:
        """Summed-area table with a zero first row and column: window counts in O(1)."""
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.int64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
        return table

    def window(self, y0: int, y1: int, x0: int, x1: int) -> tuple[int, int, int, int]:
        """Mask pixels ``[a, b) × [c, d)`` covering any part of full-resolution ``[y0, y1) × [x0,
        x1)``."""
        a, b = _span(y0, y1, self.scale[0], self.mask.shape[0])
        c, d = _span(x0, x1, self.scale[1], self.mask.shape[1])
        return a, b, c, d

    def unit_fraction(self, unit: Unit) -> float:
        """Share of the unit's area that foreground mask pixels cover (0..1).

        Each mask pixel counts with the area of the unit it covers, so the value is the exact
        share under the mask's own resolution; it is > 0 whenever any foreground mask pixel
        covers any part of the unit (the conservative rule), and 0 only when none does.
        """
        a, b, c, d = self.window(unit.y0, unit.y1, unit.x0, unit.x1)
        window = self.mask[a:b, c:d]
        if not window.any():
            return 0.0
        h, w = self.mask.shape
        wy = _overlaps(np.array([unit.y0]), np.array([unit.y1]), a, b, self.scale[0], h)[0]
        wx = _overlaps(np.array([unit.x0]), np.array([unit.x1]), c, d, self.scale[1], w)[0]
        covered = float(wy @ window.astype(np.float64) @ wx)
        fraction = min(1.0, covered / unit.pixels)
        # A pixel in the window touches the unit by construction; rounding must not make it 0.
        return fraction if fraction > 0 else float(np.finfo(np.float64).tiny)

    def units_with_foreground(self, grid: UnitGrid, min_fraction: float = 0.0) -> set[int]:
        """Indices of the units to compute: foreground fraction above ``min_fraction``.

        With ``min_fraction`` 0 that is every unit that any foreground mask pixel touches.
        """
        h, w = self.mask.shape
        # Wiring guard: the mask must cover the grid's image (to within a mask pixel of rounding).
        if abs(h * self.scale[0] - grid.height) > self.scale[0] + 1 or (
            abs(w * self.scale[1] - grid.width) > self.scale[1] + 1
        ):
            raise ValueError(
                f"foreground mask {h} x {w} at scale {self.scale} covers "
                f"{h * self.scale[0]:.0f} x {w * self.scale[1]:.0f} px, not the "
                f"{grid.height} x {grid.width} px unit grid"
            )
        y0 = np.arange(grid.rows, dtype=np.int64) * grid.side
        x0 = np.arange(grid.cols, dtype=np.int64) * grid.side
        y1, x1 = np.minimum(y0 + grid.side, grid.height), np.minimum(x0 + grid.side, grid.width)
        a, b = _spans(y0, y1, self.scale[0], h)
        c, d = _spans(x0, x1, self.scale[1], w)
        s = self._integral
        touched = (s[b][:, d] - s[a][:, d] - s[b][:, c] + s[a][:, c]) > 0  # (rows, cols)
        if min_fraction > 0:
            # Every unit's covered area at once: the grid is a product of row and column
            # intervals, so it is Wy @ mask @ Wx^T (dense weights: a mask is at most ~2k px).
            wy = _overlaps(y0, y1, 0, h, self.scale[0], h)
            wx = _overlaps(x0, x1, 0, w, self.scale[1], w)
            covered = wy @ self.mask.astype(np.float64) @ wx.T
            touched &= covered / np.outer(y1 - y0, x1 - x0) > min_fraction
        return set(np.flatnonzero(touched).tolist())


def choose_level(shapes: list[tuple[int, int]], min_short_side: int = MIN_SHORT_SIDE) -> int:
    """The coarsest level whose short side is at least ``min_short_side``; 0 when none is.

    ``shapes`` are the (h, w) of the levels, finest first.
    """
    best = 0
    for level, (h, w) in enumerate(shapes):
        if min(h, w) >= min_short_side and h * w <= shapes[best][0] * shapes[best][1]:
            best = level
    return best


# -- streamed pooling -----------------------------------------------------------------------------


def _step(factor: int, chunk: int) -> int:
    """Block side along one axis: a multiple of ``factor`` near ``_BLOCK``, chunk-aligned when
    that stays small (so no chunk is fetched twice)."""
    aligned = math.lcm(factor, max(1, chunk))
    if aligned <= 2 * _BLOCK:
        return aligned * max(1, _BLOCK // aligned)
    return factor * max(1, _BLOCK // factor)


def _pool(
    shape: tuple[int, int],
    chunks: tuple[int, int],
    read: Callable[[int, int, int, int], np.ndarray],
    factor: int,
    how: str,
) -> np.ndarray:
    """Pool a (h, w) plane by ``factor``, reading it block by block (never whole).

    ``how`` is ``mean`` (float64 mean of the pixels of each pooled cell; cells cut by the image
    end average the pixels they have) or ``any`` (bool: any non-zero pixel in the cell).
    """
    h, w = shape
    oh, ow = -(-h // factor), -(-w // factor)
    out = np.zeros((oh, ow), np.float64 if how == "mean" else bool)
    sy, sx = _step(factor, chunks[0]), _step(factor, chunks[1])
    for y0 in range(0, h, sy):
        y1 = min(y0 + sy, h)
        for x0 in range(0, w, sx):
            x1 = min(x0 + sx, w)
            block = read(y0, y1, x0, x1)
            bh, bw = -(-(y1 - y0) // factor), -(-(x1 - x0) // factor)
            py, px = bh * factor - (y1 - y0), bw * factor - (x1 - x0)
            cells = (slice(y0 // factor, y0 // factor + bh), slice(x0 // factor, x0 // factor + bw))
            if how == "mean":
                padded = np.pad(block.astype(np.float64, copy=False), ((0, py), (0, px)))
                sums = padded.reshape(bh, factor, bw, factor).sum(axis=(1, 3))
                ny = np.minimum(factor, (y1 - y0) - np.arange(bh) * factor)
                nx = np.minimum(factor, (x1 - x0) - np.arange(bw) * factor)
                out[cells] = sums / np.outer(ny, nx)
            else:
                padded = np.pad(block != 0, ((0, py), (0, px)))
                out[cells] = padded.reshape(bh, factor, bw, factor).any(axis=(1, 3))
    return out


def _factor(shape: tuple[int, int], long_side: int) -> int:
    return max(1, -(-max(shape) // max(1, long_side)))


def _image_chunks(image: InputImage) -> tuple[int, int]:
    chunks = tuple(int(c) for c in image.array.chunks)
    if image.axes == "cyx":
        return chunks[1], chunks[2]
    return chunks[0], chunks[1]


def _grey(image: InputImage) -> Callable[[int, int, int, int], np.ndarray]:
    """Reader of the band mean (grey) of ``image``, in the input's own units."""

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # float32 accumulation: no float64 copy of every band of the block.
        return np.asarray(image.read(y0, y1, x0, x1).mean(axis=0, dtype=np.float32))

    return read


def _white_level(dtype: np.dtype, grey: np.ndarray) -> float:
    """The grey value of a white pixel: the dtype's maximum (floats: 1, or the data's maximum
    when the data go above 1)."""
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    peak = float(np.nanmax(grey)) if grey.size else 1.0
    return peak if peak > 1.0 else 1.0


# -- tissue -----------------------------------------------------------------------------------


def _level_ratio(
    image: InputImage, level: InputImage, full: tuple[int, int], coarse: tuple[int, int]
) -> tuple[float, float]:
    """Image pixels per pixel of another level, along (y, x).

    The ratio of the OME-Zarr scale transforms when both levels have one and it fits the shapes
    (a level made by 2x pooling of an odd size is rounded, e.g. 483 -> 241 -> 120 px, and its
    pixels are still exactly 4 px of level 0); otherwise the ratio of the shapes.
    """
    ratio = [f / c for f, c in zip(full, coarse, strict=True)]
    if image.scale is not None and level.scale is not None:
        for axis in range(2):
            by_transform = level.scale[axis] / image.scale[axis]
            # A pooled level holds floor or ceil of full / factor pixels: within one pixel.
            if by_transform > 0 and abs(coarse[axis] * by_transform - full[axis]) < by_transform:
                ratio[axis] = by_transform
    return ratio[0], ratio[1]


def _tissue(
    image: InputImage, spec: MaskSpec, options: dict[str, Any] | None, long_side: int
) -> Foreground:
    _, height, width = image.shape
    multiscale = getattr(image, "multiscale", None)
    if multiscale:
        levels = len(multiscale.get("datasets", []))
        if spec.level is not None and spec.level >= levels:
            raise InputError(
                f"input.mask.level {spec.level} does not exist: '{image.location}' has levels "
                f"0..{levels - 1}. Use one of them, or null for the coarsest level at least "
                f"{MIN_SHORT_SIDE} px on its short side."
            )
        opened = [
            InputImage(image.location, level=k, axes=image.axes, storage_options=options)
            for k in range(levels)
        ]
        level = (
            spec.level if spec.level is not None else choose_level([im.shape[1:] for im in opened])
        )
        source_image = opened[level]
    else:
        if spec.level not in (None, 0):
            raise InputError(
                f"input.mask.level {spec.level} needs an OME-Zarr pyramid, but input "
                f"'{image.location}' is a single array; remove input.mask.level (level 0 is then "
                f"read block-averaged)."
            )
        level, source_image = 0, image
    _, lh, lw = source_image.shape
    factor = _factor((lh, lw), long_side)
    grey = _pool((lh, lw), _image_chunks(source_image), _grey(source_image), factor, "mean")
    # NaN pixels (float inputs) count as background, like the bright glass of a slide.
    darkness = np.nan_to_num(1.0 - grey / _white_level(source_image.dtype, grey), nan=0.0)
    h, w = darkness.shape
    where = f"tissue, level {level}" + (f" averaged {factor}x{factor}" if factor > 1 else "")
    where += f" ({h} x {w})"
    ratio = _level_ratio(image, source_image, (height, width), (lh, lw))
    scale = (factor * ratio[0], factor * ratio[1])

    if spec.threshold == "otsu":
        threshold = float(threshold_otsu(darkness))
        tissue = darkness > threshold
        low = float(darkness[~tissue].mean()) if (~tissue).any() else threshold
        high = float(darkness[tissue].mean()) if tissue.any() else threshold
        if high - low < _MIN_CONTRAST:
            lo, hi = float(darkness.min()), float(darkness.max())
            return Foreground(
                np.zeros((h, w), bool),
                scale,
                f"{where}: no contrast (darkness {lo:.2f} to {hi:.2f}, Otsu classes "
                f"{high - low:.3f} apart, under {_MIN_CONTRAST:.3f}): blank, no foreground",
            )
        how = f"otsu threshold {threshold:.2f}"
    else:
        threshold = float(spec.threshold)
        tissue = darkness > threshold
        how = f"fixed threshold {threshold:.2f}"
    tissue = remove_small_objects(tissue, max_size=_SPECK)
    tissue = remove_small_holes(tissue, max_size=_HOLE)
    # One mask pixel of margin: edge pixels half covered by tissue fall under the threshold.
    tissue = dilation(tissue, footprint=np.ones((3, 3), bool))
    if not tissue.any():
        return Foreground(tissue, scale, f"{where}, {how}: no pixel darker, no foreground")
    return Foreground(tissue, scale, f"{where}, {how}, {100 * tissue.mean():.1f}% foreground")


# -- array ------------------------------------------------------------------------------------


def _mask_array(spec: MaskSpec, options: dict[str, Any] | None) -> tuple[Any, str]:
    """The user's mask as a Zarr array, and its location for messages."""
    if spec.path is None:
        raise ConfigError(
            "input.mask.method 'array' needs the mask's location; set input.mask.path to a Zarr "
            "array or OME-Zarr image (non-zero = foreground)."
        )
    node = open_node(spec.path, "r", options, "mask (input.mask.path)")
    location = spec.path
    if isinstance(node, zarr.Group):
        if spec.array is not None:
            try:
                node = node[spec.array]
            except KeyError:
                arrays = sorted(name for name, _ in node.arrays())
                raise StoreNotFoundError(
                    f"array '{spec.array}' (input.mask.array) does not exist in mask "
                    f"'{location}'; arrays there: {', '.join(arrays) or 'none'}."
                ) from None
            location = f"{location}/{spec.array}"
        else:
            multiscales = _ome_multiscales(dict(node.attrs))
            if not multiscales:
                arrays = sorted(name for name, _ in node.arrays())
                raise InputError(
                    f"mask '{location}' is a Zarr group, not an image; name the array with "
                    f"input.mask.array (arrays in it: {', '.join(arrays) or 'none'})."
                )
            path = multiscales[0]["datasets"][0]["path"]
            node, location = node[path], f"{location}/{path}"
        if not isinstance(node, zarr.Array):
            raise InputError(f"mask '{location}' is a group, not an array.")
    return node, location


def _array(
    image: InputImage, spec: MaskSpec, options: dict[str, Any] | None, long_side: int
) -> Foreground:
    node, location = _mask_array(spec, options)
    shape = tuple(int(n) for n in node.shape)
    chunks = tuple(int(c) for c in node.chunks)
    names = getattr(node.metadata, "dimension_names", None)
    axes = _axes_from_names(list(names) if names else None)
    if len(shape) == 3 and axes not in ("cyx", "yxc"):
        axes = "cyx" if shape[0] == 1 else "yxc" if shape[2] == 1 else None
    band = {"cyx": 0, "yxc": 2}.get(axes or "")
    if len(shape) == 3 and (band is None or shape[band] != 1):
        raise InputError(
            f"mask '{location}' has shape {shape}: a mask has one band, (h, w) or (1, h, w). "
            f"Save one band of it (non-zero = foreground) as the mask."
        )
    if len(shape) not in (2, 3) or 0 in shape:
        raise InputError(
            f"mask '{location}' has shape {shape}: a mask is a 2-D (h, w) or (1, h, w) array."
        )

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if len(shape) == 2:
            return np.asarray(node[y0:y1, x0:x1])
        if band == 0:
            return np.asarray(node[0, y0:y1, x0:x1])
        return np.asarray(node[y0:y1, x0:x1, 0])

    yx = shape if len(shape) == 2 else (shape[1:] if band == 0 else shape[:2])
    yx_chunks = chunks if len(shape) == 2 else (chunks[1:] if band == 0 else chunks[:2])
    mh, mw = int(yx[0]), int(yx[1])
    factor = _factor((mh, mw), long_side)
    # "any" pooling keeps every foreground pixel: coarser, never less conservative.
    mask = _pool((mh, mw), (int(yx_chunks[0]), int(yx_chunks[1])), read, factor, "any")
    _, height, width = image.shape
    scale = (factor * height / mh, factor * width / mw)
    pooled = f", any-pooled {factor}x{factor} to {mask.shape[0]} x {mask.shape[1]}"
    return Foreground(
        mask,
        scale,
        f"array mask '{location}' ({mh} x {mw}{pooled if factor > 1 else ''}; "
        f"{scale[0]:.3g} x {scale[1]:.3g} image px per mask px), "
        f"{100 * mask.mean():.1f}% foreground",
    )


# -- the driver's entry point -----------------------------------------------------------------


def plan_foreground(
    image: InputImage,
    spec: MaskSpec,
    *,
    storage_options: dict[str, Any] | None = None,
    long_side: int = MASK_LONG_SIDE,
) -> Foreground | None:
    """The foreground of ``image`` as ``spec`` asks, computed before any unit runs.

    ``tissue`` and ``array`` give a :class:`Foreground`; ``nodata`` gives None (the actor decides
    per unit on the pixels it reads anyway, :func:`unit_is_nodata`). ``storage_options`` open
    the input's other levels and the mask store. The mask is at most ``long_side`` pixels long:
    a longer level or mask is pooled block by block (mean for tissue, any for masks).
    """
    if spec.method == "nodata":
        return None
    if spec.method == "array":
        return _array(image, spec, storage_options, long_side)
    return _tissue(image, spec, storage_options, long_side)


def background_units(
    image: InputImage,
    grid: UnitGrid,
    spec: MaskSpec,
    *,
    storage_options: dict[str, Any] | None = None,
) -> tuple[set[int], Foreground | None]:
    """Units of ``grid`` that the mask leaves without foreground, and the mask itself.

    ``nodata`` masks give no units here (the actors decide per unit) and no mask, but their
    no-data value must be known (:func:`resolve_nodata` raises :class:`InputError` otherwise).
    """
    if spec.method == "nodata":
        # The actors decide per unit, but a missing no-data value is refused here, before any
        # output exists, rather than by the first actor after the outputs were created.
        resolve_nodata(image, spec)
        return set(), None
    fg = plan_foreground(image, spec, storage_options=storage_options)
    if fg is None:
        return set(), None
    keep = fg.units_with_foreground(grid, spec.min_fraction)
    return set(range(len(grid))) - keep, fg


# -- nodata (actor side) ----------------------------------------------------------------------


def nodata_pixels(block: np.ndarray, nodata: float) -> np.ndarray:
    """(h, w) bool of a (C, h, w) block: pixels whose every band equals ``nodata``.

    The value is compared in the block's own dtype (a float32 scene's ``-3.4e38`` matches its
    float32 value); NaN matches NaN; a value the dtype cannot hold matches nothing.
    """
    block = np.asarray(block)
    if block.ndim != 3:
        raise ValueError(f"a block is (C, h, w); got shape {block.shape}")
    dtype = block.dtype
    if math.isnan(nodata):
        if np.issubdtype(dtype, np.floating):
            return np.asarray(np.isnan(block).all(axis=0))
        return np.zeros(block.shape[1:], bool)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        info = np.iinfo(dtype) if dtype != np.bool_ else None
        low, high = (info.min, info.max) if info is not None else (0, 1)
        if nodata != math.floor(nodata) or not low <= nodata <= high:
            return np.zeros(block.shape[1:], bool)
        value: Any = dtype.type(int(nodata))
    else:
        value = dtype.type(nodata)
    return np.asarray((block == value).all(axis=0))


def unit_is_nodata(block: np.ndarray, nodata: float) -> bool:
    """True when every pixel of a (C, h, w) block equals ``nodata`` in every band."""
    return bool(nodata_pixels(block, nodata).all())


def _nodata_value(value: Any, key: str, where: str, location: str) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)):
        values = {_nodata_value(v, key, where, location) for v in value} - {None}
        # NaN != NaN in a set: several NaNs are one value.
        if values and all(isinstance(v, float) and math.isnan(v) for v in values):
            return math.nan
        if len(values) > 1:
            raise InputError(
                f"input '{location}' has different no-data values per band ({where} attribute "
                f"'{key}': {list(value)}); a unit is no-data only when all bands are, so set "
                f"input.mask.nodata to the one value to use."
            )
        return values.pop() if values else None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"input '{location}' has a {where} attribute '{key}' = {value!r} that is not a "
            f"number; set input.mask.nodata to the no-data value."
        ) from None


def input_nodata(image: InputImage) -> float | None:
    """The no-data value the input's attributes give, or None.

    Looks for ``nodata``, ``proj:nodata`` and GDAL's ``_FillValue`` in the array's attributes,
    then the group's.
    """
    for where, attrs in (("array", image.array_attrs), ("group", image.group_attrs)):
        for key in _NODATA_KEYS:
            if key in attrs:
                value = _nodata_value(attrs[key], key, where, image.location)
                if value is not None:
                    return value
    return None


def resolve_nodata(image: InputImage, spec: MaskSpec) -> float:
    """The no-data value: ``spec.nodata``, else the input's attributes (:func:`input_nodata`)."""
    if spec.nodata is not None:
        return float(spec.nodata)
    value = input_nodata(image)
    if value is not None:
        return value
    raise InputError(
        f"input.mask.method 'nodata' needs the no-data value, but input '{image.location}' has "
        f"no {', '.join(repr(k) for k in _NODATA_KEYS)} attribute; set input.mask.nodata "
        f"(e.g. nodata: 0)."
    )
