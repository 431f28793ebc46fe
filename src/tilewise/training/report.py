"""Training curves: a TensorBoard log written while training, and a PNG drawn at the end.

Both take what the training loop writes to ``metrics.jsonl``: one dict per step with ``step``,
``epoch``, ``loss``, ``lr``, at validation steps ``val_<metric>``, and at checkpoint steps
``loader_patches_per_s``, ``waited_s`` and ``seconds``.

* :class:`TensorBoardLog` writes every numeric value as a TensorBoard scalar (tensorboardX, which
  comes with ``ray[train]``), ``step`` being the global step. Tags are grouped as TensorBoard
  shows them: ``train/loss``, ``train/lr``, ``train/epoch``, ``val/<metric>``,
  ``loader/patches_per_s``, ``loader/waited_s``, ``time/seconds``.
* :func:`plot_curves` draws training loss (raw and smoothed), learning rate and the validation
  metrics over steps into one PNG with Pillow alone (matplotlib is no dependency of tilewise).

Resuming: a run killed after its last checkpoint logged steps that the resumed run computes
again. ``TensorBoardLog(directory, resume_step=s)`` first removes every point after step ``s``
from the event files already in ``directory`` (and a record cut short by the kill), then writes
to a new file, so that any reader, not only TensorBoard, sees each step once, with the resumed
run's value. The new file also starts with TensorBoard's own purge marker (a ``SessionLog.START``
event at ``s + 1``), so TensorBoard would hide such orphaned points even from a file that could
not be rewritten. :func:`plot_curves` likewise keeps the last row of a step that
``metrics.jsonl`` holds twice, which is what TensorBoard shows too.

The run folder may be on an object store, where nothing can be appended: :func:`curves_png`
gives the image as bytes to put there. TensorBoard files are written to a local folder only.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilewise.errors import ConfigError, InputError

__all__ = [
    "Axis",
    "Panel",
    "TensorBoardLog",
    "by_step",
    "curve_panels",
    "curves_png",
    "load_metrics",
    "nice_ticks",
    "plot_curves",
    "smooth",
    "tag_for",
    "tick_labels",
]

# ------------------------------------------------------------------------------- TensorBoard

_LOADER_KEYS = {"loader_patches_per_s": "loader/patches_per_s", "waited_s": "loader/waited_s"}


def tag_for(key: str) -> str:
    """The TensorBoard tag of a ``metrics.jsonl`` key (``val_mean_iou`` -> ``val/mean_iou``)."""
    if key.startswith("val_"):
        return "val/" + key[len("val_") :]
    if key in _LOADER_KEYS:
        return _LOADER_KEYS[key]
    if key == "seconds":
        return "time/seconds"
    return "train/" + key


def _is_number(value: object) -> bool:
    # bool is an int subclass, but True is no scalar worth a curve
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


class TensorBoardLog:
    """TensorBoard scalars of a training run (see the module docstring, resuming included).

    Args:
        directory: the log folder (made if missing), e.g. ``<run_dir>/tensorboard``; point
            ``tensorboard --logdir`` at it or at a folder above it.
        resume_step: the step the run starts from (a checkpoint's step; 0 for a fresh start).
            Points after it that an earlier, interrupted run left in ``directory`` are removed.
        flush_secs: at most this long between a point and its write to disk.

    Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self, directory: str | Path, *, resume_step: int = 0, flush_secs: float = 30.0
    ) -> None:
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        if isinstance(resume_step, bool) or not isinstance(resume_step, int) or resume_step < 0:
            raise ConfigError(f"resume_step must be an integer >= 0; got {resume_step!r}.")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        #: Points (events) removed from earlier files because they came after ``resume_step``.
        self.removed = sum(
            _drop_after(path, resume_step) for path in sorted(self.directory.glob("events.*"))
        )
        # tensorboardX names files by whole seconds and host and opens them with "wb": a writer
        # started within the same second as the previous one would overwrite its file. The
        # suffix keeps names apart, and sorts a resumed file after the earlier ones of that
        # second (TensorBoard reads a folder's files in name order).
        self._writer = FileWriter(
            str(self.directory),
            flush_secs=flush_secs,
            filename_suffix=f".{resume_step:012d}.{os.getpid()}",
        )
        self._closed = False
        self._writer.add_event(
            Event(session_log=SessionLog(status=SessionLog.START)), step=resume_step + 1
        )

    def add(self, metrics: Mapping[str, Any]) -> None:
        """One step's metrics (a ``metrics.jsonl`` row): every numeric value but ``step``,
        at global step ``metrics["step"]``; strings, booleans and ``None`` are skipped.

        The values go into one event (one ``Summary`` with a value per tag). NaN and infinity
        are written as they are: TensorBoard marks them, and a diverging loss should show.
        """
        from tensorboardX.proto.summary_pb2 import Summary

        if "step" not in metrics:
            raise ValueError(f"metrics need a 'step'; got keys {sorted(metrics)}")
        values = [
            Summary.Value(tag=tag_for(key), simple_value=float(value))
            for key, value in metrics.items()
            if key != "step" and _is_number(value)
        ]
        if values:
            self._writer.add_summary(Summary(value=values), global_step=int(metrics["step"]))

    def flush(self) -> None:
        """Write what is queued to disk now."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Write everything and close the file (a second call does nothing)."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_after(path: Path, step: int) -> int:
    """Remove the events after ``step`` from one event file; the number removed.

    An event file is a sequence of TFRecords (little-endian u64 length, its masked CRC32C, the
    serialised ``Event``, its CRC). Kept records are copied byte for byte, CRCs included, so
    nothing is recomputed; a record cut short at the end (a kill while writing) is dropped. A
    file left with nothing but its ``file_version`` header is deleted.
    """
    from tensorboardX.proto.event_pb2 import Event

    data = path.read_bytes()
    kept: list[bytes] = []
    removed = 0
    has_data = False
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            break
        try:
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
        except Exception:  # protobuf's DecodeError: a damaged record, and nothing after it counts
            break
        if event.WhichOneof("what") != "file_version" and event.step > step:
            removed += 1
        else:
            kept.append(data[pos:end])
            has_data = has_data or event.WhichOneof("what") != "file_version"
        pos = end
    if not has_data:
        path.unlink()
    elif pos != len(data) or removed:
        tmp = path.with_name(path.name + ".rewrite")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    return removed


# ------------------------------------------------------------------------------- metrics


def by_step(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per step in step order, a step's last row winning (as in TensorBoard); rows
    without a numeric ``step`` are left out."""
    last: dict[int, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row, Mapping) and _is_number(row.get("step")):
            last[int(row["step"])] = dict(row)
    return [last[s] for s in sorted(last)]


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file, through :func:`by_step`.

    A line that is not JSON (the last one, when a kill cut its write short) is skipped.

    Raises:
        InputError: the file does not exist or has no row with a ``step``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"no metrics file at '{path}'; a training run writes metrics.jsonl into its run "
            f"folder (<storage>/<name>), give the path of one."
        )
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    kept = by_step(rows)
    if not kept:
        raise InputError(
            f"the metrics file '{path}' has no rows with a 'step'; it must hold one JSON object "
            f"per line as a training run writes them."
        )
    return kept


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have a finite number under ``key``."""
    pairs = [
        (float(r["step"]), float(r[key]))
        for r in rows
        if _is_number(r.get(key)) and math.isfinite(float(r[key]))
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps), np.asarray(values)


def smooth(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start.

    ``s_t = weight * s_(t-1) + (1 - weight) * v_t`` from ``s = 0``, divided by
    ``1 - weight**t`` so that the first points are not pulled towards 0. A non-finite value
    leaves the average as it was (and is smoothed to the last finite one).
    """
    if not 0.0 <= weight < 1.0:
        raise ConfigError(f"smoothing weight must be in [0, 1); got {weight!r}.")
    out = np.empty(len(values))
    last, count = 0.0, 0
    for i, v in enumerate(values):
        if math.isfinite(v):
            last = weight * last + (1.0 - weight) * float(v)
            count += 1
        out[i] = last / (1.0 - weight**count) if count else math.nan
    return out


