"""Whole chunks written straight to the files of a local Zarr v3 array.

A unit writes whole chunks: level 0 and each streamed level of its labels and probabilities (8
chunks for a 1024 px unit with the default pyramid). Through zarr, each goes through its
asynchronous write path on zarr's event-loop thread: tasks, selections, a thread hop per codec.
That costs about 5 ms of Python per unit besides the 2.7 ms of encoding, CPU that a CPU actor's
forward passes lose (bench/README.md: the units' writes took 4 % of the steady state, half of it
this overhead). Here a chunk is encoded in the calling thread with the codec the array was created
with (numcodecs, as zarr itself uses) and written as zarr's local store writes it: to a temporary
``<chunk>.<id>.partial`` file, then renamed, so a reader never sees half a chunk.

Only what is known to give zarr's own bytes takes this path: a :class:`zarr.storage.LocalStore`,
the ``bytes`` codec (little-endian) followed by no compressor, Blosc or Zstd, no sharding, and a
selection of whole chunks (clipped only by the array's end, where the chunk is padded with the
fill value as zarr pads it). Anything else returns ``False`` and is left to zarr. The tests
compare the files byte for byte with zarr's.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
from zarr.storage import LocalStore

__all__ = ["ChunkFiles"]

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _codec_of(codecs: tuple[Any, ...]) -> tuple[bool, Any]:
    """(supported, numcodecs compressor or None) for an array's codec chain."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return False, None  # sharding, transposes, ...
    endian = codecs[0].endian
    if endian is not None and (endian.value != "little" or sys.byteorder != "little"):
        return False, None
    rest = codecs[1:]
    if not rest:
        return True, None
    if len(rest) != 1:
        return False, None
    codec = rest[0]
    if isinstance(codec, BloscCodec):
        # The configuration zarr's BloscCodec hands to numcodecs (typesize included, so the
        # shuffle works on the array's items although it is given the chunk's bytes).
        return True, numcodecs.Blosc(
            cname=codec.cname.value,
            clevel=codec.clevel,
            shuffle=_SHUFFLE[codec.shuffle.value],
            blocksize=codec.blocksize,
            typesize=codec.typesize,
        )
    if isinstance(codec, ZstdCodec):
        return True, numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
    return False, None


@dataclass(frozen=True)
class ChunkFiles:
    """The chunk files of one local Zarr v3 array, written whole (see the module's docstring)."""

    folder: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: Any
    compressor: Any
    metadata: Any  # the array's metadata: its chunk keys

    @classmethod
    def of(cls, array: Any) -> ChunkFiles | None:
        """The direct writer of ``array``, or None where only zarr may write it."""
        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3 or not isinstance(array.store, LocalStore):
            return None
        supported, compressor = _codec_of(tuple(meta.codecs))
        chunks = tuple(int(c) for c in array.chunks)
        shape = tuple(int(n) for n in array.shape)
        if not supported or len(shape) < 2 or chunks[:-2] != shape[:-2]:
            return None  # leading axes (classes) must be one chunk deep
        return cls(
            folder=Path(array.store.root) / array.path,
            shape=shape,
            chunks=chunks,
            dtype=np.dtype(array.dtype),
            fill_value=meta.fill_value,
            compressor=compressor,
            metadata=meta,
        )

    def write(self, ys: slice, xs: slice, data: np.ndarray) -> bool:
        """Write ``data`` at ``[..., ys, xs]`` if that is whole chunks; else write nothing and
        return False (the caller writes through zarr)."""
        height, width = self.shape[-2:]
        ch, cw = self.chunks[-2:]
        y0, y1 = ys.start, min(ys.stop, height)
        x0, x1 = xs.start, min(xs.stop, width)
        if (
            data.dtype != self.dtype
            or data.shape != (*self.shape[:-2], y1 - y0, x1 - x0)
            or y0 % ch
            or x0 % cw
            or (y1 % ch and y1 != height)
            or (x1 % cw and x1 != width)
        ):
            return False
        lead = (0,) * (len(self.shape) - 2)
        for cy in range(y0 // ch, -(-y1 // ch)):
            for cx in range(x0 // cw, -(-x1 // cw)):
                by, bx = cy * ch - y0, cx * cw - x0
                self._put((*lead, cy, cx), data[..., by : by + ch, bx : bx + cw])
        return True

    def _put(self, coords: tuple[int, ...], block: np.ndarray) -> None:
        if block.shape[-2:] != self.chunks[-2:]:
            # An edge chunk is stored at the full chunk shape, padded with the fill value.
            full = np.full(self.chunks, self.fill_value, dtype=self.dtype)
            full[..., : block.shape[-2], : block.shape[-1]] = block
            block = full
        raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        encoded: Any = raw if self.compressor is None else self.compressor.encode(raw)
        path = self.folder / self.metadata.encode_chunk_key(coords)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(encoded)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
