"""Job expansion and preparation: where outputs may go, globs over a job's own outputs, images
smaller than the tile, 5-D OME-Zarr inputs, and the messages for inputs that do not fit."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import write_input, write_ome5d
from tests.reference import whole_image
from tilewise import models
from tilewise.errors import ConfigError
from tilewise.pipeline.driver import run_job
from tilewise.pipeline.job import build_model, default_chunk, expand_images, prepare
from tilewise.pipeline.plan import plan_job
from tilewise.spec import parse_job

MODEL: dict[str, Any] = {
    "arch": "unet_same",
    "num_classes": 3,
    "seed": 3,
    "args": {"depth": 2, "base_width": 4},
}


def _job(input_path: Any, output_path: str, **changes: Any) -> Any:
    data: dict[str, Any] = {
        "kind": "predict",
        "name": "t",
        "input": {"path": input_path},
        "model": dict(MODEL),
        "tiling": {"tile": 32, "batch_size": 3},
        "output": {"path": output_path, "labels": "uint8", "probabilities": "float16"},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return parse_job(data)


def _digest(store: Path) -> str:
    """Checksum of every file of a store, names included."""
    h = hashlib.sha256()
    for f in sorted(store.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(store).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _pixels(out: Path) -> str:
    """Checksum of an output's arrays and its done record (not the root attributes)."""
    return "".join(_digest(out / part) for part in ("labels", "probabilities", ".tilewise"))


def _expected(image: np.ndarray, in_channels: int = 3) -> np.ndarray:
    """Softmax of whole-image inference with the job's seeded network: the independent answer."""
    torch.manual_seed(MODEL["seed"])
    model = models.create("unet_same", in_channels=in_channels, num_classes=3, **MODEL["args"])
    scores = whole_image(model, image.astype(np.float32) / 255, model.tiling)
    return torch.softmax(torch.from_numpy(scores), 0).numpy()


def _assert_matches(out: Path, expected: np.ndarray) -> None:
    group: Any = zarr.open_group(out, mode="r")
    probs = np.asarray(group["probabilities/0"][:], np.float32)
    assert probs.shape == expected.shape
    assert np.abs(probs - expected).max() < 2e-3  # float16 storage
    top2 = np.sort(expected, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-4
    assert np.array_equal(group["labels/0"][:][decided], expected.argmax(0)[decided])
    assert group.attrs["tilewise"]["status"] == "complete"


# -- outputs apart from inputs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "relation"),
    [
        ("victim.zarr", "is its own input"),
        ("victim.zarr/seg.zarr", "lies inside its own input"),
        (".", "holds its own input"),
        ("link/victim.zarr", "is its own input"),  # another spelling, through a symbolic link
    ],
)
def test_an_output_at_or_around_the_input_is_refused_and_the_input_kept(
    tmp_path: Path, output: str, relation: str
) -> None:
    write_input(tmp_path / "victim.zarr", shape=(3, 40, 40))
    (tmp_path / "link").symlink_to(tmp_path)
    before = _digest(tmp_path / "victim.zarr")
    job = _job(str(tmp_path / "victim.zarr"), str(tmp_path / output))
    match = rf"image 'victim' {relation}.*Choose another output\.path, e\.g\. victim\.seg\.zarr"
    with pytest.raises(ConfigError, match=match):
        plan_job(job)
    with pytest.raises(ConfigError, match=match):
        run_job(job, overwrite=True, progress=False)  # refused before anything is opened
    assert _digest(tmp_path / "victim.zarr") == before


def test_an_output_that_is_another_images_input_or_the_mask_or_weights_is_refused(
    tmp_path: Path,
) -> None:
    write_input(tmp_path / "a.zarr", shape=(3, 40, 40))
    write_input(tmp_path / "a.seg.zarr", shape=(3, 40, 40))  # an image, not an output
    listed = [str(tmp_path / "a.zarr"), str(tmp_path / "a.seg.zarr")]
    job = _job(listed, str(tmp_path / "{stem}.seg.zarr"))
    with pytest.raises(ConfigError, match=r"image 'a' is the input of image 'a\.seg'"):
        expand_images(job)
    mask = {"method": "array", "path": str(tmp_path / "a.zarr")}
    job = _job(str(tmp_path / "a.seg.zarr"), str(tmp_path / "a.zarr"), input__mask=mask)
    with pytest.raises(ConfigError, match=r"image 'a\.seg' is its own mask"):
        expand_images(job)
    (tmp_path / "w").mkdir()
    model = models.create("unet_same", in_channels=3, num_classes=3, **MODEL["args"])
    torch.save(model.state_dict(), tmp_path / "w" / "w.pt")
    job = _job(
        str(tmp_path / "a.zarr"), str(tmp_path / "w"), model__weights=str(tmp_path / "w/w.pt")
    )
    with pytest.raises(ConfigError, match=r"holds model\.weights '.*w\.pt'"):
        expand_images(job)


def test_a_list_of_one_image_is_that_image(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 40, 40))
    job = _job([str(tmp_path / "in.zarr")], str(tmp_path / "out.zarr"))
    (single,) = expand_images(job)
    assert single.input.path == str(tmp_path / "in.zarr")
    assert prepare(single).image.shape == (3, 40, 40)


# -- globs that match the job's own outputs ---------------------------------------------------


