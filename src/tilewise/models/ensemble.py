"""Ensembles and test-time augmentation as models.

An :class:`Ensemble` averages its members' class probabilities — the EDeconvNet of Noh, Hong and
Han ("Learning Deconvolution Network for Semantic Segmentation", ICCV 2015) is the mean of
DeconvNet's and FCN-8s' output maps. :class:`FlipAverage` averages the probabilities of the image
and its mirror images. Both return the *logarithm* of the averaged probabilities, so the softmax
that the pipeline applies to scores gives back exactly the average, and both are ordinary modules
that tile like any other: their :class:`~tilewise.models.registry.TilingFacts` are derived from
their members' (:func:`ensemble_facts`, :func:`flip_facts`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tilewise.errors import ConfigError
from tilewise.models.layers import center_crop
from tilewise.models.registry import SizeRule, TilingFacts, create, register_model
from tilewise.models.weights import load_state_file

__all__ = [
    "Ensemble",
    "FlipAverage",
    "edeconvnet",
    "ensemble",
    "ensemble_facts",
    "flip_facts",
    "flip_tta",
    "log_probabilities",
    "probabilities",
]

Flip = Literal["horizontal", "vertical"]


def probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (the sigmoid for a single score map)."""
    return torch.sigmoid(scores) if scores.shape[1] == 1 else torch.softmax(scores, dim=1)


def log_probabilities(p: torch.Tensor) -> torch.Tensor:
    """Scores whose softmax (sigmoid for one map) is ``p``: log p, or the logit for one map."""
    tiny = torch.finfo(p.dtype).tiny
    if p.shape[1] == 1:
        q = p.clamp(tiny, 1 - torch.finfo(p.dtype).eps)
        return torch.log(q) - torch.log1p(-q)
    return torch.log(p.clamp_min(tiny))


def _combined_size_rule(rules: Sequence[SizeRule], stride: int) -> SizeRule:
    """The sizes every rule accepts, with a step that is a multiple of ``stride``."""
    step = math.lcm(stride, *(r.step for r in rules))
    start = max(r.minimum for r in rules)
    for n in range(start, start + step):
        if all(r.is_valid(n) for r in rules):
            return SizeRule(n, step)
    raise ConfigError(
        "the members accept no common input size: "
        + ", ".join(f"{r.minimum} + k x {r.step}" for r in rules)
        + ". Combine members whose size rules overlap."
    )


def ensemble_facts(members: Sequence[TilingFacts]) -> TilingFacts:
    """Tiling facts of an average of ``members``.

    Windows must sit on every member's pooling grid (the least common multiple of the strides)
    and be a size every member takes; members of different margins are centre-cropped to the
    largest margin; the ensemble is exact where every member is, with the largest halo.
    """
    stride = math.lcm(*(f.stride for f in members))
    margin = max(f.margin for f in members)
    halos = [f.halo for f in members]
    halo = None if any(h is None for h in halos) else max(h for h in halos if h is not None)
    equivariant = all(f.equivariant for f in members)
    notes = "; ".join(f.note for f in members if f.note)
    return TilingFacts(
        stride=stride,
        margin=margin,
        halo=None if halo is None else max(halo, margin),
        size_rule=_combined_size_rule([f.size_rule for f in members], stride),
        equivariant=equivariant,
        note=notes,
    )


def flip_facts(member: TilingFacts) -> TilingFacts:
    """Tiling facts of flip averaging.

    The mirrored pass pools on a grid anchored at the window's far end, so exactness also needs
    every window to *end* on one phase modulo the stride: the size rule's step becomes a multiple
    of the stride. The halo is the member's (it bounds the context on both sides).
    """
    rule = member.size_rule
    step = math.lcm(rule.step, member.stride)
    return TilingFacts(
        stride=member.stride,
        margin=member.margin,
        halo=member.halo,
        size_rule=SizeRule(rule.minimum, step),
        equivariant=member.equivariant,
        note=member.note,
    )


def _facts_of(model: nn.Module) -> TilingFacts:
    facts = getattr(model, "tiling", None)
    if not isinstance(facts, TilingFacts):
        raise ConfigError(
            f"a {type(model).__name__} has no tiling facts: ensembles and flip averaging take "
            f"registered models (tilewise.models.create) or modules with a `tiling` attribute."
        )
    return facts


class Ensemble(nn.Module):
    """Average of several networks' class probabilities (returned as log-probabilities).

    Args:
        members: networks with the same number of classes, each with ``tiling`` facts.
        weights: relative weight of each member (default: equal).
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if len(members) < 1:
            raise ConfigError("an ensemble needs at least one member; got none.")
        w = [1.0] * len(members) if weights is None else [float(v) for v in weights]
        if len(w) != len(members) or any(v <= 0 for v in w):
            raise ConfigError(
                f"ensemble weights must be one positive number per member ({len(members)}); "
                f"got {list(w)}."
            )
        self.members = nn.ModuleList(members)
        self.member_weights = [v / sum(w) for v in w]
        self.tiling = ensemble_facts([_facts_of(m) for m in members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the weighted mean of the members' probabilities, cropped to a common size."""
        total: torch.Tensor | None = None
        for member, w in zip(self.members, self.member_weights, strict=True):
            scores = member(x)
            if isinstance(scores, tuple):  # an auxiliary head in training mode: main output
                scores = scores[0]
            p = probabilities(scores)
            if total is None:
                total = w * p
            else:
                h = min(p.shape[-2], total.shape[-2])
                wd = min(p.shape[-1], total.shape[-1])
                total = center_crop(total, h, wd) + w * center_crop(p, h, wd)
        assert total is not None
        return log_probabilities(total)


