"""Train jobs of an instance architecture (Mask R-CNN) on instance shards, end to end.

The data are synthetic shards of squares (class 1, lighter than the background) and discs (class
2, darker) with known object ids. Whether the network learned them is judged independently of the
training code: the package's weights are loaded into a freshly built network, run on a held-out
shard, and its detections are scored here by a greedy IoU matching written for this test (not
``detection_ap``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load_file

from tilewise.errors import ConfigError, InputError
from tilewise.models.detection import detection_ap
from tilewise.models.maskrcnn import create_instance_model
from tilewise.spec import TrainJob, parse_job
from tilewise.training.augment import Augment
from tilewise.training.instances import (
    LOSS_NAMES,
    MIN_CUT_OBJECT_PIXELS,
    APCounter,
    patch_target,
    windows,
)
from tilewise.training.loader import PatchLoader
from tilewise.training.run import run_training
from tilewise.training.sampling import make_sampler
from tilewise.training.shards import ObjectClasses, open_shards

MEAN, STD = 0.5, 0.25
SIZE = 192


def _shapes(
    path: Path, seed: int, n: int = 12, table: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """An instance shard: RGB image (3, 192, 192) uint8, object ids (192, 192) uint16 (7k + 3,
    not consecutive) and the class of each id (1 square, 2 disc), written as a Zarr group."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    bg = rng.uniform(0.35, 0.65, 3).astype(np.float32)
    slope = rng.uniform(-0.2, 0.2, (3, 2)).astype(np.float32)
    img = bg[:, None, None] + slope[:, :1, None] * yy / SIZE + slope[:, 1:, None] * xx / SIZE
    ids = np.zeros((SIZE, SIZE), np.uint16)
    classes: dict[int, int] = {}
    for _ in range(300):
        if len(classes) == n:
            break
        kind = int(rng.integers(1, 3))
        side = rng.uniform(14, 34)
        cy, cx = rng.uniform(side / 2, SIZE - side / 2, 2)
        if kind == 1:
            m = (np.abs(yy + 0.5 - cy) <= side / 2) & (np.abs(xx + 0.5 - cx) <= side / 2)
        else:
            m = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= (side / 2) ** 2
        grown = m.copy()  # a pixel of background between objects
        grown[:-1] |= m[1:]
        grown[1:] |= m[:-1]
        grown[:, :-1] |= m[:, 1:]
        grown[:, 1:] |= m[:, :-1]
        if (ids[grown] != 0).any():
            continue
        oid = 7 * (len(classes) + 1) + 3
        ids[m] = oid
        classes[oid] = kind
        img[:, m] = np.clip(bg + (1 if kind == 1 else -1) * rng.uniform(0.2, 0.35, 3), 0, 1)[
            :, None
        ]
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    image = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("image", data=image, chunks=(3, 64, 64))
    group.create_array("instances", data=ids, chunks=(64, 64))
    if table:
        rows = np.array(sorted(classes.items()), np.int32)
        group.create_array("instance_classes", data=rows)
    return image, ids, classes


