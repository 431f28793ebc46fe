"""Data augmentation of training patches: flips, 90° rotations, elastic deformation, jitter.

U-Net (Ronneberger et al. 2015, section 3.1) trains on few images thanks to strong
augmentation; its key ingredient is the elastic deformation: "random displacement vectors on a
coarse 3 by 3 grid. The displacements are sampled from a Gaussian distribution with 10 pixels
standard deviation. Per-pixel displacements are then computed using bicubic interpolation."

Geometric transforms move the image, the label and the weight map together. The image is
resampled bilinearly; labels and weights with nearest neighbour, so that a label stays a valid
class id (interpolating between class 1 and class 3 would invent class 2). Intensity jitter
(brightness, contrast) touches the image only. The object ids of an instance shard go where the
label goes and are moved the same way: nearest neighbour keeps every id an id of the input (an
interpolated id would name another object, or none). Positions that the elastic field moves
outside the patch are mirrored into it, so an object within a few pixels of the border may gain a
mirrored piece with the same id at the border; its target is then both pieces as one object (one
mask, one box around both), a rare and small error that the dense labels share.

Everything runs on numpy arrays, image (C, h, w), label (h, w), weight (h, w) or ``None``,
drawn from a numpy ``Generator`` that the caller passes (the loader derives one per patch, so
the result does not depend on which thread augments which patch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from tilewise.errors import ConfigError

__all__ = ["Augment", "AugmentConfig", "elastic_field", "jitter", "upsample_field", "warp"]


@dataclass(frozen=True)
class AugmentConfig:
    """What :class:`Augment` does to each patch.

    Attributes:
        flip: flip up-down and left-right, each with probability 1/2.
        rotate90: rotate by 0, 90, 180 or 270 degrees, equally likely (0 or 180 for patches
            that are not square, which a quarter turn would reshape).
        elastic_p: probability of an elastic deformation (0 turns it off).
        elastic_std: standard deviation of the coarse displacements, in px (U-Net: 10).
        elastic_grid: points per side of the coarse displacement grid (U-Net: 3).
        brightness: add ``b * R`` with ``b ~ U(-brightness, brightness)`` and ``R`` the dtype's
            range (255 for uint8, 65535 for uint16, 1 for floats): a shift in normalised units
            when the normaliser scales by 1/R and divides by std 1.
        contrast: scale each band about its mean by ``c ~ U(1 - contrast, 1 + contrast)``
            (at most 1, so that ``c`` stays >= 0).

    The defaults (flips and rotations only) match the job spec's: elastic deformation and
    jitter are asked for.
    """

    flip: bool = True
    rotate90: bool = True
    elastic_p: float = 0.0
    elastic_std: float = 10.0
    elastic_grid: int = 3
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip", "rotate90"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"augment.{name} must be true or false; got {getattr(self, name)!r}."
                )
        _check_number("elastic_p", self.elastic_p, high=1.0)
        _check_number("elastic_std", self.elastic_std)
        _check_number("brightness", self.brightness)
        _check_number("contrast", self.contrast, high=1.0)
        grid = self.elastic_grid
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ConfigError(
                f"augment.elastic_grid must be an integer >= 2 (points per side of the coarse "
                f"displacement grid; U-Net uses 3); got {grid!r}."
            )

    @property
    def resamples(self) -> bool:
        """Whether the image may leave its dtype (interpolated or jittered: then float32)."""
        return self.elastic_p > 0 or self.brightness > 0 or self.contrast > 0

    @classmethod
    def from_spec(cls, spec: Any) -> AugmentConfig:
        """From a job's ``augment`` section (:class:`tilewise.spec.AugmentSpec`): ``elastic``
        and ``jitter`` are ``None`` (off) or hold ``p``/``std``/``grid`` and
        ``brightness``/``contrast``."""
        elastic, jitter = spec.elastic, spec.jitter
        return cls(
            flip=bool(spec.flip),
            rotate90=bool(spec.rotate90),
            elastic_p=0.0 if elastic is None else float(elastic.p),
            elastic_std=10.0 if elastic is None else float(elastic.std),
            elastic_grid=3 if elastic is None else int(elastic.grid),
            brightness=0.0 if jitter is None else float(jitter.brightness),
            contrast=0.0 if jitter is None else float(jitter.contrast),
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict."""
        return asdict(self)


def _check_number(name: str, value: object, high: float | None = None) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    if ok and high is not None:
        ok = float(value) <= high  # type: ignore[arg-type]
    if not ok:
        span = f"in [0, {high:g}]" if high is not None else ">= 0"
        raise ConfigError(f"augment.{name} must be a number {span}; got {value!r}.")


