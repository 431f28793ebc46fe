"""Addresses that `tilewise run` cannot join are refused before ``ray.init``, with the fix.

The token-authentication refusal needs a real head and is tested beside ``tilewise submit``'s
(tests/test_submit.py, which starts one).
"""

from __future__ import annotations

import socket

import pytest

from tilewise.errors import ClusterError
from tilewise.pipeline.cluster import check_address, cluster_address


def _closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_dashboard_url_points_to_tilewise_submit() -> None:
    with pytest.raises(ClusterError, match=r"dashboard URL.*tilewise submit JOB\.yaml --address"):
        check_address("http://head:8265", "$RAY_ADDRESS")


def test_an_address_without_a_port_asks_for_host_and_port() -> None:
    with pytest.raises(ClusterError, match=r"'head' \(--address\) is not HOST:PORT.*6379"):
        check_address("head")


def test_a_port_where_nothing_listens_is_refused_without_retrying() -> None:
    port = _closed_port()
    with pytest.raises(ClusterError, match=rf"cannot reach .*127\.0\.0\.1:{port}.*no GCS answers"):
        check_address(f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match=r"no Ray Client server"):
        check_address(f"ray://127.0.0.1:{port}")


def test_the_address_comes_from_the_argument_the_job_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "env:6379")
    assert cluster_address("arg:1", "job:2") == ("arg:1", "--address or compute.address")
    assert cluster_address(None, "job:2") == ("job:2", "--address or compute.address")
    assert cluster_address(None, None) == ("env:6379", "$RAY_ADDRESS")
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) == (None, "")


def test_a_port_that_answers_but_is_no_gcs_is_refused_after_one_handshake() -> None:
    # The dashboard's port without http://, or another service: the TCP connect works, Ray's
    # handshake does not (ray.init would retry it for minutes).
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel accepts connections; nothing ever answers them
        port = int(server.getsockname()[1])
        with pytest.raises(ClusterError, match=rf"127\.0\.0\.1:{port}.*answers, but not as a Ray"):
            check_address(f"127.0.0.1:{port}")
