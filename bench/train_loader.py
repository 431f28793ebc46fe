"""The training loader from Zarr against the same loader from memory: the ratio of throughputs.

    python bench/train_loader.py --workdir /tmp/tw-loader                    # ~1 min
    python bench/train_loader.py --workdir /tmp/tw-loader --patch 572 --step-ms 200

Shards: ``--shards`` groups of (3, SIZE, SIZE) uint8 (tiled scikit-image ``astronaut`` with a
little noise, so that it compresses like a photograph, not like noise), Zarr v3 chunks of
``--chunk`` px with zarr's default zstd, labels uint8 (three classes by brightness), written
once into WORKDIR. For each batch size, the same seeded uniform sampler feeds a
:class:`tilewise.training.loader.PatchLoader` reading from Zarr and one with ``in_memory=True``
(every shard read into RAM first, not timed), with flips and rotations (cheap, so that reading
is what differs) and ``--workers`` threads. The consumer takes ``--batches`` batches, either at
once (``--step-ms 0``: what the loader can deliver) or after a simulated training step of
``--step-ms`` per batch (then what matters is how long the step waited). Each way runs
``--repeat`` times, alternating which goes first, and the best counts. The table gives
patches/s of both and their ratio (target >= 0.9), and the consumer's wait share.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_shards(workdir: Path, count: int, size: int, chunk: int) -> list[str]:
    """``count`` shard groups in ``workdir`` (reused when complete)."""
    import zarr
    from skimage import data

    base = data.astronaut().transpose(2, 0, 1)  # (3, 512, 512) uint8
    locations = []
    for n in range(count):
        path = workdir / f"shard{n}.zarr"
        locations.append(str(path))
        try:
            if zarr.open_group(str(path), mode="r").attrs.get("complete"):
                continue
        except Exception:  # absent or half-written: (re)write it
            pass
        rng = np.random.default_rng(n)
        reps = -(-size // 512)
        image = np.tile(base, (1, reps, reps))[:, :size, :size].astype(np.int16)
        image = np.roll(image, (n * 97, n * 131), axis=(1, 2))
        image += rng.integers(-6, 7, image.shape, dtype=np.int16)
        image = np.clip(image, 0, 255).astype(np.uint8)
        brightness = image.mean(axis=0)
        label = np.digitize(brightness, [80, 160]).astype(np.uint8)
        group = zarr.open_group(str(path), mode="w")
        group.create_array("image", data=image, chunks=(3, chunk, chunk))
        group.create_array("label", data=label, chunks=(chunk, chunk))
        group.attrs["complete"] = True
    return locations


def run_once(
    shards: list[Any],
    patch: int,
    batch_size: int,
    batches: int,
    workers: int,
    in_memory: bool,
    step_s: float,
) -> dict[str, float]:
    from tilewise.training.augment import Augment, AugmentConfig
    from tilewise.training.loader import PatchLoader
    from tilewise.training.sampling import UniformSampler

    sampler = UniformSampler(shards, patch, seed=0)
    loader = PatchLoader(
        sampler,
        batch_size=batch_size,
        augment=Augment(AugmentConfig(flip=True, rotate90=True)),
        normalize=lambda x: x.float().div_(255.0),
        workers=workers,
        prefetch=4,
        in_memory=in_memory,
    )
    with loader:
        loader.next_batch()  # start-up (threads, first reads) is not what we compare
        t0 = time.perf_counter()
        waited0 = loader.stats()["wait_s"]
        for _ in range(batches):
            loader.next_batch()
            if step_s:
                time.sleep(step_s)
        seconds = time.perf_counter() - t0
        stats = loader.stats()
    return {
        "patches_per_s": batches * batch_size / seconds,
        "wait_share": (stats["wait_s"] - waited0) / seconds,
        "mb_read_per_s": stats["mb_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tw-train-loader"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from tilewise.training.shards import open_shards

    args.workdir.mkdir(parents=True, exist_ok=True)
    locations = make_shards(args.workdir, args.shards, args.size, args.chunk)
    shards = open_shards(locations, num_classes=3, patch_size=args.patch)
    rows = []
    print(
        f"{args.shards} shards of 3x{args.size}^2 uint8 (chunks {args.chunk}, zstd), patch "
        f"{args.patch}, {args.workers} loader thread(s), step {args.step_ms:g} ms"
    )
    print(f"{'batch':>5} {'zarr p/s':>9} {'memory p/s':>10} {'ratio':>6} {'wait zarr':>9} "
          f"{'wait mem':>8}")  # fmt: skip
    for batch_size in args.batch_sizes:
        best: dict[bool, dict[str, float]] = {}
        for r in range(args.repeat):
            for in_memory in (r % 2 == 1, r % 2 == 0):
                result = run_once(
                    shards,
                    args.patch,
                    batch_size,
                    args.batches,
                    args.workers,
                    in_memory,
                    args.step_ms / 1000,
                )
                if (
                    in_memory not in best
                    or result["patches_per_s"] > best[in_memory]["patches_per_s"]
                ):
                    best[in_memory] = result
        zarr_r, mem_r = best[False], best[True]
        ratio = zarr_r["patches_per_s"] / mem_r["patches_per_s"]
        rows.append({"batch_size": batch_size, "zarr": zarr_r, "memory": mem_r, "ratio": ratio})
        print(
            f"{batch_size:>5} {zarr_r['patches_per_s']:>9.1f} {mem_r['patches_per_s']:>10.1f} "
            f"{ratio:>6.2f} {zarr_r['wait_share']:>9.2f} {mem_r['wait_share']:>8.2f}"
        )
    (args.workdir / "result.json").write_text(json.dumps({"args": vars(args) | {
        "workdir": str(args.workdir)}, "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
