"""Training losses for dense prediction, with the papers' formulas and their normalisations.

Every loss is an :class:`torch.nn.Module` that takes ``scores`` (N, K, H, W) logits and
``target`` (N, H, W) int64 class indices and returns a scalar tensor. Pixels whose target is
``ignore_index`` count nowhere (neither in a numerator nor in a denominator).

* :class:`CrossEntropy` -- pixel-wise cross-entropy, optionally class-weighted (FCN, SegNet).
* :class:`WeightedCrossEntropy` -- cross-entropy with a per-pixel weight map (U-Net), whose map
  :func:`unet_weight_map` builds from an instance label image.
* :class:`SoftDice` -- 1 - mean over classes of the soft Dice coefficient (V-Net form).
* :class:`CombinedLoss` -- a weighted sum of losses; :func:`with_aux` adds an auxiliary head's
  loss (PSPNet: ``aux_weight = 0.4``).
* :func:`median_frequency_weights` and :func:`class_pixel_counts` -- class weights by median
  frequency balancing (Eigen & Fergus 2015, as SegNet uses them).
* :func:`build_loss` -- a loss from a plain dict such as ``{"kind": "cross_entropy"}``.

A batch in which every pixel is ignored has no defined mean; the losses then return a zero that
is still connected to ``scores`` (so ``backward()`` works and adds nothing) instead of NaN,
because one unlabelled tile must not poison a whole training run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from tilewise.errors import ConfigError, InputError, did_you_mean

__all__ = [
    "CombinedLoss",
    "CrossEntropy",
    "SoftDice",
    "WeightedCrossEntropy",
    "balanced_class_weights",
    "build_loss",
    "class_pixel_counts",
    "median_frequency_weights",
    "soft_dice_terms",
    "touching_cells",
    "unet_border_reach",
    "unet_targets",
    "unet_weight_map",
    "with_aux",
]

Normalize = Literal["weights", "pixels"]
_NORMALIZE_CHOICES = ("weights", "pixels")


# --------------------------------------------------------------------------- input checks


def _check_scores_target(scores: Tensor, target: Tensor, ignore_index: int | None) -> Tensor:
    """Check shapes and label range; return the boolean mask of counted pixels (N, H, W)."""
    if scores.dim() != 4:
        raise InputError(
            f"scores must be (N, K, H, W) logits; got shape {tuple(scores.shape)}. "
            "Pass the network's raw output, one channel per class."
        )
    n, k, h, w = scores.shape
    if target.shape != (n, h, w):
        raise InputError(
            f"target must be (N, H, W) = {(n, h, w)} to match scores {tuple(scores.shape)}; "
            f"got {tuple(target.shape)}. Crop or resize the labels to the scores' size."
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise InputError(
            f"target must hold integer class indices (int64); got dtype {target.dtype}. "
            "Use target.long()."
        )
    valid = (
        torch.ones_like(target, dtype=torch.bool)
        if ignore_index is None
        else target != ignore_index
    )
    if bool(valid.any()):
        counted = target[valid]
        low, high = int(counted.min()), int(counted.max())
        if low < 0 or high >= k:
            bad = low if low < 0 else high
            raise InputError(
                f"target labels must lie in [0, {k - 1}] for {k} classes"
                + (f" (or be ignore_index {ignore_index})" if ignore_index is not None else "")
                + f"; got {bad}. Check num_classes or the label map."
            )
    return valid


def _check_ignore_index(ignore_index: object) -> None:
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise ConfigError(
            f"ignore_index must be an integer label or None; got {ignore_index!r}. Use 255."
        )


def _zero_like_graph(scores: Tensor) -> Tensor:
    """A scalar zero that stays connected to ``scores`` (its gradient is zero, not missing)."""
    return scores.sum() * 0.0


def _check_normalize(normalize: str) -> None:
    if normalize not in _NORMALIZE_CHOICES:
        raise ConfigError(
            f"normalize must be one of {list(_NORMALIZE_CHOICES)}; got {normalize!r}."
            + did_you_mean(str(normalize), _NORMALIZE_CHOICES)
        )


# --------------------------------------------------------------------------- cross-entropy


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy with an ignore index, optionally class-weighted.

    With softmax probabilities ``p_k(x) = exp(a_k(x)) / sum_k' exp(a_k'(x))``, label ``l(x)`` and
    the set ``Omega`` of counted pixels (target != ignore_index)::

        unweighted:  E = (1/|Omega|) * sum_{x in Omega} -log p_{l(x)}(x)
        weighted:    E = sum_x w_{l(x)} * -log p_{l(x)}(x) / Z

    where ``Z`` is chosen by ``normalize``:

    * ``"weights"`` (default): ``Z = sum_x w_{l(x)}``, the weighted mean. This is what
      ``torch.nn.functional.cross_entropy(weight=...)`` computes, so results agree with torch, and
      the loss does not change when all weights are scaled by one factor (a learning rate tuned
      without weights still fits).
    * ``"pixels"``: ``Z = |Omega|``, the count of valid pixels, as Caffe's ``SoftmaxWithLoss``
      (and SegNet's Caffe fork with class weighting) normalises. The loss then grows with the
      weights' overall scale.

    Both give the same gradient direction for one batch (``Z`` does not depend on the network);
    they differ by a per-batch factor. Without ``class_weights`` the two are identical.

    Args:
        ignore_index: Target value whose pixels count nowhere; ``None`` counts every pixel.
        class_weights: Optional per-class weights ``w_c`` (length K, non-negative), e.g. from
            :func:`median_frequency_weights`.
        normalize: ``"weights"`` or ``"pixels"``, see above.
    """

    class_weights: Tensor | None

    def __init__(
        self,
        ignore_index: int | None = 255,
        class_weights: Sequence[float] | Tensor | npt.NDArray[Any] | None = None,
        *,
        normalize: Normalize = "weights",
    ) -> None:
        super().__init__()
        _check_normalize(normalize)
        _check_ignore_index(ignore_index)
        self.ignore_index = ignore_index
        self.normalize: Normalize = normalize
        if class_weights is None:
            self.register_buffer("class_weights", None)
        else:
            weights = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
            if weights.dim() != 1 or not bool(torch.isfinite(weights).all()):
                raise ConfigError(
                    "class_weights must be a 1-D list of finite numbers, one per class; "
                    f"got {np.asarray(class_weights).tolist()!r}."
                )
            if bool((weights < 0).any()):
                raise ConfigError(
                    "class_weights must be non-negative; "
                    f"got {weights.tolist()}. Use 0 to switch a class off."
                )
            self.register_buffer("class_weights", weights)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        """Return the mean cross-entropy over counted pixels (a scalar)."""
        valid = _check_scores_target(scores, target, self.ignore_index)
        k = scores.shape[1]
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        nll = F.cross_entropy(scores, safe_target, reduction="none")  # (N, H, W)
        valid_f = valid.to(nll.dtype)
        if self.class_weights is None:
            numerator = (nll * valid_f).sum()
            denominator = valid_f.sum()
        else:
            if self.class_weights.numel() != k:
                raise InputError(
                    f"class_weights has {self.class_weights.numel()} entries but scores have "
                    f"{k} classes; give one weight per class."
                )
            pixel_weights = self.class_weights.to(nll.dtype)[safe_target] * valid_f
            numerator = (nll * pixel_weights).sum()
            denominator = pixel_weights.sum() if self.normalize == "weights" else valid_f.sum()
        if float(denominator) == 0.0:
            return _zero_like_graph(scores)
        return numerator / denominator


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with a per-pixel weight map ``w(x)`` (U-Net, Ronneberger et al. 2015, eq. 1).

    The paper's energy is ``E = sum_{x in Omega} w(x) * -log p_{l(x)}(x)``; this module returns
    it divided by ``Z``:

    * ``"pixels"`` (default): ``Z = |Omega|``, the count of counted pixels. This is the paper's
      sum up to a constant factor, so ``w0 = 10`` keeps its meaning: a pixel of weight 11 weighs
      11 times a pixel of weight 1, relative to a fixed scale, whatever else the batch holds.
    * ``"weights"``: ``Z = sum_x w(x)``, the weighted mean (scale-free in ``w``).

    ``forward(scores, target, weights)`` takes ``weights`` of shape (N, H, W), e.g. from
    :func:`unet_weight_map` stacked per image. Ignored pixels count nowhere whatever their weight.
    """

    needs_weights = True

    def __init__(self, ignore_index: int | None = 255, *, normalize: Normalize = "pixels") -> None:
        super().__init__()
        _check_normalize(normalize)
        _check_ignore_index(ignore_index)
        self.ignore_index = ignore_index
        self.normalize: Normalize = normalize

    def forward(self, scores: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        """Return ``sum w * -log p_l / Z`` over counted pixels (a scalar)."""
        valid = _check_scores_target(scores, target, self.ignore_index)
        if weights.shape != target.shape:
            raise InputError(
                f"weights must have the target's shape {tuple(target.shape)}; got "
                f"{tuple(weights.shape)}. Build one (H, W) map per image and stack them."
            )
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        nll = F.cross_entropy(scores, safe_target, reduction="none")
        valid_f = valid.to(nll.dtype)
        pixel_weights = weights.to(nll.dtype) * valid_f
        if bool((pixel_weights < 0).any()):
            raise InputError("weights must be non-negative; got a negative pixel weight.")
        numerator = (nll * pixel_weights).sum()
        denominator = pixel_weights.sum() if self.normalize == "weights" else valid_f.sum()
        if float(denominator) == 0.0:
            return _zero_like_graph(scores)
        return numerator / denominator


# --------------------------------------------------------------------------- soft Dice


def soft_dice_terms(
    prob: Tensor, truth: Tensor, *, dims: Sequence[int] | None = None, squared: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the soft Dice terms ``(|A n B|, |A|, |B|)`` summed over ``dims`` (all if None).

    ``|A n B| = sum p * g``, ``|A| = sum p^2`` and ``|B| = sum g^2`` (``squared=True``, the
    V-Net form of Milletari et al. 2016); with ``squared=False`` the plain sums ``sum p`` and
    ``sum g`` (the Sorensen form). For a one-hot ``g`` the two ``|B|`` agree.

    Example (the worked 4x4 example of the lecture notes, ``squared=False``): intersection 7.41,
    ``|A|`` 7.82, ``|B|`` 8; with ``squared=True`` ``|A|`` is 6.9132 instead.
    """
    if prob.shape != truth.shape:
        raise InputError(
            f"prob and truth must have one shape; got {tuple(prob.shape)} and {tuple(truth.shape)}."
        )
    reduce_dims = tuple(range(prob.dim())) if dims is None else tuple(dims)
    intersection = (prob * truth).sum(dim=reduce_dims)
    if squared:
        size_a = (prob * prob).sum(dim=reduce_dims)
        size_b = (truth * truth).sum(dim=reduce_dims)
    else:
        size_a = prob.sum(dim=reduce_dims)
        size_b = truth.sum(dim=reduce_dims)
    return intersection, size_a, size_b


