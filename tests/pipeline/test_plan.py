"""`tilewise run --plan`: the activation tracker, the unit and window counts, resume, the CLI.

The tracker is checked against sizes worked out by hand, against itself on real CPU tensors, and
against torch.profiler's allocation record; the counts against a brute-force walk over the units;
the memory model against the real engine run on the meta device.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from tests.conftest import write_input
from tilewise.errors import InputError
from tilewise.pipeline import cluster
from tilewise.pipeline import plan as planmod
from tilewise.pipeline.engine import TileEngine
from tilewise.pipeline.job import prepare
from tilewise.pipeline.plan import (
    ClusterResources,
    LiveTensorTracker,
    MemoryItem,
    forward_memory,
    peak_of,
    plan_job,
)
from tilewise.spec import parse_job

F32 = 4  # bytes per float32


def _job(tmp_path: Path, **changes: Any) -> Any:
    data: dict[str, Any] = {
        "kind": "predict",
        "name": "t",
        "input": {"path": str(tmp_path / "in.zarr")},
        "model": {
            "arch": "unet_same",
            "num_classes": 3,
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
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return parse_job(data)


def _tracked_peak(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Peak of ``model(x)`` with the input counted, and what is live once the output is dropped."""
    tracker = LiveTensorTracker()
    with torch.inference_mode(), tracker:
        tracker.track(x)
        y = model(x)
        del y
    return tracker.peak, tracker.live


# -- the tracker against hand-worked sizes -------------------------------------------------------


def _chain(inplace: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(16, 4, 3, padding=1),
    ).eval()


