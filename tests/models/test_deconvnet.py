"""DeconvNet: the published 252M, sizes 224 + 32k, unpooling with the pooling switches, halo.

The generic checks (band counts, determinism, tiled == whole image) are in test_registry.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilewise import models
from tilewise.models.deconvnet import DeconvNet
from tilewise.models.fcn import input_span
from tilewise.models.layers import count_parameters


def _meta(num_classes: int = 21) -> DeconvNet:
    with torch.device("meta"):
        model = models.create("deconvnet", in_channels=3, num_classes=num_classes)
    assert isinstance(model, DeconvNet)
    return model.eval()


def _tiny(in_channels: int, num_classes: int, width: float) -> DeconvNet:
    torch.manual_seed(0)
    model = models.create(
        "deconvnet", in_channels=in_channels, num_classes=num_classes, width=width
    )
    assert isinstance(model, DeconvNet)
    return model.double().eval()


def test_published_252m() -> None:
    # Tiramisu's CamVid table lists DeconvNet at 252M: the 21-class VOC model, with or without
    # the BN running statistics.
    model = _meta()
    assert round(count_parameters(model) / 1e6) == 252
    assert round(count_parameters(model, bn_statistics=True) / 1e6) == 252


def test_reference_counts() -> None:
    model = _meta()
    assert count_parameters(model) == 251_805_653
    assert count_parameters(model, bn_statistics=True) == 251_839_061


def test_29_bn_layers_and_no_dropout() -> None:
    modules = list(_meta().modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) == 29
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in modules)


@pytest.mark.parametrize(("h", "w"), [(224, 224), (256, 224), (288, 352), (480, 640)])
def test_224_plus_32k_maps_to_its_own_size(h: int, w: int) -> None:
    model = _meta()
    bottleneck: list[tuple[int, ...]] = []
    fc7 = model.fc.get_submodule("fc7")
    fc7.register_forward_hook(lambda m, a, out: bottleneck.append(tuple(out.shape[-2:])))
    with torch.device("meta"):
        y = model(torch.empty(1, 3, h, w))
    assert tuple(y.shape) == (1, 21, h, w)
    # The deploy net's 1×1 bottleneck at 224, one more cell per 32 px.
    assert bottleneck == [(1 + (h - 224) // 32, 1 + (w - 224) // 32)]


@pytest.mark.parametrize(("h", "w"), [(225, 224), (240, 240), (192, 192), (224, 250)])
def test_other_sizes_are_refused(h: int, w: int) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=r"224 \+ 32k"):
        _meta()(torch.empty(1, 3, h, w))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """Non-overlapping 2×2 blocks, (N, C, h, w, 4)."""
    return x.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)


def test_unpooling_puts_each_value_at_its_switch() -> None:
    model = _tiny(3, 4, 1 / 16)
    pre_pool: list[torch.Tensor] = []
    unpooled: list[tuple[torch.Tensor, torch.Tensor]] = []
    for encoder in model.encoders:
        encoder.register_forward_hook(lambda m, a, out: pre_pool.append(out.clone()))
    for unpool in model.unpools:
        unpool.register_forward_hook(lambda m, a, out: unpooled.append((a[0], out)))
    with torch.inference_mode():
        model(torch.randn(1, 3, 256, 224, dtype=torch.float64))
    for encoded, (decoded, out) in zip(reversed(pre_pool), unpooled, strict=True):
        values, out_blocks = _blocks(encoded), _blocks(out)
        # Each decoder value lands once in its 2×2 block, zeros elsewhere ...
        assert ((out_blocks != 0).sum(-1) <= 1).all()
        torch.testing.assert_close(out_blocks.sum(-1), decoded, rtol=0, atol=0)
        # ... where the encoder's map took the block's maximum (the switch).
        block_max = values.amax(-1, keepdim=True).expand_as(values)
        placed = out_blocks != 0
        assert placed.any()
        assert torch.equal(values[placed], block_max[placed])


def test_scores_depend_on_pixels_exactly_halo_away() -> None:
    # The input gradient of a column of scores shows the columns it depends on. At the output
    # phases where the traced span is widest it reaches exactly the declared halo, so the halo
    # is needed and the trace misses no layer. (That it suffices is the registry's tiled ==
    # whole-image test.)
    model = _tiny(1, 1, 1 / 64)
    halo = model.tiling.halo
    assert halo is not None
    width = model.tiling.size_rule.ceil(2 * halo + 128)
    x = torch.randn(1, 1, 224, width, dtype=torch.float64, requires_grad=True)
    y = model(x)
    widest = []
    for j in range(halo + 32, halo + 64):
        lo, hi = input_span(model.paths(), j, j)
        if max(j - lo, hi - j) == halo:
            widest.append(j)
    assert widest
    reach = 0
    for j in widest:
        (grad,) = torch.autograd.grad(y[0, 0, :, j].sum(), x, retain_graph=True)
        cols = torch.nonzero(grad[0, 0].abs().sum(0)).flatten()
        reach = max(reach, j - int(cols.min()), int(cols.max()) - j)
    assert reach == halo
