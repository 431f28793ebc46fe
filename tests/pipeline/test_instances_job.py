"""`output.instances` in predict jobs: the stage runs after the units, before the output is
marked complete, and its objects are the connected components of the written class map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import zarr
from scipy import ndimage

from tests.conftest import write_input
from tilewise.cli import main
from tilewise.errors import ConfigError
from tilewise.pipeline.driver import run_job
from tilewise.spec import parse_job


def _job(tmp_path: Path, chunk: int = 128, **instances: Any) -> dict[str, Any]:
    return {
        "kind": "predict",
        "input": {"path": str(tmp_path / "in.zarr")},
        "model": {
            "arch": "unet_same",
            "num_classes": 3,
            "args": {"depth": 2, "base_width": 4},
            "class_names": ["background", "a", "b"],
        },
        "tiling": {"tile": 64},
        "output": {"path": str(tmp_path / "out.zarr"), "chunk": chunk, "instances": instances},
    }


def _smooth_input(path: Path, shape: tuple[int, int, int], seed: int) -> None:
    # Smooth bands give the random network's class map regions rather than speckle.
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=shape)
    data = ndimage.gaussian_filter(noise, sigma=(0, 6, 6))
    data = (data - data.min()) / (data.max() - data.min()) * 255
    zarr.create_array(path, data=data.astype(np.uint8), chunks=(3, 64, 64),
                      dimension_names=("c", "y", "x"))  # fmt: skip


@pytest.mark.usefixtures("ray_cluster")
def test_instances_are_the_components_of_the_written_labels(tmp_path: Path) -> None:
    _smooth_input(tmp_path / "in.zarr", (3, 260, 300), seed=1)
    job = parse_job(_job(tmp_path, halo=256, connectivity=2))
    report = run_job(job, workers=2, progress=False)
    root = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert root.attrs["tilewise"]["status"] == "complete"
    assert report.instances is not None and report.instances["objects"] > 3
    labels, inst = root["labels/0"][:], root["instances/0"][:]
    # Reference: 8-connected components of classes 1 and 2 of the written class map.
    expected: list[np.ndarray] = []
    for c in (1, 2):
        comp, n = ndimage.label(labels == c, structure=np.ones((3, 3)))
        expected += [comp == k for k in range(1, n + 1)]
    assert report.instances["objects"] == len(expected) == inst.max()
    for mask in expected:
        ids = np.unique(inst[mask])
        assert len(ids) == 1 and ids[0] > 0  # one id, not split
        assert np.array_equal(inst == ids[0], mask)  # and nothing else has it
    assert np.array_equal(inst > 0, labels > 0)
    table = ds.dataset(tmp_path / "out.zarr" / "instances.parquet").to_table().to_pandas()
    assert sorted(table["id"]) == list(range(1, len(expected) + 1))
    row = table.iloc[0]
    mask = inst == row["id"]
    assert row["area"] == mask.sum() and row["class_name"] in ("a", "b")
    assert "objects" in "\n".join(report.lines())


@pytest.mark.usefixtures("ray_cluster")
def test_an_object_larger_than_the_halo_is_a_clear_error_and_the_output_is_not_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _smooth_input(tmp_path / "in.zarr", (3, 260, 300), seed=1)
    import yaml

    # Units of 64 px seen through 1 px: the class map's larger regions cross unit borders.
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_job(tmp_path, chunk=64, halo=1)))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs a halo larger than 1 px" in err and "Traceback" not in err
    root = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert root.attrs["tilewise"]["status"] != "complete"
    # Raising the halo finishes the same output without predicting it again.
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_job(tmp_path, chunk=64, halo=256)))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "0 computed" in out and "objects" in out
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["tilewise"]["status"] == (
        "complete"
    )


def test_instances_settings_are_checked(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    bad = _job(tmp_path, classes=[0, 5])
    bad["output"]["labels"] = None
    bad["output"]["probabilities"] = "uint8"
    with pytest.raises(ConfigError) as info:
        parse_job(bad)
    text = str(info.value)
    assert "labels is null" in text and "got [0, 5]" in text