class SoftDice(nn.Module):
    """Soft Dice loss: one minus the mean over classes of the soft Dice coefficient.

    With ``p = softmax(scores)`` and ``g`` the one-hot target, for every class ``c``::

        Dice_c = (2 * sum_x p_c(x) g_c(x) + eps) / (sum_x p_c(x)^2 + sum_x g_c(x)^2 + eps)
        L      = 1 - (1/K) * sum_c Dice_c

    (``squared=False`` uses ``sum p_c + sum g_c`` in the denominator instead.)

    * Sums run over the whole batch (N, H, W) by default, so a class present in any image of the
      batch gets one Dice term; ``per_image=True`` computes ``Dice_c`` per image and averages
      over images and classes.
    * Every class counts, background included, and ignored pixels are removed from both ``p``
      and ``g``.
    * ``eps`` (default 1) smooths both numerator and denominator: a class absent from both the
      target and the prediction gets ``Dice_c = 1`` (nothing to find, nothing found) instead of
      ``0/0``, and a class absent from the target but predicted with total mass ``m`` gets
      ``eps / (m + eps)``, a smooth penalty.
    """

    def __init__(
        self,
        eps: float = 1.0,
        ignore_index: int | None = 255,
        *,
        squared: bool = True,
        per_image: bool = False,
    ) -> None:
        super().__init__()
        if not (eps > 0 and math.isfinite(eps)):
            raise ConfigError(
                f"eps must be a positive finite number (it smooths 0/0); got {eps!r}. Use 1.0."
            )
        _check_ignore_index(ignore_index)
        self.eps = float(eps)
        self.ignore_index = ignore_index
        self.squared = squared
        self.per_image = per_image

    def dice_per_class(self, scores: Tensor, target: Tensor) -> Tensor:
        """Return ``Dice_c`` as a (K,) tensor, or (N, K) with ``per_image=True``."""
        valid = _check_scores_target(scores, target, self.ignore_index)
        k = scores.shape[1]
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        mask = valid.unsqueeze(1).to(scores.dtype)  # (N, 1, H, W)
        prob = F.softmax(scores, dim=1) * mask
        truth = F.one_hot(safe_target, k).permute(0, 3, 1, 2).to(scores.dtype) * mask
        dims = (2, 3) if self.per_image else (0, 2, 3)
        intersection, size_a, size_b = soft_dice_terms(prob, truth, dims=dims, squared=self.squared)
        return (2.0 * intersection + self.eps) / (size_a + size_b + self.eps)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        """Return ``1 - mean_c Dice_c`` (a scalar)."""
        return 1.0 - self.dice_per_class(scores, target).mean()


