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

import json
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from tilewise.errors import OutputExistsError
from tilewise.pipeline.engine import Unit
from tilewise.pipeline.postprocess import labels_from_scores, probabilities_from_scores
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


def _compressors(name: str) -> Any:
    if name == "zstd":
        # Level 1: float16 probabilities barely compress (1.48x at level 1, 1.55x at level 3),
        # and level 3 took 21 ms per 2 x 1024^2 chunk against 5.6 ms, CPU the forward passes
        # of a CPU actor lose; labels compress 15x at either level.
        return ZstdCodec(level=1)
    if name == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    return None


def _ome_image(name: str, axes: list[dict[str, str]], scale: list[float] | None) -> dict[str, Any]:
    spatial = scale or [1.0, 1.0]
    full = [1.0] * (len(axes) - 2) + list(spatial)
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": axes,
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": full}]}
                ],
            }
        ],
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

    def _open(self, mode: Literal["r", "r+", "w"]) -> Any:
        return zarr.open_group(
            store=self.location, mode=mode, **_storage(self.location, self.storage_options)
        )

    # -- lifecycle (driver) ------------------------------------------------------------------
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
        chunks = (layout.chunk, layout.chunk)
        shards = (layout.shard, layout.shard) if layout.shard else None
        yx = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
        if layout.labels:
            g = root.create_group("labels")
            ome = _ome_image("labels", yx, layout.scale)
            ome["image-label"] = image_label(layout.num_classes, layout.class_names)
            g.attrs.update({"ome": ome, **carried})
            g.create_array(
                "0",
                shape=(layout.height, layout.width),
                chunks=chunks,
                shards=shards,
                dtype=layout.labels,
                compressors=_compressors(layout.compressor),
                fill_value=0,
                dimension_names=("y", "x"),
            )
        if layout.probabilities:
            k = layout.num_classes
            g = root.create_group("probabilities")
            cyx = [{"name": "c", "type": "channel"}, *yx]
            g.attrs.update({"ome": _ome_image("probabilities", cyx, layout.scale), **carried})
            g.create_array(
                "0",
                shape=(k, layout.height, layout.width),
                chunks=(k, *chunks),
                shards=(k, *shards) if shards else None,
                dtype=layout.probabilities,
                compressors=_compressors(layout.compressor),
                fill_value=0,
                dimension_names=("c", "y", "x"),
            )
        root.attrs["tilewise"] = {
            "fingerprint": fingerprint,
            "status": STATUS_RUNNING,
            "job": job,
            "class_names": layout.class_names,
            **carried,
        }
        self._group, self._arrays = root, None

    def finish(self, report: dict[str, Any]) -> None:
        """Mark the output complete (only after every unit is done) and store the report."""
        self._remove_partial_writes()
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

        for leftover in Path(self.path).glob("*/0/c/**/*.partial"):
            leftover.unlink(missing_ok=True)

    # -- units (workers) ---------------------------------------------------------------------
    def group(self) -> Any:
        """The root group, opened read-write."""
        if self._group is None:
            self._group = self._open("r+")
        return self._group

    def _array(self, name: str) -> Any:
        """The output's ``labels/0`` or ``probabilities/0`` (None when not written), opened once
        per store object: reopening reads the array's metadata, once per unit on a hot path."""
        if self._arrays is None:
            group = self.group()
            self._arrays = {n: group[f"{n}/0"] for n in ("labels", "probabilities") if n in group}
        return self._arrays.get(name)

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

    def write_arrays(
        self, unit: Unit, labels: np.ndarray | None, probabilities: np.ndarray | None
    ) -> None:
        """Write one unit's ready arrays (whole chunks/shards, once each), then its marker."""
        ys, xs = slice(unit.y0, unit.y1), slice(unit.x0, unit.x1)
        if labels is not None:
            self._array("labels")[ys, xs] = labels
        if probabilities is not None:
            self._array("probabilities")[:, ys, xs] = probabilities
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


def fingerprint_of(parts: dict[str, Any]) -> str:
    """A stable digest of the job settings that determine the output bytes."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
