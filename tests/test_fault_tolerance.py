"""A node or an actor lost mid-run on a multi-node Ray cluster: the job still completes, exactly.

Each scenario runs in a subprocess (``tests/multinode_run.py``): a ``ray.cluster_utils.Cluster``
with a CPU-less head and one-CPU worker nodes, ``run_job(workers=2)`` in a thread, and, after two
units are done, either a worker node hosting a ``Predictor`` is removed (and a fresh node added)
or one ``Predictor`` process is SIGKILLed. The output must then be complete and byte-identical
to the same job computed without Ray (``Predictor`` driven in-process over every unit), whose
labels and probabilities in turn match whole-image inference. A worker setup hook records which
process finished which unit, so the victim is known to have run units and its restarted
incarnation to have run the retried ones.

The third scenario removes a node and adds none: the victim actor cannot be placed again, and its
calls in flight are copied to the remaining actor once they have stalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import write_input
from tests.pipeline.test_driver import _digest
from tests.reference import whole_image
from tilewise import models
from tilewise.pipeline.job import prepare
from tilewise.pipeline.output import OutputStore
from tilewise.spec import parse_job
from tilewise.workers.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 384, 384)  # chunk 64 -> 36 units; batch 1 makes each unit ~50 ms on one thread
UNITS = 36
SEED = 2


def _job_data(root: Path, output: str) -> dict[str, Any]:
    return {
        "kind": "predict",
        "name": "fault",
        "input": {"path": str(root / "in.zarr")},
        "model": {
            "arch": "unet_same",
            "num_classes": 3,
            "seed": SEED,
            "args": {"depth": 2, "base_width": 4},
        },
        "tiling": {"tile": 32, "batch_size": 1},
        "output": {
            "path": str(root / output),
            "labels": "uint8",
            "probabilities": "float16",
            "chunk": 64,
        },
        # One CPU, so one torch thread per actor: bytes then do not depend on the thread count.
        "compute": {"cpus_per_worker": 1},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The input and the digest of the job computed in this process, without Ray."""
    root = tmp_path_factory.mktemp("fault")
    write_input(root / "in.zarr", shape=SHAPE, seed=11)
    job = parse_job(_job_data(root, "single.zarr"))
    p = prepare(job)
    assert len(p.grid) == UNITS
    out = OutputStore(job.output.path)
    out.prepare(
        p.layout,
        fingerprint=p.fingerprint,
        job=job.model_dump(mode="json"),
        carried=p.image.carried_attributes(),
        overwrite=False,
    )
    threads = torch.get_num_threads()
    try:
        predictor = Predictor([job.model_dump(mode="json")], threads=1, device="cpu")
        for k in range(UNITS):
            predictor.run_unit(0, k, False)
    finally:
        torch.set_num_threads(threads)
    out.finish({})  # as a run's end: the pyramid levels that units do not stream
    _check_against_whole_image(root / "single.zarr", root / "in.zarr")
    return root, _digest(root / "single.zarr")


