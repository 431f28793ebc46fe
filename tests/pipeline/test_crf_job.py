"""`postprocess.crf` in predict jobs: each unit is predicted with the CRF halo around it, so the
tiled, CRF-refined output equals the CRF of whole-image inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import write_input
from tests.reference import whole_image
from tilewise import models
from tilewise.errors import ConfigError
from tilewise.pipeline.crf import CRFParams, dense_crf
from tilewise.pipeline.driver import run_job
from tilewise.spec import parse_job

CRF = {"iterations": 3, "radius": 2, "step": 2, "theta_beta": 20.0}


def _job(tmp_path: Path, num_classes: int, crf: dict[str, Any] | None) -> Any:
    return parse_job(
        {
            "kind": "predict",
            "input": {"path": str(tmp_path / "in.zarr")},
            "model": {
                "arch": "unet_same",
                "num_classes": num_classes,
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
            "postprocess": {"crf": crf},
        }
    )


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("num_classes", [3, 1])
def test_tiled_crf_equals_the_crf_of_whole_image_inference(
    tmp_path: Path, num_classes: int
) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190), seed=2)
    report = run_job(_job(tmp_path, num_classes, CRF), workers=2, progress=False)
    raw = zarr.open_array(tmp_path / "in.zarr", mode="r")[:]
    torch.manual_seed(3)
    model = models.create(
        "unet_same", in_channels=3, num_classes=num_classes, depth=2, base_width=4
    )
    scores = torch.from_numpy(whole_image(model, raw.astype(np.float32) / 255, model.tiling))
    if num_classes == 1:
        probs = torch.cat([torch.sigmoid(-scores), torch.sigmoid(scores)])
    else:
        probs = torch.softmax(scores, 0)
    q = dense_crf(probs, torch.from_numpy(raw).float(), CRFParams(**CRF)).numpy()
    out = zarr.open_group(tmp_path / "out.zarr", mode="r")
    stored = out["probabilities/0"][:].astype(np.float32)
    expected = q[1:] if num_classes == 1 else q
    assert np.abs(stored - expected).max() < 2e-3  # float16 storage
    # The CRF changed the result: without it the probabilities are those of the network.
    assert np.abs(expected - (probs[1:] if num_classes == 1 else probs).numpy()).max() > 0.05
    top = np.sort(q, axis=0)
    decided = top[-1] - top[-2] > 1e-4
    assert np.array_equal(out["labels/0"][:][decided], q.argmax(0)[decided])
    # Each unit predicted its CRF halo too (reported as the overlap overhead).
    assert report.overlap > 1.5


def test_crf_settings_are_checked(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr")
    with pytest.raises(ConfigError, match=r"postprocess\.crf\.radius"):
        _job(tmp_path, 3, {"radius": 0})
    assert _job(tmp_path, 3, {}).postprocess.crf is not None  # `crf: {}` = the defaults
