"""A training run's checkpoints and best weights, in its folder under the job's storage.

``<storage>/<name>/checkpoints/step-000000120/`` holds ``weights.safetensors`` (the network),
``state.pt`` (optimiser, schedule, step, best score; read back with ``weights_only=True``, so
nothing arbitrary is unpickled) and ``COMPLETE``, written last: a checkpoint whose writer died
half-way is never read. ``<storage>/<name>/best/`` holds the best validated weights.

The run keeps these itself instead of handing them to Ray Train's ``report``: Ray Train's local
mode (``scaling.workers: 0``) persists no checkpoint, and one format for both modes means a run
started in-process can be resumed on a cluster and the other way round. The storage is a local
path or any fsspec URI (shared storage such as s3:// for multi-node runs).
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

__all__ = ["CheckpointStore", "MetricsLog"]

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
COMPLETE = "COMPLETE"


class CheckpointStore:
    """Checkpoints of one run (``root`` = ``<storage>/<name>``)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **(storage_options or {}))

    @property
    def local(self) -> bool:
        """Whether the run folder is on the local file system (files can be appended to)."""
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple | list) else (protocol,))

    def append_line(self, name: str, line: str) -> None:
        """Add a line to a small text file of the run folder (read and rewritten remotely)."""
        path = f"{self.base}/{name}"
        if self.local:
            self.fs.makedirs(self.base, exist_ok=True)
            with self.fs.open(path, "a") as fh:
                fh.write(line + "\n")
            return
        old = self.fs.cat_file(path).decode() if self.fs.exists(path) else ""
        self.fs.pipe_file(path, (old + line + "\n").encode())

    def _dir(self, step: int) -> str:
        return f"{self.base}/checkpoints/step-{step:09d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        folder = f"{self.base}/checkpoints"
        if not self.fs.exists(folder):
            return []
        found = []
        for path in self.fs.ls(folder, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and self.fs.exists(f"{path}/{COMPLETE}"):
                found.append(int(name[5:]))
        return sorted(found)

    def save(
        self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int
    ) -> None:
        """Write the checkpoint of ``step``, then drop all but the newest ``keep``."""
        from safetensors.torch import save as save_tensors

        folder = self._dir(step)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)  # a half-written one of an earlier attempt
        self.fs.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        self.fs.pipe_file(f"{folder}/{WEIGHTS}", save_tensors(tensors))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.fs.pipe_file(f"{folder}/{STATE}", buffer.getvalue())
        self.fs.pipe_file(f"{folder}/{COMPLETE}", b"")
        for old in self.steps()[:-keep]:
            self.fs.rm(self._dir(old), recursive=True)

    def latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest complete checkpoint's weights and state, or None."""
        from safetensors.torch import load as load_tensors

        steps = self.steps()
        if not steps:
            return None
        folder = self._dir(steps[-1])
        weights = load_tensors(self.fs.cat_file(f"{folder}/{WEIGHTS}"))
        state = torch.load(
            io.BytesIO(self.fs.cat_file(f"{folder}/{STATE}")), map_location="cpu", weights_only=True
        )
        return weights, state

    def save_best(self, weights: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        """The best validated weights so far, with the metrics that made them best."""
        from safetensors.torch import save as save_tensors

        folder = f"{self.base}/best"
        self.fs.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        # metrics.json goes first and comes back last: it names the step of the weights there,
        # so weights half replaced are never taken for best
        if self.fs.exists(f"{folder}/metrics.json"):
            self.fs.rm(f"{folder}/metrics.json")
        self.fs.pipe_file(f"{folder}/{WEIGHTS}", save_tensors(tensors))
        self.fs.pipe_file(f"{folder}/metrics.json", json.dumps(metrics).encode())

    def best(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The best validated weights and their metrics, or None."""
        from safetensors.torch import load as load_tensors

        folder = f"{self.base}/best"
        if not self.fs.exists(f"{folder}/metrics.json"):
            return None
        metrics = json.loads(self.fs.cat_file(f"{folder}/metrics.json"))
        return load_tensors(self.fs.cat_file(f"{folder}/{WEIGHTS}")), metrics


class MetricsLog:
    """``metrics.jsonl`` of a run: one JSON object per step.

    Locally each row is appended as it comes; on object stores (no appends) the file is
    rewritten at each :meth:`flush` (every checkpoint). A resumed run first drops the rows of
    steps after its checkpoint, which it computes again.
    """

    NAME = "metrics.jsonl"

    def __init__(self, store: CheckpointStore, resumed_step: int) -> None:
        self.store = store
        self.path = f"{store.base}/{self.NAME}"
        self.rows = [r for r in read_metrics(store) if int(r["step"]) <= resumed_step]
        store.fs.makedirs(store.base, exist_ok=True)
        self._write_all()

    def _write_all(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        self.store.fs.pipe_file(self.path, text.encode())

    def add(self, row: dict[str, Any]) -> None:
        """Record one step's metrics."""
        self.rows.append(row)
        if self.store.local:
            with self.store.fs.open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        """Make the file hold every row so far (a no-op locally, where rows are appended)."""
        if not self.store.local:
            self._write_all()


def read_metrics(store: CheckpointStore) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (none when it has none yet)."""
    path = f"{store.base}/{MetricsLog.NAME}"
    if not store.fs.exists(path):
        return []
    text = store.fs.cat_file(path).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
