"""Write units: the output cut into the squares that one task each computes and writes once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tilewise.pipeline.engine import Unit

__all__ = ["UnitGrid"]


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
