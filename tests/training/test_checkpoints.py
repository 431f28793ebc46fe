"""A run's checkpoints and metrics, on a local folder and on an fsspec store without appends."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from tilewise.training.checkpoints import CheckpointStore, MetricsLog, read_metrics


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    return f"memory://tw-ckpt-{uuid.uuid4().hex[:8]}/runs/r"


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "b": torch.arange(4, dtype=torch.float32)}


def test_the_newest_complete_checkpoint_is_read_and_old_ones_dropped(root: str) -> None:
    store = CheckpointStore(root)
    assert store.latest() is None
    for step in (10, 20, 30):
        store.save(step, _weights(step), {"step": step, "best": 0.5, "lr": [0.1]}, keep=2)
    assert store.steps() == [20, 30]
    # a checkpoint whose writer died before COMPLETE is never taken
    store.fs.makedirs(f"{store.base}/checkpoints/step-{40:09d}", exist_ok=True)
    store.fs.pipe_file(f"{store.base}/checkpoints/step-{40:09d}/weights.safetensors", b"junk")
    latest = store.latest()
    assert latest is not None
    weights, state = latest
    assert torch.equal(weights["w"], torch.full((2, 3), 30.0))
    assert state == {"step": 30, "best": 0.5, "lr": [0.1]}


def test_best_weights_come_with_the_metrics_that_chose_them(root: str) -> None:
    store = CheckpointStore(root)
    assert store.best() is None
    store.save_best(_weights(1.0), {"step": 5, "val_mean_iou": 0.7})
    store.save_best(_weights(2.0), {"step": 9, "val_mean_iou": 0.8})
    best = store.best()
    assert best is not None
    assert torch.equal(best[0]["w"], torch.full((2, 3), 2.0)) and best[1]["step"] == 9


def test_metrics_log_keeps_every_row_and_a_resume_drops_the_redone_steps(root: str) -> None:
    store = CheckpointStore(root)
    log = MetricsLog(store, resumed_step=0)
    for step in range(1, 8):
        log.add({"step": step, "loss": 1.0 / step})
        if step == 4:
            log.flush()  # a checkpoint
    log.flush()
    assert [r["step"] for r in read_metrics(store)] == list(range(1, 8))
    resumed = MetricsLog(store, resumed_step=4)
    assert [r["step"] for r in read_metrics(store)] == [1, 2, 3, 4]
    resumed.add({"step": 5, "loss": 0.2})
    resumed.flush()
    assert [r["step"] for r in read_metrics(store)] == [1, 2, 3, 4, 5]


def test_small_run_files_are_appended_to(root: str) -> None:
    store = CheckpointStore(root)
    store.append_line("shards-rank0.jsonl", '{"epoch": 0}')
    store.append_line("shards-rank0.jsonl", '{"epoch": 1}')
    text = store.fs.cat_file(f"{store.base}/shards-rank0.jsonl").decode()
    assert text == '{"epoch": 0}\n{"epoch": 1}\n'
