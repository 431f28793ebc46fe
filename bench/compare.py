"""tilewise side by side with what people use today: same mosaic, same network, same threads.

    python bench/compare.py --size 4096 --workdir /tmp/tw-compare
    python bench/compare.py --size 2048 --methods tilewise,loop --scaling
    python bench/compare.py --size 16384 --methods tilewise,monai      # long on 2 cores
    python bench/compare.py --size 16384 --device cuda                 # on a GPU: bf16 AMP

Every method runs in its own subprocess, so its peak memory is its own and its allocator
environment is set before it starts (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised
for all: reference/performance.md), with the same torch threads:

- **tilewise**: a job YAML and ``python -m tilewise.cli run job.yaml --json --no-progress
  --overwrite`` (embedded local Ray, the user's path). ``stitch: crop`` with the network's own
  halo, tile 512, chunk 1024, labels uint8 and float16 probabilities.
- **loop**: the per-tile loop a user writes by hand: for each tile, read tile + context from the
  Zarr input (numpy ``reflect`` padding at the border), forward (batch 1), crop, store into
  in-memory numpy outputs.
- **monai**: ``monai.inferers.sliding_window_inference`` on the whole image as one tensor,
  ``roi_size`` = tilewise's window, ``sw_batch_size`` = tilewise's batch, ``mode="gaussian"``,
  and the ``overlap`` whose computed ÷ output pixels comes closest to tilewise's.
- **dask**: ``dask.array.map_overlap`` with the network applied per block (chunks = tile,
  ``depth`` = the context, ``boundary="reflect"``, which is numpy's 'symmetric'), stored into Zarr
  with the threaded scheduler.
- **model-only** (with tilewise): the same forward passes as tilewise's run (window size and
  batch sizes), on random data already in memory: the ceiling for tilewise's throughput.

The network is a seeded ``unet_same`` (by default depth 4, base width 16, 2 classes, seed 0:
1,941,122 weights, halo 107 px, the "small U-Net" of the reference figures in
``shared/reference/performance.md``; ``--model-args`` picks another) saved once to a
safetensors file that every method loads. Each method's class-1 probability and labels are
compared with whole-image inference: the whole image mirror-padded (numpy 'reflect') by the
context, one forward pass, cropped; computed directly in a subprocess. Where that does not fit in
memory, two 1024-px blocks (the top-left corner and the centre) are computed the same way from the
block plus its context, which equals whole-image inference there.

With ``--device cuda`` every method runs its forwards on the GPU, under the same autocast
(``--precision``; 'auto' is tilewise's rule: bfloat16 on CUDA) and with tilewise's batch for the
device (4 windows); model-only's random data is on the GPU already; MONAI stitches on the GPU
(``sw_device`` and ``device``); the reference stays a float32 forward on the CPU, so the
accuracy columns then show what the reduced precision costs. Each worker reports torch's peak
GPU allocation. (Written before a GPU was available to run it: the CPU path is the measured one.)

Memory is the peak of RSS and PSS summed over the method's process and all its descendants (Ray's
processes for tilewise), sampled every 0.2 s (bench/_memory.py), up to the moment the method has
its result (the copy of it for this comparison is not counted). Results: a table on stdout and
``WORKDIR/compare.json``. Exit status 1 if a method fails, 2 for bad options or a run that cannot
fit in memory (refused before anything starts).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from _memory import Sampler, breakdown, leftover_ray
from large_mosaic import build_mosaic
from tilewise.pipeline.driver import ALLOCATOR_ENV as DRIVER_ALLOCATOR_ENV
from tilewise.spec import DEFAULT_BATCH_SIZE, resolve_batch_size

GB = 10**9
METHODS = ("tilewise", "loop", "monai", "dask")
ARCH = "unet_same"
CHANNELS = 3  # the mosaic is RGB
# The allocator settings tilewise's driver gives its actors, for every method: glibc's
# thresholds raised (without them large activations are unmapped on every free and faulted back
# on every forward) and one arena (threads' own arenas mmap every block over 64 MB anyway, which
# would slow dask's threaded scheduler as much as tilewise's threaded actor).
ALLOCATOR_ENV = dict(DRIVER_ALLOCATOR_ENV)
# Peak bytes per padded pixel of one whole-image forward of the default network (depth 3, base
# width 8; measured 292 B/px at 2160² px without the allocator variables), scaled by base width.
REF_BYTES_PER_PX = 300
# Python + torch + zarr loaded, before any pixel: what every method's process starts from.
BASELINE_BYTES = 0.35 * GB
# Measured on top of MONAI's three float32 tensors, per pixel (see monai_memory).
MONAI_EXTRA_BYTES_PER_PX = 12
# A probability "off" by more than float16 storage explains (it rounds by at most 2.4e-4).
OFF = 1e-3


# ----------------------------------------------------------------------------------------------
# Set-up shared by the parent and the workers
# ----------------------------------------------------------------------------------------------


def load_model(cfg: dict[str, Any]) -> Any:
    """The seeded network with the weights every method loads, in eval mode."""
    from safetensors.torch import load_file

    from tilewise import models

    model = models.create(
        ARCH, in_channels=CHANNELS, num_classes=cfg["classes"], **cfg["model_args"]
    )
    model.load_state_dict(load_file(cfg["weights"]))
    return model.eval()


def make_weights(path: Path, model_args: dict[str, Any], classes: int, seed: int) -> None:
    """Save the seeded network's weights (``torch.manual_seed(seed)`` then ``models.create``)."""
    if path.exists():
        return
    import torch
    from safetensors.torch import save_file

    from tilewise import models

    torch.manual_seed(seed)
    model = models.create(ARCH, in_channels=CHANNELS, num_classes=classes, **model_args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    n = sum(p.numel() for p in model.parameters())
    print(f"seeded {ARCH} {model_args} ({n:,} weights, seed {seed}) -> {path}", flush=True)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def device_of(cfg: dict[str, Any]) -> Any:
    """The torch device every method runs its forwards on (``--device``)."""
    import torch

    return torch.device(cfg.get("device", "cpu"))


def autocast(cfg: dict[str, Any]) -> Any:
    """The forwards' precision (``--precision``, resolved as tilewise's 'auto' is): float32 runs
    as it is; bfloat16/float16 under CUDA autocast, the AMP every method would use on a GPU."""
    import torch

    name = cfg.get("precision", "float32")
    if name == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, name))


def synchronize(cfg: dict[str, Any]) -> None:
    """Wait for the GPU's queued kernels, so a clock read after this counts them."""
    import torch

    if device_of(cfg).type == "cuda":
        torch.cuda.synchronize()


def gpu_peak(cfg: dict[str, Any]) -> dict[str, Any]:
    """The worker's peak GPU memory allocated by torch (none on the CPU)."""
    import torch

    if device_of(cfg).type != "cuda":
        return {}
    return {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated()}


def scale_of(dtype: np.dtype) -> np.float32:
    """What tilewise's 'auto' normalisation multiplies raw pixels by (x * scale, in float32)."""
    return np.float32(1 / 255 if dtype == np.uint8 else 1 / 65535 if dtype == np.uint16 else 1)


