"""A real `tilewise run` killed mid-way, then run again (DESIGN.md rule 6), and one stopped by a
damaged input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_input
from tests.pipeline.test_driver import _digest

JOB = """
kind: predict
input: {path: in.zarr}
model: {arch: unet_same, num_classes: 2, seed: 1, args: {depth: 2, base_width: 8}}
tiling: {tile: 32, batch_size: 2}
output: {path: %s, chunk: 64}
compute: {workers: 1}
"""


def _tilewise(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "tilewise.cli", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.mark.slow
def test_killed_run_resumes_with_only_the_remaining_units_and_identical_bytes(
    tmp_path: Path,
) -> None:
    write_input(tmp_path / "in.zarr", shape=(3, 640, 640), seed=9)
    (tmp_path / "killed.yaml").write_text(JOB % "killed.zarr")
    (tmp_path / "clean.yaml").write_text(JOB % "clean.zarr")
    total = 10 * 10

    run = _tilewise("run", "killed.yaml", "--no-progress", cwd=tmp_path)
    done_dir = tmp_path / "killed.zarr/.tilewise/done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if done_dir.exists() and len(list(done_dir.iterdir())) >= 5:
            break
        time.sleep(0.02)
    assert run.poll() is None, f"the run ended before it could be killed: {run.communicate()}"
    os.killpg(run.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    run.wait()
    done_at_kill = len(list(done_dir.iterdir()))
    assert 5 <= done_at_kill < total

    again = _tilewise("run", "killed.yaml", "--no-progress", "--json", cwd=tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["units_skipped"] >= done_at_kill
    assert report["units_computed"] == total - report["units_skipped"] > 0

    clean = _tilewise("run", "clean.yaml", "--no-progress", "--json", cwd=tmp_path)
    out, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["units_computed"] == total
    assert _digest(tmp_path / "killed.zarr") == _digest(tmp_path / "clean.zarr")


def test_a_damaged_input_stops_the_run_with_one_error_line_and_nothing_else(
    tmp_path: Path,
) -> None:
    (tmp_path / "in").mkdir()
    # b's one unit goes out after a's 4 and before c's: the other actor is computing when the
    # first actor's error ends the run (units of 256 px).
    for name, size in (("a", 512), ("b", 64), ("c", 512)):
        write_input(tmp_path / "in" / f"{name}.zarr", shape=(3, size, size), seed=size)
    (tmp_path / "in/b.zarr/c/0/0/0").write_bytes(bytes(range(256)) * 20)
    job = (
        (JOB % '"out/{stem}.zarr"')
        .replace("in.zarr", "in/*.zarr")
        .replace("workers: 1", "workers: 2")
        .replace("chunk: 64", "chunk: 256")
    )
    (tmp_path / "job.yaml").write_text(job)
    run = _tilewise("run", "job.yaml", "--no-progress", cwd=tmp_path)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 2, err
    # One line: no traceback, and nothing on stdout (Ray printed "... will be retried" there for
    # each of the other actor's calls in flight when the actors were stopped).
    assert out == "", out
    assert err.splitlines() == [err.strip()] and err.startswith("error: input '"), err
    assert "b.zarr" in err and "damaged" in err and "running the job again resumes" in err
