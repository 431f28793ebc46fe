"""Tests of the training losses, the class-weighting helpers and the U-Net weight map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tilewise.errors import ConfigError, InputError
from tilewise.losses import (
    CombinedLoss,
    CrossEntropy,
    SoftDice,
    WeightedCrossEntropy,
    build_loss,
    class_pixel_counts,
    median_frequency_weights,
    soft_dice_terms,
    unet_weight_map,
    with_aux,
)


def batch(
    seed: int = 0, n: int = 2, k: int = 3, h: int = 6, w: int = 5, ignore: int | None = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, h, w, generator=generator, dtype=torch.float64)
    target = torch.randint(0, k, (n, h, w), generator=generator)
    if ignore is not None:
        target[torch.rand(n, h, w, generator=generator) < 0.2] = ignore
    return scores, target


# ------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_torch_with_ignore_index() -> None:
    scores, target = batch()
    expected = F.cross_entropy(scores, target, ignore_index=255)
    assert CrossEntropy()(scores, target).item() == pytest.approx(expected.item())


def test_cross_entropy_is_mean_negative_log_probability_by_hand() -> None:
    # One image, two pixels, K = 2: logits (0, 0) -> p = 1/2; logits (log 3, 0) -> p_0 = 3/4.
    scores = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    expected = (-math.log(0.5) - math.log(0.75)) / 2
    assert CrossEntropy()(scores, target).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_normalisations() -> None:
    scores, target = batch(seed=1)
    weights = [0.5, 2.0, 1.0]
    # "weights": sum w * nll / sum w, exactly torch's weighted mean.
    torch_mean = F.cross_entropy(
        scores, target, weight=torch.tensor(weights).double(), ignore_index=255
    )
    by_weights = CrossEntropy(class_weights=weights)(scores, target)
    assert by_weights.item() == pytest.approx(torch_mean.item())
    # "pixels": sum w * nll / count of valid pixels (Caffe's SoftmaxWithLoss).
    valid = target != 255
    nll = F.cross_entropy(scores, target.clamp(max=2), reduction="none")
    w = torch.tensor(weights, dtype=torch.float64)[target.clamp(max=2)]
    expected = (w * nll)[valid].sum() / valid.sum()
    by_pixels = CrossEntropy(class_weights=weights, normalize="pixels")(scores, target)
    assert by_pixels.item() == pytest.approx(expected.item())
    # Scaling every weight changes "pixels" but not "weights".
    scaled = [3 * value for value in weights]
    assert CrossEntropy(class_weights=scaled)(scores, target).item() == pytest.approx(
        by_weights.item()
    )
    assert CrossEntropy(class_weights=scaled, normalize="pixels")(
        scores, target
    ).item() == pytest.approx(3 * by_pixels.item())


def test_all_ignored_gives_zero_that_still_backpropagates() -> None:
    scores, target = batch()
    target[:] = 255
    scores.requires_grad_(True)
    for loss in (
        CrossEntropy(),
        CrossEntropy(class_weights=[1, 2, 3]),
        SoftDice(),
    ):
        value = loss(scores, target)
        assert value.item() == pytest.approx(0.0)
        value.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_loss_inputs_are_checked() -> None:
    scores, target = batch(ignore=None)
    bad_label = target.clone()
    bad_label[0, 0, 0] = 7
    with pytest.raises(InputError, match=r"target labels must lie in \[0, 2\].*got 7"):
        CrossEntropy()(scores, bad_label)
    with pytest.raises(InputError, match="target must be"):
        CrossEntropy()(scores, target[:, :-1])
    with pytest.raises(InputError, match="scores must be"):
        CrossEntropy()(scores[0], target)
    with pytest.raises(InputError, match="integer class indices"):
        CrossEntropy()(scores, target.double())
    with pytest.raises(InputError, match="class_weights has 2 entries"):
        CrossEntropy(class_weights=[1.0, 2.0])(scores, target)
    with pytest.raises(ConfigError, match="non-negative"):
        CrossEntropy(class_weights=[1.0, -2.0, 1.0])


# ------------------------------------------------------------------------- class weights


def test_class_pixel_counts_streams_and_ignores() -> None:
    images = (np.array([[0, 0, 1], [255, 2, 2]], dtype=np.uint8), torch.tensor([1, 1, 1, 255]))
    counts = class_pixel_counts(iter(images), 4, ignore_index=255)
    np.testing.assert_array_equal(counts, [[2, 1, 2, 0], [0, 3, 0, 0]])
    assert counts.dtype == np.int64
    with pytest.raises(InputError, match="labels\\[1\\] holds label 9"):
        class_pixel_counts([np.array([0]), np.array([9])], 4)


def test_median_frequency_weights_by_hand() -> None:
    # Two images with class pixel counts (class 3 never occurs):
    #   image 0: [10, 0, 5, 0]  -> 15 pixels
    #   image 1: [20, 10, 0, 0] -> 30 pixels
    # freq_0 = 30 / (15 + 30) = 2/3 (present in both); freq_1 = 10 / 30 = 1/3 (image 1 only);
    # freq_2 = 5 / 15 = 1/3 (image 0 only). median(2/3, 1/3, 1/3) = 1/3.
    # w = (1/3)/(2/3), (1/3)/(1/3), (1/3)/(1/3), 0 (never seen) = 1/2, 1, 1, 0.
    weights = median_frequency_weights([[10, 0, 5, 0], [20, 10, 0, 0]])
    np.testing.assert_allclose(weights, [0.5, 1.0, 1.0, 0.0])


def test_median_frequency_differs_from_plain_frequency_when_classes_are_local() -> None:
    # A class present in one image only gets its frequency from that image's pixels, not from
    # all pixels: here plain frequencies 1/2, 1/4, 1/4 would give w_1 = w_2 = 1 too, but image 1
    # is all class 0, so freq_0 = 30/40 and freq_1 = freq_2 = 5/20.
    weights = median_frequency_weights([[10, 5, 5], [20, 0, 0]])
    np.testing.assert_allclose(weights, [(1 / 4) / (3 / 4), 1.0, 1.0])


def test_unseen_classes_do_not_shift_the_median() -> None:
    base = median_frequency_weights([[10, 30, 60]])
    padded = median_frequency_weights([[10, 30, 60, 0, 0, 0]])
    np.testing.assert_allclose(padded[:3], base)
    np.testing.assert_array_equal(padded[3:], 0.0)
    np.testing.assert_array_equal(median_frequency_weights(np.zeros((2, 3))), 0.0)


# ------------------------------------------------------------------------- U-Net weight map


def brute_force_weight_map(labels: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The U-Net weight map computed naively: every pixel against every pixel of every cell."""
    height, width = labels.shape
    background = labels == 0
    n_background, total = int(background.sum()), labels.size
    if n_background in (0, total):
        weight = np.ones(labels.shape)
    else:
        weight = np.where(
            background, total / (2 * n_background), total / (2 * (total - n_background))
        )
    cells = [c for c in np.unique(labels) if c != 0]
    if len(cells) < 2:
        return weight
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([ys.ravel(), xs.ravel()], axis=1).astype(float)  # (HW, 2)
    per_cell = []
    for cell in cells:
        members = np.argwhere(labels == cell).astype(float)  # (m, 2)
        distance = np.sqrt(((pixels[:, None, :] - members[None, :, :]) ** 2).sum(-1))
        per_cell.append(distance.min(axis=1))
    nearest_two = np.sort(np.stack(per_cell, axis=1), axis=1)[:, :2]
    border = w0 * np.exp(-(nearest_two.sum(axis=1) ** 2) / (2 * sigma**2))
    return weight + np.where(background.ravel(), border, 0.0).reshape(height, width)


