"""Which shards a worker trains on, and which patches it cuts from them.

Two levels, both seeded and deterministic:

* :func:`assign_shards` deals the dataset's shards to the training workers, afresh each epoch:
  a permutation seeded by ``(seed, epoch)``, dealt round-robin, so the workers' shards are
  disjoint and together cover the dataset.
* A patch sampler draws ``(shard, y0, x0)`` patch origins inside one worker's shards:
  :class:`UniformSampler`, :class:`ClassBalancedSampler` and :class:`ForegroundSampler`
  (:func:`make_sampler` builds one by name). Each draws from its own numpy ``Generator``; its
  :meth:`~PatchSampler.state` (JSON-friendly) and :func:`sampler_from_state` let a checkpoint
  resume the exact sequence: the patches after a resume are those the uninterrupted run would
  have drawn.

The class-balanced and foreground samplers need to know where each class is. A full-resolution
list of pixel positions would take 8 bytes per pixel (80 GB for a 10-gigapixel slide), so they
use a coarse index instead: for each cell of a grid of ``cell`` px (at most half the patch) and
each class, how many of its pixels the cell holds. A patch is centred on a random point of a
cell drawn with probability proportional to its count of the wanted class, which is the same as
drawing a pixel of that class uniformly and then moving the centre by less than one cell. Since
the cell is at most half the patch, the patch always contains the whole cell, hence at least one
pixel of the class. The index is built by one block-by-block scan of each label array and kept
on the shard for later epochs.

Instance shards (Mask R-CNN) are indexed through the class of each pixel's object
(:meth:`~tilewise.training.shards.Shard.label_blocks`): the foreground sampler centres patches on
objects (any id but 0), and the class-balanced one on a class of objects drawn uniformly (or on
the background, class 0, as for dense labels).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np

from tilewise.errors import ConfigError, did_you_mean
from tilewise.training.shards import Shard, patch_shape

__all__ = [
    "ClassBalancedSampler",
    "ClassIndex",
    "ForegroundSampler",
    "Patch",
    "PatchSampler",
    "SamplerKind",
    "UniformSampler",
    "assign_shards",
    "build_class_index",
    "make_sampler",
    "sampler_from_state",
]

SamplerKind = Literal["uniform", "class_balanced", "foreground"]

#: Default side of a class-index cell in pixels (made smaller for patches under 64 px).
DEFAULT_CELL = 32


class Patch(NamedTuple):
    """A patch origin: ``shard`` indexes the sampler's shard list; the patch is
    ``[y0:y0+h, x0:x0+w]`` of that shard."""

    shard: int
    y0: int
    x0: int


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}.")
    return int(value)


def assign_shards(n_shards: int, world_size: int, rank: int, epoch: int, seed: int) -> list[int]:
    """The shard indices worker ``rank`` of ``world_size`` trains on in ``epoch``.

    Each epoch the shard indices are permuted by a generator seeded with ``(seed, epoch)`` and
    dealt round-robin: worker ``r`` gets positions ``r, r + world_size, ...`` of the
    permutation. So the workers' lists are disjoint and together hold every shard, each worker
    gets ``n_shards // world_size`` or one more, and every worker computes the same deal
    without talking to the others.

    Raises:
        ConfigError: fewer shards than workers (a worker would have no data), or bad arguments.
    """
    n_shards = _check_int("n_shards", n_shards, 1)
    world_size = _check_int("world_size", world_size, 1)
    epoch = _check_int("epoch", epoch, 0)
    seed = _check_int("seed", seed, 0)
    if (
        isinstance(rank, bool)
        or not isinstance(rank, int | np.integer)
        or not 0 <= rank < world_size
    ):
        raise ConfigError(f"rank must be in 0..{world_size - 1}; got {rank!r}.")
    if n_shards < world_size:
        raise ConfigError(
            f"{n_shards} shard(s) cannot feed {world_size} training workers: every worker needs "
            f"at least one shard of its own. Use at most {n_shards} worker(s), or split the "
            f"data into at least {world_size} shards."
        )
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    return [int(i) for i in order[int(rank) :: world_size]]


# ------------------------------------------------------------------------------ class index


@dataclass(frozen=True)
class ClassIndex:
    """Where each class is in one shard, on a grid of ``cell`` px (see the module docstring).

    ``cells[c]`` are the flat cell ids (``row * cols + col``) holding pixels of class ``c``,
    in increasing order, and ``counts[c]`` how many pixels of ``c`` each holds.
    """

    cell: int
    rows: int
    cols: int
    cells: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...]

    def cell_box(self, cell_id: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of a cell, clipped to the shard."""
        row, col = divmod(int(cell_id), self.cols)
        y0, x0 = row * self.cell, col * self.cell
        return y0, min(height, y0 + self.cell), x0, min(width, x0 + self.cell)


