"""Predict jobs through a real local Ray cluster and real Zarr stores."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import write_input
from tests.reference import whole_image
from tilewise import models
from tilewise.errors import ConfigError, InputError, OutputExistsError
from tilewise.pipeline.driver import run_job
from tilewise.spec import parse_job

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _job(tmp_path: Path, **changes: Any) -> Any:
    data: dict[str, Any] = {
        "kind": "predict",
        "name": "t",
        "input": {"path": str(tmp_path / "in.zarr")},
        "model": {
            "arch": "unet_same",
            "num_classes": 3,
            "seed": 3,
            "args": {"depth": 2, "base_width": 4},
        },
        "tiling": {"tile": 32, "batch_size": 3},
        "output": {
            "path": str(tmp_path / "out.zarr"),
            "labels": "uint8",
            "probabilities": "float16",
            "chunk": 64,
        },
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return parse_job(data)


def _digest(store: Path) -> str:
    """Checksum of every chunk/shard file of the output arrays (not the attributes)."""
    h = hashlib.sha256()
    for f in sorted(store.rglob("*")):
        if f.is_file() and "/c/" in f.as_posix():
            h.update(f.relative_to(store).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_run_equals_whole_image_inference(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    job = _job(tmp_path)
    report = run_job(job, progress=False)
    image = zarr.open_array(tmp_path / "in.zarr", mode="r")[:].astype(np.float32) / 255
    torch.manual_seed(3)
    model = models.create("unet_same", in_channels=3, num_classes=3, depth=2, base_width=4)
    scores = whole_image(model, image, model.tiling)
    expected_p = torch.softmax(torch.from_numpy(scores), 0).numpy()
    out = zarr.open_group(tmp_path / "out.zarr", mode="r")
    probs = out["probabilities/0"][:].astype(np.float32)
    assert np.abs(probs - expected_p).max() < 2e-3  # float16 storage
    labels = out["labels/0"][:]
    decided = np.sort(expected_p, axis=0)[-1] - np.sort(expected_p, axis=0)[-2] > 1e-4
    assert np.array_equal(labels[decided], expected_p.argmax(0)[decided])
    assert out.attrs["tilewise"]["status"] == "complete"
    assert report.units_computed == report.units_total == 3 * 3
    assert report.lines()[1] == "  input    3 x 150 x 190 (bands x height x width)"


def test_every_pixel_is_owned_by_exactly_one_unit_and_units_are_whole_shards(
    tmp_path: Path,
) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 150, 190))
    job = _job(tmp_path, output__shard=128)
    run_job(job, progress=False)
    from tilewise.pipeline.job import prepare

    grid = prepare(job).grid
    owners = np.zeros((150, 190), int)
    for unit in grid:
        owners[unit.y0 : unit.y1, unit.x0 : unit.x1] += 1
        assert unit.y0 % 128 == 0 and unit.x0 % 128 == 0  # a unit starts on a shard boundary
        assert unit.y1 - unit.y0 == min(128, 150 - unit.y0)  # ... and spans the whole shard
    assert (owners == 1).all()
    labels = zarr.open_array(tmp_path / "out.zarr/labels/0", mode="r")
    assert labels.shards == (128, 128) and labels.chunks == (64, 64)
    assert len(grid) == 4


def test_output_does_not_depend_on_workers_or_unit_order(tmp_path: Path) -> None:
    # At a fixed number of threads per actor: CPU kernels sum in an order that depends on the
    # thread count, which moves the last float bits (measured: 1 float16 value in 100k flips).
    write_input(tmp_path / "in.zarr", shape=(3, 200, 170), seed=4)
    digests = []
    for i, (workers, shuffle) in enumerate([(1, None), (2, None), (2, 7)]):
        job = _job(
            tmp_path,
            output__path=str(tmp_path / f"out{i}.zarr"),
            compute__cpus_per_worker=1,
        )
        run_job(job, workers=workers, shuffle=shuffle, progress=False)
        digests.append(_digest(tmp_path / f"out{i}.zarr"))
    assert digests[0] == digests[1] == digests[2]


def test_rerun_of_a_finished_job_does_nothing(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    job = _job(tmp_path)
    run_job(job, progress=False)
    before = _digest(tmp_path / "out.zarr")
    stored = dict(zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["tilewise"])
    again = run_job(job, progress=False)
    assert again.units_computed == 0 and again.units_skipped == again.units_total
    assert _digest(tmp_path / "out.zarr") == before
    # the output keeps the report of the run that computed it, not the rerun's
    kept = dict(zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["tilewise"])
    assert kept == stored and kept["report"]["units_computed"] == again.units_total


def test_with_json_stdout_is_the_report_alone_even_with_the_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import yaml

    from tilewise.cli import main

    write_input(tmp_path / "in.zarr")
    job = _job(tmp_path).model_dump(mode="json", exclude_none=True)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "job.yaml"), "--json"]) == 0  # the bar is on
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing else on stdout: `| jq` works
    assert report["units_computed"] == report["units_total"] == 9
    assert "units" in captured.err  # the bar went to stderr


def test_an_output_that_cannot_be_created_is_refused_before_any_is(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    (tmp_path / "a-file").write_text("not a folder")
    job = _job(tmp_path, output__path=str(tmp_path / "a-file/out.zarr"))
    with pytest.raises(ConfigError, match=r"a-file' is a file, not a folder"):
        run_job(job, progress=False)
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_resume_computes_only_the_missing_units_and_gives_the_same_bytes(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    job = _job(tmp_path)
    run_job(job, progress=False)
    complete = _digest(tmp_path / "out.zarr")
    # Forget three units as if the run had stopped before them: delete their chunks and markers
    # and mark the output unfinished.
    out = tmp_path / "out.zarr"
    for index in (1, 4, 8):
        (out / ".tilewise/done" / str(index)).unlink()
        i, j = divmod(index, 3)
        for arr in ("labels/0", "probabilities/0"):
            for f in (out / arr / "c").rglob("*"):
                parts = f.relative_to(out / arr / "c").parts
                if f.is_file() and parts[-2:] == (str(i), str(j)):
                    f.unlink()
    group = zarr.open_group(out, mode="r+")
    group.attrs["tilewise"] = {**group.attrs["tilewise"], "status": "running"}
    report = run_job(job, progress=False)
    assert report.units_computed == 3 and report.units_skipped == 6
    assert _digest(out) == complete


def test_an_output_of_another_job_is_refused_then_replaced_with_overwrite(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    run_job(_job(tmp_path), progress=False)
    other = _job(tmp_path, model__seed=4)
    with pytest.raises(OutputExistsError, match="different job"):
        run_job(other, progress=False)
    report = run_job(other, overwrite=True, progress=False)
    assert report.units_computed == report.units_total


def test_yxc_input_with_normalisation_equals_cyx(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    data = zarr.open_array(tmp_path / "in.zarr", mode="r")[:]
    zarr.create_array(tmp_path / "yxc.zarr", data=np.moveaxis(data, 0, -1), chunks=(64, 64, 3))
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]}
    a = _job(tmp_path, input__normalize=norm, output__path=str(tmp_path / "a.zarr"))
    b = _job(
        tmp_path,
        input__path=str(tmp_path / "yxc.zarr"),
        input__axes="yxc",
        input__normalize=norm,
        output__path=str(tmp_path / "b.zarr"),
    )
    run_job(a, progress=False)
    run_job(b, progress=False)
    assert _digest(tmp_path / "a.zarr") == _digest(tmp_path / "b.zarr")


def test_ome_zarr_level_is_read_with_its_axes_and_pixel_size(tmp_path: Path) -> None:
    from tilewise.demo import build_mosaic

    build_mosaic(tmp_path / "img.ome.zarr", 200)
    job = _job(tmp_path, input__path=str(tmp_path / "img.ome.zarr"))
    run_job(job, progress=False)
    labels = zarr.open_group(tmp_path / "out.zarr/labels", mode="r")
    scale = labels.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale == [{"type": "scale", "scale": [0.5, 0.5]}]
    assert labels["0"].shape == (200, 200)


def test_sliding_pspnet_job_equals_the_papers_protocol_on_the_whole_image(tmp_path: Path) -> None:
    # PSPNet is not translation-equivariant; its own evaluation is a sliding window with flip.
    from tests.reference import sliding_window_reference

    write_input(tmp_path / "in.zarr")
    args = {"width": 0.0625}
    job = _job(
        tmp_path,
        model__arch="pspnet50",
        model__args=args,
        tiling__tile=57,
        tiling__stitch="sliding",
        tiling__flip=True,
        tiling__pad_mode="constant",
        output__chunk=48,  # units cut across windows
    )
    run_job(job, progress=False)
    image = zarr.open_array(tmp_path / "in.zarr", mode="r")[:].astype(np.float64) / 255
    torch.manual_seed(3)
    model = models.create("pspnet50", in_channels=3, num_classes=3, **args).double()
    expected = sliding_window_reference(model, image, crop=57, stride=38, flip=True)
    out = zarr.open_group(tmp_path / "out.zarr", mode="r")
    probs = out["probabilities/0"][:].astype(np.float64)
    assert np.abs(probs - expected).max() < 2e-3  # float16 storage


def _expected(image_path: Path, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Whole-image probabilities and a mask of pixels whose arg-max is clear-cut."""
    image = zarr.open_array(image_path, mode="r")[:].astype(np.float32) / 255
    torch.manual_seed(seed)
    model = models.create("unet_same", in_channels=3, num_classes=3, depth=2, base_width=4)
    p = torch.softmax(torch.from_numpy(whole_image(model, image, model.tiling)), 0).numpy()
    top2 = np.sort(p, axis=0)[-2:]
    return p, top2[1] - top2[0] > 1e-4


