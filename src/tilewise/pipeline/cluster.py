"""Joining a running Ray cluster by address: refuse an address that cannot work, in seconds.

``ray.init(address=...)`` answers a mistaken address slowly and with tracebacks: a host:port where
no GCS listens is retried for about 40 s per attempt, and a cluster that wants a token (Ray 2.60's
default) is retried 20 times, one C++ warning a second, before a ``ConnectionError``. A dashboard
URL (what ``tilewise submit`` takes) is a ``ValueError``. :func:`check_address` finds each of
these before ``ray.init`` runs (a TCP connect, then one GCS handshake of at most about 15 s) and
says how to fix it; :func:`join` runs both and turns what ``ray.init`` still raises into a
:class:`ClusterError`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tilewise.errors import ClusterError

__all__ = ["auth_message", "check_address", "cluster_address", "join"]

CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 5.0  # Ray's client adds its own 10 s of connection attempts to this
_GCS_HINT = (
    "a cluster's GCS address is HEAD:6379 (`ray start --head` prints it), or `auto` on a node "
    "of the cluster"
)


def cluster_address(*given: str | None) -> tuple[str | None, str]:
    """The address to join and where it came from: the first of ``given`` that is set (the
    ``--address`` argument, then the job's ``compute.address``), else ``$RAY_ADDRESS``; None
    when there is none (an embedded Ray)."""
    for address in given:
        if address:
            return address, "--address or compute.address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "$RAY_ADDRESS") if env else (None, "")


def _split(target: str, address: str, where: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(
            f"the Ray address '{address}' ({where}) is not HOST:PORT; {_GCS_HINT}. Leave it "
            "unset to start a Ray on this machine."
        )
    return host.strip("[]"), int(port)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hide what C++ code writes to file descriptor 2 (Ray's GCS client logs each refusal)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def auth_message(address: str, detail: str) -> str:
    """Why the cluster at ``address`` refused us (``detail``: its words), and which of
    ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` to set; for joining and for ``tilewise submit``."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    first = detail.strip().splitlines()[0] if detail.strip() else "refused"
    # The mode first: a GCS names the refusal "InvalidAuthToken" when no token came at all.
    if mode.lower() != "token":
        given = f"'{mode}'" if mode else "unset"
        hint = (
            " (RAY_AUTH_TOKEN is set, but it is only sent in token mode)"
            if os.environ.get("RAY_AUTH_TOKEN")
            else ""
        )
        why = (
            f"RAY_AUTH_MODE is {given} here{hint}, so no token was sent. Set RAY_AUTH_MODE=token "
            "and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` "
            "on the head prints it)"
        )
    elif "invalid" in detail.lower() or "forbidden" in detail.lower():
        why = (
            "the token sent is not the cluster's token. Set RAY_AUTH_TOKEN to the output of "
            "`ray get-auth-token` on the head (or copy it to ~/.ray/auth_token)"
        )
    else:
        why = (
            "RAY_AUTH_MODE=token is set but no token was found. Put the cluster's token in "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
        )
    return (
        f"the Ray cluster at {address} refused the request ({first}): Ray 2.60 clusters use "
        f"token authentication, and {why}."
    )


def check_address(address: str, where: str = "--address") -> None:
    """Raise :class:`ClusterError` when ``address`` cannot be joined by ``ray.init``.

    ``where`` says where the address came from (``--address``, ``compute.address``,
    ``$RAY_ADDRESS``), for the message. ``auto`` is checked as the address it finds.
    """
    if address == "local":  # ray.init starts a Ray on this machine
        return
    if address == "auto":  # the cluster this node belongs to, as ray.init would find it
        try:
            from ray._private.services import canonicalize_bootstrap_address

            found = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise ClusterError(
                f"the Ray address 'auto' ({where}) finds no running Ray on this machine; start "
                "one with `ray start --head`, or give the cluster's GCS address (HEAD:6379). "
                "Leave it unset to start a Ray for this run."
            ) from None
        except ImportError:
            return
        if found is None:
            return
        where = f"{where}, 'auto' found it"
        address = found
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"the Ray address '{address}' ({where}) is a dashboard URL, which `tilewise submit` "
            f"takes; `tilewise run` joins a cluster by its GCS address instead: {_GCS_HINT}. To "
            f"run the job on the cluster from here, use `tilewise submit JOB.yaml --address "
            f"{address}`."
        )
    client = address.startswith("ray://")
    host, port = _split(address[len("ray://") :] if client else address, address, where)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        what = "Ray Client server (`ray start --head` serves it on port 10001)" if client else "GCS"
        raise ClusterError(
            f"cannot reach a Ray cluster at '{address}' ({where}): no {what} answers there "
            f"({exc.strerror or type(exc).__name__}). Check the address and that the head is "
            f"running; {_GCS_HINT}."
        ) from None
    if client:
        return
    try:  # one handshake, where ray.init would retry 20 times
        from ray._raylet import InnerGcsClient  # type: ignore[attr-defined]
        from ray.exceptions import AuthenticationError, RpcError
    except ImportError:  # a Ray without them: ray.init's own errors are wrapped by join()
        return
    try:
        with _quiet_stderr():
            InnerGcsClient.standalone(f"{host}:{port}", None, int(HANDSHAKE_TIMEOUT_S * 1000))
    except AuthenticationError as exc:
        raise ClusterError(
            auth_message(f"{address} ({where})", getattr(exc, "message", str(exc)))
        ) from None
    except RpcError as exc:
        # Something listens (the TCP connect worked) but does not speak Ray's GCS protocol: the
        # dashboard's port given without http://, or another service.
        said = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else "silence"
        raise ClusterError(
            f"'{address}' ({where}) answers, but not as a Ray cluster's GCS ({said}); is it the "
            f"dashboard's port (8265)? {_GCS_HINT[0].upper()}{_GCS_HINT[1:]}."
        ) from None
    except Exception:  # anything else is for ray.init to report, as join() words it
        return


def join(address: str, where: str = "--address", **init_args: Any) -> None:
    """``ray.init(address=address, **init_args)``, with :func:`check_address` first and its
    connection errors as :class:`ClusterError`."""
    import ray

    check_address(address, where)
    init_args.setdefault("log_to_driver", False)
    init_args.setdefault("logging_level", logging.WARNING)
    try:
        ray.init(address=address, **init_args)
    except ConnectionError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(
            f"cannot join the Ray cluster at '{address}' ({where}): {detail}. Note that "
            f"{_GCS_HINT}; leave the address unset to start a Ray on this machine."
        ) from None
