"""Ensembles and flip averaging against direct computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tilewise import models
from tilewise.errors import ConfigError
from tilewise.models.ensemble import Ensemble, FlipAverage, ensemble_facts, flip_facts
from tilewise.models.layers import count_parameters
from tilewise.models.registry import SizeRule, TilingFacts


def _unet(seed: int, **args: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create("unet_same", in_channels=3, num_classes=4, depth=2, base_width=3, **args)


def test_ensemble_is_the_weighted_mean_of_the_members_probabilities() -> None:
    a, b = _unet(1).eval(), _unet(2).eval()
    ens = Ensemble([a, b], weights=[1.0, 3.0]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = 0.25 * torch.softmax(a(x), 1) + 0.75 * torch.softmax(b(x), 1)
        got = torch.softmax(ens(x), 1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_members_of_different_margins_are_centre_cropped_to_the_smallest_output() -> None:
    torch.manual_seed(0)
    valid = models.create("unet", in_channels=3, num_classes=2, depth=2, base_width=2).eval()
    same = models.create("unet_same", in_channels=3, num_classes=2, depth=2, base_width=2).eval()
    ens = Ensemble([same, valid]).eval()
    f = ens.tiling
    n = f.size_rule.ceil(64)
    x = torch.randn(1, 3, n, n)
    with torch.inference_mode():
        out = torch.softmax(ens(x), 1)
        m = f.margin
        expected = 0.5 * torch.softmax(same(x), 1)[..., m : n - m, m : n - m]
        expected = expected + 0.5 * torch.softmax(valid(x), 1)
    assert f.margin == valid.tiling.margin
    assert torch.allclose(out, expected, atol=1e-6)


def test_ensemble_facts_combine_the_members() -> None:
    a = TilingFacts(16, 92, 92, SizeRule(188, 16))
    b = TilingFacts(32, 0, 256, SizeRule(1, 1))
    c = TilingFacts(8, 0, None, SizeRule(4, 8), equivariant=False, note="global pooling")
    f = ensemble_facts([a, b])
    assert (f.stride, f.margin, f.halo, f.equivariant) == (32, 92, 256, True)
    assert f.size_rule.step == 32 and a.size_rule.is_valid(f.size_rule.minimum)
    g = ensemble_facts([a, c])
    assert g.halo is None and not g.exact and "global pooling" in g.note
    # U-Net takes 188 + 16k, a PSPNet-like net 9 + 8k: no size fits both.
    with pytest.raises(ConfigError, match="no common input size"):
        ensemble_facts([a, TilingFacts(8, 0, None, SizeRule(9, 8), False, "global")])


def test_flip_facts_put_window_ends_on_the_stride() -> None:
    f = flip_facts(TilingFacts(32, 0, 256, SizeRule(1, 1)))
    assert f.size_rule == SizeRule(1, 32) and f.halo == 256


def test_flip_average_is_mirror_symmetric_and_matches_the_direct_mean() -> None:
    net = _unet(4).eval()
    tta = FlipAverage(net, flips=("horizontal", "vertical")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        out = tta(x)
        mirrored = tta(x.flip(-1)).flip(-1)
        p = [
            torch.softmax(net(x), 1),
            torch.softmax(net(x.flip(-1)), 1).flip(-1),
            torch.softmax(net(x.flip(-2)), 1).flip(-2),
            torch.softmax(net(x.flip(-2, -1)), 1).flip(-2, -1),
        ]
    assert torch.allclose(torch.softmax(out, 1), sum(p) / 4, atol=1e-6)
    assert torch.allclose(out, mirrored, atol=1e-5)
    # The network alone is not mirror symmetric, so the check above can fail.
    with torch.inference_mode():
        assert not torch.allclose(net(x), net(x.flip(-1)).flip(-1), atol=1e-3)


def test_edeconvnet_is_deconvnet_plus_fcn8s() -> None:
    with torch.device("meta"):
        e = models.create("edeconvnet", in_channels=3, num_classes=21)
        d = models.create("deconvnet", in_channels=3, num_classes=21)
        f = models.create("fcn8s", in_channels=3, num_classes=21)
    assert count_parameters(e) == count_parameters(d) + count_parameters(f)
    assert e.tiling.stride == 32


def test_members_load_their_own_weights(tmp_path: Path) -> None:
    trained = _unet(5)
    path = tmp_path / "member.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    args = {"depth": 2, "base_width": 3}
    ens = models.create(
        "ensemble",
        in_channels=3,
        num_classes=4,
        members=[{"arch": "unet_same", "args": args, "weights": str(path)}],
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(torch.softmax(ens(x), 1), torch.softmax(trained.eval()(x), 1))


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([], "at least one member"),
        ([{"args": {}}], r"members\[0\] must be a mapping with an 'arch'"),
        ([{"arch": "unet", "wieghts": "x"}], "unknown keys"),
        ([{"arch": "unet", "weights": "/nonexistent.safetensors"}], "does not exist"),
    ],
)
def test_bad_members_are_clear_errors(members: list[dict[str, object]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        models.create("ensemble", in_channels=3, num_classes=2, members=members)
