"""PNG quicklooks of an output: the input image beside the image with the labels overlaid, and a
legend of the classes, at any pyramid level of the output.

The labels come from the output's ``labels/<level>`` (or, for an output with probabilities only,
their arg-max at that level). The image comes from the input's own pyramid when it has a level of
the same size (an ingested OME-Zarr has one), otherwise it is reduced from the input's level 0
row band by row band, so memory stays bounded by the preview's size, not the image's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tilewise.errors import InputError, StoreNotFoundError
from tilewise.pipeline.output import OUTPUT_FIX, STATUS_COMPLETE, class_colours, output_state
from tilewise.pipeline.stores import InputImage, is_url, local_path, open_node

__all__ = ["PreviewInfo", "default_preview_path", "write_preview"]

LEGEND_HEIGHT = 40
GAP = 10


@dataclass(frozen=True)
class PreviewInfo:
    """What was drawn: the file, the pyramid level and its (height, width)."""

    path: str
    level: int
    shape: tuple[int, int]
    complete: bool = True
    """False for an output whose run has not finished: units not yet written show as class 0."""


def default_preview_path(output: str) -> str:
    """``out.zarr`` -> ``out.preview.png`` beside it (in the working folder for a URL)."""
    location = local_path(output).rstrip("/")
    if is_url(location):  # an object store: the PNG goes to the working folder
        location = location.rsplit("/", 1)[-1]
    path = Path(location)
    stem = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
    return str(path.with_name(f"{stem}.preview.png"))


def _levels(group: Any, name: str) -> list[Any]:
    arrays: list[Any] = []
    while str(len(arrays)) in group:
        arrays.append(group[str(len(arrays))])
    if not arrays:
        raise StoreNotFoundError(f"the output's '{name}' image has no levels.")
    return arrays


def _pick_level(shapes: list[tuple[int, int]], level: int | str, max_size: int) -> int:
    if level == "auto":
        return next((k for k, s in enumerate(shapes) if max(s) <= max_size), len(shapes) - 1)
    assert isinstance(level, int)
    if not 0 <= level < len(shapes):
        raise InputError(
            f"preview level {level} does not exist: the output has levels 0..{len(shapes) - 1} "
            f"(sizes {', '.join(f'{h}x{w}' for h, w in shapes)}); choose one of them or 'auto'."
        )
    return level


def _labels_at(root: Any, level: int | str, max_size: int) -> tuple[np.ndarray, int, int]:
    """Class map at the chosen level, its level and the number of classes shown."""
    if "labels" in root:
        levels = _levels(root["labels"], "labels")
        k = _pick_level([tuple(a.shape[-2:]) for a in levels], level, max_size)
        return np.asarray(levels[k][:]), k, 0
    if "probabilities" in root:
        levels = _levels(root["probabilities"], "probabilities")
        k = _pick_level([tuple(a.shape[-2:]) for a in levels], level, max_size)
        probs = np.asarray(levels[k][:], dtype=np.float32)
        if probs.shape[0] == 1:  # one sigmoid map: its class where p >= 1/2 (or 128/255)
            half = 127.5 if np.issubdtype(levels[k].dtype, np.integer) else 0.5
            return (probs[0] >= half).astype(np.uint8), k, 2
        return probs.argmax(axis=0).astype(np.uint16), k, probs.shape[0]
    raise StoreNotFoundError("the output has neither labels nor probabilities to preview.")


def _image_at(job_input: dict[str, Any], level: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The input at ``level`` of the output's pyramid as (C, h, w), or None if unreadable."""
    try:
        base = InputImage(
            job_input["path"],
            array=job_input.get("array"),
            level=int(job_input.get("level") or 0),
            axes=job_input.get("axes"),
            storage_options=job_input.get("storage_options"),
        )
    except Exception:  # the input moved or is gone: the preview shows labels alone
        return None
    if level and base.array is not None and job_input.get("array") is None:
        try:  # the input's own pyramid, if it has this level at the same size
            own = InputImage(
                job_input["path"],
                level=int(job_input.get("level") or 0) + level,
                axes=job_input.get("axes"),
                storage_options=job_input.get("storage_options"),
            )
            if tuple(own.shape[1:]) == shape:
                return own.read(0, shape[0], 0, shape[1])
        except Exception:  # no such level: reduce level 0 below
            pass
    return _reduced(base, level, shape)


