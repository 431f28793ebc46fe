"""Registry-driven tests: every registered architecture is built, run and tiled.

A new architecture is tested the moment it is registered. Each entry's ``tiny`` arguments shrink
its widths (never the layer structure that fixes stride and halo, unless the builder computes the
halo from that structure), so every check runs on a CPU in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilewise
from tests.reference import whole_image
from tilewise import models
from tilewise.errors import ConfigError, PlanError
from tilewise.models.registry import TilingFacts

NAMES = models.names()
EQUIVARIANT = [n for n in NAMES if models.facts(n, **models.entry(n).tiny).exact]
NOT_EXACT = [n for n in NAMES if n not in EQUIVARIANT]

# Tiled (float32 output) against whole-image inference (float64 network), relative to the
# largest score. The engine returns float32, so 1e-5 is the resolution of the comparison.
TOLERANCE: dict[str, float] = {}
DEFAULT_TOLERANCE = 1e-5


def _tiny(name: str, in_channels: int = 3, num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create(
        name, in_channels=in_channels, num_classes=num_classes, **models.entry(name).tiny
    )
    return model.eval()


def test_every_family_is_registered() -> None:
    families = {models.entry(n).family for n in NAMES}
    expected = {
        "fcn",
        "deconvnet",
        "segnet",
        "unet",
        "fc-densenet",
        "dilation",
        "deeplab",
        "pspnet",
        "fusionnet",
        "ensemble",
    }
    assert expected <= families, f"missing families: {expected - families}"


@pytest.mark.parametrize("name", NAMES)
def test_entry_is_documented(name: str) -> None:
    e = models.entry(name)
    assert e.summary, f"{name}: the builder needs a docstring (its first line is the summary)"
    assert e.paper
    assert set(e.tiny) <= set(e.arg_names()), f"{name}: tiny names unknown arguments"


@pytest.mark.parametrize("name", NAMES)
def test_facts_are_consistent(name: str) -> None:
    f = models.facts(name)
    assert isinstance(f, TilingFacts)
    assert f.stride >= 1 and f.margin >= 0
    assert f.size_rule.step % f.stride == 0 or f.stride % f.size_rule.step == 0
    if f.halo is not None:
        assert f.halo >= f.margin
    if not f.exact:
        assert f.note, f"{name}: a model that cannot be tiled exactly must say why"
    # The tiny variant keeps the stride and margin (the geometry) of the full network; an
    # ensemble's geometry is its members', which are its arguments.
    if models.entry(name).family != "ensemble":
        t = models.facts(name, **models.entry(name).tiny)
        assert (t.stride, t.margin, t.size_rule) == (f.stride, f.margin, f.size_rule)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bands", [4, 13], ids=["4-band", "13-band"])
def test_any_band_count_and_class_count(name: str, bands: int) -> None:
    model = _tiny(name, in_channels=bands, num_classes=5)
    f: TilingFacts = model.tiling
    n = f.size_rule.ceil(max(f.size_rule.minimum, 2 * f.margin + 1))
    with torch.inference_mode():
        y = model(torch.randn(1, bands, n, n))
    out = n - 2 * f.margin
    assert tuple(y.shape) == (1, 5, out, out)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_inference_is_deterministic_in_eval_mode(name: str) -> None:
    # BatchNorm on running statistics and drop-out off: two passes agree exactly, and a sample
    # does not depend on the rest of its batch.
    model = _tiny(name)
    f: TilingFacts = model.tiling
    n = f.size_rule.ceil(2 * f.margin + 2 * f.stride)
    x = torch.randn(2, 3, n, n)
    with torch.inference_mode():
        a = model(x)
        b = model(x[:1])
    # Batch statistics would change the scores by O(1); other batch sizes only change the
    # summation order of the convolutions (float32).
    scale = float(a.abs().max())
    assert torch.allclose(a[:1], b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", EQUIVARIANT)
def test_tiled_equals_whole_image_inference(name: str) -> None:
    model = _tiny(name).double()
    f: TilingFacts = model.tiling
    assert f.halo is not None
    tile = max(2 * f.stride, -(-f.halo // f.stride) * f.stride)
    h, w = tile + tile // 2 + 3, 2 * tile + 5  # several windows, ragged image edges
    image = np.random.default_rng(0).standard_normal((3, h, w))
    tiled = tilewise.predict_array(model, image, tile=tile, batch_size=2, device="cpu")
    expected = whole_image(model, image, f)
    assert tiled.shape == expected.shape == (3, h, w)
    # The comparison has teeth only if the scores vary across the image (a freshly initialised
    # net can output nearly constant scores, which any tiling reproduces).
    spread = float((expected - expected.mean(axis=(1, 2), keepdims=True)).std())
    assert spread > 1e-3 * np.abs(expected).max(), f"{name}: scores nearly constant ({spread:.1e})"
    err = np.abs(tiled - expected).max() / np.abs(expected).max()
    assert err < TOLERANCE.get(name, DEFAULT_TOLERANCE), f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", NOT_EXACT)
def test_crop_is_refused_with_the_fix_for_a_model_that_cannot_tile_exactly(name: str) -> None:
    model = _tiny(name)
    f: TilingFacts = model.tiling
    image = np.zeros((3, 2 * f.stride, 2 * f.stride), np.float32)
    with pytest.raises(PlanError, match=r"blend|halo"):
        tilewise.predict_array(model, image, tile=f.stride, stitch="crop", device="cpu")


def test_unknown_argument_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown argument 'widht'.*width"):
        models.create("fcn8s", in_channels=3, num_classes=2, widht=0.5)
