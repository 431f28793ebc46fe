"""Output pyramids built from the streamed output, and PNG previews.

Levels are checked against reductions computed here from the stored level 0, with a different
method (per-block value counts), and read back by the ome-zarr reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from tests.conftest import write_input
from tilewise.cli import main
from tilewise.errors import InputError
from tilewise.pipeline.driver import run_job
from tilewise.pipeline.preview import GAP, LEGEND_HEIGHT, write_preview
from tilewise.pipeline.pyramid import (
    auto_levels,
    level_shapes,
    reduce_tensor,
    reduce_unit,
    streamed_levels,
)
from tilewise.spec import parse_job


def _edge_pad(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)]
    return np.pad(a, pad, mode="edge")


def mode_by_counts(a: np.ndarray) -> np.ndarray:
    """Reference 2x2 mode: counts of each block's four values, first of the most frequent."""
    a = _edge_pad(a)
    h, w = a.shape
    blocks = a.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(h // 2, w // 2, 4)
    counts = (blocks[..., :, None] == blocks[..., None, :]).sum(axis=-1)
    first_best = counts.argmax(axis=-1)  # argmax returns the first of equal counts
    return np.take_along_axis(blocks, first_best[..., None], axis=-1)[..., 0]


def mean_by_blocks(a: np.ndarray) -> np.ndarray:
    a = _edge_pad(a).astype(np.float64)
    c, h, w = a.shape
    return a.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def _job(tmp_path: Path, **output: Any) -> Any:
    return parse_job(
        {
            "kind": "predict",
            "input": {"path": str(tmp_path / "in.zarr")},
            "model": {"arch": "unet_same", "num_classes": 3, "args": {"depth": 2, "base_width": 4}},
            "tiling": {"tile": 128},
            "output": {"path": str(tmp_path / "out.zarr"), "chunk": 256, **output},
        }
    )


def test_level_rules() -> None:
    assert level_shapes(601, 700, 3) == [(601, 700), (301, 350), (151, 175)]
    assert auto_levels(601, 700, 256) == 3  # 700 -> 350 -> 175: the third fits one chunk
    assert auto_levels(100, 80, 256) == 1
    assert streamed_levels(1024, 8) == 3  # 512, 256, 128-pixel chunks; 64 is built at the end
    assert streamed_levels(256, 3) == 1
    assert streamed_levels(384, 5) == 1  # 192 is whole, 96 is too small
    assert streamed_levels(256, 1) == 0


@pytest.mark.parametrize("shape", [(64, 64), (33, 50), (1, 7), (2, 2, 31, 17)])
def test_device_reductions_give_the_hosts_bytes(shape: tuple[int, ...]) -> None:
    """Predictors reduce streamed levels with torch, the driver the coarser ones with numpy: a
    level must not depend on which did it. Few classes make ties (a mode rule that differs on
    ties fails here); probabilities cover float16 subnormals next to values near 1."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    few = rng.integers(0, 3, shape)
    float16 = (rng.random(shape) ** 40).astype(np.float16)
    float16.flat[::7] = np.float16(0.9995)
    float16.flat[1::11] = np.float16(6e-8)  # a subnormal
    cases = [
        (few.astype(np.uint8), True),
        (rng.integers(0, 70000, shape).astype(np.int32), True),  # uint16 labels, as int32
        (float16, False),
        (rng.integers(0, 256, shape).astype(np.uint8), False),  # uint8 probabilities
    ]
    for a, labels in cases:
        host = reduce_unit(a, labels)
        device = reduce_tensor(torch.from_numpy(a), labels).numpy()
        assert device.dtype == host.dtype and device.shape == host.shape
        assert device.tobytes() == host.tobytes(), (a.dtype, labels)
    # Against the independent references of the run test below.
    labels2d = few.reshape(-1, shape[-1]).astype(np.uint8)[: shape[-2]]
    assert np.array_equal(reduce_unit(labels2d, True), mode_by_counts(labels2d))


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("probabilities", ["float16", "uint8"])
def test_levels_equal_reductions_of_the_stored_level_0(tmp_path: Path, probabilities: str) -> None:
    write_input(tmp_path / "in.zarr", (3, 601, 700), seed=4)
    job = _job(tmp_path, probabilities=probabilities)
    run_job(job, workers=2, progress=False)
    root = zarr.open_group(tmp_path / "out.zarr", mode="r")
    state = root.attrs["tilewise"]
    assert state["levels"] == 3 and state["streamed_levels"] == 1  # one streamed, one built
    labels = [root[f"labels/{k}"][:] for k in range(3)]
    probs = [root[f"probabilities/{k}"][:] for k in range(3)]
    assert [a.shape for a in labels] == [(601, 700), (301, 350), (151, 175)]
    assert len(np.unique(labels[0])) > 1  # a real segmentation, not a constant
    for k in (1, 2):
        assert np.array_equal(labels[k], mode_by_counts(labels[k - 1])), k
        mean = mean_by_blocks(probs[k - 1])
        if probabilities == "uint8":
            assert np.array_equal(probs[k], np.rint(mean).astype(np.uint8)), k
        else:
            np.testing.assert_allclose(probs[k].astype(np.float64), mean, atol=1e-3)
    # Streamed levels are chunked at half the unit, so each unit owned whole chunks of them.
    assert root["labels/1"].chunks == (128, 128) and root["probabilities/1"].chunks == (3, 128, 128)

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(tmp_path / "out.zarr" / "labels")))())
    assert [tuple(d.shape) for d in nodes[0].data] == [(601, 700), (301, 350), (151, 175)]
    # The NGFF 0.5 models (ome-zarr-models) accept both images, the labels as an image-label.
    models = pytest.importorskip("ome_zarr_models")
    from ome_zarr_models.v05.image import Image as OmeImage
    from ome_zarr_models.v05.image_label import ImageLabel

    assert isinstance(models.open_ome_zarr(root["labels"]), ImageLabel)
    assert isinstance(models.open_ome_zarr(root["probabilities"]), OmeImage)
    datasets = root["labels"].attrs["ome"]["multiscales"][0]["datasets"]
    assert datasets[2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [4.0, 4.0]},
        {"type": "translation", "translation": [1.5, 1.5]},
    ]


@pytest.mark.usefixtures("ray_cluster")
def test_preview_shows_the_input_and_the_labels_at_a_level(tmp_path: Path) -> None:
    data = zarr.open_array(write_input(tmp_path / "in.zarr", (3, 601, 700), seed=5))[:]
    job = _job(tmp_path, preview={"max_size": 400})
    report = run_job(job, workers=1, progress=False)
    assert report.preview == str(tmp_path / "out.preview.png")
    stored = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["tilewise"]["report"]
    assert stored["preview"] == report.preview  # the run report names it
    png = np.asarray(Image.open(report.preview).convert("RGB"))
    labels = zarr.open_group(tmp_path / "out.zarr", mode="r")["labels/1"][:]  # 301 x 350 <= 400
    h, w = labels.shape
    assert png.shape == (h + LEGEND_HEIGHT, 2 * w + GAP, 3)
    # Left: the input reduced here by 2x2 block means (edge pixels padded by themselves).
    expected = np.rint(mean_by_blocks(data)).astype(np.uint8).transpose(1, 2, 0)
    left = png[LEGEND_HEIGHT:, :w]
    assert np.abs(left.astype(int) - expected.astype(int)).max() <= 1
    # Right: class k > 0 tinted with its OME image-label colour; class 0 left as it is.
    right = png[LEGEND_HEIGHT:, w + GAP :]
    colours = {
        c["label-value"]: np.array(c["rgba"][:3])
        for c in zarr.open_group(tmp_path / "out.zarr", mode="r")["labels"].attrs["ome"][
            "image-label"
        ]["colors"]
    }
    for k in np.unique(labels):
        ys, xs = np.nonzero(labels == k)
        pick = slice(0, None, max(1, len(ys) // 50))
        got = right[ys[pick], xs[pick]].astype(float)
        base = left[ys[pick], xs[pick]].astype(float)
        want = base if k == 0 else 0.45 * base + 0.55 * colours[int(k)]
        assert np.abs(got - want).max() <= 1.01, k


@pytest.mark.usefixtures("ray_cluster")
def test_preview_command_at_any_level_and_its_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.zarr", (3, 300, 260), seed=6)
    job = parse_job(
        {
            "kind": "predict",
            "input": {"path": str(tmp_path / "in.zarr")},
            "model": {"arch": "unet_same", "num_classes": 2, "args": {"depth": 2, "base_width": 4}},
            "tiling": {"tile": 64},
            "output": {"path": str(tmp_path / "out.zarr"), "chunk": 128, "labels": None,
                       "probabilities": "uint8"},
        }
    )  # fmt: skip
    run_job(job, workers=1, progress=False)
    png = tmp_path / "q.png"
    assert main(["preview", str(tmp_path / "out.zarr"), str(png), "--level", "2"]) == 0
    assert "level 2 (75 x 65 px)" in capsys.readouterr().out
    assert Image.open(png).size == (2 * 65 + GAP, 75 + LEGEND_HEIGHT)
    assert main(["preview", str(tmp_path / "out.zarr"), "--level", "0"]) == 0
    assert Image.open(tmp_path / "out.preview.png").size == (2 * 260 + GAP, 300 + LEGEND_HEIGHT)
    assert main(["preview", str(tmp_path / "out.zarr"), "--level", "7"]) == 2
    err = capsys.readouterr().err
    assert "preview level 7 does not exist" in err and "0..2" in err
    with pytest.raises(InputError, match="not a tilewise output"):
        write_preview(str(tmp_path / "in.zarr"))
    # an output whose run has not finished is drawn, and said to be incomplete
    group = zarr.open_group(tmp_path / "out.zarr", mode="r+")
    group.attrs["tilewise"] = {**group.attrs["tilewise"], "status": "running"}
    assert main(["preview", str(tmp_path / "out.zarr"), str(png)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: '{tmp_path / 'out.zarr'}' is not complete")
    assert not write_preview(str(tmp_path / "out.zarr"), str(png)).complete


def test_levels_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="levels must be between 1"):
        _job(tmp_path, levels=0)
    assert _job(tmp_path, levels=2).output.levels == 2
    assert _job(tmp_path, preview=True).output.preview is not None
