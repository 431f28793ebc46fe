"""tilewise export: COG and pyramidal OME-TIFF, read back by rasterio, gdalinfo and tifffile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from affine import Affine
from rasterio.crs import CRS

from tests.conftest import write_input
from tilewise.errors import ConfigError, InputError, OutputExistsError, StoreNotFoundError
from tilewise.io import export as export_module
from tilewise.io.export import check_cog_layout, export
from tilewise.pipeline.output import OutputLayout, OutputStore
from tilewise.pipeline.pyramid import downsample_mean, downsample_mode

H, W, K = 1100, 1300, 3
NAMES = ["background", "tumour", "stroma"]
TRANSFORM = [10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0]
GEO = {"proj:code": "EPSG:32633", "spatial:transform": TRANSFORM}


def _write_output(
    path: Path,
    *,
    carried: dict[str, Any],
    scale: list[float] | None,
    finish: bool = True,
    probabilities: str | None = "float16",
) -> tuple[np.ndarray, np.ndarray]:
    """An output written by the pipeline's own OutputStore (the layout `tilewise run` makes)."""
    rng = np.random.default_rng(1)
    # Classes in 50 px squares: 2x2 blocks never straddle two squares (50 is even).
    labels = rng.integers(0, K, (H // 50 + 1, W // 50 + 1)).repeat(50, 0).repeat(50, 1)
    labels = labels[:H, :W].astype(np.uint8)
    # One pixel of each 2x2 block, at a position that rotates from block to block, takes
    # another class: the mode is still the square's class, but no fixed pixel of the block is.
    bi, bj = np.meshgrid(np.arange(H // 2), np.arange(W // 2), indexing="ij")
    dy, dx = np.divmod((bi + bj) % 4, 2)
    odd = (2 * bi + dy, 2 * bj + dx)
    labels[odd] = (labels[odd] + 1) % K
    probs = rng.random((K, H, W)).astype(np.float16)
    store = OutputStore(str(path))
    layout = OutputLayout(
        height=H,
        width=W,
        num_classes=K,
        chunk=256,
        shard=None,
        labels="uint8",
        probabilities=probabilities,
        compressor="zstd",
        scale=scale,
        class_names=NAMES,
    )
    store.prepare(
        layout,
        fingerprint="f",
        job={"model": {"num_classes": K, "class_names": NAMES}},
        carried=carried,
        overwrite=True,
    )
    group = store.group()
    group["labels/0"][:] = labels
    if probabilities:
        group["probabilities/0"][:] = probs
    if finish:
        store.finish({})
    return labels, probs


def _square_classes(labels: np.ndarray) -> np.ndarray:
    """The mode of each 2x2 block of the fixture's labels: the class of its 50 px square."""
    blocks = labels.reshape(H // 2, 2, W // 2, 2).transpose(0, 2, 1, 3).reshape(H // 2, W // 2, 4)
    return np.sort(blocks, axis=-1)[..., 1]  # 3 of the 4 values agree: the 2nd sorted is it


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One geo output and its four exports; small windows so several are written."""
    root = tmp_path_factory.mktemp("export")
    labels, probs = _write_output(root / "out.zarr", carried=GEO, scale=[0.25, 0.5])
    files = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "WINDOW_BYTES", 1)  # 512 px windows: 3 x 3 of them
        for name, what in [
            ("labels.tif", "labels"),
            ("probs.tif", "probabilities"),
            ("labels.ome.tif", "labels"),
            ("probs.ome.tif", "probabilities"),
        ]:
            files[name] = (root / name, export(str(root / "out.zarr"), str(root / name), what=what))
    return {"root": root, "labels": labels, "probs": probs, "files": files}


def _mean2(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return a.reshape(*a.shape[:-2], a.shape[-2] // 2, 2, a.shape[-1] // 2, 2).mean(axis=(-3, -1))


# -- COG ---------------------------------------------------------------------------------------


def test_cog_labels_keep_crs_transform_pixels_and_colours(made: dict[str, Any]) -> None:
    path, report = made["files"]["labels.tif"]
    colours = zarr.open_group(str(made["root"] / "out.zarr"))["labels"].attrs["ome"]["image-label"][
        "colors"
    ]
    with rasterio.open(path) as src:
        assert src.crs == CRS.from_epsg(32633)
        assert src.transform == Affine(*TRANSFORM)
        assert (src.count, src.height, src.width, src.dtypes[0]) == (1, H, W, "uint8")
        assert np.array_equal(src.read(1), made["labels"])
        assert src.block_shapes == [(512, 512)]
        assert src.compression.name.lower() == "deflate"
        assert src.overviews(1) == [2, 4]
        cmap = src.colormap(1)
        for entry in colours:
            assert cmap[entry["label-value"]] == tuple(entry["rgba"])
        assert src.tags(1) == {f"CLASS_{i}": n for i, n in enumerate(NAMES)}
        assert src.descriptions == ("class",)
    with rasterio.open(path, overview_level=0) as ov:  # factor 2, mode of 2x2 blocks
        assert np.array_equal(ov.read(1), _square_classes(made["labels"]))
    assert report.crs == "EPSG:32633" and report.levels == [[H, W], [550, 650], [275, 325]]
    assert report.colours.startswith("from the output")


def test_cog_probabilities_are_k_named_float32_bands_with_average_overviews(
    made: dict[str, Any],
) -> None:
    path, _ = made["files"]["probs.tif"]
    with rasterio.open(path) as src:
        assert (src.count, src.dtypes) == (K, ("float32",) * K)
        assert src.descriptions == tuple(NAMES)
        assert src.crs == CRS.from_epsg(32633) and src.transform == Affine(*TRANSFORM)
        assert np.array_equal(src.read(), made["probs"].astype(np.float32))
        assert src.overviews(1) == [2, 4]
    with rasterio.open(path, overview_level=0) as ov:
        got = ov.read()
    np.testing.assert_allclose(got, _mean2(made["probs"]), atol=1e-6)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_cog_layout_is_valid_and_the_check_can_fail(made: dict[str, Any], tmp_path: Path) -> None:
    path, report = made["files"]["labels.tif"]
    assert check_cog_layout(path) == []
    assert report.layout.endswith("valid")
    # A striped GTiff with overviews appended at its end is no COG.
    plain = tmp_path / "plain.tif"
    with rasterio.open(
        plain, "w", driver="GTiff", width=W, height=H, count=1, dtype="uint8"
    ) as dst:
        dst.write(made["labels"], 1)
    with rasterio.open(plain, "r+") as dst:
        dst.build_overviews([2, 4])
    problems = check_cog_layout(plain)
    assert any("not tiled" in p for p in problems)
    assert any("ghost header" in p for p in problems)


def test_gdalinfo_names_the_crs_and_the_cog_layout(made: dict[str, Any]) -> None:
    gdalinfo = shutil.which("gdalinfo")
    if gdalinfo is None:
        pytest.skip("gdalinfo is not installed (Debian's gdal-bin; .ci/run installs it)")
    for name in ("labels.tif", "probs.tif"):
        info = subprocess.run(
            [gdalinfo, str(made["files"][name][0])], capture_output=True, text=True, check=True
        ).stdout
        assert "LAYOUT=COG" in info
        assert 'ID["EPSG",32633]' in info
        assert "Origin = (500000.000000000000000,5000000.000000000000000)" in info
        assert "Pixel Size = (10.000000000000000,-10.000000000000000)" in info
        assert "Overviews: 650x550, 325x275" in info
    validator = Path("/usr/lib/python3/dist-packages/osgeo_utils/samples")
    validator /= "validate_cloud_optimized_geotiff.py"
    if validator.exists():  # GDAL's own COG check (python3-gdal, installed with gdal-bin)
        for name in ("labels.tif", "probs.tif"):
            check = subprocess.run(
                ["/usr/bin/python3", str(validator), str(made["files"][name][0])],
                capture_output=True,
                text=True,
            )
            assert check.returncode == 0, check.stdout + check.stderr
            assert "is a valid cloud optimized GeoTIFF" in check.stdout
            assert "warning" not in check.stdout.lower()
    labels_info = subprocess.run(
        [gdalinfo, str(made["files"]["labels.tif"][0])], capture_output=True, text=True
    ).stdout
    assert "ColorInterp=Palette" in labels_info


# -- OME-TIFF ----------------------------------------------------------------------------------


def _ome_pixels(tif: tifffile.TiffFile) -> dict[str, str]:
    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    pixels = ET.fromstring(tif.ome_metadata).find(".//ome:Pixels", ns)
    assert pixels is not None
    return dict(pixels.attrib)


def test_ome_tiff_labels_pyramid(made: dict[str, Any]) -> None:
    path, report = made["files"]["labels.ome.tif"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [lvl.shape for lvl in series.levels] == [(H, W), (550, 650), (275, 325)]
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert len(page.subifds or []) == 2
        pixels = _ome_pixels(tif)
        # scale is (y, x) = (0.25, 0.5) µm
        assert float(pixels["PhysicalSizeX"]) == 0.5 and float(pixels["PhysicalSizeY"]) == 0.25
        assert pixels["PhysicalSizeXUnit"] == "µm"
        assert np.array_equal(series.levels[0].asarray(), made["labels"])
        assert np.array_equal(series.levels[1].asarray(), _square_classes(made["labels"]))
        level2 = series.levels[2].asarray()
    # Level 2 is the mode of level 1's 2x2 blocks, by brute force (ties: first in reading order).
    l1 = _square_classes(made["labels"])
    expected = np.zeros((275, 325), np.uint8)
    for i in range(275):
        for j in range(325):
            block = [l1[y, x] for y in (2 * i, 2 * i + 1) for x in (2 * j, 2 * j + 1)]
            counts = Counter(block)
            expected[i, j] = next(v for v in block if counts[v] == max(counts.values()))
    assert np.array_equal(level2, expected)
    assert report.pixel_size == [0.25, 0.5]


def test_ome_tiff_probabilities_pyramid(made: dict[str, Any]) -> None:
    path, _ = made["files"]["probs.ome.tif"]
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.axes == "CYX"
        assert [lvl.shape for lvl in series.levels] == [(K, H, W), (K, 550, 650), (K, 275, 325)]
        ns = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"
        channels = ET.fromstring(tif.ome_metadata).iter(f"{ns}Channel")
        assert [c.attrib["Name"] for c in channels] == NAMES
        assert np.array_equal(series.levels[0].asarray(), made["probs"].astype(np.float32))
        level1 = series.levels[1].asarray()
        level2 = series.levels[2].asarray()
    np.testing.assert_allclose(level1, _mean2(made["probs"]), atol=1e-6)
    # Level 2 comes from level 1 (each reduction from the one before).
    np.testing.assert_allclose(level2, _mean2(level1), atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 7), (4, 6), (1, 1), (3, 2)])
def test_downsampling_against_brute_force(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 3, shape).astype(np.uint8)
    f = rng.random(shape).astype(np.float32)
    h, w = -(-shape[0] // 2), -(-shape[1] // 2)
    mode, mean = downsample_mode(a), downsample_mean(f)
    assert mode.shape == mean.shape == (h, w)
    for i in range(h):
        for j in range(w):
            block = a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel().tolist()
            counts = Counter(block)
            assert mode[i, j] == next(v for v in block if counts[v] == max(counts.values()))
            assert mean[i, j] == pytest.approx(f[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean())


# -- no georeferencing, no physical size ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_output_without_georeferencing_exports_and_says_so(tmp_path: Path) -> None:
    labels, _ = _write_output(tmp_path / "out.zarr", carried={}, scale=None, probabilities=None)
    report = export(str(tmp_path / "out.zarr"), str(tmp_path / "x.tif"))
    assert report.crs is None and any("not georeferenced" in n for n in report.notes)
    with rasterio.open(tmp_path / "x.tif") as src:
        assert src.crs is None
        assert np.array_equal(src.read(1), labels)
    ome = export(str(tmp_path / "out.zarr"), str(tmp_path / "x.ome.tif"))
    assert ome.pixel_size is None and any("no physical pixel size" in n for n in ome.notes)
    with tifffile.TiffFile(tmp_path / "x.ome.tif") as tif:
        assert "PhysicalSizeX" not in _ome_pixels(tif)
    assert "exported labels" in ome.lines()[0] and ome.to_dict()["format"] == "ome-tiff"


# -- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    _write_output(out, carried=GEO, scale=None, finish=False, probabilities=None)
    with pytest.raises(InputError, match=r"not complete \(status 'running'.*tilewise run"):
        export(str(out), str(tmp_path / "a.tif"))
    assert not (tmp_path / "a.tif").exists()

    _write_output(out, carried=GEO, scale=None, probabilities=None)
    with pytest.raises(StoreNotFoundError, match=r"no 'probabilities' image \(it has: labels\)"):
        export(str(out), str(tmp_path / "a.tif"), what="probabilities")
    with pytest.raises(ConfigError, match="Did you mean 'labels'"):
        export(str(out), str(tmp_path / "a.tif"), what="label")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'\.tif'.*'\.ome\.tif'"):
        export(str(out), str(tmp_path / "a.png"))
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        export(str(tmp_path / "missing.zarr"), str(tmp_path / "a.tif"))
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="uint8")
    with pytest.raises(InputError, match="not a tilewise output"):
        export(str(tmp_path / "plain.zarr"), str(tmp_path / "a.tif"))

    (tmp_path / "taken.tif").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(str(out), str(tmp_path / "taken.tif"))
    assert (tmp_path / "taken.tif").read_bytes() == b"keep me"
    export(str(out), str(tmp_path / "taken.tif"), overwrite=True)
    with rasterio.open(tmp_path / "taken.tif") as src:
        assert src.crs == CRS.from_epsg(32633)
    # Scratch files are gone: only what we made is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "plain.zarr", "taken.tif"]


# -- end to end: a predict job on a georeferenced input ----------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_predict_then_export_keeps_the_inputs_georeferencing(tmp_path: Path) -> None:
    from tilewise.pipeline.driver import run_job
    from tilewise.spec import parse_job

    src = write_input(tmp_path / "in.zarr", shape=(3, 150, 190))
    transform = [0.0003, 0.0, -105.6, 0.0, -0.0003, 40.4]
    wkt = CRS.from_epsg(4326).to_wkt()
    zarr.open_array(str(src), mode="r+").attrs.update(
        {"proj:wkt2": wkt, "spatial:transform": transform, "spatial:shape": [150, 190]}
    )
    job = parse_job(
        {
            "kind": "predict",
            "name": "geo",
            "input": {"path": str(src)},
            "model": {
                "arch": "unet_same",
                "num_classes": 2,
                "seed": 3,
                "args": {"depth": 2, "base_width": 4},
            },
            "tiling": {"tile": 64, "batch_size": 4},
            "output": {
                "path": str(tmp_path / "out.zarr"),
                "labels": "uint8",
                "probabilities": "uint8",
                "chunk": 64,
            },
        }
    )
    run_job(job, progress=False)
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    report = export(str(tmp_path / "out.zarr"), str(tmp_path / "labels.tif"))
    with rasterio.open(tmp_path / "labels.tif") as cog:
        assert cog.crs == CRS.from_wkt(wkt)
        assert cog.transform == Affine(*transform)
        assert np.array_equal(cog.read(1), out["labels/0"][:])
    export(str(tmp_path / "out.zarr"), str(tmp_path / "p.tif"), what="probabilities")
    with rasterio.open(tmp_path / "p.tif") as cog:
        assert cog.count == 2 and cog.dtypes == ("uint8", "uint8")
        assert cog.scales == (1 / 255, 1 / 255)
        assert np.array_equal(cog.read(), out["probabilities/0"][:])
    assert re.search("EPSG:4326|WGS 84", report.crs or "")


def test_the_cli_exports_and_reports_mistakes_in_one_line(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tilewise.cli import main

    dst, out = tmp_path / "cli.tif", made["root"] / "out.zarr"
    assert main(["export", str(out), str(dst), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(report["output"]) == dst and report["format"] == "cog"
    with rasterio.open(dst) as ds:
        assert ds.count == 1 and ds.crs is not None
    assert main(["export", str(out), str(dst)]) == 2  # exists: refused
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err


def test_an_ingested_image_or_a_missing_output_is_named_for_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Giving the job's input (what `tilewise ingest` wrote) instead of its output is the likely
    mix-up: the message says so, and a missing output says how one is made, for export and
    preview alike."""
    from PIL import Image

    from tilewise.cli import main
    from tilewise.io.ingest import ingest

    Image.fromarray(np.full((40, 60, 3), 7, np.uint8)).save(tmp_path / "scene.png")
    ingest(str(tmp_path / "scene.png"), str(tmp_path / "scene.zarr"))
    for command in (
        ["export", str(tmp_path / "scene.zarr"), str(tmp_path / "a.tif")],
        ["preview", str(tmp_path / "scene.zarr")],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "is an image that `tilewise ingest` wrote (the input of a job)" in err, err
        assert "give the job's output.path" in err and err.count("\n") == 1
    assert not (tmp_path / "a.tif").exists() and not (tmp_path / "scene.preview.png").exists()
    for command in (
        ["export", str(tmp_path / "none.zarr"), str(tmp_path / "a.tif")],
        ["preview", str(tmp_path / "none.zarr")],
    ):
        assert main(command) == 2
        assert "or run its job first (`tilewise run JOB.yaml`" in capsys.readouterr().err
