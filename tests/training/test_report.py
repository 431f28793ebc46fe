"""Training curves: the TensorBoard log read back by an independent event-file reader, and the
PNG checked pixel by pixel against hand-worked axis numbers."""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tilewise.errors import ConfigError, InputError
from tilewise.training.report import (
    LOSS_RAW,
    LOSS_SMOOTH,
    VAL_COLORS,
    Axis,
    TensorBoardLog,
    by_step,
    curve_panels,
    curves_png,
    load_metrics,
    nice_ticks,
    plot_curves,
    smooth,
    tick_labels,
)

# ------------------------------------------------------------------ an independent event reader


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    """TFRecord's masked CRC: rotate right by 15, add a constant."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: Path) -> list[bytes]:
    """Every record of a TFRecord file, each CRC checked; the file must end on a record."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert header_crc == _masked(_crc32c(header)), f"bad length CRC in {path.name}"
        assert len(body) == length and body_crc == _masked(_crc32c(body)), f"bad record in {path}"
        out.append(body)
        pos += 16 + length
    return out


def _events(directory: Path) -> list[Any]:
    from tensorboardX.proto.event_pb2 import Event

    return [
        Event.FromString(r)
        for path in sorted(directory.glob("events.out.tfevents.*"))
        for r in _records(path)
    ]


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in _events(directory):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_the_readers_crc_matches_the_published_check_value() -> None:
    # CRC-32C of "123456789" is 0xE3069283 (RFC 3720, B.4)
    assert _crc32c(b"123456789") == 0xE3069283


# ------------------------------------------------------------------ TensorBoardLog


def _row(step: int, scale: float = 1.0) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "epoch": step // 4, "loss": scale / step, "lr": 0.01}
    if step % 6 == 0:
        row |= {"val_mean_iou": 0.05 * step, "val_pixel_accuracy": 0.5 + 0.01 * step}
        row |= {"loader_patches_per_s": 100.0 + step, "waited_s": 0.25, "seconds": 2.5 * step}
    return row


