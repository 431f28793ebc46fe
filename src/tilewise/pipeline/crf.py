"""DeepLab's fully connected CRF, with truncated kernels so that it tiles exactly.

DeepLab (Chen et al., ICLR 2015 / TPAMI 2018) refines the network's class probabilities with the
fully connected CRF of Krähenbühl & Koltun (NIPS 2011), solved by mean-field iterations::

    E(x) = sum_i θ_i(x_i) + sum_{i != j} θ_ij(x_i, x_j),       θ_i(l) = -log P_i(l)
    θ_ij = μ(x_i, x_j) [ w1 exp(-|p_i - p_j|² / 2σα² - |I_i - I_j|² / 2σβ²)   (appearance)
                       + w2 exp(-|p_i - p_j|² / 2σγ²) ]                         (smoothness)

with the Potts compatibility μ(l, l') = [l != l'] and one mean-field iteration

    Q_i(l) ∝ exp(-θ_i(l) - sum_{l'} μ(l, l') m_i(l')),   m_i(l') = sum_{j != i} k(i, j) Q_j(l'),

where ``k = w1 k_appearance + w2 k_smoothness``. For Potts the pairwise term equals
``sum_l' m_i(l') - m_i(l)``, whose first part is the same for every label, so the update is
computed as ``softmax_l(log P_i(l) + m_i(l))`` (the same Q, one pass fewer).

**Why truncated.** A kernel of infinite extent makes every output pixel depend on the whole image,
which no tiling can reproduce. Here the neighbours of ``i`` are the pixels ``j != i`` with
``|p_i - p_j|∞ <= R * d`` (the *reach*), sampled as follows:

* appearance kernel: on a dilated grid, ``p_j - p_i = d * (a, b)`` with ``|a|, |b| <= R``, i.e.
  ``(2R + 1)² - 1`` taps, so that a large σα (DeepLab: 50..80 px) is covered by a fixed number of
  taps (as ConvCRF, Teichmann & Cipolla 2018, covers it by blurring). Each tap stands for the
  ``d × d`` pixels around it and is weighted by ``d²``, so the truncated sum estimates the dense
  sum over the same box and ``w1`` keeps its meaning when ``d`` changes (``d = 1``: exact sum);
* smoothness kernel: on every pixel (σγ = 3 is too narrow to be sampled every ``d`` pixels), out
  to ``min(R * d, ceil(3 σγ))`` (beyond 3σγ a tap weighs under 1.2 % of the centre's).

So one iteration reads inputs at most ``R * d`` pixels away, and ``T`` iterations ``T * R * d``:
:func:`crf_halo`. A pixel missing from the sums — outside the image, or ``valid`` False — is
simply absent (no padding value enters the sums), which is what the whole image does at its
border; hence a window clipped at the image border and grown by the halo elsewhere
(:func:`crf_window`) gives, inside its region of interest, the whole-image result.

Memory is O(K·H·W + C·H·W): the taps are visited one offset at a time through shifted views
(each symmetric pair ``±o`` shares one weight map), never as a (taps, H, W) stack; the smoothness
kernel, separable, is two 1-D passes (with ``d = 1`` it shares the appearance taps' weight
maps instead). The weight maps depend on the image only; they are kept across iterations when
they fit ``weight_cache_bytes`` (1.2-2.8x faster), else recomputed. The tap loop runs strip by
strip of rows so that its working set stays in the CPU cache (1.3-1.7x faster than
whole-window passes). Two floors keep the arithmetic out of subnormal floats (:data:`Q_FLOOR`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tilewise.errors import ConfigError, InputError, PlanError

__all__ = [
    "PROBABILITY_FLOOR",
    "CRFParams",
    "CRFWindow",
    "crf_halo",
    "crf_window",
    "dense_crf",
]

PROBABILITY_FLOOR = 1e-6
"""Probabilities are clamped to at least this before ``-log`` (a 0 would be an infinite unary
that no evidence can overturn, and NaN when every class is 0); pydensecrf clips at 1e-5."""

LOG_WEIGHT_FLOOR = -30.0
"""Appearance-kernel values are at least ``exp(-30) ≈ 9e-14`` (colour-dissimilar pairs would
otherwise give subnormal floats, see :data:`Q_FLOOR`); this changes a message by < 1e-10."""

Q_FLOOR = 1e-18
"""Marginals are at least 1e-18 between iterations (confident pixels would otherwise reach
subnormal floats). CPUs handle subnormals 10-100x slower, and ``torch.set_flush_denormal``
only reaches the calling thread, not torch's intra-op threads; the floors change Q by < 1e-10."""