def elastic_field(
    shape: tuple[int, int], std: float, grid: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """U-Net's displacement field: ``grid`` x ``grid`` Gaussian displacements (``std`` px),
    placed on the patch corners and spread evenly between them, upsampled to every pixel by
    bicubic (cubic spline) interpolation. Returns ``(dy, dx)``, each (h, w) float64.
    """
    coarse = rng.normal(0.0, std, size=(2, grid, grid))
    return upsample_field(coarse[0], shape), upsample_field(coarse[1], shape)


def upsample_field(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A coarse (g, g) field as (h, w): coarse point ``(i, j)`` sits on pixel
    ``(i * (h - 1) / (g - 1), j * (w - 1) / (g - 1))`` (the corners on the corner pixels), and
    the pixels between get the cubic spline through the coarse points."""
    h, w = shape
    g_y, g_x = coarse.shape
    # grid_mode=False maps output pixel o to input o * (g - 1) / (n - 1): corners on corners.
    dense = ndimage.zoom(
        coarse.astype(np.float64), (h / g_y, w / g_x), order=3, mode="mirror", grid_mode=False
    )
    if dense.shape != (h, w):  # zoom rounds the output shape; it is exact for these ratios
        raise AssertionError(f"upsampled field {dense.shape} is not {(h, w)}")
    return dense


def warp(
    image: np.ndarray,
    label: np.ndarray,
    weight: np.ndarray | None,
    dy: np.ndarray,
    dx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resample by a displacement field: ``out[y, x] = in[y + dy[y, x], x + dx[y, x]]``.

    The image is interpolated bilinearly (float32 out); label and weight take the nearest input
    pixel, so they hold only values of the input. Positions outside the patch are mirrored into
    it (numpy ``reflect``, no edge repeat), as the tiler pads images.
    """
    h, w = label.shape
    yy, xx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    coords = np.stack([yy + dy, xx + dx])
    out_image = np.empty(image.shape, np.float32)
    for c in range(image.shape[0]):
        ndimage.map_coordinates(
            image[c].astype(np.float32, copy=False),
            coords,
            output=out_image[c],
            order=1,
            mode="mirror",
        )
    # Nearest neighbour by rounding the coordinates ourselves: map_coordinates' order 0 uses the
    # same rule, but an explicit index keeps labels out of any float arithmetic.
    iy = _mirror(np.rint(coords[0]).astype(np.intp), h)
    ix = _mirror(np.rint(coords[1]).astype(np.intp), w)
    out_label = label[iy, ix]
    out_weight = None if weight is None else weight[iy, ix]
    return out_image, out_label, out_weight


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected into ``0..n-1`` about the edge pixels (numpy ``reflect``)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _dtype_range(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def jitter(
    image: np.ndarray, shift: float, scale: float, dtype: np.dtype | None = None
) -> np.ndarray:
    """``(x - mean) * scale + mean + shift * R`` per band (means over the patch), as float32;
    clipped to the range of ``dtype`` (the image's original dtype) when it is an integer type.
    ``R`` is that dtype's range (255 for uint8, 1 for floats)."""
    dtype = np.dtype(dtype if dtype is not None else image.dtype)
    x = image.astype(np.float32, copy=True)
    mean = x.mean(axis=(1, 2), keepdims=True)
    x -= mean
    x *= np.float32(scale)
    x += mean + np.float32(shift * _dtype_range(dtype))
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        np.clip(x, info.min, info.max, out=x)
    return x


class Augment:
    """Random augmentation of a patch, as :class:`AugmentConfig` says.

    Args:
        config: the settings; the default flips and rotates only.
        seed: seed of the generator used when a call passes no ``rng``.

    Call it as ``augment(image, label, weight, rng)``; ``image`` (C, h, w), ``label`` (h, w),
    ``weight`` (h, w) or ``None``. It returns new arrays; the image is float32 when the config
    can resample or jitter (:attr:`AugmentConfig.resamples`), and keeps its dtype otherwise, so
    that every patch of a batch has the same dtype. Order: flips, rotation, elastic, jitter.
    """

    def __init__(self, config: AugmentConfig | None = None, *, seed: int = 0) -> None:
        self.config = config if config is not None else AugmentConfig()
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Augment({self.config})"

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        weight: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Augmented copies of ``image``, ``label`` and ``weight``."""
        cfg = self.config
        rng = self.rng if rng is None else rng
        if image.ndim != 3 or label.shape != image.shape[1:]:
            raise ValueError(
                f"augment needs image (C, h, w) and label (h, w) of the same size; got "
                f"{image.shape} and {label.shape}"
            )
        if weight is not None and weight.shape != label.shape:
            raise ValueError(f"weight {weight.shape} does not match label {label.shape}")
        dtype = image.dtype
        h, w = label.shape
        arrays: list[np.ndarray | None] = [image, label, weight]

        def apply(op: Any) -> None:
            for i, a in enumerate(arrays):
                if a is not None:
                    arrays[i] = op(a)

        if cfg.flip:
            if rng.random() < 0.5:
                apply(lambda a: np.flip(a, axis=-2))
            if rng.random() < 0.5:
                apply(lambda a: np.flip(a, axis=-1))
        if cfg.rotate90:
            k = int(rng.integers(4)) if h == w else 2 * int(rng.integers(2))
            if k:
                apply(lambda a: np.rot90(a, k, axes=(-2, -1)))
        image_out, label_out, weight_out = (
            None if a is None else np.ascontiguousarray(a) for a in arrays
        )
        assert image_out is not None and label_out is not None
        if cfg.elastic_p > 0 and rng.random() < cfg.elastic_p and h > 1 and w > 1:
            dy, dx = elastic_field((h, w), cfg.elastic_std, cfg.elastic_grid, rng)
            image_out, label_out, weight_out = warp(image_out, label_out, weight_out, dy, dx)
        if cfg.brightness > 0 or cfg.contrast > 0:
            b = rng.uniform(-cfg.brightness, cfg.brightness)
            c = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)
            image_out = jitter(image_out, b, c, dtype)
        if cfg.resamples and image_out.dtype != np.float32:
            image_out = image_out.astype(np.float32)
        return image_out, label_out, weight_out
