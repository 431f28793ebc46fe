"""FC-DenseNet (Jégou et al. 2017): parameter counts, stack widths, sizes, the halo's reach
against a window cut from the image, and batch-statistics BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilewise import models
from tilewise.models.densenet import FCDenseNet, fc_densenet_reach
from tilewise.models.layers import count_parameters


def _meta(name: str, **kwargs: object) -> FCDenseNet:
    with torch.device("meta"):
        model = models.create(name, in_channels=3, num_classes=11, **kwargs)
    assert isinstance(model, FCDenseNet)
    return model


@pytest.mark.parametrize(
    ("name", "trainable", "with_bn_stats"),
    [
        ("fc_densenet56", 1_376_795, 1_397_963),
        ("fc_densenet67", 3_463_243, 3_502_923),
        ("fc_densenet103", 9_322_091, 9_425_163),
    ],
)
def test_parameter_counts_of_the_released_configurations(
    name: str, trainable: int, with_bn_stats: int
) -> None:
    model = _meta(name)
    assert count_parameters(model, trainable_only=True) == trainable
    assert count_parameters(model, bn_statistics=True) == with_bn_stats


def test_published_counts_under_lasagnes_rule() -> None:
    # Lasagne's count_params() includes BN mean and inv_std: 103 → 9.4M, 67 → 3.5M.
    assert round(count_parameters(_meta("fc_densenet103"), bn_statistics=True) / 1e5) == 94
    assert round(count_parameters(_meta("fc_densenet67"), bn_statistics=True) / 1e5) == 35
    # The published 1.5M for FC-DenseNet56 does not reproduce under either rule: 1.4M.
    m56 = _meta("fc_densenet56")
    assert round(count_parameters(m56, bn_statistics=True) / 1e5) == 14
    assert round(count_parameters(m56, trainable_only=True) / 1e5) == 14


def _stack_widths(model: FCDenseNet) -> tuple[list[int], int, list[int]]:
    def width(block: nn.Module) -> int:
        first_conv = block.layers[0][2]  # BN, ReLU, conv, drop-out
        assert isinstance(first_conv, nn.Conv2d)
        return first_conv.in_channels + block.new_channels

    return (
        [model.first_conv.out_channels] + [width(b) for b in model.down_blocks],
        width(model.bottleneck),
        [width(b) for b in model.up_blocks],
    )


def test_stack_widths_of_fc_densenet103_follow_the_paper_table() -> None:
    # The paper's m column (with the README's corrections).
    down, bottleneck, up = _stack_widths(_meta("fc_densenet103"))
    assert down == [48, 112, 192, 304, 464, 656]
    assert bottleneck == 896
    assert up == [1088, 816, 576, 384, 256]


@pytest.mark.parametrize(("name", "final"), [("fc_densenet56", 192), ("fc_densenet67", 288)])
def test_final_stack_width(name: str, final: int) -> None:
    assert _meta(name).final.in_channels == final


@pytest.mark.parametrize("size", [(360, 480), (250, 333)])
def test_output_size_equals_input_size_for_any_size(size: tuple[int, int]) -> None:
    # The transition-up output 2n + 1 is centre-cropped to the skip, so odd sizes work too.
    model = _meta("fc_densenet103")
    y = model(torch.empty(1, 3, *size, device="meta"))
    assert tuple(y.shape) == (1, 11, *size)


@pytest.mark.parametrize(
    ("name", "rf"), [("fc_densenet56", 848), ("fc_densenet67", 1036), ("fc_densenet103", 2312)]
)
def test_receptive_field_matches_the_reference(name: str, rf: int) -> None:
    # The reference's analytic receptive fields (all output phases together). The declared halo
    # is smaller than rf / 2 (413 / 508 / 1147 against 424 / 518 / 1156) because the halo is
    # taken per phase from a stride-aligned core.
    reach = fc_densenet_reach(_meta(name).blocks)
    assert max(reach.hi) - min(reach.lo) + 1 == rf
    assert _meta(name).tiling.halo == reach.halo() < rf // 2


def _linearised(blocks: int | tuple[int, ...]) -> FCDenseNet:
    """A tiny float64 net with ReLU removed and max-pools averaged: the reach is unchanged but
    every pixel that reads a window's zero padding now changes (no clipped path)."""
    torch.manual_seed(0)
    model = models.create(
        "fc_densenet56",
        in_channels=2,
        num_classes=2,
        growth_rate=2,
        first_filters=3,
        layers_per_block=blocks,
    )
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(2))
    assert isinstance(model, FCDenseNet)
    return model.double().eval()


@pytest.mark.parametrize("blocks", [1, (1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1)], ids=["1", "mixed"])
def test_reach_predicts_exactly_which_pixels_of_a_window_differ(
    blocks: int | tuple[int, ...],
) -> None:
    # A window cut at a multiple of 32 gives the whole image's output except where some layer's
    # zero padding (or a missing transition-up input) is read: the pixels x whose reach
    # [x + lo, x + hi] leaves the window. The halo is computed from that reach.
    model = _linearised(blocks)
    reach = fc_densenet_reach(model.blocks)
    start, width = 32 * 7, 32 * 14
    x = torch.randn(1, 2, 32, width + 2 * start, dtype=torch.float64)
    with torch.no_grad():
        whole = model(x)[..., start : start + width]
        window = model(x[..., start : start + width])
    diff = (whole - window).abs().amax(dim=(0, 1, 2))
    differs = (diff > 1e-12 * float(whole.abs().max())).tolist()
    predicted = [c + reach.lo[c % 32] < 0 or c + reach.hi[c % 32] > width - 1 for c in range(width)]
    assert differs == predicted


def test_batch_statistics_make_a_sample_depend_on_its_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    outputs = {}
    for mode in ("running", "batch"):
        torch.manual_seed(1)
        model = models.create(
            "fc_densenet56",
            in_channels=3,
            num_classes=2,
            growth_rate=2,
            first_filters=3,
            layers_per_block=1,
            bn_inference=mode,
        ).eval()
        with torch.no_grad():
            outputs[mode] = (model(x[:1]), model(x)[:1])
    alone, in_batch = outputs["running"]
    assert (alone - in_batch).abs().max() < 1e-5 * alone.abs().max()  # float32 rounding
    alone, in_batch = outputs["batch"]
    assert (alone - in_batch).abs().max() > 1e-2 * alone.abs().max()


def test_batch_statistics_are_declared_not_tile_exact() -> None:
    f = models.facts("fc_densenet56", bn_inference="batch")
    assert not f.exact and "batch" in f.note
    assert models.facts("fc_densenet56").exact
