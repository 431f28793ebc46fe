"""The predictor: what runs inside each Ray actor of a predict job.

An actor gets the job once, opens the input and output stores itself, builds the network once,
and is then handed unit indices only: pixels never travel through the driver or the object store
(DESIGN.md rule 2).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tilewise.pipeline.api import default_device
from tilewise.pipeline.engine import TileEngine
from tilewise.pipeline.job import build_model, prepare
from tilewise.pipeline.output import OutputStore
from tilewise.spec import PredictJob

__all__ = ["Predictor"]


class Predictor:
    """Computes and writes write units of one job.

    Args:
        job: the job as JSON-able data (``PredictJob.model_dump(mode="json")``; paths absolute).
        threads: torch intra-op threads (the CPUs Ray gave this actor).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    def __init__(self, job: dict[str, Any], *, threads: int = 1, device: str = "auto") -> None:
        spec = PredictJob.model_validate(job)
        torch.set_num_threads(max(1, threads))
        self.prepared = prepare(spec)
        dev = default_device() if device == "auto" else torch.device(device)
        model = build_model(spec, self.prepared.in_channels)
        self.engine = TileEngine(
            model,
            self.prepared.plan,
            batch_size=spec.tiling.batch_size,
            device=dev,
            preprocess=self.prepared.normalizer,
        )
        self.output = OutputStore(spec.output.path, spec.output.storage_options)
        self.device = str(dev)

    def run_unit(self, index: int) -> tuple[int, int, float]:
        """Compute unit ``index``, write it once, record it done; return (index, px, seconds)."""
        t0 = time.perf_counter()
        unit = self.prepared.grid.unit(index)
        scores = self.engine.predict_unit(self.prepared.image, unit)
        self.output.write_unit(unit, scores)
        return index, unit.pixels, time.perf_counter() - t0

    def describe(self) -> str:
        """Where this actor computes (for the report)."""
        return self.device
