"""Training shards: Zarr groups that hold an image, its labels and an optional weight map.

A dataset is a list of shards, e.g. one per slide or scene. Each shard is a Zarr group with

* ``image``: (C, H, W), any real numeric dtype (the normaliser turns it into float32 later);
* ``label``: (H, W) integers, class ids ``0..num_classes-1`` or ``ignore_index``;
* ``weight`` (optional): (H, W) per-pixel loss weights, e.g. U-Net's weight map
  (:func:`tilewise.losses.unet_weight_map`), read as float32.

:func:`open_shards` checks the whole dataset before any training starts, so that a bad label
value or a patch that does not fit stops the run in seconds rather than after hours on a cluster.
The label check reads each label array block by block (never whole: a slide's labels can be tens
of gigapixels), and the per-class pixel counts it computes on the way are kept: the class-balanced
sampler needs them, and a :class:`Shard` carries them when pickled to the training workers.
"""

from __future__ import annotations

import glob
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from tilewise.errors import ConfigError, InputError
from tilewise.pipeline.stores import BlockCache, is_url, local_path, open_node, read_blocked
from tilewise.spec import is_pattern

__all__ = [
    "CHUNK_CACHE",
    "InMemoryShard",
    "Shard",
    "expand_locations",
    "open_shards",
    "patch_shape",
]

# Pixels per label read while scanning: 4 Mpx is 4 MB of uint8 labels and keeps the int64
# temporaries of a block (cell ids, bincount keys) near 32 MB.
_BLOCK_PIXELS = 1 << 22


def patch_shape(patch_size: int | Sequence[int]) -> tuple[int, int]:
    """``patch_size`` (an int for square patches, or ``(h, w)``) as ``(h, w)``; checks it."""
    if isinstance(patch_size, bool):
        size: Any = patch_size
    elif isinstance(patch_size, int | np.integer):
        size = (int(patch_size), int(patch_size))
    else:
        size = tuple(patch_size)
    if (
        not isinstance(size, tuple)
        or len(size) != 2
        or any(isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1 for n in size)
    ):
        raise ConfigError(
            f"patch_size must be a positive integer or a pair (height, width) of them; got "
            f"{patch_size!r}. Use e.g. 256 or [256, 256]."
        )
    return int(size[0]), int(size[1])


