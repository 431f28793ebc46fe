"""DeepLab v1/v2: published parameter counts, Table 1's field of view, sizes, interpolation and the
halo (checked against a measured receptive field)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from tests.models.test_resnet import positive, reach
from tilewise import models
from tilewise.models.layers import count_parameters
from tilewise.models.registry import SizeRule

DEEPLABS = [n for n in models.names() if models.entry(n).family == "deeplab"]

# DeepLab v1 Table 1 (C = 21): fc6 kernel, rate, channels; params as printed; the exact count of the
# reference (§7); the "RF" column, the nominal field of view 8 (k - 1) r + 32; the true radius of
# the reference's receptive field 419 / 323 / 419 / 419.
TABLE1 = [
    (7, 4, 4096, 134.3, 134_346_581, 224, 209),
    (4, 4, 4096, 65.1, 65_140_565, 128, 161),
    (4, 8, 4096, 65.1, 65_140_565, 224, 209),
    (3, 12, 1024, 20.5, 20_505_429, 224, 209),
]


def _meta(name: str, num_classes: int = 21, **kwargs: object) -> Any:
    with torch.device("meta"):
        return models.create(name, in_channels=3, num_classes=num_classes, **kwargs)


def _v1(kernel: int, rate: int, channels: int) -> dict[str, int]:
    return {"fc6_kernel": kernel, "fc6_dilation": rate, "fc6_channels": channels}


@pytest.mark.parametrize("kernel, rate, channels, published, exact, fov, radius", TABLE1)
def test_table1_parameter_counts(
    kernel: int, rate: int, channels: int, published: float, exact: int, fov: int, radius: int
) -> None:
    n = count_parameters(_meta("deeplab_v1", **_v1(kernel, rate, channels)))
    assert round(n / 1e6, 1) == published
    assert n == exact


def test_largefov_is_table1_last_row() -> None:
    assert count_parameters(_meta("deeplab_largefov")) == 20_505_429
    assert count_parameters(_meta("deeplab_largefov", num_classes=11)) == 20_495_179


@pytest.mark.parametrize("kernel, rate, channels, published, exact, fov, radius", TABLE1)
def test_table1_field_of_view(
    kernel: int, rate: int, channels: int, published: float, exact: int, fov: int, radius: int
) -> None:
    model = _meta("deeplab_v1", **_v1(kernel, rate, channels))
    stride = math.prod(m.stride for m in model.features.modules() if isinstance(m, nn.MaxPool2d))
    fc6 = model.branches[0].fc6
    assert stride * (fc6.kernel_size[0] - 1) * fc6.dilation[0] + 32 == fov


def test_vgg_aspp_count_and_the_unreproducible_tiramisu_figure() -> None:
    for name in ("deeplab_aspp_l", "deeplab_aspp_s"):
        assert count_parameters(_meta(name)) == 37_877_652
    # Tiramisu's "DeepLab-LFOV 37.3M" (CamVid, 11 classes) matches neither LargeFOV nor ASPP-L.
    assert round(count_parameters(_meta("deeplab_aspp_l", num_classes=11)) / 1e6, 1) == 37.8
    assert round(count_parameters(_meta("deeplab_largefov", num_classes=11)) / 1e6, 1) == 20.5


def test_resnet101_aspp_count() -> None:
    model = _meta("deeplab_resnet101")
    assert count_parameters(model) == 44_048_532
    assert count_parameters(model.backbone) == 42_500_160


@pytest.mark.parametrize("name", DEEPLABS)
@pytest.mark.parametrize("n, features", [(321, 41), (513, 65)])
def test_output_has_the_input_size(name: str, n: int, features: int) -> None:
    model = _meta(name)
    assert models.facts(name).size_rule == SizeRule(9, 8)
    with torch.device("meta"):
        x = torch.empty(1, 3, n, n)
        assert model.scores(x).shape == (1, 21, features, features)
        assert model(x).shape == (1, 21, n, n)


def test_sizes_off_the_rule_do_not_keep_their_size() -> None:
    # 320 pools to 161, 81, 41 (ceil mode) and comes back as 321: why the rule is 8k + 1.
    with torch.device("meta"):
        assert _meta("deeplab_largefov")(torch.empty(1, 3, 320, 320)).shape[-1] == 321


def test_upsampling_aligns_corners() -> None:
    # Caffe's Interp: output pixel 8j is score j, and 8j + 4 the mean of scores j and j + 1.
    torch.manual_seed(0)
    model = models.create("deeplab_largefov", in_channels=3, num_classes=2, width=1 / 32).eval()
    x = torch.randn(1, 3, 41, 49)
    with torch.no_grad():
        s, y = model.scores(x), model(x)
    assert s.shape[-2:] == (6, 7) and y.shape[-2:] == (41, 49)
    torch.testing.assert_close(y[..., ::8, ::8], s)
    torch.testing.assert_close(y[..., 4::8, ::8], (s[..., :-1, :] + s[..., 1:, :]) / 2)


@pytest.mark.parametrize(
    "name, kwargs, radius",
    [("deeplab_largefov", {}, 209)]
    + [("deeplab_v1", _v1(k, r, c), radius) for k, r, c, *_, radius in TABLE1[:3]]
    + [
        ("deeplab_aspp_l", {}, 209 - 8 * 12 + 8 * 24),  # the rate-24 branch
        ("deeplab_aspp_s", {}, 209),
        ("deeplab_resnet101", {}, 705),  # reference: RF ≈ 1411
        (
            "deeplab_resnet101",
            {"blocks": (1, 1, 1, 1), "rates": (2, 4)},
            3 + 2 + 4 + 8 + 16 + 32 + 32,
        ),
    ],
)
def test_halo_is_the_measured_receptive_radius_plus_7(
    name: str, kwargs: dict[str, object], radius: int
) -> None:
    model: Any = positive(models.create(name, in_channels=3, num_classes=2, width=1 / 32, **kwargs))
    assert reach(model.scores, radius) == (True, False)
    # An output pixel between scores j and j + 1 reads both: the farther is 7 px beyond it.
    assert model.tiling.halo == radius + 7