def _job(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    for i in range(6):
        if not (tmp_path / f"shards/s{i}.zarr").exists():
            _shapes(tmp_path / f"shards/s{i}.zarr", i)
    job: dict[str, Any] = {
        "kind": "train",
        "name": "shapes",
        "data": {
            "shards": [str(tmp_path / "shards/s[0-4].zarr")],
            "val_shards": [str(tmp_path / "shards/s5.zarr")],
        },
        "model": {
            "arch": "mask_rcnn_tiny",
            "num_classes": 3,
            "class_names": ["background", "square", "disc"],
        },
        "normalize": {"mean": [MEAN], "std": [STD]},
        "patch": {"size": 96, "sampler": "foreground", "foreground_p": 0.8},
        "optimizer": {"name": "adam", "lr": 0.002},
        "steps": 200,
        "batch_size": 4,
        "scaling": {"workers": 0, "cpus_per_worker": 1},
        "checkpoint": {"every": 100},
        "validation": {"every": 100, "tile": 96},
        "storage": str(tmp_path / "runs"),
    }
    job.update(changes)
    return job


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ independent AP


def _greedy_mask_ap50(
    det: dict[str, np.ndarray], ids: np.ndarray, classes: dict[int, int]
) -> float:
    """Mask AP at IoU 0.5, mean over the classes, for one image: per class the detections in
    decreasing score order, each matched to the unmatched object of the class with the highest
    IoU if it is >= 0.5; AP is the area under the precision-recall curve made non-increasing
    (all-point interpolation, as PASCAL VOC 2010+)."""
    aps = []
    for c in sorted(set(classes.values())):
        objects = [ids == i for i, k in classes.items() if k == c]
        mine = np.flatnonzero(det["labels"] == c)
        mine = mine[np.argsort(-det["scores"][mine], kind="stable")]
        used = [False] * len(objects)
        hits = []
        for d in mine:
            pred = det["masks"][d] >= 0.5
            best, pick = 0.5, -1
            for j, obj in enumerate(objects):
                union = np.count_nonzero(pred | obj)
                iou = np.count_nonzero(pred & obj) / union if union else 0.0
                if not used[j] and iou >= best:
                    best, pick = iou, j
            if pick >= 0:
                used[pick] = True
            hits.append(pick >= 0)
        tp = np.cumsum(hits)
        recall = np.concatenate([[0.0], tp / len(objects)])
        precision = np.concatenate([[1.0], tp / np.arange(1, len(hits) + 1)])
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        aps.append(float(np.sum(np.diff(recall) * precision[1:])))
    return float(np.mean(aps))


def test_the_greedy_ap_of_this_test_is_right_on_hand_worked_cases() -> None:
    ids = np.zeros((20, 20), np.int64)
    ids[2:8, 2:8], ids[10:16, 10:16] = 1, 2
    exact = [(ids == 1).astype(np.float32), (ids == 2).astype(np.float32)]
    empty = np.zeros((20, 20), np.float32)
    # both found, best first: AP 1; a miss ranked first, then both: precision 1/2, 2/3 -> AP 2/3
    det = {"labels": np.array([1, 1]), "scores": np.array([0.9, 0.8]), "masks": np.stack(exact)}
    assert _greedy_mask_ap50(det, ids, {1: 1, 2: 1}) == pytest.approx(1.0)
    det = {"labels": np.array([1, 1, 1]), "scores": np.array([0.95, 0.9, 0.8]),
           "masks": np.stack([empty, *exact])}  # fmt: skip
    assert _greedy_mask_ap50(det, ids, {1: 1, 2: 1}) == pytest.approx(2 / 3)
    # one of two found: AP 1/2
    det = {"labels": np.array([1]), "scores": np.array([0.9]), "masks": exact[0][None]}
    assert _greedy_mask_ap50(det, ids, {1: 1, 2: 1}) == pytest.approx(0.5)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.usefixtures("ray_cluster")
def test_mask_rcnn_trains_in_process_and_its_package_finds_the_held_out_objects(
    tmp_path: Path,
) -> None:
    job = parse_job(_job(tmp_path))
    assert isinstance(job, TrainJob)
    summary = run_training(job, progress=False)
    assert summary.status == "complete" and summary.steps == 200
    rows = _rows(tmp_path / "runs/shapes")
    assert [r["step"] for r in rows] == list(range(1, 201))
    for r in rows:  # the five losses are logged, and the loss is their sum
        assert set(LOSS_NAMES) <= set(r)
        assert r["loss"] == pytest.approx(sum(r[k] for k in LOSS_NAMES), rel=1e-5)
    validated = [r for r in rows if "val_mask_ap50" in r]
    assert [r["step"] for r in validated] == [100, 200]
    assert all("val_box_ap50" in r and "val_mean_iou" not in r for r in validated)

    # the package records how to build the network, as for dense architectures
    manifest = yaml.safe_load((Path(summary.package) / "model.yaml").read_text())
    assert manifest["arch"] == "mask_rcnn_tiny" and manifest["num_classes"] == 3
    assert manifest["in_channels"] == 3 and manifest["args"] == {}
    assert manifest["class_names"] == ["background", "square", "disc"]
    assert manifest["normalize"]["mean"] == [MEAN] and manifest["normalize"]["std"] == [STD]
    assert manifest["training"]["weights_of_step"] == summary.best["step"]

    # its weights, in a network built here, find the held-out shard's objects
    net = create_instance_model("mask_rcnn_tiny", in_channels=3, num_classes=3)
    net.load_state_dict(load_file(str(Path(summary.package) / "weights.safetensors")))
    net.eval()
    group = zarr.open_group(str(tmp_path / "shards/s5.zarr"), mode="r")
    image, ids = group["image"][:], group["instances"][:]
    classes = {int(i): int(c) for i, c in group["instance_classes"][:]}
    x = (torch.from_numpy(image).float()[None] / 255 - MEAN) / STD
    with torch.no_grad():
        found = net.detect(x)[0]
    det = {k: v.numpy() for k, v in found.items()}
    ap = _greedy_mask_ap50(det, ids, classes)
    # measured 1.0 (12 objects) after 200 steps; 0.75 after 100
    assert ap >= 0.8, ap

    # a predict job names the package (network, classes, normalisation from it) and segments
    # the held-out image in 64 px units: its instances match the network run here, whole
    from tilewise.pipeline.driver import run_job

    zarr.create_array(tmp_path / "held_out.zarr", data=image, chunks=(3, 64, 64),
                      dimension_names=("c", "y", "x"))  # fmt: skip
    predict = parse_job(
        {
            "kind": "predict",
            "input": {"path": str(tmp_path / "held_out.zarr")},
            "model": {"package": summary.package},
            "output": {"path": str(tmp_path / "seg.zarr"), "chunk": 64, "instances": {"halo": 64}},
            "compute": {"cpus_per_worker": 1},
        }
    )
    run_job(predict, workers=2, progress=False)
    inst = zarr.open_group(tmp_path / "seg.zarr", mode="r")["instances/0"][:]
    table = ds.dataset(tmp_path / "seg.zarr" / "instances.parquet").to_table().to_pandas()
    tiled = {
        "labels": table["class"].to_numpy(),
        "scores": table["score"].to_numpy(),
        "masks": np.stack([inst == i for i in table["id"]]).astype(np.float32),
    }
    assert set(table["class_name"]) <= {"square", "disc"}
    assert _greedy_mask_ap50(tiled, ids, classes) >= 0.8


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("missing_class", "object id 24 .* has no row in 'instance_classes'"),
        ("class_out_of_range", "class 5 .*object classes are 1..2"),
        ("negative_id", "instance id -4 at \\(y=5, x=6\\) is negative"),
        ("dense_shard", "has no 'instances' array"),
    ],
)
def test_bad_instance_shards_are_refused_before_anything_is_written(
    tmp_path: Path, damage: str, words: str
) -> None:
    data = _job(tmp_path)
    path = tmp_path / "shards/s2.zarr"
    group = zarr.open_group(str(path), mode="r+")
    rows = group["instance_classes"][:]
    if damage == "missing_class":
        group.create_array("instance_classes", data=rows[rows[:, 0] != 24], overwrite=True)
    elif damage == "class_out_of_range":
        rows[rows[:, 0] == 17, 1] = 5
        group.create_array("instance_classes", data=rows, overwrite=True)
    elif damage == "negative_id":
        ids = group["instances"][:].astype(np.int32)
        ids[5, 6] = -4
        group.create_array("instances", data=ids, chunks=(64, 64), overwrite=True)
    else:
        label = (group["instances"][:] > 0).astype(np.uint8)
        dense = zarr.open_group(str(path), mode="w")  # a shard for a dense architecture
        dense.create_array("image", data=np.zeros((3, SIZE, SIZE), np.uint8))
        dense.create_array("label", data=label)
    job = parse_job(data)
    assert isinstance(job, TrainJob)
    with pytest.raises(InputError, match=words) as caught:
        run_training(job, progress=False)
    assert "s2.zarr" in str(caught.value)  # the error names the shard
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_two_ddp_workers_train_mask_rcnn_and_write_a_package(tmp_path: Path) -> None:
    job = parse_job(_job(tmp_path, steps=6, scaling={"workers": 2, "cpus_per_worker": 1},
                         checkpoint={"every": 3}, validation={"every": 6, "tile": 96},
                         steps_per_epoch=3))  # fmt: skip
    assert isinstance(job, TrainJob)
    summary = run_training(job, progress=False)
    assert summary.workers == 2 and summary.status == "complete"
    run_dir = tmp_path / "runs/shapes"
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert "val_mask_ap50" in rows[-1] and all(np.isfinite(r["loss"]) for r in rows)
    for rank in (0, 1):  # both ranks trained, each on its own shards
        assert (run_dir / f"shards-rank{rank}.jsonl").read_text().strip()
    net = create_instance_model("mask_rcnn_tiny", in_channels=3, num_classes=3)
    net.load_state_dict(load_file(str(Path(summary.package) / "weights.safetensors")))