# --------------------------------------------------------------------------- combinations


class CombinedLoss(nn.Module):
    """A weighted sum of losses: ``L = sum_i weight_i * loss_i(scores, target)``.

    Terms that need a per-pixel weight map (:class:`WeightedCrossEntropy`, marked by the class
    attribute ``needs_weights``) receive the ``weights`` given to :meth:`forward`.
    """

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ConfigError("CombinedLoss needs at least one (weight, loss) term; got none.")
        for weight, loss in terms:
            if not isinstance(loss, nn.Module) or not math.isfinite(float(weight)):
                raise ConfigError(
                    "every term must be (finite weight, loss module); "
                    f"got ({weight!r}, {type(loss).__name__})."
                )
        self.weights = [float(weight) for weight, _ in terms]
        self.terms = nn.ModuleList([loss for _, loss in terms])

    @property
    def needs_weights(self) -> bool:
        """Whether some term needs a per-pixel weight map (so a nested sum passes it on)."""
        return any(getattr(loss, "needs_weights", False) for loss in self.terms)

    def forward(self, scores: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
        """Return the weighted sum of the terms (a scalar)."""
        total: Tensor | None = None
        for factor, loss in zip(self.weights, self.terms, strict=True):
            if getattr(loss, "needs_weights", False):
                if weights is None:
                    raise InputError(
                        f"{type(loss).__name__} needs a per-pixel weight map; "
                        "call the loss with weights=... (e.g. from unet_weight_map)."
                    )
                value = loss(scores, target, weights)
            else:
                value = loss(scores, target)
            total = factor * value if total is None else total + factor * value
        assert total is not None  # at least one term, checked in __init__
        return total


def with_aux(
    loss: nn.Module,
    outputs: Tensor | Sequence[Tensor],
    target: Tensor,
    aux_weight: float = 0.4,
) -> Tensor:
    """Loss of a model that may return ``(main, aux)`` in training mode (PSPNet, GoogLeNet-style).

    Returns ``loss(main, target) + aux_weight * loss(aux, target)`` for a pair, and
    ``loss(outputs, target)`` for a single tensor (the model in eval mode, or one without an
    auxiliary head). PSPNet trains with ``aux_weight = 0.4``. Auxiliary scores at a coarser
    resolution than the target are bilinearly upsampled to it first (the main scores must
    match the target exactly).
    """
    if isinstance(outputs, Tensor):
        return loss(outputs, target)
    if len(outputs) != 2:
        raise InputError(
            f"outputs must be a tensor or a (main, aux) pair; got a sequence of {len(outputs)}."
        )
    main, aux = outputs
    if aux.dim() == 4 and aux.shape[-2:] != target.shape[-2:]:
        aux = F.interpolate(
            aux, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False
        )
    return loss(main, target) + aux_weight * loss(aux, target)


# --------------------------------------------------------------------------- class weights


def class_pixel_counts(
    labels: Iterable[npt.ArrayLike | Tensor], num_classes: int, ignore_index: int | None = 255
) -> npt.NDArray[np.int64]:
    """Count the pixels of every class in every label image, streaming over ``labels``.

    Args:
        labels: Label images (any shape, integer), one at a time; numpy arrays or tensors.
        num_classes: ``K``; labels must lie in ``[0, K)`` unless equal to ``ignore_index``.
        ignore_index: Label that is not counted; ``None`` counts everything.

    Returns:
        An int64 array (images, K): ``counts[i, c]`` = pixels of class ``c`` in image ``i``.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1; got {num_classes}.")
    rows: list[npt.NDArray[np.int64]] = []
    for index, image in enumerate(labels):
        values = _as_int_array(image, f"labels[{index}]").ravel()
        if ignore_index is not None:
            values = values[values != ignore_index]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = int(values.min()) if values.min() < 0 else int(values.max())
            raise InputError(
                f"labels[{index}] holds label {bad}, outside [0, {num_classes - 1}] and not "
                f"ignore_index ({ignore_index}). Check num_classes or ignore_index."
            )
        rows.append(np.bincount(values, minlength=num_classes).astype(np.int64))
    if not rows:
        return np.zeros((0, num_classes), dtype=np.int64)
    return np.stack(rows)


def median_frequency_weights(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Class weights by median frequency balancing (Eigen & Fergus 2015; SegNet).

    ``w_c = median(freq) / freq_c`` where, with ``counts[i, c]`` the pixels of class ``c`` in
    image ``i`` and ``n_i = sum_c counts[i, c]`` the counted pixels of image ``i``::

        freq_c = sum_i counts[i, c] / sum_{i : counts[i, c] > 0} n_i

    i.e. the pixels of class ``c`` over the total pixels of the images where ``c`` is present
    (SegNet's definition), and the median runs over the classes that occur.

    A class never seen gets weight 0: its frequency is 0, so ``median / 0`` is infinite, and
    there are no pixels of it to weigh anyway; 0 keeps the weights finite (a finite loss if it
    shows up later) and says plainly that the data gave no estimate. Unseen classes are also
    left out of the median, so adding empty classes does not shift the others' weights.

    Args:
        counts: (images, K) per-image class pixel counts, e.g. from :func:`class_pixel_counts`.
            A (K,) vector is taken as a single image.
    """
    table = np.asarray(counts)
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.number):
        raise InputError(
            f"counts must be an (images, K) array of pixel counts; got shape {table.shape}."
        )
    if (table < 0).any():
        raise InputError("counts must be non-negative pixel counts; got a negative entry.")
    table = table.astype(np.float64)
    image_pixels = table.sum(axis=1)  # n_i
    present = table > 0
    class_pixels = table.sum(axis=0)
    pixels_where_present = (present * image_pixels[:, None]).sum(axis=0)
    seen = class_pixels > 0
    weights = np.zeros(table.shape[1], dtype=np.float64)
    if not seen.any():
        return weights
    freq = class_pixels[seen] / pixels_where_present[seen]
    weights[seen] = np.median(freq) / freq
    return weights


