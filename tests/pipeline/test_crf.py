"""The truncated fully connected CRF: a brute-force reference, tiling exactness, and its use.

The brute force below writes one mean-field iteration as the definition reads (explicit pairs
``i != j``, Potts compatibility as a matrix, the energy ``-θ_i - sum μ k Q``), in float64 and
independently of the shifted-view implementation.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from tilewise.pipeline import crf
from tilewise.pipeline.crf import (
    PROBABILITY_FLOOR,
    CRFParams,
    crf_halo,
    crf_window,
    dense_crf,
)

# ------------------------------------------------------------------------- helpers


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def _brute_force(
    p: np.ndarray, image: np.ndarray, params: CRFParams, valid: np.ndarray
) -> np.ndarray:
    """``params.iterations`` mean-field iterations with explicit loops over pixel pairs."""
    k_cls, h, w = p.shape
    unary = -np.log(np.maximum(p, PROBABILITY_FLOOR))
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    q0 = q.copy()
    mu = 1.0 - np.eye(k_cls)  # Potts
    d, reach = params.step, params.reach
    pixels = list(itertools.product(range(h), range(w)))
    for _ in range(params.iterations):
        new = np.empty_like(q)
        for yi, xi in pixels:
            energy = unary[:, yi, xi].copy()
            for yj, xj in pixels:
                if (yi, xi) == (yj, xj) or not valid[yj, xj]:
                    continue  # no self pair; absent pixels send nothing
                dy, dx = yj - yi, xj - xi
                cheb, dist2 = max(abs(dy), abs(dx)), dy * dy + dx * dx
                kernel = 0.0
                if dy % d == 0 and dx % d == 0 and cheb <= reach:
                    colour = float(((image[:, yi, xi] - image[:, yj, xj]) ** 2).sum())
                    kernel += (
                        params.w_appearance
                        * d
                        * d
                        * math.exp(
                            -dist2 / (2 * params.theta_alpha**2)
                            - colour / (2 * params.theta_beta**2)
                        )
                    )
                if cheb <= params.smoothness_radius:
                    kernel += params.w_smoothness * math.exp(-dist2 / (2 * params.theta_gamma**2))
                energy += kernel * (mu @ q[:, yj, xj])
            e = np.exp(-(energy - energy.min()))
            new[:, yi, xi] = e / e.sum()
        q = new
    return np.where(valid[None], q, q0)


def _scene(h: int, w: int, seed: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """True labels (3 classes: background, a disk plus a thin band, a rectangle), an RGB image
    of piecewise-constant colours plus noise, and noisy class probabilities."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros((h, w), dtype=np.int64)
    labels[(yy - 0.45 * h) ** 2 + (xx - 0.3 * w) ** 2 < (0.28 * h) ** 2] = 1
    labels[np.abs(yy - 0.5 * xx - 0.7 * h) < 6] = 1
    labels[(yy > 0.15 * h) & (yy < 0.8 * h) & (xx > 0.6 * w) & (xx < 0.9 * w)] = 2
    colours = np.array([[70, 90, 60], [200, 120, 90], [90, 150, 210]], dtype=np.float64)
    image = colours[labels].transpose(2, 0, 1) + rng.normal(0, 4, (3, h, w))
    onehot = np.stack([(labels == k).astype(np.float64) for k in range(3)])
    logits = 4 * gaussian_filter(onehot, (0, 3, 3)) + rng.normal(0, 2.5, (3, h, w))
    p = np.exp(logits - logits.max(axis=0))
    return labels, _t(image), _t(p / p.sum(axis=0))


