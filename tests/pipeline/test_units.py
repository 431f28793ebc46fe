"""Write units: the grid and the order they are handed out in."""

from __future__ import annotations

import itertools

import pytest

from tilewise.pipeline.units import UnitGrid


def test_band_order_of_a_small_grid() -> None:
    # 3 x 3 units, bands of 2 rows: the first band column by column, the last one back.
    assert UnitGrid(30, 30, 10).band_order(2) == [0, 3, 1, 4, 2, 5, 8, 7, 6]
    # Bands of one row are a serpentine over the rows.
    assert UnitGrid(20, 30, 10).band_order(1) == [0, 1, 2, 5, 4, 3]


@pytest.mark.parametrize("band", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(10, 10), (35, 10), (10, 47), (47, 33), (64, 64)])
def test_band_order_walks_every_unit_once_through_neighbours(
    shape: tuple[int, int], band: int
) -> None:
    grid = UnitGrid(*shape, 8)
    order = grid.band_order(band)
    assert sorted(order) == list(range(len(grid)))
    # Each unit follows one it touches (a side or a corner): its decoded input chunks are near.
    for a, b in itertools.pairwise(order):
        (ia, ja), (ib, jb) = divmod(a, grid.cols), divmod(b, grid.cols)
        assert max(abs(ia - ib), abs(ja - jb)) <= max(1, band - 1), (a, b)


def test_band_order_rejects_an_empty_band() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        UnitGrid(10, 10, 5).band_order(0)
