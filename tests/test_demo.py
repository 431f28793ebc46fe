"""``tilewise demo``: shards cut from the IHC image, Ray Train, the package in the predict job.

One small demo run (a 1,100 px mosaic, 60 steps in process) is shared by the tests that read its
results. Each result is checked against an independent computation: the shards against the IHC
image cut by hand, the segmentation against whole-image inference with the package's weights,
and the printed metrics against a confusion matrix counted with numpy from the whole arrays.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load_file
from skimage import data

from tilewise import demo, models
from tilewise.spec import job_errors, parse_job
from tilewise.training.run import prepare_training

from .reference import whole_image

SIZE = 1100  # two label blocks a side (1024 + 76), four prediction units
STEPS = 60  # about 10 s in process; enough to beat the majority class by far


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> dict[str, Any]:
    """One demo run: its work folder, its result and what it printed."""
    work = tmp_path_factory.mktemp("demo") / "work"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = demo.run_demo(workdir=work, size=SIZE, progress=False, steps=STEPS, workers=0)
    return {"work": work, "result": result, "out": printed.getvalue()}


def _confusion(truth: np.ndarray, pred: np.ndarray, k: int = 3) -> np.ndarray:
    """n[i, j] = pixels of truth i predicted j, one class pair at a time."""
    return np.array([[np.sum((truth == i) & (pred == j)) for j in range(k)] for i in range(k)])


def test_shards_are_the_quadrants_of_the_image_with_its_stain_labels(tmp_path: Path) -> None:
    paths = demo.build_shards(tmp_path)
    assert sorted(p.name for p in paths) == ["train-0.zarr", "train-1.zarr", "train-2.zarr",
                                             "val-0.zarr"]  # fmt: skip
    ihc = data.immunohistochemistry()
    labels = demo.ihc_labels(ihc)
    corners = {"train-0": (0, 0), "val-0": (0, 256), "train-1": (256, 0), "train-2": (256, 256)}
    for name, (y, x) in corners.items():
        group = zarr.open_group(tmp_path / f"{name}.zarr", mode="r")
        np.testing.assert_array_equal(
            group["image"][:], ihc[y : y + 256, x : x + 256].transpose(2, 0, 1)
        )
        np.testing.assert_array_equal(group["label"][:], labels[y : y + 256, x : x + 256])
    # every class is in the held-out quadrant, so its mean IU scores all three
    held_out = zarr.open_group(tmp_path / "val-0.zarr", mode="r")["label"][:]
    assert set(np.unique(held_out)) == {0, 1, 2}


def test_the_job_files_are_valid_and_the_demo_moves_their_data_into_its_folder(
    tmp_path: Path,
) -> None:
    assert job_errors(demo.TRAIN_FILE) == []
    demo.build_shards(tmp_path / demo.SHARDS)
    job = demo.train_job(tmp_path, steps=7, workers=0)
    assert job.steps == 7 and job.scaling.workers == 0
    assert Path(job.storage) == tmp_path / "runs"
    assert Path(job.package_location) == tmp_path / "runs/ihc-train/model"
    config = prepare_training(job)
    assert [Path(s.location).name for s in config["train_shards"]] == [
        "train-0.zarr", "train-1.zarr", "train-2.zarr"]  # fmt: skip
    assert [s.location for s in config["val_shards"]] == [str(tmp_path / "ihc-shards/val-0.zarr")]
    # the predict job file names the train job's package, where the train job writes it
    predict = yaml.safe_load(demo.JOB_FILE.read_text())
    train = yaml.safe_load(demo.TRAIN_FILE.read_text())
    assert predict["model"] == {"package": f"{train['storage']}/{train['name']}/model"}


def test_the_predict_job_runs_the_trained_package(run: dict[str, Any]) -> None:
    work, result = run["work"], run["result"]
    package = work / "runs/ihc-train/model"
    assert result["package"] == str(package)
    manifest = yaml.safe_load((package / "model.yaml").read_text())
    train = yaml.safe_load(demo.TRAIN_FILE.read_text())
    assert manifest["training"]["run"] == "ihc-train"
    assert manifest["training"]["steps"] == STEPS
    assert manifest["normalize"]["mean"] == train["normalize"]["mean"]
    assert (manifest["arch"], manifest["args"]) == ("unet_same", train["model"]["args"])
    output = zarr.open_group(work / "ihc-mosaic.segmentation.zarr", mode="r")
    record = output.attrs["tilewise"]
    assert record["status"] == "complete"
    assert record["job"]["model"]["package"] == str(package)
    assert record["job"]["model"]["weights"] == str(package / "weights.safetensors")
    # The labels are those of whole-image inference with the package's weights and
    # normalisation: the trained network segmented the mosaic, not some other one.
    net = models.create("unet_same", in_channels=3, num_classes=3, **manifest["args"])
    net.load_state_dict(load_file(str(package / "weights.safetensors")))
    image = zarr.open_array(work / "ihc-mosaic.ome.zarr/0", mode="r")[:]
    mean = np.asarray(manifest["normalize"]["mean"], np.float32)[:, None, None]
    std = np.asarray(manifest["normalize"]["std"], np.float32)[:, None, None]
    x = (image.astype(np.float32) * np.float32(1 / 255) - mean) / std
    facts = models.facts("unet_same", in_channels=3, num_classes=3, **manifest["args"])
    with torch.no_grad():
        expected = whole_image(net, x, facts).argmax(0)
    differ = np.mean(expected != output["labels/0"][:])
    assert differ < 1e-4, differ  # at most float ties between classes
    # The job's preview: drawn at the end of the run, named by its report, at a pyramid level.
    assert result["preview"] == str(work / "preview.png") == record["report"]["preview"]
    from PIL import Image

    width, height = Image.open(result["preview"]).size
    level = max(output[f"labels/{k}"].shape[1] for k in range(record["levels"]) if
                output[f"labels/{k}"].shape[1] <= 1024)  # fmt: skip
    assert width == 2 * level + 10 and height == level + 40


def test_the_printed_fcn_metrics_are_those_of_the_output(run: dict[str, Any]) -> None:
    work, result = run["work"], run["result"]
    image = zarr.open_array(work / "ihc-mosaic.ome.zarr/0", mode="r")[:]
    pred = zarr.open_array(work / "ihc-mosaic.segmentation.zarr/labels/0", mode="r")[:]
    truth = demo.ihc_labels(image.transpose(1, 2, 0))  # the whole mosaic's labels at once
    n = _confusion(truth, pred).astype(np.float64)
    t, s, d = n.sum(1), n.sum(0), np.diag(n)
    assert (t > 0).all()  # every class present: the FCN formulas need no NaN handling
    iu = d / (t + s - d)
    expected = {
        "pixel_accuracy": d.sum() / n.sum(),
        "mean_accuracy": np.mean(d / t),
        "mean_iu": np.mean(iu),
        "frequency_weighted_iu": (t * iu).sum() / n.sum(),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert list(result["iu_per_class"].values()) == pytest.approx(iu.tolist(), abs=1e-12)
    line = next(x for x in run["out"].splitlines() if "FCN metrics" in x)
    printed = {
        key: float(re.search(rf"{label} (\d\.\d{{3}})", line).group(1))  # type: ignore[union-attr]
        for key, label in [
            ("pixel_accuracy", "pixel accuracy"),
            ("mean_accuracy", "mean accuracy"),
            ("mean_iu", ", mean IU"),
            ("frequency_weighted_iu", "frequency-weighted IU"),
        ]
    }
    for key, value in expected.items():
        assert printed[key] == round(value, 3), key
    assert f"({SIZE * SIZE / 1e6:.1f} Mpx)" in line


def test_the_streamed_labels_equal_those_of_the_whole_mosaic(run: dict[str, Any]) -> None:
    """Blocks far smaller than the blur's reach across many borders: the halo makes it exact."""
    work = run["work"]
    mosaic, labels = work / "ihc-mosaic.ome.zarr", work / "ihc-mosaic.segmentation.zarr/labels/0"
    image = zarr.open_array(mosaic / "0", mode="r")[:, :300, :300]
    pred = zarr.open_array(labels, mode="r")[:300, :300]
    crop = work.parent / "crop"
    zarr.create_array(crop / "0", data=image, chunks=(3, 128, 128))
    zarr.create_array(crop / "labels", data=pred, chunks=(128, 128))
    streamed = demo.evaluate(crop, crop / "labels", block=37)
    truth = demo.ihc_labels(image.transpose(1, 2, 0))
    np.testing.assert_array_equal(streamed.counts, _confusion(truth, pred))


