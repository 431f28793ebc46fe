"""The predictor's steady state: its units against its own forward passes, side by side.

    python bench/steady_state.py --size 8192 --workdir /tmp/tw-steady
    python bench/steady_state.py --size 8192 --workdir /tmp/tw-steady --where ray --rounds 8
    python bench/steady_state.py --size 8192 --workdir /tmp/tw-steady --labels-only
    python bench/steady_state.py --size 8192 --workdir /tmp/tw-steady --order rows

``bench/compare.py`` measures a whole run, whose first seconds go to starting Ray and the actor.
This measures what a unit costs once everything runs: one ``Predictor`` (the actor's class) with
``prefetch + 1`` calls in flight from as many threads (as Ray's threaded actor runs them), over
the units of a mosaic, against the same forward passes alone. The two alternate in rounds (``--per``
units pipelined, then the same number of forwards on the predictor's device thread, on random
windows of the same size), so that the drift of shared cores falls on both alike. Units go in
the driver's order (bands of 2 unit rows, column by column) or, with ``--order rows``, row-major;
the input chunks decoded per unit are printed with the times.

``--where local`` (the default) runs the predictor in this process; ``--where ray`` in a Ray actor
of an embedded cluster (Ray's own processes then share the cores, as in a real run).

The job is bench/compare.py's with ``--model-args depth=3,base_width=8``: ``unet_same``
(seeded), tile 512, batch 4, 1024 px units, uint8 labels and float16 probabilities with the
default pyramid, or labels only at level 0 with ``--labels-only``. The mosaic is
bench/large_mosaic.py's (made once, reused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from large_mosaic import build_mosaic
from tilewise.pipeline.driver import ALLOCATOR_ENV

JOB = """\
kind: predict
name: steady-{size}
input:
  path: {mosaic}
model:
  arch: unet_same
  num_classes: 2
  seed: 0
  args: {{depth: 3, base_width: 8}}
tiling:
  tile: 512
  stitch: crop
  batch_size: 4
output:
  path: {output}
  labels: uint8
{probabilities}  chunk: 1024
{levels}compute:
  cpus_per_worker: {threads}
  prefetch: {prefetch}
