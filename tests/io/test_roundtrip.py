"""The README's chain through the CLI: ingest a GeoTIFF, segment it, export a COG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from tilewise.cli import main


@pytest.mark.usefixtures("ray_cluster")
def test_geotiff_ingest_predict_export_keeps_the_georeferencing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (3, 300, 260)).astype(np.uint8)
    src = tmp_path / "scene.tif"
    transform = from_origin(500000.0, 4200000.0, 10.0, 10.0)
    with rasterio.open(src, "w", driver="GTiff", width=260, height=300, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as ds:  # fmt: skip
        ds.write(data)
    assert main(["ingest", str(src), str(tmp_path / "scene.zarr"), "--chunk", "128"]) == 0
    (tmp_path / "job.yaml").write_text(
        "kind: predict\n"
        "input: {path: scene.zarr}\n"
        "model: {arch: unet_same, num_classes: 2, args: {depth: 2, base_width: 4}}\n"
        "tiling: {tile: 64}\n"
        "output: {path: seg.zarr, labels: uint8, chunk: 128}\n"
    )
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "seg.zarr"), str(tmp_path / "seg.tif")]) == 0
    capsys.readouterr()
    with rasterio.open(src) as a, rasterio.open(tmp_path / "seg.tif") as b:
        assert b.crs == a.crs and b.transform == a.transform
        assert (b.width, b.height) == (a.width, a.height)
        assert b.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # GDAL saw the COG header


@pytest.mark.usefixtures("ray_cluster")
def test_ihc_slide_ingest_predict_export_keeps_the_pixel_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tifffile
    import zarr
    from skimage.data import immunohistochemistry

    rgb = immunohistochemistry()  # (512, 512, 3) uint8, a real IHC section
    slide = tmp_path / "ihc.ome.tif"
    with tifffile.TiffWriter(slide, ome=True) as tif:  # a two-level pyramidal slide, 0.5 µm
        meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}  # fmt: skip
        tif.write(rgb, subifds=1, tile=(128, 128), photometric="rgb", metadata=meta)
        tif.write(rgb[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb")
    assert main(["ingest", str(slide), str(tmp_path / "ihc.zarr"), "--chunk", "256"]) == 0
    (tmp_path / "job.yaml").write_text(
        "kind: predict\n"
        "input: {path: ihc.zarr}\n"
        "model: {arch: unet_same, num_classes: 3, args: {depth: 2, base_width: 4}}\n"
        "tiling: {tile: 128}\n"
        "output: {path: seg.zarr, labels: uint8, chunk: 256}\n"
    )
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 0
    out = zarr.open_group(tmp_path / "seg.zarr", mode="r")
    scale = out["labels"].attrs["ome"]["multiscales"][0]["datasets"][0]
    assert scale["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
    assert main(["export", str(tmp_path / "seg.zarr"), str(tmp_path / "seg.ome.tif")]) == 0
    capsys.readouterr()
    with tifffile.TiffFile(tmp_path / "seg.ome.tif") as tif:
        assert tif.series[0].shape == (512, 512)
        assert np.array_equal(tif.series[0].asarray(), out["labels/0"][:])
        pixels = tif.ome_metadata
        assert pixels is not None and 'PhysicalSizeX="0.5"' in pixels
