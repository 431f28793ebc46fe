"""The overlap-tile engine against independent whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tilewise
from tests.reference import PoolNet, whole_image
from tilewise import models
from tilewise.errors import InputError, PlanError

TOL = 1e-5  # float32: window shapes change the conv kernels' summation order, nothing more


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, in_channels=3, num_classes=3, depth=2, base_width=4)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, h, w)).astype(np.float32)


@pytest.mark.parametrize("name", ["unet", "unet_same"])
@pytest.mark.parametrize(
    "shape",
    [(83, 101), (9, 13), (64, 64), (130, 37)],
    ids=["odd", "smaller-than-a-tile", "one-tile", "tall"],
)
def test_registered_unet_tiles_equal_whole_image_inference(
    name: str, shape: tuple[int, int]
) -> None:
    model = _tiny(name)
    image = _image(*shape)
    tiled = tilewise.predict_array(model, image, tile=32, batch_size=3, unit=48)
    expected = whole_image(model, image, model.tiling)
    assert tiled.shape == (3, *shape)
    assert np.abs(tiled - expected).max() < TOL


@pytest.mark.parametrize(("batch_size", "expected"), [(None, {1}), (3, {3, 1})])
def test_predict_array_forwards_one_window_at_a_time_on_the_cpu_by_default(
    batch_size: int | None, expected: set[int]
) -> None:
    """On the CPU a batch runs no faster per window and holds every window's activations."""
    model = _tiny("unet_same")
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        # 2 x 2 tiles of 32 px in one unit: 4 windows.
        tiled = tilewise.predict_array(
            model, _image(64, 64), tile=32, batch_size=batch_size, device="cpu"
        )
    finally:
        hook.remove()
    assert sum(seen) == 4 and set(seen) == expected
    assert np.abs(tiled - whole_image(model, _image(64, 64), model.tiling)).max() < TOL


@pytest.mark.parametrize("pools", [2, 3], ids=["stride4", "stride8"])
def test_user_module_with_pooling_tiles_equal_whole_image_inference(pools: int) -> None:
    torch.manual_seed(1)
    net = PoolNet(pools=pools)
    image = _image(77, 90, seed=2)
    stride = 2**pools
    tiled = tilewise.predict_array(net, image, tile=4 * stride, halo=net.halo(), stride=stride)
    facts = models.TilingFacts(stride, 0, net.halo(), models.SizeRule(stride, stride))
    assert np.abs(tiled - whole_image(net, image, facts)).max() < TOL


def test_too_small_a_halo_is_not_exact_which_is_why_it_is_refused() -> None:
    # The check is real: with less context than the receptive field the tiles differ.
    torch.manual_seed(1)
    net = PoolNet(pools=2)
    image = _image(64, 64, seed=3)
    facts = models.TilingFacts(4, 0, net.halo(), models.SizeRule(4, 4))
    short = tilewise.predict_array(net, image, tile=16, halo=2, stride=4, stitch="blend")
    assert np.abs(short - whole_image(net, image, facts)).max() > 1e-3


def test_misaligned_windows_are_not_exact() -> None:
    # Declaring stride 1 for a stride-4 net puts windows off its pooling grid: the result
    # differs, which is why the engine keeps every origin on the declared stride.
    torch.manual_seed(1)
    net = PoolNet(pools=2)
    image = _image(60, 60, seed=4)
    facts = models.TilingFacts(4, 0, net.halo(), models.SizeRule(4, 4))
    off_grid = tilewise.predict_array(net, image, tile=18, halo=net.halo(), stride=1)
    assert np.abs(off_grid - whole_image(net, image, facts)).max() > 1e-3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(1, 120),
    w=st.integers(1, 120),
    tile_steps=st.integers(8, 14),
    extra_halo=st.integers(0, 9),
    unit=st.integers(10, 130),
    name=st.sampled_from(["unet", "unet_same"]),
    pad_mode=st.sampled_from(["reflect", "symmetric", "constant"]),
)
def test_property_tiled_equals_whole_image(
    h: int, w: int, tile_steps: int, extra_halo: int, unit: int, name: str, pad_mode: str
) -> None:
    model = _tiny(name)
    facts = model.tiling
    image = _image(h, w, seed=h * 1000 + w)
    tile = facts.stride * tile_steps
    halo = facts.halo + extra_halo
    tiled = tilewise.predict_array(
        model, image, tile=tile, halo=halo, unit=unit, pad_mode=pad_mode, pad_value=0.5
    )
    expected = whole_image(model, image, facts, pad_mode=pad_mode, pad_value=0.5)
    assert np.abs(tiled - expected).max() < TOL


