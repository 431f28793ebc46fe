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

__all__ = ["CheckpointStore"]

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
COMPLETE = "COMPLETE"


class CheckpointStore:
    """Checkpoints of one run (``root`` = ``<storage>/<name>``)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **(storage_options or {}))

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