def expand_locations(
    locations: Sequence[str], storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Expand glob patterns in ``locations``: each pattern's matches sorted, duplicates dropped.

    Local patterns go through :func:`glob.glob`, URLs through the fsspec filesystem's ``glob``.
    Plain locations are kept as given (a missing one is reported when it is opened). The order
    of the patterns is kept, so the shard indices are the same on every worker.
    """
    if isinstance(locations, str):
        locations = [locations]
    found: list[str] = []
    empty: list[str] = []
    for pattern in locations:
        if not is_pattern(pattern):
            matches = [pattern]
        elif is_url(pattern):
            import fsspec

            fs, _ = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
            matches = sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern))
        else:
            matches = sorted(glob.glob(local_path(pattern)))
        if not matches:
            empty.append(pattern)
        found.extend(m for m in matches if m not in found)
    if empty or not found:
        named = ", ".join(repr(p) for p in empty) if empty else "(none given)"
        raise ConfigError(
            f"training shard locations must name at least one Zarr group each; these match "
            f"nothing: {named}. Check the folder and the pattern (e.g. data/train/*.zarr)."
        )
    return found


#: Decoded chunks of the shards' arrays, shared by the process's loader threads. A 128 px
#: patch of a 256 px-chunked shard decodes up to four chunks: 16 times the pixels it keeps, and
#: patches are drawn again and again from the same shards. 256 MB until a train job sets
#: ``data.cache_mb`` (each run starts empty: ``CHUNK_CACHE.reset``, so a shard rewritten at the
#: same path between two runs in one process is read afresh); 0 turns it off.
CHUNK_CACHE = BlockCache(256 * 2**20)


def _read_window(
    array: Any, key: tuple[Any, ...], y0: int, y1: int, x0: int, x1: int
) -> np.ndarray:
    """``array[..., y0:y1, x0:x1]`` assembled from whole decoded chunks kept in CHUNK_CACHE."""
    if CHUNK_CACHE.budget <= 0:
        return np.asarray(array[..., y0:y1, x0:x1])
    ch, cw = (int(n) for n in array.chunks[-2:])
    height, width = (int(n) for n in array.shape[-2:])

    def block(by: int, bx: int) -> np.ndarray:
        return CHUNK_CACHE.get(
            (*key, by, bx),
            lambda: np.asarray(
                array[
                    ..., by * ch : min(height, (by + 1) * ch), bx * cw : min(width, (bx + 1) * cw)
                ]
            ),
        )

    leading = tuple(int(n) for n in array.shape[:-2])
    return read_blocked(leading, array.dtype, (y0, y1, x0, x1), (ch, cw), block)


class _Cache:
    """What a :class:`Shard` opens or computes lazily; pickles without the open arrays."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrays: dict[str, Any] | None = None
        self.counts: np.ndarray | None = None
        self.indexes: dict[Any, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Counts are small and cost a full label scan: they travel. Arrays reopen on arrival;
        # sampler indexes can be large and are rebuilt by whoever samples.
        return {"counts": self.counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.counts = state["counts"]


@dataclass(frozen=True)
class Shard:
    """One training shard: a Zarr group with ``image`` (C, H, W), ``label`` (H, W) and an
    optional ``weight`` (H, W). Made by :func:`open_shards`, which checks it.

    Attributes:
        location: path or fsspec URI of the group.
        shape: (C, H, W) of the image.
        dtype: the image's dtype.
        has_weight: whether the group has a ``weight`` array.
        num_classes: class ids are ``0..num_classes-1``.
        ignore_index: the label of pixels that count nowhere (``None``: no such label).
        storage_options: fsspec options for URLs.

    A shard pickles cheaply (the location, the facts above and its class counts), so a driver can
    open and check the dataset once and hand the list to every training worker.
    """

    location: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    has_weight: bool
    num_classes: int
    ignore_index: int | None = 255
    storage_options: dict[str, Any] | None = field(
        default=None, repr=False, compare=False, hash=False
    )
    _cache: _Cache = field(
        default_factory=_Cache, init=False, repr=False, compare=False, hash=False
    )

    @property
    def height(self) -> int:
        """H."""
        return self.shape[1]

    @property
    def width(self) -> int:
        """W."""
        return self.shape[2]

    def _arrays(self) -> dict[str, Any]:
        cache = self._cache
        if cache.arrays is None:
            with cache.lock:
                if cache.arrays is None:
                    group = open_node(self.location, "r", self.storage_options, "training shard")
                    names = ["image", "label"] + (["weight"] if self.has_weight else [])
                    cache.arrays = {name: group[name] for name in names}
        return cache.arrays

    def read(
        self, y0: int, y1: int, x0: int, x1: int, *, with_weight: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Pixels ``[y0:y1, x0:x1]``: image (C, h, w) in its dtype, label (h, w) in its dtype,
        weight (h, w) float32, or ``None`` when the shard has none or ``with_weight`` is false."""
        _check_window(self.shape, y0, y1, x0, x1)
        arrays = self._arrays()
        image = _read_window(arrays["image"], (self.location, "image"), y0, y1, x0, x1)
        label = _read_window(arrays["label"], (self.location, "label"), y0, y1, x0, x1)
        weight = None
        if self.has_weight and with_weight:
            weight = _read_window(
                arrays["weight"], (self.location, "weight"), y0, y1, x0, x1
            ).astype(np.float32, copy=False)
        return image, label, weight

    def read_array(self, name: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """One array's pixels ``[..., y0:y1, x0:x1]`` ('image' or 'label'), in its dtype:
        validation reads the image with its halo and the labels without."""
        _check_window(self.shape, y0, y1, x0, x1)
        return _read_window(self._arrays()[name], (self.location, name), y0, y1, x0, x1)

    def label_blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """The label array as ``(y0, x0, block)`` blocks, about 4 Mpx each, aligned to its chunks
        (so that no chunk is decoded twice), in row-major order."""
        label = self._arrays()["label"]
        _, height, width = self.shape
        chunk_h, chunk_w = (int(n) for n in label.chunks)
        # Whole chunks per block: as many columns of chunks as fit, then rows of them.
        cols = max(1, min(math.ceil(width / chunk_w), _BLOCK_PIXELS // (chunk_h * chunk_w)))
        block_w = cols * chunk_w
        rows = max(1, _BLOCK_PIXELS // (chunk_h * block_w))
        block_h = rows * chunk_h
        for y0 in range(0, height, block_h):
            for x0 in range(0, width, block_w):
                y1, x1 = min(height, y0 + block_h), min(width, x0 + block_w)
                yield y0, x0, np.asarray(label[y0:y1, x0:x1])

    def class_counts(self) -> np.ndarray:
        """Pixels of each class, shape (num_classes,) int64; ignored pixels are not counted.

        Computed by :func:`open_shards` during its label check (or here, on first use, by the
        same block-by-block scan, which also checks the labels), then kept.
        """
        if self._cache.counts is None:
            counts = _scan_labels(self)
            self._cache.counts = counts
        return self._cache.counts.copy()

    def cached_index(self, key: Any, build: Any) -> Any:
        """``build()`` once per ``key`` for this shard, kept for later calls (sampler indexes)."""
        cache = self._cache
        if key not in cache.indexes:
            value = build()
            with cache.lock:
                cache.indexes.setdefault(key, value)
        return cache.indexes[key]

    def load(self) -> InMemoryShard:
        """The whole shard read into memory (image, label and weight arrays)."""
        image, label, weight = self.read(0, self.height, 0, self.width)
        return InMemoryShard(
            location=self.location,
            shape=self.shape,
            dtype=self.dtype,
            has_weight=self.has_weight,
            image=image,
            label=label,
            weight=weight,
        )


@dataclass(frozen=True)
class InMemoryShard:
    """A shard's arrays held in memory, with the :meth:`Shard.read` of a :class:`Shard`.

    For benchmarks (the loader from Zarr against the loader from memory) and for datasets small
    enough to keep in RAM. ``read`` returns copies, as a Zarr read does, so augmentation may
    work in place.
    """

    location: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    has_weight: bool
    image: np.ndarray = field(repr=False, compare=False)
    label: np.ndarray = field(repr=False, compare=False)
    weight: np.ndarray | None = field(repr=False, compare=False)

    def read(
        self, y0: int, y1: int, x0: int, x1: int, *, with_weight: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Pixels ``[y0:y1, x0:x1]`` as :meth:`Shard.read` gives them."""
        _check_window(self.shape, y0, y1, x0, x1)
        weight = None
        if self.weight is not None and with_weight:
            weight = self.weight[y0:y1, x0:x1].copy()
        return (
            self.image[:, y0:y1, x0:x1].copy(),
            self.label[y0:y1, x0:x1].copy(),
            weight,
        )


def _check_window(shape: tuple[int, int, int], y0: int, y1: int, x0: int, x1: int) -> None:
    # A caller's bug (a sampler out of bounds), not a user's mistake: a plain ValueError.
    if not (0 <= y0 < y1 <= shape[1] and 0 <= x0 < x1 <= shape[2]):
        raise ValueError(
            f"window [{y0}:{y1}, {x0}:{x1}] is empty or outside the shard of {shape[1]}x{shape[2]}"
        )


def _scan_labels(shard: Shard) -> np.ndarray:
    """Class pixel counts of ``shard``; an :class:`InputError` for the first label value that
    is neither a class id nor ``ignore_index`` (with how many pixels are wrong)."""
    k, ignore = shard.num_classes, shard.ignore_index
    counts = np.zeros(k, np.int64)
    first: tuple[int, int, int] | None = None  # value, y, x
    bad = 0
    for y0, x0, block in shard.label_blocks():
        valid = (block >= 0) & (block < k)
        wrong = ~valid if ignore is None else ~valid & (block != ignore)
        n_wrong = int(np.count_nonzero(wrong))
        if n_wrong:
            if first is None:
                flat = int(np.flatnonzero(wrong)[0])
                y, x = divmod(flat, block.shape[1])
                first = (int(block.flat[flat]), y0 + y, x0 + x)
            bad += n_wrong
        counts += np.bincount(block[valid].astype(np.intp, copy=False), minlength=k)[:k]
    if first is not None:
        value, y, x = first
        allowed = f"0..{k - 1}" + ("" if ignore is None else f" or ignore_index {ignore}")
        raise InputError(
            f"shard '{shard.location}': label value {value} at (y={y}, x={x}) is not a class id; "
            f"with num_classes {k} labels must be {allowed}, and {bad} pixel(s) break this. Fix "
            f"the labels, raise num_classes, or set ignore_index to the value of unlabelled "
            f"pixels."
        )
    return counts


def _open_one(
    location: str,
    num_classes: int,
    ignore_index: int | None,
    storage_options: dict[str, Any] | None,
) -> Shard:
    node = open_node(location, "r", storage_options, "training shard")
    location = local_path(location)
    if not isinstance(node, zarr.Group):
        raise InputError(
            f"shard '{location}' is a Zarr array {tuple(node.shape)}, but a training shard is a "
            f"group holding 'image' (C, H, W) and 'label' (H, W) arrays (and optionally "
            f"'weight'); write it as a group."
        )
    members = sorted(node.keys())
    missing = [name for name in ("image", "label") if name not in members]
    if missing:
        raise InputError(
            f"shard '{location}' has no {' and no '.join(repr(m) for m in missing)} array; a "
            f"training shard holds 'image' (C, H, W) and 'label' (H, W) (and optionally "
            f"'weight'). It holds: {', '.join(members) or 'nothing'}."
        )
    arrays = {}
    for name in ("image", "label", "weight"):
        if name not in members:
            continue
        array = node[name]
        if not isinstance(array, zarr.Array):
            raise InputError(
                f"shard '{location}': '{name}' is a group, but it must be an array; write the "
                f"{name} pixels as an array named '{name}'."
            )
        arrays[name] = array
    image, label = arrays["image"], arrays["label"]
    image_dtype, label_dtype = np.dtype(image.dtype), np.dtype(label.dtype)
    if len(image.shape) != 3:
        raise InputError(
            f"shard '{location}': image must be (C, H, W) (3 dimensions, bands first); got shape "
            f"{tuple(image.shape)}. Write a single-band image as (1, H, W)."
        )
    if image_dtype.kind not in "uif":
        raise InputError(
            f"shard '{location}': image dtype must be an integer or float type; got {image_dtype}."
        )
    if label_dtype.kind not in "ui":
        raise InputError(
            f"shard '{location}': label must hold integer class ids; got dtype {label_dtype}. "
            f"Write the labels as uint8 (up to 255 classes) or uint16."
        )
    shape = tuple(int(n) for n in image.shape)
    if tuple(label.shape) != shape[1:]:
        raise InputError(
            f"shard '{location}': label shape {tuple(label.shape)} does not match the image "
            f"shape {shape} (C, H, W); the label must be (H, W) = {shape[1:]}."
        )
    weight = arrays.get("weight")
    if weight is not None:
        if tuple(weight.shape) != shape[1:]:
            raise InputError(
                f"shard '{location}': weight shape {tuple(weight.shape)} does not match the "
                f"image shape {shape} (C, H, W); the weight map must be (H, W) = {shape[1:]}."
            )
        if np.dtype(weight.dtype).kind not in "uif":
            raise InputError(
                f"shard '{location}': weight must be a real number per pixel; got dtype "
                f"{np.dtype(weight.dtype)}. Write it as float32."
            )
    return Shard(
        location=location,
        shape=(shape[0], shape[1], shape[2]),
        dtype=image_dtype,
        has_weight=weight is not None,
        num_classes=num_classes,
        ignore_index=ignore_index,
        storage_options=storage_options,
    )


def open_shards(
    locations: Sequence[str],
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    patch_size: int | Sequence[int],
    storage_options: dict[str, Any] | None = None,
    check_labels: bool = True,
) -> list[Shard]:
    """Open and check a sharded training dataset.

    Args:
        locations: paths or fsspec URIs of shard groups; entries may be globs
            (``data/*.zarr``, ``s3://bucket/train/*.zarr``), expanded and sorted.
        num_classes: class ids are ``0..num_classes-1``.
        ignore_index: the label of pixels that count nowhere; ``None`` when there is none.
        patch_size: training patch size, ``int`` or ``(h, w)``; every shard must hold one.
        storage_options: fsspec options (credentials, endpoints) for URLs.
        check_labels: scan every label array now (block by block) for values that are neither
            a class id nor ``ignore_index``, and keep the class counts. ``False`` defers the scan
            to the first :meth:`Shard.class_counts` (for a worker handed shards that a driver
            already checked).

    Returns:
        The shards, in the order of ``locations`` (each pattern's matches sorted).

    Raises:
        ConfigError: a pattern matches nothing, or bad ``num_classes``/``patch_size``, or a
            patch larger than a shard.
        InputError: a shard lacks ``image`` or ``label``, shapes disagree, shards have different
            band counts or dtypes, or a label value is not a class id.
        StoreNotFoundError: a location does not exist.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer; got {num_classes!r}.")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise ConfigError(
            f"ignore_index must be an integer label or None; got {ignore_index!r}. Use 255."
        )
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise ConfigError(
            f"ignore_index ({ignore_index}) is also a class id (num_classes {num_classes}), so "
            f"its pixels would be both trained on and ignored; use a value >= {num_classes} "
            f"(e.g. 255) or None."
        )
    patch_h, patch_w = patch_shape(patch_size)
    shards = [
        _open_one(location, num_classes, ignore_index, storage_options)
        for location in expand_locations(locations, storage_options)
    ]
    first = shards[0]
    for shard in shards:
        if shard.shape[0] != first.shape[0]:
            raise InputError(
                f"shard '{shard.location}' has {shard.shape[0]} band(s) but shard "
                f"'{first.location}' has {first.shape[0]}; every shard of a dataset must have "
                f"the same bands, in the same order."
            )
        if shard.dtype != first.dtype:
            raise InputError(
                f"shard '{shard.location}' has image dtype {shard.dtype} but shard "
                f"'{first.location}' has {first.dtype}; one normalisation serves the whole "
                f"dataset, so write every shard's image with the same dtype."
            )
        if patch_h > shard.height or patch_w > shard.width:
            raise ConfigError(
                f"patch_size {patch_h}x{patch_w} does not fit shard '{shard.location}' of "
                f"{shard.height}x{shard.width} px; every shard must hold at least one patch. "
                f"Use a patch of at most {shard.height}x{shard.width}, or leave that shard out."
            )
    if check_labels:
        for shard in shards:
            shard.class_counts()
    return shards
