"""``tilewise submit``: run a job spec on a Ray cluster through Ray's job submission API.

The job is loaded and validated here first, so a bad spec fails before anything reaches the
cluster. What is shipped is the *resolved* job (every relative path made absolute by
:func:`tilewise.spec.load_job`), written as ``job.yaml`` into a small staging folder that becomes
the Ray job's ``working_dir``; the entrypoint is ``python -m tilewise.cli run job.yaml
--no-progress``. Shipping the user's folder instead would make relative paths point into Ray's
unpacked copy of it on the cluster, which the workers on other nodes do not have.

The job's ``compute.address`` is cleared in the shipped copy: inside a Ray job ``RAY_ADDRESS``
names the cluster the job runs on, and a dashboard URL (what ``submit`` is given) is not an
address that ``ray.init`` can join.

Errors of the cluster conversation (unreachable, token authentication refused, submission id
taken) are :class:`ClusterError`, a :class:`~tilewise.errors.TilewiseError`, so the CLI prints
them as one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from tilewise.errors import ClusterError, ConfigError, TilewiseError
from tilewise.pipeline.cluster import auth_message

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from tilewise.spec import PredictJob, TrainJob

__all__ = ["ClusterError", "add_arguments", "cmd_submit", "job_locations", "runtime_env_for"]

# The environment variables through which the job-submission SDK overrides the address it is
# given (ray/dashboard/utils.py, get_address_for_submission_client).
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_POLL_S = 0.5
_SDK_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)
_HEAD_HINT = "start a head with `ray start --head --dashboard-host 0.0.0.0` on the head machine"


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tilewise submit``."""
    parser.add_argument("job", help="YAML job spec")
    parser.add_argument(
        "--address",
        help=(
            "Ray dashboard URL of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS, "
            "else compute.address of the job when it is an http(s) URL)"
        ),
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs and exit with its status (0 = succeeded)",
    )
    mode.add_argument(
        "--no-wait",
        action="store_true",
        help="return right after submission instead of waiting for the job to start",
    )
    parser.add_argument(
        "--submission-id", help="the Ray job's id (default: tilewise-NAME-TIME-RANDOM)"
    )
    parser.add_argument("--workers", type=int, help="predictor actors (tilewise run --workers)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (tilewise run)"
    )
    parser.add_argument(
        "--runtime-env",
        metavar="FILE.yaml",
        help="Ray runtime_env mapping merged in (pip, env_vars, py_modules, ...; no working_dir)",
    )
    parser.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        metavar="X",
        help="CPUs reserved for the job's driver process (default 0)",
    )


# ----------------------------------------------------------------------------------------------
# What is shipped
# ----------------------------------------------------------------------------------------------


def job_locations(job: PredictJob | TrainJob) -> dict[str, str]:
    """Every store or file the job names, by its dotted field: ``{"input.path": ..., ...}``."""
    from tilewise.spec import TrainJob

    out: dict[str, str] = {}
    if isinstance(job, TrainJob):
        for name in ("shards", "val_shards"):
            for i, location in enumerate(getattr(job.data, name) or []):
                out[f"data.{name}[{i}]"] = location
        if job.model.init:
            out["model.init"] = job.model.init
        out["storage"] = job.storage
        out["package"] = job.package_location
        return out
    paths = job.input.path if isinstance(job.input.path, list) else [job.input.path]
    for i, path in enumerate(paths):
        out["input.path" if len(paths) == 1 else f"input.path[{i}]"] = path
    if job.input.mask is not None and job.input.mask.path:
        out["input.mask.path"] = job.input.mask.path
    if job.model.weights:
        out["model.weights"] = job.model.weights
    members = job.model.args.get("members")
    for i, member in enumerate(members if isinstance(members, list) else []):
        if isinstance(member, Mapping) and isinstance(member.get("weights"), str):
            out[f"model.args.members[{i}].weights"] = member["weights"]
    member = job.model.args.get("member")
    if isinstance(member, Mapping) and isinstance(member.get("weights"), str):
        out["model.args.member.weights"] = member["weights"]
    out["output.path"] = job.output.path
    return out


