"""Dilation (Yu & Koltun 2016): parameter counts, size rule, identity initialisation, context
receptive field, and the halo measured on a window against the whole image."""

from __future__ import annotations

import pytest
import torch

from tilewise import models
from tilewise.models.dilation import ContextModule, DilationNet
from tilewise.models.layers import count_parameters


def _meta(name: str, num_classes: int = 11) -> DilationNet:
    with torch.device("meta"):
        model = models.create(name, in_channels=3, num_classes=num_classes)
    assert isinstance(model, DilationNet)
    return model


@pytest.mark.parametrize(
    ("name", "released"),
    [("dilation8", 134_313_443), ("dilation8_large", 136_172_740)],
)
def test_parameter_count_of_the_camvid_networks(name: str, released: int) -> None:
    # The reference's counts for C = 11, excluding the fixed bilinear up-sampling (the released
    # deploy prototxt has none). Tiramisu's "140.8M" for Dilation8 matches neither.
    model = _meta(name)
    assert count_parameters(model, trainable_only=True) == released


def test_the_upsampling_is_fixed_and_per_class() -> None:
    # Deconvolution 16×16, group = C: one frozen 16×16 filter per class.
    model = _meta("dilation8")
    frozen = count_parameters(model) - count_parameters(model, trainable_only=True)
    assert frozen == 11 * 16 * 16


@pytest.mark.parametrize(
    ("size", "features"),
    [((900, 900), (66, 66)), ((900, 1100), (66, 91)), ((1396, 1396), (128, 128))],
)
def test_input_is_eight_times_the_features_plus_372(
    size: tuple[int, int], features: tuple[int, int]
) -> None:
    # The deploy sizes of the released VOC, CamVid and Cityscapes nets.
    model = _meta("dilation8")
    x = torch.empty(1, 3, *size, device="meta")
    assert tuple(model.frontend(x).shape[-2:]) == features
    assert tuple(model(x).shape[-2:]) == (8 * features[0], 8 * features[1])
    assert (size[0] - 8 * features[0]) // 2 == model.tiling.margin == 186


def test_size_rule_is_8n_plus_372() -> None:
    rule = _meta("dilation8_frontend").tiling.size_rule
    assert [n for n in range(370, 400) if rule.is_valid(n)] == [380, 388, 396]
    assert rule.is_valid(900) and not rule.is_valid(904)


@pytest.mark.parametrize("large", [False, True], ids=["basic", "large"])
def test_identity_initialisation_passes_scores_through(large: bool) -> None:
    # Paper eqs. 4-5: the freshly initialised module computes relu(x) (identity on x >= 0).
    torch.manual_seed(0)
    ctx = ContextModule(5, large=large).double()
    x = torch.randn(2, 5, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        assert (ctx(x.abs()) - x.abs()).abs().max() < 1e-14
        assert (ctx(x) - x.clamp(min=0)).abs().max() < 1e-14


def test_large_context_channels_follow_table_1() -> None:
    ctx = ContextModule(3, large=True)
    assert [c.out_channels for c in ctx.convs()] == [6, 6, 12, 24, 48, 96, 96, 3]


@pytest.mark.parametrize("large", [False, True], ids=["basic", "large"])
def test_context_receptive_field_follows_table_1(large: bool) -> None:
    rf, table = 1, []
    for conv in ContextModule(4, large=large).convs():
        rf += conv.dilation[0] * (conv.kernel_size[0] - 1)
        table.append(rf)
    assert table == [3, 5, 9, 17, 33, 65, 67, 67]


def _randomised(name: str) -> DilationNet:
    """A tiny float64 net whose context module mixes space (not the identity) and whose ReLUs
    never clip there, so that every pixel a window's zero padding reaches changes."""
    torch.manual_seed(0)
    model = models.create(name, in_channels=3, num_classes=3, width=1 / 64).double().eval()
    assert isinstance(model, DilationNet)
    with torch.no_grad():
        model.frontend.final.bias.fill_(1.0)  # scores of order 1, as the padding replaces them
    if model.context is not None:
        with torch.no_grad():
            for conv in model.context.convs():
                conv.weight.uniform_(0.5, 1.0).div_(conv.weight[0].numel())
                assert conv.bias is not None
                conv.bias.fill_(1.0)
    return model


@pytest.mark.parametrize(
    ("name", "band"),
    [("dilation8_frontend", 4), ("dilation8", 8 * 33 + 4), ("dilation8_large", 8 * 33 + 4)],
)
def test_a_window_differs_from_the_whole_image_exactly_within_halo_minus_margin(
    name: str, band: int
) -> None:
    # A window cut from the image at a multiple of 8 predicts the same pixels as the whole image,
    # except next to its edges: the context module's zero padding (33 features) and the
    # up-sampling's missing neighbour (4 px). That band is what the halo adds to the margin.
    model = _randomised(name)
    f = model.tiling
    assert f.halo is not None and f.halo - f.margin == band
    start, width = 8 * 10, 372 + 8 * 80
    x = torch.randn(1, 3, 380, width + 2 * start, dtype=torch.float64)
    with torch.no_grad():
        whole = model(x)[..., start : start + width - 372]
        window = model(x[..., start : start + width])
    diff = (whole - window).abs().amax(dim=(0, 1, 2))
    tol = 1e-12 * float(whole.abs().max())
    assert diff[band:-band].max() < tol
    assert diff[band - 1] > tol and diff[-band] > tol
