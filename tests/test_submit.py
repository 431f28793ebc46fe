"""``tilewise submit`` against a real Ray head with token authentication, started on loopback.

One head serves the module (each start costs 6-10 s). It runs with ``RAY_AUTH_MODE=token``, the
default of Ray 2.60 clusters, so every submission here authenticates as a user's would. The CLI
runs as a subprocess wherever it talks to the head: Ray reads ``RAY_AUTH_MODE`` once per process,
and this test process keeps ``disabled`` for the embedded clusters of the other tests (it talks
to the head through an explicit ``Authorization`` header instead).

Nothing here sets ``RAY_ADDRESS`` in this process's environment, and the head is torn down by
killing the processes of the session it was started in, never with ``ray stop``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import yaml
import zarr

from tests.conftest import write_input
from tests.reference import whole_image
from tests.training.test_run import _disks
from tilewise import models
from tilewise.cli import main
from tilewise.submit import _address_env_cleared, _is_this_machine

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
SHAPE = (3, 96, 96)
MODEL: dict[str, Any] = {
    "arch": "unet_same",
    "num_classes": 2,
    "seed": 1,
    "args": {"depth": 2, "base_width": 4},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _kill_session(leader: subprocess.Popen[bytes]) -> None:
    """Stop the head: its process group, then whatever else runs in its session (workers)."""
    with_session = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader.pid:
                with_session.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    # `ray start --block` takes its time over SIGTERM; what is left after a moment is killed.
    _, alive = psutil.wait_procs(with_session, timeout=1)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    leader.wait(timeout=5)


@dataclass
class Head:
    url: str
    gcs: str  # what `tilewise run --address` joins
    token: str
    env: dict[str, str]  # the environment of a user who may submit: token mode and the token

    def client(self) -> Any:
        """An SDK client that authenticates by header (this process keeps auth disabled)."""
        from ray.job_submission import JobSubmissionClient

        with _address_env_cleared():
            return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    temp = tmp_path_factory.mktemp("ray")
    token = secrets.token_hex(16)
    port, dash, agent, client_port = (_free_port() for _ in range(4))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    # The job's `python` must be this interpreter, where tilewise is installed.
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    cmd = [
        os.path.join(BIN, "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client_port),
        "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats",
        "--temp-dir", str(temp),
    ]  # fmt: skip
    log = open(temp / "head.log", "wb")  # noqa: SIM115 (closed at teardown)
    leader = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        request = urllib.request.Request(
            f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
        )
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if leader.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Ray head did not start:\n{(temp / 'head.log').read_text()}"
                )
            time.sleep(0.3)
        yield Head(url=url, gcs=f"127.0.0.1:{port}", token=token, env=env)
    finally:
        _kill_session(leader)
        log.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_input(folder / "in.zarr", shape=SHAPE, seed=11)
    return folder


def _write_job(folder: Path, **sections: Any) -> Path:
    job: dict[str, Any] = {
        "kind": "predict",
        "input": {"path": "in.zarr"},
        "model": dict(MODEL),
        "tiling": {"tile": 32},
        "output": {"path": "out.zarr", "chunk": 64},
        "compute": {"cpus_per_worker": 1},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _tilewise_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "tilewise.cli", *argv]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _sigint_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_once_submitted(
    cmd: list[str], *, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; press Ctrl-C (SIGINT) as soon as it prints that the job was submitted."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell's background job (a CI script run with `&`) passes SIGINT
        # on ignored, and Python then never turns it into KeyboardInterrupt.
        preexec_fn=_sigint_by_default,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("submitted job"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(seen) + out, err)


def _expected_labels(image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels of whole-image inference (one forward pass), and where they are decided."""
    image = zarr.open_array(image_path, mode="r")[:].astype(np.float32) / 255
    torch.manual_seed(MODEL["seed"])
    net = models.create("unet_same", in_channels=3, num_classes=2, **MODEL["args"])
    probs = torch.softmax(torch.from_numpy(whole_image(net, image, net.tiling)), 0).numpy()
    top = np.sort(probs, axis=0)
    return probs.argmax(0), top[-1] - top[-2] > 1e-4


def _ids(head: Head) -> set[str]:
    return {j.submission_id for j in head.client().list_jobs()}


