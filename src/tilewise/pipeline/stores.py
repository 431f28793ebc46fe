"""Input images from Zarr: arrays, groups, OME-Zarr multiscale levels, by path or fsspec URI."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Literal

import numpy as np
import zarr

from tilewise.errors import InputError, StoreNotFoundError

__all__ = [
    "Axes",
    "BlockCache",
    "InputImage",
    "is_url",
    "local_path",
    "normalised_location",
    "read_blocked",
]

Axes = Literal["cyx", "yxc", "yx"]
_AXES_FOR_NDIM = {2: "yx", 3: "cyx or yxc"}
_AXIS_ALIASES = {"c": "c", "band": "c", "bands": "c", "channel": "c", "y": "y", "x": "x"}


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL (``s3://...``) rather than a local path."""
    return "://" in location


def local_path(location: str) -> str:
    """``file://`` URLs as plain paths (zarr-python #2808: creating through file:// fails)."""
    return location[len("file://") :] if location.startswith("file://") else location


def normalised_location(location: str) -> str:
    """A location as locations are compared: a local path resolved (``..``, symbolic links), a
    URL as it is, without a trailing slash."""
    if is_url(location) and not location.startswith("file://"):
        return location.rstrip("/")
    return os.path.realpath(local_path(location))


def _storage(location: str, options: dict[str, Any] | None) -> dict[str, Any]:
    # zarr refuses storage_options for local paths.
    return {"storage_options": options} if options and is_url(location) else {}


def open_node(
    location: str,
    mode: str,
    options: dict[str, Any] | None,
    what: str,
    fix: str = "create it first (e.g. `tilewise demo` or `tilewise ingest`)",
) -> Any:
    """Open a Zarr array or group; a missing store becomes a :class:`StoreNotFoundError`.

    ``what`` names the store and ``fix`` says how one comes to exist, for the message.
    """
    location = local_path(location)
    try:
        return zarr.open(store=location, mode=mode, **_storage(location, options))  # type: ignore[arg-type]
    except (FileNotFoundError, KeyError) as exc:
        raise StoreNotFoundError(
            f"{what} '{location}' does not exist or is not a Zarr store ({type(exc).__name__}). "
            f"Check the path, or {fix}."
        ) from None


def _ome_multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:  # NGFF 0.5
        return list(ome["multiscales"])
    if "multiscales" in attrs:  # NGFF 0.4
        return list(attrs["multiscales"])
    return None


def _axes_from_names(names: list[str] | None) -> str | None:
    if not names or any(n is None for n in names):
        return None
    mapped = [_AXIS_ALIASES.get(str(n).lower()) for n in names]
    if None in mapped:
        return None
    axes = "".join(m for m in mapped if m)
    return axes if axes in ("cyx", "yxc", "yx") else None


def _plane_of(
    names: list[Any] | None, shape: tuple[int, ...], location: str
) -> tuple[tuple[int, ...], list[str] | None]:
    """The dimensions to drop to get a 2-D image (with channels), and the names of the rest.

    An OME-Zarr image is often 5-D (t, c, z, y, x) with a single time point and plane: when
    the names say which dimensions are y and x (and c), every other one must have length 1,
    and is read at index 0. Without such names nothing is dropped.
    """
    if not names or len(names) != len(shape) or any(n is None for n in names):
        return (), None
    mapped = [_AXIS_ALIASES.get(str(n).lower()) for n in names]
    if "y" not in mapped or "x" not in mapped:
        return (), None
    others = tuple(k for k, m in enumerate(mapped) if m is None)
    for k in others:
        if shape[k] != 1:
            index = ", ".join("0" if j in others else ":" for j in range(len(shape)))
            raise InputError(
                f"input '{location}' has a '{names[k]}' axis of length {shape[k]} (axes "
                f"{', '.join(str(n) for n in names)}, shape {tuple(shape)}); only 2-D images, "
                f"with or without channels, are segmented, so every axis other than c, y and x "
                f"must have length 1. Save the plane to segment as its own Zarr array, e.g. "
                f"array[{index}]."
            )
    return others, [str(n) for k, n in enumerate(names) if k not in others]


