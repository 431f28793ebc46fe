"""stitch: sliding — PSPNet's own sliding-window evaluation — against a direct implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilewise
from tests.reference import GlobalContextNet, sliding_window_reference
from tilewise.errors import PlanError
from tilewise.models import SizeRule, TilingFacts
from tilewise.pipeline.geometry import SlidingAxis, check_sliding


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _net() -> GlobalContextNet:
    torch.manual_seed(3)
    net = GlobalContextNet().double()
    # Declared facts: global pooling, so no halo makes it exact.
    net.tiling = TilingFacts(  # type: ignore[assignment]
        stride=1, margin=0, halo=None, size_rule=SizeRule(1, 1), equivariant=False, note="global"
    )
    return net


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
@pytest.mark.parametrize(
    "shape", [(70, 95), (20, 31), (40, 70)], ids=["larger", "smaller-than-crop", "one-axis-small"]
)
def test_sliding_equals_the_papers_protocol(flip: bool, shape: tuple[int, int]) -> None:
    net = _net()
    image = np.random.default_rng(1).standard_normal((3, *shape))
    crop = 45
    scores = tilewise.predict_array(
        net,
        image,
        tile=crop,
        stitch="sliding",
        flip=flip,
        pad_mode="constant",
        device="cpu",
        unit=32,  # units cut across windows: the windows must not depend on the cut
    )
    expected = sliding_window_reference(net, image, crop=crop, stride=30, flip=flip)
    assert np.abs(_softmax(scores) - expected).max() < 1e-5


def test_sliding_is_not_the_same_as_blend_for_a_global_model() -> None:
    # The check has teeth: another stitching of the same net gives other probabilities.
    net = _net()
    image = np.random.default_rng(1).standard_normal((3, 70, 95))
    expected = sliding_window_reference(net, image, crop=45, stride=30, flip=False)
    blend = tilewise.predict_array(net, image, tile=45, halo=10, stitch="blend", device="cpu")
    assert np.abs(_softmax(blend) - expected).max() > 1e-3


def test_window_placement_follows_scale_process() -> None:
    # H = 1000, crop 473, stride ceil(2/3 * 473) = 316: ceil((1000 - 473) / 316) + 1 = 3 windows
    # at 0, 316 and 1000 - 473 = 527 (the last moved back to end at the border).
    facts = TilingFacts(8, 0, None, SizeRule(9, 8), equivariant=False, note="global")
    step = check_sliding(facts, tile=473, halo=None, step=None, arch="pspnet101")
    assert step == 316
    axis = SlidingAxis(1000, 473, step, 0)
    assert [axis.support(k) for k in range(axis.cores)] == [(0, 473), (316, 789), (527, 1000)]


def test_sliding_window_must_be_a_size_the_network_takes() -> None:
    facts = TilingFacts(8, 0, None, SizeRule(9, 8), equivariant=False, note="global")
    with pytest.raises(PlanError, match=r"Use tile: 465 or 473"):
        check_sliding(facts, tile=470, halo=None, step=None, arch="pspnet101")
    with pytest.raises(PlanError, match="halo has no meaning"):
        check_sliding(facts, tile=473, halo=32, step=None, arch="pspnet101")
    with pytest.raises(PlanError, match="step must be between"):
        check_sliding(facts, tile=473, halo=None, step=500, arch="pspnet101")


@pytest.mark.parametrize("size", [1, 44, 45, 46, 70, 150, 151, 199])
def test_units_see_exactly_the_windows_that_touch_them(size: int) -> None:
    # Brute force over every unit cut: the windows of a unit are those whose output overlaps it,
    # including the last window, which is moved back to end at the border.
    axis = SlidingAxis(size, 45, 30, 0)
    for side in (1, 7, 16, 48):
        for u0 in range(0, size, side):
            u1 = min(size, u0 + side)
            touching = [
                k for k in range(axis.cores) if axis.support(k)[0] < u1 and axis.support(k)[1] > u0
            ]
            assert list(axis.windows_for(u0, u1)) == touching, (size, side, u0)
