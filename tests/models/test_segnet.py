"""SegNet: the published 29.5M, any-size output with the prototxt's unpooling sizes, and
unpooling at the encoder's argmax positions.

The generic checks (band counts, determinism, tiled == whole image) are in test_registry.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilewise import models
from tilewise.models.layers import count_parameters
from tilewise.models.segnet import SegNet


def _meta(num_classes: int = 11) -> SegNet:
    with torch.device("meta"):
        model = models.create("segnet", in_channels=3, num_classes=num_classes)
    assert isinstance(model, SegNet)
    return model.eval()


def test_published_29_5m_counts_the_bn_statistics() -> None:
    # SegNet paper and Tiramisu's CamVid table: 29.5M (11 classes), as caffe stores BN
    # running statistics as blobs; the learned parameters alone print as 29.4M.
    model = _meta()
    assert round(count_parameters(model, bn_statistics=True) / 1e5) / 10 == 29.5
    assert round(count_parameters(model) / 1e5) / 10 == 29.4


def test_reference_counts() -> None:
    model = _meta()
    assert count_parameters(model) == 29_449_355
    assert count_parameters(model, bn_statistics=True) == 29_465_227
    assert count_parameters(_meta(37)) == 29_464_357  # SUN RGB-D
    assert count_parameters(model.encoders) == 14_723_136  # VGG16 convolutions + BN


def test_13_encoder_and_13_decoder_convolutions_all_but_the_last_with_bn() -> None:
    model = _meta()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 26
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 25
    last = list(model.decoders[-1].children())[-1]
    assert last is convs[-1] and last.out_channels == 11 and last.kernel_size == (3, 3)


SIZES = [(360, 480), (45, 61), (1, 1), (1, 7), (33, 2), (361, 479), (720, 960)]
SIZES += [(n, 100 - n) for n in range(1, 100, 3)]


def test_output_has_the_input_size_at_odd_sizes() -> None:
    model = _meta()
    with torch.device("meta"):
        for h, w in SIZES:
            assert tuple(model(torch.empty(1, 3, h, w)).shape) == (1, 11, h, w), (h, w)


def test_unpooling_sizes_are_the_prototxts() -> None:
    # segnet_inference.prototxt (360×480): upsample5 23×30, upsample4 45×60, then 90×120 ...
    model = _meta()
    sizes: list[tuple[int, ...]] = []
    for upsample in model.upsamples:
        upsample.register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape[-2:])))
    with torch.device("meta"):
        model(torch.empty(1, 3, 360, 480))
    assert sizes == [(23, 30), (45, 60), (90, 120), (180, 240), (360, 480)]


def _blocks(x: torch.Tensor, fill: float) -> torch.Tensor:
    """Non-overlapping 2×2 blocks (N, C, h, w, 4); odd sizes padded at the far edge (ceil)."""
    x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), value=fill)
    return x.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)


def test_unpooling_puts_each_value_at_its_encoder_argmax() -> None:
    torch.manual_seed(0)
    model = models.create("segnet", in_channels=3, num_classes=4, width=1 / 16).double().eval()
    assert isinstance(model, SegNet)
    pre_pool: list[torch.Tensor] = []
    unpooled: list[tuple[torch.Tensor, torch.Tensor]] = []
    for encoder in model.encoders:
        encoder.register_forward_hook(lambda m, a, out: pre_pool.append(out.clone()))
    for upsample in model.upsamples:
        upsample.register_forward_hook(lambda m, a, out: unpooled.append((a[0], out)))
    with torch.inference_mode():
        model(torch.randn(1, 3, 45, 61, dtype=torch.float64))
    for encoded, (decoded, out) in zip(reversed(pre_pool), unpooled, strict=True):
        assert out.shape == encoded.shape
        values, out_blocks = _blocks(encoded, float("-inf")), _blocks(out, 0.0)
        # Each decoder value lands once in its 2×2 block, zeros elsewhere ...
        assert ((out_blocks != 0).sum(-1) <= 1).all()
        torch.testing.assert_close(out_blocks.sum(-1), decoded, rtol=0, atol=0)
        # ... at a position where the encoder's map takes the block's maximum.
        block_max = values.amax(-1, keepdim=True).expand_as(values)
        placed = out_blocks != 0
        assert placed.any()
        assert torch.equal(values[placed], block_max[placed])


def test_halo_lies_between_the_rf_radius_and_224() -> None:
    # Reference §3: RF radius about 196, exact at 224 with tiles aligned to 32.
    halo = models.facts("segnet").halo
    assert halo is not None and 196 <= halo <= 224
