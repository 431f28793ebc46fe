"""The overlap-tile engine: one write unit in, its stitched scores out.

The same :class:`TileEngine` runs inside the Ray predictor actors and behind
:func:`tilewise.predict_array`; there is no second implementation. Per write unit it reads the unit
plus its halo once (mirror-padded against the whole image), cuts the model windows out of that
buffer, runs them in batches, and crops (exact) or cross-fades (blend) their outputs into the unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from tilewise.errors import PlanError
from tilewise.models.ensemble import log_probabilities, probabilities
from tilewise.models.registry import TilingFacts
from tilewise.pipeline.geometry import (
    AxisGeometry,
    PadMode,
    SlidingAxis,
    Stitch,
    axis_geometry,
    blend_weights,
    check_tiling,
    default_step,
    sliding_axis,
    source_indices,
)

__all__ = ["ImageSource", "TileEngine", "TilePlan", "Unit", "read_padded"]


class ImageSource(Protocol):
    """Anything that reads in-bounds (C, h, w) blocks of a (C, H, W) image."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        ...

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[:, y0:y1, x0:x1]``, all inside the image."""
        ...


@dataclass(frozen=True)
class Unit:
    """A write unit: output pixels ``[y0, y1) × [x0, x1)``, written by exactly one task."""

    index: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def pixels(self) -> int:
        """Output pixels of the unit."""
        return (self.y1 - self.y0) * (self.x1 - self.x0)


@dataclass(frozen=True)
class TilePlan:
    """Window geometry of a whole image: the product of two :class:`AxisGeometry`."""

    facts: TilingFacts
    y: AxisGeometry | SlidingAxis
    x: AxisGeometry | SlidingAxis
    stitch: Stitch
    pad_mode: PadMode
    pad_value: float
    flip: bool = False

    @classmethod
    def build(
        cls,
        facts: TilingFacts,
        *,
        height: int,
        width: int,
        tile: int,
        halo: int | None,
        stitch: Stitch = "crop",
        pad_mode: PadMode = "reflect",
        pad_value: float = 0.0,
        arch: str = "model",
        step: int | None = None,
        flip: bool = False,
    ) -> TilePlan:
        """Check the tiling rules and lay out the windows of an ``height × width`` image.

        ``step`` and ``flip`` belong to ``stitch: sliding`` (PSPNet's evaluation): the window
        step (default 2/3 of the tile) and the horizontal-flip averaging of each window's scores.
        """
        source_indices(0, 1, 1, pad_mode)  # rejects an unknown pad mode before any work
        h = check_tiling(
            facts, tile=tile, halo=halo, stitch=stitch, arch=arch, step=step, flip=flip
        )
        if stitch == "sliding":
            st = step or default_step(tile)
            sy = sliding_axis(facts, size=height, tile=tile, step=st)
            sx = sliding_axis(facts, size=width, tile=tile, step=st)
            return cls(facts, sy, sx, stitch, pad_mode, pad_value, flip)
        y = axis_geometry(facts, size=height, tile=tile, halo=h, stitch=stitch)
        x = axis_geometry(facts, size=width, tile=tile, halo=h, stitch=stitch)
        return cls(facts, y, x, stitch, pad_mode, pad_value)

    def windows(self, unit: Unit) -> list[tuple[int, int]]:
        """Window indices ``(ky, kx)`` that a unit computes, in a fixed row-major order."""
        return [
            (ky, kx)
            for ky in self.y.windows_for(unit.y0, unit.y1)
            for kx in self.x.windows_for(unit.x0, unit.x1)
        ]

    def computed_pixels(self, unit: Unit) -> int:
        """Input pixels the network processes for ``unit``."""
        return self.y.computed_pixels(unit.y0, unit.y1) * self.x.computed_pixels(unit.x0, unit.x1)


def _axis_read(start: int, stop: int, size: int, mode: PadMode) -> tuple[int, int, np.ndarray]:
    """Bounding source range of ``[start, stop)`` and the index map into it (-1 = constant)."""
    idx = source_indices(start, stop, size, mode)
    inside = idx[idx >= 0]
    if inside.size == 0:
        return 0, 0, idx
    lo, hi = int(inside.min()), int(inside.max()) + 1
    return lo, hi, np.where(idx >= 0, idx - lo, -1)


def read_padded(
    source: ImageSource,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    *,
    mode: PadMode,
    value: float = 0.0,
) -> np.ndarray:
    """Read image coordinates ``[y0, y1) × [x0, x1)`` as if the whole image were padded first.

    Only the in-image bounding box is read from the source (once); the padding is a gather.
    """
    _, height, width = source.shape
    if y0 >= 0 and y1 <= height and x0 >= 0 and x1 <= width:
        return source.read(y0, y1, x0, x1)
    ylo, yhi, yi = _axis_read(y0, y1, height, mode)
    xlo, xhi, xi = _axis_read(x0, x1, width, mode)
    block = source.read(ylo, yhi, xlo, xhi) if yhi > ylo and xhi > xlo else None
    if block is None:
        return np.full((source.shape[0], y1 - y0, x1 - x0), value)
    out = block[:, np.maximum(yi, 0)][:, :, np.maximum(xi, 0)]
    if mode == "constant":
        outside = (yi < 0)[:, None] | (xi < 0)[None, :]
        if outside.any():
            out = out.astype(np.result_type(out.dtype, np.min_scalar_type(value)), copy=True)
            out[:, outside] = value
    return out


def _batches(items: Sequence[tuple[int, int]], size: int) -> Iterator[Sequence[tuple[int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


Preprocess = Callable[[torch.Tensor], torch.Tensor]


class TileEngine:
    """Predicts write units of one image with one network.

    A unit goes through two steps, so that a caller can read the next unit while this one
    computes: :meth:`read_unit` (the unit plus its halo, raw pixels, on the host) and
    :meth:`compute_unit` (everything else on the device: normalisation, cutting windows,
    batched forward passes, stitching in float32). :meth:`predict_unit` does both.

    Args:
        model: the network (put in eval mode here; BN uses its running statistics, dropout off).
        plan: the window geometry.
        batch_size: windows per forward pass.
        device: where the network runs.
        preprocess: maps a raw (C, h, w) tensor to float32 network input (normalisation) on the
            device; applied after padding so that padded pixels are normalised exactly like
            image pixels.
        precision: ``torch.bfloat16``/``torch.float16`` run the forward passes under autocast
            (AMP); scores are stitched in float32 either way. ``None`` = the model's own dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: TilePlan,
        *,
        batch_size: int = 4,
        device: torch.device | str = "cpu",
        preprocess: Preprocess | None = None,
        precision: torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise PlanError(f"batch_size must be at least 1; got {batch_size}.")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # Windows take the network's own float type (float64 nets give float64 exactness checks).
        first = next(iter(model.parameters()), None)
        self.dtype = first.dtype if first is not None and first.is_floating_point() else None
        self.plan = plan
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.precision = precision if precision not in (None, torch.float32) else None
        self._weights_y: dict[int, torch.Tensor] = {}
        self._weights_x: dict[int, torch.Tensor] = {}

    def _autocast(self) -> AbstractContextManager[object]:
        if self.precision is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.precision)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Scores of a (B, C, n, n) batch as (B, K, n - 2m, n - 2m) float32, on the device.

        With ``plan.flip`` the scores are PSPNet's ``score(x) + flip(score(flip(x)))``
        (horizontal flip), summed before the softmax as in ``scale_process.m``. With
        ``stitch: sliding`` the windows' probabilities are returned, since those are averaged.
        """
        with torch.inference_mode(), self._autocast():
            x = windows.to(self.device, self.dtype) if self.dtype else windows.to(self.device)
            scores = self.model(x)
            if self.plan.flip:
                scores = scores + self.model(x.flip(-1)).flip(-1)
        scores = scores.float()
        if self.plan.stitch == "sliding":
            scores = probabilities(scores)
        return scores

    def read_unit(self, source: ImageSource, unit: Unit) -> np.ndarray:
        """The raw pixels a unit needs: the unit plus its halo, padded against the whole image."""
        plan = self.plan
        ry0, ry1 = plan.y.read_range(unit.y0, unit.y1)
        rx0, rx1 = plan.x.read_range(unit.x0, unit.x1)
        return read_padded(source, ry0, ry1, rx0, rx1, mode=plan.pad_mode, value=plan.pad_value)

    def to_device(self, raw: np.ndarray) -> torch.Tensor:
        """A read unit on the device; through pinned memory (an asynchronous copy) on CUDA."""
        t = torch.from_numpy(np.ascontiguousarray(raw))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def compute_unit(self, raw: np.ndarray | torch.Tensor, unit: Unit) -> torch.Tensor:
        """Stitched (K, h, w) float32 scores of ``unit`` from its read pixels, on the device."""
        t = raw if isinstance(raw, torch.Tensor) else self.to_device(raw)
        with torch.inference_mode():
            buf = self.preprocess(t) if self.preprocess is not None else t
            buf = buf.to(torch.float32)
            return self._stitch(buf, unit)

    def predict_unit(self, source: ImageSource, unit: Unit) -> np.ndarray:
        """Stitched (K, h, w) float32 scores of ``unit``, on the host."""
        return self.compute_unit(self.read_unit(source, unit), unit).cpu().numpy()

    def _stitch(self, buf: torch.Tensor, unit: Unit) -> torch.Tensor:
        plan = self.plan
        ry0, _ = plan.y.read_range(unit.y0, unit.y1)
        rx0, _ = plan.x.read_range(unit.x0, unit.x1)
        ny, nx = plan.y.window, plan.x.window
        out_y, out_x = ny - 2 * plan.facts.margin, nx - 2 * plan.facts.margin
        uh, uw = unit.y1 - unit.y0, unit.x1 - unit.x0
        acc: torch.Tensor | None = None
        sliding = plan.stitch == "sliding"
        wsum = (
            torch.zeros((uh, uw), dtype=torch.float32, device=self.device)
            if plan.stitch != "crop"
            else None
        )
        for batch in _batches(plan.windows(unit), self.batch_size):
            # Windows are cut on the device: only the unit buffer crossed the bus.
            stack = torch.stack(
                [
                    buf[
                        :,
                        plan.y.origin(ky) - ry0 : plan.y.origin(ky) - ry0 + ny,
                        plan.x.origin(kx) - rx0 : plan.x.origin(kx) - rx0 + nx,
                    ]
                    for ky, kx in batch
                ]
            )
            scores = self.forward(stack)
            if tuple(scores.shape[-2:]) != (out_y, out_x):
                raise PlanError(
                    f"the network turned a {ny}x{nx} window into {scores.shape[-2]}x"
                    f"{scores.shape[-1]} scores, but its margin {plan.facts.margin} says "
                    f"{out_y}x{out_x}. Give the margin (pixels lost per side) that the network has."
                )
            if acc is None:
                acc = torch.zeros(
                    (scores.shape[1], uh, uw), dtype=torch.float32, device=self.device
                )
            for (ky, kx), s in zip(batch, scores, strict=True):
                if wsum is None:
                    self._place_core(acc, s, unit, ky, kx)
                else:
                    self._place_blend(acc, wsum, s, unit, ky, kx)
            del stack, scores, s  # not alive during the next batch's forward pass
        assert acc is not None  # every unit has at least one window
        if wsum is not None:
            acc /= wsum
        if sliding:
            # Averaged probabilities go back to scores whose softmax (sigmoid) is exactly them,
            # so labels and stored probabilities follow from one representation.
            return log_probabilities(acc[None])[0]
        return acc

    def _place_core(self, acc: torch.Tensor, s: torch.Tensor, unit: Unit, ky: int, kx: int) -> None:
        p = self.plan
        assert isinstance(p.y, AxisGeometry) and isinstance(p.x, AxisGeometry)
        cy0, cy1 = p.y.core(ky)
        cx0, cx1 = p.x.core(kx)
        y0, y1 = max(cy0, unit.y0), min(cy1, unit.y1)
        x0, x1 = max(cx0, unit.x0), min(cx1, unit.x1)
        oy, ox = p.y.output_origin(ky), p.x.output_origin(kx)
        acc[:, y0 - unit.y0 : y1 - unit.y0, x0 - unit.x0 : x1 - unit.x0] = s[
            :, y0 - oy : y1 - oy, x0 - ox : x1 - ox
        ]

    def _axis_weights(
        self, axis: AxisGeometry | SlidingAxis, k: int, cache: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        if k not in cache:
            cache[k] = torch.from_numpy(_weights(axis, k)).to(self.device)
        return cache[k]

    def _place_blend(
        self,
        acc: torch.Tensor,
        wsum: torch.Tensor,
        s: torch.Tensor,
        unit: Unit,
        ky: int,
        kx: int,
    ) -> None:
        p = self.plan
        sy0, sy1 = p.y.support(ky)
        sx0, sx1 = p.x.support(kx)
        wy = self._axis_weights(p.y, ky, self._weights_y)
        wx = self._axis_weights(p.x, kx, self._weights_x)
        y0, y1 = max(sy0, unit.y0), min(sy1, unit.y1)
        x0, x1 = max(sx0, unit.x0), min(sx1, unit.x1)
        if y0 >= y1 or x0 >= x1:
            return
        w = torch.outer(wy[y0 - sy0 : y1 - sy0], wx[x0 - sx0 : x1 - sx0])
        oy, ox = p.y.output_origin(ky), p.x.output_origin(kx)
        acc[:, y0 - unit.y0 : y1 - unit.y0, x0 - unit.x0 : x1 - unit.x0] += (
            w * s[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        )
        wsum[y0 - unit.y0 : y1 - unit.y0, x0 - unit.x0 : x1 - unit.x0] += w


def _weights(axis: AxisGeometry | SlidingAxis, k: int) -> np.ndarray:
    """Blend weights of window ``k``; sliding windows are plainly averaged (weight one)."""
    if isinstance(axis, SlidingAxis):
        s0, s1 = axis.support(k)
        return np.ones(s1 - s0, np.float32)
    return blend_weights(axis, k)
