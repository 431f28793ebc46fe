"""Ray Core (tilewise's driver) vs Ray Data for the same predict job: what each costs.

    python bench/ray_data_vs_core.py --workdir /tmp/tw-rdvc                 # 2048 px, ~5 min
    python bench/ray_data_vs_core.py --size 4096 --repeat 1 --workdir /tmp/tw-rdvc-4k

For each output chunk (512, 1024) and actor layout (1 actor x 2 torch threads, 2 actors x 1
thread) the same job (a (3, SIZE, SIZE) uint8 Zarr input, ``unet_same`` depth 2 width 4, seeded,
tile 512, labels uint8) runs three ways on one embedded Ray:

* **core**: ``tilewise.pipeline.driver.run_job`` (threaded ``Predictor`` actors, dynamic hand-out
  of unit indices with ``prefetch + 1`` calls in flight per actor, done markers).
* **data**: ``ray.data.range(n_units)`` (one unit id per block) ``-> map_batches(<callable class
  wrapping Predictor.run_unit>, batch_size=1, compute=ActorPoolStrategy(size=k,
  max_tasks_in_flight_per_actor=prefetch + 1)) -> materialize()``, into an output prepared like
  ``run_job`` prepares it. Each actor writes its units itself, as in core (coordinates only).
* **data-mt**: the same with ``max_concurrent_calls_per_actor=prefetch + 1,
  enable_true_multi_threading=True``, so each actor, like tilewise's, reads and writes some units
  while it computes another (Ray Data's default runs one UDF call at a time per actor).

The Ray cluster gets one logical CPU more than the actors reserve: Ray Data's ``ReadRange`` runs
as CPU tasks that are not fused into an actor-pool map, and with every CPU held by the pool the
dataset waits forever. Both outputs must be byte-identical (a digest of every chunk file). Each
way runs ``--repeat`` times (alternating which goes first) and the fastest counts. Per
configuration: seconds (Ray start excluded; actor start, planning and output creation included in
both), ms per unit and output Mpx/s. Then the frameworks alone, with a no-op unit: two 1-CPU
actors handed N unit ids each way, first cold (the session's first execution) at N = 1, then warm
at N = 1 (fixed start-up) and N = ``--noop-units`` (per-unit overhead = the slope). A table goes
to stdout, everything to ``WORKDIR/result.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

TILE = 512
BLOCK = 1024
PREFETCH = 2  # compute.prefetch's default: prefetch + 1 calls in flight per actor, both ways


def make_input(path: Path, size: int) -> None:
    """(3, size, size) uint8 noise, written block by block (reused when complete)."""
    import zarr

    if path.exists():
        try:
            a = zarr.open_array(path, mode="r")
            if a.shape == (3, size, size) and a.attrs.get("complete"):
                return
        except Exception:  # a half-written store: rebuild it
            pass
    a = zarr.create_array(
        path,
        shape=(3, size, size),
        chunks=(3, BLOCK, BLOCK),
        dtype="uint8",
        dimension_names=("c", "y", "x"),
        overwrite=True,
    )
    rng = np.random.default_rng(0)
    for y in range(0, size, BLOCK):
        for x in range(0, size, BLOCK):
            h, w = min(BLOCK, size - y), min(BLOCK, size - x)
            a[:, y : y + h, x : x + w] = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    a.attrs["complete"] = True


def job_data(workdir: Path, size: int, chunk: int, threads: int, out: str) -> dict[str, Any]:
    """The benchmark job, as ``parse_job`` input."""
    return {
        "kind": "predict",
        "name": "rdvc",
        "input": {"path": str(workdir / f"in-{size}.zarr")},
        "model": {
            "arch": "unet_same",
            "num_classes": 2,
            "seed": 0,
            "args": {"depth": 2, "base_width": 4},
        },
        "tiling": {"tile": TILE, "batch_size": 2},
        "output": {"path": str(workdir / out), "labels": "uint8", "chunk": chunk},
        "compute": {"cpus_per_worker": threads, "prefetch": PREFETCH},
    }


def digest(store: Path) -> str:
    """Checksum of every chunk/shard file of the output arrays (as tests/pipeline does)."""
    h = hashlib.sha256()
    for f in sorted(store.rglob("*")):
        if f.is_file() and "/c/" in f.as_posix():
            h.update(f.relative_to(store).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class UnitWriter:
    """Ray Data UDF: one Predictor per actor; each row is a unit id, computed and written here."""

    def __init__(self, jobs: list[dict[str, Any]], threads: int) -> None:
        from tilewise.workers.predictor import Predictor

        self.predictor = Predictor(jobs, threads=threads, device="cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds = [self.predictor.run_unit(0, int(k)).seconds for k in batch["id"]]
        return {"id": batch["id"], "seconds": np.asarray(seconds)}


class NoopUDF:
    """Ray Data UDF that does nothing with its unit id (framework overhead only)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"]}