class _Plane:
    """A Zarr array seen without its singleton dimensions ``drop`` (an OME-Zarr image's t and
    z): indexing it indexes those at 0, so reads still decode only the chunks they touch."""

    def __init__(self, array: Any, drop: tuple[int, ...]) -> None:
        self.base = array
        self.drop = drop
        keep = [k for k in range(len(array.shape)) if k not in drop]
        self.shape = tuple(array.shape[k] for k in keep)
        self.chunks = tuple(array.chunks[k] for k in keep)
        self.ndim = len(keep)
        self.dtype = array.dtype
        self.path = array.path
        self.attrs = array.attrs
        self.metadata = array.metadata

    def __getitem__(self, key: Any) -> Any:
        given = iter(key if isinstance(key, tuple) else (key,))
        full = tuple(
            0 if k in self.drop else next(given, slice(None)) for k in range(len(self.base.shape))
        )
        return self.base[full]


def _array_names(group: Any) -> list[str]:
    """Names of the arrays directly in a group, sorted (for messages)."""
    with warnings.catch_warnings():
        # zarr warns about folders it does not know, such as a tilewise output's .tilewise/.
        warnings.simplefilter("ignore")
        return sorted(name for name, _ in group.arrays())


class BlockCache:
    """Decoded chunk blocks, least recently used first out, within a byte budget (and, when
    given, a count). Thread-safe: a loader's or an actor's threads share one.

    Readers key blocks however they like (a shard's arrays, an image's block grid) and give
    :meth:`get` the function that decodes a block when it is not kept.
    """

    def __init__(self, budget_bytes: int, max_blocks: int | None = None) -> None:
        self.budget = budget_bytes
        self.max_blocks = max_blocks
        self.lock = threading.Lock()
        self.blocks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget (dropping what no longer fits)."""
        with self.lock:
            self.budget = budget_bytes
            self._evict()

    def reset(self, budget_bytes: int) -> None:
        """Forget every block and take a new budget."""
        with self.lock:
            self.blocks.clear()
            self.nbytes = 0
            self.budget = budget_bytes

    def _evict(self) -> None:
        limit = self.max_blocks if self.max_blocks is not None else len(self.blocks)
        while self.blocks and (self.nbytes > self.budget or len(self.blocks) > limit):
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The block under ``key``; ``load()`` decodes it when it is not kept."""
        with self.lock:
            block = self.blocks.get(key)
            if block is not None:
                self.blocks.move_to_end(key)
                self.hits += 1
                return block
            self.misses += 1
        block = load()  # decoded outside the lock: two threads may decode one block, harmlessly
        if block.nbytes <= self.budget:
            with self.lock:
                if key not in self.blocks:
                    self.blocks[key] = block
                    self.nbytes += block.nbytes
                    self._evict()
        return block