def test_every_numeric_metric_is_a_scalar_at_its_step(tmp_path: Path) -> None:
    rows = [_row(s) for s in range(1, 13)]
    rows[2] |= {"note": "text", "flag": True, "nothing": None}  # skipped, not errors
    with TensorBoardLog(tmp_path / "tb") as tb:
        for row in rows:
            tb.add(row)
    got = _scalars(tmp_path / "tb")
    assert set(got) == {
        "train/epoch",
        "train/loss",
        "train/lr",
        "val/mean_iou",
        "val/pixel_accuracy",
        "loader/patches_per_s",
        "loader/waited_s",
        "time/seconds",
    }
    assert got["train/loss"] == [(s, pytest.approx(1 / s, rel=1e-6)) for s in range(1, 13)]
    assert got["train/epoch"] == [(s, s // 4) for s in range(1, 13)]
    assert got["val/mean_iou"] == [(6, pytest.approx(0.3)), (12, pytest.approx(0.6))]
    assert got["time/seconds"] == [(6, 15.0), (12, 30.0)]
    assert got["loader/patches_per_s"] == [(6, 106.0), (12, 112.0)]


def test_resume_replaces_the_points_after_the_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "tb"
    with TensorBoardLog(directory) as tb:  # the first run logs steps 1..10, then is killed
        for s in range(1, 11):
            tb.add(_row(s))
    (first,) = directory.glob("events.*")
    with open(first, "ab") as fh:  # ... in the middle of writing a record
        fh.write(struct.pack("<Q", 50) + b"\x00\x01\x02")
    with TensorBoardLog(directory, resume_step=6) as tb:  # resumed from the step-6 checkpoint
        assert tb.removed == 4  # steps 7..10 of the first run
        for s in range(7, 13):
            tb.add(_row(s, scale=2.0))
    got = _scalars(directory)  # every file parses, CRCs and all: the cut record is gone
    expected = [1 / s for s in range(1, 7)] + [2 / s for s in range(7, 13)]
    assert got["train/loss"] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in zip(range(1, 13), expected, strict=True)
    ]
    assert [s for s, _ in got["val/mean_iou"]] == [6, 12]
    # TensorBoard's own purge marker opens the resumed file
    from tensorboardX.proto.event_pb2 import SessionLog

    starts = [e.step for e in _events(directory) if e.WhichOneof("what") == "session_log"]
    assert all(
        e.session_log.status == SessionLog.START
        for e in _events(directory)
        if e.WhichOneof("what") == "session_log"
    )
    assert starts == [1, 7]


def test_tensorboard_itself_reads_the_resumed_log_once_per_step(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    directory = tmp_path / "tb"
    with TensorBoardLog(directory) as tb:
        for s in range(1, 11):
            tb.add(_row(s))
    with TensorBoardLog(directory, resume_step=6) as tb:
        for s in range(7, 13):
            tb.add(_row(s, scale=2.0))
    acc = accumulator.EventAccumulator(str(directory))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    expected = [(s, 1 / s) for s in range(1, 7)] + [(s, 2 / s) for s in range(7, 13)]
    assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]


def test_a_fresh_start_drops_a_run_killed_before_its_first_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "tb"
    with TensorBoardLog(directory) as tb:
        for s in range(1, 4):
            tb.add(_row(s))
    with TensorBoardLog(directory, resume_step=0) as tb:
        for s in range(1, 3):
            tb.add(_row(s, scale=3.0))
    assert len(list(directory.glob("events.*"))) == 1  # the old file had nothing left
    assert _scalars(directory)["train/loss"] == [(1, 3.0), (2, 1.5)]


def test_rows_without_a_step_and_bad_resume_steps_are_refused(tmp_path: Path) -> None:
    with TensorBoardLog(tmp_path / "tb") as tb, pytest.raises(ValueError, match="step"):
        tb.add({"loss": 1.0})
    with pytest.raises(ConfigError, match="resume_step"):
        TensorBoardLog(tmp_path / "tb", resume_step=-1)


# ------------------------------------------------------------------ axes, ticks, smoothing


def test_axis_maps_values_linearly_onto_pixels() -> None:
    x = Axis(0.0, 10.0, 100.0, 300.0)
    assert (x(0.0), x(2.5), x(10.0)) == (100.0, 150.0, 300.0)
    y = Axis(0.0, 2.0, 500.0, 100.0)  # rows grow downwards: the bottom row is the low value
    assert (y(0.0), y(0.5), y(2.0)) == (500.0, 400.0, 100.0)
    assert Axis(-1.0, 1.0, 0.0, 40.0)(0.25) == 25.0


def test_nice_ticks_are_one_two_five_multiples_inside_the_range() -> None:
    assert nice_ticks(0, 137) == [0, 20, 40, 60, 80, 100, 120]  # 137/5 = 27.4 -> 20
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0095, 0.0105) == [0.0096, 0.0098, 0.01, 0.0102, 0.0104]
    assert nice_ticks(-3.3, 7.9) == [-2, 0, 2, 4, 6]  # 11.2/5 = 2.24 -> 2
    assert nice_ticks(5.0, 5.0) == [5.0]


def test_tick_labels_tell_neighbouring_ticks_apart() -> None:
    assert tick_labels([0, 20, 40]) == ["0", "20", "40"]
    assert tick_labels([0.0, 0.2, 0.4]) == ["0.0", "0.2", "0.4"]
    assert tick_labels([0.0096, 0.0098, 0.01, 0.0102]) == [
        "9.60e-03", "9.80e-03", "1.00e-02", "1.02e-02"]  # fmt: skip
    assert tick_labels([0.0, 0.0002, 0.0004]) == ["0", "2e-04", "4e-04"]
    assert tick_labels([2e6, 4e6]) == ["2e+06", "4e+06"]


def test_smoothing_is_the_debiased_moving_average() -> None:
    # s1 = 0.5*1 = 0.5, /(1-0.5) = 1; s2 = 0.5*0.5 + 0.5*2 = 1.25, /(1-0.25) = 5/3
    assert smooth([1.0, 2.0], 0.5) == pytest.approx([1.0, 5 / 3])
    # a NaN leaves the average where it was
    assert smooth([1.0, math.nan, 2.0], 0.5) == pytest.approx([1.0, 1.0, 5 / 3])
    assert smooth([4.0, 2.0], 0.0) == pytest.approx([4.0, 2.0])
    with pytest.raises(ConfigError):
        smooth([1.0], 1.0)


# ------------------------------------------------------------------ metrics.jsonl and the PNG


def _write(path: Path, rows: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_load_metrics_keeps_the_last_row_of_a_step_and_skips_a_cut_line(tmp_path: Path) -> None:
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path = _write(tmp_path / "metrics.jsonl", rows, tail='{"step": 3, "lo')
    assert load_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5}]
    with pytest.raises(InputError, match="no metrics file"):
        load_metrics(tmp_path / "absent.jsonl")
    with pytest.raises(InputError, match="no rows"):
        load_metrics(_write(tmp_path / "empty.jsonl", []))


