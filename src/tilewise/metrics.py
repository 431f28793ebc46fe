"""Segmentation metrics from an exact, streamable confusion matrix.

:class:`ConfusionMatrix` accumulates int64 counts ``n[i, j]`` = pixels of true class ``i``
predicted as class ``j`` (rows = truth, columns = prediction). Counting is exact and order-free:
updating tile by tile, merging workers' matrices (``merge`` / ``+``) and counting the whole image
at once give the same matrix, so metrics of a tiled, distributed run equal the one-shot ones.

The metrics are those of the FCN paper (Long, Shelhamer & Darrell 2015, Sec. 5). With
``t_i = sum_j n_ij`` (pixels of class ``i``) and ``s_i = sum_j n_ji`` (pixels predicted ``i``)::

    pixel accuracy       sum_i n_ii / sum_i t_i
    mean accuracy        (1/n_cl) sum_i n_ii / t_i
    mean IU              (1/n_cl) sum_i n_ii / (t_i + s_i - n_ii)
    frequency-weighted   (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + s_i - n_ii)
    per-class IoU        n_ii / (t_i + s_i - n_ii)
    per-class Dice       2 n_ii / (t_i + s_i)

Classes that are absent follow FCN's reference ``score.py`` (``np.nanmean`` over classes): a
per-class value whose denominator is 0 is NaN and left out of the class mean, so ``n_cl`` counts
only the classes where the ratio is defined:

* accuracy of class ``i`` is NaN when ``t_i = 0`` (the class is not in the truth), even if it
  was predicted; those false positives still lower other classes' IU and the pixel accuracy;
* IoU and Dice of class ``i`` are NaN only when the class is absent from both truth and
  prediction; a class predicted but never true has IoU 0 and pulls mean IU down;
* frequency-weighted IU weighs by ``t_i``, so classes with ``t_i = 0`` have no weight.

With no counted pixel at all every metric is NaN.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
import numpy.typing as npt
import torch

from tilewise.errors import ConfigError, InputError

__all__ = ["ConfusionMatrix"]


def _nan_divide(numerator: npt.NDArray[Any], denominator: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``numerator / denominator`` elementwise as float64, NaN where the denominator is 0."""
    num = numerator.astype(np.float64)
    den = denominator.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nan_mean(values: npt.NDArray[np.float64]) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