def test_a_job_over_a_glob_of_images_writes_one_output_per_image(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    shapes = {"a": (3, 150, 190), "b": (3, 97, 64), "c": (3, 64, 200)}
    for k, (name, shape) in enumerate(shapes.items()):
        write_input(tmp_path / "slides" / f"{name}.zarr", shape=shape, seed=10 + k)
    job = _job(
        tmp_path,
        input__path=str(tmp_path / "slides" / "*.zarr"),
        output__path=str(tmp_path / "out" / "{stem}.seg.zarr"),
    )
    report = run_job(job, workers=2, progress=False)
    assert [r["name"] for r in report.images] == ["t/a", "t/b", "t/c"]
    # The report's input line counts the images; each image's line follows.
    lines = report.lines()
    assert lines[1] == "  input    3 images"
    assert [line.split(":")[0] for line in lines if line.startswith("  image")] == [
        "  image    t/a",
        "  image    t/b",
        "  image    t/c",
    ]
    assert report.units_total == sum(r["units_total"] for r in report.images)
    assert report.output_pixels == sum(h * w for _, h, w in shapes.values())
    for name in shapes:
        out = zarr.open_group(tmp_path / "out" / f"{name}.seg.zarr", mode="r")
        expected, decided = _expected(tmp_path / "slides" / f"{name}.zarr")
        probs = out["probabilities/0"][:].astype(np.float32)
        assert probs.shape == expected.shape
        assert np.abs(probs - expected).max() < 2e-3
        assert np.array_equal(out["labels/0"][:][decided], expected.argmax(0)[decided])
        assert out.attrs["tilewise"]["status"] == "complete"
    # A rerun finds every image done.
    again = run_job(job, progress=False)
    assert again.units_computed == 0 and again.units_skipped == report.units_total


def test_a_list_of_images_with_a_pattern_that_matches_nothing_is_refused_before_any_output(
    tmp_path: Path,
) -> None:
    write_input(tmp_path / "a.zarr")
    job = _job(
        tmp_path,
        input__path=[str(tmp_path / "a.zarr"), str(tmp_path / "missing" / "*.zarr")],
        output__path=str(tmp_path / "out" / "{stem}.zarr"),
    )
    with pytest.raises(InputError, match="matches no image"):
        run_job(job, progress=False)
    assert not (tmp_path / "out").exists()


def test_read_ahead_does_not_change_a_byte(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 200, 170), seed=5)
    digests = []
    for prefetch in (0, 3):
        out = tmp_path / f"out{prefetch}.zarr"
        job = _job(
            tmp_path, output__path=str(out), compute__prefetch=prefetch, compute__cpus_per_worker=1
        )
        run_job(job, workers=1, progress=False)
        digests.append(_digest(out))
    assert digests[0] == digests[1]