"""


class Harness:
    """A predictor plus the forward passes of its own engine on its own device thread."""

    def __init__(self, jobs: list[dict[str, Any]], threads: int) -> None:
        from tilewise.workers.predictor import Predictor

        self.predictor = Predictor(jobs, threads=threads, device="cpu")

    def run_unit(self, image: int, index: int) -> None:
        self.predictor.run_unit(image, index)

    def decodes(self) -> int:
        """Input chunks decoded so far (the block cache's misses)."""
        return int(self.predictor._images[0].prepared.image._blocks.misses)

    def forwards(self, n: int) -> float:
        """Seconds of ``n`` forward passes of one full batch of windows on random data."""
        import torch

        p = self.predictor
        engine = p._images[0].engine  # opened by the first unit
        window = engine.plan.y.window
        x = torch.rand(engine.batch_size, 3, window, window)

        def go() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                engine.forward(x)
            return time.perf_counter() - t0

        return p._device.submit(go).result()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192, help="mosaic side in px")
    p.add_argument("--workdir", default="/tmp/tw-steady")
    p.add_argument("--where", choices=["local", "ray"], default="local")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per", type=int, default=8, help="units (and forwards) per round")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--labels-only", action="store_true", help="no probabilities, one level")
    p.add_argument(
        "--order",
        choices=["bands", "rows"],
        default="bands",
        help="units in the driver's order (bands of 2 rows, column by column) or row-major",
    )
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    mosaic = work / f"mosaic-{args.size}.zarr"
    build_mosaic(mosaic, args.size, "zstd")
    units = (args.size // 1024) ** 2
    needed = 1 + args.rounds * args.per
    if needed > units:
        p.error(f"{args.rounds} rounds of {args.per} need {needed} units; the mosaic has {units}")

    import yaml

    from tilewise.pipeline.job import prepare
    from tilewise.pipeline.output import OutputStore
    from tilewise.spec import parse_job

    text = JOB.format(
        size=args.size,
        mosaic=mosaic,
        output=work / "out.zarr",
        probabilities="" if args.labels_only else "  probabilities: float16\n",
        levels="  levels: 1\n" if args.labels_only else "",
        threads=args.threads,
        prefetch=args.prefetch,
    )
    job = parse_job(yaml.safe_load(text))
    prepared = prepare(job)
    OutputStore(job.output.path).prepare(
        prepared.layout,
        fingerprint=prepared.fingerprint,
        job=job.model_dump(mode="json"),
        carried=prepared.image.carried_attributes(),
        overwrite=True,
    )
    jobs = [job.model_dump(mode="json")]
    inflight = args.prefetch + 1
    if args.where == "ray":
        import ray

        from tilewise.pipeline.driver import _connect

        _connect(None)
        actor = (
            ray.remote(Harness)
            .options(num_cpus=args.threads, max_concurrency=inflight)
            .remote(jobs, args.threads)
        )

        def start(k: int) -> Any:
            return actor.run_unit.remote(0, k)

        def finish(pending: list[Any]) -> list[Any]:
            done, rest = ray.wait(pending, num_returns=1)
            ray.get(done)
            return rest

        def forwards(n: int) -> float:
            return float(ray.get(actor.forwards.remote(n)))

        def decodes() -> int:
            return int(ray.get(actor.decodes.remote()))
    else:
        harness = Harness(jobs, args.threads)
        pool = ThreadPoolExecutor(inflight)

        def start(k: int) -> Any:
            return pool.submit(harness.run_unit, 0, k)

        def finish(pending: list[Any]) -> list[Any]:
            done, rest = wait(pending, return_when=FIRST_COMPLETED)
            for d in done:
                d.result()
            return list(rest)

        def forwards(n: int) -> float:
            return harness.forwards(n)

        def decodes() -> int:
            return harness.decodes()

    order = prepared.grid.band_order() if args.order == "bands" else list(range(units))
    # Warm-up: the first unit (opening the stores, the first forward's allocations).
    finish([start(order[0])])
    forwards(1)
    decoded = decodes()
    pipelined = alone = 0.0
    rows = []
    k = 1
    for r in range(args.rounds):
        t0 = time.perf_counter()
        pending: list[Any] = []
        last = k + args.per
        while k < last or pending:
            while len(pending) < inflight and k < last:
                pending.append(start(order[k]))
                k += 1
            pending = finish(pending)
        tp = time.perf_counter() - t0
        tm = forwards(args.per)
        pipelined, alone = pipelined + tp, alone + tm
        rows.append((r + 1, tp / args.per * 1e3, tm / args.per * 1e3, tm / tp))
    what = "labels only" if args.labels_only else "labels + float16 probabilities + pyramid"
    where = "in a Ray actor" if args.where == "ray" else "in this process"
    print(
        f"{args.size}² mosaic, 1024 px units, {what}, {args.threads} torch threads, "
        f"{inflight} calls in flight, predictor {where}"
    )
    print("round  ms/unit pipelined  ms/forward alone  efficiency")
    for r, a, b, e in rows:
        print(f"{r:5d}  {a:17.0f}  {b:16.0f}  {e:10.3f}")
    n = args.rounds * args.per
    eff = alone / pipelined
    per_unit = (decodes() - decoded) / n
    print(
        f"total  {pipelined / n * 1e3:17.0f}  {alone / n * 1e3:16.0f}  {eff:10.3f}"
        "   (efficiency = forwards alone / the same units pipelined)"
    )
    print(f"input chunks decoded per unit: {per_unit:.2f} (units in {args.order} order)")
    (work / "steady_state.json").write_text(
        json.dumps(
            {
                "size": args.size,
                "where": args.where,
                "labels_only": args.labels_only,
                "rounds": rows,
                "ms_per_unit": pipelined / n * 1e3,
                "ms_per_forward": alone / n * 1e3,
                "efficiency": eff,
                "order": args.order,
                "decodes_per_unit": per_unit,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    for key, value in ALLOCATOR_ENV.items():
        if os.environ.get(key) != value:
            # glibc reads these at start: run again with them, as tilewise's actors get them.
            os.environ.update(ALLOCATOR_ENV)
            os.execv(sys.executable, [sys.executable, *sys.argv])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
