"""Run a predict job on a multi-node local Ray cluster and kill a node or an actor mid-run.

Used by ``tests/test_fault_tolerance.py`` as a subprocess (the pytest process may already hold
an embedded Ray, and one process can join only one cluster)::

    python tests/multinode_run.py --scenario node|actor --job job.json --result result.json

The cluster is a ``ray.cluster_utils.Cluster``: a head with no CPUs (so no actor can land on
it: the driver's node cannot be removed) and ``--nodes`` worker nodes with one CPU each, all in a
private temp dir with ports picked by the OS. ``run_job(job, workers=--workers)`` runs in a
thread; once the output holds ``--after`` done markers and a Predictor process has finished a
unit itself (a worker setup hook logs each process's units), the script either removes the
worker node of such a process and adds a fresh one (``node``; ``--no-replace`` adds none), or
SIGKILLs that process (``actor``). It then waits for the job and writes what happened (markers
at the kill, the victim, the actors' restarts and nodes, the units each process ran, the report
or the error) to ``--result``. Exit status 0 when the job completed, 1 otherwise (the cluster's
logs are kept and their folder is printed).

Experiment (a single actor whose node goes, nothing to restart it on; the run stalls)::

    python tests/multinode_run.py --scenario node --nodes 1 --workers 1 --no-replace \
        --timeout 40 --job job.json --result result.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

# Must be set before Ray starts any process of the cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A Ray call after the cluster is gone (a hung job's thread) must fail, not join another cluster.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

PREDICTOR = "ray::Predictor"
MODULE = "tests.multinode_run"  # this file's import name in Ray's workers (PYTHONPATH = repo)
UNIT_LOG = "TILEWISE_TEST_UNIT_LOG"


def record_units() -> None:
    """Ray worker setup hook: log each unit a process finishes to ``$TILEWISE_TEST_UNIT_LOG/<pid>``.

    The only way to know which actor (process, node) computed which unit without changing the
    driver: the victim must be a process that has really run units.
    """
    from tilewise.workers import predictor

    original = predictor.Predictor.run_unit
    if getattr(original, "recorded", False):
        return

    def run_unit(self: Any, image: int, index: int, background: bool = False) -> Any:
        result = original(self, image, index, background)
        with open(os.path.join(os.environ[UNIT_LOG], str(os.getpid())), "a") as f:
            f.write(f"{image}:{index}\n")
        return result

    run_unit.recorded = True  # type: ignore[attr-defined]
    predictor.Predictor.run_unit = run_unit  # type: ignore[method-assign]


def _units_by_pid(unit_log: Path) -> dict[int, list[str]]:
    return {int(f.name): f.read_text().split() for f in unit_log.iterdir()}


def _markers(out: Path) -> int:
    done = out / ".tilewise" / "done"
    return len(os.listdir(done)) if done.is_dir() else 0


def _raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    return int(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)


def _predictor_processes(node: Any) -> list[psutil.Process]:
    """The Predictor actor processes the node's raylet started (this cluster's only)."""
    found = []
    try:
        children = psutil.Process(_raylet_pid(node)).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for proc in children:
        try:
            if PREDICTOR in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _predictor_actors() -> list[dict[str, Any]]:
    """Predictor entries of the GCS actor table (no dashboard needed)."""
    import ray

    table = ray._private.state.actors()
    return [
        {
            "actor_id": a["ActorID"],
            "state": a["State"],
            "node_id": a["Address"]["NodeID"],
            "pid": a["Pid"],
            "restarts": a["NumRestarts"],
        }
        for a in table.values()
        if a["ActorClassName"] == "Predictor"
    ]


def main(argv: list[str] | None = None) -> int:
    """Run one scenario; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["node", "actor"], required=True)
    parser.add_argument("--job", type=Path, required=True, help="job as JSON (parse_job input)")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--after", type=int, default=2, help="done markers before the kill")
    parser.add_argument("--nodes", type=int, default=3, help="worker nodes of one CPU each")
    parser.add_argument(
        "--no-replace",
        action="store_true",
        help="node scenario: do not add a fresh node after the removal (capacity shrinks)",
    )
    parser.add_argument("--workers", type=int, default=2, help="predictor actors")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds for the job")
    args = parser.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from tilewise.pipeline.driver import run_job
    from tilewise.spec import parse_job

    job = parse_job(json.loads(args.job.read_text()))
    out = Path(job.output.path)
    # A short private root: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="twft-", dir="/tmp")
    result: dict[str, Any] = {"scenario": args.scenario, "temp_dir": temp_dir}
    t0 = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir},
    )
    ok = False
    try:
        for _ in range(max(1, args.nodes)):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        unit_log = Path(temp_dir) / "units"
        unit_log.mkdir()
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={
                "worker_process_setup_hook": f"{MODULE}.record_units",
                "env_vars": {UNIT_LOG: str(unit_log)},
            },
        )
        result["cluster_start_s"] = round(time.perf_counter() - t0, 2)

        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["report"] = run_job(job, workers=args.workers, progress=False).to_dict()
            except BaseException as exc:  # reported to the parent, not swallowed
                outcome["error"] = "".join(traceback.format_exception(exc))

        thread = threading.Thread(target=work, daemon=True)
        t_job = time.perf_counter()
        thread.start()
        deadline = time.monotonic() + args.timeout
        # Kill once enough units are done and some Predictor process has finished one itself.
        while thread.is_alive() and time.monotonic() < deadline:
            if _markers(out) >= args.after and _units_by_pid(unit_log):
                break
            time.sleep(0.01)

        victim: dict[str, Any] = {}
        if thread.is_alive():
            result["kill_at_s"] = round(time.perf_counter() - t_job, 2)
            victim = _kill(args.scenario, cluster, out, unit_log, replace=not args.no_replace)
        result["victim"] = victim
        result["markers_at_kill"] = victim.get("markers_at_kill")

        seen: dict[str, dict[str, Any]] = {}
        while thread.is_alive() and time.monotonic() < deadline:
            for a in _predictor_actors():  # the actors' lives, for the report
                seen.setdefault(a["actor_id"], {"nodes": [], "pids": []})
                entry = seen[a["actor_id"]]
                entry["restarts"] = a["restarts"]
                if a["state"] == "ALIVE" and a["pid"] not in entry["pids"]:
                    entry["nodes"].append(a["node_id"])
                    entry["pids"].append(a["pid"])
            thread.join(0.1)
        for a in _predictor_actors():  # the last incarnation, also when the job ended it
            entry = seen.setdefault(a["actor_id"], {"nodes": [], "pids": []})
            entry.update(restarts=a["restarts"], final=a)
        result["actors"] = seen
        result["job_s"] = round(time.perf_counter() - t_job, 2)
        result["markers_at_end"] = _markers(out)
        result["units_by_pid"] = _units_by_pid(unit_log)
        if thread.is_alive():
            result["error"] = f"the job did not finish within {args.timeout} s (hung)"
        else:
            result.update(outcome)
        ok = "report" in result
    except BaseException as exc:
        result["error"] = "".join(traceback.format_exception(exc))
    finally:
        args.result.write_text(json.dumps(result, indent=1, default=str))
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
        if ok:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"job failed; Ray logs kept in {temp_dir}/session_latest/logs", file=sys.stderr)
    return 0 if ok else 1


