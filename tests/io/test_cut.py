"""``tilewise shards``: shards against independent reads of the source files (rasterio, tifffile,
numpy), their places against rasterio's window transforms, the training checker and a train job
on the result, and bad pairs refused before anything is written."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from affine import Affine
from PIL import Image
from rasterio.transform import from_origin
from rasterio.windows import Window

from tilewise.errors import ConfigError, InputError, OutputExistsError
from tilewise.io import cut as cut_module
from tilewise.io.cut import cut_shards, shard_bounds
from tilewise.io.ingest import ingest
from tilewise.training.shards import open_shards

TRANSFORM = from_origin(500_000.0, 4_200_000.0, 10.0, 10.0)
H, W = 300, 520


def _geotiff(path: Path, data: np.ndarray, transform: Any = TRANSFORM, **extra: Any) -> Path:
    count, height, width = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=str(data.dtype),
        crs=extra.pop("crs", "EPSG:32633"),
        transform=transform,
        **extra,
    ) as ds:
        ds.write(data)
    return path


def _scene(tmp_path: Path) -> dict[str, Any]:
    """A 3-band scene with a no-data collar (its first 40 columns) and labels 0..2 with a
    no-data band of rows (label raster's nodata 255)."""
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (3, H, W)).astype(np.uint8)
    image[:, :, :40] = 0
    labels = np.zeros((H, W), np.uint8)
    labels[50:200, 100:300] = 1
    labels[180:290, 350:500] = 2
    labels[:30] = 255
    return {
        "image": _geotiff(tmp_path / "scene.tif", image, nodata=0),
        "labels": _geotiff(tmp_path / "scene_labels.tif", labels[None], nodata=255),
        "pixels": image,
        "ids": labels,
    }