# --------------------------------------------------------------------------- U-Net weight map

# The border term is dropped where it is below w0 * _BORDER_FLOOR: exp(-d^2 / 2 sigma^2) < 1e-7
# once d > sigma * sqrt(2 ln 1e7) ~ 5.68 sigma. Beyond that margin around a cell its distance is
# not needed, so each cell's distance transform runs on its bounding box plus the margin only.
_BORDER_FLOOR = 1e-7


def unet_border_reach(sigma: float) -> int:
    """How far (px) a cell's border term reaches in :func:`unet_weight_map`: beyond it the term
    is below ``w0 * 1e-7`` and dropped. A piece of a larger image read with this many more
    pixels on every side gets the whole image's weights inside (up to that floor)."""
    return math.ceil(sigma * math.sqrt(2.0 * math.log(1.0 / _BORDER_FLOOR))) + 1


def unet_weight_map(
    instances: npt.ArrayLike,
    *,
    class_weights: Sequence[float] | npt.NDArray[Any] | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
) -> npt.NDArray[np.float32]:
    """The U-Net loss weight map (Ronneberger et al. 2015, eq. 2) of one instance label image.

    ::

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    with ``d1``/``d2`` the Euclidean distances from pixel ``x`` to the nearest pixel (hence the
    border) of the nearest and the second-nearest cell.

    * The border term is applied on background pixels only (``instances == 0``): it exists to
      make the network learn the thin background gaps that separate touching cells (the paper's
      Fig. 3d), and this is what common implementations do. On cell pixels it is 0.
    * With fewer than two cells ``d2`` is undefined and there is no border term.
    * Beyond ``~5.68 sigma`` from a cell the term is below ``w0 * 1e-7`` and is dropped (each
      cell's distance transform runs on its bounding box plus that margin): the result differs
      from the exact formula by less than ``w0 * 1e-7``, below float32 resolution of ``w_c``.

    Args:
        instances: (H, W) integer labels: 0 = background, 1..n = cells (any distinct positive ids).
        class_weights: ``w_c``: ``None`` balances background against foreground from this image,
            ``w_c = 1 / (2 f_c)`` with ``f_c`` the class's pixel fraction (so the mean of ``w_c``
            over the image is 1 and each class carries half the weight; 1 everywhere when only
            one class occurs); or a pair ``(w_background, w_cell)``; or a precomputed (H, W) map.
        w0: Border weight (paper: 10).
        sigma: Border width in pixels (paper: about 5).

    Returns:
        float32 (H, W) weight map.
    """
    labels = _as_int_array(instances, "instances")
    if labels.ndim != 2:
        raise InputError(f"instances must be a 2-D (H, W) label image; got shape {labels.shape}.")
    if labels.size and labels.min() < 0:
        raise InputError(
            f"instances must be 0 (background) or positive cell ids; got {int(labels.min())}."
        )
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"sigma must be a positive number of pixels; got {sigma!r}. Use 5.0.")
    if not (w0 >= 0 and math.isfinite(w0)):
        raise ConfigError(f"w0 must be a non-negative number; got {w0!r}. Use 10.0.")

    background = labels == 0
    weight = _class_weight_map(background, class_weights)

    ids = np.unique(labels[~background])
    if ids.size < 2 or w0 == 0:
        return weight.astype(np.float32)

    margin = unet_border_reach(sigma)
    height, width = labels.shape
    nearest = np.full(labels.shape, np.inf)  # d1
    second = np.full(labels.shape, np.inf)  # d2
    boxes = ndimage.find_objects(labels)  # index id - 1 -> bounding slices (or None)
    for cell in ids:
        box = boxes[cell - 1]
        assert box is not None
        rows = slice(max(box[0].start - margin, 0), min(box[0].stop + margin, height))
        cols = slice(max(box[1].start - margin, 0), min(box[1].stop + margin, width))
        distance = ndimage.distance_transform_edt(labels[rows, cols] != cell)
        d1, d2 = nearest[rows, cols], second[rows, cols]
        # The two smallest of {d1, d2, distance} given d1 <= d2.
        second[rows, cols] = np.minimum(d2, np.maximum(d1, distance))
        nearest[rows, cols] = np.minimum(d1, distance)

    border = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
    weight = weight + np.where(background, border, 0.0)
    return weight.astype(np.float32)


