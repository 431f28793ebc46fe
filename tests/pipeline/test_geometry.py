"""Window geometry and whole-image padding."""

from __future__ import annotations

import numpy as np
import pytest

from tilewise.errors import PlanError
from tilewise.models import SizeRule, TilingFacts, facts
from tilewise.pipeline.api import ArraySource
from tilewise.pipeline.engine import Unit, read_padded
from tilewise.pipeline.geometry import (
    TilingWarning,
    axis_geometry,
    blend_weights,
    check_tiling,
    source_indices,
)

UNET = facts("unet")
SAME = TilingFacts(stride=8, margin=0, halo=20, size_rule=SizeRule(8, 8))


@pytest.mark.parametrize("mode", ["reflect", "symmetric"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("pad", [0, 1, 5, 40])
def test_source_indices_equal_numpy_pad_of_the_whole_axis(mode: str, size: int, pad: int) -> None:
    axis = np.arange(size) * 10
    expected = np.pad(axis, (pad, pad + 3), mode=mode)
    assert np.array_equal(axis[source_indices(-pad, size + pad + 3, size, mode)], expected)


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "constant"])
@pytest.mark.parametrize(
    "box",
    [(-30, 10, -30, 12), (5, 40, 20, 70), (-3, 25, -40, 2), (-50, 60, -45, 70), (2, 6, 3, 9)],
    ids=["top-left corner", "bottom-right corner", "left edge", "image inside window", "inside"],
)
def test_read_padded_equals_np_pad_of_the_whole_image(mode: str, box: tuple[int, ...]) -> None:
    image = np.random.default_rng(1).integers(0, 255, (2, 13, 21)).astype(np.uint8)
    y0, y1, x0, x1 = box
    big = 60
    kwargs = {"constant_values": 7} if mode == "constant" else {}
    padded = np.pad(image, ((0, 0), (big, big), (big, big)), mode=mode, **kwargs)
    expected = padded[:, y0 + big : y1 + big, x0 + big : x1 + big]
    got = read_padded(ArraySource(image), y0, y1, x0, x1, mode=mode, value=7)  # type: ignore[arg-type]
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_tile_off_the_stride_names_the_two_nearest_valid_tiles() -> None:
    with pytest.raises(
        PlanError, match=r"tile \(500\) must be a multiple of 16 .*Use tile: 496 or 512"
    ):
        check_tiling(UNET, tile=500, halo=None, stitch="crop", arch="unet")


def test_halo_too_small_for_crop_is_refused_with_the_fix() -> None:
    with pytest.raises(PlanError, match=r"too small for an exact result.*Use halo: 20"):
        check_tiling(SAME, tile=64, halo=10, stitch="crop", arch="net")


def test_halo_too_small_for_blend_warns() -> None:
    with pytest.warns(TilingWarning, match="below the 20 px"):
        assert check_tiling(SAME, tile=64, halo=10, stitch="blend", arch="net") == 10


def test_halo_below_the_valid_margin_is_refused() -> None:
    with pytest.raises(PlanError, match="at least the 92 px"):
        check_tiling(UNET, tile=512, halo=50, stitch="blend", arch="unet")


def test_halo_larger_than_the_tile_is_refused() -> None:
    with pytest.raises(PlanError, match=r"halo \(92\) must not exceed the tile \(64\).*tile: 96"):
        check_tiling(UNET, tile=64, halo=None, stitch="crop", arch="unet")


def test_crop_with_a_non_equivariant_net_is_refused() -> None:
    psp = TilingFacts(8, 0, None, SizeRule(8, 8), equivariant=False, note="global pooling")
    with pytest.raises(PlanError, match=r"not \(global pooling\)\. Use stitch: blend"):
        check_tiling(psp, tile=64, halo=32, stitch="crop", arch="psp")


def test_unet_windows_are_572_for_388_px_tiles_and_start_on_the_padded_16_grid() -> None:
    g = axis_geometry(UNET, size=5000, tile=384, halo=92, stitch="crop")
    assert g.window == 572 and g.lead == 92
    for k in range(g.cores):
        assert (g.origin(k) + 92) % 16 == 0  # multiples of 16 from the image padded by 92
        assert g.output_origin(k) <= g.core(k)[0] and g.core(k)[1] <= g.output_origin(k) + 388


@pytest.mark.parametrize("halo", [20, 21, 27, 40])
def test_every_core_pixel_gets_the_full_halo_and_origins_share_one_phase(halo: int) -> None:
    g = axis_geometry(SAME, size=301, tile=48, halo=halo, stitch="crop")
    for k in range(g.cores):
        c0, c1 = g.core(k)
        assert g.origin(k) <= c0 - halo and g.origin(k) + g.window >= c1 + halo
        assert g.origin(k) % 8 == g.origin(0) % 8 == 0
        assert SAME.size_rule.is_valid(g.window)


def test_cores_cover_every_pixel_exactly_once() -> None:
    g = axis_geometry(SAME, size=1003, tile=64, halo=20, stitch="crop")
    seen = np.zeros(1003, int)
    for k in range(g.cores):
        c0, c1 = g.core(k)
        seen[c0:c1] += 1
    assert (seen == 1).all()


def test_blend_weights_sum_to_one_where_windows_meet() -> None:
    g = axis_geometry(SAME, size=400, tile=64, halo=40, stitch="blend")
    total = np.zeros(400)
    for k in range(g.cores):
        s0, s1 = g.support(k)
        total[s0:s1] += blend_weights(g, k)
    interior = slice(g.blend, 400 - 64)  # away from the image border, every pixel has both sides
    assert np.allclose(total[interior], 1.0, atol=1e-6)
    assert (total > 0).all()


def test_windows_for_a_unit_do_not_depend_on_the_unit_cut() -> None:
    g = axis_geometry(SAME, size=500, tile=32, halo=20, stitch="crop")
    whole = set(g.windows_for(0, 500))
    parts = set(g.windows_for(0, 160)) | set(g.windows_for(160, 500))
    assert whole == parts == set(range(g.cores))


def test_unit_pixels() -> None:
    assert Unit(0, 0, 10, 5, 12).pixels == 70