@pytest.mark.parametrize("side", [1, 15, 16, 127, 128, 300, 1000, 4097])
@pytest.mark.parametrize("size", [16, 128, 256])
def test_shard_bounds_cover_the_side_with_parts_of_size_to_twice_size(side: int, size: int) -> None:
    bounds = shard_bounds(side, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == side
    assert all(a[1] == b[0] for a, b in pairwise(bounds))
    lengths = [stop - start for start, stop in bounds]
    if side < size:
        assert lengths == [side]
    else:
        assert min(lengths) >= size and max(lengths) < 2 * size


def test_a_geotiff_pair_is_cut_into_shards_that_hold_its_pixels_labels_and_places(
    tmp_path: Path,
) -> None:
    scene = _scene(tmp_path)
    report = cut_shards(
        str(scene["image"]), str(scene["labels"]), str(tmp_path / "shards"), size=128, chunk=64
    )
    rows, cols = shard_bounds(H, 128), shard_bounds(W, 128)
    assert (len(rows), len(cols)) == (2, 4)
    # Expected labels, computed here: the label no-data and the image's collar become 255.
    expected = scene["ids"].copy()
    expected[(scene["pixels"] == 0).all(axis=0)] = 255
    counts = np.bincount(expected.ravel(), minlength=256)
    assert report.class_pixels == {k: int(counts[k]) for k in (0, 1, 2)}
    assert report.ignored_pixels == int(counts[255])
    assert report.georeferenced and report.label_dtype == "uint8"
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == [f"scene-{r}-{c}.zarr" for r in range(2) for c in range(4)] == report.shards
    with rasterio.open(scene["image"]) as src, rasterio.open(scene["labels"]) as lab:
        for r, (y0, y1) in enumerate(rows):
            for c, (x0, x1) in enumerate(cols):
                group = zarr.open_group(str(tmp_path / "shards" / f"scene-{r}-{c}.zarr"), mode="r")
                window = Window(x0, y0, x1 - x0, y1 - y0)
                np.testing.assert_array_equal(group["image"][:], src.read(window=window))
                read = lab.read(1, window=window)
                collar = (src.read(window=window) == 0).all(axis=0)
                np.testing.assert_array_equal(group["label"][:], np.where(collar, 255, read))
                assert group["image"].chunks == (3, 64, 64)
                corner = src.transform @ Affine.translation(x0, y0)
                assert group.attrs["spatial:transform"] == pytest.approx(list(corner)[:6])
                assert group.attrs["proj:code"] == "EPSG:32633"
                place = group.attrs["tilewise"]["shard"]
                assert (place["y0"], place["x0"]) == (y0, x0)
    shards = open_shards([str(tmp_path / "shards" / "*.zarr")], num_classes=3, patch_size=96)
    assert len(shards) == 8


def test_the_shards_command_feeds_a_train_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's commands: `tilewise shards`, then `tilewise run train.yaml` on its glob."""
    from tilewise.cli import main

    scene = _scene(tmp_path)
    shards = tmp_path / "shards"
    assert (
        main(
            [
                "shards",
                str(scene["image"]),
                str(scene["labels"]),
                str(shards),
                "--size",
                "128",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert len(report["shards"]) == 8 and report["class_pixels"].keys() == {"0", "1", "2"}
    (tmp_path / "train.yaml").write_text(
        "kind: train\nname: cut\ndata: {shards: [shards/*.zarr], val_fraction: 0.25}\n"
        "model: {arch: unet_same, num_classes: 3, args: {depth: 2, base_width: 4}}\n"
        "patch: {size: 64}\nsteps: 2\nbatch_size: 2\nscaling: {workers: 0}\n"
        "validation: {every: 2, tile: 64}\nstorage: runs\n"
    )
    assert main(["run", str(tmp_path / "train.yaml"), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert (tmp_path / "runs" / "cut" / "model" / "model.yaml").exists()


def test_the_label_rasters_own_nodata_is_unlabelled_whatever_its_dtype(tmp_path: Path) -> None:
    """A uint16 class raster with no-data 65535 (as GIS tools write them): those pixels become
    the ignore index, and the labels fit uint8 (ids 0..2 and 255)."""
    scene = _scene(tmp_path)
    ids = scene["ids"].astype(np.uint16)
    ids[ids == 255] = 65535
    labels = _geotiff(tmp_path / "u16.tif", ids[None], nodata=65535)
    report = cut_shards(str(scene["image"]), str(labels), str(tmp_path / "s"), size=1024)
    assert report.label_dtype == "uint8" and report.shards == ["scene-0-0.zarr"]
    expected = scene["ids"].copy()
    expected[(scene["pixels"] == 0).all(axis=0)] = 255
    label = zarr.open_group(str(tmp_path / "s" / "scene-0-0.zarr"), mode="r")["label"]
    np.testing.assert_array_equal(label[:], expected)


def test_instance_shards_from_a_png_or_its_zarr_hold_the_object_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (200, 260, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "cells.png")
    objects = np.zeros((200, 260), np.uint16)
    for k, (y, x) in enumerate([(30, 30), (100, 128), (170, 240), (60, 200)], start=1):
        objects[y - 12 : y + 12, x - 12 : x + 12] = 1000 * k  # ids need not be consecutive
    tifffile.imwrite(tmp_path / "cells_objects.tif", objects)
    report = cut_shards(
        str(tmp_path / "cells.png"),
        str(tmp_path / "cells_objects.tif"),
        str(tmp_path / "a"),
        size=100,
        kind="instances",
    )
    assert report.objects == 4 and report.label_dtype == "uint32" and not report.georeferenced
    ingest(str(tmp_path / "cells.png"), str(tmp_path / "cells.zarr"), chunk=64)
    cut_shards(
        str(tmp_path / "cells.zarr"),
        str(tmp_path / "cells_objects.tif"),
        str(tmp_path / "b"),
        size=100,
        kind="instances",
    )
    for r, (y0, y1) in enumerate(shard_bounds(200, 100)):
        for c, (x0, x1) in enumerate(shard_bounds(260, 100)):
            for folder in ("a", "b"):
                group = zarr.open_group(str(tmp_path / folder / f"cells-{r}-{c}.zarr"), mode="r")
                np.testing.assert_array_equal(
                    group["image"][:], np.moveaxis(rgb[y0:y1, x0:x1], -1, 0)
                )
                np.testing.assert_array_equal(group["instances"][:], objects[y0:y1, x0:x1])
    checked = open_shards(
        [str(tmp_path / "a" / "*.zarr")], num_classes=2, patch_size=64, instances=True
    )
    assert len(checked) == 4


def _touching_cells(height: int, width: int) -> np.ndarray:
    """Object ids: pairs of touching discs and squares, many across the shards' borders, big
    ids (not consecutive) and one object on the image's edge."""
    rng = np.random.default_rng(7)
    cells = np.zeros((height, width), np.uint32)
    yy, xx = np.mgrid[:height, :width]
    next_id = 70_000
    for y in range(12, height, 34):
        for x in range(10, width, 40):
            cy, cx = y + int(rng.integers(-3, 4)), x + int(rng.integers(-3, 4))
            cells[(yy - cy) ** 2 + (xx - cx) ** 2 < 11**2] = next_id
            cells[cy - 6 : cy + 6, cx + 9 : cx + 21] = next_id + 1  # touches the disc
            next_id += 7
    cells[:, :4][cells[:, :4] == 0] = 3  # a strip on the image's left edge
    return cells


def test_unet_weight_shards_equal_the_whole_images_targets(tmp_path: Path) -> None:
    """U-Net's gaps and weight map, cut into shards of 64 px, against unet_targets of the whole
    image (its own class balance, its own distances): the labels are equal, the weights equal
    up to the border term's floor (w0 * 1e-7)."""
    from tilewise.losses import unet_targets

    height, width = 200, 260
    cells = _touching_cells(height, width)
    tifffile.imwrite(tmp_path / "cells.tif", cells)
    rgb = np.random.default_rng(1).integers(0, 256, (height, width, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "cells.png")
    report = cut_shards(
        str(tmp_path / "cells.png"),
        str(tmp_path / "cells.tif"),
        str(tmp_path / "s"),
        size=64,
        kind="unet",
    )
    whole_labels, whole_weight = unet_targets(cells.astype(np.int64))
    assert whole_weight.max() > 5  # the gaps between touching cells are weighed
    labels = np.full((height, width), 9, np.uint8)
    weight = np.full((height, width), -1.0, np.float32)
    for r, (y0, y1) in enumerate(shard_bounds(height, 64)):
        for c, (x0, x1) in enumerate(shard_bounds(width, 64)):
            group = zarr.open_group(str(tmp_path / "s" / f"cells-{r}-{c}.zarr"), mode="r")
            labels[y0:y1, x0:x1] = group["label"][:]
            weight[y0:y1, x0:x1] = group["weight"][:]
    np.testing.assert_array_equal(labels, whole_labels)
    np.testing.assert_allclose(weight, whole_weight, rtol=0, atol=1e-5)
    assert report.class_pixels == {0: int((whole_labels == 0).sum()), 1: int(whole_labels.sum())}
    checked = open_shards([str(tmp_path / "s" / "*.zarr")], num_classes=2, patch_size=48)
    assert len(checked) == len(report.shards) == 12


def _bad(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A label raster that does not fit the scene, and what the error must say."""
    ids = np.zeros((1, H, W), np.uint8)
    if case == "size":
        return _geotiff(tmp_path / "l.tif", ids[:, :, :-1]), f"are {H} x {W - 1} px"
    if case == "grid":
        shifted = from_origin(500_010.0, 4_200_000.0, 10.0, 10.0)
        return _geotiff(tmp_path / "l.tif", ids, shifted), "lie on another grid"
    if case == "crs":
        return _geotiff(tmp_path / "l.tif", ids, crs="EPSG:32632"), "are in EPSG:32632"
    if case == "fraction":
        values = ids.astype(np.float32)
        values[0, 7, 9] = 1.5
        return _geotiff(tmp_path / "l.tif", values), "hold 1.5 at row 7, column 9"
    if case == "negative":
        values = ids.astype(np.int16)
        values[0, 250, 3] = -2
        return _geotiff(tmp_path / "l.tif", values), "hold -2 at row 250, column 3"
    if case == "bands":
        return _geotiff(tmp_path / "l.tif", np.zeros((3, H, W), np.uint8)), "have 3 bands"
    values = ids.astype(np.int32)
    values[0, 5, 5] = 70_000
    return _geotiff(tmp_path / "l.tif", values), "Cut it with --instances"


@pytest.mark.parametrize(
    "case", ["size", "grid", "crs", "fraction", "negative", "bands", "class_too_large"]
)
def test_a_label_raster_that_does_not_fit_is_refused_before_anything_is_written(
    tmp_path: Path, case: str
) -> None:
    scene = _scene(tmp_path)
    labels, message = _bad(tmp_path, case)
    with pytest.raises(InputError, match=message):
        cut_shards(str(scene["image"]), str(labels), str(tmp_path / "shards"), size=128)
    assert not (tmp_path / "shards").exists()


def test_an_earlier_cut_is_kept_unless_overwritten_and_then_replaced_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tilewise.cli import main

    scene = _scene(tmp_path)
    folder = tmp_path / "shards"
    first = cut_shards(str(scene["image"]), str(scene["labels"]), str(folder), size=128)
    zarr.open_group(str(folder / "scene-notes.zarr"), mode="w")  # not a shard: left alone
    zarr.open_group(str(folder / "other-0-0.zarr"), mode="w")
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("scene-*-*.zarr/zarr.json")}
    argv = ["shards", str(scene["image"]), str(scene["labels"]), str(folder), "--size", "256"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds 8 shards of 'scene'" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("scene-*-*.zarr/zarr.json")} == before
    assert main([*argv, "--overwrite"]) == 0
    names = sorted(p.name for p in folder.iterdir())
    # size 256: one row (300 // 256) by two columns; the 8 shards of size 128 are gone.
    assert names == ["other-0-0.zarr", "scene-0-0.zarr", "scene-0-1.zarr", "scene-notes.zarr"]
    assert len(first.shards) == 8


def test_a_failure_midway_leaves_the_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scene = _scene(tmp_path)
    folder = tmp_path / "shards"
    cut_shards(str(scene["image"]), str(scene["labels"]), str(folder), size=256)
    before = sorted(p.name for p in folder.iterdir())
    calls = {"n": 0}
    real = cut_module.spatial_attributes

    def fail_third(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(cut_module, "spatial_attributes", fail_third)
    with pytest.raises(OSError, match="disk full"):
        cut_shards(
            str(scene["image"]),
            str(scene["labels"]),
            str(folder),
            size=128,
            overwrite=True,
            workers=1,
        )
    assert sorted(p.name for p in folder.iterdir()) == before  # no staging folder either


def test_shards_without_a_labelled_pixel_are_skipped_unless_kept(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    ids = np.full((1, H, W), 255, np.uint8)
    ids[0, 200:, 300:] = 1  # only the bottom-right part is labelled
    labels = _geotiff(tmp_path / "sparse.tif", ids, nodata=255)
    report = cut_shards(str(scene["image"]), str(labels), str(tmp_path / "a"), size=128)
    # Shards (rows 150..300, columns 260..520) touch the labelled part: 2 of 8.
    assert report.shards == ["scene-1-2.zarr", "scene-1-3.zarr"] and report.skipped_empty == 6
    kept = cut_shards(
        str(scene["image"]), str(labels), str(tmp_path / "b"), size=128, keep_empty=True
    )
    assert len(kept.shards) == 8 and kept.skipped_empty == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 8}, "size must be at least 16"),
        ({"chunk": 4}, "chunk must be at least 16"),
        ({"ignore_index": -1}, "ignore_index must be within"),
        ({"workers": 0}, "workers"),
    ],
)
def test_settings_out_of_range_are_refused(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    scene = _scene(tmp_path)
    with pytest.raises(ConfigError, match=message):
        cut_shards(str(scene["image"]), str(scene["labels"]), str(tmp_path / "s"), **kwargs)


def test_a_file_as_the_destination_is_refused(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    (tmp_path / "taken").write_text("keep")
    with pytest.raises(OutputExistsError, match="is a file"):
        cut_shards(str(scene["image"]), str(scene["labels"]), str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "keep"
