"""Foreground masks: which write units are computed (tissue, array and nodata methods).

Every check compares with an independent computation: the ground-truth blob mask of a synthetic
slide at full resolution, exact integer geometry of mask-pixel footprints, or pixel loops.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.ndimage import distance_transform_cdt

from tilewise.errors import ConfigError, InputError, StoreNotFoundError
from tilewise.pipeline import masks
from tilewise.pipeline.engine import Unit
from tilewise.pipeline.masks import (
    Foreground,
    choose_level,
    plan_foreground,
    resolve_nodata,
    unit_is_nodata,
)
from tilewise.pipeline.stores import InputImage
from tilewise.pipeline.units import UnitGrid
from tilewise.spec import MaskSpec

# A slide that is not a multiple of 4 (the pyramid drops rows and columns), white glass with
# three stained blobs, the last one cut by the bottom edge, and one 2x2 dust speck.
H, W = 483, 610
BLOBS = [(120, 150, 40), (300, 420, 55), (470, 80, 30)]  # (centre y, centre x, radius)
SPECK = (40, 560)
SIDE = 32  # write-unit side: 16 x 20 units


def _slide(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) uint8 RGB and the (H, W) ground-truth tissue (the blobs; the speck is dust)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    truth = np.zeros((H, W), bool)
    for cy, cx, r in BLOBS:
        truth |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    stain = np.array([150, 80, 160], np.float64)[:, None, None]
    base = np.where(truth[None], stain, 238.0)
    base[:, SPECK[0] : SPECK[0] + 2, SPECK[1] : SPECK[1] + 2] = 60.0
    rgb = np.clip(base + rng.normal(0, 4, (3, H, W)), 0, 255).round().astype(np.uint8)
    return rgb, truth


def _ome(scales: int, axes: list[str]) -> dict[str, object]:
    """The NGFF 0.5 ``ome`` attribute of a pyramid with 2x steps (written by hand)."""
    kinds = {"c": "channel", "y": "space", "x": "space"}
    lead = [1.0] * (len(axes) - 2)
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": "slide",
                "axes": [{"name": a, "type": kinds[a]} for a in axes],
                "datasets": [
                    {
                        "path": str(k),
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [*lead, 2.0**k, 2.0**k]}
                        ],
                    }
                    for k in range(scales)
                ],
            }
        ],
    }


def _write_pyramid(path: Path, data: np.ndarray, levels: int = 3) -> list[np.ndarray]:
    """An OME-Zarr image with levels made by 2x mean pooling (odd rows/columns dropped)."""
    axes = ["c", "y", "x"] if data.ndim == 3 else ["y", "x"]
    group = zarr.open_group(path, mode="w")
    group.attrs["ome"] = _ome(levels, axes)
    pyramid = [data]
    for k in range(levels):
        level = pyramid[-1]
        group.create_array(
            str(k),
            data=level,
            chunks=(*level.shape[:-2], 64, 64),
            dimension_names=tuple(axes),
        )
        h, w = level.shape[-2] // 2 * 2, level.shape[-1] // 2 * 2
        cut = level[..., :h, :w].astype(np.float64)
        pooled = (cut[..., 0::2, 0::2] + cut[..., 1::2, 0::2] + cut[..., 0::2, 1::2]) + cut[
            ..., 1::2, 1::2
        ]
        pyramid.append(np.round(pooled / 4).astype(data.dtype))
    return pyramid[:levels]


def _units_with_truth(grid: UnitGrid, truth: np.ndarray) -> set[int]:
    return {u.index for u in grid if truth[u.y0 : u.y1, u.x0 : u.x1].any()}


def _distance_to_truth(grid: UnitGrid, truth: np.ndarray) -> dict[int, int]:
    """Chessboard distance (px) from each unit to the nearest ground-truth pixel."""
    far = distance_transform_cdt(~truth, metric="chessboard")
    return {u.index: int(far[u.y0 : u.y1, u.x0 : u.x1].min()) for u in grid}


def _check_against_truth(fg: Foreground, kept: set[int], grid: UnitGrid, truth: np.ndarray) -> None:
    """Zero false negatives; false positives only within 3 mask pixels of a blob."""
    needed = _units_with_truth(grid, truth)
    assert needed - kept == set(), f"units with tissue dropped: {sorted(needed - kept)}"
    bound = 3 * max(fg.scale) + 1
    dist = _distance_to_truth(grid, truth)
    far_kept = {k: dist[k] for k in kept - needed if dist[k] > bound}
    assert far_kept == {}, f"units kept far from any blob (unit: distance px): {far_kept}"
    speck_unit = (SPECK[0] // SIDE) * grid.cols + SPECK[1] // SIDE
    assert speck_unit not in kept  # dust is not tissue
    assert len(kept) < 0.6 * len(grid)  # the mask saves work at all


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(OME-Zarr pyramid path, level-0 pixels, ground truth)."""
    rgb, truth = _slide()
    path = tmp_path_factory.mktemp("slide") / "slide.ome.zarr"
    _write_pyramid(path, rgb)
    return path, rgb, truth