@pytest.mark.usefixtures("ray_cluster")
def test_a_longer_rerun_resumes_from_the_checkpoint_and_ends_as_a_straight_run(
    tmp_path: Path,
) -> None:
    shards = {"shards": [str(tmp_path / "shards/s[0-4].zarr")], "val_shards": []}
    short = _job(tmp_path, steps=4, checkpoint={"every": 4}, steps_per_epoch=3, data=shards)
    run_training(parse_job(short), progress=False)  # type: ignore[arg-type]
    first = _rows(tmp_path / "runs/shapes")
    resumed = run_training(parse_job({**short, "steps": 8}), progress=False)  # type: ignore[arg-type]
    rows = _rows(tmp_path / "runs/shapes")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[:4] == first
    # epochs of 3 steps: the rerun went on from step 4 (within epoch 1), not from step 0
    shards_log = (tmp_path / "runs/shapes/shards-rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in shards_log] == [0, 1, 1, 2]
    straight = run_training(parse_job({**short, "steps": 8, "name": "straight"}), progress=False)  # type: ignore[arg-type]
    assert [r["loss"] for r in _rows(tmp_path / "runs/straight")] == [r["loss"] for r in rows]
    a = load_file(str(Path(resumed.package) / "weights.safetensors"))
    b = load_file(str(Path(straight.package) / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ spec rules


def _errors(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_job(data)
    return str(caught.value)


def test_spec_rules_for_instance_architectures(tmp_path: Path) -> None:
    base = _job(tmp_path)
    # Mask R-CNN pads its input: any patch size; class-balanced patches are drawn by object class
    ok = parse_job({**base, "patch": {"size": 72, "sampler": "class_balanced"}})
    assert isinstance(ok, TrainJob) and ok.validation.metric is None
    text = _errors({**base, "loss": {"kind": "dice"}})
    assert "loss: does not apply" in text and "Mask R-CNN trains with its own five losses" in text
    text = _errors({**base, "validation": {"metric": "mean_iou"}})
    assert "validation.metric: mean_iou scores class maps" in text and "mask_ap50" in text
    text = _errors({**base, "model": {"arch": "mask_rcnn_tiny", "num_classes": 1}})
    assert "model.num_classes: counts the background" in text
    text = _errors({**base, "patch": {"size": 96, "background_class": 1}})
    assert "patch.background_class" in text
    assert parse_job({**base, "amp": "bfloat16"}).amp == "bfloat16"  # AMP works for Mask R-CNN
    text = _errors({**base, "model": {"arch": "mask_rcnn_tiny", "num_classes": 3,
                                      "args": {"norm": "layer"}}})  # fmt: skip
    assert "model.args" in text and "norm must be" in text
    dense = {**base, "model": {"arch": "unet_same", "num_classes": 2,
                               "args": {"depth": 2, "base_width": 4}}}  # fmt: skip
    text = _errors({**dense, "validation": {"metric": "box_ap50"}})
    assert "validation.metric: box_ap50 scores detected objects" in text


# ------------------------------------------------------------------------------ the pieces


def test_patch_targets_keep_cut_objects_with_enough_pixels_inside() -> None:
    ids = np.zeros((20, 20), np.uint16)
    ids[8:10, 8:10] = 5  # 4 px, wholly inside: kept however small
    ids[0:2, 3:8] = 9  # 10 px on the border: a sliver of a cut object, dropped
    ids[12:20, 0:3] = 11  # 24 px on the border: kept
    objects = ObjectClasses(np.array([5, 9, 11]), np.array([2, 1, 1]))
    assert 10 < MIN_CUT_OBJECT_PIXELS <= 24
    t = patch_target(ids, objects)
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[8, 8, 10, 10], [0, 12, 3, 20]]  # x1, y1, x2, y2 (exclusive)
    assert torch.equal(t["masks"][0].bool(), torch.from_numpy(ids == 5))
    assert torch.equal(t["masks"][1].bool(), torch.from_numpy(ids == 11))


def test_object_class_lookups_agree_with_a_dict() -> None:
    rng = np.random.default_rng(0)
    table = {int(i): int(rng.integers(1, 4)) for i in rng.choice(5000, 300, replace=False) + 1}
    block = rng.integers(0, 5200, (50, 60)).astype(np.int64)
    block[:5] = 0
    block[7, 7] = -3
    expect = np.vectorize(lambda v: 0 if v == 0 else table.get(int(v), -1))(block)
    ids, classes = np.array(list(table)), np.array(list(table.values()))
    dense = ObjectClasses(ids, classes)  # a lookup table by id
    sparse = ObjectClasses(ids * 2**30, classes)  # ids too large for one: binary search
    assert np.array_equal(dense.lookup(block), expect)
    assert np.array_equal(sparse.lookup(block * 2**30), expect)
    assert np.array_equal(ObjectClasses.all_one().lookup(block), np.sign(block))


def test_counting_ap_window_by_window_equals_detection_ap_over_the_windows() -> None:
    rng = np.random.default_rng(1)
    preds, targets = [], []
    for _ in range(6):
        g, d = int(rng.integers(0, 5)), int(rng.integers(0, 7))
        masks = torch.from_numpy(rng.random((g, 24, 24)) < 0.3)
        truth = {"labels": torch.from_numpy(rng.integers(1, 3, g)), "masks": masks,
                 "boxes": torch.from_numpy(rng.uniform(0, 12, (g, 2))).float().repeat(1, 2)
                 + torch.tensor([0, 0, 8, 8])}  # fmt: skip
        pick = rng.integers(0, max(g, 1), d)
        noise = torch.from_numpy(rng.random((d, 24, 24)) < 0.1)
        pmasks = (masks[pick] ^ noise).float() if g else noise.float()
        pboxes = truth["boxes"][pick] if g else torch.zeros(d, 4) + torch.tensor([0, 0, 8, 8])
        pred = {"scores": torch.from_numpy(rng.random(d)).float(),
                "labels": torch.from_numpy(rng.integers(1, 3, d)), "masks": pmasks,
                "boxes": pboxes + torch.from_numpy(rng.normal(0, 2, (d, 4))).float()}  # fmt: skip
        preds.append(pred)
        targets.append(truth)
    for kind in ("mask", "box"):
        counter = APCounter(kind)  # type: ignore[arg-type]
        for p, t in zip(preds, targets, strict=True):
            counter.add(p, t)
        expect = detection_ap(preds, targets, iou_type=kind, iou_threshold=0.5)  # type: ignore[arg-type]
        assert counter.per_class() == pytest.approx(expect)
    assert windows(5, 7, 4) == [(0, 4, 0, 4), (0, 4, 4, 7), (4, 5, 0, 4), (4, 5, 4, 7)]


def test_the_loader_moves_ids_with_the_image_and_gives_their_targets(tmp_path: Path) -> None:
    _, ids, classes = _shapes(tmp_path / "s.zarr", 3)
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").create_array(
        "image", data=(ids % 251).astype(np.uint8)[None], overwrite=True
    )  # the image is the ids: any geometric change to one and not the other shows
    shards = open_shards([str(tmp_path / "s.zarr")], num_classes=3, patch_size=40,
                         instances=True)  # fmt: skip
    assert shards[0].class_counts()[1:].sum() == np.count_nonzero(ids)
    sampler = make_sampler("foreground", shards, 40, seed=0, p=1.0)
    with PatchLoader(sampler, batch_size=4, augment=Augment(), num_batches=3) as loader:
        for _ in range(3):
            x, y, _w = loader.next_batch()
            assert loader.targets is not None and len(loader.targets) == 4
            for k in range(4):
                label = y[k].numpy()
                assert np.array_equal(x[k, 0].numpy(), (label % 251).astype(np.float32))
                assert (label > 0).any()  # centred on an object
                t = loader.targets[k]
                kept = [int(i) for i in np.unique(label) if i and (
                    (label == i).sum() >= MIN_CUT_OBJECT_PIXELS or not (
                        (label[0] == i).any() or (label[-1] == i).any()
                        or (label[:, 0] == i).any() or (label[:, -1] == i).any()))]  # fmt: skip
                assert t["labels"].tolist() == [classes[i] for i in kept]
                for mask, i in zip(t["masks"], kept, strict=True):
                    assert np.array_equal(mask.numpy().astype(bool), label == i)