class ConfusionMatrix:
    """Exact pixel counts of (true class, predicted class) pairs, streamable and mergeable.

    Args:
        num_classes: ``K``; labels and predictions must lie in ``[0, K)``.
        ignore_index: Truth label whose pixels are skipped (their prediction is not looked at);
            ``None`` counts every pixel.

    Attributes:
        counts: int64 (K, K), ``counts[i, j]`` = pixels of true class ``i`` predicted as ``j``.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer; got {num_classes!r}.")
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ConfigError(
                f"ignore_index must be an integer label or None; got {ignore_index!r}."
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts: npt.NDArray[np.int64] = np.zeros((num_classes, num_classes), dtype=np.int64)

    # ----------------------------------------------------------------------- counting

    def update(
        self, pred: npt.ArrayLike | torch.Tensor, target: npt.ArrayLike | torch.Tensor
    ) -> Self:
        """Add the pixels of one prediction/truth pair (any matching shape, integer labels).

        Returns ``self`` so updates chain. Raises :class:`~tilewise.errors.InputError` for
        mismatched shapes, non-integer arrays, or a counted pixel whose truth or prediction is
        outside ``[0, K)`` (truth equal to ``ignore_index`` is skipped, not an error).
        """
        predicted = _as_labels(pred, "pred")
        truth = _as_labels(target, "target")
        if predicted.shape != truth.shape:
            raise InputError(
                f"pred and target must have one shape; got {predicted.shape} and {truth.shape}. "
                "Pass the argmax labels, not the (K, ...) scores."
            )
        predicted = predicted.ravel()
        truth = truth.ravel()
        if self.ignore_index is not None:
            keep = truth != self.ignore_index
            predicted, truth = predicted[keep], truth[keep]
        k = self.num_classes
        for name, values in (("target", truth), ("pred", predicted)):
            if values.size and (values.min() < 0 or values.max() >= k):
                bad = int(values.min()) if values.min() < 0 else int(values.max())
                allowed = f"[0, {k - 1}]"
                if name == "target" and self.ignore_index is not None:
                    allowed += f" or ignore_index {self.ignore_index}"
                raise InputError(
                    f"{name} holds label {bad} outside {allowed} for {k} classes. "
                    "Check num_classes, ignore_index, or that pred is an argmax."
                )
        # int64 before the multiply: K * t + p overflows narrow label dtypes (uint8 and K = 20).
        pairs = k * truth.astype(np.int64) + predicted.astype(np.int64)
        self.counts += np.bincount(pairs, minlength=k * k).astype(np.int64).reshape(k, k)
        return self

    def merge(self, other: ConfusionMatrix) -> Self:
        """Add ``other``'s counts into this matrix in place (e.g. from another worker)."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix; got {type(other).__name__}.")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise InputError(
                "can only merge matrices of one num_classes and ignore_index; got "
                f"({self.num_classes}, {self.ignore_index}) and "
                f"({other.num_classes}, {other.ignore_index})."
            )
        self.counts += other.counts
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix with the counts of both."""
        total = self.copy()
        total.merge(other)
        return total

    def copy(self) -> ConfusionMatrix:
        """An independent copy."""
        duplicate = ConfusionMatrix(self.num_classes, self.ignore_index)
        duplicate.counts = self.counts.copy()
        return duplicate

    def reset(self) -> None:
        """Set every count to zero."""
        self.counts[:] = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        return (
            self.num_classes == other.num_classes
            and self.ignore_index == other.ignore_index
            and bool(np.array_equal(self.counts, other.counts))
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={self.total})"
        )

    # ----------------------------------------------------------------------- transport

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (plain Python ints, exact at any size) for sending between processes."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfusionMatrix:
        """The inverse of :meth:`to_dict`; checks the shape and that counts are non-negative."""
        try:
            matrix = cls(int(data["num_classes"]), data.get("ignore_index"))
            counts = np.asarray(data["counts"], dtype=np.int64)
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise InputError(
                "a confusion matrix dict needs 'num_classes' and 'counts' (K x K non-negative "
                f"integers below 2**63); reading it failed: {error!r}."
            ) from error
        k = matrix.num_classes
        if counts.shape != (k, k) or (counts < 0).any():
            raise InputError(
                f"counts must be a {k} x {k} table of non-negative integers; got shape "
                f"{counts.shape}."
            )
        matrix.counts = counts
        return matrix

    # ----------------------------------------------------------------------- metrics

    @property
    def total(self) -> int:
        """Counted pixels, ``sum_i t_i``."""
        return int(self.counts.sum())

    def _diag_truth_pred(self) -> tuple[npt.NDArray[np.int64], ...]:
        """``(n_ii, t_i, s_i)`` as int64 vectors."""
        return np.diag(self.counts), self.counts.sum(axis=1), self.counts.sum(axis=0)

    def pixel_accuracy(self) -> float:
        """``sum_i n_ii / sum_i t_i``; NaN with no pixels."""
        total = self.total
        return int(np.trace(self.counts)) / total if total else float("nan")

    def accuracy_per_class(self) -> npt.NDArray[np.float64]:
        """``n_ii / t_i`` per class (recall); NaN where ``t_i = 0``."""
        correct, truth, _ = self._diag_truth_pred()
        return _nan_divide(correct, truth)

    def mean_accuracy(self) -> float:
        """Mean of :meth:`accuracy_per_class` over the classes present in the truth."""
        return _nan_mean(self.accuracy_per_class())

    def iou_per_class(self) -> npt.NDArray[np.float64]:
        """``n_ii / (t_i + s_i - n_ii)`` per class; NaN where the class is in neither."""
        correct, truth, predicted = self._diag_truth_pred()
        return _nan_divide(correct, truth + predicted - correct)

    def mean_iou(self) -> float:
        """Mean of :meth:`iou_per_class` over the classes in the truth or the prediction."""
        return _nan_mean(self.iou_per_class())

    def frequency_weighted_iou(self) -> float:
        """``(sum_k t_k)^-1 sum_i t_i IU_i`` (classes with ``t_i = 0`` weigh nothing)."""
        total = self.total
        if not total:
            return float("nan")
        _, truth, _ = self._diag_truth_pred()
        iou = self.iou_per_class()
        present = truth > 0  # IU_i is defined wherever t_i > 0
        return float((truth[present] * iou[present]).sum() / total)

    def dice_per_class(self) -> npt.NDArray[np.float64]:
        """``2 n_ii / (t_i + s_i)`` per class; NaN where the class is in neither."""
        correct, truth, predicted = self._diag_truth_pred()
        return _nan_divide(2 * correct, truth + predicted)

    def mean_dice(self) -> float:
        """Mean of :meth:`dice_per_class` over the classes in the truth or the prediction."""
        return _nan_mean(self.dice_per_class())

    def summary(self) -> dict[str, float]:
        """All metrics as floats: the FCN four, ``mean_dice``, ``pixels``, and per class
        ``iou/<i>``, ``dice/<i>`` and ``accuracy/<i>`` (NaN where undefined, see module doc)."""
        result: dict[str, float] = {
            "pixel_accuracy": self.pixel_accuracy(),
            "mean_accuracy": self.mean_accuracy(),
            "mean_iou": self.mean_iou(),
            "frequency_weighted_iou": self.frequency_weighted_iou(),
            "mean_dice": self.mean_dice(),
            "pixels": float(self.total),
        }
        for name, values in (
            ("iou", self.iou_per_class()),
            ("dice", self.dice_per_class()),
            ("accuracy", self.accuracy_per_class()),
        ):
            for index, value in enumerate(values):
                result[f"{name}/{index}"] = float(value)
        return result


def _as_labels(values: npt.ArrayLike | torch.Tensor, name: str) -> npt.NDArray[Any]:
    """``values`` as a numpy integer array; an error for anything else."""
    array = (
        values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    )
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"{name} must hold integer class labels; got dtype {array.dtype}. "
            "Take the argmax over classes and cast to an integer type."
        )
    return array