def _is_local_path(location: str) -> bool:
    """A plain path (made absolute by load_job), not a URI or an fsspec chain."""
    return not _URI.match(location) and "::" not in location


def _read_runtime_env(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(
            f"--runtime-env: cannot read '{path}': {exc.strerror or exc}. Give a YAML file "
            "holding a Ray runtime_env mapping (pip, env_vars, py_modules, ...)."
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--runtime-env: cannot parse '{path}' as YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--runtime-env: '{path}' must hold a YAML mapping (pip: [...], env_vars: {{...}}); "
            f"got a {type(data).__name__}."
        )
    return data


def runtime_env_for(staging: str, user: Mapping[str, Any] | None, *, source: str) -> dict[str, Any]:
    """The Ray runtime_env of the job: the user's mapping plus our ``working_dir``.

    Args:
        staging: the folder holding the resolved ``job.yaml`` (becomes ``working_dir``).
        user: the mapping of ``--runtime-env``, or None.
        source: how to name the user's mapping in errors (its file name).

    Raises:
        ConfigError: the mapping sets ``working_dir``, has non-mapping ``env_vars``, or sets
            an environment variable that tilewise's driver also sets on its actors (Ray refuses
            to merge the two).
    """
    from tilewise.pipeline.driver import ALLOCATOR_ENV

    env = dict(user or {})
    if "working_dir" in env:
        raise ConfigError(
            f"--runtime-env: {source} sets working_dir ({env['working_dir']!r}), but tilewise "
            "submit sets it to a folder holding the resolved job. Remove working_dir; ship "
            "code with py_modules and data through shared storage (s3://, gs://)."
        )
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, Mapping):
        raise ConfigError(
            f"--runtime-env: env_vars in {source} must be a mapping of names to strings; "
            f"got a {type(env_vars).__name__}."
        )
    clash = sorted(set(env_vars) & set(ALLOCATOR_ENV))
    if clash:
        raise ConfigError(
            f"--runtime-env: env_vars in {source} set {', '.join(clash)}, which tilewise sets "
            "on its actors (Ray refuses to merge a job's and a driver's value of one variable). "
            "Remove them."
        )
    # The driver's stdout goes to a file on the cluster: unbuffered, its lines reach
    # `--follow` and `ray job logs -f` as they are printed instead of at exit.
    env["env_vars"] = {"PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in env_vars.items()}}
    env["working_dir"] = staging
    return env


def _entrypoint(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "tilewise.cli", "run", "job.yaml", "--no-progress"]
    if args.workers is not None:
        parts += ["--workers", str(args.workers)]
    if args.overwrite:
        parts.append("--overwrite")
    return " ".join(parts)


def _default_submission_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"tilewise-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# ----------------------------------------------------------------------------------------------
# The address
# ----------------------------------------------------------------------------------------------


def _resolve_address(given: str | None, job: PredictJob | TrainJob) -> str:
    if given:
        return given
    for name in _ADDRESS_ENV:
        if os.environ.get(name):
            return os.environ[name]
    from tilewise.spec import PredictJob

    compute = job.compute.address if isinstance(job, PredictJob) else job.scaling.address
    if compute and compute.lower().startswith(("http://", "https://")):
        return compute
    raise ConfigError(
        "no Ray cluster address: tilewise submit needs the dashboard URL of the cluster's head. "
        "Pass --address http://HEAD:8265, set RAY_ADDRESS=http://HEAD:8265, or put "
        "compute.address (scaling.address in train jobs): http://HEAD:8265 in the job ("
        + _HEAD_HINT
        + " first)."
    )


def _host_of(address: str) -> str | None:
    """The host an address names; None for 'auto' (the cluster on this machine)."""
    if address.lower() in {"auto", "local"}:
        return None
    if "://" in address:
        return urlsplit(address).hostname
    return urlsplit("//" + address).hostname


def _is_this_machine(address: str) -> bool:
    host = _host_of(address)
    if host is None:
        return True
    names = {"localhost", socket.gethostname().lower()}
    try:
        import psutil

        names |= {
            a.address.split("%")[0].lower()
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)
        }
    except Exception:  # interface listing is best effort: the warning is advice only
        pass
    host = host.lower()
    if host in names:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


