"""Reading weights files (no pickle beyond torch's weights-only loader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tilewise.errors import ConfigError

__all__ = ["load_state_file"]


def load_state_file(location: str, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a state dict from a .safetensors file or a ``torch.save`` file (path or URI).

    ``what`` names the setting the location came from, for the error message.
    """
    import io

    import fsspec

    if not Path(location).exists() and "://" not in location:
        raise ConfigError(f"{what} '{location}' does not exist.")
    try:
        with fsspec.open(location, "rb") as fh:
            data = fh.read()
        if location.endswith(".safetensors"):
            from safetensors.torch import load

            state: Any = load(data)
        else:
            # weights_only: never unpickle arbitrary objects from a weights file.
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader error means: not a readable weights file
        raise ConfigError(
            f"{what} '{location}' cannot be read as a state dict "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}). "
            f"Give a .safetensors file or a torch state dict saved with torch.save."
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what} '{location}' does not hold a state dict.")
    return state