def test_bfloat16_autocast_stays_close_to_float32_whole_image_inference(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    report = run_job(_job(tmp_path, compute__precision="bfloat16"), progress=False)
    assert report.device == "cpu (bfloat16)"
    expected, decided = _expected(tmp_path / "in.zarr")
    probs = zarr.open_group(tmp_path / "out.zarr", mode="r")["probabilities/0"][:]
    error = np.abs(probs.astype(np.float32) - expected)
    # bfloat16 keeps 8 bits of mantissa: close to float32, but not equal to it.
    assert 0 < error.max() < 0.1
    labels = zarr.open_group(tmp_path / "out.zarr", mode="r")["labels/0"][:]
    clear = decided & (np.sort(expected, axis=0)[-1] - np.sort(expected, axis=0)[-2] > 0.05)
    assert np.array_equal(labels[clear], expected.argmax(0)[clear])


def _slide(path: Path, shape: tuple[int, int] = (192, 256)) -> np.ndarray:
    """A bright slide with one dark, textured tissue blob in its top-left corner."""
    rng = np.random.default_rng(8)
    h, w = shape
    image = np.full((3, h, w), 235, np.uint8) + rng.integers(0, 8, (3, h, w)).astype(np.uint8)
    image[:, 10:70, 20:90] = rng.integers(20, 140, (3, 60, 70))
    zarr.create_array(path, data=image, chunks=(3, 64, 64), dimension_names=("c", "y", "x"))
    return image


def test_a_tissue_mask_skips_units_without_tissue_and_writes_them_as_background(
    tmp_path: Path,
) -> None:
    _slide(tmp_path / "in.zarr")
    job = _job(tmp_path, input__mask={"method": "tissue", "background_class": 2})
    report = run_job(job, progress=False)
    # 3 x 4 units of 64 px; the blob (rows 10..70, cols 20..90, a pixel of dilation) touches
    # units (0,0), (0,1), (1,0) and (1,1): the other 8 are never computed.
    assert report.units_computed == 4 and report.units_background == 8
    expected, decided = _expected(tmp_path / "in.zarr")
    out = zarr.open_group(tmp_path / "out.zarr", mode="r")
    labels, probs = out["labels/0"][:], out["probabilities/0"][:].astype(np.float32)
    computed = np.zeros(labels.shape, bool)
    computed[:128, :128] = True
    assert np.abs(probs[:, computed] - expected[:, computed]).max() < 2e-3
    assert np.array_equal(labels[computed & decided], expected.argmax(0)[computed & decided])
    assert (labels[~computed] == 2).all()
    assert (probs[2][~computed] == 1).all() and (probs[:2][:, ~computed] == 0).all()


def test_a_nodata_mask_skips_empty_units_and_blanks_nodata_pixels(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 128, 192), seed=6)
    arr = zarr.open_array(tmp_path / "in.zarr", mode="r+")
    arr[:, :, :100] = 0  # a scene's no-data edge: units of columns 0..63 are empty
    arr.attrs["nodata"] = 0
    job = _job(tmp_path, input__mask={"method": "nodata"})
    report = run_job(job, progress=False)
    assert report.units_background == 2 and report.units_computed == 4
    expected, decided = _expected(tmp_path / "in.zarr")
    out = zarr.open_group(tmp_path / "out.zarr", mode="r")
    labels = out["labels/0"][:]
    assert (labels[:, :100] == 0).all()
    valid = np.zeros(labels.shape, bool)
    valid[:, 100:] = True
    assert np.array_equal(labels[valid & decided], expected.argmax(0)[valid & decided])


