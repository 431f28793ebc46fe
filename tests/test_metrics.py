"""Tests of the streamable confusion matrix and the FCN paper's metrics."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tilewise.errors import InputError
from tilewise.metrics import ConfusionMatrix


def brute_force_counts(
    pred: np.ndarray, target: np.ndarray, k: int, ignore: int | None
) -> np.ndarray:
    """The confusion matrix by plain Python loops, one pixel at a time."""
    counts = [[0] * k for _ in range(k)]
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if ignore is not None and t == ignore:
            continue
        counts[t][p] += 1
    return np.array(counts, dtype=np.int64)


def random_pair(
    rng: np.random.Generator, shape: tuple[int, ...], k: int, ignore: int | None
) -> tuple[np.ndarray, np.ndarray]:
    target = rng.integers(0, k, shape)
    if ignore is not None:
        target[rng.random(shape) < 0.1] = ignore
    # Where the truth is ignored the prediction copies it (255, out of range) in about 60% of the
    # pixels: those must be skipped, not rejected.
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, k, shape))
    return pred, target


# ------------------------------------------------------------------------- counting


@pytest.mark.parametrize(("k", "ignore"), [(2, None), (5, 255), (7, 3)])
def test_matches_brute_force_loops(k: int, ignore: int | None) -> None:
    rng = np.random.default_rng(k)
    pred, target = random_pair(rng, (23, 31), k, ignore)
    matrix = ConfusionMatrix(k, ignore_index=ignore).update(pred, target)
    np.testing.assert_array_equal(matrix.counts, brute_force_counts(pred, target, k, ignore))
    assert matrix.counts.dtype == np.int64


def test_rows_are_truth_and_columns_prediction() -> None:
    matrix = ConfusionMatrix(3).update(np.array([2]), np.array([0]))  # truth 0 predicted as 2
    assert matrix.counts[0, 2] == 1
    assert matrix.total == 1


@pytest.mark.parametrize("seed", range(5))
def test_streaming_over_random_tiles_equals_one_shot(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, ignore = 6, 255
    pred, target = random_pair(rng, (64, 80), k, ignore)
    one_shot = ConfusionMatrix(k, ignore).update(pred, target)

    # Random rectangular tiling of the image: random row and column cuts.
    row_cuts = np.sort(rng.choice(np.arange(1, 64), size=rng.integers(0, 6), replace=False))
    col_cuts = np.sort(rng.choice(np.arange(1, 80), size=rng.integers(0, 6), replace=False))
    tiles = [
        (rows, cols)
        for rows in np.split(np.arange(64), row_cuts)
        for cols in np.split(np.arange(80), col_cuts)
    ]
    order = rng.permutation(len(tiles))
    sequential = ConfusionMatrix(k, ignore)
    workers = [ConfusionMatrix(k, ignore) for _ in range(3)]
    for step, index in enumerate(order):
        rows, cols = tiles[index]
        tile_pred, tile_target = pred[np.ix_(rows, cols)], target[np.ix_(rows, cols)]
        sequential.update(tile_pred, tile_target)
        workers[step % 3].update(tile_pred, tile_target)

    assert sequential == one_shot
    merged = workers[0] + workers[1] + workers[2]
    assert merged == one_shot
    in_place = ConfusionMatrix(k, ignore)
    for worker in reversed(workers):  # merge order does not matter
        in_place.merge(ConfusionMatrix.from_dict(json.loads(json.dumps(worker.to_dict()))))
    assert in_place == one_shot


def test_accepts_torch_tensors_and_any_shape() -> None:
    rng = np.random.default_rng(1)
    pred, target = random_pair(rng, (2, 3, 5, 7), 4, None)
    from_numpy = ConfusionMatrix(4).update(pred, target)
    from_torch = ConfusionMatrix(4).update(torch.from_numpy(pred), torch.from_numpy(target))
    assert from_torch == from_numpy
    assert from_numpy.total == pred.size


def test_narrow_label_dtypes_do_not_overflow_the_pair_index() -> None:
    # K * t + p = 20 * 19 + 19 = 399 does not fit in uint8.
    target = np.array([19, 19, 0], dtype=np.uint8)
    pred = np.array([19, 0, 19], dtype=np.uint8)
    counts = ConfusionMatrix(20).update(pred, target).counts
    assert counts[19, 19] == 1 and counts[19, 0] == 1 and counts[0, 19] == 1
    assert counts.sum() == 3


def test_ignored_truth_pixels_are_skipped_whatever_their_prediction() -> None:
    target = np.array([255, 255, 1])
    pred = np.array([0, 1, 1])
    matrix = ConfusionMatrix(2, ignore_index=255).update(pred, target)
    assert matrix.total == 1 and matrix.counts[1, 1] == 1


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        ([0, 3], [0, 1], "pred holds label 3"),
        ([0, -1], [0, 1], "pred holds label -1"),
        ([0, 1], [0, 3], "target holds label 3"),
        ([0, 1], [0, 255], "target holds label 255"),  # no ignore_index set
    ],
)
def test_out_of_range_labels_are_rejected(pred: list[int], target: list[int], message: str) -> None:
    with pytest.raises(InputError, match=message):
        ConfusionMatrix(3).update(np.array(pred), np.array(target))


def test_bad_inputs_are_rejected_clearly() -> None:
    with pytest.raises(InputError, match="integer class labels"):
        ConfusionMatrix(3).update(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(InputError, match="one shape"):
        ConfusionMatrix(3).update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(InputError, match="merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))
    with pytest.raises(InputError, match="2 x 2"):
        ConfusionMatrix.from_dict({"num_classes": 2, "counts": [[1, 2, 3]]})
    with pytest.raises(InputError, match="2 x 2"):
        ConfusionMatrix.from_dict({"num_classes": 2, "counts": [[1, -2], [0, 0]]})
    with pytest.raises(InputError, match="needs 'num_classes'"):
        ConfusionMatrix.from_dict({"counts": [[1]]})


# ------------------------------------------------------------------------- metrics


def test_hand_worked_metrics() -> None:
    # truth 0 0 0 0 1 1 1 2 2 2
    # pred  0 0 0 1 1 1 2 2 2 0
    # n = [[3, 1, 0],    t = row sums    = [4, 3, 3]
    #      [0, 2, 1],    s = column sums = [4, 3, 3]
    #      [1, 0, 2]]    n_ii            = [3, 2, 2]
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    matrix = ConfusionMatrix(3).update(pred, truth)
    np.testing.assert_array_equal(matrix.counts, [[3, 1, 0], [0, 2, 1], [1, 0, 2]])
    # pixel accuracy = (3 + 2 + 2) / 10
    assert matrix.pixel_accuracy() == pytest.approx(0.7)
    # mean accuracy = (3/4 + 2/3 + 2/3) / 3 = (25/12) / 3 = 25/36
    assert matrix.mean_accuracy() == pytest.approx(25 / 36)
    # IU_i = n_ii / (t_i + s_i - n_ii) = 3/(4+4-3), 2/(3+3-2), 2/(3+3-2) = 3/5, 1/2, 1/2
    np.testing.assert_allclose(matrix.iou_per_class(), [0.6, 0.5, 0.5])
    # mean IU = (3/5 + 1/2 + 1/2) / 3 = 8/15
    assert matrix.mean_iou() == pytest.approx(8 / 15)
    # f.w. IU = (4 * 3/5 + 3 * 1/2 + 3 * 1/2) / 10 = (2.4 + 1.5 + 1.5) / 10 = 0.54
    assert matrix.frequency_weighted_iou() == pytest.approx(0.54)
    # Dice_i = 2 n_ii / (t_i + s_i) = 6/8, 4/6, 4/6
    np.testing.assert_allclose(matrix.dice_per_class(), [0.75, 2 / 3, 2 / 3])

    summary = matrix.summary()
    assert summary["mean_iou"] == pytest.approx(8 / 15)
    assert summary["iou/0"] == pytest.approx(0.6)
    assert summary["dice/1"] == pytest.approx(2 / 3)
    assert summary["pixels"] == 10.0
    assert all(isinstance(value, float) for value in summary.values())


def test_absent_classes_follow_fcn_nanmean_rule() -> None:
    # K = 4; truth 0 0 1 1, pred 0 2 1 1. Class 2 is predicted but never true; class 3 is in
    # neither. n00 = 1, n02 = 1, n11 = 2; t = [2, 2, 0, 0], s = [1, 2, 1, 0].
    matrix = ConfusionMatrix(4).update(np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1]))
    # accuracy: 1/2, 2/2, NaN (t = 0, although predicted), NaN -> mean (1/2 + 1) / 2 = 3/4
    accuracy = matrix.accuracy_per_class()
    np.testing.assert_allclose(accuracy[:2], [0.5, 1.0])
    assert np.isnan(accuracy[2]) and np.isnan(accuracy[3])
    assert matrix.mean_accuracy() == pytest.approx(0.75)
    # IU: 1/(2+1-1) = 1/2, 2/(2+2-2) = 1, 0/(0+1-0) = 0 (a false positive counts), NaN
    iou = matrix.iou_per_class()
    np.testing.assert_allclose(iou[:3], [0.5, 1.0, 0.0])
    assert np.isnan(iou[3])
    # mean IU over the three defined classes: (1/2 + 1 + 0) / 3 = 1/2 (not 1.5/4)
    assert matrix.mean_iou() == pytest.approx(0.5)
    # f.w. IU = (2 * 1/2 + 2 * 1) / 4 = 3/4
    assert matrix.frequency_weighted_iou() == pytest.approx(0.75)
    # Dice: 2/3, 4/4, 0/1, NaN -> mean (2/3 + 1 + 0) / 3 = 5/9
    dice = matrix.dice_per_class()
    np.testing.assert_allclose(dice[:3], [2 / 3, 1.0, 0.0])
    assert np.isnan(dice[3])
    assert matrix.mean_dice() == pytest.approx(5 / 9)
    assert math.isnan(matrix.summary()["iou/3"])


def test_agrees_with_fcn_score_py_on_random_matrices() -> None:
    # FCN's score.py, written out: acc, nanmean(acc_cls), nanmean(iu), fwavacc.
    rng = np.random.default_rng(7)
    for _ in range(20):
        k = int(rng.integers(2, 8))
        hist = rng.integers(0, 50, (k, k))
        hist[rng.random(k) < 0.3] = 0  # some classes absent from the truth
        hist[:, rng.random(k) < 0.3] = 0  # some never predicted
        if hist.sum() == 0:
            continue
        matrix = ConfusionMatrix.from_dict({"num_classes": k, "counts": hist.tolist()})
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.diag(hist).sum() / hist.sum()
            acc_cls = np.diag(hist) / hist.sum(1)
            iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
            freq = hist.sum(1) / hist.sum()
            fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
        assert matrix.pixel_accuracy() == pytest.approx(acc)
        if np.isnan(acc_cls).all():
            assert math.isnan(matrix.mean_accuracy())
        else:
            assert matrix.mean_accuracy() == pytest.approx(np.nanmean(acc_cls))
        assert matrix.mean_iou() == pytest.approx(np.nanmean(iu))
        assert matrix.frequency_weighted_iou() == pytest.approx(fwavacc)


def test_empty_matrix_gives_nan_without_warnings() -> None:
    matrix = ConfusionMatrix(3)
    with np.errstate(all="raise"):
        summary = matrix.summary()
    assert all(math.isnan(value) for key, value in summary.items() if key != "pixels")
    assert summary["pixels"] == 0.0


def test_counts_beyond_int32_stay_exact() -> None:
    big = 2**40
    matrix = ConfusionMatrix.from_dict({"num_classes": 2, "counts": [[big, 3], [5, 2 * big]]})
    assert matrix.counts.dtype == np.int64
    matrix.update(np.array([0, 1, 1]), np.array([0, 1, 0]))  # adds n00, n11, n01 by one
    doubled = matrix + matrix
    expected = [[2 * (big + 1), 2 * 4], [2 * 5, 2 * (2 * big + 1)]]
    assert doubled.to_dict()["counts"] == expected  # exact Python ints, beyond 2**32
    assert doubled.total == 2 * (3 * big + 2 + 4 + 5) > 2**41
    correct = Fraction(2 * (big + 1) + 2 * (2 * big + 1), doubled.total)
    assert doubled.pixel_accuracy() == pytest.approx(float(correct), rel=1e-15)
    roundtrip = ConfusionMatrix.from_dict(json.loads(json.dumps(doubled.to_dict())))
    assert roundtrip == doubled
