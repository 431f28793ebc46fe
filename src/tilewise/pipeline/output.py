"""The output store: OME-Zarr label and probability images, written one unit at a time.

Layout of ``out.zarr``::

    zarr.json                  group; attributes["tilewise"]: job, fingerprint, status, report
    labels/                    OME-Zarr image (axes y, x): class per pixel
    labels/0                   uint8 / uint16 array
    probabilities/             OME-Zarr image (axes c, y, x)
    probabilities/0            float16 / uint8 array
    .tilewise/done/<unit>      completion record: one empty object per finished unit

A unit's arrays are written first and its marker last, so a marker always means "this unit's bytes
are complete" (a crash between the two only costs a recomputation of the same bytes).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

from tilewise.errors import ConfigError, OutputExistsError
from tilewise.pipeline.chunkfiles import ChunkFiles
from tilewise.pipeline.engine import Unit
from tilewise.pipeline.postprocess import labels_from_scores, probabilities_from_scores
from tilewise.pipeline.pyramid import (
    build_level,
    level_shapes,
    level_transforms,
    spatial_attributes,
    streamed_levels,
    unit_levels,
)
from tilewise.pipeline.stores import _storage, is_url, local_path

__all__ = ["OutputLayout", "OutputStore"]

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"


@dataclass(frozen=True)
class OutputLayout:
    """What to create: shape, chunking and the arrays wanted."""

    height: int
    width: int
    num_classes: int
    chunk: int
    shard: int | None
    labels: str | None
    probabilities: str | None
    compressor: str
    scale: list[float] | None = None
    class_names: list[str] | None = None
    levels: int = 1

    @property
    def streamed(self) -> int:
        """Levels after level 0 that each unit writes itself (the rest are built at the end)."""
        return streamed_levels(self.shard or self.chunk, self.levels)


def _compressors(name: str) -> Any:
    if name == "zstd":
        # Level 1: float16 probabilities barely compress (1.48x at level 1, 1.55x at level 3),
        # and level 3 took 21 ms per 2 x 1024^2 chunk against 5.6 ms, CPU the forward passes
        # of a CPU actor lose; labels compress 15x at either level.
        return ZstdCodec(level=1)
    if name == "blosc-lz4":
        # The default. On a 1024 px unit of a U-Net's output (2 x 1024^2 float16 probabilities,
        # 1024^2 uint8 labels), measured against zstd level 1: probabilities 1.6 ms and 1.62x
        # against 5.6 ms and 1.48x, labels 0.2 ms and 14.8x against 1.1 ms and 13.6x. Shuffling
        # the bits groups the float16 exponents, which is all that compresses in them.
        return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    return None


def _ome_image(
    name: str, axes: list[dict[str, str]], scale: list[float] | None, levels: int = 1
) -> dict[str, Any]:
    lead = [1.0] * (len(axes) - 2)
    lead0 = [0.0] * (len(axes) - 2)
    datasets = []
    for k, (pitch, shift) in enumerate(level_transforms(levels, scale or [1.0, 1.0])):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": lead + pitch}]
        if k:
            transforms.append({"type": "translation", "translation": lead0 + shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    return {
        "version": "0.5",
        "multiscales": [{"name": name, "axes": axes, "datasets": datasets}],
    }


# Colours of classes 0, 1, ... (RGBA), cycled: distinct on a slide or a map, class 0 dark.
CLASS_COLOURS: tuple[tuple[int, int, int, int], ...] = (
    (0, 0, 0, 255),
    (230, 25, 75, 255),
    (60, 180, 75, 255),
    (0, 130, 200, 255),
    (255, 225, 25, 255),
    (145, 30, 180, 255),
    (70, 240, 240, 255),
    (245, 130, 48, 255),
    (240, 50, 230, 255),
    (210, 245, 60, 255),
    (0, 128, 128, 255),
    (170, 110, 40, 255),
    (128, 0, 0, 255),
    (0, 0, 128, 255),
    (128, 128, 0, 255),
    (250, 190, 212, 255),
)


def class_colours(num_classes: int) -> list[list[int]]:
    """RGBA colours of ``num_classes`` classes (the palette cycled)."""
    return [list(CLASS_COLOURS[k % len(CLASS_COLOURS)]) for k in range(num_classes)]


def image_label(num_classes: int, class_names: list[str] | None) -> dict[str, Any]:
    """OME-Zarr 0.5 ``image-label`` metadata: a colour and a name per label value.

    A network with one score map (a sigmoid) labels pixels 0 or 1: value 1 is its class and
    value 0 the background.
    """
    if num_classes == 1:
        names = ["background", (class_names or ["class 1"])[0]]
    else:
        names = class_names or [f"class {k}" for k in range(num_classes)]
    colours = class_colours(len(names))
    return {
        "version": "0.5",
        "colors": [{"label-value": k, "rgba": colours[k]} for k in range(len(names))],
        "properties": [{"label-value": k, "name": names[k]} for k in range(len(names))],
    }


class OutputStore:
    """An output store opened for writing units (one per actor, one for the driver)."""

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None) -> None:
        self.location = local_path(location).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.path = fsspec.core.url_to_fs(self.location, **self.storage_options)
        self._group: Any = None
        self._arrays: dict[str, Any] | None = None  # labels/probabilities, opened once
        self._dense: dict[str, Any] = {}  # the same arrays, storing chunks equal to the fill
        # Their direct whole-chunk writers (chunkfiles.py; None where only zarr may write).
        self._files: dict[str, list[ChunkFiles | None]] = {}
        # set by prepare(): it reopened this job's output, already marked complete
        self.was_complete = False

    def _open(self, mode: Literal["r", "r+", "w"]) -> Any:
        return zarr.open_group(
            store=self.location, mode=mode, **_storage(self.location, self.storage_options)
        )

    # -- lifecycle (driver) ------------------------------------------------------------------
    def check_location(self) -> None:
        """Refuse a local output that cannot be created: a file where one of its folders must be,
        or a folder this process may not write in (checked before anything is created).

        Raises:
            ConfigError: naming the path, what is in the way and the fix.
        """
        if is_url(self.location):
            return  # object stores have no folders; their credentials are checked on writing
        path = os.path.abspath(self.location)
        if os.path.lexists(path):
            return  # whatever is there: prepare() refuses it unless it is this job's output
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(
                f"output.path '{self.location}' cannot be created: '{parent}' is a file, not a "
                f"folder. Choose an output.path in a folder."
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"output.path '{self.location}' cannot be created: this user may not write in "
                f"'{parent}'. Choose an output.path in a folder you can write to."
            )

    def state(self) -> dict[str, Any] | None:
        """The ``tilewise`` attributes of an output; ``{}`` for a foreign store; None if absent."""
        if not self.fs.exists(self.path):
            return None
        try:
            group = self._open("r")
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            return {}
        state = group.attrs.get("tilewise", {})
        return dict(state) if isinstance(state, dict) else {}

    def prepare(
        self,
        layout: OutputLayout,
        *,
        fingerprint: str,
        job: dict[str, Any],
        carried: dict[str, Any],
        overwrite: bool,
    ) -> bool:
        """Create the output, or reopen it to resume; return whether it is being resumed.

        An existing output made by a different job (another fingerprint) or not by tilewise is
        never touched unless ``overwrite``.
        """
        state = self.state()
        if state is not None and not overwrite:
            if state.get("fingerprint") == fingerprint:
                self._group, self._arrays = self._open("r+"), None
                self.was_complete = state.get("status") == STATUS_COMPLETE
                return True
            owner = "a different job" if state else "something other than tilewise"
            raise OutputExistsError(
                f"output '{self.location}' exists and was written by {owner}; it is left as it "
                f"is. Use --overwrite (or output.overwrite: true) to replace it, or choose "
                f"another output.path."
            )
        if state is not None:
            self.fs.rm(self.path, recursive=True)
        self._create(layout, fingerprint=fingerprint, job=job, carried=carried)
        return False

    def _create(
        self,
        layout: OutputLayout,
        *,
        fingerprint: str,
        job: dict[str, Any],
        carried: dict[str, Any],
    ) -> None:
        root = self._open("w")
        yx = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
        if layout.labels:
            g = root.create_group("labels")
            ome = _ome_image("labels", yx, layout.scale, layout.levels)
            ome["image-label"] = image_label(layout.num_classes, layout.class_names)
            g.attrs.update({"ome": ome, **carried})
            self._create_levels(g, layout, (), ("y", "x"), layout.labels, carried)
        if layout.probabilities:
            k = layout.num_classes
            g = root.create_group("probabilities")
            cyx = [{"name": "c", "type": "channel"}, *yx]
            ome = _ome_image("probabilities", cyx, layout.scale, layout.levels)
            g.attrs.update({"ome": ome, **carried})
            self._create_levels(g, layout, (k,), ("c", "y", "x"), layout.probabilities, carried)
        root.attrs["tilewise"] = {
            "fingerprint": fingerprint,
            "status": STATUS_RUNNING,
            "job": job,
            "class_names": layout.class_names,
            "levels": layout.levels,
            "streamed_levels": layout.streamed,
            **carried,
        }
        self._group, self._arrays = root, None

    @staticmethod
    def _create_levels(
        group: Any,
        layout: OutputLayout,
        lead: tuple[int, ...],
        dims: tuple[str, ...],
        dtype: str,
        carried: dict[str, Any],
    ) -> None:
        """Levels 0..L-1 of one image. Streamed levels are chunked (and sharded) at
        ``1 / 2**k`` of level 0, so that each unit owns whole chunks of them; the levels built
        at the end take level 0's chunk side."""
        for k, (h, w) in enumerate(level_shapes(layout.height, layout.width, layout.levels)):
            if k <= layout.streamed:
                chunks = (layout.chunk >> k, layout.chunk >> k)
                shards = (layout.shard >> k, layout.shard >> k) if layout.shard else None
            else:
                chunks, shards = (layout.chunk, layout.chunk), None
            array = group.create_array(
                str(k),
                shape=(*lead, h, w),
                chunks=(*lead, *chunks),
                shards=(*lead, *shards) if shards else None,
                dtype=dtype,
                compressors=_compressors(layout.compressor),
                fill_value=0,
                dimension_names=dims,
            )
            transform = carried.get("spatial:transform")
            if k and isinstance(transform, list) and len(transform) == 6:
                # Each level says where its own pixels lie, as ingest's levels do.
                array.attrs.update(spatial_attributes(transform, (h, w), 2.0**k))

    def finish(self, report: dict[str, Any]) -> None:
        """Build the pyramid levels no unit wrote, then mark the output complete (only after
        every unit is done) and store the report."""
        self.complete_levels()
        self.mark_complete(report)

    def complete_levels(self) -> None:
        """Clear a lost worker's leftovers and build the levels that units do not stream."""
        self._remove_partial_writes()
        state = dict(self.group().attrs["tilewise"])
        self.build_coarse_levels(int(state.get("levels", 1)), int(state.get("streamed_levels", 0)))

    def mark_complete(self, report: dict[str, Any]) -> None:
        """Record the output as complete, with its report."""
        group = self.group()
        state = dict(group.attrs["tilewise"])
        state.update(status=STATUS_COMPLETE, report=report)
        group.attrs["tilewise"] = state

    def _remove_partial_writes(self) -> None:
        """Delete the temporary files of chunk writes that a lost worker left half done.

        A local store writes each chunk to ``<chunk>.<id>.partial`` and renames it; a worker
        killed in between (its node lost) leaves that file behind, while its unit was redone
        elsewhere. Object stores write chunks atomically and leave none.
        """
        if is_url(self.location):
            return
        from pathlib import Path

        for leftover in Path(self.path).glob("*/*/c/**/*.partial"):
            leftover.unlink(missing_ok=True)

    # -- units (workers) ---------------------------------------------------------------------
    def group(self) -> Any:
        """The root group, opened read-write."""
        if self._group is None:
            self._group = self._open("r+")
        return self._group

    def build_coarse_levels(self, levels: int, streamed: int) -> None:
        """Levels ``streamed + 1 .. levels - 1`` of each image, each reduced from the one above
        (rebuilt whole on every finish, so a resumed run needs nothing special)."""
        group = self.group()
        for name in ("labels", "probabilities"):
            if name not in group:
                continue
            for k in range(streamed + 1, levels):
                build_level(group[f"{name}/{k - 1}"], group[f"{name}/{k}"], name == "labels")

    def _levels_of(self, *, dense: bool = False) -> dict[str, list[Any]]:
        """The output's ``labels`` and ``probabilities`` levels that units write (level 0 and
        the streamed levels; an image not written is absent), opened once per store object:
        reopening reads the array's metadata, once per unit on a hot path.

        ``dense`` arrays store every chunk they are given: zarr otherwise compares each chunk
        with the fill value first, a full pass over a computed unit (about 4 ms of the 5 MB of
        a 1024 px unit's labels and float16 probabilities) that rarely finds one to skip.
        """
        if self._arrays is None:
            group = self.group()
            streamed = int(group.attrs["tilewise"].get("streamed_levels", 0))
            self._arrays = {
                n: [group[f"{n}/{k}"] for k in range(streamed + 1)]
                for n in ("labels", "probabilities")
                if n in group
            }
            self._dense = {
                n: [a.with_config({"write_empty_chunks": True}) for a in levels]
                for n, levels in self._arrays.items()
            }
            self._files = {n: [ChunkFiles.of(a) for a in v] for n, v in self._dense.items()}
        return self._dense if dense else self._arrays

    def _levels(self, name: str, *, dense: bool = False) -> list[Any]:
        return self._levels_of(dense=dense).get(name, [])

    def _array(self, name: str) -> Any:
        """The output's ``labels/0`` or ``probabilities/0`` (None when not written)."""
        levels = self._levels(name)
        return levels[0] if levels else None

    def write_unit(self, unit: Unit, scores: np.ndarray) -> None:
        """Write one unit's labels and/or probabilities from its scores, then its marker."""
        label_dtype, prob_dtype = self.dtypes()
        labels = labels_from_scores(scores, label_dtype) if label_dtype else None
        probs = probabilities_from_scores(scores, prob_dtype) if prob_dtype else None
        self.write_arrays(unit, labels, probs)

    def dtypes(self) -> tuple[str | None, str | None]:
        """The stored dtypes of labels and probabilities (None for an array not written)."""
        labels, probs = self._array("labels"), self._array("probabilities")
        return (
            None if labels is None else str(labels.dtype),
            None if probs is None else str(probs.dtype),
        )

    def streamed_levels(self) -> int:
        """Levels after level 0 that each unit writes (the rest are built at the end)."""
        return max((len(v) - 1 for v in self._levels_of().values()), default=0)

    def write_arrays(
        self,
        unit: Unit,
        labels: np.ndarray | None,
        probabilities: np.ndarray | None,
        *,
        dense: bool = True,
    ) -> None:
        """Write one unit's ready level-0 arrays and the streamed levels reduced from them on
        the host (each from the level above as stored), then its marker."""
        n = self.streamed_levels()
        self.write_levels(
            unit,
            None if labels is None else unit_levels(labels, n, labels=True),
            None if probabilities is None else unit_levels(probabilities, n, labels=False),
            dense=dense,
        )

    def write_levels(
        self,
        unit: Unit,
        labels: list[np.ndarray] | None,
        probabilities: list[np.ndarray] | None,
        *,
        dense: bool = True,
    ) -> None:
        """Write one unit's arrays at level 0 and at each streamed level (``[level 0, level 1,
        ...]``, each the reduction of the one before), whole chunks/shards once each, then its
        marker.

        ``dense=False`` (units written as background) leaves chunks equal to the fill value
        unstored, as zarr does by default.
        """
        writes: list[tuple[Any, tuple[Any, ...], np.ndarray]] = []
        for name, levels in (("labels", labels), ("probabilities", probabilities)):
            if levels is None:
                continue
            arrays = self._levels(name, dense=dense)
            if len(levels) != len(arrays):
                raise ValueError(
                    f"{name}: {len(levels)} levels given, the output streams {len(arrays)}"
                )
            files = self._files[name] if dense else [None] * len(arrays)
            for k, (array, data) in enumerate(zip(arrays, levels, strict=True)):
                ys = slice(unit.y0 >> k, -(-unit.y1 // 2**k))
                xs = slice(unit.x0 >> k, -(-unit.x1 // 2**k))
                # Whole chunks of a local array go straight to their files (chunkfiles.py).
                direct = files[k]
                if direct is None or not direct.write(ys, xs, data):
                    writes.append((array, (..., ys, xs), data))
        if writes:
            # All of them in one pass of zarr's event loop: the codecs of the 2 x levels arrays
            # run side by side, and the fixed cost of a synchronous zarr call (about 0.7 ms,
            # most of a 128 px level's write) is paid once per unit instead of once per array.
            sync(_set_all(writes))
        self._mark(unit.index)

    def _done_dir(self) -> str:
        return f"{self.path}/.tilewise/done"

    def _mark(self, index: int) -> None:
        if not is_url(self.location):
            self.fs.makedirs(self._done_dir(), exist_ok=True)
        self.fs.pipe_file(f"{self._done_dir()}/{index}", b"")

    def done_units(self) -> set[int]:
        """Indices of the units recorded as finished."""
        try:
            names = self.fs.ls(self._done_dir(), detail=False)
        except FileNotFoundError:
            return set()
        return {int(str(n).rstrip("/").rsplit("/", 1)[-1]) for n in names}


async def _set_all(writes: list[tuple[Any, tuple[Any, ...], np.ndarray]]) -> None:
    await asyncio.gather(*(a.async_array.setitem(sel, data) for a, sel, data in writes))


# How an output comes to exist, for the message when one is missing.
OUTPUT_FIX = "run its job first (`tilewise run JOB.yaml` writes the job's output.path)"


def output_state(root: Any, location: str, reader: str) -> dict[str, Any]:
    """The ``tilewise`` attributes of the output opened at ``root``.

    Args:
        root: the Zarr node at ``location``.
        location: where it is, for the message.
        reader: what needs an output, e.g. ``"export reads"``, for the message.

    Raises:
        InputError: ``root`` is not a tilewise output; the message says what it is instead
            (a bare array, a group without tilewise's attributes, or an image that
            ``tilewise ingest`` wrote: the input of a job, the likeliest mix-up).
    """
    from tilewise.errors import InputError

    state = root.attrs.get("tilewise") if isinstance(root, zarr.Group) else None
    if not isinstance(root, zarr.Group):
        what = "a Zarr array"
    elif not isinstance(state, dict):
        what = "a Zarr group without tilewise's attributes"
    elif "ingest" in state and "status" not in state:
        what = "an image that `tilewise ingest` wrote (the input of a job)"
    else:
        return dict(state)
    raise InputError(
        f"'{location}' is {what}, not a tilewise output; {reader} the output group that "
        f"`tilewise run` writes (with labels/ and probabilities/): give the job's output.path."
    )


def fingerprint_of(parts: dict[str, Any]) -> str:
    """A stable digest of the job settings that determine the output bytes."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
