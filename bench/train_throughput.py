"""Training throughput with patches read from Zarr against patches already in memory.

    python bench/train_throughput.py                                  # 2 CPU cores: ~70 s
    python bench/train_throughput.py --batch-sizes 8 --steps 6        # a quick look
    python bench/train_throughput.py --patch 256 --depth 4 --base-width 32 --steps 40  # a GPU

Unlike ``bench/train_loader.py`` (the loader alone, against a simulated step), every step here
is a real training step, as ``tilewise.training.loop`` takes it: the next batch from a
:class:`tilewise.training.loader.PatchLoader` (flips and 90° rotations, the job normaliser in
the loader's threads, pinned memory on a GPU), the copy to the device, forward of a
``unet_same``, cross-entropy, backward, an Adam step, and the loss read back (which waits for
the device). The same run is done twice per batch size: with the loader reading every patch
from the Zarr shards, and with ``in_memory=True`` (every shard read into RAM before the clock
starts). Both draw the very same patches (same sampler seed) into the same seeded network, so
they do the same arithmetic and differ only in where the pixels come from, and in the CPU time
the reader threads take from the step. ``--warmup`` steps are not timed. The two ways run
back to back in ``--pairs`` pairs (alternating which goes first): other work on the machine
slows both runs of a pair alike, so the median of the pairs' ratios is steadier than the ratio
of the two ways' best runs.

The ratio ``zarr / memory`` of training samples per second is the figure: at >= 0.9 the loader
keeps up (reading from Zarr costs training at most a tenth of its speed). ``wait zarr`` is the
share of the time the step waited for a batch; a ratio below 1 with no waiting means that the
reader thread took CPU from the step (on a CPU host), not that batches came late.

Shards: ``--shards`` groups of (3, SIZE, SIZE) uint8, tiled from scikit-image's
immunohistochemistry image (rolled and with a little noise per shard, so that they compress
like a stained slide), Zarr v3 chunks of ``--chunk`` px with zarr's default zstd; labels
(uint8, 3 classes) from its colour deconvolution: haematoxylin-rich pixels 1, DAB-rich 2, the
rest 0. They are written once into ``--workdir`` and reused. ``--device auto`` trains on the
GPU when there is one (with the loop's ``amp: auto``, bfloat16 autocast), else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch


def make_shards(workdir: Path, count: int, size: int, chunk: int) -> list[str]:
    """``count`` shard groups in ``workdir``, reused when complete and of these settings."""
    import zarr
    from skimage import data
    from skimage.color import rgb2hed

    rgb = data.immunohistochemistry()  # (512, 512, 3) uint8
    hed = rgb2hed(rgb)
    label = np.zeros(rgb.shape[:2], np.uint8)
    label[hed[..., 0] > np.percentile(hed[..., 0], 75)] = 1  # haematoxylin: nuclei
    label[hed[..., 2] > np.percentile(hed[..., 2], 85)] = 2  # DAB: the stained protein
    base = rgb.transpose(2, 0, 1)
    settings = {"size": size, "chunk": chunk, "source": "immunohistochemistry"}
    locations = []
    for n in range(count):
        path = workdir / f"shard{n}.zarr"
        locations.append(str(path))
        try:
            if zarr.open_group(str(path), mode="r").attrs.get("complete") == settings:
                continue
        except Exception:  # absent or half-written: (re)write it
            pass
        reps = -(-size // 512)
        shift = (n * 97, n * 131)
        image = np.roll(np.tile(base, (1, reps, reps))[:, :size, :size], shift, axis=(1, 2))
        labels = np.roll(np.tile(label, (reps, reps))[:size, :size], shift, axis=(0, 1))
        noise = np.random.default_rng(n).integers(-6, 7, image.shape, dtype=np.int16)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        group = zarr.open_group(str(path), mode="w")
        group.create_array("image", data=image, chunks=(3, chunk, chunk))
        group.create_array("label", data=labels, chunks=(chunk, chunk))
        group.attrs["complete"] = settings
    return locations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    shards: list[Any], args: argparse.Namespace, batch_size: int, in_memory: bool,
    device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones."""
    from tilewise import models
    from tilewise.pipeline.job import Normalizer
    from tilewise.spec import NormalizeSpec
    from tilewise.training.augment import Augment, AugmentConfig
    from tilewise.training.loader import PatchLoader
    from tilewise.training.sampling import UniformSampler

    torch.manual_seed(0)
    model = models.create(
        "unet_same", in_channels=3, num_classes=3, depth=args.depth, base_width=args.base_width
    ).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    normalizer = Normalizer(NormalizeSpec(mean=[0.7, 0.6, 0.7], std=[0.2]), np.dtype(np.uint8), 3)
    loader = PatchLoader(
        UniformSampler(shards, args.patch, seed=0),
        batch_size=batch_size,
        augment=Augment(AugmentConfig(flip=True, rotate90=True, elastic_p=args.elastic)),
        normalize=normalizer,
        seed=0,
        workers=args.workers,
        prefetch=args.prefetch,
        in_memory=in_memory,  # the shards are read into RAM here, before the clock starts
        pin_memory=device.type == "cuda",
    )
    autocast: Any = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    waited = 0.0
    t0 = time.perf_counter()
    with loader:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:  # allocations, kernel selection, the loader's first reads
                _sync(device)
                t0, waited = time.perf_counter(), 0.0
            t_wait = time.perf_counter()
            x, y, _ = loader.next_batch()
            waited += time.perf_counter() - t_wait
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                scores = model(x)
            loss = torch.nn.functional.cross_entropy(scores.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            float(loss.detach())  # the loop logs the loss every step: a sync on a GPU
        _sync(device)
        seconds = time.perf_counter() - t0
        stats = loader.stats()
    return {
        "samples_per_s": args.steps * batch_size / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "wait_share": waited / seconds,
        "loader_capacity_patches_per_s": stats["capacity_patches_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tw-train-throughput"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--patch", type=int, default=128, help="patch side (multiple of 2**depth)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--depth", type=int, default=3, help="unet_same depth")
    parser.add_argument("--base-width", type=int, default=8, help="unet_same base width")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--pairs", type=int, default=4,
                        help="back-to-back zarr/memory run pairs per batch size")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1,
                        help="loader threads (the training loop uses 1)")  # fmt: skip
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--elastic", type=float, default=0.0,
                        help="probability of U-Net's elastic deformation per patch")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch has)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--cache-mb", type=int, default=256, help="decoded chunks kept (data.cache_mb); 0 = none"
    )
    args = parser.parse_args()

    from tilewise.training.shards import CHUNK_CACHE, open_shards

    CHUNK_CACHE.reset(args.cache_mb * 2**20)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    locations = make_shards(args.workdir, args.shards, args.size, args.chunk)
    shards = open_shards(locations, num_classes=3, patch_size=args.patch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores")  # fmt: skip
    print(
        f"{args.shards} shards of 3x{args.size}^2 uint8 (IHC, chunks {args.chunk}, zstd); "
        f"unet_same depth {args.depth} width {args.base_width}, patch {args.patch}, Adam; "
        f"{args.workers} loader thread(s), prefetch {args.prefetch}, chunk cache "
        f"{args.cache_mb} MB (the shards hold {args.shards * 3 * args.size**2 / 2**20:.0f} MB); "
        f"{name}"
    )
    print(
        f"{args.pairs} pairs of runs per batch size, zarr and memory back to back (alternating "
        f"which first), {args.steps} timed steps each after {args.warmup}; samples/s = training "
        f"patches per second, median of the runs; ratio = median of the pairs' zarr/memory "
        f"[lowest-highest pair]"
    )
    print(
        f"{'batch':>5} {'zarr samples/s':>14} {'memory samples/s':>16} {'ratio':>6} "
        f"{'pairs':>11} {'step ms (mem)':>13} {'wait zarr':>9} {'zarr loader p/s':>15}"
    )
    rows = []
    for batch_size in args.batch_sizes:
        # Other work on the machine changes speed from one run to the next; a pair's two runs
        # see about the same load, so the ratio within pairs is steadier than either alone.
        pairs = []
        for k in range(args.pairs):
            pair = {}
            for in_memory in (k % 2 == 1, k % 2 == 0):
                pair["memory" if in_memory else "zarr"] = train_run(
                    shards, args, batch_size, in_memory, device
                )
            pairs.append(pair)
        ratios = [p["zarr"]["samples_per_s"] / p["memory"]["samples_per_s"] for p in pairs]

        def median(way: str, key: str, pairs: list[dict[str, Any]] = pairs) -> float:
            return float(np.median([p[way][key] for p in pairs]))

        row = {
            "batch_size": batch_size,
            "zarr_samples_per_s": median("zarr", "samples_per_s"),
            "memory_samples_per_s": median("memory", "samples_per_s"),
            "ratio": float(np.median(ratios)),
            "pair_ratios": ratios,
            "memory_step_ms": median("memory", "step_ms"),
            "zarr_wait_share": median("zarr", "wait_share"),
            "zarr_loader_capacity": median("zarr", "loader_capacity_patches_per_s"),
            "pairs": pairs,
        }
        rows.append(row)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(
            f"{batch_size:>5} {row['zarr_samples_per_s']:>14.1f} "
            f"{row['memory_samples_per_s']:>16.1f} {row['ratio']:>6.2f} {spread:>11} "
            f"{row['memory_step_ms']:>13.0f} {row['zarr_wait_share']:>9.2f} "
            f"{row['zarr_loader_capacity']:>15.0f}",
            flush=True,
        )
    worst = min(rows, key=lambda row: row["ratio"])
    if worst["ratio"] >= 0.9:
        print(f"the loader keeps up: zarr/memory >= 0.9 at every batch size "
              f"(lowest {worst['ratio']:.2f})")  # fmt: skip
    else:
        slow = [row["batch_size"] for row in rows if row["ratio"] < 0.9]
        print(f"the loader does NOT keep up at batch size(s) {slow}: lowest ratio "
              f"{worst['ratio']:.2f} (target 0.9)")  # fmt: skip
    (args.workdir / "result.json").write_text(json.dumps({
        "args": vars(args) | {"workdir": str(args.workdir)}, "device": name,
        "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
