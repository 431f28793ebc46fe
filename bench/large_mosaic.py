"""Large-mosaic benchmark: segment a >= 20,000 x 20,000 px mosaic with a tiny U-Net, measuring
the peak memory of every process the run starts.

    python bench/large_mosaic.py --size 20000 --workdir /tmp/tw-bench
    python bench/large_mosaic.py --size 4096  --workdir /tmp/tw-bench-small   # quick check

Steps:

1. Build ``WORKDIR/mosaic-SIZE.zarr``: a (3, SIZE, SIZE) uint8 Zarr array, chunks (3, 1024, 1024),
   filled block by block (never held whole in memory) from the IHC slide that ships with
   scikit-image, mirror-tiled into a seamless 1024 x 1024 base and rolled per block. An existing
   complete mosaic of the right shape is reused.
2. Make the tiny U-Net (unet_same, depth 2, base width 4: 7,474 weights): fit it for a few
   seconds to the slide's DAB stain and save ``WORKDIR/tiny_unet.safetensors`` (``--weights
   seeded`` uses random weights from the seed instead). Write ``WORKDIR/job.yaml`` (tile 512,
   labels uint8) and run ``tilewise run job.yaml --json --no-progress --overwrite`` as a
   subprocess.
3. Every 0.2 s sum the memory of the subprocess and all its descendants (the embedded Ray's gcs
   server, raylet, workers, ...), plus any Ray process started after the run began that is not
   in the tree (re-parented). RSS-sum counts shared pages (torch's libraries, Ray's shared object
   store) once per process; PSS-sum splits them between the processes that share them.
4. Print a table, write it to ``WORKDIR/result.json``, and verify the output (shape, status
   "complete", and one interior 512 x 512 block against ``tilewise.predict_array``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

# 3. Memory sampling lives in bench/_memory.py (shared with compare.py); a script's own folder is
# on sys.path when it is run as `python bench/large_mosaic.py`.
from _memory import Sampler, breakdown, leftover_ray

GB = 10**9  # decimal units throughout: 3 GB = 3e9 bytes (the stricter reading of the goal)
MB = 10**6
LIMIT_BYTES = 3 * GB  # the "done when" figure: all processes together under 3 GB
BLOCK = 1024
TILE = 512
MARK = "tilewise_bench_complete"  # attribute set once every block of the mosaic is written

# ----------------------------------------------------------------------------------------------
# 1. The mosaic
# ----------------------------------------------------------------------------------------------


def mirror_base() -> np.ndarray:
    """(3, 1024, 1024) uint8: the 512 x 512 IHC slide mirrored into a seamless periodic tile."""
    from skimage import data

    a = np.moveaxis(data.immunohistochemistry(), -1, 0)  # (3, 512, 512)
    top = np.concatenate([a, a[:, :, ::-1]], axis=2)
    base = np.concatenate([top, top[:, ::-1, :]], axis=1)
    return np.ascontiguousarray(base)


def mosaic_block(base: np.ndarray, by: int, bx: int, h: int, w: int) -> np.ndarray:
    """Block (by, bx) of the mosaic: the periodic base rolled by a per-block offset."""
    rng = np.random.default_rng([by, bx])
    dy, dx = (int(v) for v in rng.integers(0, BLOCK, size=2))
    block = np.roll(base, (dy, dx), axis=(1, 2))
    if rng.integers(2):  # a transposed block now and then, so rows differ from columns
        block = block.transpose(0, 2, 1)
    return np.ascontiguousarray(block[:, :h, :w])


def build_mosaic(path: Path, size: int, compressor: str) -> tuple[bool, float]:
    """Create (or reuse) the mosaic; return (reused, seconds)."""
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    t0 = time.perf_counter()
    if path.exists():
        try:
            arr = zarr.open_array(store=str(path), mode="r")
            if tuple(arr.shape) == (3, size, size) and arr.attrs.get(MARK):
                print(f"reusing input {path} {tuple(arr.shape)} ({arr.dtype})", flush=True)
                return True, 0.0
        except Exception as exc:  # a half-written or foreign store: rebuild it
            print(f"input {path} not reusable ({type(exc).__name__}); rebuilding", flush=True)
    codec = (
        ZstdCodec(level=3)
        if compressor == "zstd"
        else BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    )
    arr = zarr.create_array(
        store=str(path),
        shape=(3, size, size),
        chunks=(3, BLOCK, BLOCK),
        dtype="uint8",
        compressors=codec,
        fill_value=0,
        dimension_names=("c", "y", "x"),
        overwrite=True,
    )
    base = mirror_base()
    n = -(-size // BLOCK)
    print(
        f"building input {path}: (3, {size}, {size}) uint8, {n * n} blocks of {BLOCK} x {BLOCK}",
        flush=True,
    )
    for by in range(n):
        y0, y1 = by * BLOCK, min(size, (by + 1) * BLOCK)
        for bx in range(n):
            x0, x1 = bx * BLOCK, min(size, (bx + 1) * BLOCK)
            arr[:, y0:y1, x0:x1] = mosaic_block(base, by, bx, y1 - y0, x1 - x0)
    arr.attrs[MARK] = True
    seconds = time.perf_counter() - t0
    print(f"  built in {seconds:.1f} s", flush=True)
    return False, seconds


# ----------------------------------------------------------------------------------------------
# 2. The network and the job
# ----------------------------------------------------------------------------------------------

ARCH_ARGS = {"depth": 2, "base_width": 4}


def train_tiny_unet(path: Path, steps: int) -> float:
    """Fit the tiny U-Net to the IHC slide's DAB (brown) stain and save it as safetensors.

    The target is the slide's colour-deconvolved DAB channel above its 75th percentile; a few
    seconds of Adam on random 128 px crops give a network whose labels are far from constant, so
    the spot check below compares real segmentations. Input scaling matches the job (x / 255).
    Returns the seconds spent (0 when an existing file is reused).
    """
    if path.exists():
        print(f"reusing weights {path}", flush=True)
        return 0.0
    import torch
    from safetensors.torch import save_file
    from skimage import color, data

    from tilewise import models

    t0 = time.perf_counter()
    rgb = data.immunohistochemistry()
    dab = color.rgb2hed(rgb)[..., 2]
    target = torch.from_numpy((dab > np.percentile(dab, 75)).astype(np.int64))
    image = torch.from_numpy(np.moveaxis(rgb, -1, 0).astype(np.float32) / 255.0)
    torch.manual_seed(0)
    model = models.create("unet_same", in_channels=3, num_classes=2, **ARCH_ARGS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    model.train()
    side, n = 128, 8
    for _ in range(steps):
        ys, xs = rng.integers(0, 512 - side, (2, n))
        xb = torch.stack(
            [image[:, y : y + side, x : x + side] for y, x in zip(ys, xs, strict=True)]
        )
        yb = torch.stack([target[y : y + side, x : x + side] for y, x in zip(ys, xs, strict=True)])
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        pred = model(image[None]).argmax(1)[0]
    acc = float((pred == target).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    seconds = time.perf_counter() - t0
    print(
        f"trained tiny U-Net ({sum(p.numel() for p in model.parameters())} weights, {steps} "
        f"steps, pixel accuracy {acc:.3f} on the slide) in {seconds:.1f} s -> {path}",
        flush=True,
    )
    return seconds


JOB_TEMPLATE = """\
# written by bench/large_mosaic.py
kind: predict
name: large-mosaic-{size}
input:
  path: {input}