def random_cells(seed: int, shape: tuple[int, int], count: int) -> np.ndarray:
    """Random discs and boxes with distinct, non-contiguous ids; later ones overwrite (touch)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    ids = rng.choice(np.arange(1, 100), size=count, replace=False)
    for cell in ids:
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        radius = rng.uniform(1.5, 6)
        if rng.random() < 0.5:
            labels[(ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2] = cell
        else:
            labels[max(cy - 2, 0) : cy + int(radius), max(cx - 3, 0) : cx + int(radius) + 1] = cell
    return labels


@pytest.mark.parametrize(
    ("seed", "shape", "count", "sigma"),
    [
        (0, (24, 30), 4, 5.0),
        (1, (30, 24), 6, 3.0),
        (2, (48, 48), 7, 1.5),  # cells far apart: margin (10 px) cropping matters
        (3, (20, 20), 1, 5.0),  # one cell: no border term
        (4, (40, 36), 9, 2.0),
    ],
)
def test_unet_weight_map_matches_brute_force(
    seed: int, shape: tuple[int, int], count: int, sigma: float
) -> None:
    labels = random_cells(seed, shape, count)
    fast = unet_weight_map(labels, w0=10.0, sigma=sigma)
    assert fast.dtype == np.float32 and fast.shape == shape
    np.testing.assert_allclose(fast, brute_force_weight_map(labels, 10.0, sigma), atol=1e-5)


def test_unet_weight_map_hand_worked_gap() -> None:
    # Two 3-px-wide cells separated by a 2-px background gap, 5 rows:
    #   cols 0-2 cell 1, cols 3-4 gap, cols 5-7 cell 2.
    # Gap column 3: nearest cell 1 at col 2 (d1 = 1), cell 2 at col 5 (d2 = 2); column 4
    # mirrored: d1 = 1, d2 = 2. So d1 + d2 = 3 in the whole gap.
    # w_c: 10 background of 40 pixels -> w_bg = 40 / (2 * 10) = 2; w_cell = 40 / (2 * 30) = 2/3.
    # Gap: 2 + 10 * exp(-9 / (2 * 25)) = 2 + 10 * exp(-0.18) = 2 + 8.35270... = 10.35270...
    labels = np.zeros((5, 8), dtype=np.int64)
    labels[:, 0:3] = 1
    labels[:, 5:8] = 2
    weights = unet_weight_map(labels)
    np.testing.assert_allclose(weights[:, 3:5], 2 + 10 * math.exp(-0.18), rtol=1e-6)
    np.testing.assert_allclose(weights[:, 3:5], 10.352702, rtol=1e-6)
    np.testing.assert_allclose(weights[:, [0, 1, 2, 5, 6, 7]], 2 / 3, rtol=1e-6)  # no term
    # Given class weights (background, cell) replace the frequency balancing.
    given = unet_weight_map(labels, class_weights=(1.0, 1.0))
    np.testing.assert_allclose(given[:, 3], 1 + 10 * math.exp(-0.18), rtol=1e-6)
    np.testing.assert_allclose(given[:, 0], 1.0)
    # A per-pixel w_c map is used as given.
    w_map = np.arange(40, dtype=float).reshape(5, 8)
    mapped = unet_weight_map(labels, class_weights=w_map)
    np.testing.assert_allclose(
        mapped - w_map, weights - np.where(labels == 0, 2.0, 2 / 3), atol=1e-5
    )


def test_unet_weight_map_fewer_than_two_cells_and_errors() -> None:
    one_cell = np.zeros((6, 6), dtype=np.int64)
    one_cell[2:4, 2:4] = 5
    # 4 cell pixels of 36: w_cell = 36 / 8 = 4.5, w_bg = 36 / 64 = 0.5625; no border term.
    expected = np.where(one_cell > 0, 4.5, 0.5625)
    np.testing.assert_allclose(unet_weight_map(one_cell), expected)
    np.testing.assert_array_equal(unet_weight_map(np.zeros((3, 4), dtype=np.int64)), 1.0)
    with pytest.raises(InputError, match="integer labels"):
        unet_weight_map(np.zeros((3, 3)))
    with pytest.raises(InputError, match="2-D"):
        unet_weight_map(np.zeros((2, 3, 3), dtype=np.int64))
    with pytest.raises(ConfigError, match="pair"):
        unet_weight_map(one_cell, class_weights=[1.0, 2.0, 3.0])


def test_weighted_cross_entropy_with_a_weight_map() -> None:
    scores, target = batch(seed=3)
    valid = target != 255
    nll = F.cross_entropy(scores, target, ignore_index=255, reduction="none")
    weights = torch.rand(target.shape, generator=torch.Generator().manual_seed(0)).double() * 5
    # Default: sum w * nll / |Omega| (the paper's energy per counted pixel).
    expected = (weights * nll)[valid].sum() / valid.sum()
    assert WeightedCrossEntropy()(scores, target, weights).item() == pytest.approx(expected.item())
    by_weights = WeightedCrossEntropy(normalize="weights")(scores, target, weights)
    assert by_weights.item() == pytest.approx(
        ((weights * nll)[valid].sum() / weights[valid].sum()).item()
    )
    # Unit weights give plain cross-entropy.
    ones = torch.ones_like(weights)
    assert WeightedCrossEntropy()(scores, target, ones).item() == pytest.approx(
        CrossEntropy()(scores, target).item()
    )
    with pytest.raises(InputError, match="weights must have"):
        WeightedCrossEntropy()(scores, target, weights[0])


# ------------------------------------------------------------------------- soft Dice

SEED_PREDICTION = torch.tensor(
    [
        [0.01, 0.03, 0.02, 0.02],
        [0.05, 0.12, 0.09, 0.07],
        [0.89, 0.85, 0.88, 0.91],
        [0.99, 0.97, 0.95, 0.97],
    ],
    dtype=torch.float64,
)
SEED_TARGET = torch.tensor([[0.0] * 4, [0.0] * 4, [1.0] * 4, [1.0] * 4], dtype=torch.float64)


def test_soft_dice_terms_reproduce_the_seed_example() -> None:
    # The lecture's |A| = 7.82 is the plain sum of the prediction (the square is "optional").
    intersection, size_a, size_b = soft_dice_terms(SEED_PREDICTION, SEED_TARGET, squared=False)
    assert intersection.item() == pytest.approx(7.41)
    assert size_a.item() == pytest.approx(7.82)
    assert size_b.item() == pytest.approx(8.0)
    # With squares (the formula above it): sum p^2 = 0.0018 + 0.0299 + 3.1171 + 3.7644.
    _, squared_a, squared_b = soft_dice_terms(SEED_PREDICTION, SEED_TARGET)
    assert squared_a.item() == pytest.approx(6.9132)
    assert squared_b.item() == pytest.approx(8.0)


def test_soft_dice_loss_class_term_on_the_seed_example() -> None:
    # Two classes whose class-1 probabilities are the seed matrix: logits log(p / (1 - p)).
    p1 = SEED_PREDICTION
    scores = torch.stack([torch.zeros_like(p1), torch.log(p1 / (1 - p1))])[None]
    target = SEED_TARGET.long()[None]
    dice = SoftDice(eps=1e-12, squared=False).dice_per_class(scores, target)
    assert dice[1].item() == pytest.approx(2 * 7.41 / (7.82 + 8.0))
    # Class 0 is the complement: intersection 8 - 0.41 = 7.59, |A| = 16 - 7.82, |B| = 8.
    assert dice[0].item() == pytest.approx(2 * 7.59 / (8.18 + 8.0))
    loss = SoftDice(eps=1e-12, squared=False)(scores, target)
    assert loss.item() == pytest.approx(1 - (dice[0].item() + dice[1].item()) / 2)
    squared = SoftDice(eps=1e-12)(scores, target)
    expected_1 = 2 * 7.41 / (6.9132 + 8.0)
    sum_p0_sq = float(((1 - p1) ** 2).sum())
    expected_0 = 2 * 7.59 / (sum_p0_sq + 8.0)
    assert squared.item() == pytest.approx(1 - (expected_0 + expected_1) / 2)


def test_soft_dice_absent_class_and_perfect_prediction() -> None:
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1  # classes 0 and 1 present, class 2 absent
    confident = F.one_hot(target, 3).permute(0, 3, 1, 2).double() * 40.0  # p ~ one-hot
    dice = SoftDice().dice_per_class(confident, target)
    # Class 2: sum p^2 ~ 0 and sum g^2 = 0 -> (0 + eps) / (0 + eps) = 1 with eps smoothing.
    np.testing.assert_allclose(dice.numpy(), [1.0, 1.0, 1.0], atol=1e-9)
    assert SoftDice()(confident, target).item() == pytest.approx(0.0, abs=1e-9)
    # Predicting the absent class everywhere costs: Dice_2 = eps / (16 + eps) = 1/17.
    wrong = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    wrong[:, 2] = 40.0
    assert SoftDice().dice_per_class(wrong, target)[2].item() == pytest.approx(1 / 17)


def test_soft_dice_batch_and_per_image_reductions() -> None:
    scores, target = batch(seed=4, ignore=None)
    prob = F.softmax(scores, dim=1)
    truth = F.one_hot(target, 3).permute(0, 3, 1, 2).double()
    eps = 1.0
    inter = (prob * truth).sum((0, 2, 3))
    denominator = (prob**2).sum((0, 2, 3)) + (truth**2).sum((0, 2, 3))
    batch_loss = 1 - ((2 * inter + eps) / (denominator + eps)).mean()
    assert SoftDice()(scores, target).item() == pytest.approx(batch_loss.item())
    inter_i = (prob * truth).sum((2, 3))
    denominator_i = (prob**2).sum((2, 3)) + (truth**2).sum((2, 3))
    image_loss = 1 - ((2 * inter_i + eps) / (denominator_i + eps)).mean()
    assert SoftDice(per_image=True)(scores, target).item() == pytest.approx(image_loss.item())


def test_soft_dice_ignores_ignored_pixels() -> None:
    scores, target = batch(seed=5, ignore=None)
    masked = target.clone()
    masked[:, :, :2] = 255
    cropped = SoftDice()(scores[:, :, :, 2:], target[:, :, 2:])
    assert SoftDice()(scores, masked).item() == pytest.approx(cropped.item())


# ------------------------------------------------------------------------- combinations


def test_combined_loss_and_aux() -> None:
    scores, target = batch(seed=6)
    ce, dice = CrossEntropy(), SoftDice()
    combined = CombinedLoss([(1.0, ce), (0.5, dice)])
    expected = ce(scores, target) + 0.5 * dice(scores, target)
    assert combined(scores, target).item() == pytest.approx(expected.item())

    aux_scores, _ = batch(seed=7)
    value = with_aux(ce, (scores, aux_scores), target, aux_weight=0.4)
    assert value.item() == pytest.approx((ce(scores, target) + 0.4 * ce(aux_scores, target)).item())
    assert with_aux(ce, scores, target).item() == pytest.approx(ce(scores, target).item())
    coarse = aux_scores[:, :, ::2, ::2]
    upsampled = F.interpolate(coarse, size=(6, 5), mode="bilinear", align_corners=False)
    assert with_aux(ce, (scores, coarse), target).item() == pytest.approx(
        (ce(scores, target) + 0.4 * ce(upsampled, target)).item()
    )


def test_combined_loss_passes_weight_maps_on() -> None:
    scores, target = batch(seed=8)
    weights = torch.full(target.shape, 2.0, dtype=torch.float64)
    combined = CombinedLoss([(1.0, WeightedCrossEntropy()), (1.0, SoftDice())])
    expected = WeightedCrossEntropy()(scores, target, weights) + SoftDice()(scores, target)
    assert combined(scores, target, weights).item() == pytest.approx(expected.item())
    nested = CombinedLoss([(2.0, combined)])
    assert nested(scores, target, weights).item() == pytest.approx(2 * expected.item())
    with pytest.raises(InputError, match="needs a per-pixel weight map"):
        combined(scores, target)


def test_gradients_flow_through_every_loss() -> None:
    scores, target = batch(seed=9)
    weights = torch.rand(target.shape, dtype=torch.float64) + 0.5
    losses = {
        "ce": lambda s: CrossEntropy()(s, target),
        "weighted_ce": lambda s: CrossEntropy(class_weights=[1, 2, 3])(s, target),
        "map_ce": lambda s: WeightedCrossEntropy()(s, target, weights),
        "dice": lambda s: SoftDice()(s, target),
        "dice_per_image": lambda s: SoftDice(per_image=True, squared=False)(s, target),
        "sum": lambda s: build_loss(
            {"kind": "sum", "terms": [{"kind": "cross_entropy"}, {"kind": "dice", "weight": 2}]}
        )(s, target),
        "aux": lambda s: with_aux(CrossEntropy(), (s, s * 0.5), target),
    }
    for name, compute in losses.items():
        leaf = scores.clone().requires_grad_(True)
        compute(leaf).backward()
        assert leaf.grad is not None, name
        assert torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().sum() > 0, name
    # The loss gradient matches finite differences (double precision).
    leaf = scores[:1, :, :3, :3].clone().requires_grad_(True)
    small_target = target[:1, :3, :3]
    assert torch.autograd.gradcheck(lambda s: SoftDice()(s, small_target), (leaf,))
    assert torch.autograd.gradcheck(
        lambda s: CrossEntropy(class_weights=[1, 2, 3])(s, small_target), (leaf,)
    )


# ------------------------------------------------------------------------- build_loss


def test_build_loss_kinds() -> None:
    ce = build_loss({"kind": "cross_entropy", "ignore_index": 0, "class_weights": [1, 2]})
    assert isinstance(ce, CrossEntropy) and ce.ignore_index == 0
    assert ce.class_weights is not None and ce.class_weights.tolist() == [1.0, 2.0]
    dice = build_loss({"kind": "dice", "eps": 0.5, "per_image": True})
    assert isinstance(dice, SoftDice) and dice.eps == 0.5 and dice.per_image
    assert isinstance(build_loss({"kind": "weighted_cross_entropy"}), WeightedCrossEntropy)
    total = build_loss(
        {"kind": "sum", "terms": [{"kind": "cross_entropy"}, {"weight": 0.25, "kind": "dice"}]}
    )
    assert isinstance(total, CombinedLoss) and total.weights == [1.0, 0.25]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "dise"}, r"loss\.kind: unknown loss kind 'dise'.*Did you mean 'dice'\?"),
        ({"ignore_index": 255}, r"loss: a loss needs a 'kind'"),
        (
            {"kind": "cross_entropy", "ignore_idx": 3},
            r"loss\.ignore_idx: unknown key.*Did you mean 'ignore_index'\?",
        ),
        (
            {"kind": "sum", "terms": [{"kind": "dice"}, {"kind": "dice", "epsilon": 1}]},
            r"loss\.terms\[1\]\.epsilon: unknown key 'epsilon'",
        ),
        ({"kind": "sum", "terms": []}, r"loss\.terms: a 'sum' loss needs a non-empty list"),
        (
            {"kind": "sum", "terms": [{"kind": "dice", "weight": "big"}]},
            r"loss\.terms\[0\]\.weight: the weight must be a finite number; got 'big'",
        ),
        ({"kind": "dice", "eps": 0}, r"loss: eps must be a positive"),
        ({"kind": "cross_entropy", "normalize": "pixel"}, r"Did you mean 'pixels'\?"),
        ({"kind": "cross_entropy", "ignore_index": "255"}, r"ignore_index must be an integer"),
        ("dice", r"loss: a loss must be a mapping"),
    ],
)
def test_build_loss_errors_say_what_and_where(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_loss(spec)


def test_unet_targets_separate_touching_cells_so_that_components_recover_them() -> None:
    from scipy import ndimage

    from tilewise.losses import unet_targets
    from tilewise.pipeline.instances import ComponentsSource, instances_in_memory

    cells = np.zeros((40, 60), np.int64)
    cells[5:20, 5:20] = 1
    cells[5:20, 20:35] = 2  # touches cell 1 along a column
    cells[20:30, 10:25] = 3  # touches cells 1 and 2 along a row
    cells[25:35, 40:55] = 4  # alone
    labels, weights = unet_targets(cells, {1: 1, 2: 2, 3: 1, 4: 2})
    # The pixels where two cells meet are background; the others keep their cell's class.
    assert (labels[5:20, 19] == 0).all() and (labels[5:20, 20] == 0).all()
    assert (labels[19, 10:25] == 0).all() and (labels[20, 10:25] == 0).all()
    assert labels[10, 10] == 1 and labels[10, 30] == 2 and labels[25, 15] == 1
    assert (labels[25:35, 40:55] == 2).all()
    # Class-agnostic components of the class map are the four cells, each minus its borders.
    components, n = ndimage.label(labels > 0)
    assert n == 4
    for cell in range(1, 5):
        ids = np.unique(components[(cells == cell) & (labels > 0)])
        assert len(ids) == 1
    # The gaps between cells weigh more than the far background (the border term).
    assert weights[10, 19] > 5 * weights[38, 2]
    # And the instance stage turns the class map into the four cells.
    result = instances_in_memory(ComponentsSource(labels, [1, 2]), labels.shape, 32, 16)
    assert int(result.labels.max()) == 4
