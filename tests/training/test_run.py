"""Train jobs end to end: Ray Train (in-process and 2 DDP workers), checkpoints, resume, package.

The data are synthetic shards whose labels are known: bright disks (class 1) on a darker noisy
background. Whether a network learned them is judged independently of the training code: a
predict job runs the written package, and its labels are compared with the shards' own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from safetensors.torch import load_file

from tilewise.errors import ConfigError, InputError
from tilewise.spec import TrainJob, job_errors, load_job, parse_job
from tilewise.training.run import prepare_training, run_training

NORMALIZE = {"mean": [0.35], "std": [0.25]}


def _disks(path: Path, seed: int, size: int = 96) -> np.ndarray:
    """A shard with an RGB image of bright disks on noise, and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((size, size), np.uint8)
    for _ in range(6):
        cy, cx = rng.integers(10, size - 10, 2)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(5, 12)) ** 2] = 1
    image = rng.normal(60, 15, (3, size, size))
    image[:, label == 1] += 100
    group = zarr.open_group(path, mode="w")
    group.create_array("image", data=np.clip(image, 0, 255).astype(np.uint8), chunks=(3, 64, 64))
    group.create_array("label", data=label, chunks=(64, 64))
    return label


def _job(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    for i in range(5):
        if not (tmp_path / f"shards/s{i}.zarr").exists():
            _disks(tmp_path / f"shards/s{i}.zarr", i)
    job: dict[str, Any] = {
        "kind": "train",
        "name": "disks",
        "data": {"shards": [str(tmp_path / "shards/*.zarr")], "val_fraction": 0.2},
        "model": {"arch": "unet_same", "num_classes": 2, "args": {"depth": 2, "base_width": 8}},
        "normalize": NORMALIZE,
        "patch": {"size": 48},
        "optimizer": {"name": "adam", "lr": 0.01},
        "steps": 60,
        "batch_size": 4,
        "scaling": {"workers": 0, "cpus_per_worker": 1},
        "checkpoint": {"every": 20},
        "validation": {"every": 30},
        "storage": str(tmp_path / "runs"),
    }
    job.update(changes)
    return job


def _iou_of_package(tmp_path: Path, package: str, shard: str) -> float:
    """Mean IU (FCN's, over both classes) of a predict job with ``package`` on a shard's image,
    against the shard's labels, counted here with numpy."""
    from tilewise.pipeline.driver import run_job

    image = zarr.open_group(shard, mode="r")
    label = image["label"][:]
    zarr.create_array(tmp_path / "val-image.zarr", data=image["image"][:],
                      dimension_names=("c", "y", "x"), overwrite=True)  # fmt: skip
    job = parse_job(
        {
            "kind": "predict",
            "input": {"path": str(tmp_path / "val-image.zarr")},
            "model": {"package": package},
            "tiling": {"tile": 32},
            "output": {"path": str(tmp_path / "pred.zarr"), "labels": "uint8", "overwrite": True},
        }
    )
    run_job(job, progress=False)
    pred = zarr.open_group(tmp_path / "pred.zarr", mode="r")["labels/0"][:]
    ious = [((pred == k) & (label == k)).sum() / ((pred == k) | (label == k)).sum() for k in (0, 1)]
    return float(np.mean(ious))


@pytest.mark.usefixtures("ray_cluster")
def test_in_process_training_learns_the_disks_and_its_package_predicts_them(
    tmp_path: Path,
) -> None:
    job = parse_job(_job(tmp_path, steps=150))
    assert isinstance(job, TrainJob)
    summary = run_training(job, progress=False)
    assert summary.status == "complete" and summary.steps == 150
    rows = [json.loads(x) for x in (tmp_path / "runs/disks/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 151))
    held_out = prepare_training(job)["val_shards"][0].location
    assert _iou_of_package(tmp_path, summary.package, held_out) >= 0.9
    # the package keeps the best validated weights, and says which step they are from
    manifest = yaml.safe_load((Path(summary.package) / "model.yaml").read_text())
    assert manifest["training"]["weights_of_step"] == summary.best["step"]
    assert manifest["normalize"]["mean"] == NORMALIZE["mean"]
    # the curves and the TensorBoard log of the run (their contents: tests/training/test_report)
    from PIL import Image

    with Image.open(tmp_path / "runs/disks/curves.png") as png:
        assert png.size[0] > 0 and png.size[1] > 0
    assert list((tmp_path / "runs/disks/tensorboard").glob("events.out.tfevents.*"))
    # running the finished job again does nothing
    assert run_training(job, progress=False).status == "complete (already)"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_two_ddp_workers_read_disjoint_shards_and_learn(tmp_path: Path) -> None:
    job = parse_job(_job(tmp_path, steps=120, scaling={"workers": 2, "cpus_per_worker": 1},
                         data={"shards": [str(tmp_path / "shards/s[0-3].zarr")],
                               "val_shards": [str(tmp_path / "shards/s4.zarr")]},
                         steps_per_epoch=30))  # fmt: skip
    assert isinstance(job, TrainJob)
    summary = run_training(job, progress=False)
    assert summary.workers == 2 and summary.status == "complete"
    run_dir = tmp_path / "runs/disks"
    seen: dict[int, dict[int, set[str]]] = {}
    for rank in (0, 1):
        for line in (run_dir / f"shards-rank{rank}.jsonl").read_text().splitlines():
            if line:
                row = json.loads(line)
                assert set(row["read"]) <= set(row["assigned"])  # only its own shards
                seen.setdefault(row["epoch"], {})[rank] = set(row["assigned"])
    assert sorted(seen) == [0, 1, 2, 3]
    for epoch, by_rank in seen.items():
        assert not by_rank[0] & by_rank[1], f"epoch {epoch}: a shard read by both workers"
        assert len(by_rank[0] | by_rank[1]) == 4
    assert len({frozenset(by_rank[0]) for by_rank in seen.values()}) > 1  # reshuffled
    assert _iou_of_package(tmp_path, summary.package, str(tmp_path / "shards/s4.zarr")) >= 0.9


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    data = _job(tmp_path, steps=80, checkpoint={"every": 10}, validation={"every": 1000})
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({**data, "name": "killed"}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "tilewise.cli", "run", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "runs/killed/metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 35:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a real kill, between checkpoints
    proc.wait()
    steps_done = len(log.read_text().splitlines())
    assert 35 <= steps_done < 80, steps_done
    resumed = run_training(load_job(path), progress=False)  # type: ignore[arg-type]
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))  # none repeated, none skipped
    straight = run_training(parse_job({**data, "name": "straight"}), progress=False)  # type: ignore[arg-type]
    a = load_file(str(Path(resumed.package) / "weights.safetensors"))
    b = load_file(str(Path(straight.package) / "weights.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_on_ray_train_workers_says_interrupted_and_the_rerun_resumes(
    tmp_path: Path,
) -> None:
    # Ray Train puts its own Ctrl-C handler in the driver, which ended the run with exit code 1
    # and nothing said; it must read as the CLI's interruption, like an in-process run.
    data = _job(tmp_path, steps=40, checkpoint={"every": 5}, validation={"every": 1000},
                scaling={"workers": 1, "cpus_per_worker": 1}, patch={"size": 32},
                batch_size=2)  # fmt: skip
    path = tmp_path / "ctrl-c.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "tilewise.cli", "run", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs/disks/metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert out == "" and "interrupted; run the same command again to resume" in err
    assert "Traceback" not in err
    steps_done = len(log.read_text().splitlines())
    assert 12 <= steps_done < 40, steps_done
    # resumed in-process: where a run's steps are computed is not part of it
    in_process = {**data, "scaling": {"workers": 0, "cpus_per_worker": 1}}
    resumed = run_training(parse_job(in_process), progress=False)  # type: ignore[arg-type]
    assert resumed.status == "complete"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))


def _write(tmp_path: Path, job: dict[str, Any]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_a_changed_job_does_not_resume_or_reuse_the_run_of_another(tmp_path: Path) -> None:
    data = _job(tmp_path, steps=4, checkpoint={"every": 2}, validation={"every": 2},
                patch={"size": 32}, batch_size=2)  # fmt: skip
    first = run_training(parse_job(data), progress=False)  # type: ignore[arg-type]
    assert first.status == "complete" and first.steps == 4
    run_dir = tmp_path / "runs/disks"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # what decides the weights changed: refused, and the run folder is left as it was
    for change, words in [
        ({"optimizer": {"name": "adam", "lr": 0.02}}, "optimizer.lr is 0.02 here but 0.01 in"),
        ({"model": {**data["model"], "args": {"depth": 2, "base_width": 4}}},
         "model.args.base_width is 4 here but 8 in the run"),
        ({"steps": 2}, "has trained 4 steps already, more than the 2"),  # (longer: goes on)
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            run_training(parse_job({**data, **change}), progress=False)  # type: ignore[arg-type]
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # where it runs and how often it is checkpointed do not: the same run, already finished
    moved = {**data, "checkpoint": {"every": 3}, "scaling": {"workers": 0, "cpus_per_worker": 2}}
    assert run_training(parse_job(moved), progress=False).status == "complete (already)"  # type: ignore[arg-type]
    # --overwrite starts the run afresh, as the changed job
    changed = {**data, "steps": 2, "optimizer": {"name": "adam", "lr": 0.02}}
    again = run_training(parse_job(changed), progress=False, overwrite=True)  # type: ignore[arg-type]
    assert again.status == "complete" and again.steps == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    manifest = yaml.safe_load((Path(again.package) / "model.yaml").read_text())
    assert manifest["training"]["steps"] == 2
    assert json.loads((run_dir / "job.json").read_text())["optimizer"]["lr"] == 0.02


def test_a_sum_with_weighted_cross_entropy_trains_on_the_weight_maps(tmp_path: Path) -> None:
    data = _job(tmp_path, steps=2, checkpoint={"every": 2}, validation={"every": 2},
                patch={"size": 32}, batch_size=2,
                loss={"kind": "sum", "terms": [{"kind": "weighted_cross_entropy"},
                                               {"kind": "dice", "weight": 0.5}]})  # fmt: skip
    for i in range(5):  # U-Net's weight maps in every shard
        group = zarr.open_group(tmp_path / f"shards/s{i}.zarr", mode="r+")
        group.create_array("weight", data=np.full((96, 96), 2.0, np.float32), chunks=(64, 64))
    summary = run_training(parse_job(data), progress=False)  # type: ignore[arg-type]
    assert summary.status == "complete" and summary.steps == 2


def test_spec_rules_name_the_field(tmp_path: Path) -> None:
    errors = job_errors(_write(tmp_path, _job(tmp_path, steps=None)))
    assert any("steps: give the length of the run as steps or as epochs" in e for e in errors)
    bad = _job(tmp_path, patch={"size": 50})
    bad["model"] = {"arch": "unet", "num_classes": 2}
    errors = job_errors(_write(tmp_path, bad))
    assert any("patch.size: 50 px is not a valid input size for arch 'unet'" in e for e in errors)
    errors = job_errors(_write(tmp_path, _job(tmp_path, loss={"kind": "dise"})))
    assert len(errors) == 1 and "loss.kind: unknown loss kind 'dise'" in errors[0]
    assert "dice" in errors[0]
    weights = {"kind": "cross_entropy", "class_weights": [1.0]}
    terms = {"kind": "sum", "terms": [{"kind": "dice"}, weights]}
    errors = job_errors(_write(tmp_path, _job(tmp_path, loss=terms)))
    assert errors == [
        f"{tmp_path / 'job.yaml'}: loss.terms[1].class_weights: needs one weight per class (2, "
        "model.num_classes); got 1: [1.0]."
    ]
    no_shards = _job(tmp_path)
    no_shards["data"] = {"shards": []}
    assert any("data.shards" in e for e in job_errors(_write(tmp_path, no_shards)))


@pytest.mark.parametrize(
    ("damage", "error", "words"),
    [
        ("label_too_big", InputError, "label value"),
        ("shape", InputError, "shape"),
        ("no_match", ConfigError, "match nothing"),
        ("patch", ConfigError, "does not fit"),
        ("workers", ConfigError, "more than the training shards"),
        ("held_out_trained", ConfigError, "also training shards"),
        ("normalize", ConfigError, r"normalize.std needs one value per band of the shards \(3\)"),
        ("no_weight_maps", ConfigError, "needs a 'weight' array"),
        ("address_in_process", ConfigError, "runs in-process"),
    ],
)
def test_bad_data_is_refused_before_any_worker_starts(
    tmp_path: Path, damage: str, error: type[Exception], words: str
) -> None:
    data = _job(tmp_path)
    if damage == "label_too_big":
        zarr.open_group(tmp_path / "shards/s2.zarr", mode="r+")["label"][5, 5] = 7
    elif damage == "shape":
        g = zarr.open_group(tmp_path / "shards/s1.zarr", mode="r+")
        g.create_array("label", data=np.zeros((90, 96), np.uint8), overwrite=True)
    elif damage == "no_match":
        data["data"]["shards"] = [str(tmp_path / "nowhere/*.zarr")]
    elif damage == "patch":
        data["patch"] = {"size": 128}
    elif damage == "held_out_trained":  # s4 is held out, but the pattern also trains on it
        data["data"]["val_shards"] = [str(tmp_path / "shards/s4.zarr")]
    elif damage == "normalize":
        data["normalize"] = {"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2]}
    elif damage == "no_weight_maps":  # a term of a sum needs the weight maps too
        data["loss"] = {"kind": "sum", "terms": [{"kind": "dice"},
                                                 {"kind": "weighted_cross_entropy"}]}  # fmt: skip
    elif damage == "workers":
        data["scaling"] = {"workers": 5}
    job = parse_job(data)
    assert isinstance(job, TrainJob)
    address = "127.0.0.1:1" if damage == "address_in_process" else None
    with pytest.raises(error, match=words):
        run_training(job, progress=False, address=address)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_worker_is_replaced_and_the_run_ends_as_if_nothing_happened(
    tmp_path: Path,
) -> None:
    import threading

    import psutil

    data = _job(tmp_path, steps=60, scaling={"workers": 2, "cpus_per_worker": 1},
                checkpoint={"every": 10}, validation={"every": 1000},
                data={"shards": [str(tmp_path / "shards/s[0-3].zarr")], "val_shards": []},
                steps_per_epoch=15)  # fmt: skip
    log = tmp_path / "runs/killed/metrics.jsonl"
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if log.exists() and len(log.read_text().splitlines()) >= 25:
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    resumed = run_training(parse_job({**data, "name": "killed"}), progress=False)  # type: ignore[arg-type]
    killer.join()
    assert killed, "no training worker was found to kill"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    straight = run_training(parse_job({**data, "name": "straight"}), progress=False)  # type: ignore[arg-type]
    a = load_file(str(Path(resumed.package) / "weights.safetensors"))
    b = load_file(str(Path(straight.package) / "weights.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