model:
  arch: unet_same
  num_classes: 2
  args: {{depth: {depth}, base_width: {base_width}}}
  seed: 0
{weights}tiling:
  tile: {tile}
  batch_size: {batch_size}
output:
  path: {output}
  labels: uint8
"""


def write_job(
    workdir: Path, mosaic: Path, out: Path, size: int, batch_size: int | None, weights: Path | None
) -> Path:
    job = workdir / "job.yaml"
    job.write_text(
        JOB_TEMPLATE.format(
            size=size,
            input=mosaic,
            output=out,
            tile=TILE,
            batch_size="null" if batch_size is None else batch_size,
            weights=f"  weights: {weights}\n  class_names: [background, dab]\n" if weights else "",
            **ARCH_ARGS,
        )
    )
    return job


# ----------------------------------------------------------------------------------------------
# 4. Verification
# ----------------------------------------------------------------------------------------------


def verify(job_path: Path, out: Path, size: int) -> dict[str, Any]:
    """Check the output's shape and status; compare one interior block with predict_array."""
    import torch
    import zarr

    from tilewise import predict_array
    from tilewise.pipeline.job import build_model, prepare
    from tilewise.pipeline.postprocess import labels_from_scores
    from tilewise.spec import load_job

    root = zarr.open_group(store=str(out), mode="r")
    labels = root["labels/0"]
    status = dict(root.attrs.get("tilewise", {})).get("status")
    result: dict[str, Any] = {
        "labels_shape": list(labels.shape),
        "labels_dtype": str(labels.dtype),
        "status": status,
        "shape_ok": tuple(labels.shape) == (size, size),
        "status_ok": status == "complete",
    }
    # Spot check: an interior tile-aligned block, recomputed in process on the block plus one
    # tile of context per side. Window origins then coincide with the run's (both sit on the
    # tile grid), so the windows see the same pixels and crop stitching must agree.
    if size >= 3 * TILE:
        job = load_job(str(job_path))
        prepared = prepare(job)
        model = build_model(job, prepared.in_channels)
        y0 = x0 = (size // 2) // TILE * TILE
        y0 = min(y0, size - 2 * TILE)
        x0 = y0
        cy0, cy1 = y0 - TILE, y0 + 2 * TILE
        cx0, cx1 = x0 - TILE, x0 + 2 * TILE
        raw = np.asarray(prepared.image.read(cy0, cy1, cx0, cx1))
        crop = prepared.normalizer(torch.from_numpy(raw)).numpy()
        t0 = time.perf_counter()
        scores = predict_array(
            model, crop, tile=TILE, batch_size=job.tiling.batch_size, device="cpu"
        )
        seconds = time.perf_counter() - t0
        expect = labels_from_scores(scores[:, TILE : 2 * TILE, TILE : 2 * TILE], "uint8")
        got = np.asarray(labels[y0 : y0 + TILE, x0 : x0 + TILE])
        mismatches = int((expect != got).sum())
        counts = np.bincount(got.ravel(), minlength=2).tolist()
        result.update(
            spot_block=[y0, x0, TILE],
            spot_mismatches=mismatches,
            spot_class_counts=counts,
            spot_seconds=round(seconds, 2),
            spot_ok=mismatches == 0,
        )
    return result


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=20000, help="mosaic side in pixels")
    p.add_argument("--workdir", default="/tmp/tw-bench", help="folder for mosaic, job, output")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiling.batch_size of the job; default: none given, so tilewise's (1 on the CPU)",
    )
    p.add_argument(
        "--compressor",
        choices=["zstd", "blosc-lz4"],
        default="zstd",
        help="codec of the input mosaic",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=0.2,
        help="memory sampling period (s); longer where sampling would take over 2 %% of a core",
    )
    p.add_argument(
        "--weights",
        choices=["trained", "seeded"],
        default="trained",
        help="trained: fit the tiny U-Net to the slide's DAB stain for a few seconds "
        "and save WORKDIR/tiny_unet.safetensors (default); seeded: random "
        "weights from model.seed (labels then are nearly constant)",
    )
    p.add_argument("--train-steps", type=int, default=120, help="training steps (trained)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the run (reaches the Ray processes it starts), "
        "e.g. --env MALLOC_ARENA_MAX=2; repeatable",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the output checks")
    args = p.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    mosaic = workdir / f"mosaic-{args.size}.zarr"
    out = workdir / "out.zarr"
    reused, build_s = build_mosaic(mosaic, args.size, args.compressor)
    weights = None
    train_s = 0.0
    if args.weights == "trained":
        weights = workdir / "tiny_unet.safetensors"
        train_s = train_tiny_unet(weights, args.train_steps)
    job = write_job(workdir, mosaic, out, args.size, args.batch_size, weights)

    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--env wants KEY=VALUE; got {item!r}")
        env[key] = value
    if env.get("RAY_ADDRESS"):
        print(
            f"warning: RAY_ADDRESS={env['RAY_ADDRESS']} is set: the run joins that cluster, "
            f"whose processes are not children of this run and are not measured",
            flush=True,
        )
    cmd = [
        sys.executable,
        "-m",
        "tilewise.cli",
        "run",
        str(job),
        "--json",
        "--no-progress",
        "--overwrite",
    ]
    print("running:", " ".join(cmd), flush=True)
    log_path = workdir / "run.log"
    started = time.time()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        sampler = Sampler(psutil.Process(proc.pid), started, interval=args.interval)
        sampler.start()
        stdout, _ = proc.communicate()
        wall = time.perf_counter() - t0
        sampler.stop()
    time.sleep(1.0)
    left = leftover_ray(started, sampler.sessions)
    if proc.returncode != 0:
        print(f"tilewise run failed with exit status {proc.returncode}; stderr in {log_path}:")
        print(log_path.read_text()[-4000:])
        return 1
    report: dict[str, Any] = {}
    for line in reversed(stdout.splitlines()):
        try:
            report = json.loads(line)
            break
        except json.JSONDecodeError:
            continue

    mpx = args.size * args.size / 1e6
    peak_rss = sampler.peak_rss.rss if sampler.peak_rss else 0
    peak_pss = sampler.peak_pss.pss if sampler.peak_pss else 0
    result: dict[str, Any] = {
        "size": args.size,
        "mpx": round(mpx, 1),
        "input_reused": reused,
        "input_build_s": round(build_s, 1),
        "weights": str(weights) if weights else "seeded",
        "train_s": round(train_s, 1),
        "wall_s": round(wall, 1),
        "mpx_per_s_wall": round(mpx / wall, 3),
        "report_seconds": round(report.get("seconds", 0.0), 1),
        "report_mpx_per_s": report.get("mpx_per_s"),
        "units_total": report.get("units_total"),
        "units_computed": report.get("units_computed"),
        "overlap": report.get("overlap"),
        "workers": report.get("workers"),
        "peak_rss_sum_bytes": peak_rss,
        "peak_pss_sum_bytes": peak_pss,
        "max_single_rss_bytes": sampler.max_single.get("rss", 0),
        "max_single_rss_process": sampler.max_single.get("name"),
        "under_3gb_pss": peak_pss < LIMIT_BYTES,
        "under_3gb_rss": peak_rss < LIMIT_BYTES,
        "samples": sampler.samples,
        "max_processes": sampler.max_procs,
        "processes_seen": {str(k): v for k, v in sampler.seen.items()},
        "ray_sessions": sorted(sampler.sessions),
        "max_pss_by_process_name_mb": {
            k: round(v / MB, 1)
            for k, v in sorted(sampler.max_per_name.items(), key=lambda kv: -kv[1])
        },
        "escaped_processes": {str(k): v for k, v in sampler.escaped.items()},
        "leftover_ray_processes": left,
        "pss_unavailable": sampler.pss_errors,
        "peak_pss_at_s": round(sampler.peak_pss.t - t0, 1) if sampler.peak_pss else None,
        "breakdown_at_peak_pss": breakdown(sampler.peak_pss),
        "breakdown_at_peak_rss": breakdown(sampler.peak_rss),
        "cpus": os.cpu_count(),
        "extra_env": args.env,
        "report": report,
        "timeline_s_rssMB_pssMB_nprocs_maxrssMB": sampler.timeline,
    }
    if not args.no_verify:
        result["verify"] = verify(job, out, args.size)

    rows = [
        ("mosaic", f"{args.size} x {args.size} x 3 uint8"),
        ("Mpx", f"{mpx:.1f}"),
        ("wall time", f"{wall:.1f} s (tilewise report: {result['report_seconds']} s)"),
        ("Mpx/s", f"{mpx / wall:.2f} wall, {report.get('mpx_per_s')} reported"),
        (
            "units",
            f"{report.get('units_computed')} / {report.get('units_total')} "
            f"(overlap {report.get('overlap')}x, {report.get('workers')} worker)",
        ),
        ("peak RSS sum", gb(peak_rss) + " (counts shared pages once per process)"),
        ("peak PSS sum", gb(peak_pss)),
        (
            "max 1-proc RSS",
            f"{gb(result['max_single_rss_bytes'])} ({result['max_single_rss_process']})",
        ),
        (
            "under 3 GB",
            f"PSS {'yes' if peak_pss < LIMIT_BYTES else 'NO'}, "
            f"RSS {'yes' if peak_rss < LIMIT_BYTES else 'NO'}",
        ),
        (
            "processes",
            f"{sampler.max_procs} at most, {len(sampler.seen)} seen, "
            f"{len(sampler.escaped)} outside the tree, {sampler.samples} samples",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    tl = sampler.timeline
    if tl:
        marks = sorted({min(len(tl) - 1, int(len(tl) * f)) for f in (0.1, 0.25, 0.5, 0.75, 0.9)})
        print(
            "PSS sum over time: "
            + ", ".join(f"{tl[i][0]:.0f} s {tl[i][2] / 1024:.2f} GB" for i in marks)
        )
    print(f"\nat peak PSS ({result['peak_pss_at_s']} s into the run):")
    for r in result["breakdown_at_peak_pss"]:
        print(
            f"  {r['pid']:>7} (parent {r['ppid']:>7})  {r['name']:<30} RSS "
            f"{r['rss_mb']:>7.1f} MB  PSS {r['pss_mb']:>7.1f} MB  USS {r['uss_mb']:>7.1f} MB"
            f"{'' if r['in_tree'] else '  (outside tree)'}"
        )
    print("\nevery process seen (max over the run):")
    for pid, e in sorted(sampler.seen.items(), key=lambda kv: -kv[1]["max_pss_mb"]):
        print(
            f"  {pid:>7} (parent {e['ppid']:>7})  {' -> '.join(e['names']):<44} RSS "
            f"{e['max_rss_mb']:>7.1f} MB  PSS {e['max_pss_mb']:>7.1f} MB"
            f"{'' if e['in_tree'] else '  (outside tree)'}"
        )
    if left:
        print(f"\nRay processes still alive after the run: {left}")
    if "verify" in result:
        v = result["verify"]
        print(f"\noutput labels/0 {v['labels_shape']} {v['labels_dtype']}, status {v['status']}")
        if "spot_mismatches" in v:
            print(
                f"spot check {v['spot_block']}: {v['spot_mismatches']} of {TILE * TILE} px "
                f"differ from predict_array (class counts {v['spot_class_counts']})"
            )
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {workdir / 'result.json'}")
    checks = result.get("verify", {})
    ok = all(checks.get(k, True) for k in ("shape_ok", "status_ok", "spot_ok"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