def _reduced(image: InputImage, level: int, shape: tuple[int, int]) -> np.ndarray:
    """Block means of ``2**level`` pixels square, a band of rows at a time."""
    f = 2**level
    channels, height, width = image.shape
    out = np.zeros((channels, *shape), np.float32)
    band = max(1, (64 * 1024**2) // max(1, 4 * channels * width * f))  # ~64 MB of input rows
    for y0 in range(0, shape[0], band):
        y1 = min(shape[0], y0 + band)
        block = image.read(y0 * f, min(height, y1 * f), 0, width).astype(np.float32)
        # Pad the ragged edge with its own pixels so the edge blocks average real pixels only.
        pad_y, pad_x = (y1 - y0) * f - block.shape[1], shape[1] * f - width
        block = np.pad(block, ((0, 0), (0, pad_y), (0, pad_x)), mode="edge")
        out[:, y0:y1] = block.reshape(channels, y1 - y0, f, shape[1], f).mean(axis=(2, 4))
    # Back to the input's type, so that 8-bit images are shown as they are, unstretched.
    if np.issubdtype(image.dtype, np.integer):
        return np.rint(out).astype(image.dtype)
    return out.astype(image.dtype)


def _display(image: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w, 3) uint8: the first three bands as RGB (or one as grey), stretched
    between the 2nd and 98th percentiles unless the data are already 8-bit."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    rgb = bands.astype(np.float32)
    if image.dtype != np.uint8:
        lo, hi = np.percentile(rgb, [2, 98])
        rgb = (rgb - lo) / max(float(hi - lo), 1e-12) * 255
    return np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _classes(root: Any, count: int) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Names and colours from the labels' OME ``image-label`` metadata (or tilewise's)."""
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    if "labels" in root:
        info = dict(root["labels"].attrs).get("ome", {}).get("image-label", {})
        props = {p["label-value"]: p.get("name") for p in info.get("properties", [])}
        for entry in info.get("colors", []):
            value = int(entry["label-value"])
            colours.append(tuple(int(c) for c in entry["rgba"][:3]))  # type: ignore[arg-type]
            names.append(str(props.get(value) or f"class {value}"))
    if not names:
        state = dict(root.attrs).get("tilewise", {})
        given = state.get("class_names") or []
        names = [str(n) for n in given][:count] or [f"class {k}" for k in range(count)]
        colours = [tuple(c[:3]) for c in class_colours(len(names))]  # type: ignore[misc]
    return names, colours


def write_preview(
    output: str,
    png: str | None = None,
    *,
    level: int | Literal["auto"] = "auto",
    max_size: int = 2048,
    alpha: float = 0.55,
    storage_options: dict[str, Any] | None = None,
    complete: bool | None = None,
) -> PreviewInfo:
    """Draw ``output``'s labels over its input at a pyramid level and save a PNG.

    An output whose run has not finished may be drawn (to look at a long run as it goes): its
    legend then says "incomplete", as :attr:`PreviewInfo.complete` does.

    Args:
        output: the tilewise output (local path or fsspec URI).
        png: where the PNG goes; None = :func:`default_preview_path`.
        level: pyramid level (0 = full resolution), or 'auto' = the finest level whose longer
            side is at most ``max_size``.
        max_size: see ``level``.
        alpha: opacity of the label colours; class 0 is left untinted (the background).
        storage_options: fsspec options of the output.
        complete: whether the output is complete; None = its recorded status says (the run
            itself draws its preview once every unit is written, before it records that).

    Returns:
        The file, level and size drawn.
    """
    from PIL import Image, ImageDraw

    location = local_path(output).rstrip("/")
    root = open_node(location, "r", storage_options, "output", OUTPUT_FIX)
    state = output_state(root, location, "previews are drawn from")
    if complete is None:
        complete = state.get("status") == STATUS_COMPLETE
    labels, k, count = _labels_at(root, level, max_size)
    count = max(count, int(labels.max()) + 1 if labels.size else 1)
    names, colours = _classes(root, count)
    palette = np.zeros((max(len(colours), count), 3), np.uint8)
    palette[: len(colours)] = colours
    job_input: dict[str, Any] = (state.get("job") or {}).get("input") or {}
    h, w = labels.shape
    image = _image_at(job_input, k, (h, w)) if job_input.get("path") else None
    rgb = _display(image) if image is not None else np.full((h, w, 3), 128, np.uint8)
    overlay = rgb.copy()
    tint = labels > 0
    overlay[tint] = ((1 - alpha) * rgb[tint] + alpha * palette[labels[tint]]).astype(np.uint8)

    canvas = Image.new("RGB", (2 * w + GAP, h + LEGEND_HEIGHT), "white")
    canvas.paste(Image.fromarray(rgb), (0, LEGEND_HEIGHT))
    canvas.paste(Image.fromarray(overlay), (w + GAP, LEGEND_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    x = 8
    for name, colour in zip(names, palette[: len(names)], strict=True):
        draw.rectangle([x, 12, x + 16, 28], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + 22, 14), name, fill="black")
        x += 22 + int(draw.textlength(name)) + 18
    if not complete:
        draw.text((x, 14), "incomplete: the run has not finished", fill="red")
    target = Path(png or default_preview_path(location))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    canvas.save(tmp, format="PNG")
    tmp.replace(target)  # never a half-written PNG under the final name
    return PreviewInfo(str(target), k, (h, w), complete)