class NoopActor:
    """Ray Core actor that does nothing with its unit id (framework overhead only)."""

    def run_unit(self, image: int, index: int) -> int:
        return index


def run_core(job: Any, actors: int) -> float:
    """tilewise's own driver; returns wall seconds."""
    from tilewise.pipeline.driver import run_job

    t = time.perf_counter()
    report = run_job(job, workers=actors, overwrite=True, progress=False)
    assert report.status == "complete" and report.units_computed == report.units_total
    return time.perf_counter() - t


def run_data(job: Any, actors: int, threads: int, *, threaded: bool = False) -> float:
    """The same units through Ray Data; returns wall seconds.

    ``threaded``: up to ``prefetch + 1`` UDF calls run at once in each actor, as tilewise's
    threaded actors do (Ray Data's default is one call at a time per actor).
    """
    import ray

    from tilewise.pipeline.job import prepare
    from tilewise.pipeline.output import OutputStore

    t = time.perf_counter()
    p = prepare(job)
    OutputStore(job.output.path).prepare(
        p.layout,
        fingerprint=p.fingerprint,
        job=job.model_dump(mode="json"),
        carried=p.image.carried_attributes(),
        overwrite=True,
    )
    n = len(p.grid)
    ds = ray.data.range(n, override_num_blocks=n).map_batches(
        UnitWriter,
        fn_constructor_kwargs={"jobs": [job.model_dump(mode="json")], "threads": threads},
        batch_size=1,
        batch_format="numpy",
        num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(
            size=actors,
            max_tasks_in_flight_per_actor=PREFETCH + 1,
            max_concurrent_calls_per_actor=PREFETCH + 1 if threaded else None,
            enable_true_multi_threading=threaded,
        ),
    )
    rows = ds.materialize().take_all()
    assert sorted(int(r["id"]) for r in rows) == list(range(n))
    return time.perf_counter() - t


def noop_core(n: int, actors: int = 2) -> float:
    """Ray Core hand-out as in driver._run_units, with a no-op unit; returns wall seconds."""
    import ray

    t = time.perf_counter()
    cls: Any = ray.remote(NoopActor)
    pool = [
        cls.options(
            num_cpus=1, max_concurrency=PREFETCH + 1, max_restarts=-1, max_task_retries=-1
        ).remote()
        for _ in range(actors)
    ]
    queue = list(range(n))
    pending: dict[Any, int] = {}
    for a in range(actors):
        for _ in range(PREFETCH + 1):
            if queue:
                pending[pool[a].run_unit.remote(0, queue.pop())] = a
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        a = pending.pop(ready[0])
        ray.get(ready[0])
        if queue:
            pending[pool[a].run_unit.remote(0, queue.pop())] = a
    for actor in pool:
        ray.kill(actor)
    return time.perf_counter() - t


def noop_data(n: int, actors: int = 2) -> float:
    """Ray Data with a no-op UDF, one unit id per block; returns wall seconds."""
    import ray

    t = time.perf_counter()
    ds = ray.data.range(n, override_num_blocks=n).map_batches(
        NoopUDF,
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=PREFETCH + 1),
    )
    assert ds.materialize().count() == n
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="input height = width (px)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tw-rdvc"))
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
    parser.add_argument(
        "--layouts", nargs="+", default=["1x2", "2x1"], help="ACTORSxTHREADS, e.g. 1x2 2x1"
    )
    parser.add_argument("--noop-units", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2, help="runs per way; the best counts")
    parser.add_argument(
        "--ways",
        nargs="+",
        default=["core", "data", "data-mt"],
        choices=["core", "data", "data-mt"],
        help="data-mt: Ray Data with prefetch + 1 concurrent UDF calls per actor (threads)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray.data import DataContext

    from tilewise.pipeline.driver import ALLOCATOR_ENV

    args.workdir.mkdir(parents=True, exist_ok=True)
    make_input(args.workdir / f"in-{args.size}.zarr", args.size)
    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts]
    # One logical CPU more than the actors take: Ray Data runs range()'s ReadRange as CPU tasks
    # (not fused into an actor-pool map) and, with every CPU held by the pool, waits forever
    # (measured here; tilewise's driver needs no such slack). Both ways get the same cluster.
    cpus = max(a * t for a, t in layouts) + 1

    t = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        runtime_env={"env_vars": dict(ALLOCATOR_ENV)},  # as the driver's embedded Ray has
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray_start = time.perf_counter() - t
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # N = 1 leaves a pool of 2 with one input: Ray Data warns about it; that is the point here.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")

    runs: list[dict[str, Any]] = []
    noop: dict[str, Any] = {}
    try:
        # Cold: the first execution of each way in this Ray session (Ray Data also starts its
        # own helper actors then), with a no-op unit.
        noop["cold_startup_s"] = {"core": round(noop_core(1), 3), "data": round(noop_data(1), 3)}
        for chunk in args.chunks:
            for actors, threads in layouts:
                runs.append(_compare(args, chunk, actors, threads))
                print(_line(runs[-1], args.ways), flush=True)
        for way, fn in (("core", noop_core), ("data", noop_data)):
            t1 = min(fn(1) for _ in range(2))
            tn = fn(args.noop_units)
            noop[way] = {
                "startup_s": round(t1, 3),
                "n": args.noop_units,
                "seconds_n": round(tn, 3),
                "ms_per_unit": round(1000 * (tn - t1) / (args.noop_units - 1), 2),
            }
    finally:
        ray.shutdown()

    result = {
        "size": args.size,
        "tile": TILE,
        "ways": args.ways,
        "repeat": args.repeat,
        "cpus": cpus,
        "ray_start_s": round(ray_start, 2),
        "runs": runs,
        "noop": noop,
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "ray": ray.__version__},
    }
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1))
    print(_table(result))
    print(f"\nwritten: {args.workdir / 'result.json'}")
    return 0 if all(r["identical"] for r in runs) else 1


