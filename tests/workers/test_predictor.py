"""The predictor actor's class, driven in-process (and on CUDA when there is one)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import write_input
from tilewise.pipeline.job import prepare
from tilewise.pipeline.output import OutputStore
from tilewise.spec import parse_job
from tilewise.workers.predictor import Predictor, resolve_precision


def _job(tmp_path: Path, out: str, **compute: Any) -> Any:
    return parse_job(
        {
            "kind": "predict",
            "input": {"path": str(tmp_path / "in.zarr")},
            "model": {"arch": "unet_same", "num_classes": 2, "args": {"depth": 2, "base_width": 4}},
            "tiling": {"tile": 32, "batch_size": 2},
            "output": {
                "path": str(tmp_path / out),
                "labels": "uint8",
                "probabilities": "uint8",
                "chunk": 64,
            },
            "compute": compute,
        }
    )


def _prepare_output(job: Any) -> Any:
    p = prepare(job)
    out = OutputStore(job.output.path)
    out.prepare(p.layout, fingerprint=p.fingerprint, job={}, carried={}, overwrite=True)
    return p


def _scores_reference(job: Any, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    from tilewise.pipeline.api import predict_array
    from tilewise.pipeline.job import build_model

    p = prepare(job)
    image = zarr.open_array(job.input.path, mode="r")[:].astype(np.float32) / 255
    scores = predict_array(build_model(job, 3), image, tile=32, device=device)
    probs = torch.softmax(torch.from_numpy(scores), 0).numpy()
    assert p.layout.height == scores.shape[1]
    return scores.argmax(0), probs


def test_concurrent_calls_give_the_units_of_sequential_calls(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 200, 190))
    job = _job(tmp_path, "a.zarr")
    p = _prepare_output(job)
    predictor = Predictor([job.model_dump(mode="json")], threads=1, device="cpu")
    threads = [threading.Thread(target=predictor.run_unit, args=(0, k)) for k in range(len(p.grid))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels, probs = _scores_reference(job)
    out = zarr.open_group(tmp_path / "a.zarr", mode="r")
    assert np.abs(out["probabilities/0"][:].astype(int) - np.rint(probs * 255)).max() <= 1
    top = np.sort(probs, 0)
    decided = top[-1] - top[-2] > 1e-3
    assert np.array_equal(out["labels/0"][:][decided], labels[decided])


def test_the_network_is_built_on_the_device_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every torch op of an actor runs on its one device thread: libgomp keeps an OpenMP team
    # for each thread that ran parallel work, and a second team alive makes the device thread's
    # team sleep at its barriers instead of spinning (Predictor._model).
    import tilewise.workers.predictor as predictor_module

    built_on: list[str] = []
    build = predictor_module.build_model

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        built_on.append(threading.current_thread().name)
        return build(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "build_model", recording_build)
    write_input(tmp_path / "in.zarr", shape=(3, 64, 128))
    job = _job(tmp_path, "d.zarr")
    _prepare_output(job)
    predictor = Predictor([job.model_dump(mode="json")], threads=1, device="cpu")
    callers = [threading.Thread(target=predictor.run_unit, args=(0, k)) for k in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(built_on) == 1 and built_on[0].startswith("tilewise-device"), built_on
    assert sorted(OutputStore(str(tmp_path / "d.zarr")).done_units()) == [0, 1]


def test_background_units_are_written_without_the_network(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 64, 128))
    job = _job(tmp_path, "b.zarr")
    _prepare_output(job)
    predictor = Predictor([job.model_dump(mode="json")], threads=1, device="cpu")
    result = predictor.run_unit(0, 1, True)
    assert not result.computed and result.pixels == 64 * 64
    out = zarr.open_group(tmp_path / "b.zarr", mode="r")
    assert (out["labels/0"][:, 64:] == 0).all() and (out["probabilities/0"][0, :, 64:] == 255).all()
    assert sorted(OutputStore(str(tmp_path / "b.zarr")).done_units()) == [1]


def test_a_job_without_batch_size_runs_one_window_per_forward_on_the_cpu(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 64, 64))
    spec = _job(tmp_path, "c.zarr").model_dump(mode="json")
    spec["tiling"]["batch_size"] = None
    predictor = Predictor([spec], threads=1, device="cpu")
    assert predictor._image(0).engine.batch_size == 1
    spec["tiling"]["batch_size"] = 3
    assert Predictor([spec], threads=1, device="cpu")._image(0).engine.batch_size == 3


def test_precision_auto_is_float32_on_cpu() -> None:
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("float16", torch.device("cpu")) is torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_units_match_cpu_float32(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 200, 190))
    for precision in ("float32", "bfloat16", "float16"):
        job = _job(tmp_path, f"{precision}.zarr", precision=precision)
        p = _prepare_output(job)
        predictor = Predictor([job.model_dump(mode="json")], threads=1, device="cuda")
        for k in range(len(p.grid)):
            predictor.run_unit(0, k)
        _, probs = _scores_reference(job)
        got = zarr.open_group(tmp_path / f"{precision}.zarr", mode="r")["probabilities/0"][:]
        error = np.abs(got.astype(int) - np.rint(probs * 255)).max()
        assert error <= (1 if precision == "float32" else 8)


@pytest.mark.parametrize("order", ["bands", "rows"])
def test_units_in_band_order_decode_each_input_chunk_at_most_twice(
    tmp_path: Path, order: str
) -> None:
    """Walking the driver's order with the blocks the predictor keeps, every input chunk is
    decoded once per band of units whose reads reach it (at most twice); row-major order, with
    the same cache, decodes the chunks under every unit row three times."""
    # 64 px chunks, 5 x 12 units: a row of units reads more chunks than the predictor keeps.
    write_input(tmp_path / "in.zarr", shape=(3, 320, 768))
    job = _job(tmp_path, "o.zarr")
    p = _prepare_output(job)
    assert p.plan.y.halo > 0  # the reads of neighbouring units overlap
    predictor = Predictor([job.model_dump(mode="json")], threads=1, device="cpu")
    image = predictor._image(0).prepared.image
    decoded: dict[tuple[int, int], int] = {}
    read = image._read

    def counted(y0: int, y1: int, x0: int, x1: int) -> Any:
        key = (y0 // 64, x0 // 64)
        decoded[key] = decoded.get(key, 0) + 1
        return read(y0, y1, x0, x1)

    image._read = counted  # type: ignore[method-assign]
    units = p.grid.band_order() if order == "bands" else list(range(len(p.grid)))
    for k in units:
        predictor.run_unit(0, k)
    assert len(decoded) == 5 * 12  # every chunk was read
    interior = [n for (by, bx), n in decoded.items() if 0 < by < 4 and 0 < bx < 11]
    if order == "bands":
        assert max(decoded.values()) <= 2
    else:
        assert interior and min(interior) == 3


def test_blocks_kept_cover_two_columns_of_a_band_within_the_byte_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tilewise.workers import predictor as module

    write_input(tmp_path / "in.zarr", shape=(3, 320, 768))
    p = prepare(_job(tmp_path, "o.zarr"))
    halo = p.plan.y.halo
    assert 0 < halo < 64
    # A band of 2 units with its halos spans 4 chunk rows; a unit column with the next one and
    # their halos, 4 chunk columns (64 px chunks and units).
    assert module.blocks_to_keep(p) == 4 * 4
    block_bytes = 3 * 64 * 64
    monkeypatch.setattr(module, "KEPT_BYTES", 5 * block_bytes + 1)
    assert module.blocks_to_keep(p) == 5
    monkeypatch.setattr(module, "KEPT_BYTES", 1)
    assert module.blocks_to_keep(p) == 1