def unet_targets(
    instances: npt.ArrayLike,
    classes: Mapping[int, int] | None = None,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Training targets for touching cells, as in U-Net (Ronneberger et al. 2015, Fig. 3).

    The pixels of a cell that touch another cell (4-neighbours) become background, so that the
    class map has a gap of background between touching cells; the weight map
    (:func:`unet_weight_map` of the separated cells) weighs those gaps heavily. A network trained
    on these learns to draw the gaps, and the connected components of its class map (the
    ``output.instances`` stage) are then the cells.

    Args:
        instances: (H, W) integer labels: 0 = background, 1..n = cells.
        classes: class of each cell id (default: class 1 for every cell).
        w0: border weight (paper: 10).
        sigma: border width in pixels (paper: about 5).
        class_weights: ``(w_background, w_cell)``; default: balanced from this image's separated
            cells (see :func:`unet_weight_map`). A piece of a larger image passes the whole
            image's, so that its weights are the whole image's.

    Returns:
        ``(labels, weights)``: uint8 (H, W) classes with the gaps, float32 (H, W) weights.
    """
    cells = _as_int_array(instances, "instances")
    if cells.ndim != 2:
        raise InputError(f"instances must be a 2-D (H, W) label image; got shape {cells.shape}.")
    separated = np.where(touching_cells(cells), 0, cells)
    if classes is None:
        labels = (separated > 0).astype(np.uint8)
    else:
        lut = np.zeros(int(separated.max()) + 1, np.uint8)
        for cell, cls in classes.items():
            if 0 < cell < lut.size:
                lut[cell] = cls
        labels = lut[separated]
    return labels, unet_weight_map(separated, class_weights=class_weights, w0=w0, sigma=sigma)


def touching_cells(cells: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.bool_]:
    """The pixels of a cell that touch a different cell (4-neighbours): :func:`unet_targets`'
    gaps. Each pixel depends on its 4 neighbours only, so a piece read with one more pixel on
    every side gives the whole image's answer inside."""
    touching = np.zeros(cells.shape, bool)
    for axis in (0, 1):
        a = cells.take(range(cells.shape[axis] - 1), axis=axis)
        b = cells.take(range(1, cells.shape[axis]), axis=axis)
        edge = (a != b) & (a > 0) & (b > 0)  # two different cells meet here
        head = [slice(None)] * 2
        tail = [slice(None)] * 2
        head[axis], tail[axis] = slice(0, -1), slice(1, None)
        touching[tuple(head)] |= edge
        touching[tuple(tail)] |= edge
    return touching


def balanced_class_weights(background: int, total: int) -> tuple[float, float]:
    """``(w_background, w_cell)`` = ``1 / (2 f_c)`` for ``background`` pixels of ``total``: the
    mean weight is 1 and each class carries half of it; ``(1, 1)`` when a class is absent."""
    if background == 0 or background == total:
        return 1.0, 1.0
    return total / (2.0 * background), total / (2.0 * (total - background))


def _class_weight_map(
    background: npt.NDArray[np.bool_], class_weights: Sequence[float] | npt.NDArray[Any] | None
) -> npt.NDArray[np.float64]:
    """``w_c(x)`` for :func:`unet_weight_map` (see its docstring for the three forms)."""
    if class_weights is None:
        w_background, w_foreground = balanced_class_weights(int(background.sum()), background.size)
        return np.where(background, w_background, w_foreground)
    given = np.asarray(class_weights, dtype=np.float64)
    if given.shape == background.shape and given.ndim == 2:
        weight_map = given
    elif given.shape == (2,):
        weight_map = np.where(background, given[0], given[1])
    else:
        raise ConfigError(
            "class_weights must be a pair (w_background, w_cell) or an (H, W) map of the "
            f"image's shape {background.shape}; got shape {given.shape}."
        )
    if not np.isfinite(weight_map).all() or (weight_map < 0).any():
        raise ConfigError("class_weights must be finite and non-negative.")
    return weight_map.astype(np.float64)


def _as_int_array(values: npt.ArrayLike | Tensor, name: str) -> npt.NDArray[np.int64]:
    """``values`` as an int64 numpy array; an error for floats or other non-integers."""
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise InputError(
            f"{name} must hold integer labels; got dtype {array.dtype}. "
            "Round or cast the labels to an integer type first."
        )
    return array.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- from a dict

_LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("ignore_index", "class_weights", "normalize"),
    "weighted_cross_entropy": ("ignore_index", "normalize"),
    "dice": ("eps", "ignore_index", "squared", "per_image"),
    "sum": ("terms",),
}


