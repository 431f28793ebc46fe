"""The impulse-response probe against what tiling actually does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tilewise
from tests.reference import GlobalContextNet, whole_image
from tilewise import models
from tilewise.errors import ConfigError
from tilewise.models.probe import probe_receptive_field
from tilewise.models.registry import SizeRule, TilingFacts


class _Plain(nn.Module):
    """The same network without its declared facts, so any halo can be tried."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = models.create("unet_same", in_channels=3, num_classes=2, depth=2, base_width=4)
    return net.double().eval()


def test_tiling_with_the_measured_reach_is_exact_to_the_tolerance() -> None:
    net = _net()
    tol = 1e-7
    result = probe_receptive_field(net, in_channels=3, tolerance=tol, max_phases=4)
    assert not result.reaches_edge
    assert result.radius <= net.tiling.halo  # never more than the analytic receptive field
    image = np.random.default_rng(1).standard_normal((3, 90, 100))
    expected = whole_image(net, image, net.tiling)

    def error(halo: int) -> float:
        tiled = tilewise.predict_array(
            _Plain(net), image, tile=32, halo=halo, stride=4, device="cpu"
        )
        return float(np.abs(tiled - expected).max() / np.abs(expected).max())

    # With the measured reach the seams are below float32 resolution plus the tolerance; with
    # half of it they are not — so the measurement is what decides exactness.
    assert error(result.radius) < 1e-5
    assert error(result.radius // 2) > 10 * error(result.radius)


def test_a_global_pooling_network_reaches_the_window_border() -> None:
    torch.manual_seed(0)
    net = GlobalContextNet().double()
    net.tiling = TilingFacts(1, 0, None, SizeRule(1, 1), equivariant=False, note="global")  # type: ignore[assignment]
    result = probe_receptive_field(net, in_channels=3, size=64)
    assert result.reaches_edge


def test_a_size_the_network_does_not_take_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="Use --size 192"):
        probe_receptive_field(_net(), in_channels=3, size=190)
