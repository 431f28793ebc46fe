"""Independent reference computations the tests compare the engine against."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tilewise.models.registry import TilingFacts


def whole_image(
    model: nn.Module,
    image: np.ndarray,
    facts: TilingFacts,
    *,
    pad_mode: str = "reflect",
    pad_value: float = 0.0,
) -> np.ndarray:
    """Whole-image inference on the mirror-padded image, in one forward pass.

    The image is padded on the left/top by the smallest P >= halo with P == margin (mod stride)
    (the overlap-tile strategy of U-Net: pad, then one valid forward), on the right/bottom to a
    valid input size with at least the halo, and the output is cropped back to the image.
    """
    assert facts.halo is not None
    s, m = facts.stride, facts.margin
    p = next(q for q in range(facts.halo, facts.halo + s) if (q - m) % s == 0)
    _, h, w = image.shape
    ny = facts.size_rule.ceil(p + h + facts.halo)
    nx = facts.size_rule.ceil(p + w + facts.halo)
    widths = ((0, 0), (p, ny - p - h), (p, nx - p - w))
    if pad_mode == "constant":
        padded = np.pad(image, widths, mode="constant", constant_values=pad_value)
    else:
        padded = np.pad(image, widths, mode=pad_mode)
    dtype = next(model.parameters()).dtype
    model.eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(padded).to(dtype)[None])[0].float().numpy()
    off = p - m
    return out[:, off : off + h, off : off + w]


class PoolNet(nn.Module):
    """A small user-supplied same-padded conv net with pooling (total stride 2**pools)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, pools: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(pools):
            layers += [nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = 6
        layers += [nn.Conv2d(c, 6, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.up = nn.ConvTranspose2d(6, 6, 2**pools, stride=2**pools)
        self.head = nn.Conv2d(6 + in_channels, num_classes, 3, padding=1)
        self.pools = pools

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.up(self.body(x)), x], dim=1))

    def halo(self) -> int:
        """Receptive-field radius: 3x3 convs at each scale plus the pooling phase."""
        s = 2**self.pools
        return sum(2**k for k in range(self.pools)) + s + (s - 1) + 1


def sliding_window_reference(
    model: nn.Module, image: np.ndarray, *, crop: int, stride: int, flip: bool
) -> np.ndarray:
    """PSPNet's ``scale_process.m`` written out directly on the whole image (probabilities).

    The image is padded at the bottom/right to at least ``crop`` with zeros (the mean of a
    normalised image), windows start every ``stride`` pixels with the last one moved back to end
    at the border, each window's probabilities are softmax(score(x) + flip(score(flip(x)))), and
    overlapping windows are averaged.
    """
    c, h, w = image.shape
    ph, pw = max(h, crop), max(w, crop)
    padded = np.zeros((c, ph, pw), image.dtype)
    padded[:, :h, :w] = image
    dtype = next(model.parameters()).dtype
    total = None
    count = np.zeros((ph, pw))
    rows = -(-(ph - crop) // stride) + 1
    cols = -(-(pw - crop) // stride) + 1
    model.eval()
    for i in range(rows):
        for j in range(cols):
            y0 = min(i * stride, ph - crop)
            x0 = min(j * stride, pw - crop)
            x = torch.from_numpy(padded[:, y0 : y0 + crop, x0 : x0 + crop]).to(dtype)[None]
            with torch.inference_mode():
                s = model(x)
                if flip:
                    s = s + model(x.flip(-1)).flip(-1)
                p = torch.softmax(s.double(), dim=1)[0].numpy()
            if total is None:
                total = np.zeros((p.shape[0], ph, pw))
            total[:, y0 : y0 + crop, x0 : x0 + crop] += p
            count[y0 : y0 + crop, x0 : x0 + crop] += 1
    assert total is not None
    return (total / count)[:, :h, :w]


class GlobalContextNet(nn.Module):
    """A small net with a global average (PSPNet's bin 1): not translation-equivariant."""

    def __init__(self, in_channels: int = 3, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.context = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x))
        g = self.context(f.mean(dim=(-2, -1), keepdim=True))
        return self.head(torch.relu(f + g))