def build_class_index(shard: Shard, cell: int) -> ClassIndex:
    """Scan ``shard``'s labels block by block into a :class:`ClassIndex` of ``cell`` px cells.

    Kept on the shard (one scan per process and cell size). Ignored pixels and values that are
    not class ids are not indexed.
    """
    cell = _check_int("cell", cell, 1)

    def build() -> ClassIndex:
        k = shard.num_classes
        rows, cols = -(-shard.height // cell), -(-shard.width // cell)
        found_cells: list[list[np.ndarray]] = [[] for _ in range(k)]
        found_counts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for y0, x0, block in shard.label_blocks():
            h, w = block.shape
            valid = (block >= 0) & (block < k)
            # Cells of this block numbered locally (blocks need not align with cells: a cell cut
            # by a block edge is counted in two parts, summed below).
            cell_y = (y0 + np.arange(h)) // cell
            cell_x = (x0 + np.arange(w)) // cell
            ny, nx = int(cell_y[-1] - cell_y[0]) + 1, int(cell_x[-1] - cell_x[0]) + 1
            local = (cell_y - cell_y[0])[:, None] * nx + (cell_x - cell_x[0])[None, :]
            keys = local[valid] * k + block[valid].astype(np.int64)
            table = np.bincount(keys, minlength=ny * nx * k).reshape(ny * nx, k)
            for c in range(k):
                present = np.flatnonzero(table[:, c])
                if present.size:
                    rows_c, cols_c = np.divmod(present, nx)
                    found_cells[c].append((rows_c + cell_y[0]) * cols + cols_c + cell_x[0])
                    found_counts[c].append(table[present, c])
        cells, counts = [], []
        for c in range(k):
            if found_cells[c]:
                ids_c = np.concatenate(found_cells[c])
                n_c = np.concatenate(found_counts[c])
                unique, inverse = np.unique(ids_c, return_inverse=True)
                cells.append(unique.astype(np.int64))
                counts.append(np.bincount(inverse, weights=n_c).astype(np.int64))
            else:
                cells.append(np.zeros(0, np.int64))
                counts.append(np.zeros(0, np.int64))
        return ClassIndex(cell, rows, cols, tuple(cells), tuple(counts))

    index: ClassIndex = shard.cached_index(("class_index", cell), build)
    return index


class _CellTable:
    """Cells of several shards with their pixel counts, drawn in proportion to the counts."""

    def __init__(
        self, shard_ids: list[np.ndarray], cells: list[np.ndarray], counts: list[np.ndarray]
    ):
        self.shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)
        self.cell = np.concatenate(cells) if cells else np.zeros(0, np.int64)
        weights = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        self.cumulative = np.cumsum(weights, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.cumulative[-1]) if self.cumulative.size else 0

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        pixel = int(rng.integers(self.total))
        i = int(np.searchsorted(self.cumulative, pixel, side="right"))
        return int(self.shard[i]), int(self.cell[i])


# ------------------------------------------------------------------------------ samplers