@dataclass
class Run:
    """One command run against the head: what it was given and what it did."""

    sid: str
    folder: Path
    done: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def runs(head: Head, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The cluster-side scenarios, run side by side (each costs a CLI start and a Ray job)."""
    root = tmp_path_factory.mktemp("runs")
    plans: dict[str, tuple[str, Path, list[str], dict[str, str]]] = {}

    # `tilewise submit --follow` of a good job whose paths are relative to its file's folder,
    # started from another folder, with a runtime env of our own.
    ok = root / "ok"
    (ok / "spec").mkdir(parents=True)
    (ok / "spec" / "in.zarr").symlink_to(data / "in.zarr")
    _write_job(ok / "spec")
    (ok / "env.yaml").write_text("env_vars: {TILEWISE_TEST_MARK: seen}\n")
    sid = f"t-follow-{secrets.token_hex(3)}"
    argv = ["submit", "spec/job.yaml", "--address", head.url, "--submission-id", sid]
    plans["ok"] = (sid, ok, _tilewise_cmd(*argv, "--follow", "--runtime-env", "env.yaml"), {})

    # A job that is valid but fails on the cluster: weights of a 3-class net for 2 classes.
    bad = root / "bad"
    bad.mkdir()
    (bad / "in.zarr").symlink_to(data / "in.zarr")
    torch.manual_seed(0)
    other = models.create("unet_same", in_channels=3, num_classes=3, **MODEL["args"])
    torch.save(other.state_dict(), bad / "weights.pt")
    _write_job(bad, model={"weights": "weights.pt"})
    sid = f"t-fail-{secrets.token_hex(3)}"
    argv = ["submit", "job.yaml", "--address", head.url, "--submission-id", sid, "--follow"]
    plans["fails"] = (sid, bad, _tilewise_cmd(*argv), {})

    # The plain Ray CLI with tilewise as the entrypoint (absolute paths in the job).
    plain = root / "plain"
    (plain / "work").mkdir(parents=True)
    _write_job(
        plain / "work",
        input={"path": str(data / "in.zarr")},
        output={"path": str(plain / "out.zarr")},
    )
    sid = f"t-plain-{secrets.token_hex(3)}"
    cmd = f"job submit --address {head.url} --submission-id {sid} --working-dir work -- "
    cmd += "python -m tilewise.cli run job.yaml --no-progress"
    plans["plain"] = (sid, plain, [os.path.join(BIN, "ray"), *cmd.split()], {})

    # A wrong token: refused, nothing submitted.
    wrong = root / "wrong-token"
    wrong.mkdir()
    (wrong / "in.zarr").symlink_to(data / "in.zarr")
    _write_job(wrong)
    sid = f"t-auth-{secrets.token_hex(3)}"
    argv = ["submit", "job.yaml", "--address", head.url, "--submission-id", sid]
    plans["wrong_token"] = (sid, wrong, _tilewise_cmd(*argv), {"RAY_AUTH_TOKEN": "0" * 32})

    # `--follow` interrupted by Ctrl-C (SIGINT) once the job is submitted.
    stopped = root / "ctrl-c"
    stopped.mkdir()
    (stopped / "in.zarr").symlink_to(data / "in.zarr")
    _write_job(stopped)
    sid = f"t-ctrlc-{secrets.token_hex(3)}"
    argv = ["submit", "job.yaml", "--address", head.url, "--submission-id", sid, "--follow"]
    plans["ctrl_c"] = (sid, stopped, _tilewise_cmd(*argv), {})

    # A train job (in the job's driver process: scaling.workers 0) with relative shard paths.
    train = root / "train"
    (train / "spec").mkdir(parents=True)
    for i in range(3):
        _disks(train / "spec" / "shards" / f"s{i}.zarr", i, size=64)
    (train / "spec" / "train.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "name": "submitted",
                "data": {"shards": ["shards/s[01].zarr"], "val_shards": ["shards/s2.zarr"]},
                "model": {"arch": "unet_same", "num_classes": 2, "args": MODEL["args"]},
                "patch": {"size": 32},
                "steps": 6,
                "batch_size": 2,
                "scaling": {"workers": 0},
                "checkpoint": {"every": 3},
                "validation": {"every": 6},
                "storage": "runs",
            }
        )
    )
    sid = f"t-train-{secrets.token_hex(3)}"
    argv = ["submit", "spec/train.yaml", "--address", head.url, "--submission-id", sid]
    plans["train"] = (sid, train, _tilewise_cmd(*argv, "--follow"), {})

    with ThreadPoolExecutor(len(plans)) as pool:
        futures = {
            key: pool.submit(
                _interrupt_once_submitted if key == "ctrl_c" else _run,
                cmd,
                cwd=folder,
                env={**head.env, **env},
            )
            for key, (_, folder, cmd, env) in plans.items()
        }
        return {
            key: Run(sid=plans[key][0], folder=plans[key][1], done=f.result())
            for key, f in futures.items()
        }


def _output(done: subprocess.CompletedProcess[str]) -> str:
    return f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def test_submit_follow_runs_the_job_and_equals_whole_image_inference(
    head: Head, data: Path, runs: dict[str, Run]
) -> None:
    run = runs["ok"]
    done, sid = run.done, run.sid
    assert done.returncode == 0, _output(done)
    assert f"ray job stop {sid}" in done.stdout and f"ray job logs -f {sid}" in done.stdout
    assert "tilewise run 'job': complete" in done.stdout  # the driver's report, streamed
    assert "warning" not in done.stderr  # the head is this machine: local paths are fine

    info = head.client().get_job_info(sid)
    assert info.status.value == "SUCCEEDED"
    assert info.runtime_env["env_vars"]["TILEWISE_TEST_MARK"] == "seen"
    # The relative paths resolved against the job file's folder, not Ray's copy of it.
    out = zarr.open_group(run.folder / "spec" / "out.zarr", mode="r")
    assert out.attrs["tilewise"]["status"] == "complete"
    labels = out["labels/0"][:]
    expected, decided = _expected_labels(data / "in.zarr")
    assert labels.shape == SHAPE[1:]
    assert decided.mean() > 0.99
    assert np.array_equal(labels[decided], expected[decided])


def test_submit_runs_a_train_job_and_its_package_lands_where_the_job_says(
    head: Head, runs: dict[str, Run]
) -> None:
    run = runs["train"]
    done = run.done
    assert done.returncode == 0, _output(done)
    assert "tilewise train 'submitted': complete" in done.stdout
    assert head.client().get_job_info(run.sid).status.value == "SUCCEEDED"
    package = run.folder / "spec" / "runs" / "submitted" / "model"
    manifest = yaml.safe_load((package / "model.yaml").read_text())
    assert manifest["training"]["run"] == "submitted" and manifest["training"]["steps"] == 6
    assert (package / "weights.safetensors").stat().st_size > 0


def test_a_used_submission_id_is_refused(head: Head, runs: dict[str, Run]) -> None:
    run = runs["ok"]
    argv = ["submit", "spec/job.yaml", "--address", head.url, "--submission-id", run.sid]
    again = _run(_tilewise_cmd(*argv, "--no-wait"), cwd=run.folder, env=head.env)
    assert again.returncode == 2, _output(again)
    assert f"error: submission id '{run.sid}' is already used" in again.stderr
    assert "Traceback" not in again.stderr
    assert [j.submission_id for j in head.client().list_jobs()].count(run.sid) == 1


def test_a_job_that_fails_on_the_cluster_exits_with_the_drivers_status(
    head: Head, runs: dict[str, Run]
) -> None:
    run = runs["fails"]
    done = run.done
    info = head.client().get_job_info(run.sid)
    assert info.status.value == "FAILED"
    assert info.driver_exit_code == 2  # `tilewise run` exits 2 on a user mistake
    assert done.returncode == 2, _output(done)
    assert "do not fit" in done.stdout  # the driver's error line, streamed
    assert f"job {run.sid} failed" in done.stderr
    assert not (run.folder / "out.zarr").exists()


def test_plain_ray_job_submit_runs_tilewise(head: Head, data: Path, runs: dict[str, Run]) -> None:
    run = runs["plain"]
    assert run.done.returncode == 0, _output(run.done)
    assert head.client().get_job_status(run.sid).value == "SUCCEEDED"
    group = zarr.open_group(run.folder / "out.zarr", mode="r")
    assert group.attrs["tilewise"]["status"] == "complete"
    expected, decided = _expected_labels(data / "in.zarr")
    assert np.array_equal(group["labels/0"][:][decided], expected[decided])


def test_ctrl_c_stops_following_not_the_job(head: Head, runs: dict[str, Run]) -> None:
    run = runs["ctrl_c"]
    assert run.done.returncode == 130, _output(run.done)
    assert f"stopped following job {run.sid}; it keeps running" in run.done.stderr
    assert f"ray job stop {run.sid} --address {head.url}" in run.done.stderr
    assert "Traceback" not in run.done.stderr
    client = head.client()
    deadline = time.monotonic() + 180
    while (status := client.get_job_status(run.sid).value) not in {
        "SUCCEEDED",
        "FAILED",
        "STOPPED",
    }:
        assert time.monotonic() < deadline, f"job {run.sid} still {status}"
        time.sleep(0.5)
    assert status == "SUCCEEDED"  # the job ran on to the end
    out = zarr.open_group(run.folder / "out.zarr", mode="r")
    assert out.attrs["tilewise"]["status"] == "complete"


def _auth_error(stderr: str, says: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], stderr
    assert "token authentication" in errors[0] and "ray get-auth-token" in errors[0]


def test_a_wrong_token_is_one_clear_error(head: Head, runs: dict[str, Run]) -> None:
    run = runs["wrong_token"]
    assert run.done.returncode == 2, _output(run.done)
    _auth_error(run.done.stderr, "is not the cluster's token")
    assert run.sid not in _ids(head)


@pytest.mark.skipif(
    os.environ.get("RAY_AUTH_MODE") != "disabled", reason="needs this process in auth mode off"
)
def test_submitting_without_token_mode_is_one_clear_error(
    head: Head, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: tests/conftest.py runs this process with RAY_AUTH_MODE=disabled, as a user
    # who never set it would be.
    (tmp_path / "in.zarr").symlink_to(data / "in.zarr")
    job = _write_job(tmp_path)
    sid = f"t-noauth-{secrets.token_hex(3)}"
    assert main(["submit", str(job), "--address", head.url, "--submission-id", sid]) == 2
    _auth_error(capsys.readouterr().err, "RAY_AUTH_MODE is 'disabled' here")
    assert sid not in _ids(head)


def test_run_joins_the_gcs_with_the_token_and_refuses_without_it_in_one_line(
    head: Head, data: Path, tmp_path: Path
) -> None:
    # `tilewise run --address HEAD:PORT` (the plan joins and reads the cluster, runs nothing).
    (tmp_path / "in.zarr").symlink_to(data / "in.zarr")
    _write_job(tmp_path)
    argv = _tilewise_cmd("run", "--plan", "job.yaml", "--address", head.gcs)
    joined = _run(argv, cwd=tmp_path, env=head.env)
    assert joined.returncode == 0, _output(joined)
    assert f"cluster  {head.gcs}: 2 CPUs" in joined.stdout
    # Without token mode, ray.init would retry 20 times (a C++ warning a second) and end in a
    # traceback; the handshake before it refuses at once.
    off = {**head.env, "RAY_AUTH_MODE": "disabled"}
    refused = _run(argv, cwd=tmp_path, env=off)
    assert refused.returncode == 2, _output(refused)
    assert refused.stderr.splitlines() == [refused.stderr.strip()], refused.stderr
    _auth_error(refused.stderr, "RAY_AUTH_MODE is 'disabled' here")
    assert head.gcs in refused.stderr
    wrong = _run(argv, cwd=tmp_path, env={**head.env, "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode == 2, _output(wrong)
    _auth_error(wrong.stderr, "is not the cluster's token")


def test_bad_spec_is_rejected_before_submission(
    head: Head, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.zarr").symlink_to(data / "in.zarr")
    job = _write_job(tmp_path, tiling={"tilee": 1}, output={"labels": "int9"})
    before = _ids(head)
    code = main(["submit", str(job), "--address", head.url, "--submission-id", "t-bad-spec"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tiling.tilee: unknown key 'tilee'" in err and "output.labels" in err
    assert "Traceback" not in err
    assert _ids(head) == before


def test_runtime_env_with_working_dir_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.zarr").symlink_to(data / "in.zarr")
    job = _write_job(tmp_path)
    env_file = tmp_path / "env.yaml"
    env_file.write_text("working_dir: .\npip: [requests]\n")
    # No cluster at this port: the error must come first, from the runtime env.
    address = f"http://127.0.0.1:{_free_port()}"
    assert main(["submit", str(job), "--address", address, "--runtime-env", str(env_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --runtime-env:") and "working_dir" in err


def test_unreachable_cluster_and_missing_address_are_clear_errors(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in.zarr").symlink_to(data / "in.zarr")
    job = _write_job(tmp_path)
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    assert main(["submit", str(job), "--address", address]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot reach a Ray cluster at {address}" in err
    assert "ray start --head --dashboard-host 0.0.0.0" in err

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["submit", str(job)]) == 2
    err = capsys.readouterr().err
    assert "error: no Ray cluster address" in err and "--address http://HEAD:8265" in err

    # A head elsewhere: the local paths of the job are flagged before the connection fails.
    assert main(["submit", str(job), "--address", "http://tilewise-head.invalid:8265"]) == 2
    err = capsys.readouterr().err
    assert "warning: the job names local paths (input.path " in err
    assert str(tmp_path / "out.zarr") in err
    assert "error: cannot reach a Ray cluster at http://tilewise-head.invalid:8265" in err


def test_a_dashboard_address_without_http_is_one_quick_error(
    head: Head, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without a scheme the SDK takes HOST:PORT for a GCS address and spent some 40 s, with
    # Ray's C++ warnings, before failing on the dashboard's port.
    (tmp_path / "in.zarr").symlink_to(data / "in.zarr")
    job = _write_job(tmp_path)
    bare = head.url.removeprefix("http://")
    t0 = time.monotonic()
    assert main(["submit", str(job), "--address", bare]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: --address {bare} answers HTTP")
    assert f"Use --address {head.url}." in err
    assert time.monotonic() - t0 < 15
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens: the GCS check says so at once
    assert main(["submit", str(job), "--address", dead]) == 2
    assert f"cannot reach a Ray cluster at '{dead}'" in capsys.readouterr().err


def test_which_addresses_are_this_machine() -> None:
    assert _is_this_machine("http://127.0.0.1:8265")
    assert _is_this_machine("http://localhost:8265")
    assert _is_this_machine(f"http://{socket.gethostname()}:8265")
    assert _is_this_machine("auto")
    assert not _is_this_machine("http://198.51.100.7:8265")  # TEST-NET-2, never local
    assert not _is_this_machine("https://head.example.org:8265")


def test_ctrl_c_hook_drops_only_an_abandoned_event_loops_finaliser_error() -> None:
    import asyncio
    import types

    from tilewise.submit import _quiet_event_loop_finaliser

    passed: list[object] = []
    hook = _quiet_event_loop_finaliser(lambda u: passed.append(u.object))
    for obj in (asyncio.BaseEventLoop.__del__, print):
        hook(types.SimpleNamespace(object=obj, exc_type=RuntimeError))  # type: ignore[arg-type]
    assert passed == [print]


class _TailThatEndsOnCancel:
    """A job client whose log tail takes a cancelled task as the end of the stream (as a
    websocket's reader may), and whose job has succeeded."""

    async def _tail(self) -> Any:
        import asyncio

        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return
        yield "never"

    def tail_job_logs(self, submission_id: str) -> Any:
        return self._tail()

    def get_job_status(self, submission_id: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(value="SUCCEEDED")

    def get_job_logs(self, submission_id: str) -> str:
        return ""


def test_ctrl_c_while_following_is_never_lost_in_the_log_tail() -> None:
    # asyncio.run's own Ctrl-C handler only cancels the tail; this tail then ends quietly and,
    # with the job done, following would have returned as if no Ctrl-C had come.
    from tilewise.submit import _follow_logs

    # Python's own Ctrl-C handling, as in a terminal (a CI job may run with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _follow_logs(_TailThatEndsOnCancel(), "t-sigint")  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, inherited)