STRIP_BYTES = 8 * 2**20
"""Working set of one strip of rows in the tap loop: about a core's share of the CPU cache."""

Region = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``: rows ``y0 <= y < y1``, columns ``x0 <= x < x1``."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CRFParams:
    """Parameters of the truncated fully connected CRF (DeepLab-like defaults).

    Attributes:
        iterations: Mean-field iterations ``T`` (DeepLab: 10); 0 returns the input, normalised.
        w_appearance: ``w1``, weight of the appearance (bilateral) kernel (DeepLab: 4).
        theta_alpha: ``σα`` in pixels, spatial scale of the appearance kernel (DeepLab: 50..80).
        theta_beta: ``σβ`` in intensity units (0..255 scale), its colour scale (DeepLab: 3..5).
        w_smoothness: ``w2``, weight of the smoothness (spatial) kernel (DeepLab: 3).
        theta_gamma: ``σγ`` in pixels, spatial scale of the smoothness kernel (DeepLab: 3).
        radius: ``R``: the appearance kernel has ``(2R + 1)² - 1`` taps.
        step: ``d``: its taps are ``d`` pixels apart, so it reaches ``R * d`` pixels.

    The defaults reach 5 px per iteration and need a halo of 50 px (:func:`crf_halo`): a local
    CRF. A longer reach (``step`` 2..4 covers a good part of σα) costs the same per pixel but a
    proportionally larger halo, i.e. more pixels to predict around each write unit.

    Raises:
        ConfigError: (a ``ValueError``) a parameter out of its range.
    """

    iterations: int = 10
    w_appearance: float = 4.0
    theta_alpha: float = 60.0
    theta_beta: float = 5.0
    w_smoothness: float = 3.0
    theta_gamma: float = 3.0
    radius: int = 5
    step: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.iterations) or self.iterations < 0:
            problems.append(f"iterations must be an integer >= 0; got {self.iterations!r}")
        for name in ("w_appearance", "w_smoothness"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0; got {value!r}")
        for name in ("theta_alpha", "theta_beta", "theta_gamma"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be a finite number > 0; got {value!r}")
        if not _is_int(self.radius) or self.radius < 1:
            problems.append(
                f"radius must be an integer >= 1 (a CRF without neighbours does nothing; "
                f"leave the CRF out instead); got {self.radius!r}"
            )
        if not _is_int(self.step) or self.step < 1:
            problems.append(f"step must be an integer >= 1; got {self.step!r}")
        if problems:
            raise ConfigError("CRF parameters: " + "; ".join(problems) + ".")

    @property
    def reach(self) -> int:
        """How far (Chebyshev distance, pixels) one iteration reads: ``radius * step``."""
        return self.radius * self.step

    @property
    def smoothness_radius(self) -> int:
        """Half-width of the smoothness kernel's box: ``min(reach, ceil(3 σγ))``."""
        return min(self.reach, math.ceil(3 * self.theta_gamma))


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def crf_halo(params: CRFParams) -> int:
    """Pixels of context the CRF needs on each side: ``iterations * radius * step``.

    One iteration's output at a pixel depends only on inputs (probabilities, image, validity)
    within ``radius * step`` pixels (Chebyshev distance), so ``T`` iterations on a region grown
    by this halo (and clipped at the image border) are exact on the region.
    """
    return params.iterations * params.reach


@dataclass(frozen=True)
class CRFWindow:
    """What to feed the CRF for one region of interest, and which part of its result is exact.

    Attributes:
        read: ``(y0, y1, x0, x1)`` in image coordinates: the region of interest grown by the
            halo and clipped to the image. Feed the probabilities, image (and mask) of exactly
            this region, unpadded.
        crop: ``(y0, y1, x0, x1)`` relative to ``read``: the part of the CRF's result that equals
            the whole-image result, i.e. the region of interest.
    """

    read: Region
    crop: Region

    @property
    def read_slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of the image for :attr:`read`."""
        y0, y1, x0, x1 = self.read
        return slice(y0, y1), slice(x0, x1)

    @property
    def crop_slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of the CRF's result for :attr:`crop`."""
        y0, y1, x0, x1 = self.crop
        return slice(y0, y1), slice(x0, x1)


def crf_window(region: Region, image_size: tuple[int, int], halo: int) -> CRFWindow:
    """The region to feed the CRF so that its result is exact on ``region``.

    Args:
        region: ``(y0, y1, x0, x1)``, the region of interest (e.g. a write unit), inside the
            image and not empty.
        image_size: ``(H, W)`` of the whole image.
        halo: :func:`crf_halo` of the parameters used.

    Returns:
        The region grown by ``halo`` on every side and clipped to the image (no padding: at the
        image border the CRF's missing neighbours are absent, as for the whole image), and the
        crop of the result that is the region of interest.

    Raises:
        PlanError: (a ``ValueError``) an empty region, one outside the image, or a negative halo.
    """
    y0, y1, x0, x1 = region
    height, width = image_size
    if not all(_is_int(v) for v in (*region, height, width, halo)):
        raise PlanError(
            f"CRF window: region, image size and halo must be integers; got region {region}, "
            f"image size {image_size}, halo {halo!r}."
        )
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise PlanError(
            f"CRF window: the region (y0, y1, x0, x1) must be non-empty and inside the "
            f"{height} x {width} image; got {region}. Clip it to the image first."
        )
    if halo < 0:
        raise PlanError(f"CRF window: the halo must be >= 0 pixels; got {halo}.")
    ry0, ry1 = max(0, y0 - halo), min(height, y1 + halo)
    rx0, rx1 = max(0, x0 - halo), min(width, x1 + halo)
    return CRFWindow(read=(ry0, ry1, rx0, rx1), crop=(y0 - ry0, y1 - ry0, x0 - rx0, x1 - rx0))


# --------------------------------------------------------------------------- mean field


def _pair_slices(
    dy: int, dx: int, rows: tuple[int, int], height: int, width: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of the pixels ``i`` in ``rows`` and of their neighbours ``j = i + (dy, dx)``,
    keeping the pairs whose members are both in the array (the others do not exist: absent
    neighbours). ``dy >= 0``. ``None`` when no pair is left."""
    r0, r1 = rows[0], min(rows[1], height - dy)
    if r0 >= r1 or abs(dx) >= width:
        return None
    rows_i, rows_j = slice(r0, r1), slice(r0 + dy, r1 + dy)
    if dx >= 0:
        cols_i, cols_j = slice(0, width - dx), slice(dx, width)
    else:
        cols_i, cols_j = slice(-dx, width), slice(0, width + dx)
    return (rows_i, cols_i), (rows_j, cols_j)


@dataclass(frozen=True)
class _Tap:
    """One offset ``o`` of the appearance kernel, used for the pair ``(i, i + o)`` and its twin
    ``(i + o, i)`` (the kernel is symmetric), with the constant parts of its weight."""

    dy: int
    dx: int
    log_scale: float  # log(w1 d² exp(-|o|²/2σα²)): added before the exp, saves a pass
    smooth: float  # w2 exp(-|o|²/2σγ²) when the smoothness kernel is folded in, else 0


def _taps(params: CRFParams, fold_smoothness: bool) -> list[_Tap]:
    """Half of the appearance offsets (``dy > 0``, or ``dy == 0 and dx > 0``)."""
    d, r = params.step, params.radius
    rs = params.smoothness_radius
    taps = []
    for a in range(0, r + 1):
        for b in range(-r, r + 1):
            if a == 0 and b <= 0:
                continue
            dy, dx = a * d, b * d
            dist2 = float(dy * dy + dx * dx)
            log_scale = math.log(params.w_appearance * d * d) - dist2 / (2 * params.theta_alpha**2)
            smooth = 0.0
            if fold_smoothness and max(abs(dy), abs(dx)) <= rs:
                smooth = params.w_smoothness * math.exp(-dist2 / (2 * params.theta_gamma**2))
            taps.append(_Tap(dy, dx, log_scale, smooth))
    return taps


def _tap_weight(
    scaled: torch.Tensor,
    tap: _Tap,
    pair: tuple[tuple[slice, slice], tuple[slice, slice]],
    diff: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out`` = the kernel ``k(i, i + o)`` for every pair of the tap (``out`` sized to them)."""
    (ri, ci), (rj, cj) = pair
    hh, ww = out.shape
    t = diff[:hh, :ww]
    out.fill_(tap.log_scale)
    # Channel by channel: torch reduces over a leading dimension with a slow strided kernel.
    for c in range(scaled.shape[0]):
        torch.sub(scaled[c, ri, ci], scaled[c, rj, cj], out=t)
        out.addcmul_(t, t, value=-1.0)
    out.clamp_min_(LOG_WEIGHT_FLOOR).exp_()
    if tap.smooth:
        out.add_(tap.smooth)
    return out


def _shift_sum(
    source: torch.Tensor, weights: list[float], dim: int, out: torch.Tensor
) -> torch.Tensor:
    """``out = sum_t weights[|t|] * source shifted by t along dim`` (|t| < len(weights)),
    missing samples absent (not padded)."""
    size = source.shape[dim]
    torch.mul(source, weights[0], out=out)
    for t in range(1, min(len(weights), size)):
        lo, hi = source.narrow(dim, 0, size - t), source.narrow(dim, t, size - t)
        out.narrow(dim, 0, size - t).add_(hi, alpha=weights[t])
        out.narrow(dim, t, size - t).add_(lo, alpha=weights[t])
    return out


def _check_inputs(
    probabilities: torch.Tensor, image: torch.Tensor, valid: torch.Tensor | None
) -> None:
    if probabilities.ndim != 3 or probabilities.shape[0] < 1:
        raise InputError(
            f"dense_crf: probabilities must be (K, H, W) with K >= 1; got shape "
            f"{tuple(probabilities.shape)}."
        )
    size = tuple(probabilities.shape[1:])
    if image.ndim != 3 or tuple(image.shape[1:]) != size:
        raise InputError(
            f"dense_crf: the image must be (C, H, W) with the probabilities' H x W {size}; got "
            f"shape {tuple(image.shape)}."
        )
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != size):
        raise InputError(
            f"dense_crf: valid must be a bool (H, W) mask of shape {size}; got "
            f"{valid.dtype} {tuple(valid.shape)}."
        )
    if probabilities.device != image.device or (
        valid is not None and valid.device != probabilities.device
    ):
        raise InputError(
            "dense_crf: probabilities, image and valid must be on one device; got "
            f"{probabilities.device}, {image.device}"
            f"{'' if valid is None else ', ' + str(valid.device)}."
        )


@torch.no_grad()
def dense_crf(
    probabilities: torch.Tensor,
    image: torch.Tensor,
    params: CRFParams | None = None,
    valid: torch.Tensor | None = None,
    *,
    weight_cache_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """Refine class probabilities with the truncated fully connected CRF (mean field).

    Args:
        probabilities: (K, H, W) class probabilities (e.g. the network's softmax); clamped to
            at least :data:`PROBABILITY_FLOOR`, then ``-log`` is the unary.
        image: (C, H, W) raw intensities on the 0..255 scale (any C), for the appearance kernel.
        params: :class:`CRFParams`; DeepLab-like defaults when ``None``.
        valid: (H, W) bool, the pixels that exist; ``None``: all. Pixels outside it are absent
            from every sum (as pixels beyond the image border are), and their output is their
            normalised input. Use it to feed a mirror-padded buffer: padded pixels marked
            invalid change nothing.
        weight_cache_bytes: Keep the appearance kernel's weight maps (they depend on the image
            only) across iterations when they take at most this many bytes (about
            ``2 R (R + 1) H W * 4``); larger windows recompute them each iteration.

    Returns:
        (K, H, W) float32 marginals ``Q`` on the tensors' device, summing to 1 over classes.
        Exact on any region whose input reaches :func:`crf_halo` pixels beyond it (or the
        image border): see :func:`crf_window`.

    Memory is O(K·H·W + C·H·W) float32; time O(T · R² · (K + C) · H · W).
    """
    params = CRFParams() if params is None else params
    _check_inputs(probabilities, image, valid)
    num_classes, height, width = probabilities.shape
    channels = image.shape[0]
    log_p = probabilities.to(torch.float32).clamp_min(PROBABILITY_FLOOR).log_()
    q0 = torch.softmax(log_p, dim=0)
    if params.iterations == 0:
        return q0
    mask = None if valid is None else valid.to(torch.float32)

    use_appearance = params.w_appearance > 0
    use_smoothness = params.w_smoothness > 0
    # With d = 1 every smoothness offset is an appearance tap: one weight map serves both.
    fold = use_appearance and use_smoothness and params.step == 1
    taps = _taps(params, fold) if use_appearance else []
    separable: list[float] = []
    if use_smoothness and not fold:
        rs = params.smoothness_radius
        separable = [math.exp(-(t * t) / (2 * params.theta_gamma**2)) for t in range(rs + 1)]

    device = probabilities.device
    # Intensities scaled so that the colour factor is exp(-sum_c (I_i - I_j)²): one pass fewer.
    scaled = image.to(torch.float32) * (1.0 / (math.sqrt(2.0) * params.theta_beta))
    # Work buffers allocated once; per-offset temporaries are views of them (a fresh allocation
    # per offset makes glibc map and unmap pages on every tap: see reference/performance.md).
    diff = torch.empty((height, width), dtype=torch.float32, device=device)
    messages = torch.empty_like(log_p)
    # Visit the taps strip by strip (rows of about STRIP_BYTES of working set): every tap of a
    # strip then finds Q, the messages and the image of those rows in cache, not in memory.
    strip = max(1, STRIP_BYTES // (4 * width * (2 * num_classes + channels + 2)))
    work = [
        (tap, pair)
        for r0 in range(0, height, strip)
        for tap in taps
        if (pair := _pair_slices(tap.dy, tap.dx, (r0, r0 + strip), height, width)) is not None
    ]
    # The weight maps depend on the image only: computed once when they fit in the cache
    # budget (small windows), else recomputed every iteration so memory stays O((K + C) H W).
    cache_size = 4 * sum((ri.stop - ri.start) * (ci.stop - ci.start) for _, ((ri, ci), _) in work)
    cached: list[torch.Tensor] | None = None
    if params.iterations > 1 and cache_size <= weight_cache_bytes:
        cached = []
        for tap, pair in work:
            (ri, ci), _ = pair
            out = torch.empty((ri.stop - ri.start, ci.stop - ci.start), device=device)
            cached.append(_tap_weight(scaled, tap, pair, diff, out))
    weight = torch.empty((height, width), dtype=torch.float32, device=device)
    smooth_buffers = (torch.empty_like(log_p), torch.empty_like(log_p)) if separable else None

    q = q0
    for _ in range(params.iterations):
        source = q if mask is None else q * mask  # absent pixels send nothing
        messages.zero_()
        for index, (tap, pair) in enumerate(work):
            (ri, ci), (rj, cj) = pair
            if cached is not None:
                w = cached[index]
            else:
                w = _tap_weight(
                    scaled,
                    tap,
                    pair,
                    diff,
                    weight[: ri.stop - ri.start, : ci.stop - ci.start],
                )
            messages[:, ri, ci].addcmul_(source[:, rj, cj], w)
            messages[:, rj, cj].addcmul_(source[:, ri, ci], w)
        if smooth_buffers is not None:
            # Box sum of g(dy) g(dx) source over |dy|, |dx| <= rs, minus the centre (i != j).
            rows = _shift_sum(source, separable, 1, smooth_buffers[0])
            box = _shift_sum(rows, separable, 2, smooth_buffers[1])
            box.sub_(source)
            messages.add_(box, alpha=params.w_smoothness)
        # Potts: -θ_i(l) - sum_{l' != l} m(l') = log P(l) + m(l) - sum_l' m(l'); the last part
        # is the same for every l and cancels in the softmax. The floor keeps Q out of
        # subnormal floats (see Q_FLOOR).
        q = torch.softmax(messages.add_(log_p), dim=0).clamp_min_(Q_FLOOR)
    return q if valid is None else torch.where(valid, q, q0)
