"""The model registry: architecture names -> builders, and the facts the tiler needs.

A family file registers small builder functions with :func:`register_model` (as timm does). Every
module a builder returns carries a :class:`TilingFacts` as its ``tiling`` attribute, computed from
its own arguments, so the tiler never keeps a second table of strides and halos.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from tilewise.errors import ConfigError, UnknownArchitectureError, did_you_mean

__all__ = [
    "ModelEntry",
    "SizeRule",
    "TiledModule",
    "TilingFacts",
    "create",
    "entry",
    "facts",
    "names",
    "register_model",
]


@dataclass(frozen=True)
class SizeRule:
    """Valid input sizes along one axis: ``minimum + k * step`` for ``k >= 0``.

    U-Net (valid convolutions, 4 poolings): minimum 188, step 16 (572 is valid, 570 is not).
    A same-padded net of total stride 16: minimum 16, step 16. FCN: minimum 1, step 1.
    """

    minimum: int
    step: int

    def is_valid(self, n: int) -> bool:
        """Whether an input of ``n`` pixels is valid."""
        return n >= self.minimum and (n - self.minimum) % self.step == 0

    def ceil(self, n: int) -> int:
        """The smallest valid size that is at least ``n``."""
        if n <= self.minimum:
            return self.minimum
        return self.minimum + -(-(n - self.minimum) // self.step) * self.step


@dataclass(frozen=True)
class TilingFacts:
    """What the overlap-tile engine must know about a network.

    Attributes:
        stride: total down-sampling. Window origins are kept on one phase modulo ``stride`` so
            that every window sees the same pooling grid as whole-image inference.
        margin: pixels a valid-convolution network loses per side (U-Net: 92); 0 for same padding.
            A window of ``n`` input pixels predicts ``n - 2 * margin`` output pixels.
        halo: context per side that makes tiling exact (>= margin), or ``None`` when no finite
            halo does (global pooling, batch-statistics normalisation).
        size_rule: valid input sizes per axis.
        equivariant: whether the network is translation-equivariant under shifts by ``stride``,
            i.e. whether ``stitch: crop`` with ``halo`` reproduces whole-image inference.
        note: why tiling is not exact, when it is not.
    """

    stride: int
    margin: int
    halo: int | None
    size_rule: SizeRule
    equivariant: bool = True
    note: str = ""

    @property
    def exact(self) -> bool:
        """Whether some finite halo makes cropped tiling equal whole-image inference."""
        return self.equivariant and self.halo is not None


class TiledModule(Protocol):
    """A module that declares its tiling facts (every registered model does)."""

    tiling: TilingFacts

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture."""

    name: str
    builder: Builder
    family: str
    paper: str
    summary: str
    tiny: dict[str, Any]

    def arg_names(self) -> list[str]:
        """The architecture arguments the builder takes besides channels and classes."""
        params = inspect.signature(self.builder).parameters
        return [p for p in params if p not in ("in_channels", "num_classes")]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    *, family: str, paper: str, tiny: dict[str, Any] | None = None
) -> Callable[[Builder], Builder]:
    """Register a builder under its function name.

    The builder takes ``in_channels``, ``num_classes`` and keyword architecture arguments and
    returns a module with a ``tiling`` attribute. The first docstring line is the summary.
    ``tiny`` holds architecture arguments that shrink the network (widths, never the layer
    structure that sets stride and halo) for tests and quick trials on a CPU.
    """

    def decorate(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"architecture '{name}' is registered twice")
        summary = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        _REGISTRY[name] = ModelEntry(name, builder, family, paper, summary, dict(tiny or {}))
        return builder

    return decorate


def names() -> list[str]:
    """All registered architecture names, sorted."""
    return sorted(_REGISTRY)


def entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a clear error with the closest names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture '{name}'.{did_you_mean(name, _REGISTRY)} "
            f"Known architectures: {', '.join(names())} (list them with `tilewise models`)."
        ) from None


def _check_args(e: ModelEntry, arch_args: dict[str, Any]) -> None:
    allowed = e.arg_names()
    for key in arch_args:
        if key not in allowed:
            raise ConfigError(
                f"unknown argument '{key}' for arch '{e.name}'.{did_you_mean(key, allowed)} "
                f"It takes: {', '.join(allowed) or 'no arguments'}."
            )


def create(name: str, *, in_channels: int, num_classes: int, **arch_args: Any) -> nn.Module:
    """Build the registered architecture ``name`` (weights freshly initialised).

    Args:
        name: a name from :func:`names`.
        in_channels: input bands (3 for RGB, 4 or 13 for multispectral scenes).
        num_classes: output classes K; the network predicts K score maps.
        **arch_args: the family's own arguments (widths, depth, padding, ...).

    Returns:
        The module, with a ``tiling`` attribute holding its :class:`TilingFacts`.
    """
    e = entry(name)
    _check_args(e, arch_args)
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(
            f"in_channels and num_classes must be at least 1; got {in_channels} and {num_classes}."
        )
    try:
        model = e.builder(in_channels=in_channels, num_classes=num_classes, **arch_args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"arch '{name}' rejects its arguments {arch_args}: {exc}") from None
    if not isinstance(getattr(model, "tiling", None), TilingFacts):
        raise RuntimeError(f"builder of '{name}' returned a module without tiling facts")
    return model


def facts(
    name: str, *, in_channels: int = 3, num_classes: int = 2, **arch_args: Any
) -> TilingFacts:
    """The tiling facts of an architecture, without allocating its weights (meta device)."""
    with torch.device("meta"):
        model = create(name, in_channels=in_channels, num_classes=num_classes, **arch_args)
    tiling: TilingFacts = model.tiling  # type: ignore[assignment]
    return tiling