def _auto_weight(n: int) -> float:
    # A time constant of 4 % of the run: short runs stay almost raw, long ones get a trend line.
    return 1.0 - 1.0 / max(1.0, n / 25.0)


# ------------------------------------------------------------------------------- geometry


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Tick values at a 1-2-5 multiple of a power of ten, about ``count`` of them, in
    ``[lo, hi]`` (the classic "nice numbers" of Heckbert, Graphics Gems, 1990)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    fraction = raw / power
    nice = 1.0 if fraction < 1.5 else 2.0 if fraction < 3.0 else 5.0 if fraction < 7.0 else 10.0
    step = nice * power
    eps = step * 1e-9
    first = math.ceil((lo - eps) / step)
    ticks = []
    k = first
    while k * step <= hi + eps:
        ticks.append(round(k * step, 12) + 0.0)  # + 0.0: no "-0" label
        k += 1
    return ticks


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels for evenly spaced ticks, with just the digits that tell neighbours apart: whole
    numbers for steps >= 1, decimals down to the step from 0.001, else scientific notation with
    as many mantissa digits as the step needs (0.0098 and 0.01 are ``9.80e-03`` and
    ``1.00e-02``, not both ``1.0e-02``)."""
    if not ticks:
        return []
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else (abs(ticks[0]) or 1.0)
    largest = max(abs(t) for t in ticks)
    step_exp = math.floor(math.log10(step) + 1e-9)
    if step >= 1e-3 and largest < 1e6:
        decimals = max(0, -step_exp)
        return [f"{t:.{decimals}f}" for t in ticks]
    digits = max(0, math.floor(math.log10(largest) + 1e-9) - step_exp)
    return ["0" if t == 0 else f"{t:.{digits}e}" for t in ticks]


@dataclass(frozen=True)
class Axis:
    """A linear map from data values ``[lo, hi]`` to pixel coordinates ``[start, end]``.

    For a y axis ``start`` is the bottom pixel row and ``end`` the top one (rows grow down).
    """

    lo: float
    hi: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        return self.start + (value - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self) -> list[float]:
        """Nice tick values inside the axis range."""
        return nice_ticks(self.lo, self.hi)


@dataclass(frozen=True)
class Panel:
    """One plot of the figure: its plot area ``box`` (left, top, right, bottom pixels, the
    frame included) and the axes that map data into it."""

    title: str
    box: tuple[int, int, int, int]
    x: Axis
    y: Axis

    def point(self, x: float, y: float) -> tuple[float, float]:
        """The pixel (column, row) of a data point."""
        return self.x(x), self.y(y)


_VALIDATION_KEYS = (
    "val_pixel_accuracy",
    "val_mean_accuracy",
    "val_mean_iou",
    "val_frequency_weighted_iou",
    "val_mean_dice",
)
_TITLE_H = 40  # the figure's title line
_PANEL_TOP = 26  # a panel's title above its plot area
_LEFT = 78  # y tick labels
_RIGHT = 18
_BOTTOM = 44  # x tick labels and the axis name
_GAP = 16  # between panels
MIN_SIZE = (480, 360)


def _value_range(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    pad = (hi - lo) * 0.05 if hi > lo else (abs(lo) * 0.05 or 0.5)
    return lo - pad, hi + pad


def _validation_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {k for r in rows for k in r if k.startswith("val_") and _is_number(r[k])}
    known = [k for k in _VALIDATION_KEYS if k in present]
    return known + sorted(present - set(known))


def curve_panels(
    rows: Sequence[Mapping[str, Any]], size: tuple[int, int] = (1200, 800)
) -> dict[str, Panel]:
    """The figure's layout for these rows: panels ``loss`` (top, full width), ``lr`` and
    ``validation`` (bottom row), their plot areas and data-to-pixel axes.

    x is the step, from 0 to the last step, in every panel; y spans the loss's and the learning
    rate's range with 5 % to spare, and [0, 1] for the validation metrics (all fractions).
    """
    width, height = size
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        raise ConfigError(
            f"the curves image must be at least {MIN_SIZE[0]}x{MIN_SIZE[1]} px to fit its "
            f"labels; got {width}x{height}."
        )
    last = max((float(r["step"]) for r in rows), default=1.0)
    x_hi = last if last > 0 else 1.0
    inner_h = height - _TITLE_H - _GAP
    top_h = inner_h * 11 // 20
    half_w = (width - _GAP) // 2
    outer = {
        "loss": (0, _TITLE_H, width, _TITLE_H + top_h),
        "lr": (0, _TITLE_H + top_h + _GAP, half_w, height),
        "validation": (width - half_w, _TITLE_H + top_h + _GAP, width, height),
    }
    ranges = {
        "loss": _value_range(_series(rows, "loss")[1]),
        "lr": _value_range(_series(rows, "lr")[1]),
        "validation": (0.0, 1.0),
    }
    titles = {"loss": "training loss", "lr": "learning rate", "validation": "validation"}
    panels = {}
    for name, (x0, y0, x1, y1) in outer.items():
        box = (x0 + _LEFT, y0 + _PANEL_TOP, x1 - _RIGHT, y1 - _BOTTOM)
        lo, hi = ranges[name]
        panels[name] = Panel(
            title=titles[name],
            box=box,
            x=Axis(0.0, x_hi, box[0], box[2]),
            y=Axis(lo, hi, box[3], box[1]),
        )
    return panels


# ------------------------------------------------------------------------------- drawing

LOSS_RAW = (158, 202, 225)
LOSS_SMOOTH = (8, 81, 156)
LR_COLOR = (230, 85, 13)
VAL_COLORS = [(44, 160, 44), (148, 103, 189), (214, 39, 40), (140, 86, 75), (23, 190, 207)]
_GRID = (228, 228, 228)
_FRAME = (90, 90, 90)
_TEXT = (30, 30, 30)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # FreeType (Pillow >= 10.1 with freetype)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text(draw: Any, xy: tuple[float, float], text: str, font: Any, anchor: str) -> None:
    """Text placed by its box: anchor letters (l|m|r)(t|m|b), computed here so that bitmap
    fonts, which have no anchors, place it the same way. The height is that of "Ag", so that
    labels with and without descenders sit on one line."""
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    w, h = right - left, bottom - top
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]] - left
    y = xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]] - top
    draw.text((x, y), text, fill=_TEXT, font=font)


def _draw_frame(draw: Any, panel: Panel, font: Any, x_label: str) -> None:
    left, top, right, bottom = panel.box
    x_ticks = panel.x.ticks()
    for t, label in zip(x_ticks, tick_labels(x_ticks), strict=True):
        px = round(panel.x(t))
        draw.line([(px, top), (px, bottom)], fill=_GRID)
        draw.line([(px, bottom), (px, bottom + 4)], fill=_FRAME)
        _text(draw, (px, bottom + 6), label, font, "mt")
    y_ticks = panel.y.ticks()
    for t, label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        py = round(panel.y(t))
        draw.line([(left, py), (right, py)], fill=_GRID)
        draw.line([(left - 4, py), (left, py)], fill=_FRAME)
        _text(draw, (left - 7, py), label, font, "rm")
    draw.rectangle([left, top, right, bottom], outline=_FRAME)
    _text(draw, ((left + right) / 2, bottom + 26), x_label, font, "mt")
    _text(draw, (left, top - 6), panel.title, font, "lb")


def _draw_series(
    draw: Any,
    panel: Panel,
    steps: np.ndarray,
    values: np.ndarray,
    color: tuple[int, int, int],
    width: int,
    markers: bool = False,
) -> None:
    points = [(round(panel.x(s)), round(panel.y(v))) for s, v in zip(steps, values, strict=True)]
    if len(points) > 1:
        draw.line(points, fill=color, width=width, joint="curve")
    if markers or len(points) == 1:
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)


def _draw_legend(
    image: Any,
    panel: Panel,
    entries: Iterable[tuple[str, tuple[int, int, int]]],
    font: Any,
) -> None:
    """A legend in the corner of the plot area where it hides the fewest drawn pixels (upper
    right, upper left, lower right, lower left, in this order of preference)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    entries = list(entries)
    if not entries:
        return
    line_h = max(draw.textbbox((0, 0), label, font=font)[3] for label, _ in entries) + 6
    text_w = max(draw.textlength(label, font=font) for label, _ in entries)
    w, h = int(text_w) + 42, line_h * len(entries) + 8
    left, top, right, bottom = panel.box
    pixels = np.asarray(image)
    drawn = np.any(pixels != 255, axis=-1) & np.any(pixels != np.array(_GRID, np.uint8), axis=-1)
    corners = [
        (right - w - 8, top + 8),
        (left + 8, top + 8),
        (right - w - 8, bottom - h - 8),
        (left + 8, bottom - h - 8),
    ]
    x0, y0 = min(corners, key=lambda c: int(drawn[c[1] : c[1] + h + 1, c[0] : c[0] + w + 1].sum()))
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=(255, 255, 255), outline=_GRID)
    for i, (label, color) in enumerate(entries):
        cy = y0 + 4 + line_h * i + line_h // 2
        draw.line([(x0 + 8, cy), (x0 + 30, cy)], fill=color, width=3)
        _text(draw, (x0 + 36, cy), label, font, "lm")


