"""PSPNet: released parameter counts, 473/713 sizes, the pyramid pooling module, the auxiliary
head, and why no halo is declared."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tilewise import models
from tilewise.models.layers import count_parameters
from tilewise.models.pspnet import PyramidPooling


def _meta(name: str, num_classes: int = 21, **kwargs: object) -> Any:
    with torch.device("meta"):
        return models.create(name, in_channels=3, num_classes=num_classes, **kwargs)


def _tiny(name: str = "pspnet101", **kwargs: object) -> Any:
    torch.manual_seed(0)
    return models.create(name, in_channels=3, num_classes=4, width=1 / 16, **kwargs)


@pytest.mark.parametrize(
    "name, classes, aux, exact",
    [
        ("pspnet101", 21, False, 65_708_501),  # VOC deploy prototxt, the cited "65.7M"
        ("pspnet101", 21, True, 68_073_706),
        ("pspnet101", 19, False, 65_707_475),  # Cityscapes
        ("pspnet50", 150, False, 46_782_550),  # ADE20K
    ],
)
def test_released_parameter_counts(name: str, classes: int, aux: bool, exact: int) -> None:
    assert count_parameters(_meta(name, num_classes=classes, aux=aux)) == exact


def test_widely_cited_count() -> None:
    assert round(count_parameters(_meta("pspnet101", aux=False)) / 1e6, 1) == 65.7


@pytest.mark.parametrize("n, features", [(473, 60), (713, 90)])
def test_output_has_the_input_size(n: int, features: int) -> None:
    model = _meta("pspnet101").eval()
    with torch.device("meta"):
        x = torch.empty(1, 3, n, n)
        assert model.backbone(x)[1].shape[-1] == features
        assert model(x).shape == (1, 21, n, n)


def test_size_rule_leaves_a_feature_pixel_per_finest_bin() -> None:
    rule = models.facts("pspnet101").size_rule
    assert (rule.step, rule.is_valid(473), rule.is_valid(713), rule.is_valid(472)) == (
        8,
        True,
        True,
        False,
    )
    assert (rule.minimum - 1) // 8 + 1 == 6  # features of the smallest input: the 6×6 bins


def _align_corners_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Rows: output pixels; bilinear weights with corners mapped onto corners."""
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_in > 1 else 0.0
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        a[i, i0] += 1 - (src - i0)
        a[i, i1] += src - i0
    return a


def test_pyramid_pooling_matches_caffe_fixed_windows_and_corner_aligned_interp() -> None:
    # On the 60×60 map of a 473 input the prototxt pools with kernel = stride = 60 / bin and its
    # Interp maps corners to corners.
    torch.manual_seed(0)
    ppm = PyramidPooling(3, 2, (1, 2, 3, 6)).eval().double()
    x = torch.randn(1, 3, 60, 60, dtype=torch.float64)
    with torch.no_grad():
        out = ppm(x)
        assert out.shape == (1, 3 + 4 * 2, 60, 60)
        torch.testing.assert_close(out[:, :3], x)
        for k, (b, stage) in enumerate(zip(ppm.bins, ppm.stages, strict=True)):
            pooled = stage(nn.functional.avg_pool2d(x, 60 // b))[0].numpy()
            a = _align_corners_matrix(60, b)
            expected = np.einsum("yi,cij,xj->cyx", a, pooled, a)
            np.testing.assert_allclose(out[0, 3 + 2 * k : 5 + 2 * k].numpy(), expected, atol=1e-12)
    assert ppm.bins == (6, 3, 2, 1)  # the prototxt's concatenation order


def test_auxiliary_head_only_in_training() -> None:
    model = _tiny()
    assert model.aux_weight == 0.4
    x = torch.randn(2, 3, 49, 49)  # batch 2: BN in training mode needs two values per channel
    model.train()
    main, aux = model(x)
    assert main.shape == aux.shape == (2, 4, 49, 49)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, 49, 49)


def test_without_auxiliary_head_training_returns_only_the_scores() -> None:
    model = _tiny(aux=False).train()
    assert model.aux is None and model.aux_weight == 0.0
    assert isinstance(model(torch.randn(2, 3, 41, 41)), torch.Tensor)


def test_no_halo_because_the_global_bin_sees_the_whole_window() -> None:
    f = models.facts("pspnet101")
    assert f.halo is None and not f.equivariant and "global" in f.note
    # Row 0 of the output reads res5 rows 0-1 through conv5_4, i.e. input rows up to 8 + 511 (the
    # backbone's radius); a change 1200 px away reaches it only through the global bin.
    model = _tiny().eval().double()
    x = torch.randn(1, 3, 1201, 41, dtype=torch.float64)
    x2 = x.clone()
    x2[..., -1, :] += 10.0
    with torch.no_grad():
        assert not torch.equal(model(x)[..., 0, :], model(x2)[..., 0, :])
