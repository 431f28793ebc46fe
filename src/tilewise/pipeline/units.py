"""Write units: the output cut into the squares that one task each computes and writes once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tilewise.pipeline.engine import Unit

__all__ = ["BAND_ROWS", "UnitGrid"]

# Unit rows per band of the order units are handed out in (UnitGrid.band_order).
BAND_ROWS = 2


@dataclass(frozen=True)
class UnitGrid:
    """Units of ``side × side`` output pixels (clipped at the image end), numbered row-major.

    With an unsharded output a unit is one chunk; with sharding it is one shard, because writers
    that share a shard lose data (DESIGN.md rule 1).
    """

    height: int
    width: int
    side: int

    @property
    def rows(self) -> int:
        """Units along y."""
        return -(-self.height // self.side)

    @property
    def cols(self) -> int:
        """Units along x."""
        return -(-self.width // self.side)

    def __len__(self) -> int:
        return self.rows * self.cols

    def unit(self, index: int) -> Unit:
        """The unit numbered ``index`` (row-major)."""
        if not 0 <= index < len(self):
            raise IndexError(f"unit {index} outside 0..{len(self) - 1}")
        i, j = divmod(index, self.cols)
        y0, x0 = i * self.side, j * self.side
        return Unit(
            index, y0, min(y0 + self.side, self.height), x0, min(x0 + self.side, self.width)
        )

    def __iter__(self) -> Iterator[Unit]:
        return (self.unit(k) for k in range(len(self)))

    def band_order(self, band: int = BAND_ROWS) -> list[int]:
        """Every unit index once, in bands of ``band`` unit rows, each band walked column by
        column (top to bottom within a column), alternate bands right to left.

        Why: a unit's halo reaches into the input chunks around it, so a reader keeping the last
        few decoded chunks decodes ``(band + 2) / band`` chunks per unit walking this order
        (2 for bands of 2), against 3 walking row-major order; the turn at a band's end keeps the
        chunks the next band shares with it.
        """
        if band < 1:
            raise ValueError(f"band must be at least 1; got {band}")
        order: list[int] = []
        for b, top in enumerate(range(0, self.rows, band)):
            rows = range(top, min(top + band, self.rows))
            cols = range(self.cols) if b % 2 == 0 else range(self.cols - 1, -1, -1)
            order.extend(i * self.cols + j for j in cols for i in rows)
        return order
