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
