"""Tests of tilewise.training (shards, samplers, augmentation, loader), and their test data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def shapes_label(height: int, width: int) -> np.ndarray:
    """Labels from simple shapes: background 0, a rectangle of 1, a disc of 2, an ignored strip."""
    yy, xx = np.mgrid[:height, :width]
    label = np.zeros((height, width), np.uint8)
    label[height // 8 : height // 2, width // 8 : width // 2] = 1
    label[
        (yy - 3 * height // 4) ** 2 + (xx - 3 * width // 4) ** 2 < (min(height, width) // 8) ** 2
    ] = 2
    label[:, width - 2 :] = 255
    return label


def write_shard(
    path: Path | str,
    image: np.ndarray,
    label: np.ndarray,
    weight: np.ndarray | None = None,
    chunks: int = 32,
) -> str:
    """A shard group (image, label, optional weight) in Zarr v3; returns its location."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array("image", data=image, chunks=(*image.shape[:-2], chunks, chunks))
    group.create_array("label", data=label, chunks=(chunks, chunks))
    if weight is not None:
        group.create_array("weight", data=weight, chunks=(chunks, chunks))
    return str(path)


def make_shard(
    path: Path | str,
    shape: tuple[int, int, int] = (3, 64, 80),
    seed: int = 0,
    weight: bool = False,
    chunks: int = 32,
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """A random uint8 image with :func:`shapes_label` labels (and a random weight map)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    label = shapes_label(shape[1], shape[2])
    w = rng.random(shape[1:]).astype(np.float32) + 0.5 if weight else None
    return write_shard(path, image, label, w, chunks), image, label, w
