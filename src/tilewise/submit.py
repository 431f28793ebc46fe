"""``tilewise submit``: run a job spec on a Ray cluster through Ray's job submission API."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "cmd_submit"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tilewise submit``."""
    parser.add_argument("job", help="YAML job spec")


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit the job; with ``--follow`` stream its logs and return its exit status."""
    raise NotImplementedError