def _mean_iu(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    ious = []
    for k in range(classes):
        union = ((pred == k) | (truth == k)).sum()
        if union:
            ious.append(((pred == k) & (truth == k)).sum() / union)
    return float(np.mean(ious))


def _smooth_random(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random RGB image and uncertain random probabilities (K = 3): every neighbour
    matters, so a missing one shows."""
    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.uniform(0, 255, (3, h, w)), (0, 2, 2))
    logits = rng.normal(0, 1.0, (3, h, w))
    p = np.exp(logits) / np.exp(logits).sum(axis=0)
    return _t(image), _t(p)


# ------------------------------------------------------------------------- reference


BRUTE_PARAMS = [
    # d = 1: the smoothness kernel folded into the appearance taps.
    CRFParams(iterations=2, radius=2, step=1, theta_alpha=3, theta_beta=20, w_smoothness=0.5,
              w_appearance=1.0, theta_gamma=1.5),
    # d = 2: dilated appearance taps (weighted d²) plus a separable smoothness box.
    CRFParams(iterations=2, radius=2, step=2, theta_alpha=4, theta_beta=20, w_smoothness=0.5,
              w_appearance=0.3, theta_gamma=1.0),
    # One kernel alone (separable smoothness with d = 1; appearance without smoothness).
    CRFParams(iterations=1, radius=3, step=1, w_appearance=0.0, w_smoothness=1.0, theta_gamma=2),
    CRFParams(iterations=1, radius=1, step=3, w_smoothness=0.0, theta_beta=30, theta_alpha=5),
]  # fmt: skip


@pytest.mark.parametrize("params", BRUTE_PARAMS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_mean_field_equals_a_brute_force_double_loop(
    params: CRFParams, with_mask: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    k_cls, h, w = 3, 9, 11
    p = rng.dirichlet(np.ones(k_cls), size=(h, w)).transpose(2, 0, 1)
    image = rng.uniform(0, 255, (3, h, w))
    image[:, :4] = 100 + rng.normal(0, 8, (3, 4, w))  # a similar-coloured part: strong pairs
    valid = rng.random((h, w)) > 0.2 if with_mask else np.ones((h, w), dtype=bool)
    expected = _brute_force(p, image, params, valid)
    mask = torch.from_numpy(valid) if with_mask else None
    got = dense_crf(_t(p), _t(image), params, mask).double().numpy()
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(expected - p / p.sum(axis=0)).max() > 0.05  # the CRF did change something
    # Strips of one row and no weight cache: the same sums in another order.
    monkeypatch.setattr(crf, "STRIP_BYTES", 1)
    got = dense_crf(_t(p), _t(image), params, mask, weight_cache_bytes=0).double().numpy()
    assert np.abs(got - expected).max() <= 1e-5


def test_zero_iterations_return_the_normalised_input_and_outputs_are_distributions() -> None:
    image, p = _smooth_random(20, 30, 0)
    raw = p * 3.0  # not normalised
    assert torch.allclose(dense_crf(raw, image, CRFParams(iterations=0)), p, atol=1e-6)
    valid = torch.ones(20, 30, dtype=torch.bool)
    valid[5:9, 7:12] = False
    q = dense_crf(p, image, CRFParams(iterations=3), valid)
    assert q.dtype == torch.float32 and q.shape == p.shape
    assert torch.allclose(q.sum(dim=0), torch.ones(20, 30), atol=1e-5)
    assert torch.allclose(q[:, ~valid], p[:, ~valid], atol=1e-6)  # absent: input kept


# ------------------------------------------------------------------------- usefulness


def test_crf_raises_mean_iu_on_a_noisy_prediction() -> None:
    labels, image, p = _scene(120, 160, seed=0)
    before = _mean_iu(p.argmax(0).numpy(), labels, 3)
    after = _mean_iu(dense_crf(p, image, CRFParams()).argmax(0).numpy(), labels, 3)
    smooth_only = dense_crf(p, image, CRFParams(w_appearance=0.0)).argmax(0).numpy()
    assert before < 0.75  # the input is really noisy
    assert after >= before + 0.15 and after > 0.95
    # The image matters: colour edges place the boundaries better than smoothing alone.
    assert after > _mean_iu(smooth_only, labels, 3) + 0.01


# ------------------------------------------------------------------------- tiling


def test_crf_window_grows_by_the_halo_and_clips_at_the_border() -> None:
    params = CRFParams(iterations=4, radius=3, step=2)
    assert crf_halo(params) == 24
    win = crf_window((10, 20, 30, 40), (100, 50), 15)
    assert win.read == (0, 35, 15, 50) and win.crop == (10, 20, 15, 25)
    assert win.read_slices == (slice(0, 35), slice(15, 50))
    assert win.crop_slices == (slice(10, 20), slice(15, 25))
    inner = crf_window((40, 60, 20, 30), (100, 50), 5)
    assert inner.read == (35, 65, 15, 35) and inner.crop == (5, 25, 5, 15)


ROWS = [(0, 50), (50, 110), (110, 160)]
COLS = [(0, 70), (70, 130), (130, 200)]  # 9 regions: 4 corners, 4 border sides, 1 interior
TILE_PARAMS = [
    CRFParams(iterations=3, radius=2, step=2, theta_beta=10),
    CRFParams(iterations=4, radius=3, step=1, w_appearance=1.0, w_smoothness=1.0, theta_beta=10),
]


def _tiled(
    p: torch.Tensor,
    image: torch.Tensor,
    params: CRFParams,
    halo: int,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Run the CRF region by region, each on its window grown by ``halo``, and stitch."""
    out = torch.full_like(p, float("nan"))
    size = (p.shape[1], p.shape[2])
    for (y0, y1), (x0, x1) in itertools.product(ROWS, COLS):
        win = crf_window((y0, y1, x0, x1), size, halo)
        rows, cols = win.read_slices
        mask = None if valid is None else valid[rows, cols]
        q = dense_crf(p[:, rows, cols], image[:, rows, cols], params, mask)
        out[:, y0:y1, x0:x1] = q[(slice(None), *win.crop_slices)]
    return out


@pytest.mark.parametrize("params", TILE_PARAMS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_tiled_crf_equals_whole_image_crf_and_one_pixel_less_halo_does_not(
    params: CRFParams, with_mask: bool
) -> None:
    image, p = _smooth_random(160, 200, seed=3)
    valid = None
    if with_mask:
        yy, xx = torch.meshgrid(torch.arange(160), torch.arange(200), indexing="ij")
        valid = ((yy - 80) ** 2 + (xx - 100) ** 2 > 25**2) & ~((yy < 20) & (xx > 150))
    whole = dense_crf(p, image, params, valid)
    halo = crf_halo(params)
    exact = _tiled(p, image, params, halo, valid)
    assert (exact - whole).abs().max().item() <= 1e-5
    short = _tiled(p, image, params, halo - 1, valid)
    assert (short - whole).abs().max().item() > 1e-4


def test_invalid_padding_equals_the_unpadded_window() -> None:
    """A mirror-padded buffer whose padding is marked invalid gives the unpadded result."""
    image, p = _smooth_random(40, 50, seed=5)
    params = CRFParams(iterations=3, radius=2, step=2, theta_beta=10)
    expected = dense_crf(p, image, params)
    pad = (7, 7, 7, 7)
    padded_p = torch.nn.functional.pad(p[None], pad, mode="reflect")[0]
    padded_image = torch.nn.functional.pad(image[None], pad, mode="reflect")[0]
    valid = torch.zeros(54, 64, dtype=torch.bool)
    valid[7:47, 7:57] = True
    got = dense_crf(padded_p, padded_image, params, valid)[:, 7:47, 7:57]
    assert (got - expected).abs().max().item() <= 1e-5
    leaky = dense_crf(padded_p, padded_image, params)[:, 7:47, 7:57]
    assert (leaky - expected).abs().max().item() > 1e-3  # padding would leak in otherwise


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"theta_beta": -5.0}, "theta_beta must be a finite number > 0; got -5.0"),
        ({"theta_alpha": 0}, "theta_alpha must be a finite number > 0; got 0"),
        ({"theta_gamma": float("nan")}, "theta_gamma must be a finite number > 0"),
        ({"radius": 0, "step": 4}, "radius must be an integer >= 1"),
        ({"step": 0}, "step must be an integer >= 1; got 0"),
        ({"iterations": -1}, "iterations must be an integer >= 0; got -1"),
        ({"iterations": 2.5}, "iterations must be an integer >= 0; got 2.5"),
        ({"w_appearance": -1.0}, "w_appearance must be a finite number >= 0; got -1.0"),
        ({"radius": True}, "radius must be an integer >= 1"),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_rule(
    kwargs: dict[str, object], words: str
) -> None:
    with pytest.raises(ValueError, match="CRF parameters") as info:
        CRFParams(**kwargs)  # type: ignore[arg-type]
    assert words in str(info.value)


def test_bad_inputs_and_windows_raise_value_error() -> None:
    image, p = _smooth_random(10, 12, seed=1)
    with pytest.raises(ValueError, match="image must be"):
        dense_crf(p, image[:, :9])
    with pytest.raises(ValueError, match="valid must be a bool"):
        dense_crf(p, image, valid=torch.ones(10, 12))
    with pytest.raises(ValueError, match="probabilities must be"):
        dense_crf(p[0], image)
    with pytest.raises(ValueError, match="inside the 100 x 50 image"):
        crf_window((90, 110, 0, 10), (100, 50), 4)
    with pytest.raises(ValueError, match="non-empty"):
        crf_window((10, 10, 0, 10), (100, 50), 4)
    with pytest.raises(ValueError, match="halo must be >= 0"):
        crf_window((10, 20, 0, 10), (100, 50), -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    _, image, p = _scene(120, 160, seed=2)
    params = CRFParams(iterations=5, radius=3, step=2)
    cpu = dense_crf(p, image, params)
    gpu = dense_crf(p.cuda(), image.cuda(), params).cpu()
    assert (gpu - cpu).abs().max().item() <= 1e-4
