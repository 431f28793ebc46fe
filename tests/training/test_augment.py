"""Tests of the patch augmentation: exact flips/rotations, the elastic warp, jitter."""

from __future__ import annotations

import numpy as np
import pytest

from tilewise.errors import ConfigError
from tilewise.spec import AugmentSpec, ElasticSpec, JitterSpec
from tilewise.training.augment import (
    Augment,
    AugmentConfig,
    elastic_field,
    jitter,
    upsample_field,
    warp,
)

GEOMETRY_ONLY = AugmentConfig(flip=True, rotate90=True)


def _patch(
    h: int = 24, w: int = 24, c: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (c, h, w), dtype=np.uint8)
    label = rng.integers(0, 5, (h, w), dtype=np.uint8)
    weight = rng.random((h, w)).astype(np.float32)
    return image, label, weight


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of the last two axes, straight from numpy."""
    out = []
    for k in range(4):
        r = np.rot90(a, k, axes=(-2, -1))
        out += [r, np.flip(r, axis=-1)]
    return out


def test_flips_and_rotations_are_exact_permutations_applied_alike() -> None:
    image, label, weight = _patch()
    # Pixel ids tell which of the 8 transforms ran; image, label and weight must agree on it.
    ids = np.arange(24 * 24).reshape(24, 24)
    candidates = _dihedral(ids)
    augment = Augment(GEOMETRY_ONLY)
    seen = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        stacked = np.concatenate([image.astype(np.float64), ids[None].astype(np.float64)])
        out_stacked, out_label, out_weight = augment(stacked, label, weight, rng)
        which = [j for j, cand in enumerate(candidates) if np.array_equal(out_stacked[3], cand)]
        assert len(which) == 1
        j = which[0]
        seen.add(j)
        np.testing.assert_array_equal(out_stacked[:3], _dihedral(image)[j])
        np.testing.assert_array_equal(out_label, _dihedral(label)[j])
        assert out_weight is not None
        np.testing.assert_array_equal(out_weight, _dihedral(weight)[j])
    assert seen == set(range(8))
    out_image, _, _ = augment(image, label, None, np.random.default_rng(0))
    assert out_image.dtype == np.uint8 and out_image.flags.c_contiguous


def test_rectangular_patches_keep_their_shape() -> None:
    image, label, _ = _patch(16, 24)
    augment = Augment(GEOMETRY_ONLY)
    allowed = [
        label,
        np.flip(label, 0),
        np.flip(label, 1),
        np.rot90(label, 2),
    ]
    seen = set()
    for seed in range(40):
        out_image, out_label, _ = augment(image, label, None, np.random.default_rng(seed))
        assert out_image.shape == image.shape
        (j,) = [j for j, a in enumerate(allowed) if np.array_equal(out_label, a)]
        seen.add(j)
    assert seen == {0, 1, 2, 3}


def test_elastic_with_std_zero_is_the_identity() -> None:
    image, label, weight = _patch(33, 40)
    augment = Augment(AugmentConfig(flip=False, rotate90=False, elastic_p=1.0, elastic_std=0.0))
    out_image, out_label, out_weight = augment(image, label, weight, np.random.default_rng(1))
    assert out_image.dtype == np.float32
    np.testing.assert_array_equal(out_image, image.astype(np.float32))
    np.testing.assert_array_equal(out_label, label)
    assert out_weight is not None
    np.testing.assert_array_equal(out_weight, weight)


def test_elastic_labels_keep_only_input_values() -> None:
    image, label, weight = _patch(48, 48)
    label = np.where(label < 3, 7, 250).astype(np.uint8)  # two classes far apart
    augment = Augment(AugmentConfig(flip=False, rotate90=False, elastic_p=1.0, elastic_std=10.0))
    out_image, out_label, out_weight = augment(image, label, weight, np.random.default_rng(5))
    assert set(np.unique(out_label)) <= {7, 250}
    assert out_weight is not None and set(np.unique(out_weight)) <= set(np.unique(weight))
    assert not np.array_equal(out_label, label)  # it did deform
    assert image.min() <= out_image.min() and out_image.max() <= image.max()  # bilinear


def test_upsampled_field_puts_coarse_points_on_the_right_pixels() -> None:
    coarse = np.zeros((3, 3))
    coarse[1, 1] = 4.0
    field = upsample_field(coarse, (65, 41))
    # Point (i, j) sits on pixel (i * 64 / 2, j * 40 / 2): the centre is (32, 20).
    assert field[32, 20] == pytest.approx(4.0)
    assert field[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert field[64, 40] == pytest.approx(0.0, abs=1e-12)
    assert field[0, 20] == pytest.approx(0.0, abs=1e-12)
    assert np.abs(field).max() == pytest.approx(4.0)  # a spline through the points, no overshoot
    np.testing.assert_allclose(upsample_field(np.full((3, 3), 2.5), (10, 12)), 2.5)
    dy, dx = elastic_field((20, 30), 10.0, 3, np.random.default_rng(0))
    assert dy.shape == dx.shape == (20, 30)


def test_a_known_field_moves_a_pixel_where_the_hand_computation_says() -> None:
    h, w = 65, 41
    image = np.arange(h * w, dtype=np.float32).reshape(1, h, w)  # value = 41 * y + x
    label = np.arange(h * w).reshape(h, w)
    coarse = np.zeros((3, 3))
    coarse[1, 1] = 4.0  # the centre pixel (32, 20) looks 4 rows further down
    dy = upsample_field(coarse, (h, w))
    dx = np.zeros((h, w))
    out_image, out_label, _ = warp(image, label, None, dy, dx)
    assert out_image[0, 32, 20] == pytest.approx(41 * 36 + 20)
    assert out_label[32, 20] == 36 * 41 + 20
    assert out_image[0, 0, 0] == 0  # corners do not move


def test_warp_interpolates_bilinearly_and_mirrors_at_the_border() -> None:
    image = np.array([[[0.0, 10.0, 20.0, 30.0]] * 3], np.float32)  # (1, 3, 4): value = 10 x
    label = np.array([[0, 1, 2, 3]] * 3, np.uint8)
    zero = np.zeros((3, 4))
    # Half a pixel right: the mean of two neighbours; nearest for the label (0.4 -> same pixel).
    out_image, out_label, _ = warp(image, label, None, zero, zero + 0.5)
    np.testing.assert_allclose(out_image[0, 0, :3], [5.0, 15.0, 25.0])
    _, out_label, _ = warp(image, label, None, zero, zero + 0.4)
    np.testing.assert_array_equal(out_label[0], [0, 1, 2, 3])
    _, out_label, _ = warp(image, label, None, zero, zero + 0.6)
    # x + 0.6 rounds to x + 1; past the last column (3 + 1 = 4) the image mirrors to column 2.
    np.testing.assert_array_equal(out_label[0], [1, 2, 3, 2])
    # Two pixels left: columns -2 and -1 mirror to 2 and 1 (numpy 'reflect').
    out_image, out_label, _ = warp(image, label, None, zero, zero - 2.0)
    np.testing.assert_array_equal(out_label[0], [2, 1, 0, 1])
    np.testing.assert_allclose(out_image[0, 0], [20.0, 10.0, 0.0, 10.0])


def test_jitter_changes_the_image_only_by_an_affine_map_per_band() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 190, (2, 20, 20), dtype=np.uint8)  # no clipping at +-10 %
    label = rng.integers(0, 3, (20, 20), dtype=np.uint8)
    weight = rng.random((20, 20)).astype(np.float32)
    augment = Augment(AugmentConfig(flip=False, rotate90=False, brightness=0.1, contrast=0.2))
    out_image, out_label, out_weight = augment(image, label, weight, np.random.default_rng(3))
    np.testing.assert_array_equal(out_label, label)
    assert out_weight is not None
    np.testing.assert_array_equal(out_weight, weight)
    assert out_image.dtype == np.float32
    scales = []
    for band in range(2):
        x, y = image[band].ravel().astype(np.float64), out_image[band].ravel().astype(np.float64)
        slope, intercept = np.polyfit(x, y, 1)
        np.testing.assert_allclose(y, slope * x + intercept, atol=1e-3)
        scales.append(slope)
        assert 0.8 <= slope <= 1.2
        # The band's mean moves by the brightness shift only: at most 0.1 * 255.
        assert abs(y.mean() - x.mean()) <= 0.1 * 255 + 1e-3
    assert scales[0] == pytest.approx(scales[1], rel=1e-5)  # one contrast for the patch


def test_jitter_by_hand_and_clipping() -> None:
    image = np.array([[[0, 100], [200, 255]]], np.uint8)  # mean 138.75
    out = jitter(image, shift=0.1, scale=2.0)
    expected = (image.astype(np.float64) - 138.75) * 2.0 + 138.75 + 25.5
    np.testing.assert_allclose(out, np.clip(expected, 0, 255), rtol=1e-6)
    assert out.min() == 0 and out.max() == 255
    floats = np.array([[[0.0, 1.0]]], np.float32)
    np.testing.assert_allclose(jitter(floats, shift=-0.5, scale=1.0), [[[-0.5, 0.5]]])


def test_augment_is_seeded() -> None:
    image, label, weight = _patch(32, 32)
    config = AugmentConfig(elastic_p=1.0, brightness=0.1, contrast=0.1)
    a = Augment(config)(image, label, weight, np.random.default_rng(11))
    b = Augment(config)(image, label, weight, np.random.default_rng(11))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    own = Augment(config, seed=4)
    c, d = own(image, label, weight), Augment(config, seed=4)(image, label, weight)
    np.testing.assert_array_equal(c[0], d[0])


def test_config_checks_and_spec() -> None:
    with pytest.raises(ConfigError, match="elastic_std"):
        AugmentConfig(elastic_std=-1.0)
    with pytest.raises(ConfigError, match="elastic_grid"):
        AugmentConfig(elastic_grid=1)
    with pytest.raises(ConfigError, match="contrast"):
        AugmentConfig(contrast=1.5)
    assert not AugmentConfig().resamples
    spec = AugmentSpec(
        flip=False, elastic=ElasticSpec(std=5.0, p=0.3), jitter=JitterSpec(brightness=0.2)
    )
    config = AugmentConfig.from_spec(spec)
    assert config == AugmentConfig(
        flip=False,
        rotate90=True,
        elastic_p=0.3,
        elastic_std=5.0,
        elastic_grid=3,
        brightness=0.2,
        contrast=0.1,
    )
    assert AugmentConfig.from_spec(AugmentSpec()) == AugmentConfig()