def _kill(
    scenario: str, cluster: Any, out: Path, unit_log: Path, *, replace: bool
) -> dict[str, Any]:
    """Kill what the scenario says; return what was killed and the markers just before."""
    actors = _predictor_actors()
    ran = _units_by_pid(unit_log)
    hosting = [
        (node, proc)
        for node in list(cluster.worker_nodes)
        for proc in _predictor_processes(node)
        # The GCS and the process tree agree that this pid is a Predictor actor of this job on
        # this node, and it has finished units itself.
        if any(a["pid"] == proc.pid and a["node_id"] == node.node_id for a in actors)
        and ran.get(proc.pid)
    ]
    if not hosting:
        raise RuntimeError(f"no Predictor process that ran units found; actors: {actors}")
    node, proc = hosting[0]
    victim: dict[str, Any] = {
        "node_id": node.node_id,
        "pid": proc.pid,
        "cmdline": " ".join(proc.cmdline()).strip(),
        "actor_id": next(a["actor_id"] for a in actors if a["pid"] == proc.pid),
        "actors_before": actors,
        "units_before": ran[proc.pid],
        "markers_at_kill": _markers(out),
    }
    if scenario == "actor":
        os.kill(proc.pid, signal.SIGKILL)
    else:
        cluster.remove_node(node)
        victim["removed_node_alive_processes"] = node.any_processes_alive()
        if replace:
            cluster.add_node(num_cpus=1)  # capacity stays: two actors need two free CPUs
    return victim


if __name__ == "__main__":
    sys.exit(main())