def test_by_step_orders_rows_and_keeps_a_steps_last_row() -> None:
    rows = [{"step": 3, "loss": 1.0}, {"loss": 9.0}, {"step": 1, "loss": 2.0},
            {"step": 3, "loss": 0.5}, {"step": True, "loss": 7.0}]  # fmt: skip
    assert by_step(rows) == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 0.5}]


def test_curves_png_gives_the_bytes_plot_curves_writes(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1, "val_mean_iou": s / 10} for s in (2, 1, 3)]
    path = _write(tmp_path / "metrics.jsonl", rows)
    png = plot_curves(path, tmp_path / "curves.png", size=(640, 480), title="t")
    assert curves_png(rows, size=(640, 480), title="t") == png.read_bytes()
    with pytest.raises(InputError, match="no metrics rows"):
        curves_png([{"loss": 1.0}])


def _line_mask(image: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    return np.any([np.all(image == np.array(c, np.uint8), axis=-1) for c in colors], axis=0)


def test_the_png_draws_a_decreasing_loss_going_down(tmp_path: Path) -> None:
    n = 200
    loss = [2.0 * math.exp(-s / 40) + 0.1 for s in range(1, n + 1)]
    rows = [{"step": s, "epoch": 0, "loss": loss[s - 1], "lr": 1e-3} for s in range(1, n + 1)]
    rows[99] |= {"val_mean_iou": 0.4, "val_pixel_accuracy": 0.8}
    rows[199] |= {"val_mean_iou": 0.6, "val_pixel_accuracy": 0.9}
    (tmp_path / "run").mkdir()
    path = _write(tmp_path / "run" / "metrics.jsonl", rows)
    png = plot_curves(path, tmp_path / "out" / "curves.png", size=(900, 600))
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (600, 900, 3)

    panel = curve_panels(load_metrics(path), (900, 600))["loss"]
    _, top, _, bottom = panel.box
    line = _line_mask(image, [LOSS_RAW, LOSS_SMOOTH])
    # the polyline passes through its end points (within a pixel of rounding)
    ends = [panel.point(1, loss[0]), panel.point(n, loss[-1])]
    for col, row in ends:
        r, c = round(row), round(col)
        assert line[r - 1 : r + 2, c - 1 : c + 2].any(), (col, row)
    # hand-worked: y spans the loss range with 5 % to spare at each end, so the first point is
    # 0.05/1.1 of the plot's height below its top and the last as far above its bottom
    h = bottom - top
    assert ends[0][1] == pytest.approx(top + h * 0.05 / 1.1, abs=0.01)
    assert ends[1][1] == pytest.approx(bottom - h * 0.05 / 1.1, abs=0.01)
    # and between them the line only goes down the image: the lowest line pixel per column
    # (below the legend, which sits in the upper right) never rises by more than a pixel
    cols = range(round(ends[0][0]) + 2, round(ends[1][0]) - 2)
    lowest = [top + 1 + int(np.flatnonzero(line[top + 1 : bottom, c])[-1]) for c in cols]
    assert all(b >= a - 1 for a, b in itertools.pairwise(lowest))
    assert lowest[-1] - lowest[0] > 0.8 * h
    # every validation point shows its marker (the legend is put where it hides none)
    v = curve_panels(load_metrics(path), (900, 600))["validation"]
    for step, value, color in ((100, 0.8, VAL_COLORS[0]), (200, 0.9, VAL_COLORS[0]),
                               (100, 0.4, VAL_COLORS[1]), (200, 0.6, VAL_COLORS[1])):  # fmt: skip
        col, row = (round(c) for c in v.point(step, value))
        assert _line_mask(image[row - 1 : row + 2, col - 1 : col + 2], [color]).any()


def test_a_run_without_validation_or_with_nan_losses_still_plots(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": math.nan if s == 3 else 1.0 / s, "lr": 0.1} for s in range(1, 9)]
    path = _write(tmp_path / "metrics.jsonl", rows)
    png = plot_curves(path, tmp_path / "curves.png", size=(640, 480), title="nan run")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (480, 640, 3)
    v = curve_panels(load_metrics(path), (640, 480))["validation"]
    vl, vt, vr, vb = v.box
    assert not _line_mask(image[vt:vb, vl:vr], VAL_COLORS).any()
    with pytest.raises(ConfigError, match="at least"):
        plot_curves(path, tmp_path / "tiny.png", size=(100, 100))
