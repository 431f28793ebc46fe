"""Measure a network's effective receptive field by its impulse response (as StarDist does).

A random image and the same image with one pixel changed go through the network; the output
pixels that change mark how far one input pixel reaches. Tiling with a halo of that reach is
exact up to the responses below the tolerance. The impulse is placed at every phase modulo the
stride (pooling makes the reach depend on it), and the largest reach over the phases is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tilewise.errors import ConfigError
from tilewise.models.registry import TilingFacts

__all__ = ["ProbeResult", "probe_receptive_field"]


@dataclass(frozen=True)
class ProbeResult:
    """What the impulse responses showed.

    Attributes:
        window: input pixels per side of the probe window.
        phases: impulse positions probed (one per phase modulo the stride, up to ``max_phases``).
        radius: largest distance (pixels, Chebyshev) from an impulse to an output pixel whose
            response exceeded ``tolerance`` times the peak response: the smallest halo that makes
            tiling exact to that tolerance.
        tolerance: relative threshold.
        reaches_edge: the response reached the window border — the network has no finite halo
            within this window (global pooling), or the window is too small to tell.
        per_phase: the radius of each probed phase.
    """

    window: int
    phases: int
    radius: int
    tolerance: float
    reaches_edge: bool
    per_phase: tuple[int, ...]


def _window(facts: TilingFacts, size: int | None) -> int:
    if size is not None:
        if not facts.size_rule.is_valid(size):
            raise ConfigError(
                f"--size {size} is not an input size the network takes "
                f"({facts.size_rule.minimum} + k x {facts.size_rule.step}). "
                f"Use --size {facts.size_rule.ceil(size)}."
            )
        return size
    reach = facts.halo if facts.halo is not None else 256
    # Twice the declared reach on each side, so an under-declared halo shows up.
    return facts.size_rule.ceil(2 * facts.margin + 4 * reach + 2 * facts.stride + 1)


def probe_receptive_field(
    model: nn.Module,
    *,
    in_channels: int,
    size: int | None = None,
    tolerance: float = 1e-4,
    max_phases: int = 8,
    seed: int = 0,
) -> ProbeResult:
    """The impulse-response reach of ``model`` (a registered model with ``tiling`` facts).

    Args:
        model: the network, in whatever precision it has (float64 resolves small tolerances).
        in_channels: input bands.
        size: probe window side; default: large enough to see twice the declared halo.
        tolerance: responses below ``tolerance`` × the peak count as zero.
        max_phases: impulse phases modulo the stride to probe (evenly spread if fewer than the
            stride).
        seed: the random background image.
    """
    facts = getattr(model, "tiling", None)
    if not isinstance(facts, TilingFacts):
        raise ConfigError("the probe needs a model with tiling facts (a registered model).")
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance must be between 0 and 1; got {tolerance}.")
    n = _window(facts, size)
    m, s = facts.margin, facts.stride
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, in_channels, n, n, generator=gen, dtype=torch.float64).to(device, dtype)
    count = min(s, max_phases)
    phases = sorted({round(k * s / count) for k in range(count)})
    centre = n // 2 - (n // 2) % s
    model.eval()
    radii: list[int] = []
    edge = False
    with torch.inference_mode():
        ref = model(base)
        for ph in phases:
            c = centre + ph
            x = base.clone()
            x[:, :, c, c] += 1.0
            diff = (model(x) - ref).abs().amax(dim=(0, 1))  # (n - 2m, n - 2m)
            peak = float(diff.max())
            if peak == 0.0:
                raise ConfigError(
                    "the impulse changed no output (a dead network?): probe with other weights "
                    "or another seed."
                )
            ys, xs = torch.nonzero(diff > tolerance * peak, as_tuple=True)
            # Output pixel j sits on input pixel j + margin.
            dist = torch.maximum((ys + m - c).abs(), (xs + m - c).abs())
            radii.append(int(dist.max()))
            out = diff.shape[-1]
            touches = bool(
                (ys == 0).any() | (xs == 0).any() | (ys == out - 1).any() | (xs == out - 1).any()
            )
            edge = edge or touches
    return ProbeResult(
        window=n,
        phases=len(phases),
        radius=max(radii),
        tolerance=tolerance,
        reaches_edge=edge,
        per_phase=tuple(radii),
    )
