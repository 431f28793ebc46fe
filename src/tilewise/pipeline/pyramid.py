"""Multiscale pyramids of an output, built from the streamed output.

Level ``k`` halves level ``k - 1``: labels by the mode of each 2 x 2 block, probabilities by its
mean. Because every level is reduced from the level above *as stored*, a level built unit by unit
(by the actor that wrote the unit, "streamed") equals the same level built from the whole level
above: a unit's origin is a multiple of ``2**k`` at every streamed level, and a unit at the image's
edge pads exactly as the whole level does there (edge replication of its real pixels).

Streamed levels keep one writer per chunk: level ``k`` is chunked ``chunk / 2**k``, so a unit owns
whole chunks at every streamed level. Coarser levels (chunks would get too small to be worth a
file each) are built by the driver at the end of the run from the last streamed level, block by
block, in bounded memory.

A predictor reduces its unit's streamed levels on the device (``reduce_tensor``), next to the
network, and the driver reduces the coarse levels on the host (``reduce_unit``). Both compute the
same arithmetic in the same order, so they give the same bytes (tested).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "MIN_STREAMED_CHUNK",
    "auto_levels",
    "build_level",
    "downsample_mean",
    "downsample_mode",
    "level_shapes",
    "level_transforms",
    "reduce_tensor",
    "reduce_unit",
    "streamed_levels",
    "unit_levels",
]

# Smallest chunk side of a level written unit by unit: below it, a file per chunk costs more
# than reducing the level at the end (a 128^2 uint8 chunk is 16 KB before compression).
MIN_STREAMED_CHUNK = 128
MAX_LEVELS = 16


def _pad_even(a: np.ndarray) -> np.ndarray:
    # Edge replication keeps a half block's mean exact and its mode that of its real pixels.
    pad = [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)]
    return np.pad(a, pad, mode="edge") if any(p for _, p in pad) else a


def _pad_even_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.shape[-2] % 2:
        t = torch.cat([t, t[..., -1:, :]], dim=-2)
    if t.shape[-1] % 2:
        t = torch.cat([t, t[..., -1:]], dim=-1)
    return t


def _mode(tl: Any, tr: Any, bl: Any, br: Any, where: Any) -> Any:
    # Of four values, the first one that occurs twice or more is the most frequent one that
    # comes first (two pairs tie, and the earlier pair wins); with none repeated, the first.
    best = where(bl == br, bl, tl)
    best = where((tr == bl) | (tr == br), tr, best)
    return where((tl == tr) | (tl == bl) | (tl == br), tl, best)


def downsample_mode(a: np.ndarray) -> np.ndarray:
    """2x reduction of labels: the most frequent of each 2x2 block (ties: first in the order
    top-left, top-right, bottom-left, bottom-right); odd edges keep their real pixels' mode."""
    a = _pad_even(a)
    return _mode(
        a[..., 0::2, 0::2], a[..., 0::2, 1::2], a[..., 1::2, 0::2], a[..., 1::2, 1::2], np.where
    )


def downsample_mean(a: np.ndarray) -> np.ndarray:
    """2x reduction of probabilities: the mean of each 2x2 block (rounded for integers), as
    ``((top-left + top-right) + (bottom-left + bottom-right)) / 4`` in float32."""
    a = _pad_even(a)
    f = a.astype(np.float32)
    m = (f[..., 0::2, 0::2] + f[..., 0::2, 1::2]) + (f[..., 1::2, 0::2] + f[..., 1::2, 1::2])
    m *= 0.25
    if np.issubdtype(a.dtype, np.integer):
        return np.rint(m).astype(a.dtype)
    return m.astype(a.dtype)


def reduce_tensor(t: torch.Tensor, labels: bool) -> torch.Tensor:
    """``reduce_unit`` on a tensor (on its device), byte for byte: the mode of labels (uint8, or
    int32 standing for uint16), the mean of float16 or uint8 probabilities."""
    t = _pad_even_tensor(t)
    tl, tr, bl, br = t[..., 0::2, 0::2], t[..., 0::2, 1::2], t[..., 1::2, 0::2], t[..., 1::2, 1::2]
    if labels:
        return _mode(tl, tr, bl, br, torch.where)
    f = [v.float() for v in (tl, tr, bl, br)]
    m = ((f[0] + f[1]) + (f[2] + f[3])) * 0.25
    if not t.is_floating_point():
        m = torch.round(m)  # half to even, as numpy's rint
    return m.to(t.dtype)


