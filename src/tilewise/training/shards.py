"""Training shards: Zarr groups that hold an image, its labels and an optional weight map.

A dataset is a list of shards, e.g. one per slide or scene. Each shard is a Zarr group with

* ``image``: (C, H, W), any real numeric dtype (the normaliser turns it into float32 later);
* ``label``: (H, W) integers, class ids ``0..num_classes-1`` or ``ignore_index``;
* ``weight`` (optional): (H, W) per-pixel loss weights, e.g. U-Net's weight map
  (:func:`tilewise.losses.unet_weight_map`), read as float32.

Instance shards (for the instance architectures, Mask R-CNN; ``open_shards(..., instances=True)``)
hold objects instead of class ids:

* ``image``: (C, H, W), as above;
* ``instances``: (H, W) integers, 0 for the background and every other value one object (ids need
  not be consecutive, and an id may appear in several shards: ids are per shard);
* ``instance_classes`` (optional): (N, 2) integers, one ``(id, class)`` row per object, class in
  ``1..num_classes-1`` (0 is the background). Without it every object is class 1. Rows for ids
  that the shard does not hold are allowed (e.g. a table shared by crops of one slide).

A ``weight`` or ``label`` array in an instance shard is not read. The check of an instance shard
(block by block too) refuses negative ids, an object id without a row in ``instance_classes``,
rows with a class outside ``1..num_classes-1`` or an id of 0 or below, and ids given two rows.
For the samplers an instance shard's :meth:`Shard.label_blocks` are class maps: each pixel the
class of its object (0 for the background), so the foreground sampler centres patches on objects
and the class-balanced one on the object classes.

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
    "ObjectClasses",
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


# Object ids up to this size are looked up in a dense table (2 bytes per possible id: 32 MB at
# most); larger ids by binary search in the sorted ids.
_LOOKUP_TABLE_IDS = 1 << 24


class ObjectClasses:
    """The class of each object of an instance shard: ``instance_classes`` as a lookup.

    Args:
        ids: object ids (>= 1, unique), any order.
        classes: their classes, same length.
        default: the class of every object when the shard has no ``instance_classes`` (then
            ``ids`` and ``classes`` are empty and no id is missing a class).
    """

    def __init__(self, ids: np.ndarray, classes: np.ndarray, default: int | None = None) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids = np.asarray(ids, np.int64)[order]
        self.classes = np.asarray(classes, np.int64)[order]
        self.default = default
        self._table: np.ndarray | None = None
        if default is None and self.ids.size and int(self.ids[-1]) < _LOOKUP_TABLE_IDS:
            # index id -> class, -1 where no row; the last entry stands for every larger id
            table = np.full(int(self.ids[-1]) + 2, -1, np.int16)
            table[0] = 0
            table[self.ids] = self.classes
            self._table = table

    @classmethod
    def all_one(cls, default: int = 1) -> ObjectClasses:
        """Every object of class ``default`` (a shard without ``instance_classes``)."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), default)

    def __len__(self) -> int:
        return int(self.ids.size)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """The class of each pixel's object (0 for the background, -1 for an id without a
        class or a negative id), as int64 of the shape of ``ids``."""
        wide = np.asarray(ids).astype(np.int64, copy=False)
        if self.default is not None:
            out = np.where(wide > 0, self.default, np.where(wide == 0, 0, -1))
        elif self._table is not None:
            last = self._table.size - 1  # holds -1: ids above the largest and negative ids
            out = self._table[np.where((wide < 0) | (wide > last), last, wide)]
        elif self.ids.size:
            pos = np.minimum(np.searchsorted(self.ids, wide), self.ids.size - 1)
            out = np.where(self.ids[pos] == wide, self.classes[pos], -1)
            out[wide == 0] = 0
        else:
            out = np.where(wide == 0, 0, -1)
        return np.asarray(out, np.int64)

    def mapping(self, ids: np.ndarray) -> dict[int, int]:
        """``{id: class}`` for object ids (>= 1) that have a class."""
        ids = np.asarray(ids)
        classes = self.lookup(ids)
        return {int(i): int(c) for i, c in zip(ids, classes, strict=True) if c > 0}