def test_a_nodata_mask_without_a_value_is_refused_before_any_output(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")  # no nodata attribute, and the job gives none
    job = _job(tmp_path, input__mask={"method": "nodata"})
    with pytest.raises(InputError, match=r"needs the no-data value.*set input\.mask\.nodata"):
        run_job(job, progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_a_damaged_input_chunk_stops_the_run_with_one_clear_error_and_a_rerun_finishes(
    tmp_path: Path,
) -> None:
    (tmp_path / "in").mkdir()
    write_input(tmp_path / "in" / "a.zarr", shape=(3, 64, 64), seed=1)  # one unit, damaged
    write_input(tmp_path / "in" / "b.zarr", shape=(3, 512, 512), seed=2)  # 64 units
    chunk = tmp_path / "in" / "a.zarr" / "c" / "0" / "0" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(bytes(range(256)) * 20)
    job = _job(
        tmp_path,
        input__path=str(tmp_path / "in" / "*.zarr"),
        output__path=str(tmp_path / "out" / "{stem}.zarr"),
    )
    with pytest.raises(
        InputError, match=r"a\.zarr.*rows 0\.\.64, columns 0\.\.64: a chunk .*damag"
    ):
        run_job(job, workers=2, progress=False)
    outputs = [zarr.open_group(tmp_path / "out" / f"{n}.zarr", mode="r") for n in "ab"]
    assert [g.attrs["tilewise"]["status"] for g in outputs] == ["running", "running"]
    chunk.write_bytes(good)
    report = run_job(job, progress=False)
    assert report.units_computed + report.units_skipped == report.units_total == 65
    for name in "ab":
        expected, decided = _expected(tmp_path / "in" / f"{name}.zarr")
        out = zarr.open_group(tmp_path / "out" / f"{name}.zarr", mode="r")
        assert np.abs(out["probabilities/0"][:].astype(np.float32) - expected).max() < 2e-3
        assert np.array_equal(out["labels/0"][:][decided], expected.argmax(0)[decided])
        assert out.attrs["tilewise"]["status"] == "complete"


def test_a_chunk_write_cut_short_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    job = _job(tmp_path)
    run_job(job, progress=False)
    out = tmp_path / "out.zarr"
    # What a worker killed between writing a chunk's temporary file and renaming it leaves.
    leftover = out / "labels/0/c/0/1.3f2a.partial"
    leftover.write_bytes(b"half a chunk")
    (out / ".tilewise/done/1").unlink()
    report = run_job(job, progress=False)
    assert report.units_computed == 1
    assert not leftover.exists() and not list(out.rglob("*.partial"))


ENV_PROBE = """
import json, os, ray
from tilewise.pipeline.driver import ALLOCATOR_ENV, _connect
assert _connect(None)  # started an embedded cluster


@ray.remote(num_cpus=1)
class Probe:
    def env(self):
        return {k: os.environ.get(k) for k in ALLOCATOR_ENV}


seen = ray.get(Probe.remote().env.remote())
print(json.dumps({"actor": seen, "driver": {k: os.environ.get(k) for k in ALLOCATOR_ENV}}))
ray.shutdown()
"""


def test_an_embedded_clusters_actors_get_the_allocator_settings(tmp_path: Path) -> None:
    """The embedded cluster passes the allocator variables to its processes without a
    runtime_env; the actors must still see them, and the driver's environment stays as it was."""
    import json
    import os
    import subprocess
    import sys

    from tilewise.pipeline.driver import ALLOCATOR_ENV

    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV and k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    done = subprocess.run(
        [sys.executable, "-c", ENV_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["actor"] == ALLOCATOR_ENV
    assert seen["driver"] == {k: None for k in ALLOCATOR_ENV}


HEAP_PROBE = """
import ctypes, json
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
blocks = [libc.malloc(600 << 20) for _ in range(2)]  # below the mmap threshold: on the heap
grown = libc.sbrk(0)
for b in reversed(blocks):
    libc.free(ctypes.c_void_p(b))
print(json.dumps({"ok": all(blocks), "grown": grown, "after": libc.sbrk(0)}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc variables")
def test_the_allocator_settings_keep_a_freed_heap_top_of_over_a_gib() -> None:
    """Freeing 1.2 GB at the heap's top (a large network's activations between units) must not
    give it back to the OS, or the next unit faults every page of it in again."""
    import json
    import os
    import subprocess
    import sys

    from tilewise.pipeline.driver import ALLOCATOR_ENV

    env = {**os.environ, **ALLOCATOR_ENV}
    done = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ok"], "could not allocate 2 x 600 MB"
    assert seen["after"] == seen["grown"], "the freed heap top was trimmed"