class PatchSampler(ABC):
    """Draws patch origins ``(shard, y0, x0)`` inside ``shards``, seeded and resumable.

    Args:
        shards: the worker's shards; :attr:`Patch.shard` indexes this list.
        patch_size: ``int`` or ``(h, w)``; must fit every shard (:func:`open_shards` checks).
        seed: an int or a sequence of ints (e.g. ``(seed, epoch, rank)``) for numpy's
            ``default_rng``.
    """

    kind: ClassVar[str]

    def __init__(
        self, shards: Sequence[Shard], patch_size: int | Sequence[int], *, seed: int | Sequence[int]
    ) -> None:
        if not shards:
            raise ConfigError("a patch sampler needs at least one shard; got none.")
        self.shards = list(shards)
        self.patch_size = patch_shape(patch_size)
        ph, pw = self.patch_size
        for shard in self.shards:
            if ph > shard.height or pw > shard.width:
                raise ConfigError(
                    f"patch_size {ph}x{pw} does not fit shard '{shard.location}' of "
                    f"{shard.height}x{shard.width} px; use a patch of at most "
                    f"{shard.height}x{shard.width}, or leave that shard out."
                )
        self.seed: int | list[int] = (
            int(seed) if isinstance(seed, int | np.integer) else [int(s) for s in seed]
        )
        self.rng = np.random.default_rng(self.seed)
        self.drawn = 0
        # Uniform patches: shards in proportion to their count of patch origins, so that every
        # origin of every shard is equally likely.
        origins = np.array(
            [(s.height - ph + 1) * (s.width - pw + 1) for s in self.shards], dtype=np.float64
        )
        self._shard_p = origins / origins.sum()

    def sample(self) -> Patch:
        """The next patch."""
        patch = self._draw()
        self.drawn += 1
        return patch

    def take(self, n: int) -> list[Patch]:
        """The next ``n`` patches."""
        return [self.sample() for _ in range(n)]

    def __iter__(self) -> Iterator[Patch]:
        """Patches without end."""
        while True:
            yield self.sample()

    @abstractmethod
    def _draw(self) -> Patch: ...

    def _uniform(self) -> Patch:
        ph, pw = self.patch_size
        i = int(self.rng.choice(len(self.shards), p=self._shard_p)) if len(self.shards) > 1 else 0
        shard = self.shards[i]
        y0 = int(self.rng.integers(shard.height - ph + 1))
        x0 = int(self.rng.integers(shard.width - pw + 1))
        return Patch(i, y0, x0)

    def _centred(self, i: int, index: ClassIndex, cell_id: int) -> Patch:
        """A patch centred on a random pixel of a cell, clamped into the shard."""
        shard = self.shards[i]
        ph, pw = self.patch_size
        y0, y1, x0, x1 = index.cell_box(cell_id, shard.height, shard.width)
        yc = int(self.rng.integers(y0, y1))
        xc = int(self.rng.integers(x0, x1))
        return Patch(
            i,
            min(max(yc - ph // 2, 0), shard.height - ph),
            min(max(xc - pw // 2, 0), shard.width - pw),
        )

    def params(self) -> dict[str, Any]:
        """The sampler's own settings (beyond shards, patch size and seed), for its state."""
        return {}

    def clone(self) -> PatchSampler:
        """An independent copy at the same point (its own generator; indexes shared)."""
        twin = copy.copy(self)
        twin.rng = np.random.default_rng()
        twin.rng.bit_generator.state = self.rng.bit_generator.state
        return twin

    def position(self) -> tuple[int, dict[str, Any]]:
        """``(drawn, generator state)``: where the sequence stands, cheaper than :meth:`state`."""
        return self.drawn, dict(self.rng.bit_generator.state)

    def seek(self, position: tuple[int, dict[str, Any]]) -> None:
        """Go back (or forward) to a :meth:`position` of this sampler or of its clones."""
        self.drawn = int(position[0])
        self.rng.bit_generator.state = position[1]

    def state(self) -> dict[str, Any]:
        """Everything needed to resume the exact sequence (JSON-friendly): kind, settings,
        shard locations, patches drawn and the generator state."""
        return {
            "kind": self.kind,
            "patch_size": list(self.patch_size),
            "seed": self.seed,
            "params": self.params(),
            "shards": [s.location for s in self.shards],
            "drawn": self.drawn,
            "rng": self.rng.bit_generator.state,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state` of a sampler of the same kind, shards and
        patch size): the next patch is the one that sampler would have drawn next."""
        if state.get("kind") != self.kind:
            raise ConfigError(
                f"sampler state is for a '{state.get('kind')}' sampler, not '{self.kind}'; "
                f"resume with the same sampler kind."
            )
        if list(state["shards"]) != [s.location for s in self.shards]:
            raise ConfigError(
                f"sampler state was saved for shards {state['shards']} but this sampler has "
                f"{[s.location for s in self.shards]}; resume with the same shards, in the same "
                f"order (same epoch and rank)."
            )
        if tuple(state["patch_size"]) != self.patch_size:
            raise ConfigError(
                f"sampler state was saved for patch_size {tuple(state['patch_size'])}, not "
                f"{self.patch_size}; resume with the same patch size."
            )
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        self.rng = rng
        self.drawn = int(state["drawn"])
        self.seed = state["seed"]


class UniformSampler(PatchSampler):
    """Every patch origin of every shard equally likely."""

    kind = "uniform"

    def _draw(self) -> Patch:
        return self._uniform()


class ClassBalancedSampler(PatchSampler):
    """A class drawn uniformly among those present in the shards, then a patch centred on one
    of its pixels (through the coarse :class:`ClassIndex`) and clamped into the shard.

    Each class then fills about the same share of patch centres, however rare it is: the fix for
    datasets where the class of interest covers 1 % of the pixels. Falls back to uniform patches
    when no shard has a labelled pixel.

    Args:
        cell: class-index cell size in px; made at most half the patch so that each patch
            contains the pixel it was drawn for.
    """

    kind = "class_balanced"

    def __init__(
        self,
        shards: Sequence[Shard],
        patch_size: int | Sequence[int],
        *,
        seed: int | Sequence[int],
        cell: int = DEFAULT_CELL,
    ) -> None:
        super().__init__(shards, patch_size, seed=seed)
        self.cell = max(1, min(_check_int("cell", cell, 1), *(n // 2 for n in self.patch_size)))
        self._requested_cell = int(cell)
        self._indexes = [build_class_index(s, self.cell) for s in self.shards]
        k = max(s.num_classes for s in self.shards)
        self._tables: list[_CellTable] = []
        self.classes: list[int] = []  # the classes present, in increasing order
        for c in range(k):
            parts = [
                (np.full(ix.cells[c].size, i, np.int64), ix.cells[c], ix.counts[c])
                for i, ix in enumerate(self._indexes)
                if c < len(ix.cells) and ix.cells[c].size
            ]
            if parts:
                table = _CellTable(*(list(p) for p in zip(*parts, strict=True)))
                self.classes.append(c)
                self._tables.append(table)
        self.last_class: int | None = None

    def params(self) -> dict[str, Any]:
        return {"cell": self._requested_cell}

    def sample_with_class(self) -> tuple[Patch, int | None]:
        """The next patch and the class it was drawn for (``None`` for a uniform fallback)."""
        patch = self.sample()
        return patch, self.last_class

    def _draw(self) -> Patch:
        if not self.classes:
            self.last_class = None
            return self._uniform()
        j = int(self.rng.integers(len(self.classes)))
        self.last_class = self.classes[j]
        i, cell_id = self._tables[j].draw(self.rng)
        return self._centred(i, self._indexes[i], cell_id)


class ForegroundSampler(PatchSampler):
    """With probability ``p`` a patch centred on a pixel that is neither ``background`` nor
    ignored (through the coarse :class:`ClassIndex`), else a uniform patch.

    Falls back to uniform patches when the shards hold no foreground pixel.

    Args:
        p: probability of a foreground-centred patch.
        background: the background class id.
        cell: class-index cell size in px (see :class:`ClassBalancedSampler`).
    """

    kind = "foreground"

    def __init__(
        self,
        shards: Sequence[Shard],
        patch_size: int | Sequence[int],
        *,
        seed: int | Sequence[int],
        p: float = 0.5,
        background: int = 0,
        cell: int = DEFAULT_CELL,
    ) -> None:
        super().__init__(shards, patch_size, seed=seed)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"foreground p must be a probability in [0, 1]; got {p!r}.")
        self.p = float(p)
        self.background = _check_int("background", background, 0)
        self.cell = max(1, min(_check_int("cell", cell, 1), *(n // 2 for n in self.patch_size)))
        self._requested_cell = int(cell)
        self._indexes = [build_class_index(s, self.cell) for s in self.shards]
        shard_ids, cells, counts = [], [], []
        for i, ix in enumerate(self._indexes):
            fg = [c for c in range(len(ix.cells)) if c != self.background and ix.cells[c].size]
            if not fg:
                continue
            # Per cell: the pixels of all foreground classes together.
            unique, inverse = np.unique(
                np.concatenate([ix.cells[c] for c in fg]), return_inverse=True
            )
            summed = np.bincount(inverse, weights=np.concatenate([ix.counts[c] for c in fg]))
            shard_ids.append(np.full(unique.size, i, np.int64))
            cells.append(unique)
            counts.append(summed.astype(np.int64))
        self._table = _CellTable(shard_ids, cells, counts)
        self.last_foreground = False

    def params(self) -> dict[str, Any]:
        return {"p": self.p, "background": self.background, "cell": self._requested_cell}

    def _draw(self) -> Patch:
        # The coin is tossed even without foreground, so that the sequence of draws keeps one
        # shape whatever the data holds.
        heads = bool(self.rng.random() < self.p)
        self.last_foreground = heads and self._table.total > 0
        if not self.last_foreground:
            return self._uniform()
        i, cell_id = self._table.draw(self.rng)
        return self._centred(i, self._indexes[i], cell_id)


_SAMPLERS: dict[str, type[PatchSampler]] = {
    cls.kind: cls for cls in (UniformSampler, ClassBalancedSampler, ForegroundSampler)
}


def make_sampler(
    kind: str,
    shards: Sequence[Shard],
    patch_size: int | Sequence[int],
    *,
    seed: int | Sequence[int],
    **params: Any,
) -> PatchSampler:
    """A sampler by name: ``uniform``, ``class_balanced`` (``cell``) or ``foreground``
    (``p``, ``background``, ``cell``)."""
    if kind not in _SAMPLERS:
        raise ConfigError(
            f"unknown sampler '{kind}'; choose one of {sorted(_SAMPLERS)}."
            + did_you_mean(str(kind), _SAMPLERS)
        )
    try:
        return _SAMPLERS[kind](shards, patch_size, seed=seed, **params)
    except TypeError as exc:
        raise ConfigError(f"bad settings {sorted(params)} for sampler '{kind}': {exc}.") from None


def sampler_from_state(shards: Sequence[Shard], state: dict[str, Any]) -> PatchSampler:
    """The sampler that :meth:`PatchSampler.state` describes, at the point it was saved."""
    sampler = make_sampler(
        state["kind"], shards, tuple(state["patch_size"]), seed=state["seed"], **state["params"]
    )
    sampler.set_state(state)
    return sampler
