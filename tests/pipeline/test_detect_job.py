"""Predict jobs with Mask R-CNN (`model.arch: mask_rcnn_tiny`): detections stitched across units.

A tiny Mask R-CNN is trained here from scratch on synthetic discs (about 10 s), then a mosaic of
discs crossing unit borders and corners goes through a predict job. The result is checked against
the ground truth the mosaic was drawn from and against the same network run on the whole image at
once: objects are found once each, whole, with ids unique across the mosaic, whatever the worker
count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import zarr
from scipy import ndimage

from tilewise.errors import ConfigError, PlanError
from tilewise.models.maskrcnn import create_instance_model, targets_from_instances
from tilewise.pipeline.driver import run_job
from tilewise.spec import parse_job

HEIGHT, WIDTH, CHUNK = 320, 384, 128


def discs(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A (3, h, w) uint8 image of bright discs (radius 6-14 px, apart) on a dark ground, and
    its (h, w) instance labels."""
    yy, xx = np.mgrid[:h, :w]
    image = np.full((3, h, w), 30.0)
    labels = np.zeros((h, w), np.int32)
    k = 0
    for _ in range(n * 20):
        if k == n:
            break
        r = rng.uniform(6, 14)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        d2 = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2
        if labels[d2 <= (r + 2) ** 2].any():
            continue
        k += 1
        labels[d2 <= r * r] = k
        image[:, d2 <= r * r] = rng.uniform(150, 255, (3, 1))
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mask R-CNN trained on 96 px images of discs (inputs scaled by 1/255, as a
    predict job's default normalisation does for uint8)."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    model = create_instance_model("mask_rcnn_tiny", in_channels=3, num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        images, targets = [], []
        for _ in range(2):
            image, labels = discs(rng, 96, 96, int(rng.integers(2, 6)))
            images.append(torch.from_numpy(image).float() / 255)
            targets.append(targets_from_instances(labels, dict.fromkeys(range(1, 6), 1)))
        loss = sum(model.losses(torch.stack(images), targets).values())
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("detector") / "discs.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    image, labels = discs(np.random.default_rng(7), HEIGHT, WIDTH, 60)
    path = tmp_path_factory.mktemp("mosaic") / "in.zarr"
    zarr.create_array(path, data=image, chunks=(3, 64, 64), dimension_names=("c", "y", "x"))
    return path, image, labels


def _job(
    source: Path, weights: Path, out: Path, halo: int = 64, **instances: Any
) -> dict[str, Any]:
    return {
        "kind": "predict",
        "input": {"path": str(source)},
        "model": {
            "arch": "mask_rcnn_tiny",
            "num_classes": 2,
            "weights": str(weights),
            "class_names": ["background", "disc"],
        },
        "output": {
            "path": str(out),
            "chunk": CHUNK,
            "instances": {"halo": halo, "score_threshold": 0.7, **instances},
        },
        # One torch thread per actor whatever the worker count: CPU sums then do not depend on
        # how many workers share the machine, and neither do the bytes.
        "compute": {"cpus_per_worker": 1},
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _objects(labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): labels == i for i in np.unique(labels) if i}


def _crossing(labels: np.ndarray) -> int:
    """Ground-truth objects with pixels in more than one unit."""
    n = 0
    for box in ndimage.find_objects(labels):
        if box is not None:
            rows = {box[0].start // CHUNK, (box[0].stop - 1) // CHUNK}
            cols = {box[1].start // CHUNK, (box[1].stop - 1) // CHUNK}
            n += len(rows) * len(cols) > 1
    return n


@pytest.mark.usefixtures("ray_cluster")
def test_detections_are_stitched_whole_once_with_unique_ids(
    tmp_path: Path, weights: Path, mosaic: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    source, image, truth = mosaic
    assert _crossing(truth) >= 10  # the test means something: many objects cross unit borders
    report = run_job(
        parse_job(_job(source, weights, tmp_path / "out.zarr")), workers=2, progress=False
    )
    root = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert root.attrs["tilewise"]["status"] == "complete"
    assert "labels" not in root and "probabilities" not in root  # objects only
    inst = root["instances/0"][:]
    assert inst.dtype == np.uint32
    found = _objects(inst)
    assert report.instances is not None and report.instances["objects"] == len(found)
    assert sorted(found) == list(range(1, len(found) + 1))  # ids 1..N, unique across units

    # Against the ground truth: every disc found exactly once, whole (a disc cut at a unit
    # border would match two ids, each at IoU well under 0.5) and no detection left unmatched.
    gt = _objects(truth)
    matched: dict[int, int] = {}
    for g, gmask in gt.items():
        ids, counts = np.unique(inst[gmask], return_counts=True)
        big = [int(i) for i, c in zip(ids, counts, strict=True) if i and c > 0.2 * gmask.sum()]
        assert len(big) <= 1, f"disc {g} is split between ids {big}"
        if big and _iou(found[big[0]], gmask) >= 0.5:
            matched[g] = big[0]
    assert len(matched) >= 0.95 * len(gt)
    assert len(set(matched.values())) == len(matched)
    for i, mask in found.items():
        assert len(ndimage.find_objects(ndimage.label(mask)[0])) == 1, f"id {i} is in pieces"
    assert len(found) <= len(gt) + 2

    # Against the same network on the whole image at once (no windows, no halo): the same
    # objects, with masks that agree closely.
    model = create_instance_model(
        "mask_rcnn_tiny",
        in_channels=3,
        num_classes=2,
        rpn_pre_nms_top_n_test=2000,
        rpn_post_nms_top_n_test=2000,
        box_detections_per_img=1000,
    )
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(weights)))
    with torch.inference_mode():
        whole = model.eval().detect(torch.from_numpy(image).float()[None] / 255)[0]
    keep = whole["scores"] >= 0.7
    whole_masks = (whole["masks"][keep] >= 0.5).numpy()
    best = [max(_iou(m, w) for w in whole_masks) for m in found.values()]
    assert np.mean(np.array(best) >= 0.5) >= 0.95
    assert np.median(best) >= 0.95

    # The table: one row per id with its class and box, areas of the detections' masks.
    table = ds.dataset(tmp_path / "out.zarr" / "instances.parquet").to_table().to_pandas()
    assert sorted(table["id"]) == sorted(found)
    assert set(table["class_name"]) == {"disc"}
    for row in table.itertuples():
        ys, xs = np.nonzero(found[row.id])
        assert row.bbox_y0 <= ys.min() and ys.max() < row.bbox_y1
        assert row.bbox_x0 <= xs.min() and xs.max() < row.bbox_x1
        assert row.score >= 0.7


@pytest.mark.usefixtures("ray_cluster")
def test_worker_count_does_not_change_the_bytes_and_a_rerun_resumes(
    tmp_path: Path, weights: Path, mosaic: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    source = mosaic[0]
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.zarr"
        run_job(parse_job(_job(source, weights, out)), workers=workers, progress=False)
        outputs.append(out)
    a, b = (zarr.open_group(p, mode="r") for p in outputs)
    assert np.array_equal(a["instances/0"][:], b["instances/0"][:])
    tables = [ds.dataset(p / "instances.parquet").to_table() for p in outputs]
    assert tables[0].sort_by("id").equals(tables[1].sort_by("id"))

    before = a["instances/0"][:]
    again = run_job(parse_job(_job(source, weights, outputs[0])), workers=2, progress=False)
    assert again.units_computed == 0  # the stage found every unit's record
    assert np.array_equal(zarr.open_group(outputs[0], mode="r")["instances/0"][:], before)


@pytest.mark.usefixtures("ray_cluster")
def test_a_halo_smaller_than_the_objects_is_refused_and_nothing_is_finished(
    tmp_path: Path, weights: Path, mosaic: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    out = tmp_path / "out.zarr"
    with pytest.raises(PlanError, match="halo"):
        run_job(parse_job(_job(mosaic[0], weights, out, halo=4)), workers=2, progress=False)
    root = zarr.open_group(out, mode="r")
    assert root.attrs["tilewise"]["status"] != "complete"
    # Not presented as a label image (phase 1 stopped before the image was even created).
    assert "instances" not in root or "ome" not in root["instances"].attrs


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"output": {"labels": "uint8"}}, "output.labels"),
        ({"output": {"probabilities": "float16"}}, "output.probabilities"),
        ({"tiling": {"tile": 256}}, "tiling"),
        ({"postprocess": {"crf": {}}}, "postprocess.crf"),
        ({"model": {"num_classes": 1}}, "model.num_classes"),
        ({"model": {"args": {"box_nms": 0.3}}}, "model.args.box_nms"),
        ({"output": {"instances": {"connectivity": 2}}}, "output.instances.connectivity"),
        ({"output": {"instances": {"classes": [2]}}}, "output.instances.classes"),
    ],
)
def test_what_does_not_apply_to_a_detector_is_refused(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    job: dict[str, Any] = {
        "kind": "predict",
        "input": {"path": str(tmp_path / "in.zarr")},
        "model": {"arch": "mask_rcnn_tiny", "num_classes": 2},
        "output": {"path": str(tmp_path / "out.zarr")},
    }
    for key, value in change.items():
        job[key] = {**job.get(key, {}), **value}
    with pytest.raises(ConfigError) as info:
        parse_job(job)
    assert field in str(info.value)


def test_a_detector_job_needs_no_instances_section_and_dumps_round_trip(tmp_path: Path) -> None:
    job = parse_job(
        {
            "kind": "predict",
            "input": {"path": str(tmp_path / "in.zarr")},
            "model": {"arch": "mask_rcnn_r50_fpn", "num_classes": 91},
            "output": {"path": str(tmp_path / "out.zarr")},
        }
    )
    assert job.output.instances is not None and job.output.labels is None
    again = parse_job(job.model_dump(mode="json"))  # what every actor does
    assert again == job


def test_plan_counts_units_and_aligned_windows(
    tmp_path: Path, weights: Path, mosaic: tuple[Path, np.ndarray, np.ndarray], capsys: Any
) -> None:
    import json

    import yaml

    from tilewise.cli import main

    job = _job(mosaic[0], weights, tmp_path / "out.zarr", halo=40)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "--plan", "--json", str(tmp_path / "job.yaml")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "out.zarr").exists()  # a plan creates nothing
    # Independently: each unit's window grows by the halo, is clipped to the image, and its
    # origin moves back to a multiple of 32 (rows 88 -> 64 for the unit at 128 with halo 40).
    computed, largest = 0, 0
    for y in range(0, HEIGHT, CHUNK):
        for x in range(0, WIDTH, CHUNK):
            y0, x0 = max(0, y - 40) // 32 * 32, max(0, x - 40) // 32 * 32
            y1, x1 = min(HEIGHT, y + CHUNK + 40), min(WIDTH, x + CHUNK + 40)
            computed += (y1 - y0) * (x1 - x0)
            largest = max(largest, y1 - y0, x1 - x0)
    (image,) = plan["images"]
    assert image["units"] == (HEIGHT // CHUNK + 1) * (WIDTH // CHUNK)
    assert image["computed_pixels"] == computed
    assert plan["window"] == largest
    assert plan["actor_bytes"] > plan["weights_bytes"] > 0
