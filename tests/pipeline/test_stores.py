"""Opening inputs: paths and fsspec URIs, arrays, groups, OME-Zarr levels, axes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import write_input, write_ome5d
from tilewise.demo import build_mosaic
from tilewise.errors import InputError, StoreNotFoundError
from tilewise.pipeline.output import OutputLayout, OutputStore
from tilewise.pipeline.stores import Axes, InputImage


def test_memory_url_group_with_array_path_in_yxc() -> None:
    data = np.arange(5 * 7 * 2, dtype=np.uint16).reshape(5, 7, 2)
    group = zarr.open_group("memory://tw-test/scene.zarr", mode="w")
    group.create_array("bands", data=data, chunks=(4, 4, 2))
    image = InputImage("memory://tw-test/scene.zarr", array="bands", axes="yxc")
    assert image.shape == (2, 5, 7)
    assert np.array_equal(image.read(1, 4, 2, 6), np.moveaxis(data[1:4, 2:6], -1, 0))


def test_file_url_opens_like_a_path(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    image = InputImage(f"file://{tmp_path / 'in.zarr'}")
    assert image.shape == (3, 150, 190) and image.axes == "cyx"


def test_file_url_output_can_be_created(tmp_path: Path) -> None:
    layout = OutputLayout(20, 30, 2, 16, None, "uint8", None, "zstd")
    store = OutputStore(f"file://{tmp_path / 'out.zarr'}")
    assert store.prepare(layout, fingerprint="f", job={}, carried={}, overwrite=False) is False
    assert zarr.open_array(tmp_path / "out.zarr/labels/0", mode="r").shape == (20, 30)


def test_ome_zarr_levels_and_axes_from_metadata(tmp_path: Path) -> None:
    build_mosaic(tmp_path / "img.ome.zarr", 64)
    image = InputImage(str(tmp_path / "img.ome.zarr"))
    assert image.axes == "cyx" and image.shape == (3, 64, 64) and image.scale == [0.5, 0.5]
    with pytest.raises(InputError, match=r"level 2 does not exist.*levels 0\.\.0"):
        InputImage(str(tmp_path / "img.ome.zarr"), level=2)


def test_a_single_yx_array_is_one_band(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "g.zarr", data=np.ones((9, 11), np.float32), chunks=(4, 4))
    image = InputImage(str(tmp_path / "g.zarr"))
    assert image.shape == (1, 9, 11) and image.read(0, 2, 0, 3).shape == (1, 2, 3)


def test_missing_array_in_group_lists_what_is_there(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("image", shape=(4, 4), dtype="u1")
    with pytest.raises(StoreNotFoundError, match=r"'imag'.*arrays there: image"):
        InputImage(str(tmp_path / "g.zarr"), array="imag")


def test_carried_attributes_keep_geospatial_keys_only(tmp_path: Path) -> None:
    arr = zarr.create_array(
        tmp_path / "s.zarr", shape=(3, 4, 4), dtype="u1", dimension_names=("band", "y", "x")
    )
    arr.attrs.update(
        {"proj:code": "EPSG:32633", "spatial:transform": [1, 0, 0, 0, -1, 0], "note": "x"}
    )
    image = InputImage(str(tmp_path / "s.zarr"))
    assert image.axes == "cyx"
    assert image.carried_attributes() == {
        "proj:code": "EPSG:32633",
        "spatial:transform": [1, 0, 0, 0, -1, 0],
    }


@pytest.mark.parametrize(
    ("axes", "shape", "chunks"),
    [
        ("cyx", (3, 53, 71), (2, 16, 20)),
        ("yxc", (53, 71, 2), (16, 20, 2)),
        ("yx", (53, 71), (9, 13)),
    ],
)
def test_kept_blocks_read_the_same_pixels_as_plain_reads(
    tmp_path: Path, axes: str, shape: tuple[int, ...], chunks: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000, shape).astype(np.uint16)
    zarr.create_array(tmp_path / "in.zarr", data=data, chunks=chunks)
    plain = InputImage(str(tmp_path / "in.zarr"), axes=axes)  # type: ignore[arg-type]
    kept = InputImage(str(tmp_path / "in.zarr"), axes=axes)  # type: ignore[arg-type]
    kept.keep_blocks(3)  # fewer than most reads touch: blocks are evicted mid-read
    _, height, width = plain.shape
    for _ in range(60):
        y0, y1 = (int(v) for v in sorted(rng.integers(0, height, 2)))
        x0, x1 = (int(v) for v in sorted(rng.integers(0, width, 2)))
        got = kept.read(y0, y1 + 1, x0, x1 + 1)
        assert got.dtype == data.dtype
        assert np.array_equal(got, plain.read(y0, y1 + 1, x0, x1 + 1))
    assert len(kept._blocks) <= 3


@pytest.mark.parametrize("compressor", ["zstd", "blosc"])
def test_a_damaged_chunk_is_an_input_error_that_names_where(
    tmp_path: Path, compressor: str
) -> None:
    data = np.random.default_rng(4).integers(0, 255, (3, 128, 128)).astype(np.uint8)
    codec = zarr.codecs.ZstdCodec() if compressor == "zstd" else zarr.codecs.BloscCodec()
    zarr.create_array(
        tmp_path / "in.zarr",
        data=data,
        chunks=(3, 64, 64),
        compressors=codec,
        dimension_names=("c", "y", "x"),
    )
    chunk = tmp_path / "in.zarr" / "c" / "0" / "1" / "1"
    chunk.write_bytes(np.random.default_rng(5).integers(0, 255, 5000, np.uint8).tobytes())
    image = InputImage(str(tmp_path / "in.zarr"))
    assert np.array_equal(image.read(0, 64, 0, 128), data[:, :64])  # the other chunks read
    with pytest.raises(InputError, match=r"in\.zarr.*rows 32\.\.96, columns 60\.\.100.*damaged"):
        image.read(32, 96, 60, 100)


@pytest.mark.parametrize("axes", [None, "cyx"])
def test_a_5d_ome_zarr_with_singleton_t_and_z_reads_as_its_plane(
    tmp_path: Path, axes: Axes | None
) -> None:
    rng = np.random.default_rng(2)
    plane = rng.integers(0, 60000, (3, 53, 71)).astype(np.uint16)
    write_ome5d(tmp_path / "img.ome.zarr", plane[None, :, None], (1, 2, 1, 16, 20))
    image = InputImage(str(tmp_path / "img.ome.zarr"), axes=axes)
    assert image.axes == "cyx" and image.shape == (3, 53, 71) and image.scale == [0.25, 0.5]
    assert image.block_shape == (16, 20)
    assert np.array_equal(image.read(0, 53, 0, 71), plane)
    image.keep_blocks(3)
    for _ in range(30):
        y0, y1 = (int(v) for v in sorted(rng.integers(0, 53, 2)))
        x0, x1 = (int(v) for v in sorted(rng.integers(0, 71, 2)))
        assert np.array_equal(
            image.read(y0, y1 + 1, x0, x1 + 1), plane[:, y0 : y1 + 1, x0 : x1 + 1]
        )


def test_a_5d_ome_zarr_with_several_planes_names_the_axis(tmp_path: Path) -> None:
    write_ome5d(tmp_path / "img.ome.zarr", np.zeros((1, 3, 4, 20, 20), np.uint8), (1, 3, 1, 20, 20))
    with pytest.raises(
        InputError, match=r"'z' axis of length 4 .*only 2-D images.*array\[0, :, 0, :, :\]"
    ):
        InputImage(str(tmp_path / "img.ome.zarr"))
    with pytest.raises(InputError, match=r"'z' axis of length 4"):
        InputImage(str(tmp_path / "img.ome.zarr"), axes="cyx")


def test_a_5d_array_without_axis_names_says_what_is_segmented(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "a.zarr", data=np.zeros((1, 3, 1, 8, 8), np.uint8))
    with pytest.raises(InputError, match=r"5-D input .*only 2-D images.*Name its axes"):
        InputImage(str(tmp_path / "a.zarr"))


def test_input_array_on_a_single_array_is_refused(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    with pytest.raises(
        InputError, match=r"input\.array \('image'\).*single array; remove input\.array"
    ):
        InputImage(str(tmp_path / "in.zarr"), array="image")


def test_a_tilewise_output_as_input_is_a_group_error_without_zarr_warnings(
    tmp_path: Path,
) -> None:
    layout = OutputLayout(20, 30, 2, 16, None, "uint8", None, "zstd")
    OutputStore(str(tmp_path / "out.zarr")).prepare(
        layout, fingerprint="f", job={}, carried={}, overwrite=False
    )
    (tmp_path / "out.zarr/.tilewise/done").mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked ZarrUserWarning fails the test
        with pytest.raises(InputError, match=r"is a Zarr group, not an image"):
            InputImage(str(tmp_path / "out.zarr"))