def _compare(args: argparse.Namespace, chunk: int, actors: int, threads: int) -> dict[str, Any]:
    """One configuration, every way, ``--repeat`` times (rotating which goes first)."""
    from tilewise.spec import parse_job

    units = (-(-args.size // chunk)) ** 2
    row: dict[str, Any] = {"chunk": chunk, "actors": actors, "threads": threads, "units": units}
    ways: list[str] = args.ways
    times: dict[str, list[float]] = {w: [] for w in ways}
    digests: dict[str, str] = {}
    for r in range(args.repeat):
        for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
            out = f"out-{way}-{chunk}-{actors}x{threads}.zarr"
            job = parse_job(job_data(args.workdir, args.size, chunk, threads, out))
            if way == "core":
                times[way].append(run_core(job, actors))
            else:
                times[way].append(run_data(job, actors, threads, threaded=way == "data-mt"))
            digests[way] = digest(args.workdir / out)
    for way, ts in times.items():
        best = min(ts)  # the least disturbed run on a shared machine
        row[way] = {
            "seconds": round(best, 3),
            "all_seconds": [round(t, 3) for t in ts],
            "ms_per_unit": round(1000 * best / units, 1),
            "mpx_per_s": round(args.size**2 / 1e6 / best, 3),
        }
    row["identical"] = len(set(digests.values())) == 1
    return row


def _line(r: dict[str, Any], ways: list[str]) -> str:
    times = ", ".join(f"{w} {r[w]['seconds']:.2f} s" for w in ways)
    return (
        f"chunk {r['chunk']:>5} {r['actors']}x{r['threads']}: {times}, identical {r['identical']}"
    )


def _table(result: dict[str, Any]) -> str:
    ways: list[str] = result["ways"]
    head = " | ".join(f"{w} s | {w} ms/unit | {w} Mpx/s" for w in ways)
    lines = [
        "",
        f"input 3 x {result['size']} x {result['size']}, tile {result['tile']}, "
        f"{result['cpus']} logical CPUs; Ray start {result['ray_start_s']} s (not counted); "
        f"best of {result['repeat']}",
        "",
        f"| chunk | units | actors x threads | {head} | same bytes |",
        "|" + "---|" * (4 + 3 * len(ways)),
    ]
    for r in result["runs"]:
        cells = " | ".join(
            f"{r[w]['seconds']:.2f} | {r[w]['ms_per_unit']:.0f} | {r[w]['mpx_per_s']:.2f}"
            for w in ways
        )
        lines.append(
            f"| {r['chunk']} | {r['units']} | {r['actors']} x {r['threads']} | {cells} "
            f"| {'yes' if r['identical'] else 'NO'} |"
        )
    n = result["noop"]
    cold = n["cold_startup_s"]
    lines += [
        "",
        f"first execution in the Ray session (no-op unit, N = 1): core {cold['core']:.2f} s, "
        f"Ray Data {cold['data']:.2f} s",
        "",
        "| no-op units, 2 actors, warm | fixed start-up (N = 1) | per unit (slope to N = "
        f"{n['core']['n']}) |",
        "|---|---|---|",
        f"| core (driver's hand-out) | {n['core']['startup_s']:.2f} s | "
        f"{n['core']['ms_per_unit']:.2f} ms |",
        f"| Ray Data (range -> map_batches) | {n['data']['startup_s']:.2f} s | "
        f"{n['data']['ms_per_unit']:.2f} ms |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