def test_the_trained_network_beats_predicting_the_majority_class(run: dict[str, Any]) -> None:
    work, result = run["work"], run["result"]
    image = zarr.open_array(work / "ihc-mosaic.ome.zarr/0", mode="r")[:]
    counts = np.bincount(demo.ihc_labels(image.transpose(1, 2, 0)).ravel(), minlength=3)
    # One class everywhere: IU of that class = its share, IU 0 for the other two (present) ones.
    majority_pa = counts.max() / counts.sum()
    majority_iu = majority_pa / 3
    assert result["baseline_mean_iu"] == pytest.approx(majority_iu, abs=1e-12)
    assert result["baseline_pixel_accuracy"] == pytest.approx(majority_pa, abs=1e-12)
    assert result["mean_iu"] > majority_iu + 0.3, (result["mean_iu"], majority_iu)
    assert result["pixel_accuracy"] > majority_pa + 0.15
    # the validation ran on the held-out quadrant, and the log printed it
    assert result["val_mean_iu"] > majority_iu + 0.3
    assert re.search(rf"step +{STEPS}/{STEPS} .*held-out quadrant", run["out"])


def test_a_rerun_keeps_the_finished_run_and_other_settings_start_a_new_one(
    tmp_path: Path,
) -> None:
    demo.build_shards(tmp_path / demo.SHARDS)
    job = demo.train_job(tmp_path, steps=5, workers=0)
    demo._keep_or_reset_run(job)
    checkpoint = tmp_path / "runs/ihc-train/checkpoint-5"
    checkpoint.mkdir()
    demo._keep_or_reset_run(demo.train_job(tmp_path, steps=5, workers=0))
    assert checkpoint.exists()  # the same job: Ray Train resumes it or finds it complete
    other = demo.train_job(tmp_path, steps=6, workers=0)
    demo._keep_or_reset_run(other)
    assert not checkpoint.exists()
    record = json.loads((tmp_path / "runs/ihc-train/demo-job.json").read_text())
    assert parse_job(record) == other