def build_loss(spec: Mapping[str, Any], *, path: str = "loss") -> nn.Module:
    """Build a loss from a plain dict, e.g. ``{"kind": "cross_entropy", "ignore_index": 255}``.

    Kinds and their keys:

    * ``cross_entropy``: ``ignore_index``, ``class_weights`` (list), ``normalize``
    * ``weighted_cross_entropy``: ``ignore_index``, ``normalize`` (needs a weight map at call)
    * ``dice``: ``eps``, ``ignore_index``, ``squared``, ``per_image``
    * ``sum``: ``terms``, a list of specs each with an optional ``weight`` (default 1.0)

    Raises:
        ConfigError: naming the dotted path of the problem, the rule, what was given and a fix.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{path}: a loss must be a mapping with a 'kind'; got {type(spec).__name__} "
            f"{spec!r}. Write e.g. {{'kind': 'cross_entropy'}}."
        )
    if "kind" not in spec:
        raise ConfigError(
            f"{path}: a loss needs a 'kind', one of {sorted(_LOSS_KEYS)}; got keys "
            f"{sorted(spec)}. Add e.g. kind: cross_entropy."
        )
    kind = spec["kind"]
    if kind not in _LOSS_KEYS:
        raise ConfigError(
            f"{path}.kind: unknown loss kind {kind!r}; known kinds are {sorted(_LOSS_KEYS)}."
            + did_you_mean(str(kind), _LOSS_KEYS)
        )
    allowed = _LOSS_KEYS[kind]
    options = {key: value for key, value in spec.items() if key != "kind"}
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"{path}.{key}: unknown key {key!r} for loss kind {kind!r}; allowed keys are "
                f"{list(allowed)}." + did_you_mean(str(key), allowed)
            )
    if kind == "sum":
        return _build_sum(options.get("terms"), path=f"{path}.terms")
    try:
        if kind == "cross_entropy":
            return CrossEntropy(**options)
        if kind == "weighted_cross_entropy":
            return WeightedCrossEntropy(**options)
        return SoftDice(**options)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{path}: bad value for loss kind {kind!r} ({error}); given {dict(options)!r}."
        ) from error


def _build_sum(terms: Any, *, path: str) -> CombinedLoss:
    if not isinstance(terms, Sequence) or isinstance(terms, str) or not terms:
        raise ConfigError(
            f"{path}: a 'sum' loss needs a non-empty list of terms; got {terms!r}. "
            "Write terms: [{weight: 1.0, kind: cross_entropy}, {weight: 0.5, kind: dice}]."
        )
    built: list[tuple[float, nn.Module]] = []
    for index, term in enumerate(terms):
        term_path = f"{path}[{index}]"
        if not isinstance(term, Mapping):
            raise ConfigError(
                f"{term_path}: each term must be a mapping with a 'kind'; got {term!r}."
            )
        options = dict(term)
        weight = options.pop("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
        ):
            raise ConfigError(
                f"{term_path}.weight: the weight must be a finite number; got {weight!r}."
            )
        built.append((float(weight), build_loss(options, path=term_path)))
    return CombinedLoss(built)
