"""Whole chunks written straight to a local array's files: zarr's own bytes, or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import tilewise.pipeline.output as output_module
from tilewise.pipeline.chunkfiles import ChunkFiles
from tilewise.pipeline.engine import Unit
from tilewise.pipeline.output import OutputLayout, OutputStore, _compressors

SHAPE = (300, 500)  # neither side a multiple of the chunk: edge chunks are padded
CHUNK = 128


def _array(root: Path, compressor: str, dtype: str, lead: tuple[int, ...], **kw: Any) -> Any:
    group = zarr.open_group(root, mode="w")
    return group.create_array(
        "x",
        shape=(*lead, *SHAPE),
        chunks=(*lead, CHUNK, CHUNK),
        dtype=dtype,
        compressors=_compressors(compressor),
        fill_value=0,
        **kw,
    )


def _chunk_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("c/**/*") if p.is_file()}


@pytest.mark.parametrize("compressor", ["blosc-lz4", "zstd", "none"])
@pytest.mark.parametrize(
    ("dtype", "lead"), [("uint8", ()), ("float16", (3,)), ("uint16", ()), ("float32", (2,))]
)
def test_direct_chunks_are_zarrs_own_bytes(
    tmp_path: Path, compressor: str, dtype: str, lead: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((*lead, *SHAPE)) * 200).astype(dtype)
    data[..., :CHUNK, :CHUNK] = 0  # a chunk equal to the fill value is stored too (dense)
    direct = _array(tmp_path / "direct", compressor, dtype, lead)
    through_zarr = _array(tmp_path / "zarr", compressor, dtype, lead).with_config(
        {"write_empty_chunks": True}
    )
    files = ChunkFiles.of(direct)
    assert files is not None
    # Units of 1 x 2 chunks, clipped at the array's end.
    for y in range(0, SHAPE[0], CHUNK):
        for x in range(0, SHAPE[1], 2 * CHUNK):
            ys, xs = slice(y, y + CHUNK), slice(x, x + 2 * CHUNK)
            assert files.write(ys, xs, data[..., ys, xs])
            through_zarr[..., ys, xs] = data[..., ys, xs]
    mine, theirs = _chunk_files(tmp_path / "direct"), _chunk_files(tmp_path / "zarr")
    assert len(theirs) == (-(-SHAPE[0] // CHUNK)) * (-(-SHAPE[1] // CHUNK))
    assert mine == theirs
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "direct/x", mode="r")[...], data)
    assert not list((tmp_path / "direct").rglob("*.partial"))


def test_what_is_not_whole_chunks_is_left_to_zarr(tmp_path: Path) -> None:
    array = _array(tmp_path, "blosc-lz4", "uint8", ())
    files = ChunkFiles.of(array)
    assert files is not None
    block = np.ones((CHUNK, CHUNK), np.uint8)
    refused = [
        (slice(1, CHUNK + 1), slice(0, CHUNK), block),  # not on the chunk grid
        (slice(0, CHUNK // 2), slice(0, CHUNK), block[: CHUNK // 2]),  # half an inner chunk
        (slice(0, CHUNK), slice(0, CHUNK), block.astype(np.uint16)),  # another dtype
        (slice(0, CHUNK), slice(0, CHUNK), block[:, :-1]),  # a shape that is not the selection
    ]
    for ys, xs, data in refused:
        assert not files.write(ys, xs, data)
    assert _chunk_files(tmp_path) == {}  # nothing written


def test_only_plain_local_arrays_are_written_directly(tmp_path: Path) -> None:
    sharded = _array(tmp_path / "sharded", "blosc-lz4", "uint8", (), shards=(256, 256))
    assert ChunkFiles.of(sharded) is None
    in_memory = zarr.create_array(
        zarr.storage.MemoryStore(), shape=SHAPE, chunks=(CHUNK, CHUNK), dtype="uint8"
    )
    assert ChunkFiles.of(in_memory) is None
    v2 = zarr.create_array(
        str(tmp_path / "v2"), shape=SHAPE, chunks=(CHUNK, CHUNK), dtype="uint8", zarr_format=2
    )
    assert ChunkFiles.of(v2) is None
    split_classes = zarr.create_array(
        str(tmp_path / "split"), shape=(4, *SHAPE), chunks=(2, CHUNK, CHUNK), dtype="uint8"
    )
    assert ChunkFiles.of(split_classes) is None


def _write_units(
    root: Path, shard: int | None, labels: np.ndarray, probs: np.ndarray
) -> OutputStore:
    height, width = labels.shape
    layout = OutputLayout(height, width, 3, 512, shard, "uint8", "float16", "blosc-lz4", levels=3)
    store = OutputStore(str(root))
    store.prepare(layout, fingerprint="f", job={}, carried={}, overwrite=False)
    assert store.streamed_levels() == 2
    side = shard or 512
    for i, y in enumerate(range(0, height, side)):
        for j, x in enumerate(range(0, width, side)):
            unit = Unit(i * 100 + j, y, min(y + side, height), x, min(x + side, width))
            store.write_arrays(
                unit, labels[y : unit.y1, x : unit.x1], probs[:, y : unit.y1, x : unit.x1]
            )
    return store


def test_a_units_levels_are_the_same_as_through_zarr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output's units (level 0 and 2 streamed levels, edge units clipped) written with direct
    chunks read back as the same units written through zarr, unsharded and sharded; a local
    unsharded output does not go through zarr's write path at all."""
    rng = np.random.default_rng(1)
    shape = (1100, 1300)  # edge units of 76 x 276 px (at level 2: 19 x 69)
    labels = rng.integers(0, 3, shape, dtype=np.uint8)
    probs = rng.random((3, *shape)).astype(np.float16)
    through_zarr = output_module._set_all
    used: list[int] = []

    async def counted(writes: list[Any]) -> None:
        used.append(len(writes))
        await through_zarr(writes)

    monkeypatch.setattr(output_module, "_set_all", counted)
    _write_units(tmp_path / "direct.zarr", None, labels, probs)
    assert used == []
    _write_units(tmp_path / "sharded.zarr", 1024, labels, probs)
    assert sum(used) == 2 * 3 * 4  # every level of both arrays of every unit, through zarr
    with monkeypatch.context() as m:
        m.setattr(ChunkFiles, "of", classmethod(lambda cls, array: None))
        _write_units(tmp_path / "zarr.zarr", None, labels, probs)
    assert _chunk_files(tmp_path / "direct.zarr") == _chunk_files(tmp_path / "zarr.zarr")
    groups = [zarr.open_group(tmp_path / f"{n}.zarr", mode="r") for n in ("direct", "sharded")]
    for name in ("labels", "probabilities"):
        for k in range(3):
            a, b = (np.asarray(g[f"{name}/{k}"][...]) for g in groups)
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(
            groups[0][f"{name}/0"][...], labels if name == "labels" else probs
        )