class Crop(nn.Module):
    """Identity of a valid-convolution net: drops `margin` pixels per side."""

    def __init__(self, margin: int) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        return x[..., m : x.shape[-2] - m, m : x.shape[-1] - m] if m else x


@pytest.mark.parametrize("pad_mode", ["reflect", "symmetric", "constant"])
@pytest.mark.parametrize("margin", [0, 7])
@pytest.mark.parametrize("stitch", ["crop", "blend"])
def test_identity_model_returns_the_input_bit_for_bit(
    pad_mode: str, margin: int, stitch: str
) -> None:
    image = _image(45, 70, seed=5)
    out = tilewise.predict_array(
        Crop(margin),
        image,
        tile=16,
        halo=margin + 5,
        margin=margin,
        pad_mode=pad_mode,
        stitch=stitch,
        unit=24,
    )
    if stitch == "crop":
        assert np.array_equal(out, image)
    else:  # weights sum to one, so the identity survives up to float rounding
        assert np.abs(out - image).max() < 1e-6


def test_blend_of_a_constant_model_is_that_constant_everywhere_including_corners() -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x[:, :2], 3.25)

    out = tilewise.predict_array(Constant(), _image(50, 61), tile=16, halo=6, stitch="blend")
    assert np.abs(out - 3.25).max() < 1e-6


def test_blend_does_not_depend_on_the_unit_cut() -> None:
    model = _tiny("unet_same")
    image = _image(90, 70)
    a = tilewise.predict_array(model, image, tile=32, halo=30, stitch="blend", unit=32)
    b = tilewise.predict_array(model, image, tile=32, halo=30, stitch="blend", unit=200)
    assert np.abs(a - b).max() < TOL


def test_zarr_input_gives_the_same_result_as_numpy(tmp_path) -> None:
    image = _image(70, 50)
    arr = zarr.create_array(tmp_path / "x.zarr", shape=image.shape, chunks=(3, 32, 32), dtype="f4")
    arr[:] = image
    model = _tiny("unet")
    assert np.array_equal(
        tilewise.predict_array(model, arr, tile=32), tilewise.predict_array(model, image, tile=32)
    )


def test_predict_array_restores_training_mode() -> None:
    model = _tiny("unet").train()
    tilewise.predict_array(model, _image(20, 20), tile=32)
    assert model.training


def test_a_plain_module_needs_a_halo() -> None:
    with pytest.raises(PlanError, match="halo is required"):
        tilewise.predict_array(nn.Conv2d(3, 2, 3, padding=1), _image(10, 10), tile=8)


def test_a_two_dimensional_image_is_refused_with_the_fix() -> None:
    with pytest.raises(InputError, match=r"\(C, H, W\).*image\[None\]"):
        tilewise.predict_array(_tiny("unet"), np.zeros((20, 20), np.float32), tile=32)


def test_a_wrong_margin_is_reported_not_silently_misplaced() -> None:
    with pytest.raises(PlanError, match="margin"):
        tilewise.predict_array(Crop(3), _image(20, 20), tile=8, halo=4, margin=2)


def test_stride_contradicting_a_registered_model_is_refused() -> None:
    with pytest.raises(PlanError, match="contradicts"):
        tilewise.predict_array(_tiny("unet"), _image(20, 20), tile=32, stride=8)