class _Cache:
    """What a :class:`Shard` opens or computes lazily; pickles without the open arrays."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrays: dict[str, Any] | None = None
        self.counts: np.ndarray | None = None
        self.objects: ObjectClasses | None = None
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
    optional ``weight`` (H, W), or an instance shard with ``image``, ``instances`` (H, W) and an
    optional ``instance_classes`` (N, 2) (see the module docstring). Made by
    :func:`open_shards`, which checks it.

    Attributes:
        location: path or fsspec URI of the group.
        shape: (C, H, W) of the image.
        dtype: the image's dtype.
        has_weight: whether the group has a ``weight`` array (always false for instances).
        num_classes: class ids are ``0..num_classes-1`` (for instances: the background 0 and the
            object classes).
        ignore_index: the label of pixels that count nowhere (``None``: no such label; not used
            by instance shards).
        storage_options: fsspec options for URLs.
        instances: an instance shard: :meth:`read` gives object ids where a dense shard gives
            class ids.
        has_classes: an instance shard with an ``instance_classes`` table (else every object
            is class 1).

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
    instances: bool = False
    has_classes: bool = False
    _cache: _Cache = field(
        default_factory=_Cache, init=False, repr=False, compare=False, hash=False
    )

    @property
    def label_name(self) -> str:
        """The array of per-pixel targets: 'label', or 'instances' for an instance shard."""
        return "instances" if self.instances else "label"

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
                    names = ["image", self.label_name] + (["weight"] if self.has_weight else [])
                    cache.arrays = {name: group[name] for name in names}
        return cache.arrays

    def object_classes(self) -> ObjectClasses:
        """An instance shard's object classes (``instance_classes``, read and checked once)."""
        if not self.instances:
            raise ValueError(f"shard '{self.location}' is not an instance shard")
        cache = self._cache
        if cache.objects is None:
            objects = _read_object_classes(self)
            with cache.lock:
                if cache.objects is None:
                    cache.objects = objects
        return cache.objects

    def read(
        self, y0: int, y1: int, x0: int, x1: int, *, with_weight: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Pixels ``[y0:y1, x0:x1]``: image (C, h, w) in its dtype, label (h, w) in its dtype
        (object ids for an instance shard), weight (h, w) float32, or ``None`` when the shard has
        none or ``with_weight`` is false."""
        _check_window(self.shape, y0, y1, x0, x1)
        arrays = self._arrays()
        name = self.label_name
        image = _read_window(arrays["image"], (self.location, "image"), y0, y1, x0, x1)
        label = _read_window(arrays[name], (self.location, name), y0, y1, x0, x1)
        weight = None
        if self.has_weight and with_weight:
            weight = _read_window(
                arrays["weight"], (self.location, "weight"), y0, y1, x0, x1
            ).astype(np.float32, copy=False)
        return image, label, weight

    def read_array(self, name: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """One array's pixels ``[..., y0:y1, x0:x1]`` ('image', 'label' or, for an instance
        shard, 'instances'), in its dtype: validation reads the image with its halo and the
        labels without."""
        _check_window(self.shape, y0, y1, x0, x1)
        return _read_window(self._arrays()[name], (self.location, name), y0, y1, x0, x1)

    def label_blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """The label array as ``(y0, x0, block)`` blocks, about 4 Mpx each, aligned to its chunks
        (so that no chunk is decoded twice), in row-major order.

        For an instance shard the blocks are class maps: each pixel the class of its object, 0
        for the background (and -1 for an id without a class, which the check refuses).
        """
        if not self.instances:
            yield from self.raw_blocks()
            return
        objects = self.object_classes()
        for y0, x0, block in self.raw_blocks():
            yield y0, x0, objects.lookup(block)

    def raw_blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """The ``label`` (or ``instances``) array as it is stored, in the blocks of
        :meth:`label_blocks`."""
        label = self._arrays()[self.label_name]
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
            counts = _scan_instances(self) if self.instances else _scan_labels(self)
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
            objects=self.object_classes() if self.instances else None,
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
    objects: ObjectClasses | None = field(default=None, repr=False, compare=False)

    @property
    def instances(self) -> bool:
        """Whether ``label`` holds object ids (an instance shard)."""
        return self.objects is not None

    def object_classes(self) -> ObjectClasses:
        """The object classes of an instance shard (as :meth:`Shard.object_classes`)."""
        if self.objects is None:
            raise ValueError(f"shard '{self.location}' is not an instance shard")
        return self.objects

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


def _read_object_classes(shard: Shard) -> ObjectClasses:
    """An instance shard's ``instance_classes`` read whole (one small row per object) and
    checked: ids >= 1, each once, classes ``1..num_classes-1``."""
    if not shard.has_classes:
        return ObjectClasses.all_one()
    group = open_node(shard.location, "r", shard.storage_options, "training shard")
    table = np.asarray(group["instance_classes"][...])
    where = f"shard '{shard.location}': instance_classes"
    if table.ndim != 2 or table.shape[1] != 2:
        raise InputError(
            f"{where} must be (N, 2), one (id, class) row per object; got shape "
            f"{tuple(table.shape)}. Write it as an (N, 2) integer array."
        )
    if table.dtype.kind not in "ui":
        raise InputError(
            f"{where} must hold integer (id, class) rows; got dtype {table.dtype}. Write it as "
            f"int64 (or uint32)."
        )
    ids, classes = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    k = shard.num_classes
    bad = np.flatnonzero(ids < 1)
    if bad.size:
        row = int(bad[0])
        raise InputError(
            f"{where} row {row} is for id {ids[row]}, but object ids are >= 1 (0 is the "
            f"background, which has no class); {bad.size} row(s) break this. Remove those rows."
        )
    bad = np.flatnonzero((classes < 1) | (classes >= k))
    if bad.size:
        row = int(bad[0])
        raise InputError(
            f"{where} gives object {ids[row]} class {classes[row]} (row {row}), but with "
            f"num_classes {k} object classes are 1..{k - 1} (0 is the background); {bad.size} "
            f"row(s) break this. Fix those classes, or raise num_classes (it counts the "
            f"background too)."
        )
    unique, counts = np.unique(ids, return_counts=True)
    twice = np.flatnonzero(counts > 1)
    if twice.size:
        first = int(unique[twice[0]])
        raise InputError(
            f"{where} has {int(counts[twice[0]])} rows for object {first} ({twice.size} id(s) "
            f"have more than one); every object needs exactly one (id, class) row. Remove the "
            f"extra rows."
        )
    return ObjectClasses(ids, classes)


def _scan_instances(shard: Shard) -> np.ndarray:
    """Pixels of each class (the background and the object classes) of an instance shard; an
    :class:`InputError` for a negative id or an object id without a class (with how many
    pixels are wrong)."""
    objects = shard.object_classes()
    k = shard.num_classes
    counts = np.zeros(k, np.int64)
    negative: tuple[int, int, int] | None = None  # value, y, x
    unclassed: tuple[int, int, int] | None = None
    n_negative = n_unclassed = 0
    unclassed_ids: set[int] = set()
    for y0, x0, block in shard.raw_blocks():
        classes = objects.lookup(block)
        wrong = classes < 0
        if wrong.any():
            below = wrong & (block < 0) if block.dtype.kind == "i" else np.zeros_like(wrong)
            no_class = wrong & ~below
            for kind, mask in (("negative", below), ("unclassed", no_class)):
                n = int(np.count_nonzero(mask))
                if not n:
                    continue
                flat = int(np.flatnonzero(mask)[0])
                y, x = divmod(flat, block.shape[1])
                first = (int(block.flat[flat]), y0 + y, x0 + x)
                if kind == "negative":
                    negative = negative or first
                    n_negative += n
                else:
                    unclassed = unclassed or first
                    n_unclassed += n
                    if len(unclassed_ids) < 10_000:
                        unclassed_ids.update(int(i) for i in np.unique(block[mask])[:10_000])
        # classes are -1..k-1: shifted by one, the wrong pixels land in a bin that is dropped
        counts += np.bincount((classes + 1).ravel(), minlength=k + 1)[1 : k + 1]
    if negative is not None:
        value, y, x = negative
        raise InputError(
            f"shard '{shard.location}': instance id {value} at (y={y}, x={x}) is negative; "
            f"'instances' holds 0 for the background and an id >= 1 per object, and "
            f"{n_negative} pixel(s) break this. Relabel those pixels (0, or a positive id)."
        )
    if unclassed is not None:
        value, y, x = unclassed
        shown = ", ".join(str(i) for i in sorted(unclassed_ids)[:5])
        more = ", ..." if len(unclassed_ids) > 5 else ""
        raise InputError(
            f"shard '{shard.location}': object id {value} at (y={y}, x={x}) has no row in "
            f"'instance_classes'; every object id needs an (id, class) row, and {n_unclassed} "
            f"pixel(s) of {len(unclassed_ids)} id(s) ({shown}{more}) break this. Add rows for "
            f"them, or set their pixels to 0 (background)."
        )
    return counts


def _open_one(
    location: str,
    num_classes: int,
    ignore_index: int | None,
    storage_options: dict[str, Any] | None,
    instances: bool = False,
) -> Shard:
    node = open_node(location, "r", storage_options, "training shard")
    location = local_path(location)
    target = "instances" if instances else "label"
    holds = (
        "'image' (C, H, W) and 'instances' (H, W) object ids (and optionally "
        "'instance_classes' (N, 2))"
        if instances
        else "'image' (C, H, W) and 'label' (H, W) (and optionally 'weight')"
    )
    if not isinstance(node, zarr.Group):
        raise InputError(
            f"shard '{location}' is a Zarr array {tuple(node.shape)}, but a training shard is a "
            f"group holding {holds}; write it as a group."
        )
    members = sorted(node.keys())
    missing = [name for name in ("image", target) if name not in members]
    if missing:
        hint = ""
        if instances and "label" in members:
            hint = (
                " An instance architecture trains on objects: write each object's pixels with "
                "its own id in 'instances' (0 = background)."
            )
        elif not instances and "instances" in members:
            hint = (
                " This looks like an instance shard: train an instance architecture (e.g. "
                "mask_rcnn_tiny) on it, or add 'label'."
            )
        raise InputError(
            f"shard '{location}' has no {' and no '.join(repr(m) for m in missing)} array; a "
            f"training shard {'for an instance architecture ' if instances else ''}holds "
            f"{holds}. It holds: {', '.join(members) or 'nothing'}.{hint}"
        )
    optional = ("instance_classes",) if instances else ("weight",)
    arrays = {}
    for name in ("image", target, *optional):
        if name not in members:
            continue
        array = node[name]
        if not isinstance(array, zarr.Array):
            raise InputError(
                f"shard '{location}': '{name}' is a group, but it must be an array; write the "
                f"{name} as an array named '{name}'."
            )
        arrays[name] = array
    image, label = arrays["image"], arrays[target]
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
        if instances:
            raise InputError(
                f"shard '{location}': instances must hold integer object ids; got dtype "
                f"{label_dtype}. Write them as uint32 (or uint16 for fewer than 65536 objects)."
            )
        raise InputError(
            f"shard '{location}': label must hold integer class ids; got dtype {label_dtype}. "
            f"Write the labels as uint8 (up to 255 classes) or uint16."
        )
    shape = tuple(int(n) for n in image.shape)
    if tuple(label.shape) != shape[1:]:
        raise InputError(
            f"shard '{location}': {target} shape {tuple(label.shape)} does not match the image "
            f"shape {shape} (C, H, W); the {target} must be (H, W) = {shape[1:]}."
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
    shard = Shard(
        location=location,
        shape=(shape[0], shape[1], shape[2]),
        dtype=image_dtype,
        has_weight=weight is not None,
        num_classes=num_classes,
        ignore_index=ignore_index,
        storage_options=storage_options,
        instances=instances,
        has_classes="instance_classes" in arrays,
    )
    if instances:
        shard.object_classes()  # the table is small: checked now, whatever check_labels says
    return shard


def open_shards(
    locations: Sequence[str],
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    patch_size: int | Sequence[int],
    storage_options: dict[str, Any] | None = None,
    check_labels: bool = True,
    instances: bool = False,
) -> list[Shard]:
    """Open and check a sharded training dataset.

    Args:
        locations: paths or fsspec URIs of shard groups; entries may be globs
            (``data/*.zarr``, ``s3://bucket/train/*.zarr``), expanded and sorted.
        num_classes: class ids are ``0..num_classes-1`` (for instances: the background 0 and
            the object classes ``1..num_classes-1``).
        ignore_index: the label of pixels that count nowhere; ``None`` when there is none. Not
            used for instance shards.
        patch_size: training patch size, ``int`` or ``(h, w)``; every shard must hold one.
        storage_options: fsspec options (credentials, endpoints) for URLs.
        check_labels: scan every label array now (block by block) for values that are neither
            a class id nor ``ignore_index`` (instance shards: negative ids and ids without a
            class), and keep the class counts. ``False`` defers the scan to the first
            :meth:`Shard.class_counts` (for a worker handed shards that a driver already
            checked).
        instances: the shards are instance shards (``image``, ``instances`` and optionally
            ``instance_classes``; see the module docstring), for an instance architecture.

    Returns:
        The shards, in the order of ``locations`` (each pattern's matches sorted).

    Raises:
        ConfigError: a pattern matches nothing, or bad ``num_classes``/``patch_size``, or a
            patch larger than a shard.
        InputError: a shard lacks ``image`` or ``label`` (``instances``), shapes disagree,
            shards have different band counts or dtypes, a label value is not a class id, or an
            instance shard has a negative id, an object without a class or a class out of range.
        StoreNotFoundError: a location does not exist.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer; got {num_classes!r}.")
    if instances and num_classes < 2:
        raise ConfigError(
            f"num_classes counts the background as class 0 for instance shards and must be at "
            f"least 2; got {num_classes}. Use 1 + the number of object classes."
        )
    if instances:
        ignore_index = None  # 0 is the background; no pixel is ignored
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
        _open_one(location, num_classes, ignore_index, storage_options, instances)
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