# -- tissue on a pyramid ------------------------------------------------------------------------


@pytest.mark.parametrize("level", [None, 1, 2])
def test_tissue_keeps_every_unit_with_tissue_and_few_others(
    slide: tuple[Path, np.ndarray, np.ndarray], level: int | None
) -> None:
    path, _, truth = slide
    image = InputImage(str(path))
    fg = plan_foreground(image, MaskSpec(method="tissue", level=level))
    assert fg is not None
    # Every level of this small slide is under 512 px on its short side: level 0 by default.
    chosen = 0 if level is None else level
    assert fg.mask.shape == (H >> chosen, W >> chosen)
    assert f"tissue, level {chosen} ({H >> chosen} x {W >> chosen})" in fg.source
    assert "otsu threshold" in fg.source
    # The scale transforms say 2**level exactly, though the odd sizes were rounded down.
    assert fg.scale == (2.0**chosen, 2.0**chosen)
    grid = UnitGrid(H, W, SIDE)
    _check_against_truth(fg, fg.units_with_foreground(grid, 0.0), grid, truth)


def test_tissue_on_an_input_read_at_a_coarser_level(
    slide: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    """Units live on the input's own level (here 1); the mask scale is relative to it."""
    path, _, truth = slide
    image = InputImage(str(path), level=1)
    fg = plan_foreground(image, MaskSpec(method="tissue", level=2))
    assert fg is not None
    h, w = H // 2, W // 2
    assert fg.scale == (2.0, 2.0)
    grid = UnitGrid(h, w, 16)
    truth1 = truth[: h * 2 : 2, : w * 2 : 2] | truth[1 : h * 2 : 2, 1 : w * 2 : 2]
    needed = _units_with_truth(grid, truth1)
    assert needed <= fg.units_with_foreground(grid)


def test_the_default_level_is_the_coarsest_at_least_512_px(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    grey = np.full((1100, 1200), 235, np.uint8)
    grey[300:700, 200:900] = 90
    grey = np.clip(grey + rng.integers(-3, 4, grey.shape), 0, 255).astype(np.uint8)
    _write_pyramid(tmp_path / "big.ome.zarr", grey)  # levels 1100, 550, 275 px tall
    fg = plan_foreground(InputImage(str(tmp_path / "big.ome.zarr")), MaskSpec(method="tissue"))
    assert fg is not None
    assert fg.mask.shape == (550, 600) and "level 1 (550 x 600)" in fg.source
    assert fg.scale == (2.0, 2.0)
    # The stained rectangle, dilated by one mask pixel, and nothing else.
    expected = np.zeros((550, 600), bool)
    expected[149:351, 99:451] = True
    assert np.array_equal(fg.mask, expected)


def test_choose_level_by_hand() -> None:
    assert choose_level([(2000, 3000), (1000, 1500), (500, 750)]) == 1
    assert choose_level([(400, 600), (200, 300)]) == 0
    assert choose_level([(4096, 4096), (2048, 2048), (1024, 1024), (512, 512), (256, 256)]) == 3
    assert choose_level([(600, 9000), (300, 4500)]) == 0  # the short side decides


def test_mask_level_errors(slide: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path, rgb, _ = slide
    with pytest.raises(InputError, match=r"input\.mask\.level 5 does not exist.*levels 0\.\.2"):
        plan_foreground(InputImage(str(path)), MaskSpec(method="tissue", level=5))
    zarr.create_array(tmp_path / "flat.zarr", data=rgb, dimension_names=("c", "y", "x"))
    with pytest.raises(InputError, match=r"needs an OME-Zarr pyramid.*remove input\.mask\.level"):
        plan_foreground(InputImage(str(tmp_path / "flat.zarr")), MaskSpec(method="tissue", level=1))


# -- tissue without a pyramid: streamed, block-averaged ---------------------------------------


def test_streamed_block_average_keeps_the_same_units(
    slide: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, rgb, truth = slide
    # Chunks of 50 px are not a multiple of the pooling factor; small blocks force many reads.
    zarr.create_array(
        tmp_path / "flat.zarr", data=rgb, chunks=(3, 50, 50), dimension_names=("c", "y", "x")
    )
    monkeypatch.setattr(masks, "_BLOCK", 48)
    reads: list[tuple[int, int, int, int]] = []
    image = InputImage(str(tmp_path / "flat.zarr"))
    original = image.read

    def counting_read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        reads.append((y0, y1, x0, x1))
        return original(y0, y1, x0, x1)

    image.read = counting_read  # type: ignore[method-assign]
    # 610 px long side / 153 -> averaged 4 x 4, like level 2 of the pyramid.
    streamed = plan_foreground(image, MaskSpec(method="tissue"), long_side=153)
    pyramid = plan_foreground(InputImage(str(path)), MaskSpec(method="tissue", level=2))
    assert streamed is not None and pyramid is not None
    assert streamed.mask.shape == (math.ceil(H / 4), math.ceil(W / 4))
    assert streamed.scale == (4.0, 4.0)
    assert "level 0 averaged 4x4 (121 x 153)" in streamed.source
    assert len(reads) > 1 and max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in reads) <= 48 * 48
    grid = UnitGrid(H, W, SIDE)
    kept = streamed.units_with_foreground(grid)
    assert kept == pyramid.units_with_foreground(grid)
    _check_against_truth(streamed, kept, grid, truth)


@pytest.mark.parametrize(("factor", "block"), [(3, 10), (5, 16), (1, 8)])
def test_pool_matches_a_cell_by_cell_computation(
    factor: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(factor)
    plane = rng.random((37, 53)) * (rng.random((37, 53)) < 0.05)
    monkeypatch.setattr(masks, "_BLOCK", block)

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return plane[y0:y1, x0:x1]

    mean = masks._pool(plane.shape, (7, 11), read, factor, "mean")
    anyp = masks._pool(plane.shape, (7, 11), read, factor, "any")
    rows, cols = math.ceil(37 / factor), math.ceil(53 / factor)
    assert mean.shape == anyp.shape == (rows, cols)
    for i in range(rows):
        for j in range(cols):
            cell = plane[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
            assert mean[i, j] == pytest.approx(cell.mean())
            assert anyp[i, j] == bool((cell != 0).any())


# -- blank images -----------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [0, 2])
def test_a_blank_slide_has_no_foreground_and_says_why(tmp_path: Path, noise: int) -> None:
    rng = np.random.default_rng(0)
    blank = np.full((3, 200, 260), 236, np.int16) + rng.integers(-noise, noise + 1, (3, 200, 260))
    zarr.create_array(tmp_path / "blank.zarr", data=blank.astype(np.uint8))
    image = InputImage(str(tmp_path / "blank.zarr"), axes="cyx")
    fg = plan_foreground(image, MaskSpec(method="tissue"))
    assert fg is not None
    assert fg.units_with_foreground(UnitGrid(200, 260, 32)) == set()
    assert not fg.mask.any() and "no contrast" in fg.source and "no foreground" in fg.source
    fixed = plan_foreground(image, MaskSpec(method="tissue", threshold=0.3))
    assert fixed is not None and not fixed.mask.any()
    assert "fixed threshold 0.30" in fixed.source and "no foreground" in fixed.source


# -- conservativeness: random masks at random non-integer scales ------------------------------


def _footprints(n_full: int, n_mask: int) -> np.ndarray:
    """(n_full, n_mask) bool: full-res pixel r overlaps mask pixel i, in exact integer maths.

    Mask pixel i covers [i * F/n, (i + 1) * F/n) of [0, F); pixel r covers [r, r + 1).
    """
    r = np.arange(n_full)[:, None]
    i = np.arange(n_mask)[None, :]
    return (i * n_full < (r + 1) * n_mask) & ((i + 1) * n_full > r * n_mask)


def _exact_fraction(mask: np.ndarray, big: tuple[int, int], unit: Unit) -> Fraction:
    """Share of the unit's area under foreground mask pixels, with fractions."""
    (h, w), (hh, ww) = mask.shape, big

    def lengths(lo: int, hi: int, n: int, full: int) -> list[Fraction]:
        s = Fraction(full, n)
        return [
            max(Fraction(0), min((i + 1) * s, Fraction(hi)) - max(i * s, Fraction(lo)))
            for i in range(n)
        ]

    ly, lx = lengths(unit.y0, unit.y1, h, hh), lengths(unit.x0, unit.x1, w, ww)
    covered = sum((ly[i] * lx[j] for i, j in zip(*np.nonzero(mask), strict=True)), Fraction(0))
    return covered / unit.pixels


def test_no_unit_with_a_foreground_pixel_is_ever_dropped() -> None:
    rng = np.random.default_rng(2024)
    for case in range(150):
        h, w = rng.integers(1, 30, 2)
        mask = rng.random((h, w)) < rng.choice([0.01, 0.05, 0.2])
        # Image sizes give scales from 0.4 (mask finer than the image) to 7, rarely integers.
        hh = max(1, round(h * rng.uniform(0.4, 7)))
        ww = max(1, round(w * rng.uniform(0.4, 7)))
        side = int(rng.integers(1, 40))
        grid = UnitGrid(hh, ww, side)
        fg = Foreground(mask, (hh / h, ww / w), "random")
        # Brute force: a full-resolution pixel can be foreground when any mask pixel whose
        # footprint overlaps it is foreground.
        fy, fx = _footprints(hh, h), _footprints(ww, w)
        possible = (fy.astype(int) @ mask.astype(int) @ fx.T.astype(int)) > 0
        needed = _units_with_truth(grid, possible)
        kept = fg.units_with_foreground(grid, 0.0)
        assert needed - kept == set(), f"case {case}: dropped {sorted(needed - kept)}"
        assert kept == needed, f"case {case}: kept units that no foreground mask pixel touches"
        # min_fraction: against the exact area share.
        m = float(rng.uniform(0, 0.8))
        exact = {u.index: _exact_fraction(mask, (hh, ww), u) for u in grid}
        for u in grid:
            assert fg.unit_fraction(u) == pytest.approx(float(exact[u.index]), abs=1e-9)
            assert (fg.unit_fraction(u) > 0) == (u.index in needed)
        clear = {k for k, f in exact.items() if abs(float(f) - m) > 1e-9}
        above = {k for k in clear if exact[k] > m}
        assert fg.units_with_foreground(grid, m) & clear == above, f"case {case}"


def test_unit_fraction_by_hand() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True  # covers full-res rows 2.5..5, columns 5..7.5 at scale 2.5
    fg = Foreground(mask, (2.5, 2.5), "hand")
    # Unit rows 0..4, columns 4..8: 1.5 rows x 2.5 columns of its 16 px are covered.
    assert fg.unit_fraction(Unit(0, 0, 4, 4, 8)) == pytest.approx(1.5 * 2.5 / 16)
    assert fg.unit_fraction(Unit(1, 0, 2, 0, 10)) == 0.0  # above the foreground pixel
    assert fg.unit_fraction(Unit(2, 4, 5, 6, 7)) == 1.0


def test_rows_past_the_end_of_a_rounded_down_mask_take_its_last_row() -> None:
    """A 2x-pooled level of a 10 px image has 4 px, covering 8 px at scale 2: rows 8 and 9 are
    nearest to (and judged by) the last mask row."""
    mask = np.zeros((4, 4), bool)
    mask[3, :2] = True  # rows 6..8, columns 0..4
    fg = Foreground(mask, (2.0, 2.0), "rounded")
    assert fg.unit_fraction(Unit(0, 8, 10, 0, 4)) == 1.0
    assert fg.unit_fraction(Unit(0, 8, 10, 2, 6)) == 0.5
    assert fg.unit_fraction(Unit(0, 8, 10, 4, 10)) == 0.0
    # 3 x 3 units of 4 px: unit 3 is rows 4..8 (half foreground), unit 6 rows 8..10 (all).
    assert fg.units_with_foreground(UnitGrid(10, 10, 4), 0.9) == {6}
    assert fg.units_with_foreground(UnitGrid(10, 10, 4)) == {3, 6}
    with pytest.raises(ValueError, match="not the 40 x 10 px unit grid"):
        fg.units_with_foreground(UnitGrid(40, 10, 4))  # a mask of another image


# -- array masks ------------------------------------------------------------------------------


def _user_mask() -> np.ndarray:
    mask = np.zeros((70, 90), np.uint8)
    mask[10:20, 5:30] = 1
    mask[50:52, 60:61] = 255
    mask[69, 89] = 3
    return mask


def test_array_mask_of_another_resolution(tmp_path: Path) -> None:
    image = InputImage(str(_input(tmp_path, (3, 300, 400))))
    mask = _user_mask()
    zarr.create_array(tmp_path / "mask.zarr", data=mask, chunks=(32, 32))
    fg = plan_foreground(image, MaskSpec(method="array", path=str(tmp_path / "mask.zarr")))
    assert fg is not None
    assert fg.scale == pytest.approx((300 / 70, 400 / 90))
    assert np.array_equal(fg.mask, mask != 0) and "(70 x 90" in fg.source
    grid = UnitGrid(300, 400, 24)
    possible = (_footprints(300, 70).astype(int) @ (mask != 0) @ _footprints(400, 90).T) > 0
    assert fg.units_with_foreground(grid) == _units_with_truth(grid, possible)

    # The same mask as a (1, h, w) OME-Zarr image gives the same units.
    _write_pyramid(tmp_path / "mask.ome.zarr", mask[None], levels=2)
    ome = plan_foreground(image, MaskSpec(method="array", path=str(tmp_path / "mask.ome.zarr")))
    assert ome is not None and np.array_equal(ome.mask, fg.mask)

    # Pooled further (long_side), a mask only grows: still every needed unit.
    coarse = plan_foreground(
        image, MaskSpec(method="array", path=str(tmp_path / "mask.zarr")), long_side=30
    )
    assert coarse is not None and coarse.mask.shape == (24, 30)
    assert _units_with_truth(grid, possible) <= coarse.units_with_foreground(grid)


def _input(tmp_path: Path, shape: tuple[int, int, int]) -> Path:
    data = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    zarr.create_array(tmp_path / "in.zarr", data=data, dimension_names=("c", "y", "x"))
    return tmp_path / "in.zarr"


def test_array_mask_errors(tmp_path: Path) -> None:
    image = InputImage(str(_input(tmp_path, (3, 60, 80))))
    with pytest.raises(StoreNotFoundError, match=r"mask \(input\.mask\.path\) '.*nowhere\.zarr'"):
        plan_foreground(image, MaskSpec(method="array", path=str(tmp_path / "nowhere.zarr")))
    with pytest.raises(ConfigError, match=r"set input\.mask\.path"):
        plan_foreground(image, MaskSpec(method="array"))
    zarr.create_array(tmp_path / "rgb.zarr", data=np.ones((3, 30, 40), np.uint8))
    with pytest.raises(InputError, match=r"shape \(3, 30, 40\): a mask has one band"):
        plan_foreground(image, MaskSpec(method="array", path=str(tmp_path / "rgb.zarr")))
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("tissue", data=np.ones((30, 40), bool))
    with pytest.raises(InputError, match=r"name the array with input\.mask\.array.*tissue"):
        plan_foreground(image, MaskSpec(method="array", path=str(tmp_path / "g.zarr")))
    with pytest.raises(StoreNotFoundError, match=r"'tisue' \(input\.mask\.array\).*tissue"):
        plan_foreground(
            image, MaskSpec(method="array", path=str(tmp_path / "g.zarr"), array="tisue")
        )
    fg = plan_foreground(
        image, MaskSpec(method="array", path=str(tmp_path / "g.zarr"), array="tissue")
    )
    assert fg is not None and fg.mask.all()


# -- nodata -----------------------------------------------------------------------------------


def _all_nodata_by_loops(block: np.ndarray, nodata: float) -> bool:
    for value in block.reshape(-1).tolist():
        same = (math.isnan(value) and math.isnan(nodata)) or value == nodata
        if not same:
            return False
    return True


@pytest.mark.parametrize(
    ("dtype", "nodata"),
    [
        ("uint8", 0.0),
        ("uint8", 255.0),
        ("int16", -9999.0),
        ("float32", math.nan),
        ("float32", float(np.finfo(np.float32).min)),
        ("float64", -1.5),
    ],
)
def test_unit_is_nodata_matches_a_pixel_loop(dtype: str, nodata: float) -> None:
    rng = np.random.default_rng(7)
    other = 3.0
    for _ in range(60):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        block = np.full(shape, nodata, dtype=dtype)
        # Mostly all-nodata blocks, sometimes one or two pixels (in one band) that differ.
        for _ in range(int(rng.choice([0, 0, 1, 2]))):
            c, y, x = (int(rng.integers(0, n)) for n in shape)
            block[c, y, x] = other
        assert unit_is_nodata(block, nodata) == _all_nodata_by_loops(block, nodata)
    assert not unit_is_nodata(np.zeros((1, 2, 2), np.uint8), 0.5)  # uint8 cannot hold 0.5
    assert not unit_is_nodata(np.full((1, 2, 2), np.nan, np.float32), 0.0)


def test_resolve_nodata_from_spec_and_attributes(tmp_path: Path) -> None:
    spec = MaskSpec(method="nodata")
    data = np.zeros((2, 8, 8), np.int16)
    zarr.create_array(
        tmp_path / "a.zarr",
        data=data,
        dimension_names=("c", "y", "x"),
        attributes={"nodata": -9999},
    )
    image = InputImage(str(tmp_path / "a.zarr"))
    assert resolve_nodata(image, spec) == -9999.0
    assert resolve_nodata(image, MaskSpec(method="nodata", nodata=7)) == 7.0

    group = zarr.open_group(tmp_path / "g.zarr", mode="w", attributes={"proj:nodata": "nan"})
    group.create_array("b", data=data.astype(np.float32), dimension_names=("c", "y", "x"))
    assert math.isnan(resolve_nodata(InputImage(str(tmp_path / "g.zarr"), array="b"), spec))

    zarr.create_array(
        tmp_path / "f.zarr",
        data=data,
        dimension_names=("c", "y", "x"),
        attributes={"_FillValue": [0, 0]},
    )
    assert resolve_nodata(InputImage(str(tmp_path / "f.zarr")), spec) == 0.0

    zarr.create_array(
        tmp_path / "d.zarr",
        data=data,
        dimension_names=("c", "y", "x"),
        attributes={"nodata": [0, 5]},
    )
    with pytest.raises(InputError, match=r"different no-data values per band"):
        resolve_nodata(InputImage(str(tmp_path / "d.zarr")), spec)

    zarr.create_array(tmp_path / "n.zarr", data=data, dimension_names=("c", "y", "x"))
    with pytest.raises(InputError, match=r"no 'nodata'.*set input\.mask\.nodata"):
        resolve_nodata(InputImage(str(tmp_path / "n.zarr")), spec)
    assert plan_foreground(InputImage(str(tmp_path / "n.zarr")), spec) is None