def read_blocked(
    leading: tuple[int, ...],
    dtype: Any,
    window: tuple[int, int, int, int],
    block_shape: tuple[int, int],
    block: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """Pixels ``[..., y0:y1, x0:x1]`` assembled from whole blocks of a block grid.

    ``block(by, bx)`` gives block ``(by, bx)`` of the grid of ``block_shape`` blocks (clipped at
    the image edge), with the ``leading`` dimensions first; the result is a new array the caller
    owns, so kept blocks are never handed out.
    """
    y0, y1, x0, x1 = window
    ch, cw = block_shape
    out = np.empty((*leading, y1 - y0, x1 - x0), dtype=dtype)
    for by in range(y0 // ch, (y1 - 1) // ch + 1):
        for bx in range(x0 // cw, (x1 - 1) // cw + 1):
            data = block(by, bx)
            by0, bx0 = by * ch, bx * cw
            ya, yb = max(y0, by0), min(y1, by0 + ch)
            xa, xb = max(x0, bx0), min(x1, bx0 + cw)
            out[..., ya - y0 : yb - y0, xa - x0 : xb - x0] = data[
                ..., ya - by0 : yb - by0, xa - bx0 : xb - bx0
            ]
    return out


class InputImage:
    """A (C, H, W) view of a Zarr array, read block by block.

    Args:
        location: local path or fsspec URI of a Zarr array or group.
        array: path of the array inside a group.
        level: OME-Zarr multiscale level (0 = full resolution).
        axes: ``cyx``, ``yxc`` or ``yx``; read from the OME-Zarr axes or the array's
            dimension names when omitted.
        storage_options: fsspec options (credentials, endpoints) for URLs.
    """

    def __init__(
        self,
        location: str,
        *,
        array: str | None = None,
        level: int = 0,
        axes: Axes | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.location = local_path(location)
        node = open_node(self.location, "r", storage_options, "input store")
        self.scale: list[float] | None = None  # physical pixel size (y, x) from OME-Zarr
        self.group_attrs: dict[str, Any] = {}
        meta_names: list[Any] | None = None  # axis names from the OME-Zarr metadata
        if isinstance(node, zarr.Group):
            self.group_attrs = dict(node.attrs)
            multiscales = _ome_multiscales(self.group_attrs)
            if array is not None:
                node = self._child(node, array)
            elif multiscales:
                node, meta_names = self._level(node, multiscales[0], level)
            else:
                arrays = _array_names(node)
                raise InputError(
                    f"input '{self.location}' is a Zarr group, not an image; name the array with "
                    f"input.array (arrays in it: {', '.join(arrays) or 'none'})."
                )
        elif array is not None:
            raise InputError(
                f"input.array ('{array}') names an array inside a Zarr group, but "
                f"'{self.location}' is a single array; remove input.array."
            )
        elif level != 0:
            raise InputError(
                f"input.level ({level}) needs an OME-Zarr multiscale group, but "
                f"'{self.location}' is a single array; remove input.level."
            )
        self.array_attrs = dict(node.attrs)
        dimension_names = getattr(node.metadata, "dimension_names", None)
        names = meta_names or (list(dimension_names) if dimension_names else None)
        full_shape = tuple(int(n) for n in node.shape)
        all_names = names
        drop: tuple[int, ...] = ()
        if axes is None or len(axes) != len(full_shape):  # axes given for every dimension win
            drop, names = _plane_of(all_names, full_shape, self.location)
        # Reads index the dropped singleton axes (an OME-Zarr t and z) at 0.
        self.array = _Plane(node, drop) if drop else node
        detected = _axes_from_names(names)
        ndim = len(self.array.shape)
        if axes is None:
            if detected is None:
                if ndim not in (2, 3):
                    raise InputError(
                        f"cannot tell the axes of the {ndim}-D input {full_shape} from its "
                        f"metadata; only 2-D images, with or without channels, are segmented. "
                        f"Name its axes (OME-Zarr axes or Zarr dimension_names: y, x, c and "
                        f"singleton others), or save it as a (C, H, W) array."
                    )
                if ndim != 2:
                    raise InputError(
                        f"cannot tell the axes of the {ndim}-D input {full_shape} from its "
                        f"metadata; set input.axes to 'cyx' (bands first) or 'yxc' (bands last)."
                    )
                detected = "yx"
            axes = detected  # type: ignore[assignment]
        assert axes is not None
        if len(axes) != ndim:
            dropped = ""
            if drop:
                assert all_names is not None
                singles = ", ".join(str(all_names[k]) for k in drop)
                dropped = f" once its singleton {singles} axes are dropped"
            raise InputError(
                f"input.axes '{axes}' has {len(axes)} axes but the input array has {ndim} "
                f"dimensions{dropped} (shape {full_shape}); use "
                f"{_AXES_FOR_NDIM.get(ndim, 'an array with 2 or 3 dimensions')}."
            )
        self.axes: Axes = axes
        shape = tuple(int(n) for n in self.array.shape)
        if axes == "cyx":
            self._shape = shape
        elif axes == "yxc":
            self._shape = (shape[2], shape[0], shape[1])
        else:
            self._shape = (1, shape[0], shape[1])
        self.dtype = np.dtype(node.dtype)

    def _child(self, group: Any, path: str) -> Any:
        try:
            node = group[path]
        except KeyError:
            arrays = _array_names(group)
            raise StoreNotFoundError(
                f"array '{path}' (input.array) does not exist in '{self.location}'; "
                f"arrays there: {', '.join(arrays) or 'none'}."
            ) from None
        if not isinstance(node, zarr.Array):
            raise InputError(f"'{path}' in '{self.location}' is a group, not an array.")
        return node

    def _level(
        self, group: Any, multiscale: dict[str, Any], level: int
    ) -> tuple[Any, list[Any] | None]:
        datasets = multiscale.get("datasets", [])
        if not 0 <= level < len(datasets):
            raise InputError(
                f"input.level {level} does not exist: '{self.location}' has levels "
                f"0..{len(datasets) - 1}."
            )
        names = [a["name"] if isinstance(a, dict) else a for a in multiscale.get("axes", [])]
        for transform in datasets[level].get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                self.scale = [float(v) for v in transform["scale"][-2:]]
        self.multiscale = multiscale
        return self._child(group, datasets[level]["path"]), names or None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return self._shape  # type: ignore[return-value]

    def keep_blocks(self, blocks: int) -> None:
        """Keep the last ``blocks`` decoded chunk blocks (all bands of one chunk's rows and
        columns) for the next reads; 0 turns it off.

        A unit plus its halo touches 3 x 3 chunks of an input chunked like the output, so a
        plain read decodes nine chunks for one chunk's worth of pixels (18.6 ms against 2.4 ms
        for an interior 1024 px unit of a zstd RGB mosaic). The next unit along the row shares
        six of them: with the last 12 blocks kept, an actor walking a row decodes three; walking
        bands of two rows column by column (:meth:`UnitGrid.band_order`), 16 blocks kept, two.
        """
        self._blocks = BlockCache(sys.maxsize, max_blocks=blocks) if blocks else None

    @property
    def block_shape(self) -> tuple[int, int]:
        """(height, width) of the array's chunks: what one decode yields."""
        chunks = tuple(int(c) for c in self.array.chunks)
        return (chunks[1], chunks[2]) if self.axes == "cyx" else (chunks[0], chunks[1])

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[:, y0:y1, x0:x1]`` as a (C, h, w) array."""
        cache: BlockCache | None = getattr(self, "_blocks", None)
        if cache is None:
            return self._read(y0, y1, x0, x1)
        ch, cw = self.block_shape
        _, height, width = self.shape

        def block(by: int, bx: int) -> np.ndarray:
            return cache.get(
                (by, bx),
                lambda: self._read(
                    by * ch, min(height, (by + 1) * ch), bx * cw, min(width, (bx + 1) * cw)
                ),
            )

        return read_blocked((self.shape[0],), self.dtype, (y0, y1, x0, x1), (ch, cw), block)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            if self.axes == "cyx":
                return np.asarray(self.array[:, y0:y1, x0:x1])
            if self.axes == "yxc":
                return np.moveaxis(np.asarray(self.array[y0:y1, x0:x1, :]), -1, 0)
            return np.asarray(self.array[y0:y1, x0:x1])[None]
        except (RuntimeError, ValueError, TypeError) as exc:
            # What the codecs raise for chunk bytes they cannot decode (blosc's "error during
            # blosc decompression", zstd's, a decoded size that does not fit the chunk): the
            # input is damaged, which no retry mends. I/O errors (OSError) propagate as they are.
            raise InputError(
                f"input '{self.location}' (array '{self.array.path or '/'}') cannot be read at "
                f"rows {y0}..{y1}, columns {x0}..{x1}: a chunk there is damaged "
                f"({type(exc).__name__}: {exc}). Copy or ingest the input again; finished "
                f"units are kept, so running the job again resumes."
            ) from exc

    def carried_attributes(self) -> dict[str, Any]:
        """Metadata an output carries over: geospatial (``proj:``/``spatial:``) and provenance."""
        keep = {}
        for attrs in (self.group_attrs, self.array_attrs):
            for key, value in attrs.items():
                if key.startswith(("proj:", "spatial:")) or key in ("zarr_conventions", "crs"):
                    keep[key] = value
        return keep
