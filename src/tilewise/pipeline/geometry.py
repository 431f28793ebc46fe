"""Overlap-tile geometry: where model windows go, and what they read.

Coordinates are image pixels along one axis (the 2-D plan is the product of two axes). The output
is cut into *cores* on one global grid, ``[k * tile, (k + 1) * tile)``; the window that predicts
core ``k`` starts ``lead`` pixels before it. ``lead`` is the smallest value ``>= halo`` that keeps
every window origin on the phase ``-margin (mod stride)``: the pooling grid of every window is then
the grid of whole-image inference on the image mirror-padded by ``lead``, which is what makes
``stitch: crop`` exact (DESIGN.md rule 3). Because cores sit on one global grid, the windows of a
write unit do not depend on how the output is cut into units.

Padding is defined against the whole image (rule 4): :func:`source_indices` maps any coordinate,
however far outside, to the pixel that ``numpy.pad`` of the whole image would put there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tilewise.errors import PlanError
from tilewise.models.registry import TilingFacts

__all__ = [
    "AxisGeometry",
    "PadMode",
    "SlidingAxis",
    "Stitch",
    "TilingWarning",
    "axis_geometry",
    "blend_weights",
    "check_sliding",
    "check_tiling",
    "default_step",
    "sliding_axis",
    "source_indices",
]

PadMode = Literal["reflect", "symmetric", "constant"]
Stitch = Literal["crop", "blend", "sliding"]


class TilingWarning(UserWarning):
    """The tiling works but is not exact (blend with a halo below the exact one)."""


def _multiples_around(value: int, step: int) -> tuple[int, int]:
    lower = max(step, value // step * step)
    return lower, lower + step


def check_tiling(
    facts: TilingFacts,
    *,
    tile: int,
    halo: int | None,
    stitch: str,
    arch: str,
    step: int | None = None,
    flip: bool = False,
) -> int:
    """Check a tile/halo/stitch choice against a network's facts; return the halo to use.

    ``stitch: sliding`` has rules of its own (:func:`check_sliding`) and is sent there (its halo
    is 0: the window is the crop); ``step`` and ``flip`` belong to it alone.

    Raises:
        PlanError: a tile off the stride, a halo below the margin or (for ``crop``) below the
            exact halo, a halo larger than the tile, or ``crop`` for a non-equivariant net.
    """
    s = facts.stride
    if tile < 1:
        raise PlanError(f"tile must be at least 1 pixel; got {tile}.")
    if stitch == "sliding":
        check_sliding(facts, tile=tile, halo=halo, step=step, arch=arch)
        return 0
    if step is not None or flip:
        raise PlanError(
            f"tiling.step and tiling.flip belong to stitch: sliding; got stitch: {stitch}. "
            f"Use stitch: sliding, or remove them (flip-averaged exact tiling is the "
            f"model.tta: flip option)."
        )
    if tile % s:
        lo, hi = _multiples_around(tile, s)
        raise PlanError(
            f"tile ({tile}) must be a multiple of {s} for arch '{arch}'; got {tile}. "
            f"Use tile: {lo} or {hi}."
        )
    if stitch not in ("crop", "blend"):
        raise PlanError(f"stitch must be 'crop', 'blend' or 'sliding'; got {stitch!r}.")
    if stitch == "crop" and not facts.equivariant:
        why = f" ({facts.note})" if facts.note else ""
        raise PlanError(
            f"stitch: crop is exact only for translation-equivariant networks, and arch "
            f"'{arch}' is not{why}. Use stitch: blend."
        )
    if halo is None:
        if facts.halo is None:
            raise PlanError(
                f"arch '{arch}' has no finite halo that makes tiling exact; set tiling.halo "
                f"(context per side, at least {facts.margin}) and use stitch: blend."
            )
        halo = facts.halo
    if halo < 0:
        raise PlanError(f"halo must be at least 0; got {halo}.")
    if halo < facts.margin:
        raise PlanError(
            f"halo ({halo}) must be at least the {facts.margin} px that arch '{arch}' loses per "
            f"side (valid convolutions); got {halo}. Use halo: {facts.margin}."
        )
    if facts.halo is not None and halo < facts.halo:
        if stitch == "crop":
            raise PlanError(
                f"halo ({halo}) is too small for an exact result with arch '{arch}', which "
                f"needs {facts.halo} px of context per side; got {halo}. Use halo: {facts.halo}, "
                f"or stitch: blend to accept an approximate result."
            )
        warnings.warn(
            f"halo {halo} is below the {facts.halo} px that makes arch '{arch}' exact: "
            f"blended tiles will differ slightly from whole-image inference.",
            TilingWarning,
            stacklevel=2,
        )
    if halo > tile:
        need = -(-halo // s) * s
        raise PlanError(
            f"halo ({halo}) must not exceed the tile ({tile}): each window would compute more "
            f"than 9x the pixels it keeps. Use tile: {need} or larger."
        )
    return halo


@dataclass(frozen=True)
class AxisGeometry:
    """The window plan along one image axis.

    Attributes:
        size: image pixels along the axis.
        tile: core pixels per window (the last core may be shorter).
        halo: context per side that every core pixel is guaranteed.
        margin: pixels the network loses per side.
        lead: offset from a core's start to its window's origin (>= halo, stride-aligned).
        window: input pixels of every window (a valid size for the network).
        blend: width of the cross-fade band on each side of a core (0 for crop).
    """

    size: int
    tile: int
    halo: int
    margin: int
    lead: int
    window: int
    blend: int

    @property
    def cores(self) -> int:
        """Number of cores (windows) along the axis."""
        return -(-self.size // self.tile)

    def core(self, k: int) -> tuple[int, int]:
        """Output pixels ``[start, stop)`` that window ``k`` is responsible for."""
        return k * self.tile, min((k + 1) * self.tile, self.size)

    def origin(self, k: int) -> int:
        """Image coordinate of the first input pixel of window ``k`` (may be negative)."""
        return k * self.tile - self.lead

    def output_origin(self, k: int) -> int:
        """Image coordinate of the first output pixel that window ``k`` predicts."""
        return self.origin(k) + self.margin

    def support(self, k: int) -> tuple[int, int]:
        """Output pixels window ``k`` contributes to: its core widened by the blend band."""
        c0, c1 = self.core(k)
        return max(0, c0 - self.blend), min(self.size, c1 + self.blend)

    def windows_for(self, u0: int, u1: int) -> range:
        """The windows whose support intersects output pixels ``[u0, u1)``."""
        first = max(0, (u0 - self.blend) // self.tile)
        last = min(self.cores - 1, (u1 - 1 + self.blend) // self.tile)
        return range(first, last + 1)

    def read_range(self, u0: int, u1: int) -> tuple[int, int]:
        """Input pixels (image coordinates, possibly outside) read once for output ``[u0, u1)``."""
        ks = self.windows_for(u0, u1)
        return self.origin(ks[0]), self.origin(ks[-1]) + self.window

    def computed_pixels(self, u0: int, u1: int) -> int:
        """Input pixels pushed through the network for output ``[u0, u1)`` along this axis."""
        return len(self.windows_for(u0, u1)) * self.window


def axis_geometry(
    facts: TilingFacts, *, size: int, tile: int, halo: int, stitch: Stitch
) -> AxisGeometry:
    """Plan the windows along one axis of ``size`` pixels (tile and halo already checked).

    A tile larger than the image shrinks to the image (rounded up to the stride), so a small
    image costs one small window rather than one full tile.
    """
    if size < 1:
        raise PlanError(f"the image must have at least one pixel along each axis; got {size}.")
    s = facts.stride
    tile = min(tile, -(-size // s) * s)
    # Smallest lead >= halo with -lead == -margin (mod stride): window origins then sit on the
    # pooling grid of whole-image inference.
    lead = facts.margin + -(-(halo - facts.margin) // s) * s
    window = facts.size_rule.ceil(lead + tile + halo)
    blend = min(halo - facts.margin, tile // 2) if stitch == "blend" else 0
    return AxisGeometry(size, tile, halo, facts.margin, lead, window, blend)


def blend_weights(geom: AxisGeometry, k: int) -> np.ndarray:
    """Cross-fade weights of window ``k`` over its support.

    Adjacent windows overlap by ``2 * blend`` pixels where one fades out as sin² and the next
    fades in as cos² of the same argument, so the weights sum to one; at the image border, where
    a neighbour is missing, the stitcher divides by the weight sum. Offsetting the argument by
    half a pixel keeps every weight strictly positive, so there is no weight floor to clamp.
    """
    s0, s1 = geom.support(k)
    c0, c1 = geom.core(k)
    b = geom.blend
    p = np.arange(s0, s1, dtype=np.float64)
    w = np.ones_like(p)
    if b > 0:
        up = np.sin(0.5 * math.pi * (p - (c0 - b) + 0.5) / (2 * b)) ** 2
        down = np.cos(0.5 * math.pi * (p - (c1 - b) + 0.5) / (2 * b)) ** 2
        w = np.where(p < c0 + b, up, w)
        w = np.where(p >= c1 - b, np.minimum(w, down), w)
    return w.astype(np.float32)


def source_indices(start: int, stop: int, size: int, mode: PadMode) -> np.ndarray:
    """Source pixel of each coordinate in ``[start, stop)`` under whole-image padding.

    ``reflect`` is numpy's reflect (no edge repeat, as U-Net mirrors), ``symmetric`` repeats the
    edge; both repeat the reflection for pads wider than the image. ``constant`` returns -1 for
    coordinates outside the image.
    """
    i = np.arange(start, stop, dtype=np.int64)
    if mode == "constant":
        return np.where((i >= 0) & (i < size), i, -1)
    if mode == "reflect":
        if size == 1:
            return np.zeros_like(i)
        period = 2 * (size - 1)
        j = np.mod(i, period)
        return np.where(j >= size, period - j, j)
    if mode == "symmetric":
        period = 2 * size
        j = np.mod(i, period)
        return np.where(j >= size, period - 1 - j, j)
    raise PlanError(f"pad_mode must be 'reflect', 'symmetric' or 'constant'; got {mode!r}.")


def default_step(tile: int) -> int:
    """PSPNet's sliding-window step: ⌈2/3 · crop⌉."""
    return -(-2 * tile // 3)


def check_sliding(
    facts: TilingFacts, *, tile: int, halo: int | None, step: int | None, arch: str
) -> int:
    """Check a ``stitch: sliding`` choice; return the window step to use.

    The sliding window is PSPNet's own evaluation (``scale_process.m``): fixed windows (the crop,
    ``tile`` output pixels) every ``step`` pixels (default ⌈2/3 · tile⌉), the last one moved back
    to end at the image border, and the probabilities of overlapping windows averaged. The window
    must be a size the network takes; no halo applies (the window is the crop).
    """
    if halo is not None:
        raise PlanError(
            f"halo has no meaning with stitch: sliding (each window is a fixed crop of tile "
            f"pixels); got halo {halo}. Remove tiling.halo, or use stitch: blend."
        )
    window = tile + 2 * facts.margin
    if not facts.size_rule.is_valid(window):
        rule = facts.size_rule
        hi = rule.ceil(window)  # the valid sizes either side of an invalid one
        lo = max(rule.minimum, hi - rule.step)
        raise PlanError(
            f"with stitch: sliding the window (tile + 2 x margin = {window}) must be an input "
            f"size that arch '{arch}' takes ({rule.minimum} + k x {rule.step}); got tile {tile}. "
            f"Use tile: {lo - 2 * facts.margin} or {hi - 2 * facts.margin}."
        )
    if step is not None and not 1 <= step <= tile:
        raise PlanError(
            f"tiling.step must be between 1 and the tile ({tile}) so that windows overlap or "
            f"touch; got {step}. Use step: {default_step(tile)} (2/3 of the tile, as in PSPNet)."
        )
    return default_step(tile) if step is None else step


@dataclass(frozen=True)
class SlidingAxis:
    """Sliding-window placement along one axis (``stitch: sliding``).

    Window ``k`` predicts output pixels ``[t_k, t_k + tile)`` with ``t_k = min(k * step,
    size - tile)`` — PSPNet's ``scale_process.m`` moves the last window back to end at the border.
    An image shorter than the tile gets one window, padded past its end. The placement depends
    only on the image size, so units cut anywhere see the same windows.
    """

    size: int
    tile: int
    step: int
    margin: int

    @property
    def window(self) -> int:
        """Input pixels of every window."""
        return self.tile + 2 * self.margin

    @property
    def halo(self) -> int:
        """Context guaranteed per side: only what the network itself consumes (the margin)."""
        return self.margin

    @property
    def cores(self) -> int:
        """Number of windows along the axis."""
        if self.size <= self.tile:
            return 1
        return -(-(self.size - self.tile) // self.step) + 1

    def output_origin(self, k: int) -> int:
        """Image coordinate of the first output pixel of window ``k``."""
        return max(0, min(k * self.step, self.size - self.tile))

    def origin(self, k: int) -> int:
        """Image coordinate of the first input pixel of window ``k`` (may be negative)."""
        return self.output_origin(k) - self.margin

    def support(self, k: int) -> tuple[int, int]:
        """Output pixels (inside the image) that window ``k`` predicts."""
        t = self.output_origin(k)
        return t, min(self.size, t + self.tile)

    def windows_for(self, u0: int, u1: int) -> range:
        """The windows whose support intersects output pixels ``[u0, u1)``."""
        ks = [k for k in self._candidates(u0, u1) if self._hits(k, u0, u1)]
        return range(ks[0], ks[-1] + 1)

    def _candidates(self, u0: int, u1: int) -> range:
        # Up to the last window: it is moved back to end at the border, so it may start before
        # k * step and reach into units that windows k * step would not.
        first = max(0, (u0 - self.tile) // self.step)
        return range(first, self.cores)

    def _hits(self, k: int, u0: int, u1: int) -> bool:
        s0, s1 = self.support(k)
        return s0 < u1 and s1 > u0

    def read_range(self, u0: int, u1: int) -> tuple[int, int]:
        """Input pixels read once for output ``[u0, u1)``."""
        ks = self.windows_for(u0, u1)
        return self.origin(ks[0]), self.origin(ks[-1]) + self.window

    def computed_pixels(self, u0: int, u1: int) -> int:
        """Input pixels pushed through the network for output ``[u0, u1)`` along this axis."""
        return len(self.windows_for(u0, u1)) * self.window


def sliding_axis(facts: TilingFacts, *, size: int, tile: int, step: int) -> SlidingAxis:
    """Plan the sliding windows along one axis (tile and step already checked)."""
    if size < 1:
        raise PlanError(f"the image must have at least one pixel along each axis; got {size}.")
    return SlidingAxis(size, tile, step, facts.margin)