def _check_against_whole_image(output: Path, image_path: Path) -> None:
    """Labels and probabilities equal one forward pass over the mirror-padded whole image."""
    image = zarr.open_array(image_path, mode="r")[:].astype(np.float32) / 255
    torch.manual_seed(SEED)
    model = models.create("unet_same", in_channels=3, num_classes=3, depth=2, base_width=4)
    expected = torch.softmax(torch.from_numpy(whole_image(model, image, model.tiling)), 0).numpy()
    out = zarr.open_group(output, mode="r")
    probs = out["probabilities/0"][:].astype(np.float32)
    assert np.abs(probs - expected).max() < 2e-3  # float16 storage
    top2 = np.sort(expected, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-4
    assert decided.mean() > 0.9  # the seeded net ties exactly on ~7% of this input
    assert np.array_equal(out["labels/0"][:][decided], expected.argmax(0)[decided])


def _run_scenario(
    root: Path, scenario: str, nodes: int, *options: str, name: str | None = None
) -> dict[str, Any]:
    name = name or scenario
    job_file = root / f"{name}.json"
    job_file.write_text(json.dumps(_job_data(root, f"{name}.zarr")))
    result_file = root / f"{name}-result.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # Unset so that the child's ray.init joins its own cluster, never one of the environment.
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "tests" / "multinode_run.py"), "--scenario", scenario]
    cmd += ["--job", str(job_file), "--result", str(result_file), "--nodes", str(nodes), *options]
    # Own session: on a timeout, the child and every Ray process of its cluster go together.
    proc = subprocess.Popen(
        cmd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{scenario} scenario hung past 300 s:\n{err[-4000:]}")
    result: dict[str, Any] = json.loads(result_file.read_text()) if result_file.exists() else {}
    assert proc.returncode == 0, f"{result.get('error')}\n{err[-4000:]}"
    return result


def _check_complete_and_identical(
    root: Path, name: str, result: dict[str, Any], digest: str
) -> None:
    report = result["report"]
    assert report["status"] == "complete"
    assert report["units_total"] == report["units_computed"] == UNITS
    # The kill landed mid-run: some units were done, not all.
    assert 2 <= result["markers_at_kill"] < UNITS
    output = root / f"{name}.zarr"
    done = {int(p.name) for p in (output / ".tilewise" / "done").iterdir()}
    assert done == set(range(UNITS))
    assert zarr.open_group(output, mode="r").attrs["tilewise"]["status"] == "complete"
    assert _digest(output) == digest
    # The victim was a Predictor actor of this job that had finished units itself (recorded
    # in its process by a worker setup hook), and Ray went on to restart it.
    victim = result["victim"]
    assert victim["cmdline"].startswith("ray::Predictor")
    assert victim["units_before"]
    assert result["actors"][victim["actor_id"]]["restarts"] >= 1
    # Every unit was computed by some Predictor process (some twice: retried calls).
    ran = {u for units in result["units_by_pid"].values() for u in units}
    assert ran == {f"0:{k}" for k in range(UNITS)}


def _restarted(result: dict[str, Any]) -> dict[str, Any]:
    """The victim actor's last incarnation, which must have computed units of its own."""
    final: dict[str, Any] = result["actors"][result["victim"]["actor_id"]]["final"]
    assert final["pid"] != result["victim"]["pid"]
    assert result["units_by_pid"].get(str(final["pid"]))
    return final


@pytest.mark.slow
def test_removing_a_node_that_hosts_an_actor_mid_run_still_completes_exactly(
    reference: tuple[Path, str],
) -> None:
    root, digest = reference
    result = _run_scenario(root, "node", nodes=3)
    _check_complete_and_identical(root, "node", result, digest)
    victim = result["victim"]
    # The removed node hosted a Predictor actor (GCS table and raylet's process tree agree) ...
    assert any(
        a["actor_id"] == victim["actor_id"] and a["node_id"] == victim["node_id"]
        for a in victim["actors_before"]
    )
    assert victim["removed_node_alive_processes"] is False
    # ... and the restarted actor computed units on another node.
    assert _restarted(result)["node_id"] != victim["node_id"]


@pytest.mark.slow
def test_sigkill_of_a_predictor_process_mid_run_still_completes_exactly(
    reference: tuple[Path, str],
) -> None:
    root, digest = reference
    result = _run_scenario(root, "actor", nodes=2)
    _check_complete_and_identical(root, "actor", result, digest)
    _restarted(result)  # a new process, which computed units


@pytest.mark.slow
def test_losing_a_node_without_replacement_completes_on_the_remaining_actor(
    reference: tuple[Path, str],
) -> None:
    root, digest = reference
    # Two one-CPU nodes, two actors; one node goes and none comes back: the victim actor
    # cannot be placed again, and its three calls in flight must be done by the other.
    result = _run_scenario(root, "node", 2, "--no-replace", "--timeout", "60", name="shrunk")
    _check_complete_and_identical(root, "shrunk", result, digest)
    # No new incarnation of the victim ran anything (there was no node for it): every unit
    # after the kill was done by the one surviving process.
    survivors = set(result["units_by_pid"]) - {str(result["victim"]["pid"])}
    assert len(survivors) == 1