_FLIP_DIMS: dict[str, tuple[int, ...]] = {"horizontal": (-1,), "vertical": (-2,)}


class FlipAverage(nn.Module):
    """Test-time augmentation: the mean probabilities over the image and its mirror images.

    Args:
        member: the network.
        flips: ``("horizontal",)`` (PSPNet's evaluation) or both axes, which averages all four
            combinations of mirrorings.
    """

    def __init__(self, member: nn.Module, flips: Sequence[Flip] = ("horizontal",)) -> None:
        super().__init__()
        unknown = [f for f in flips if f not in _FLIP_DIMS]
        if unknown or not flips:
            raise ConfigError(f"flips must name 'horizontal' and/or 'vertical'; got {list(flips)}.")
        self.member = member
        dims: list[tuple[int, ...]] = [()]
        for f in dict.fromkeys(flips):
            dims += [d + _FLIP_DIMS[f] for d in dims]
        self.dims = dims
        self.tiling = flip_facts(_facts_of(member))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean probabilities of ``member`` over the mirrorings."""
        total = torch.zeros(())
        for d in self.dims:
            xi = x.flip(d) if d else x
            scores = self.member(xi)
            if isinstance(scores, tuple):
                scores = scores[0]
            p = probabilities(scores)
            total = total + (p.flip(d) if d else p)
        return log_probabilities(total / len(self.dims))


def _member(spec: Mapping[str, Any], in_channels: int, num_classes: int, where: str) -> nn.Module:
    """Build one member from ``{"arch": ..., "args": {...}, "weights": path}``."""
    if not isinstance(spec, Mapping) or "arch" not in spec:
        raise ConfigError(
            f"{where} must be a mapping with an 'arch' (and optional 'args', 'weights'); "
            f"got {spec!r}."
        )
    extra = set(spec) - {"arch", "args", "weights", "weight"}
    if extra:
        raise ConfigError(
            f"{where} has unknown keys {sorted(extra)}; it takes arch, args, weights, weight."
        )
    model = create(
        str(spec["arch"]),
        in_channels=in_channels,
        num_classes=num_classes,
        **dict(spec.get("args") or {}),
    )
    if spec.get("weights"):
        location = str(spec["weights"])
        first = next(iter(model.parameters()), None)
        if first is not None and first.is_meta:
            # Shapes only (facts, parameter counts): check the file is there, load nothing.
            if "://" not in location and not Path(location).exists():
                raise ConfigError(f"{where}.weights '{location}' does not exist.")
            return model
        state = load_state_file(location, what=f"{where}.weights")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = " ".join(str(exc).strip().splitlines()[0:2])
            raise ConfigError(
                f"{where}.weights '{location}' do not fit arch '{spec['arch']}': {lines}"
            ) from None
    return model


_EDECONVNET = ({"arch": "deconvnet"}, {"arch": "fcn8s"})


@register_model(
    family="ensemble",
    paper="Noh, Hong, Han, ICCV 2015 (ensemble of the members' probabilities)",
    tiny={
        "members": [
            {"arch": "unet", "args": {"depth": 2, "base_width": 2}},
            {"arch": "unet_same", "args": {"depth": 3, "base_width": 2}, "weight": 2.0},
        ]
    },
)
def ensemble(
    in_channels: int,
    num_classes: int,
    *,
    members: Sequence[Mapping[str, Any]] = _EDECONVNET,
) -> Ensemble:
    """Mean of several networks' probabilities; members: [{arch, args, weights, weight}]."""
    built = [_member(m, in_channels, num_classes, f"members[{i}]") for i, m in enumerate(members)]
    weights = [float(m.get("weight", 1.0)) for m in members]
    return Ensemble(built, weights)


@register_model(
    family="ensemble",
    paper="Noh, Hong, Han, ICCV 2015 (EDeconvNet)",
    tiny={"width": 1 / 32},
)
def edeconvnet(in_channels: int, num_classes: int, *, width: float = 1.0) -> Ensemble:
    """EDeconvNet: the mean of DeconvNet's and FCN-8s' probabilities (the paper's ensemble)."""
    return Ensemble(
        [
            create("deconvnet", in_channels=in_channels, num_classes=num_classes, width=width),
            create("fcn8s", in_channels=in_channels, num_classes=num_classes, width=width),
        ]
    )


@register_model(
    family="ensemble",
    paper="test-time augmentation (flip averaging, as in PSPNet's evaluation)",
    tiny={"member": {"arch": "unet", "args": {"depth": 2, "base_width": 2}}},
)
def flip_tta(
    in_channels: int,
    num_classes: int,
    *,
    member: Mapping[str, Any] = {"arch": "unet"},
    flips: Sequence[Flip] = ("horizontal",),
) -> FlipAverage:
    """Flip averaging of one network: mean probabilities over the mirrored images."""
    return FlipAverage(_member(member, in_channels, num_classes, "member"), flips)