def mark_done(cfg: dict[str, Any]) -> None:
    """Tell the parent the method has its result: memory sampling stops, the wall clock too."""
    Path(cfg["marker"]).write_text(repr(time.time()))


def save_eval(cfg: dict[str, Any], p1: np.ndarray, labels: np.ndarray) -> None:
    """Save the evaluation regions of the class-1 probability and the labels for the parent."""
    arrays: dict[str, np.ndarray] = {}
    for i, (y0, y1, x0, x1) in enumerate(cfg["regions"]):
        arrays[f"p1_{i}"] = np.ascontiguousarray(p1[y0:y1, x0:x1])
        arrays[f"lab_{i}"] = np.ascontiguousarray(labels[y0:y1, x0:x1])
    np.savez(cfg["eval_path"], **arrays)


def read_with_reflect(arr: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Image rows [y0, y1) and columns [x0, x1), beyond the border as numpy 'reflect' of the
    whole image would fill them (pads narrower than the read, as a hand-written loop assumes)."""
    _, h, w = arr.shape
    cy0, cy1, cx0, cx1 = max(0, y0), min(h, y1), max(0, x0), min(w, x1)
    block = np.asarray(arr[:, cy0:cy1, cx0:cx1])
    pads = ((0, 0), (cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1))
    return np.pad(block, pads, mode="reflect") if any(a or b for a, b in pads) else block


# ----------------------------------------------------------------------------------------------
# Workers: one method per subprocess
# ----------------------------------------------------------------------------------------------


def worker_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """The per-tile loop: read tile + context, forward (batch 1), crop, store in numpy."""
    import torch
    import zarr

    set_threads(cfg["threads"])
    dev = device_of(cfg)
    model = load_model(cfg).to(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    arr = zarr.open_array(store=cfg["mosaic"], mode="r")
    scale = scale_of(arr.dtype)
    _, h, w = arr.shape
    tile, ctx, k = cfg["tile"], cfg["lead"], cfg["classes"]
    probs = np.empty((k, h, w), np.float16)
    labels = np.empty((h, w), np.uint8)
    forwards = computed = 0
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            th, tw = min(tile, h - ty), min(tile, w - tx)
            block = read_with_reflect(arr, ty - ctx, ty + th + ctx, tx - ctx, tx + tw + ctx)
            x = torch.from_numpy(block.astype(np.float32) * scale)[None]
            with torch.inference_mode():
                with autocast(cfg):
                    scores = model(x.to(dev))[0, :, ctx : ctx + th, ctx : ctx + tw].float()
                labels[ty : ty + th, tx : tx + tw] = scores.argmax(0).to(torch.uint8).cpu().numpy()
                probs[:, ty : ty + th, tx : tx + tw] = (
                    torch.softmax(scores, 0).to(torch.float16).cpu().numpy()
                )
            forwards += 1
            computed += x.shape[-2] * x.shape[-1]
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # all threads of this process
    mark_done(cfg)
    save_eval(cfg, probs[1], labels)
    return {
        "compute_seconds": seconds,
        "compute_cpu_seconds": cpu,
        "forwards": forwards,
        "computed_pixels": computed,
        "overlap": computed / (h * w),
        "context": ctx,
        **gpu_peak(cfg),
    }


def worker_monai(cfg: dict[str, Any]) -> dict[str, Any]:
    """MONAI's sliding-window inference on the whole image held as one tensor."""
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    set_threads(cfg["threads"])
    dev = device_of(cfg)
    model = load_model(cfg).to(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    arr = zarr.open_array(store=cfg["mosaic"], mode="r")
    img = np.asarray(arr[...])
    x = torch.from_numpy(img).float().mul_(float(scale_of(arr.dtype)))[None]
    del img
    t_read = time.perf_counter() - t0
    roi = cfg["window"]
    # On a GPU: the image stays in host memory, the windows go to the GPU (sw_device), and the
    # stitched output and count map stay there too (device), MONAI's fastest layout where they
    # fit, as they do at 16,384² on an 80 GB GPU.
    with torch.inference_mode(), autocast(cfg):
        out = sliding_window_inference(
            x,
            (roi, roi),
            cfg["batch"],
            model,
            overlap=cfg["monai_overlap"],
            mode="gaussian",
            sw_device=dev,
            device=dev,
        )
    synchronize(cfg)
    t_swi = time.perf_counter() - t0 - t_read
    del x
    with torch.inference_mode():
        scores = out[0].float()
        labels = scores.argmax(0).to(torch.uint8).cpu().numpy()
        probs = torch.softmax(scores, 0).to(torch.float16).cpu().numpy()
        del scores
    del out
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # all threads of this process
    mark_done(cfg)
    save_eval(cfg, probs[1], labels)
    return {
        "compute_seconds": seconds,
        "compute_cpu_seconds": cpu,
        "read_seconds": t_read,
        "sliding_window_seconds": t_swi,
        "overlap_param": cfg["monai_overlap"],
        **gpu_peak(cfg),
    }


def worker_dask(cfg: dict[str, Any]) -> dict[str, Any]:
    """dask ``map_overlap`` over the Zarr input, stored into Zarr with the threaded scheduler."""
    import dask
    import dask.array as da
    import torch
    import zarr
    from zarr.codecs import ZstdCodec

    set_threads(cfg["threads"])
    dev = device_of(cfg)
    model = load_model(cfg).to(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    arr = zarr.open_array(store=cfg["mosaic"], mode="r")
    scale = scale_of(arr.dtype)
    c, h, w = arr.shape
    tile, ctx, k = cfg["tile"], cfg["lead"], cfg["classes"]
    calls = []  # list.append is atomic under the GIL: dask may run blocks in several threads

    def predict(block: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(block.astype(np.float32) * scale)[None]
        with torch.inference_mode():
            with autocast(cfg):
                scores = model(x.to(dev))[0].float()
            p = torch.softmax(scores, 0).cpu().numpy()
        if block.size:  # not a zero-size probe, should dask make one
            calls.append(block.shape)
        return p

    x = da.from_zarr(arr, chunks=(c, tile, tile))
    p = x.map_overlap(
        predict,
        depth={0: 0, 1: ctx, 2: ctx},
        boundary="reflect",  # dask's 'reflect' repeats the edge pixel: numpy's 'symmetric'
        dtype=np.float32,
        chunks=(k, tile + 2 * ctx, tile + 2 * ctx),
    )
    root = zarr.open_group(store=cfg["dask_out"], mode="w")
    zp = root.create_array(
        "probabilities", shape=(k, h, w), chunks=(k, tile, tile), dtype="float16",
        compressors=ZstdCodec(level=3),
    )  # fmt: skip
    zl = root.create_array(
        "labels", shape=(h, w), chunks=(tile, tile), dtype="uint8", compressors=ZstdCodec(level=3)
    )
    probs = p.astype(np.float16)
    labels = p.argmax(axis=0).astype(np.uint8)
    with dask.config.set(scheduler="threads", num_workers=cfg["dask_workers"]):
        da.store([probs, labels], [zp, zl], lock=False)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # all threads of this process
    mark_done(cfg)
    computed = sum(s[-2] * s[-1] for s in calls)
    return {
        "compute_seconds": seconds,
        "compute_cpu_seconds": cpu,
        "forwards": len(calls),
        "computed_pixels": computed,
        "overlap": computed / (h * w),
        "context": ctx,
        "dask_workers": cfg["dask_workers"],
        **gpu_peak(cfg),
    }


def _model_only_part(cfg: dict[str, Any], part: int, ready: Any, go: Any) -> tuple[float, float]:
    """Forwards ``part``, ``part + workers``, ... of tilewise's run: (seconds, CPU seconds)."""
    import torch

    set_threads(cfg["threads"])
    dev = device_of(cfg)
    model = load_model(cfg).to(dev)
    win = cfg["window"]
    batches = cfg["batches"][part :: cfg["workers"]]
    gen = torch.Generator().manual_seed(part)
    # On a GPU the data is there already: the ceiling has no host-to-device copies.
    data = {b: torch.rand(b, CHANNELS, win, win, generator=gen).to(dev) for b in set(batches)}
    with torch.inference_mode(), autocast(cfg):
        model(data[batches[0]])  # warm-up, not timed (so the ceiling is steady-state)
        synchronize(cfg)
        if ready is not None:
            ready.wait()  # every process warmed up: start together
            go.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            model(data[b])
        synchronize(cfg)
        return time.perf_counter() - t0, time.process_time() - c0  # all threads of the process


def _model_only_process(cfg: dict[str, Any], part: int, ready: Any, go: Any, out: Any) -> None:
    out.put(_model_only_part(cfg, part, ready, go))


def worker_model_only(cfg: dict[str, Any]) -> dict[str, Any]:
    """tilewise's forward passes (same window, same batch sizes) on random data in memory, in
    as many processes as tilewise has actors (``--workers``), each with ``--threads`` threads:
    the ceiling of the same layout. Its seconds are the slowest process's."""
    workers = int(cfg.get("workers", 1))
    if workers == 1:
        seconds, cpu = _model_only_part(cfg, 0, None, None)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Barrier(workers + 1), ctx.Barrier(workers + 1), ctx.Queue()
        procs = [
            ctx.Process(target=_model_only_process, args=(cfg, k, ready, go, out))
            for k in range(workers)
        ]
        for proc in procs:
            proc.start()
        ready.wait()
        go.wait()
        parts = [out.get() for _ in procs]
        for proc in procs:
            proc.join()
        seconds, cpu = max(t for t, _ in parts), sum(c for _, c in parts)
    mark_done(cfg)
    return {
        "compute_seconds": seconds,
        "compute_cpu_seconds": cpu,
        "forwards": len(cfg["batches"]),
        "windows": sum(cfg["batches"]),
        "computed_pixels": sum(cfg["batches"]) * cfg["window"] ** 2,
    }


def worker_reference(cfg: dict[str, Any]) -> dict[str, Any]:
    """Whole-image inference: mirror-pad (numpy 'reflect') by the context, one forward, crop.

    In block mode each region is computed from the region plus its context (read with the same
    whole-image padding), which equals whole-image inference there: the padded block starts
    ``lead`` px (a multiple of the stride) before the region, so its pooling grid is the whole
    image's, and every output pixel has its full receptive field.
    """
    import torch
    import zarr

    set_threads(cfg["threads"])
    model = load_model(cfg)
    arr = zarr.open_array(store=cfg["mosaic"], mode="r")
    scale = scale_of(arr.dtype)
    lead, halo, stride = cfg["lead"], cfg["halo"], cfg["stride"]
    out: dict[str, np.ndarray] = {"key": np.array(cfg["ref_key"])}
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (y0, y1, x0, x1) in enumerate(cfg["regions"]):
        # bottom/right: at least the halo, and a total size the network takes (stride multiple)
        ny = -(-(lead + (y1 - y0) + halo) // stride) * stride
        nx = -(-(lead + (x1 - x0) + halo) // stride) * stride
        block = read_with_reflect(arr, y0 - lead, y0 - lead + ny, x0 - lead, x0 - lead + nx)
        x = torch.from_numpy(block.astype(np.float32) * scale)[None]
        del block
        with torch.inference_mode():
            s = model(x)[0, :, lead : lead + y1 - y0, lead : lead + x1 - x0]
            out[f"p1_{i}"] = torch.softmax(s, 0)[1].numpy().copy()
            out[f"lab_{i}"] = s.argmax(0).to(torch.uint8).numpy()
        del x, s
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # all threads of this process
    np.savez(cfg["ref_path"], **out)
    return {"compute_seconds": seconds, "compute_cpu_seconds": cpu}


WORKERS = {
    "loop": worker_loop,
    "monai": worker_monai,
    "dask": worker_dask,
    "model-only": worker_model_only,
    "reference": worker_reference,
}


def run_worker(name: str, config: str) -> int:
    cfg = json.loads(Path(config).read_text())
    result = WORKERS[name](cfg)
    Path(cfg["result_path"]).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------
# The parent: plan, run each method in a measured subprocess, evaluate, report
# ----------------------------------------------------------------------------------------------


JOB_TEMPLATE = """\
# written by bench/compare.py
kind: predict
name: compare-{size}
input:
  path: {input}
model:
  arch: {arch}
  num_classes: {classes}
  args: {args}
  weights: {weights}
tiling:
  tile: {tile}
  stitch: crop
  batch_size: {batch}
output:
  path: {output}
  labels: uint8
  probabilities: float16
  chunk: {chunk}
compute:
  cpus_per_worker: {threads}
  workers: {workers}
  device: {device}
  precision: {precision}
{gpu_sharing}"""


def write_job(
    folder: Path, mosaic: Path, size: int, weights: Path, args: argparse.Namespace
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.yaml"
    job.write_text(
        JOB_TEMPLATE.format(
            size=size,
            input=mosaic,
            arch=ARCH,
            classes=args.classes,
            args=json.dumps(args.model_args),
            weights=weights,
            tile=args.tile,
            batch=args.batch,
            output=folder / "out.zarr",
            chunk=args.chunk,
            threads=args.threads,
            workers=args.workers,
            device=args.device,
            precision=args.precision,
            # Several actors on one GPU share it, as model-only's processes do.
            gpu_sharing=(
                f"  actors_per_gpu: {args.workers}\n"
                if args.device == "cuda" and args.workers > 1
                else ""
            ),
        )
    )
    return job


def tilewise_plan(job_path: Path) -> dict[str, Any]:
    """Window size, context, overlap overhead and forward batch sizes of tilewise's run."""
    from tilewise.pipeline.job import prepare
    from tilewise.spec import load_job

    job = load_job(str(job_path))
    prep = prepare(job)
    plan, batch = prep.plan, job.tiling.batch_size
    batches: list[int] = []
    computed = 0
    for unit in prep.grid:
        n = len(plan.windows(unit))
        batches += [batch] * (n // batch) + ([n % batch] if n % batch else [])
        computed += plan.computed_pixels(unit)
    _, h, w = prep.image.shape
    y = plan.y
    return {
        "window": y.window,
        "halo": y.halo,
        "lead": getattr(y, "lead", y.halo),
        "stride": prep.facts.stride,
        "units": len(prep.grid),
        "batches": batches,
        "computed_pixels": computed,
        "overlap": computed / (h * w),
    }


def monai_overlap(size: int, roi: int, target: float) -> dict[str, Any]:
    """MONAI's ``overlap`` whose computed ÷ output pixels comes closest to ``target``.

    MONAI steps by ``int(roi * (1 - overlap))`` and moves the last window back flush with the
    border, so the window count per axis is ``ceil((size - roi) / step) + 1``. Among the steps
    giving the best count, the smallest spreads the windows most evenly.
    """
    from monai.data.utils import dense_patch_slices

    if size <= roi:  # MONAI pads the image up to one window
        return {"overlap": 0.0, "step": roi, "windows": 1, "overhead": roi * roi / size**2}
    best: tuple[float, int, int] | None = None
    for step in range(1, roi + 1):
        n = -(-(size - roi) // step) + 1
        key = (abs(n * n * roi * roi / size**2 - target), step, n)
        if best is None or key < best:
            best = key
    assert best is not None
    _, step, n = best
    overlap = 1 - (step + 0.5) / roi  # int(roi * (1 - overlap)) == step, safe from rounding
    assert int(roi * (1 - overlap)) == step
    windows = len(dense_patch_slices((size, size), (roi, roi), (step, step)))
    return {
        "overlap": round(overlap, 6),
        "step": step,
        "windows": windows,
        "overhead": windows * roi * roi / size**2,
    }


def monai_memory(
    size: int, classes: int, batch: int, window: int, base_width: int
) -> tuple[int, int]:
    """(tensors, expected) bytes of MONAI's run at ``size`` x ``size`` px.

    ``tensors``: what sliding_window_inference itself holds, whole-image-sized and float32: the
    input (4·C B/px), the output (4·K) and the count map (4). ``expected`` adds what the run
    measured on top (MONAI_EXTRA_BYTES_PER_PX: the uint8 image read from Zarr and decode
    buffers, kept by the allocator) and the fixed part: torch, the network and one batch of
    windows. Calibrated at 2048² and 4096² (36 B/px in all with 3 bands and 2 classes).
    """
    tensors = (4 * CHANNELS + 4 * classes + 4) * size * size
    windows = REF_BYTES_PER_PX * base_width / 8 * batch * window * window
    fixed = BASELINE_BYTES + 1.3 * windows
    return tensors, int(tensors + MONAI_EXTRA_BYTES_PER_PX * size * size + fixed)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ALLOCATOR_ENV)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


@dataclass
class RayHead:
    """A Ray head started before the runs (``--ray-head``), as a cluster's would be."""

    address: str
    started: float  # time.time() before it started: its processes count in memory
    session: str  # its session folder, whose processes the memory sampler counts
    leader: subprocess.Popen[bytes]


@contextmanager
def ray_head(env: dict[str, str], cpus: int, log: Path) -> Iterator[RayHead]:
    """``ray start --head --block`` on loopback with ``env``; stopped (its session's processes
    killed) on exit."""
    ray_bin = Path(sys.executable).with_name("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--num-cpus", str(cpus), "--include-dashboard", "false",
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(log, "wb") as out:
        leader = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # ready once a client can see the head's CPUs
            check = subprocess.run(
                [str(ray_bin), "status", "--address", address], env=env, capture_output=True
            )
            if check.returncode == 0 and b"CPU" in check.stdout:
                break
            if leader.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{log.read_text()}")
            time.sleep(0.5)
        session = os.path.realpath("/tmp/ray/session_latest")
        print(f"Ray head at {address} ({session}), up in {time.time() - started:.1f} s")
        time.sleep(3)  # a cluster's head has long settled when a job comes
        yield RayHead(address, started, session, leader)
    finally:
        # Its process group, then whatever else runs in its session (workers).
        members = []
        for proc in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
                if os.getsid(proc.pid) == leader.pid:
                    members.append(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGTERM)
        # `ray start --block` takes its time over SIGTERM: what is left after a moment is killed
        _, alive = psutil.wait_procs(members, timeout=1)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        leader.wait(timeout=5)


def measure(
    name: str, cmd: list[str], env: dict[str, str], log: Path, interval: float,
    marker: Path | None = None, head: RayHead | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run ``cmd``; sample its process tree's memory until it exits (or writes ``marker``);
    with ``head``, that head's processes too."""
    if marker is not None:
        marker.unlink(missing_ok=True)
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        active = (lambda: not marker.exists()) if marker is not None else None
        sampler = Sampler(
            psutil.Process(proc.pid),
            head.started if head is not None else started,
            interval=interval,
            active=active,
            sessions={head.session} if head is not None else set(),
            run_started=started,
        )
        sampler.start()
        stdout, _ = proc.communicate()
        process_wall = time.perf_counter() - t0
        sampler.stop()
    wall = process_wall
    if marker is not None and marker.exists():
        wall = float(marker.read_text()) - started
    # (a head's processes outlive the run by design)
    left = leftover_ray(started, sampler.sessions) if sampler.sessions and not head else []
    peak_rss = sampler.peak_rss.rss if sampler.peak_rss else 0
    peak_pss = sampler.peak_pss.pss if sampler.peak_pss else 0
    res: dict[str, Any] = {
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "process_wall_s": round(process_wall, 2),
        "peak_rss_sum_bytes": peak_rss,
        "peak_pss_sum_bytes": peak_pss,
        "cpu_s": round(sampler.cpu_seconds, 1),
        "max_single_rss_bytes": sampler.max_single.get("rss", 0),
        "max_single_rss_process": sampler.max_single.get("name"),
        "max_processes": sampler.max_procs,
        "samples": sampler.samples,
        "breakdown_at_peak_pss": breakdown(sampler.peak_pss),
        "leftover_ray_processes": left,
        "log": str(log),
        "stdout_tail": stdout[-2000:],
    }
    if proc.returncode != 0:
        print(f"[{name}] FAILED (exit status {proc.returncode}); stderr ({log}):", flush=True)
        print(log.read_text()[-3000:], flush=True)
    else:
        print(
            f"[{name}] {wall:.1f} s, peak PSS {peak_pss / GB:.2f} GB, RSS {peak_rss / GB:.2f} GB",
            flush=True,
        )
    return res


def run_tilewise(
    job: Path, env: dict[str, str], interval: float, head: RayHead | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tilewise.cli", "run", str(job), "--json", "--no-progress"]
    if head is not None:
        env = {**env, "RAY_ADDRESS": head.address}
    res = measure(
        "tilewise", [*cmd, "--overwrite"], env, job.parent / "run.log", interval, head=head
    )
    report: dict[str, Any] = {}
    for line in reversed(res.pop("stdout_tail").splitlines()):
        try:
            report = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    res["report"] = report
    res["own_s"] = report.get("seconds")
    res["overlap"] = report.get("overlap")
    if res["ok"] and not report:
        res["ok"] = False
        res["error"] = "no JSON report on stdout"
    return res


def run_in_worker(
    name: str, cfg: dict[str, Any], work: Path, env: dict[str, str], interval: float
) -> dict[str, Any]:
    cfg = {
        **cfg,
        "marker": str(work / f"{name}.done"),
        "result_path": str(work / f"{name}.json"),
        "eval_path": str(work / f"{name}-eval.npz"),
    }
    Path(cfg["result_path"]).unlink(missing_ok=True)
    config = work / f"{name}-config.json"
    config.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--config", str(config)]
    res = measure(name, cmd, env, work / f"{name}.log", interval, Path(cfg["marker"]))
    res.pop("stdout_tail")
    if res["ok"]:
        res["worker"] = json.loads(Path(cfg["result_path"]).read_text())
        res["own_s"] = round(res["worker"]["compute_seconds"], 2)
        res["overlap"] = res["worker"].get("overlap")
    return res


def reference_regions(size: int, mode: str, block: int, stride: int) -> list[list[int]]:
    if mode == "whole":
        return [[0, size, 0, size]]
    b = min(block, size)
    c = (size - b) // 2 // stride * stride
    regions = [[0, b, 0, b], [c, c + b, c, c + b]]
    return regions if c > 0 else regions[:1]


def load_method_regions(
    name: str, res: dict[str, Any], regions: list[list[int]], work: Path, cfg: dict[str, Any]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(class-1 probability, labels) of a method's output on each evaluation region."""
    import zarr

    if name in ("tilewise", "dask"):
        if name == "tilewise":
            root = zarr.open_group(store=res["report"]["output"], mode="r")
            probs, labels = root["probabilities/0"], root["labels/0"]
        else:
            root = zarr.open_group(store=cfg["dask_out"], mode="r")
            probs, labels = root["probabilities"], root["labels"]
        return [
            (np.asarray(probs[1, y0:y1, x0:x1]), np.asarray(labels[y0:y1, x0:x1]))
            for y0, y1, x0, x1 in regions
        ]
    data = np.load(work / f"{name}-eval.npz")
    return [(data[f"p1_{i}"], data[f"lab_{i}"]) for i in range(len(regions))]


def evaluate(
    got: list[tuple[np.ndarray, np.ndarray]],
    ref: list[tuple[np.ndarray, np.ndarray]],
    regions: list[list[int]],
    size: int,
    border: int,
) -> dict[str, Any]:
    """Max |Δ class-1 probability| (all and interior), the share of pixels off by more than
    :data:`OFF`, and label agreement on the regions."""
    max_all = max_in = 0.0
    same = total = off = fp16_diff = 0
    reach = -1  # farthest distance from the image border of a pixel off by more than OFF
    for (p, lab), (rp, rlab), (y0, y1, x0, x1) in zip(got, ref, regions, strict=True):
        d = np.abs(p.astype(np.float32) - rp)
        max_all = max(max_all, float(d.max()))
        bad = d > OFF
        off += int(bad.sum())
        if bad.any():
            ys, xs = np.nonzero(bad)
            ys, xs = ys + y0, xs + x0
            dist = np.minimum(np.minimum(ys, size - 1 - ys), np.minimum(xs, size - 1 - xs))
            reach = max(reach, int(dist.max()))
        # every method stores float16: an exact one matches the rounded reference bit for bit
        fp16_diff += int((p.astype(np.float16) != rp.astype(np.float16)).sum())
        yy = np.arange(y0, y1)[:, None]
        xx = np.arange(x0, x1)[None, :]
        inner = (yy >= border) & (yy < size - border) & (xx >= border) & (xx < size - border)
        if inner.any():
            max_in = max(max_in, float(d[inner].max()))
        same += int((lab == rlab).sum())
        total += lab.size
    return {
        "max_abs_dp1": max_all,
        "max_abs_dp1_interior": max_in,
        "share_off": off / total,
        "off_max_distance_to_border": reach if off else None,
        "float16_mismatches": fp16_diff,
        "label_agreement": same / total,
        "label_mismatches": total - same,
        "evaluated_pixels": total,
    }


def combine(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's repeated runs as one: the fastest (own seconds) with the highest peaks.

    Memory barely depends on the machine's load, time does: other work on shared cores only
    ever slows a run down, so the fastest run is the best estimate of the method's speed.
    """
    failed = [r for r in tries if not r["ok"]]
    if failed:
        return failed[0]
    best = dict(min(tries, key=lambda r: r.get("own_s") or r["wall_s"]))
    for key in ("peak_rss_sum_bytes", "peak_pss_sum_bytes"):
        best[key] = max(r[key] for r in tries)
    best["runs"] = [
        {k: r.get(k) for k in ("wall_s", "own_s", "cpu_s", "peak_rss_sum_bytes",
                               "peak_pss_sum_bytes")}
        for r in tries
    ]  # fmt: skip
    return best


def parse_model_args(text: str) -> dict[str, Any]:
    """``{"depth": 3, "base_width": 8}`` (JSON) or ``depth=3,base_width=8``."""
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("--model-args must be a JSON object")
        return value
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--model-args wants KEY=VALUE items; got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def fmt_gb(n: float | None) -> str:
    return "-" if not n else f"{n / GB:.2f}"


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[list[str]], header: list[str], markdown: bool) -> str:
    if markdown:

        def cells(r: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

        lines = [cells(header), "|" + "---|" * len(header)]
        lines += [cells(r) for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=4096, help="mosaic side in px (multiple of --tile)")
    p.add_argument("--workdir", default="/tmp/tw-compare", help="folder for inputs and outputs")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, run in this order; any of {', '.join(METHODS)}",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also run tilewise at 2 x SIZE (4x the pixels) and report the peak-memory ratio",
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads of every method"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tilewise's predictor actors (--threads torch threads each); model-only runs its "
        "forwards in as many processes side by side, the same layout",
    )
    p.add_argument("--tile", type=int, default=512, help="output px per window (tilewise, loop)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="windows per forward (tilewise, MONAI); default: tilewise's for --device "
        f"({DEFAULT_BATCH_SIZE['cpu']} on the CPU, {DEFAULT_BATCH_SIZE['cuda']} on CUDA)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where every method runs its forwards (the whole-image reference stays on the CPU "
        "in float32)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="the forwards' precision for every method, as tilewise's compute.precision: auto "
        "= bfloat16 autocast on CUDA (float16 where unsupported), float32 on the CPU",
    )
    p.add_argument("--chunk", type=int, default=1024, help="tilewise's output chunk (write unit)")
    p.add_argument(
        "--model-args",
        type=parse_model_args,
        default={"depth": 4, "base_width": 16},
        help='unet_same arguments: JSON or k=v list (default "depth=4,base_width=16", the '
        "reference's small U-Net of 1.95 M weights; depth=3,base_width=8 is 16x smaller)",
    )
    p.add_argument("--classes", type=int, default=2, help="classes of the network (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the network's weights")
    p.add_argument(
        "--dask-workers",
        type=int,
        default=1,
        help="threads of dask's threaded scheduler; each block's forward uses --threads torch "
        "threads, so 1 keeps the total equal to the other methods' (default 1)",
    )
    p.add_argument(
        "--reference",
        choices=["auto", "whole", "blocks"],
        default="auto",
        help="whole: one forward of the whole padded image; blocks: a corner and a centre "
        "block; auto: whole where it fits in memory",
    )
    p.add_argument("--eval-block", type=int, default=1024, help="block side in blocks mode")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every method this many times, round-robin; times are the fastest run's, "
        "peaks the highest (other work on shared cores only slows runs down)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=0.2,
        help="memory sampling period (s); longer where sampling would take over 2 %% of a core",
    )
    p.add_argument(
        "--ray-head",
        action="store_true",
        help="run tilewise against a Ray head started before it (ray start --head on loopback, "
        "RAY_ADDRESS), as on a cluster: Ray's start and stop are not in its run; the head's "
        "processes count in its memory",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.config)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods takes {', '.join(METHODS)}; got {args.methods!r}")
    if args.size < args.tile or args.size % args.tile:
        p.error(
            f"--size must be a multiple of --tile ({args.tile}) so every baseline tile is whole; "
            f"got {args.size}. Use --size {max(1, args.size // args.tile) * args.tile}."
        )
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1; got {args.repeat}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(
            "--device cuda needs a CUDA GPU, and torch sees none here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use --device cpu."
        )
    if args.device == "cpu" and args.precision in ("bfloat16", "float16"):
        p.error(
            f"--precision {args.precision} is CUDA autocast (AMP); on the CPU every method runs "
            "float32. Use --precision auto or float32, or --device cuda."
        )
    args.batch = resolve_batch_size(args.batch, args.device)
    if args.batch < 1:
        p.error(f"--batch must be at least 1; got {args.batch}")
    from tilewise.workers.predictor import precision_name

    bf16 = args.device == "cuda" and torch.cuda.is_bf16_supported()
    args.precision = precision_name(args.precision, args.device, bf16)
    if args.classes < 2:
        p.error(f"--classes must be at least 2 (class-1 probability); got {args.classes}")
    if not 1 <= args.threads <= (os.cpu_count() or 1):
        p.error(f"--threads must be 1..{os.cpu_count()} (tilewise's actor reserves them in Ray)")
    if not 1 <= args.workers * args.threads <= (os.cpu_count() or 1):
        p.error(
            f"--workers x --threads must be 1..{os.cpu_count()} (each actor reserves its threads "
            f"in Ray); got {args.workers} x {args.threads}"
        )

    size = args.size
    mpx = size * size / 1e6
    base_width = int(args.model_args.get("base_width", 64))

    # Refuse what cannot fit before anything is built or run. The window follows from the
    # network's facts alone (the same rule tilewise's planner applies).
    from tilewise import models
    from tilewise.pipeline.geometry import axis_geometry

    facts = models.facts(ARCH, in_channels=CHANNELS, num_classes=args.classes, **args.model_args)
    geom = axis_geometry(facts, size=size, tile=args.tile, halo=facts.halo, stitch="crop")
    available = psutil.virtual_memory().available
    mon: dict[str, Any] = {}
    if "monai" in methods:
        tensors, need = monai_memory(size, args.classes, args.batch, geom.window, base_width)
        mon["memory_tensors_bytes"] = tensors
        mon["memory_estimate_bytes"] = need
        per_px = 4 * CHANNELS + 4 * args.classes + 4
        print(
            f"MONAI needs about {need / GB:.2f} GB: input + output + count map as float32 "
            f"({per_px} B/px x {mpx:.1f} Mpx = {tensors / GB:.2f} GB), what the allocator keeps "
            f"of the Zarr read ({MONAI_EXTRA_BYTES_PER_PX} B/px), torch and one batch of "
            f"{args.batch} windows of {geom.window} px; {available / GB:.1f} GB available",
            flush=True,
        )
        # With --device cuda the output and count map sit on the GPU: conservative for the host.
        if need > 0.85 * available:
            print(
                f"error: MONAI's sliding_window_inference at {size} x {size} needs about "
                f"{need / GB:.1f} GB but only {available / GB:.1f} GB are available (it holds the "
                f"whole input, output and count map in memory: {per_px} B/px, "
                f"{per_px + MONAI_EXTRA_BYTES_PER_PX} B/px measured). Drop monai from --methods "
                f"or use a smaller --size.",
                file=sys.stderr,
            )
            return 2

    workdir = Path(args.workdir).resolve()
    work = workdir / f"compare-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)

    # The network, the mosaic, tilewise's plan (window, context, overhead, forward batches).
    tag = hashlib.sha1(
        json.dumps([ARCH, args.model_args, args.classes, args.seed], sort_keys=True).encode()
    ).hexdigest()[:8]
    weights = workdir / f"{ARCH}-seed{args.seed}-{tag}.safetensors"
    make_weights(weights, args.model_args, args.classes, args.seed)
    mosaic = workdir / f"mosaic-{size}.zarr"
    build_mosaic(mosaic, size, "zstd")
    job = write_job(work / "tilewise", mosaic, size, weights, args)
    plan = tilewise_plan(job)
    window, lead, halo, stride = plan["window"], plan["lead"], plan["halo"], plan["stride"]
    print(
        f"tilewise plan: window {window} px (tile {args.tile}, halo {halo}, context {lead}), "
        f"{plan['units']} units, {len(plan['batches'])} forwards, overlap overhead "
        f"{plan['overlap']:.3f}x",
        flush=True,
    )
    if "monai" in methods:
        mon.update(monai_overlap(size, window, plan["overlap"]))
        print(
            f"MONAI: overlap {mon['overlap']} (step {mon['step']} px, {mon['windows']} windows of "
            f"{window} px): overhead {mon['overhead']:.3f}x vs tilewise {plan['overlap']:.3f}x",
            flush=True,
        )

    # The reference: the whole image in one forward where that fits, else two blocks.
    padded = (size + 2 * lead) ** 2
    ref_estimate = REF_BYTES_PER_PX * base_width / 8 * padded + BASELINE_BYTES
    mode = args.reference
    if mode == "auto":
        mode = "whole" if ref_estimate < min(8 * GB, 0.5 * available) else "blocks"
    regions = reference_regions(size, mode, args.eval_block, stride)
    cfg: dict[str, Any] = {
        "mosaic": str(mosaic),
        "weights": str(weights),
        "model_args": args.model_args,
        "classes": args.classes,
        "threads": args.threads,
        "workers": args.workers,
        "tile": args.tile,
        "batch": args.batch,
        "window": window,
        "lead": lead,
        "halo": halo,
        "stride": stride,
        "batches": plan["batches"],
        "regions": regions,
        "monai_overlap": mon.get("overlap", 0.25),
        "dask_workers": args.dask_workers,
        "dask_out": str(work / "dask-out.zarr"),
        "device": args.device,
        "precision": args.precision,
    }
    ref_key = json.dumps([str(weights), size, regions, lead, halo, stride], sort_keys=True)
    ref_path = work / "reference.npz"
    ref_ok = False
    if ref_path.exists():
        with np.load(ref_path) as data:
            ref_ok = str(data["key"]) == ref_key
    result: dict[str, Any] = {
        "size": size,
        "mpx": round(mpx, 2),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "workers": args.workers,
        "ray_head": args.ray_head,
        "tile": args.tile,
        "batch": args.batch,
        "chunk": args.chunk,
        "device": args.device,
        "precision": args.precision,
        "model": {
            "arch": ARCH,
            "args": args.model_args,
            "classes": args.classes,
            "seed": args.seed,
            "weights": str(weights),
        },
        "tilewise_plan": {k: v for k, v in plan.items() if k != "batches"},
        "forwards": len(plan["batches"]),
        "allocator_env": ALLOCATOR_ENV,
        "load_average_at_start": os.getloadavg(),
        "reference": {"mode": mode, "regions": regions, "estimate_bytes": int(ref_estimate)},
        "monai": mon,
        "methods": {},
    }
    if not ref_ok:
        print(f"reference ({mode}: {regions}) ...", flush=True)
        t0 = time.perf_counter()
        rcfg = {**cfg, "ref_key": ref_key, "ref_path": str(ref_path),
                "result_path": str(work / "reference.json")}  # fmt: skip
        (work / "reference-config.json").write_text(json.dumps(rcfg))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "reference",
               "--config", str(work / "reference-config.json")]  # fmt: skip
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0:
            print("error: the whole-image reference failed", file=sys.stderr)
            return 1
        print(f"  reference computed in {time.perf_counter() - t0:.1f} s", flush=True)
    with np.load(ref_path) as data:
        ref = [(data[f"p1_{i}"], data[f"lab_{i}"]) for i in range(len(regions))]

    # The methods, one subprocess each; with --repeat, round-robin, keeping the fastest run.
    attempts: dict[str, list[dict[str, Any]]] = {}

    def attempt(name: str, run: Any) -> None:
        if all(r["ok"] for r in attempts.get(name, [])):  # a failed method is not retried
            attempts.setdefault(name, []).append(run())

    for _ in range(args.repeat):
        for name in methods:
            if name == "tilewise" and args.ray_head:

                def against_head() -> dict[str, Any]:
                    cpus = os.cpu_count() or 1
                    with ray_head(env, cpus, work / "ray-head.log") as head:
                        return run_tilewise(job, env, args.interval, head)

                attempt(name, against_head)
                attempt(
                    "model-only",
                    lambda: run_in_worker("model-only", cfg, work, env, args.interval),
                )
            elif name == "tilewise":
                attempt(name, lambda: run_tilewise(job, env, args.interval))
                attempt(
                    "model-only",
                    lambda: run_in_worker("model-only", cfg, work, env, args.interval),
                )
            else:
                attempt(name, lambda n=name: run_in_worker(n, cfg, work, env, args.interval))
    runs: dict[str, dict[str, Any]] = {}

    def record(name: str, res: dict[str, Any]) -> None:
        """Add a method's combined runs with its throughput and accuracy."""
        # model-only's wall is a process start and random data, not a throughput
        wall_rate = res["ok"] and name != "model-only"
        res["output_mpx_per_s_wall"] = round(mpx / res["wall_s"], 3) if wall_rate else None
        own = res.get("own_s")
        res["output_mpx_per_s_own"] = round(mpx / own, 3) if res["ok"] and own else None
        if res["ok"] and name != "model-only":
            res["accuracy"] = evaluate(
                load_method_regions(name, res, regions, work, cfg), ref, regions, size, lead
            )
        runs[name] = result["methods"][name] = res

    for name, tries in attempts.items():
        record(name, combine(tries))
    ceiling = None
    if "model-only" in runs and runs["model-only"]["ok"] and runs["tilewise"]["ok"]:
        ceiling = runs["model-only"]["output_mpx_per_s_own"]
        tw = runs["tilewise"]
        result["pipeline_efficiency"] = {
            "model_only_mpx_per_s": ceiling,
            "by_report_seconds": round(tw["output_mpx_per_s_own"] / ceiling, 3),
            "by_command_wall": round(tw["output_mpx_per_s_wall"] / ceiling, 3),
            # CPU seconds of the forwards alone over CPU seconds of tilewise's whole process
            # tree (driver, Ray's daemons, the actor)
            "by_cpu_seconds": round(
                runs["model-only"]["worker"]["compute_cpu_seconds"] / tw["cpu_s"], 3
            ),
        }
        # Each repeat runs tilewise and then model-only back to back: their ratio per pair
        # leaves out the machine's drift from one pair to the next (the fastest of each method,
        # above, may come from different pairs).
        pairs = [
            round(m["own_s"] / t["own_s"], 3)
            for t, m in zip(tw["runs"], runs["model-only"]["runs"], strict=False)
            if t.get("own_s") and m.get("own_s")
        ]
        if len(pairs) > 1:
            result["pipeline_efficiency"]["by_report_seconds_per_pair"] = pairs
        report = tw.get("report", {})
        n, first = report.get("units_computed", 0), report.get("first_unit_seconds", 0.0)
        if n > 1 and first and report.get("seconds", 0) > first:
            # The units after the first one (all units are equal here: SIZE is a multiple of
            # the chunk), against the time after it: Ray and actor start-up left out.
            steady = report["output_pixels"] * (n - 1) / n / 1e6 / (report["seconds"] - first)
            result["pipeline_efficiency"].update(
                steady_state=round(steady / ceiling, 3),
                first_unit_seconds=round(first, 2),
                start_up_seconds=round(first - report["output_pixels"] / n / 1e6 / steady, 2),
            )
    if "monai" in runs and runs["monai"]["ok"]:
        mon["measured_peak_pss_bytes"] = runs["monai"]["peak_pss_sum_bytes"]
        mon["measured_peak_rss_bytes"] = runs["monai"]["peak_rss_sum_bytes"]
        runs["monai"]["overlap"] = mon["overhead"]

    # Scaling: tilewise at 2 x SIZE.
    if args.scaling:
        big = 2 * size
        mosaic2 = workdir / f"mosaic-{big}.zarr"
        build_mosaic(mosaic2, big, "zstd")
        job2 = write_job(work / f"tilewise-{big}", mosaic2, big, weights, args)
        res2 = combine([run_tilewise(job2, env, args.interval) for _ in range(args.repeat)])
        if "tilewise" not in runs:
            record("tilewise", combine([run_tilewise(job, env, args.interval)]))
        small = runs["tilewise"]
        scal: dict[str, Any] = {"size": big, "run": res2}
        if res2["ok"] and small["ok"]:
            scal["pss_ratio"] = round(res2["peak_pss_sum_bytes"] / small["peak_pss_sum_bytes"], 3)
            scal["rss_ratio"] = round(res2["peak_rss_sum_bytes"] / small["peak_rss_sum_bytes"], 3)
            scal["target"] = 1.25
            scal["met"] = scal["pss_ratio"] <= 1.25
            # Report seconds = fixed cost (Ray and actor start, first forward) + pixels / rate:
            # two sizes give both, and the rate is what a large image runs at.
            extra = res2["own_s"] - small["own_s"]
            if extra > 0:
                rate = (big * big - size * size) / 1e6 / extra
                scal["marginal_mpx_per_s"] = round(rate, 3)
                scal["fixed_seconds"] = round(small["own_s"] - mpx / rate, 1)
                if ceiling:
                    scal["marginal_efficiency"] = round(rate / ceiling, 3)
        result["scaling"] = scal

    # The table.
    header = ["method", "wall s", "own s", "CPU s", "Mpx/s wall", "Mpx/s own", "peak RSS GB",
              "peak PSS GB", "overlap", "max|Δp1|", "max|Δp1| inner", "px off",
              "labels agree"]  # fmt: skip
    rows = []
    for name, res in runs.items():
        acc = res.get("accuracy", {})
        rows.append(
            [
                name if res["ok"] else f"{name} (FAILED)",
                fmt(res["wall_s"], ".1f"),
                fmt(res.get("own_s"), ".1f"),
                fmt(res.get("cpu_s"), ".1f"),
                fmt(res["output_mpx_per_s_wall"], ".2f"),
                fmt(res["output_mpx_per_s_own"], ".2f"),
                fmt_gb(res["peak_rss_sum_bytes"]),
                fmt_gb(res["peak_pss_sum_bytes"]),
                fmt(res.get("overlap"), ".3f"),
                fmt(acc.get("max_abs_dp1"), ".1e"),
                fmt(acc.get("max_abs_dp1_interior"), ".1e"),
                fmt(100 * acc["share_off"], ".2f") + " %" if acc else "-",
                fmt(100 * acc["label_agreement"], ".4f") + " %" if acc else "-",
            ]
        )
    print()
    print(
        f"{size} x {size} px ({mpx:.1f} Mpx), {ARCH} {args.model_args}, {args.classes} classes, "
        f"tile {args.tile}, window {window}, batch {args.batch}, {args.threads} torch threads"
        f"{f' x {args.workers} processes (tilewise, model-only)' if args.workers > 1 else ''}, "
        f"{os.cpu_count()} CPUs, forwards on {args.device} in {args.precision}; reference: "
        f"{mode} (CPU, float32); load average "
        f"{result['load_average_at_start'][1]:.1f} at the start, {os.getloadavg()[1]:.1f} now "
        f"(5 min)"
    )
    print(table(rows, header, args.markdown))
    ray_stop = "against a running Ray head" if args.ray_head else "incl. Ray start/stop"
    print(
        f"wall = command start to result (tilewise: whole CLI run {ray_stop}); own = "
        "tilewise's report seconds, or the method's in-process time from opening the input; CPU s "
        "= user + system seconds of the method's process tree up to its result; "
        "overlap = computed / output px; Δp1 vs whole-image inference (float16 outputs round by "
        f"<= 2.4e-4); inner = pixels >= {lead} px from the border; px off = share with |Δp1| > "
        f"{OFF:g}."
    )
    for name, res in runs.items():
        acc = res.get("accuracy")
        if acc:
            reach = acc["off_max_distance_to_border"]
            where = f"none is off by > {OFF:g}"
            if reach is not None:
                where = f"pixels off by > {OFF:g} lie up to {reach} px in from the border"
            print(
                f"{name}: {acc['float16_mismatches']:,} of {acc['evaluated_pixels']:,} px differ "
                f"from the reference rounded to float16; {where}; "
                f"{acc['label_mismatches']:,} labels differ"
            )
    if "pipeline_efficiency" in result:
        e = result["pipeline_efficiency"]
        ray_start = "against a running Ray head" if args.ray_head else "incl. Ray start"
        print(
            f"pipeline efficiency (tilewise Mpx/s / model-only {e['model_only_mpx_per_s']:.2f} "
            f"Mpx/s on the same {len(plan['batches'])} forwards): {e['by_report_seconds']:.2f} "
            f"by tilewise's report seconds ({ray_start}), {e['by_command_wall']:.2f} by the "
            f"whole command's wall time, {e['by_cpu_seconds']:.2f} by CPU seconds (forwards "
            f"alone / tilewise's whole process tree)"
        )
        if "by_report_seconds_per_pair" in e:
            pairs = e["by_report_seconds_per_pair"]
            print(
                f"by report seconds in each pair of runs (tilewise, then model-only): "
                f"{', '.join(f'{v:.2f}' for v in pairs)}; median {statistics.median(pairs):.2f}"
            )
        if "steady_state" in e:
            print(
                f"tilewise's first unit was written {e['first_unit_seconds']:.1f} s after the "
                f"start (about {e['start_up_seconds']:.1f} s of planning and starting Ray and "
                f"the actors); after it, pipeline efficiency {e['steady_state']:.2f}"
            )
    if mon:
        measured = mon.get("measured_peak_pss_bytes")
        print(
            f"MONAI overlap {mon['overlap']} -> overhead {mon['overhead']:.3f}x (tilewise "
            f"{plan['overlap']:.3f}x); memory estimate {mon['memory_estimate_bytes'] / GB:.2f} GB"
            + (f", measured peak PSS {measured / GB:.2f} GB" if measured else "")
        )
    gpu = {
        n: r["worker"]["gpu_peak_allocated_bytes"]
        for n, r in runs.items()
        if r["ok"] and "gpu_peak_allocated_bytes" in r.get("worker", {})
    }
    if gpu:
        print(
            "GPU memory, torch's peak allocation in the method's process: "
            + ", ".join(f"{n} {b / GB:.2f} GB" for n, b in gpu.items())
            + " (tilewise's actors: not sampled)"
        )
    if "scaling" in result and "pss_ratio" in result["scaling"]:
        s = result["scaling"]
        r2 = s["run"]
        print(
            f"scaling: tilewise at {s['size']} x {s['size']}: peak PSS "
            f"{r2['peak_pss_sum_bytes'] / GB:.2f} GB, RSS {r2['peak_rss_sum_bytes'] / GB:.2f} GB, "
            f"{r2['wall_s']:.1f} s; ratio to {size}: PSS {s['pss_ratio']:.3f}, RSS "
            f"{s['rss_ratio']:.3f} (target <= 1.25: {'met' if s['met'] else 'NOT met'})"
        )
        if "marginal_mpx_per_s" in s:
            eff = s.get("marginal_efficiency")
            print(
                f"tilewise's report seconds = {s['fixed_seconds']:.1f} s fixed (Ray and actor "
                f"start, first forward) + Mpx / {s['marginal_mpx_per_s']:.2f} Mpx/s (from "
                f"{size} and {s['size']})"
                + (f": marginal pipeline efficiency {eff:.2f}" if eff else "")
            )
    # Other work on the machine only slows runs down: repeats that disagree mean the times
    # (and the ratios built from them) were disturbed.
    timed = dict(runs)
    if "scaling" in result:
        timed[f"tilewise at {2 * size}"] = result["scaling"]["run"]
    spreads = {}
    for name, res in timed.items():
        own = [r["own_s"] for r in res.get("runs", []) if r.get("own_s")]
        if res["ok"] and len(own) > 1:
            spreads[name] = round(max(own) / min(own), 2)
    result["repeat_spread"] = spreads
    unstable = {k: v for k, v in spreads.items() if v > 1.2}
    if unstable:
        print(
            "warning: repeats differ by more than 20 % (slowest / fastest own seconds: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in unstable.items())
            + "): other work shared the CPUs; take the times as upper bounds"
        )
    elif args.repeat == 1 and result["load_average_at_start"][0] > (os.cpu_count() or 1):
        print(
            f"warning: the load average was {result['load_average_at_start'][0]:.1f} on "
            f"{os.cpu_count()} CPUs at the start: other work may have slowed the runs "
            f"(--repeat 2 keeps the fastest of two)"
        )
    result["load_average_at_end"] = os.getloadavg()
    out = workdir / "compare.json"
    out.write_text(json.dumps(result, indent=2))
    (work / "compare.json").write_text(out.read_text())  # a copy per size, kept
    print(f"wrote {out}")
    failed = [n for n, r in runs.items() if not r["ok"]]
    if "scaling" in result and not result["scaling"]["run"]["ok"]:
        failed.append(f"tilewise at {2 * size}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
