"""In-process overlap-tile inference: :func:`predict_array`.

It runs the very engine the Ray workers run (:class:`~tilewise.pipeline.engine.TileEngine`), unit
by unit, and keeps the result in memory, for notebooks, tests and images that fit in RAM.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tilewise.errors import InputError, PlanError
from tilewise.models.registry import SizeRule, TilingFacts
from tilewise.pipeline.engine import TileEngine, TilePlan
from tilewise.pipeline.geometry import PadMode, Stitch
from tilewise.pipeline.units import UnitGrid
from tilewise.spec import resolve_batch_size

__all__ = ["ArraySource", "default_device", "predict_array", "probe_size_rule"]


class ArraySource:
    """A (C, H, W) numpy or Zarr array as an engine source."""

    def __init__(self, array: Any) -> None:
        if len(array.shape) != 3:
            raise InputError(
                f"image must be a (C, H, W) array; got shape {tuple(array.shape)}. "
                f"Add a channel axis, e.g. image[None] for a single band."
            )
        self.array = array
        c, h, w = (int(n) for n in array.shape)
        self._shape = (c, h, w)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return self._shape

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[:, y0:y1, x0:x1]``."""
        return np.asarray(self.array[:, y0:y1, x0:x1])


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def probe_size_rule(
    model: nn.Module,
    *,
    in_channels: int,
    stride: int,
    margin: int,
    start: int,
    device: torch.device,
) -> SizeRule:
    """Find the valid window sizes of a module that declares none, by trying sizes from ``start``.

    A size is valid when the module maps ``n`` input pixels to ``n - 2 * margin``; valid sizes
    repeat with the stride, so the first valid size and the stride give the rule.
    """
    first = -(-start // stride) * stride if margin == 0 else start
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    for n in range(first, first + 4 * stride + 1):
        try:
            with torch.inference_mode():
                y = model(torch.zeros(1, in_channels, n, n, device=device, dtype=dtype))
        except RuntimeError:
            continue
        if tuple(y.shape[-2:]) == (n - 2 * margin,) * 2:
            return SizeRule(minimum=n, step=stride)
    raise PlanError(
        f"found no window size near {start} px that the module maps to n - 2*margin "
        f"(margin {margin}, stride {stride}). Check the stride and margin you gave."
    )


def _module_facts(
    model: nn.Module, stride: int | None, margin: int | None, halo: int | None
) -> TilingFacts | None:
    declared = getattr(model, "tiling", None)
    if isinstance(declared, TilingFacts):
        for name, given, known in (
            ("stride", stride, declared.stride),
            ("margin", margin, declared.margin),
        ):
            if given is not None and given != known:
                raise PlanError(
                    f"{name} ({given}) contradicts the model's declared {name} {known}; "
                    f"got {given}. Leave {name} out for a registered model."
                )
        return declared
    return None


def predict_array(
    model: nn.Module,
    image: Any,
    *,
    tile: int,
    halo: int | None = None,
    stride: int | None = None,
    margin: int | None = None,
    stitch: Stitch = "crop",
    pad_mode: PadMode = "reflect",
    pad_value: float = 0.0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    unit: int | None = None,
    step: int | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Segment an in-memory image by overlap-tile inference.

    Args:
        model: a registered tilewise model (its tiling facts are known) or any ``torch.nn.Module``,
            whose facts are then given here.
        image: a (C, H, W) numpy or Zarr array, already normalised as the network expects.
        tile: output pixels per window side (a multiple of the network's stride).
        halo: context per side; defaults to the model's exact halo (required for plain modules).
        stride: total down-sampling of a plain module (default 1).
        margin: pixels a plain valid-convolution module loses per side (default 0).
        stitch: ``"crop"`` (exact), ``"blend"`` (cross-faded windows, weights summing to one) or
            ``"sliding"`` (PSPNet's evaluation: fixed windows of ``tile`` output pixels every
            ``step`` pixels, probabilities averaged; no halo).
        pad_mode: border padding against the whole image: ``reflect`` (U-Net), ``symmetric``
            or ``constant`` (``pad_value``).
        batch_size: windows per forward pass (default: 4 on CUDA, 1 on the CPU, as in jobs).
        device: where the network runs (default: CUDA when available).
        unit: side of the in-memory write units (default: the tile rounded up to >= 1024 px).
        step: sliding-window step (default 2/3 of the tile); ``stitch="sliding"`` only.
        flip: add the scores of the horizontally flipped window (PSPNet); sliding only.

    Returns:
        (K, H, W) float32 scores.
    """
    source = ArraySource(image)
    channels, height, width = source.shape
    dev = torch.device(device) if device is not None else default_device()
    was_training = model.training
    model.to(dev).eval()
    try:
        facts = _module_facts(model, stride, margin, halo)
        if facts is None:
            if halo is None and stitch != "sliding":  # a sliding window is its own context
                raise PlanError(
                    "halo is required for a module without tiling facts: give the context per "
                    "side that the network's receptive field needs (e.g. halo=64)."
                )
            s, m = stride or 1, margin or 0
            h = max(halo or 0, m)
            lead = m + -(-(h - m) // s) * s
            rule = probe_size_rule(
                model,
                in_channels=channels,
                stride=s,
                margin=m,
                start=lead + min(tile, 64) + h,
                device=dev,
            )
            facts = TilingFacts(stride=s, margin=m, halo=h, size_rule=rule)
        plan = TilePlan.build(
            facts,
            height=height,
            width=width,
            tile=tile,
            halo=halo,
            stitch=stitch,
            pad_mode=pad_mode,
            pad_value=pad_value,
            arch=type(model).__name__,
            step=step,
            flip=flip,
        )
        batch = resolve_batch_size(batch_size, dev.type)
        engine = TileEngine(model, plan, batch_size=batch, device=dev)
        side = unit or plan.y.tile * max(1, -(-1024 // plan.y.tile))
        grid = UnitGrid(height, width, side)
        result: np.ndarray | None = None
        for u in grid:
            scores = engine.predict_unit(source, u)
            if result is None:
                result = np.empty((scores.shape[0], height, width), np.float32)
            result[:, u.y0 : u.y1, u.x0 : u.x1] = scores
        assert result is not None
        return result
    finally:
        model.train(was_training)