# ----------------------------------------------------------------------------------------------
# Talking to the cluster
# ----------------------------------------------------------------------------------------------


def _unreachable(address: str, detail: str) -> ClusterError:
    return ClusterError(
        f"cannot reach a Ray cluster at {address} ({detail}). Check the address (the head's "
        f"dashboard URL, http://HEAD:8265 by default) or {_HEAD_HINT}; the dashboard must "
        "listen on an address this machine can reach."
    )


@contextmanager
def _cluster_errors(address: str) -> Iterator[None]:
    """Turn the SDK's exceptions into one-line :class:`ClusterError` messages."""
    from ray.exceptions import AuthenticationError, RpcError

    try:
        yield
    except TilewiseError:  # ours, already worded (ClusterError is also a ConnectionError)
        raise
    except AuthenticationError as exc:
        raise ClusterError(auth_message(address, getattr(exc, "message", str(exc)))) from None
    except RpcError as exc:  # a GCS address (host:6379) that does not answer
        raise _unreachable(address, str(exc).strip().splitlines()[0]) from None
    except ConnectionError as exc:  # also requests' ConnectionError (an OSError subclass)
        raise _unreachable(address, "connection refused or host not found") from exc
    except OSError as exc:
        raise _unreachable(address, str(exc).splitlines()[0] if str(exc) else "I/O error") from exc


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    # The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given;
    # ours was already chosen with --address first, so hide them while the client resolves it.
    saved = {name: os.environ.pop(name) for name in _ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _answers_http(address: str) -> bool:
    """Whether HOST:PORT answers HTTP (as a Ray dashboard does; a GCS speaks gRPC), within 2 s.
    A refusal such as 401 (a dashboard that wants the cluster's token) is an answer too."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except Exception:  # refused, timed out, not HTTP: not a dashboard
        return False


def _check_gcs_form(address: str) -> None:
    """A HOST:PORT address (no http://) is a GCS address to the SDK, which then spends 40 s and
    Ray's C++ warnings on a dashboard port or a dead one: say which it is at once."""
    if "://" in address or address.lower() in {"auto", "local"}:
        return
    if _answers_http(address):
        raise ClusterError(
            f"--address {address} answers HTTP, as the cluster's dashboard does, but without "
            f"http:// an address is read as a GCS address (HEAD:6379). Use --address "
            f"http://{address}."
        )
    from tilewise.pipeline.cluster import check_address

    check_address(address)


def _client(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    _check_gcs_form(address)
    # The SDK logs every package upload and websocket close at INFO on stderr; what matters
    # to the user is printed here.
    for name in _SDK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    with _cluster_errors(address), _address_env_cleared():
        try:
            return JobSubmissionClient(address)
        except RuntimeError as exc:  # e.g. a 404 from a server that is not a Ray dashboard
            raise ClusterError(
                f"{address} did not answer as a Ray dashboard with the Jobs API "
                f"({str(exc).splitlines()[0]}). Give the head's dashboard URL, "
                "http://HEAD:8265 by default."
            ) from None


def _exists(client: JobSubmissionClient, submission_id: str) -> str | None:
    """The status of the job with this id, or None when the cluster has none."""
    try:
        return str(client.get_job_info(submission_id).status.value)
    except RuntimeError:  # 404: no such job
        return None


def _taken(submission_id: str, status: str | None) -> ClusterError:
    state = f" (status {status})" if status else ""
    return ClusterError(
        f"submission id '{submission_id}' is already used by a job on this cluster{state}; "
        "Ray never reuses one. Pass another --submission-id, or leave it out for a fresh one."
    )


# ----------------------------------------------------------------------------------------------
# Waiting and following
# ----------------------------------------------------------------------------------------------


async def _tail(client: JobSubmissionClient, submission_id: str, written: list[int]) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        written[0] += len(chunk)


def _follow_logs(client: JobSubmissionClient, submission_id: str) -> None:
    """Stream the job's logs to stdout until it ends (websocket tail; polling as fallback)."""
    import aiohttp

    written = [0]  # characters printed so far, also when the tail breaks off midway
    with _ctrl_c_raises():
        # If the tail closes early (proxy, network), poll the whole log and print what is new.
        with suppress(TimeoutError, RuntimeError, OSError, aiohttp.ClientError):
            asyncio.run(_tail(client, submission_id, written))
        while True:
            status = str(client.get_job_status(submission_id).value)
            logs = client.get_job_logs(submission_id)
            if len(logs) > written[0]:
                sys.stdout.write(logs[written[0] :])
                sys.stdout.flush()
                written[0] = len(logs)
            if status in _TERMINAL:
                return
            time.sleep(_POLL_S)


@contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt here, also while ``asyncio.run`` runs the log tail.

    With Python's default handler in place, ``asyncio.run`` puts in its own, which only cancels
    the tail's task; when the SDK's websocket code takes that cancellation as the end of the
    stream, the interrupt is lost and following went on to the job's end. A handler of ours is
    left alone by ``asyncio.run``, and it raises KeyboardInterrupt wherever the main thread is.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):  # another thread, or Ctrl-C handled (or ignored) by whoever runs us: left as it is
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_until(client: JobSubmissionClient, submission_id: str, done: set[str]) -> str:
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in done:
            return status
        time.sleep(_POLL_S)


def _outcome(client: JobSubmissionClient, submission_id: str) -> int:
    """Print the job's end state; return the exit status it maps to."""
    info = client.get_job_info(submission_id)
    status = str(info.status.value)
    if status == "SUCCEEDED":
        print(f"job {submission_id} succeeded", file=sys.stderr)
        return 0
    message = (info.message or "").split(", last available logs")[0].strip().splitlines()
    reason = f": {message[0]}" if message else ""
    print(f"job {submission_id} {status.lower()}{reason}", file=sys.stderr)
    code = getattr(info, "driver_exit_code", None)
    if status == "FAILED" and isinstance(code, int) and code != 0:
        return code
    return 1


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _submit(
    args: argparse.Namespace,
    address: str,
    shipped: PredictJob | TrainJob,
    name: str,
    submission_id: str,
    user_env: dict[str, Any] | None,
) -> JobSubmissionClient:
    """Stage the resolved job, connect, and submit it; return the connected client."""
    with tempfile.TemporaryDirectory(prefix="tilewise-submit-") as staging:
        # Checked before the cluster is contacted, like the job itself.
        runtime_env = runtime_env_for(
            staging, user_env, source=args.runtime_env or "the runtime env"
        )
        (Path(staging) / "job.yaml").write_text(
            yaml.safe_dump(shipped.model_dump(mode="json"), sort_keys=False)
        )
        client = _client(address)
        with _cluster_errors(address):
            taken = _exists(client, submission_id)
            if taken is not None:
                raise _taken(submission_id, taken)
            try:
                # The working_dir is zipped and uploaded inside submit_job; the staging
                # folder is not needed afterwards.
                client.submit_job(
                    entrypoint=_entrypoint(args),
                    submission_id=submission_id,
                    runtime_env=runtime_env,
                    metadata={"tilewise_job": name, "tilewise_output": _output_of(shipped)},
                    entrypoint_num_cpus=args.entrypoint_num_cpus,
                )
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    raise _taken(submission_id, None) from None
                raise ClusterError(
                    f"the Ray cluster at {address} refused the job: {_last_line(str(exc))}"
                ) from None
    return client


def _output_of(job: PredictJob | TrainJob) -> str:
    """What the job writes: a predict job's output, a train job's model package."""
    from tilewise.spec import TrainJob

    return job.package_location if isinstance(job, TrainJob) else job.output.path


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit the job; with ``--follow`` stream its logs and return its exit status."""
    from tilewise.spec import PredictJob, load_job

    job = load_job(args.job)  # a bad spec stops here: nothing is submitted
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1; got {args.workers}.")
    if args.entrypoint_num_cpus is not None and args.entrypoint_num_cpus < 0:
        raise ConfigError(
            f"--entrypoint-num-cpus must be 0 or more; got {args.entrypoint_num_cpus}."
        )
    user_env = _read_runtime_env(args.runtime_env) if args.runtime_env else None
    address = _resolve_address(args.address, job)
    name = job.name or Path(args.job).stem
    submission_id = args.submission_id or _default_submission_id(name)

    if not _is_this_machine(address):
        local = [f"{k} {v}" for k, v in job_locations(job).items() if _is_local_path(v)]
        if local:
            print(
                f"warning: the job names local paths ({'; '.join(local)}) and the cluster at "
                f"{address} is not this machine: they must be on a filesystem every node mounts "
                "at the same path (on clusters, s3:// or gs:// URIs are the norm).",
                file=sys.stderr,
            )

    # The job runs on the cluster it was submitted to, whatever address the file names.
    shipped: PredictJob | TrainJob
    if isinstance(job, PredictJob):
        shipped = job.model_copy(
            update={"compute": job.compute.model_copy(update={"address": None})}
        )
    else:
        shipped = job.model_copy(
            update={"scaling": job.scaling.model_copy(update={"address": None})}
        )
    try:
        client = _submit(args, address, shipped, name, submission_id, user_env)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted during submission: job {submission_id} may or may not have been "
            f"submitted. Check with: ray job status {submission_id} --address {address}",
            file=sys.stderr,
        )
        return 130

    tail = f" --address {address}"
    try:
        print(f"submitted job '{name}' to {address} as {submission_id}")
        print(f"  follow its logs: ray job logs -f {submission_id}{tail}")
        print(f"  stop it:         ray job stop {submission_id}{tail}")
        sys.stdout.flush()
        if args.no_wait:
            return 0
        with _cluster_errors(address):
            if args.follow:
                _follow_logs(client, submission_id)
                _wait_until(client, submission_id, _TERMINAL)
                return _outcome(client, submission_id)
            # Wait for the job to leave PENDING, so that a runtime env that cannot be set up
            # (pip, py_modules) is reported here rather than found later.
            status = _wait_until(client, submission_id, _TERMINAL | {"RUNNING"})
            if status == "RUNNING":
                print(f"job {submission_id} is running", file=sys.stderr)
                return 0
            return _outcome(client, submission_id)
    except KeyboardInterrupt:
        # Ctrl-C ends this command only: the job belongs to the cluster now. The SDK's event
        # loop, cut off mid-call, is collected at exit, and its finaliser reports a
        # ResourceWarning or (when it was still marked running) a RuntimeError with a
        # traceback that would bury this message.
        warnings.filterwarnings("ignore", category=ResourceWarning)
        sys.unraisablehook = _quiet_event_loop_finaliser(sys.unraisablehook)
        print(
            f"\nstopped {'following' if args.follow else 'waiting for'} job {submission_id}; it "
            f"keeps running on the cluster. Stop it with: ray job stop {submission_id}{tail}",
            file=sys.stderr,
        )
        return 130


def _quiet_event_loop_finaliser(
    hook: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], None]:
    """An unraisable-exception hook that drops what an abandoned asyncio loop's ``__del__``
    raises and passes everything else to ``hook``."""

    def quiet(unraisable: sys.UnraisableHookArgs) -> None:
        where = getattr(unraisable.object, "__qualname__", "")
        if not where.startswith("BaseEventLoop."):
            hook(unraisable)

    return quiet


def _last_line(text: str) -> str:
    """The informative line of a server-side traceback (its last non-empty line)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip().strip(".")]
    return lines[-1] if lines else text.strip()