def level_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """(height, width) of levels ``0 .. levels - 1``, each half the one above, rounded up."""
    shapes = [(height, width)]
    for _ in range(levels - 1):
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def auto_levels(height: int, width: int, chunk: int) -> int:
    """Levels until the coarsest fits one chunk (a viewer's overview), at most 16."""
    levels, side = 1, max(height, width)
    while side > chunk and levels < MAX_LEVELS:
        side, levels = -(-side // 2), levels + 1
    return levels


def streamed_levels(unit: int, levels: int) -> int:
    """How many levels after level 0 each unit writes itself (the rest are built at the end):
    those whose unit side stays a whole number of pixels of at least ``MIN_STREAMED_CHUNK``."""
    k = 0
    while k + 1 < levels and unit % 2 ** (k + 1) == 0 and unit >> (k + 1) >= MIN_STREAMED_CHUNK:
        k += 1
    return k


def level_transforms(levels: int, base: list[float]) -> list[tuple[list[float], list[float]]]:
    """Per level: pixel pitch (y, x) and the offset of pixel (0, 0)'s centre from level 0's,
    in the units of ``base`` (level 0's pitch). A 2 x 2 block's centre lies half a pixel of the
    level above past its first pixel's, so level ``k`` is shifted by ``(2**k - 1) / 2`` pixels."""
    return [
        (
            [base[0] * 2**k, base[1] * 2**k],
            [base[0] * (2**k - 1) / 2, base[1] * (2**k - 1) / 2],
        )
        for k in range(levels)
    ]


def reduce_unit(block: np.ndarray, labels: bool) -> np.ndarray:
    """One 2x reduction of a unit's (or a block's) stored pixels."""
    return downsample_mode(block) if labels else downsample_mean(block)


def unit_levels(level0: Any, streamed: int, *, labels: bool) -> list[Any]:
    """``[level0, level0 reduced once, ...]``: level 0 and the ``streamed`` levels a unit writes,
    each reduced from the one before; numpy arrays on the host (:func:`reduce_unit`), tensors
    where they are (:func:`reduce_tensor`)."""
    reduce = reduce_tensor if isinstance(level0, torch.Tensor) else reduce_unit
    levels = [level0]
    for _ in range(streamed):
        levels.append(reduce(levels[-1], labels))
    return levels


def build_level(source: Any, target: Any, labels: bool, *, block: int = 2048) -> None:
    """Write ``target`` (level k) as the 2x reduction of ``source`` (level k - 1), reading
    ``2 * block`` source pixels square at a time (even offsets, so blocks reduce independently)."""
    height, width = target.shape[-2:]
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            y1, x1 = min(height, y0 + block), min(width, x0 + block)
            src = np.asarray(source[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1])
            target[..., y0:y1, x0:x1] = reduce_unit(src, labels)


def spatial_attributes(
    transform: list[float], shape: tuple[int, int], factor: float
) -> dict[str, Any]:
    """``spatial:`` attributes of a level whose pixels are ``factor`` level-0 pixels wide, from
    level 0's affine ``transform`` (a, b, c, d, e, f as rasterio's)."""
    a, b, c, d, e, f = transform
    scaled = [a * factor, b * factor, c, d * factor, e * factor, f]
    h, w = shape
    xs = [c + a * factor * col + b * factor * row for row, col in ((0, 0), (0, w), (h, 0), (h, w))]
    ys = [f + d * factor * col + e * factor * row for row, col in ((0, 0), (0, w), (h, 0), (h, w))]
    return {
        "spatial:dimensions": ["y", "x"],
        "spatial:transform": scaled,
        "spatial:shape": [h, w],
        "spatial:bbox": [min(xs), min(ys), max(xs), max(ys)],
        # GDAL hands out PixelIsPoint files' transforms already shifted to pixel corners.
        "spatial:registration": "pixel",
    }