def curves_png(
    rows: Iterable[Mapping[str, Any]],
    *,
    size: tuple[int, int] = (1200, 800),
    smoothing: float | None = None,
    title: str = "training",
) -> bytes:
    """The curves of these ``metrics.jsonl`` rows as PNG bytes (what :func:`plot_curves`
    writes), for a run folder on any file system: ``fs.pipe_file(path, curves_png(rows))``.

    Raises:
        InputError: no row has a ``step``.
        ConfigError: ``size`` too small or ``smoothing`` outside [0, 1).
    """
    import io

    from PIL import Image, ImageDraw

    rows = by_step(rows)
    if not rows:
        raise InputError(
            "no metrics rows with a 'step' to plot; a training run writes one per step."
        )
    panels = curve_panels(rows, size)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, title_font = _font(13), _font(17)

    steps, loss = _series(rows, "loss")
    weight = _auto_weight(len(loss)) if smoothing is None else smoothing
    smoothed = smooth(loss, weight)
    last = f", loss {loss[-1]:.4g} at the last step" if loss.size else ""
    _text(draw, (size[0] / 2, _TITLE_H / 2), f"{title}: {int(rows[-1]['step'])} steps{last}",
          title_font, "mm")  # fmt: skip

    for panel in panels.values():
        _draw_frame(draw, panel, font, "step")
    p = panels["loss"]
    _draw_series(draw, p, steps, loss, LOSS_RAW, 1)
    _draw_series(draw, p, steps, smoothed, LOSS_SMOOTH, 2)
    _draw_legend(image, p, [("loss", LOSS_RAW), (f"smoothed ({weight:.3g})", LOSS_SMOOTH)], font)
    p = panels["lr"]
    lr_steps, lr = _series(rows, "lr")
    _draw_series(draw, p, lr_steps, lr, LR_COLOR, 2)
    _draw_legend(image, p, [("lr", LR_COLOR)], font)
    p = panels["validation"]
    keys = _validation_keys(rows)
    entries = []
    for i, key in enumerate(keys):
        color = VAL_COLORS[i % len(VAL_COLORS)]
        v_steps, values = _series(rows, key)
        _draw_series(draw, p, v_steps, values, color, 2, markers=len(values) <= 50)
        entries.append((key[len("val_") :].replace("_", " "), color))
    if keys:
        _draw_legend(image, p, entries, font)
    else:
        left, top, right, bottom = p.box
        _text(draw, ((left + right) / 2, (top + bottom) / 2), "no validation", font, "mm")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def plot_curves(
    metrics_jsonl: str | Path,
    png: str | Path,
    *,
    size: tuple[int, int] = (1200, 800),
    smoothing: float | None = None,
    title: str | None = None,
) -> Path:
    """Draw a run's curves into a PNG: training loss (raw and smoothed), learning rate and the
    validation metrics, over steps, with ticks, grid and legends (Pillow only).

    Args:
        metrics_jsonl: the run's ``metrics.jsonl`` (see :func:`load_metrics`).
        png: where to write the image (written whole, then renamed into place).
        size: (width, height) in pixels; the panels are laid out by :func:`curve_panels`.
        smoothing: the loss's smoothing weight (:func:`smooth`); ``None``: a time constant of
            4 % of the run's steps.
        title: the figure's title; ``None``: the run folder's name.

    Returns:
        The PNG's path.

    Raises:
        InputError: the metrics file is missing or has no rows.
        ConfigError: ``size`` too small or ``smoothing`` outside [0, 1).
    """
    metrics_jsonl, png = Path(metrics_jsonl), Path(png)
    name = title if title is not None else metrics_jsonl.resolve().parent.name
    data = curves_png(load_metrics(metrics_jsonl), size=size, smoothing=smoothing, title=name)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, png)
    return png
