"""Errors that tilewise raises for user mistakes.

Every error says what is wrong, the rule, what was given and how to fix it, in one line, e.g.
``tile (500) must be a multiple of 16 for arch 'unet'; got 500. Use tile: 496 or 512.``

Each class also subclasses the matching builtin (as TorchGeo does), so callers that already catch
``ValueError`` or ``FileNotFoundError`` keep working. The CLI prints these without a traceback and
exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ClusterError",
    "ConfigError",
    "InputError",
    "OutputExistsError",
    "PlanError",
    "StoreNotFoundError",
    "TilewiseError",
    "UnknownArchitectureError",
    "did_you_mean",
]


class TilewiseError(Exception):
    """Base class of every error caused by a user's input (job spec, data, arguments)."""


class ConfigError(TilewiseError, ValueError):
    """A job spec or an argument breaks a rule (unknown key, bad value, unreadable YAML)."""


class PlanError(TilewiseError, ValueError):
    """The tiling cannot be planned as asked (tile, halo, chunk or stride rules)."""


class InputError(TilewiseError, ValueError):
    """The input image does not fit the job (axes, channel count, dtype)."""


class StoreNotFoundError(TilewiseError, FileNotFoundError):
    """A store, group or array named by the job does not exist."""


class OutputExistsError(TilewiseError, FileExistsError):
    """The output exists and belongs to a different job; it is never overwritten silently."""


class ClusterError(TilewiseError, ConnectionError):
    """The Ray cluster cannot be reached, refuses the request, or refuses the submission."""


class UnknownArchitectureError(TilewiseError, KeyError):
    """An architecture name that the model registry does not know."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