def test_a_glob_leaves_out_its_own_outputs_but_not_images_named_like_them(
    tmp_path: Path,
) -> None:
    write_input(tmp_path / "a.zarr", shape=(3, 40, 40))
    zarr.open_group(tmp_path / "b.seg.zarr", mode="w").attrs["tilewise"] = {"status": "running"}
    write_input(tmp_path / "b.zarr", shape=(3, 40, 40))
    job = _job(str(tmp_path / "*.zarr"), str(tmp_path / "{stem}.seg.zarr"))
    assert [j.input.path for j in expand_images(job)] == [
        str(tmp_path / "a.zarr"),
        str(tmp_path / "b.zarr"),
    ]
    write_input(tmp_path / "a.seg.zarr", shape=(3, 40, 40))  # an image: never left out
    with pytest.raises(ConfigError, match=r"image 'a' is the input of image 'a\.seg'"):
        expand_images(job)


@pytest.mark.usefixtures("ray_cluster")
def test_a_glob_job_beside_its_outputs_reruns_as_a_resume(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    write_input(tmp_path / "g/a.zarr", shape=(3, 40, 50), seed=1)
    write_input(tmp_path / "g/b.zarr", shape=(3, 30, 45), seed=2)
    job = _job(str(tmp_path / "g/*.zarr"), str(tmp_path / "g/{stem}.seg.zarr"))
    first = run_job(job, progress=False)
    assert first.units_computed == 2
    outputs = {s: _pixels(tmp_path / f"g/{s}.seg.zarr") for s in "ab"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_job(job)
        again = run_job(job, progress=False)
    assert not [w for w in caught if "zarr" in type(w.message).__name__.lower()]
    assert [im.input for im in plan.images] == [str(tmp_path / f"g/{s}.zarr") for s in "ab"]
    assert sum(im.units_done for im in plan.images) == 2
    assert again.units_computed == 0 and again.units_skipped == 2
    # The stored report is rewritten (its times); the pixels and the done record are not.
    assert {s: _pixels(tmp_path / f"g/{s}.seg.zarr") for s in "ab"} == outputs
    image = np.asarray(zarr.open_array(tmp_path / "g/a.zarr", mode="r")[:])
    _assert_matches(tmp_path / "g/a.seg.zarr", _expected(image))


# -- images smaller than the tile -------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize(("shape", "tile"), [((3, 45, 37), 64), ((1, 100, 90), 128)])
def test_an_image_smaller_than_the_tile_runs_with_the_default_chunk(
    tmp_path: Path, shape: tuple[int, int, int], tile: int
) -> None:
    data = np.random.default_rng(7).integers(0, 255, shape).astype(np.uint8)
    if shape[0] == 1:  # a one-band image stored as (H, W), as in the report
        zarr.create_array(tmp_path / "in.zarr", data=data[0], chunks=(64, 64))
    else:
        zarr.create_array(
            tmp_path / "in.zarr", data=data, chunks=(3, 32, 32), dimension_names=("c", "y", "x")
        )
    job = _job(
        str(tmp_path / "in.zarr"),
        str(tmp_path / "out.zarr"),
        tiling__tile=tile,
        model__in_channels=shape[0],
    )
    assert plan_job(job).images[0].units_total == 1
    run_job(job, progress=False)
    labels = zarr.open_array(tmp_path / "out.zarr/labels/0", mode="r")
    assert labels.chunks == (default_chunk(tile), default_chunk(tile))
    _assert_matches(tmp_path / "out.zarr", _expected(data, in_channels=shape[0]))


# -- 5-D OME-Zarr -----------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_a_5d_ome_zarr_with_one_time_point_and_plane_segments_like_its_plane(
    tmp_path: Path,
) -> None:
    data = np.random.default_rng(5).integers(0, 255, (3, 70, 90)).astype(np.uint8)
    write_ome5d(
        tmp_path / "in.ome.zarr",
        data[None, :, None],
        (1, data.shape[0], 1, 32, 32),
        dimension_names=True,
    )
    job = _job(str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.zarr"), output__chunk=64)
    assert prepare(job).image.shape == (3, 70, 90)
    run_job(job, progress=False)
    _assert_matches(tmp_path / "out.zarr", _expected(data))
    assert zarr.open_array(tmp_path / "out.zarr/labels/0", mode="r").shape == (70, 90)


# -- inputs that do not fit the weights -------------------------------------------------------


def test_weights_for_other_channels_point_at_input_axes(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "in.zarr", data=np.zeros((3, 40, 50), np.uint8))
    model = models.create("unet_same", in_channels=3, num_classes=3, **MODEL["args"])
    torch.save(model.state_dict(), tmp_path / "w.pt")
    job = _job(
        str(tmp_path / "in.zarr"),
        str(tmp_path / "out.zarr"),
        input__axes="yxc",
        model__weights=str(tmp_path / "w.pt"),
    )
    p = prepare(job)
    assert p.in_channels == 50  # the columns read as bands
    with pytest.raises(
        ConfigError, match=r"take 3 input channels, but the input gives 50 with input\.axes 'yxc'"
    ):
        build_model(job, p.in_channels)
    fits = job.model_copy(update={"input": job.input.model_copy(update={"axes": "cyx"})})
    build_model(fits, prepare(fits).in_channels)  # the same weights load with the right axes
