"""FCN-32s / 16s / 8s and FCN-AlexNet: published sizes, any-size output, centred crops, halo.

The generic checks (band counts, determinism, tiled == whole image) are in test_registry.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilewise import models
from tilewise.errors import ConfigError
from tilewise.models.fcn import FCN, FCNAlexNet, footprints, receptive_field
from tilewise.models.layers import count_parameters

VGG = ["fcn32s", "fcn16s", "fcn8s"]
ALL = [*VGG, "fcn_alexnet"]


def _meta(name: str, num_classes: int = 21, **arch_args: object) -> FCN | FCNAlexNet:
    with torch.device("meta"):
        model = models.create(name, in_channels=3, num_classes=num_classes, **arch_args)
    assert isinstance(model, FCN | FCNAlexNet)
    return model.eval()


def _tiny(
    name: str, in_channels: int = 3, num_classes: int = 3, **arch_args: object
) -> FCN | FCNAlexNet:
    torch.manual_seed(0)
    model = models.create(
        name, in_channels=in_channels, num_classes=num_classes, width=1 / 32, **arch_args
    )
    assert isinstance(model, FCN | FCNAlexNet)
    return model.double().eval()


# --- parameter counts -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "millions"), [("fcn32s", 134), ("fcn_alexnet", 57)])
def test_fcn_table_1_counts_exclude_the_fixed_upsampling(name: str, millions: int) -> None:
    # FCN Table 1: FCN-VGG16 134M, FCN-AlexNet 57M (VOC, 21 classes).
    assert round(count_parameters(_meta(name), trainable_only=True) / 1e6) == millions


def test_tiramisu_fcn8_count_includes_the_deconvolutions_of_the_21_class_net() -> None:
    # Tiramisu's CamVid table: "FCN8 134.5M"; the 11-class CamVid net would print 134.3M.
    assert round(count_parameters(_meta("fcn8s")) / 1e5) / 10 == 134.5
    assert round(count_parameters(_meta("fcn8s", 11)) / 1e5) / 10 == 134.3


@pytest.mark.parametrize(
    ("name", "classes", "trainable", "total"),
    [
        ("fcn32s", 21, 134_346_581, 136_152_917),
        ("fcn_alexnet", 21, 56_954_261, 58_704_590),
        ("fcn8s", 21, 134_489_759 - 127_008, 134_489_759),
        ("fcn8s", 11, None, 134_348_929),
    ],
)
def test_released_networks_have_the_reference_counts(
    name: str, classes: int, trainable: int | None, total: int
) -> None:
    model = _meta(name, classes)
    assert count_parameters(model) == total
    if trainable is not None:
        assert count_parameters(model, trainable_only=True) == trainable


def test_learnable_upsampling_trains_every_deconvolution() -> None:
    model = _meta("fcn8s", upsampling="learnable")
    assert count_parameters(model, trainable_only=True) == 134_489_759


def test_unknown_upsampling_is_refused() -> None:
    with pytest.raises(ConfigError, match="upsampling"):
        models.create("fcn8s", in_channels=3, num_classes=2, upsampling="nearest")


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rf"), [("fcn32s", 404), ("fcn8s", 404), ("fcn_alexnet", 355)])
def test_receptive_field_of_score_fr_is_fcn_table_1s(name: str, rf: int) -> None:
    model = _meta(name)
    if isinstance(model, FCNAlexNet):
        body = footprints(model.features, model.classifier, model.score_fr)
    else:
        blocks = (model.block1, model.block2, model.block3, model.block4, model.block5)
        body = footprints(*blocks, model.classifier, model.score_fr)
    assert receptive_field(body) == rf


# Every height and width from 1 to 100 (and a few large ones): the 100-px pad, ceil pooling and
# the crops give the input's size back.
SIZES = [(h, 101 - h) for h in range(1, 101)] + [(500, 500), (512, 333), (600, 1), (1, 600)]


@pytest.mark.parametrize("name", ALL)
def test_output_has_the_input_size_for_every_size(name: str) -> None:
    model = _meta(name)
    with torch.device("meta"):
        for h, w in SIZES:
            y = model(torch.empty(1, 3, h, w))
            assert tuple(y.shape) == (1, 21, h, w), (h, w)


def _mirror_kernels(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)


@pytest.mark.parametrize(
    ("name", "width"), [("fcn32s", 90), ("fcn16s", 90), ("fcn8s", 90), ("fcn_alexnet", 91)]
)
def test_crops_centre_the_scores_on_the_input(name: str, width: int) -> None:
    # With left-right symmetric kernels the net commutes with mirroring exactly when every
    # crop (19; 5, 27; 5, 9, 31; 18) cuts as much on the left as the pads add. The widths keep
    # every pooling exact: 90 + 198 = 9 * 32 (VGG16); 91 → 71 → 35 → 17 → 8 (AlexNet).
    model = _tiny(name)
    _mirror_kernels(model)
    x = torch.randn(1, 3, 20, width, dtype=torch.float64)
    with torch.inference_mode():
        mirrored, reference = model(x.flip(-1)), model(x).flip(-1)
    torch.testing.assert_close(mirrored, reference, rtol=1e-10, atol=1e-12)


def test_at_once_scales_pool4_and_pool3_before_scoring() -> None:
    seen: dict[str, torch.Tensor] = {}
    for at_once in (False, True):
        model = _tiny("fcn8s", at_once=at_once)
        assert isinstance(model, FCN)
        model.block3.register_forward_hook(lambda m, a, out: seen.update(pool3=out))
        model.block4.register_forward_hook(lambda m, a, out: seen.update(pool4=out))
        model.score_pool3.register_forward_pre_hook(lambda m, a: seen.update(in3=a[0]))
        model.score_pool4.register_forward_pre_hook(lambda m, a: seen.update(in4=a[0]))
        with torch.inference_mode():
            model(torch.randn(1, 3, 40, 50, dtype=torch.float64))
        s4, s3 = (0.01, 1e-4) if at_once else (1.0, 1.0)
        torch.testing.assert_close(seen["in4"], s4 * seen["pool4"], rtol=1e-12, atol=0)
        torch.testing.assert_close(seen["in3"], s3 * seen["pool3"], rtol=1e-12, atol=0)


# --- halo -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "radius"), [("fcn32s", 218), ("fcn8s", 230)])
def test_halo_lies_between_the_rf_radius_and_the_verified_256(name: str, radius: int) -> None:
    # Reference §1: RF radius with the up-sampling 218 (32s) / 230 (8s); exact at 256.
    halo = models.facts(name).halo
    assert halo is not None and radius <= halo <= 256


@pytest.mark.parametrize("name", ALL)
def test_scores_depend_on_pixels_exactly_halo_away(name: str) -> None:
    # The input gradient of a column of scores shows the columns it depends on: over one period
    # of output phases it reaches exactly the declared halo, never further (needed, and tight).
    model = _tiny(name, in_channels=1, num_classes=1)
    halo = model.tiling.halo
    assert halo is not None
    x = torch.randn(1, 1, 8, 2 * halo + 128, dtype=torch.float64, requires_grad=True)
    y = model(x)
    reach = 0
    for j in range(halo + 32, halo + 64):
        (grad,) = torch.autograd.grad(y[0, 0, :, j].sum(), x, retain_graph=True)
        cols = torch.nonzero(grad[0, 0].abs().sum(0)).flatten()
        reach = max(reach, j - int(cols.min()), int(cols.max()) - j)
    assert reach == halo