class _Skip(nn.Module):
    """An encoder feature kept alive across the bottleneck and concatenated (as in U-Net)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Conv2d(24, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        u = nn.functional.interpolate(self.mid(nn.functional.max_pool2d(e, 2)), scale_factor=2)
        return self.head(torch.cat([e, u], 1))


def test_tracker_peak_of_a_chain_is_input_plus_the_two_largest_neighbours() -> None:
    with torch.device("meta"):
        model = _chain()
    x = torch.empty(2, 3, 32, 32, device="meta")
    px = 2 * 32 * 32 * F32
    # conv1 8 ch, relu 8 ch, conv2 16 ch, relu 16 ch, conv3 4 ch: a layer's output is freed once
    # the next layer has returned, so the peak is the input + conv2's output + its ReLU's.
    peak, live = _tracked_peak(model, x)
    assert peak == 3 * px + 16 * px + 16 * px
    assert live == 3 * px  # the output was dropped: only the input is left
    m = forward_memory(model, (2, 3, 32, 32))
    assert (m.peak, m.input, m.output) == (3 * px + 32 * px, 3 * px, 4 * px)


def test_tracker_keeps_a_skip_feature_alive() -> None:
    with torch.device("meta"):
        model = _Skip().eval()
    full, half = 32 * 32 * F32, 16 * 16 * F32
    # x 3, e 8 (kept), pool 8/4, mid 16/4 (pool freed), up 16 (mid freed), cat 24, head 2:
    # at the head, x + e + up + cat + head are alive.
    steps = [
        3 * full + 8 * full,
        3 * full + 8 * full + 8 * half,
        3 * full + 8 * full + 8 * half + 16 * half,
        3 * full + 8 * full + 16 * half + 16 * full,
        3 * full + 8 * full + 16 * full + 24 * full,
        3 * full + 8 * full + 16 * full + 24 * full + 2 * full,
    ]
    peak, live = _tracked_peak(model, torch.empty(1, 3, 32, 32, device="meta"))
    assert peak == max(steps) == (3 + 8 + 16 + 24 + 2) * full
    assert live == 3 * full


def test_in_place_relu_makes_no_tensor() -> None:
    with torch.device("meta"):
        inplace = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(True), nn.Conv2d(8, 4, 1))
        fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.empty(1, 3, 32, 32, device="meta")
    full = 32 * 32 * F32
    assert _tracked_peak(inplace.eval(), x)[0] == (3 + 8 + 4) * full
    assert _tracked_peak(fresh.eval(), x)[0] == (3 + 8 + 8) * full  # conv1 and its ReLU


def test_views_share_their_storage() -> None:
    tracker = LiveTensorTracker()
    with torch.inference_mode(), tracker:
        a = torch.zeros(4, 256, device="meta")
        b = a[1:3].t()  # views: nothing new
        c = a.reshape(1024)
        assert tracker.live == 4 * 256 * F32
        del a, b
        assert tracker.live == 4 * 256 * F32  # c still holds the storage
        del c
        assert tracker.live == 0
    assert tracker.peak == 4 * 256 * F32


# -- the tracker on real tensors, and torch.profiler ----------------------------------------------


def _unet(device: str) -> nn.Module:
    from tilewise import models

    with torch.device(device):
        return models.create(
            "unet_same", in_channels=3, num_classes=3, depth=2, base_width=4
        ).eval()


@pytest.mark.parametrize("build", [_chain, _Skip, lambda: _unet("cpu")])
def test_meta_run_equals_real_cpu_run(build: Any) -> None:
    torch.manual_seed(0)
    real = build().eval()
    with torch.device("meta"):
        meta = build().eval().to("meta")
    shape = (2, 3, 64, 64)
    on_cpu = forward_memory(real, shape, device="cpu")
    on_meta = forward_memory(meta, shape, device="meta")
    assert on_cpu == on_meta
    assert on_meta.peak > on_meta.input + on_meta.output


class _Pointwise(nn.Module):
    """Ops whose CPU kernels allocate nothing but their outputs (no im2col, no oneDNN reorders)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.relu(self.a(x))
        d = nn.functional.interpolate(torch.relu(self.b(nn.functional.max_pool2d(e, 2))), None, 2)
        return self.c(torch.cat([e, d], 1))


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_tracker_agrees_with_the_profiler_allocation_record() -> None:
    from torch.profiler import ProfilerActivity, profile

    model = _Pointwise().eval()
    x = torch.zeros(2, 3, 32, 32)
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        model(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y = model(x)
            del y
        tracked, _ = _tracked_peak(model, x)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    assert live == 0  # every allocation was freed again
    assert peak == tracked - x.numel() * F32  # the profiler does not see the input


# -- units, windows and overlap --------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tiling__stitch": "blend", "tiling__halo": 23},
        {"tiling__stitch": "sliding", "tiling__halo": None, "output__chunk": 48},
        {"output__chunk": 16},  # units smaller than the tile: windows computed again per unit
    ],
)
def test_counts_equal_a_brute_force_walk_over_the_units(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    job = _job(tmp_path, **changes)
    plan = plan_job(job)
    p = prepare(job)
    per_unit = [len(p.plan.windows(u)) for u in p.grid]
    computed = sum(p.plan.computed_pixels(u) for u in p.grid)
    reads = [
        (
            np.subtract(*p.plan.y.read_range(u.y0, u.y1)[::-1]),
            np.subtract(*p.plan.x.read_range(u.x0, u.x1)[::-1]),
        )
        for u in p.grid
    ]
    im = plan.images[0]
    assert im.units_total == len(list(p.grid)) == im.units_to_compute
    assert (im.windows_min, im.windows_max) == (min(per_unit), max(per_unit))
    assert im.windows_total == im.windows_to_compute == sum(per_unit)
    assert im.units_few_windows == sum(n < 3 for n in per_unit)
    assert im.output_pixels == im.full_output_pixels == 150 * 190 == sum(u.pixels for u in p.grid)
    assert im.full_computed_pixels == computed
    assert im.computed_pixels == computed
    assert im.overlap == pytest.approx(computed / (150 * 190))
    assert im.read_max == (max(r[0] for r in reads), max(r[1] for r in reads))
    assert im.window == (p.plan.y.window, p.plan.x.window)


def test_crop_windows_by_hand(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    im = plan_job(_job(tmp_path)).images[0]
    # Cores of 32 px on one grid; a 64-px unit holds 2 of them per axis, a clipped one fewer:
    # rows 0-63, 64-127, 128-149 -> 2, 2, 1; columns 0-63, 64-127, 128-189 -> 2, 2, 2.
    assert (im.units_total, im.windows_min, im.windows_max) == (9, 2, 4)
    assert im.windows_total == (2 + 2 + 1) * (2 + 2 + 2)
    # unet_same depth 2: stride 4, halo 23 -> lead 24 and windows of 24 + 32 + 23 -> 80 px.
    assert im.window == (80, 80)
    assert im.computed_pixels == im.windows_total * 80 * 80


def test_multi_image_job_plans_each_image_and_sums(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    write_input(tmp_path / "imgs" / "a.zarr", (3, 150, 190))
    write_input(tmp_path / "imgs" / "b.zarr", (3, 64, 64), seed=1)
    job = _job(
        tmp_path,
        input__path=str(tmp_path / "imgs" / "*.zarr"),
        output__path=str(tmp_path / "out" / "{stem}.seg.zarr"),
    )
    plan = plan_job(job)
    assert [im.units_total for im in plan.images] == [9, 1]
    totals = plan.to_dict()["totals"]
    assert totals["units_total"] == 10
    assert totals["output_pixels"] == 150 * 190 + 64 * 64
    assert plan.memory is plan.images[0]  # the larger units need more
    assert not (tmp_path / "out").exists()


def test_mask_background_units_are_not_counted_as_computed(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    mask = np.zeros((150, 190), np.uint8)
    mask[10:20, 70:80] = 1  # inside unit 1 only (row 0, column 1)
    zarr.create_array(tmp_path / "mask.zarr", data=mask, dimension_names=("y", "x"))
    job = _job(tmp_path, input__mask={"method": "array", "path": str(tmp_path / "mask.zarr")})
    im = plan_job(job).images[0]
    assert (im.units_background, im.units_to_compute) == (8, 1)
    assert im.output_pixels == 64 * 64
    assert im.windows_to_compute == 4


def test_a_nodata_mask_names_its_value_or_is_refused_without_one(tmp_path: Path) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    job = _job(tmp_path, input__mask={"method": "nodata"})
    with pytest.raises(InputError, match=r"needs the no-data value.*set input\.mask\.nodata"):
        plan_job(job)
    zarr.open_array(tmp_path / "in.zarr", mode="r+").attrs["nodata"] = -9999
    assert plan_job(job).images[0].mask.startswith("nodata (-9999)")


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_weights_that_do_not_fit_the_network_are_refused_by_the_plan(
    tmp_path: Path, tta: str
) -> None:
    from tilewise import models
    from tilewise.errors import ConfigError

    write_input(tmp_path / "in.zarr", (3, 150, 190))
    for name, depth in (("fits.pt", 2), ("deeper.pt", 3)):
        net = models.create("unet_same", in_channels=3, num_classes=3, depth=depth, base_width=4)
        torch.save(net.state_dict(), tmp_path / name)
    fits = plan_job(_job(tmp_path, model__weights=str(tmp_path / "fits.pt"), model__tta=tta))
    assert fits.images[0].parameters == 7_479  # depth 2, width 4; the flip wrapper adds none
    job = _job(tmp_path, model__weights=str(tmp_path / "deeper.pt"), model__tta=tta)
    with pytest.raises(ConfigError, match=r"weights '.*deeper\.pt' do not fit arch 'unet_same'"):
        plan_job(job)
    assert not (tmp_path / "out.zarr").exists()


# -- memory --------------------------------------------------------------------------------------


def test_peak_of_takes_the_largest_stage() -> None:
    items = [
        MemoryItem("always", 10),
        MemoryItem("a", 5, phases=("normalise",)),
        MemoryItem("b", 7, phases=("batches",)),
        MemoryItem("c", 1, phases=("batches", "outputs")),
        MemoryItem("d", 3, phases=("outputs",)),
    ]
    assert peak_of(items) == (18, "batches")
    assert peak_of([MemoryItem("x", 4), MemoryItem("y", 5)]) == (9, "")


@pytest.mark.parametrize(
    "changes",
    [
        {"tiling__batch_size": 4, "output__chunk": 128},
        {
            "tiling__stitch": "blend",
            "tiling__halo": 23,
            "output__chunk": 128,
            "output__labels": "uint16",
        },
        {"tiling__stitch": "sliding", "tiling__tile": 64, "output__probabilities": None},
    ],
)
def test_memory_model_matches_the_engine_run_on_the_meta_device(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    """The engine's own compute_unit and output step, traced, against the plan's stages."""
    from tilewise.pipeline.postprocess import labels_tensor, probabilities_tensor

    write_input(tmp_path / "in.zarr", (3, 300, 380))
    job = _job(tmp_path, **changes)
    im = plan_job(job).images[0]
    p = prepare(job)
    engine = TileEngine(
        planmod._meta_model(job, 3),
        p.plan,
        batch_size=job.tiling.batch_size,
        device="meta",
        preprocess=p.normalizer,
    )
    labels, probs = job.output.labels, job.output.probabilities
    measured = 0
    for unit in p.grid:
        ry0, ry1 = p.plan.y.read_range(unit.y0, unit.y1)
        rx0, rx1 = p.plan.x.read_range(unit.x0, unit.x1)
        raw = torch.empty((3, ry1 - ry0, rx1 - rx0), dtype=torch.uint8, device="meta")
        tracker = LiveTensorTracker()
        with tracker:
            tracker.track(raw)
            scores = engine.compute_unit(raw, unit)
            del raw
            kept = [labels_tensor(scores, labels)] if labels else []
            kept += [probabilities_tensor(scores, probs)] if probs else []
        measured = max(measured, tracker.peak)
    # On the CPU the device's stages are in the host list; one read buffer is the raw unit.
    reads = next(i for i in im.host if i.name.startswith("read buffers"))
    staged = [i for i in im.host if i.phases]
    raw = reads.bytes // (job.compute.prefetch + 1)
    planned, _ = peak_of([*staged, MemoryItem("raw", raw, phases=("normalise", "batches"))])
    # An upper bound (the normaliser's scalar constants, a few bytes, are left out), and close.
    assert measured - 64 <= planned <= 1.1 * measured


def test_cuda_layout_splits_host_and_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    gpu = ClusterResources("this machine", True, 8.0, 2.0, 64 * 1024**3, 80 * 1024**3)
    monkeypatch.setattr(planmod, "_local_resources", lambda: gpu)
    job = _job(tmp_path, compute__actors_per_gpu=2)
    plan = plan_job(job)
    assert (plan.device, plan.precision, plan.actors, plan.gpus_each) == (
        "cuda",
        "bfloat16",
        4,
        0.5,
    )
    m = plan.memory
    names = [i.name for i in m.device]
    assert "CUDA context" in names and "activations (bfloat16)" in names
    assert not any(i.phases for i in m.host)  # the host holds no device stage
    assert plan.fits is True and "GPU" in plan.verdict
    # bfloat16 activations: the meta forward in bfloat16 with its input copy.
    with torch.device("meta"):
        model = planmod._meta_model(job, 3).to(torch.bfloat16)
    fwd = forward_memory(model, (3, 3, 80, 80), dtype=torch.bfloat16)
    assert m.device[names.index("activations (bfloat16)")].bytes == fwd.peak
    # Two actors share each GPU: the GPU check counts both.
    small = ClusterResources("this machine", True, 8.0, 2.0, 64 * 1024**3, m.device_total)
    monkeypatch.setattr(planmod, "_local_resources", lambda: small)
    tight = plan_job(job)
    assert tight.fits is False and "does NOT fit" in tight.verdict


@pytest.mark.parametrize(
    ("cpus", "gpus", "compute", "waiting"),
    [
        (2.0, 0.0, {"workers": 5}, 3),  # 1 CPU each: two start
        (2.0, 0.0, {"workers": 2}, 0),
        (8.0, 2.0, {"workers": 4, "gpus_per_worker": 1}, 2),
        (8.0, 2.0, {"workers": 4}, 0),  # half a GPU each
        (8.0, 2.0, {"workers": 2, "cpus_per_worker": 6}, 1),
    ],
)
def test_actors_the_cluster_cannot_hold_are_a_warning_with_the_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpus: float,
    gpus: float,
    compute: dict[str, Any],
    waiting: int,
) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    there = ClusterResources("this machine", gpus > 0, cpus, gpus, 64 * 1024**3, 80 * 1024**3)
    monkeypatch.setattr(planmod, "_local_resources", lambda: there)
    job = _job(tmp_path, **{f"compute__{k}": v for k, v in compute.items()})
    found = [w for w in plan_job(job).warnings if "predictor actors" in w]
    if not waiting:
        assert found == []
        return
    (warning,) = found
    n = compute["workers"]
    assert warning.startswith(f"{n} predictor actors of ")
    assert f"but the cluster has {cpus:g} and {gpus:g}: {waiting} would wait" in warning
    assert f"Use compute.workers: {n - waiting} (or --workers)" in warning


@pytest.mark.parametrize(
    ("given", "gpus", "expected"),
    [(None, 0.0, 1), (None, 2.0, 4), (2, 0.0, 2), (2, 2.0, 2)],
    ids=["default-cpu", "default-gpu", "given-cpu", "given-gpu"],
)
def test_batch_size_defaults_to_one_window_on_the_cpu_and_four_on_a_gpu(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: int | None,
    gpus: float,
    expected: int,
) -> None:
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    here = ClusterResources("this machine", True, 4.0, gpus, 64 * 1024**3, 80 * 1024**3)
    monkeypatch.setattr(planmod, "_local_resources", lambda: here)
    job = _job(tmp_path, tiling__batch_size=given)
    im = plan_job(job).images[0]
    assert im.batch_size == expected
    assert job.tiling.windows_per_forward("cuda" if gpus else "cpu") == expected
    # The activations are those of a batch of that many windows (the forward traced on its own).
    cuda = gpus > 0
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("meta"):
        model = planmod._meta_model(job, 3).to(dtype)
    fwd = forward_memory(model, (expected, 3, 80, 80), dtype=dtype)
    items = im.device if cuda else im.host
    name = f"activations ({'bfloat16' if cuda else 'float32'})"
    item = next(i for i in items if i.name == name)
    assert item.bytes == fwd.peak - (0 if cuda else fwd.input)


# -- resources -----------------------------------------------------------------------------------


def test_without_an_address_no_ray_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import ray

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("plan_job started Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    plan = plan_job(_job(tmp_path))
    assert plan.resources.local and plan.resources.cpus == float(os.cpu_count() or 1)
    assert (plan.device, plan.precision, plan.actors) == ("cpu", "float32", 1)


def test_with_an_address_it_reads_the_cluster_and_disconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    calls: list[Any] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(
        ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 4.0, "memory": 2.0**38}
    )
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    # No head runs at this address: skip the check that one answers (tests/pipeline/test_cluster).
    monkeypatch.setattr(cluster, "check_address", lambda address, where: None)
    write_input(tmp_path / "in.zarr", (3, 150, 190))
    plan = plan_job(_job(tmp_path), address="ray://head:10001")
    assert [c[0] for c in calls] == ["init", "shutdown"]
    assert calls[0][1]["address"] == "ray://head:10001"
    assert calls[0][1]["log_to_driver"] is False
    assert (plan.actors, plan.cpus_each, plan.gpus_each) == (4, 16.0, 1.0)
    assert (plan.device, plan.precision) == ("cuda", "bfloat16")
    assert plan.fits is None  # a cluster's nodes are not checked from here


# -- resume, and creating nothing ----------------------------------------------------------------


def _snapshot(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        h.update(f.relative_to(root).as_posix().encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.usefixtures("ray_cluster")
def test_resumed_output_plans_only_the_missing_units(tmp_path: Path) -> None:
    from tilewise.pipeline.driver import run_job

    write_input(tmp_path / "in.zarr", (3, 150, 190))
    job = _job(tmp_path)
    fresh = plan_job(job).images[0]
    assert (fresh.output_state, fresh.units_done, fresh.units_to_compute) == ("none", 0, 9)
    assert not (tmp_path / "out.zarr").exists()  # the plan created no output

    run_job(job, progress=False)
    out = tmp_path / "out.zarr"
    finished = plan_job(job).images[0]
    assert (finished.output_state, finished.units_done, finished.units_to_compute) == (
        "complete",
        9,
        0,
    )
    assert (finished.output_pixels, finished.computed_pixels) == (0, 0)
    assert finished.overlap == fresh.overlap  # that of a full run
    for index in (4, 7):
        (out / ".tilewise" / "done" / str(index)).unlink()
    before = _snapshot(out)
    plan = plan_job(job)
    im = plan.images[0]
    assert (im.output_state, im.units_done, im.units_to_compute) == ("resumable", 7, 2)
    p = prepare(job)
    assert im.windows_to_compute == sum(len(p.plan.windows(p.grid.unit(k))) for k in (4, 7))
    assert im.output_pixels == p.grid.unit(4).pixels + p.grid.unit(7).pixels
    assert _snapshot(out) == before

    # --overwrite: the run deletes the output, so the plan computes every unit
    replaced = plan_job(job, overwrite=True).images[0]
    assert (replaced.output_state, replaced.units_done, replaced.units_to_compute) == (
        "replace",
        0,
        9,
    )
    assert replaced.output_pixels == fresh.output_pixels

    other = plan_job(_job(tmp_path, model__seed=4))  # another job, same output
    assert other.images[0].output_state == "foreign"
    assert any("another job" in w for w in other.warnings)
    assert _snapshot(out) == before


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_prints_the_plan_and_its_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tilewise.cli import main

    write_input(tmp_path / "in.zarr", (3, 150, 190))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "kind: predict\n"
        "input: {path: in.zarr}\n"
        "model: {arch: unet_same, num_classes: 3, args: {depth: 2, base_width: 4}}\n"
        "tiling: {tile: 32, batch_size: 3}\n"
        "output: {path: out.zarr, probabilities: float16, chunk: 64}\n"
    )
    assert main(["run", "--plan", str(job_file)]) == 0
    text = capsys.readouterr().out
    assert "units    9 of 64 px in all: 0 done, 0 background, 9 to compute" in text
    assert "overlap  overhead" in text and "activations (float32)" in text
    assert text.rstrip().splitlines()[-1].startswith("fits: host")
    assert main(["run", "--plan", "--json", str(job_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["units_to_compute"] == 9
    assert data["actors"]["precision"] == "float32"
    memory = data["memory_per_actor"]
    assert all(isinstance(i["bytes"], int) for i in memory["host"])
    assert memory["host_total"] >= planmod.HOST_BASELINE
    assert not (tmp_path / "out.zarr").exists()


def test_cli_reports_a_bad_plan_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tilewise.cli import main

    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "kind: predict\n"
        "input: {path: missing.zarr}\n"
        "model: {arch: unet_same, num_classes: 3, args: {depth: 2, base_width: 4}}\n"
        "tiling: {tile: 32}\n"
        "output: {path: out.zarr}\n"
    )
    assert main(["run", "--plan", str(job_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.zarr" in err
