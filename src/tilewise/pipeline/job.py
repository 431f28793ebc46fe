"""Everything a predict job needs before any pixel is computed, shared by driver and workers.

:func:`prepare` opens the input, checks it against the network, and plans windows and write units.
It creates nothing, so a job that fails here leaves no output behind.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tilewise import models
from tilewise.errors import ConfigError, InputError, PlanError
from tilewise.models.ensemble import FlipAverage
from tilewise.models.registry import TilingFacts
from tilewise.models.weights import load_state_file
from tilewise.pipeline.engine import TilePlan, Unit
from tilewise.pipeline.output import OutputLayout, fingerprint_of
from tilewise.pipeline.pyramid import auto_levels
from tilewise.pipeline.stores import InputImage, is_url, normalised_location
from tilewise.pipeline.units import UnitGrid
from tilewise.spec import NormalizeSpec, PredictJob, is_pattern

__all__ = [
    "Normalizer",
    "PreparedJob",
    "build_model",
    "default_chunk",
    "expand_images",
    "image_stem",
    "load_weights",
    "open_input",
    "prepare",
    "weights_stamp",
]

_AUTO_SCALE = {np.dtype("uint8"): 1 / 255, np.dtype("uint16"): 1 / 65535}

log = logging.getLogger(__name__)


class Normalizer:
    """Raw pixels -> network input: ``(x * scale - mean) / std`` per band, in float32.

    It runs on the device the network runs on, so that only the raw pixels (uint8 for most
    slides and scenes: a quarter of float32) cross the bus.
    """

    def __init__(self, spec: NormalizeSpec, dtype: np.dtype, channels: int) -> None:
        self.scale = float(_AUTO_SCALE.get(dtype, 1.0) if spec.scale == "auto" else spec.scale)
        self.mean = self._per_band(spec.mean, channels, "mean", 0.0)
        self.std = self._per_band(spec.std, channels, "std", 1.0)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _per_band(
        values: list[float] | None, channels: int, name: str, default: float
    ) -> np.ndarray:
        if values is None:
            values = [default]
        if len(values) not in (1, channels):
            raise InputError(
                f"input.normalize.{name} needs 1 or {channels} values (one per band); got "
                f"{len(values)}."
            )
        return np.asarray(values, np.float32).reshape(-1, 1, 1)

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        if block.device not in self._on:
            self._on[block.device] = (
                torch.from_numpy(self.mean).to(block.device),
                torch.from_numpy(self.std).to(block.device),
            )
        mean, std = self._on[block.device]
        # One float32 copy, normalised in place (a unit buffer is the largest host array).
        x = block.to(torch.float32, copy=True)
        x.mul_(torch.tensor(self.scale, dtype=torch.float32))
        return x.sub_(mean).div_(std)


def image_stem(location: str) -> str:
    """The name an image's outputs are called by: its last path part without .zarr/.ome.zarr."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.zarr", ".zarr", ".ome.zarr.zip", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _glob(pattern: str, options: dict[str, Any]) -> list[str]:
    if not is_pattern(pattern):
        return [pattern]
    if is_url(pattern):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(pattern, **options)
        protocol = pattern.split("://", 1)[0]
        return sorted(f"{protocol}://{p}" for p in fs.glob(pattern))
    import glob

    return sorted(glob.glob(pattern))


def expand_images(job: PredictJob) -> list[PredictJob]:
    """One single-image job per image of ``job`` (a list or glob of images), in a fixed order.

    Each gets its own ``output.path`` (``{stem}`` filled in), mask path and run name; a job over
    one image comes back as it is. A glob leaves out the matches that are this job's own
    outputs (so that a rerun does not take them for images). Every output is checked to lie
    apart from every input, mask and weights file, before anything is opened or written.
    """
    if not job.input.many:
        if isinstance(job.input.path, list):  # a list of one image is that image
            job = job.model_copy(
                update={"input": job.input.model_copy(update={"path": job.input.path[0]})}
            )
        _check_apart([job])
        return [job]
    patterns = job.input.path if isinstance(job.input.path, list) else [job.input.path]
    locations: list[str] = []
    for pattern in patterns:
        found = _glob(pattern, job.input.storage_options)
        if not found:
            raise InputError(
                f"input.path pattern '{pattern}' matches no image. Check the folder and the "
                f"pattern (e.g. slides/*.ome.zarr)."
            )
        if is_pattern(pattern):
            found = _without_own_outputs(found, job)
            if not found:
                raise InputError(
                    f"input.path pattern '{pattern}' matches only this job's own outputs "
                    f"(output.path {job.output.path!r}), no image. Check the pattern, or put "
                    f"the outputs in another folder."
                )
        locations.extend(f for f in found if f not in locations)
    stems: dict[str, str] = {}
    jobs = []
    for location in locations:
        stem = image_stem(location)
        if stem in stems:
            raise InputError(
                f"two images have the same name '{stem}' ({stems[stem]} and {location}), so their "
                f"outputs would collide at output.path {job.output.path!r}. Rename one, or list "
                f"images with distinct names."
            )
        stems[stem] = location
        mask = job.input.mask
        if mask is not None and mask.path is not None:
            mask = mask.model_copy(update={"path": mask.path.replace("{stem}", stem)})
        jobs.append(
            job.model_copy(
                update={
                    "name": f"{job.name or 'job'}/{stem}",
                    "input": job.input.model_copy(update={"path": location, "mask": mask}),
                    "output": job.output.model_copy(
                        update={"path": job.output.path.replace("{stem}", stem)}
                    ),
                }
            )
        )
    _check_apart(jobs)
    return jobs


def _lineage(location: str) -> list[Any]:
    """Keys of a location and of each folder holding it, itself first.

    A local path that exists is keyed by its device and inode, so that two spellings of one
    folder match even where the normalised strings differ (a case-insensitive file system);
    anything else by its normalised string.
    """
    path = normalised_location(location)
    url = is_url(path)
    keys: list[Any] = []
    while True:
        key: Any = path
        if not url:
            try:
                st = os.stat(path)
                key = (st.st_dev, st.st_ino)
            except OSError:
                pass
        keys.append(key)
        parent = path.rsplit("/", 1)[0] if url else os.path.dirname(path)
        if not parent or parent == path or parent.endswith(":/") or parent.endswith(":"):
            return keys
        path = parent


def _check_apart(jobs: list[PredictJob]) -> None:
    """Refuse outputs that are, hold, or lie inside an input, a mask, the weights file or another
    image's output: creating the output, or replacing it with --overwrite, would destroy it."""
    stems = [image_stem(str(j.input.path)) for j in jobs]
    # What must survive: (its image's number, or None for the job's, what, location, lineage).
    kept: list[tuple[int | None, str, str, list[Any]]] = []
    for n, j in enumerate(jobs):
        kept.append((n, "input", str(j.input.path), _lineage(str(j.input.path))))
        mask = j.input.mask
        if mask is not None and mask.path is not None:
            kept.append((n, "mask", mask.path, _lineage(mask.path)))
    weights = jobs[0].model.weights if jobs else None
    if weights:
        kept.append((None, "model.weights", weights, _lineage(weights)))
    outputs: dict[Any, str] = {}
    for n, j in enumerate(jobs):
        stem = stems[n]
        out = _lineage(j.output.path)
        if out[0] in outputs:
            raise ConfigError(
                f"images '{outputs[out[0]]}' and '{stem}' would both write output "
                f"'{j.output.path}'; each image needs its own output. Put {{stem}} in "
                f"output.path, e.g. {{stem}}.seg.zarr."
            )
        outputs[out[0]] = stem
        for owner, what, location, lineage in kept:
            if lineage[0] == out[0]:
                relation = "is"
            elif lineage[0] in out[1:]:
                relation = "lies inside"
            elif out[0] in lineage[1:]:
                relation = "holds"
            else:
                continue
            if owner == n:
                whose = f"its own {what}"
            elif owner is None:
                whose = what
            else:
                whose = f"the {what} of image '{stems[owner]}'"
            where = "" if location == j.output.path else f" '{location}'"
            example = f"{stem}.seg.zarr"
            if len(jobs) > 1:
                example = "{stem}.seg.zarr"
            elif normalised_location(j.output.path).endswith("/" + example):
                example = f"{stem}.segmentation.zarr"
            raise ConfigError(
                f"output.path '{j.output.path}' of image '{stem}' {relation} {whose}{where}: an "
                f"output must lie apart from every input, mask and weights file, since writing "
                f"it (or replacing it with --overwrite) would destroy them. Choose another "
                f"output.path, e.g. {example}."
            )


def _without_own_outputs(found: list[str], job: PredictJob) -> list[str]:
    """The glob matches ``found`` less those that are outputs of ``job`` for some stem: Zarr
    groups whose root attributes hold ``tilewise`` (what :class:`OutputStore` writes) at a
    location ``output.path`` names. A folder of images with their outputs beside them
    (``{stem}.seg.zarr``) is globbed again by every rerun."""
    template = normalised_location(job.output.path)
    escaped = re.escape(template).replace(re.escape("{stem}"), "{stem}")
    first, *rest = escaped.split("{stem}")
    # The stem is one path part, the same wherever {stem} appears.
    pattern = re.compile(first + "(?P<stem>[^/]+)" + "(?P=stem)".join(rest) + r"\Z")
    kept = []
    for location in found:
        if pattern.match(normalised_location(location)) and _is_tilewise_output(location, job):
            log.info("input.path: leaving out %s, an output of this job", location)
            continue
        kept.append(location)
    return kept


def _is_tilewise_output(location: str, job: PredictJob) -> bool:
    """Whether ``location`` is a Zarr group written by tilewise (``tilewise`` root attributes)."""
    import zarr

    from tilewise.pipeline.stores import open_node

    try:
        with warnings.catch_warnings():
            # zarr warns about folders it does not know (an output's .tilewise/ record).
            warnings.simplefilter("ignore")
            node = open_node(location, "r", job.input.storage_options, "input")
            return isinstance(node, zarr.Group) and "tilewise" in node.attrs
    except Exception:  # not a Zarr store at all: an image the job should open (and judge)
        return False


def default_chunk(tile: int) -> int:
    """Output chunk side: the tile times the smallest factor reaching 1024 px.

    Large write units amortise each unit's halo read and fill batches of several windows.
    """
    return tile * max(1, -(-1024 // tile))


@dataclass
class PreparedJob:
    """A checked job: its input, network facts, window plan and write units."""

    job: PredictJob
    image: InputImage
    facts: TilingFacts
    in_channels: int
    plan: TilePlan
    grid: UnitGrid
    layout: OutputLayout
    normalizer: Normalizer

    @cached_property
    def crf(self) -> Any:
        """The job's :class:`~tilewise.pipeline.crf.CRFParams`, or None without a CRF."""
        spec = self.job.postprocess.crf
        if spec is None:
            return None
        from tilewise.pipeline.crf import CRFParams

        return CRFParams(**spec.model_dump())

    @cached_property
    def crf_halo(self) -> int:
        """Output pixels predicted around each unit for its CRF (0 without one)."""
        from tilewise.pipeline.crf import crf_halo

        params = self.crf
        return 0 if params is None else crf_halo(params)

    def compute_region(self, unit: Unit) -> Unit:
        """The output pixels whose scores a unit needs: the unit itself, or with a CRF the unit
        grown by the CRF halo and clipped to the image (the CRF of those exact scores is exact
        on the unit)."""
        h = self.crf_halo
        if not h:
            return unit
        return Unit(
            unit.index,
            max(0, unit.y0 - h),
            min(self.layout.height, unit.y1 + h),
            max(0, unit.x0 - h),
            min(self.layout.width, unit.x1 + h),
        )

    @property
    def fingerprint(self) -> str:
        """Digest of the settings that determine the output bytes (resume guard)."""
        job = self.job
        stamp = weights_stamp(job.model.weights)
        return fingerprint_of(
            {
                "input": job.input.model_dump(exclude={"storage_options"}),
                "model": job.model.model_dump(),
                "weights": stamp,
                "tiling": job.tiling.model_dump(exclude={"batch_size"}),
                "postprocess": job.postprocess.model_dump(),
                "output": job.output.model_dump(
                    exclude={"overwrite", "storage_options", "path", "preview", "instances"}
                ),
            }
        )


def prepare(job: PredictJob) -> PreparedJob:
    """Open and check everything; create nothing."""
    i, m, t, o = job.input, job.model, job.tiling, job.output
    if not isinstance(i.path, str) or i.many:
        raise ConfigError(
            "prepare() takes a job over one image; split a job over several with expand_images()."
        )
    image = open_input(job)
    channels, height, width = image.shape
    if m.in_channels is not None and m.in_channels != channels:
        raise InputError(
            f"the model takes {m.in_channels} input channels (model.in_channels) but the input "
            f"has {channels} (axes {image.axes}, shape {tuple(image.array.shape)}). Set "
            f"model.in_channels: {channels}, or check input.axes."
        )
    if o.labels == "uint8" and m.num_classes > 256:
        raise ConfigError(
            f"output.labels uint8 holds at most 256 classes; got num_classes {m.num_classes}. "
            f"Use labels: uint16."
        )
    facts = m.tiling_facts(channels)
    plan = TilePlan.build(
        facts,
        height=height,
        width=width,
        tile=t.tile,
        halo=t.halo,
        stitch=t.stitch,
        pad_mode=t.pad_mode,
        pad_value=t.pad_value,
        arch=m.arch,
        step=t.step,
        flip=t.flip,
    )
    if t.stitch == "sliding":
        # Sliding windows straddle any grid, so the chunk need not follow the tile.
        chunk = o.chunk or 1024
    else:
        # From the tile asked for, not the plan's: for an image smaller than the tile the plan
        # shrinks its window, but a chunk of whole tiles still holds the image in one unit.
        chunk = o.chunk or default_chunk(t.tile)
        if chunk >= t.tile:
            _require_multiple(
                "output.chunk", chunk, "the tile", t.tile, " so that no window is computed twice"
            )
    if o.shard is not None:
        _require_multiple("output.shard", o.shard, "the chunk", chunk, "")
    layout = OutputLayout(
        height=height,
        width=width,
        num_classes=m.num_classes,
        chunk=chunk,
        shard=o.shard,
        labels=o.labels,
        probabilities=o.probabilities,
        compressor=o.compressor,
        scale=image.scale,
        class_names=m.class_names,
        levels=auto_levels(height, width, chunk) if o.levels == "auto" else o.levels,
    )
    grid = UnitGrid(height, width, o.shard or chunk)
    return PreparedJob(
        job,
        image,
        facts,
        channels,
        plan,
        grid,
        layout,
        Normalizer(job.input.normalize, image.dtype, channels),
    )


def _require_multiple(name: str, value: int, of_name: str, of: int, why: str) -> None:
    if value % of:
        lower = max(of, value // of * of)
        raise PlanError(
            f"{name} ({value}) must be a multiple of {of_name} ({of}){why}; got {value}. "
            f"Use {name.split('.')[-1]}: {lower} or {lower + of}."
        )


def weights_stamp(weights: str | None) -> list[int] | None:
    """Size and modification time of a local weights file (None otherwise): what a fingerprint
    records of the weights without reading them."""
    if weights and Path(weights).exists():
        st = Path(weights).stat()
        return [st.st_size, st.st_mtime_ns]
    return None


def open_input(job: PredictJob) -> InputImage:
    """The input image of a job over one image, as ``input`` describes it."""
    i = job.input
    assert isinstance(i.path, str)
    return InputImage(
        i.path, array=i.array, level=i.level, axes=i.axes, storage_options=i.storage_options
    )


def load_weights(model: nn.Module, job: PredictJob, in_channels: int) -> None:
    """Load ``model.weights`` into ``model`` (nothing without weights); a clear error when the
    file does not fit the network."""
    m = job.model
    if not m.weights:
        return
    state = load_state_file(m.weights, what="model.weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise ConfigError(
            f"weights '{m.weights}' do not fit arch '{m.arch}' with {in_channels} input "
            f"channels and {m.num_classes} classes: {' '.join(first)}"
            f"{_channels_hint(model, state, in_channels, job)}"
        ) from None


def _channels_hint(model: nn.Module, state: Any, in_channels: int, job: PredictJob) -> str:
    """A pointer to input.axes when the weights take another number of input channels than the
    input gives: the first convolution's input width, in the weights against the network built
    for the input. Reading the bands as rows (axes yxc for a CYX array) is the usual cause."""
    for key, tensor in model.state_dict().items():
        if tensor.ndim == 4:  # the first convolution's kernel: (out, in, kh, kw)
            theirs = state.get(key) if isinstance(state, dict) else None
            if theirs is None or theirs.ndim != 4 or theirs.shape[1] == tensor.shape[1]:
                return ""
            axes = job.input.axes
            given = f"input.axes '{axes}'" if axes else "the axes read from its metadata"
            return (
                f" The weights take {theirs.shape[1]} input channels, but the input gives "
                f"{in_channels} with {given}: check input.axes (cyx = bands first, yxc = bands "
                f"last, yx = one band)."
            )
    return ""


def build_model(job: PredictJob, in_channels: int) -> nn.Module:
    """The job's network with its weights: loaded from ``model.weights``, or seeded.

    Seeding makes every actor build the same weights, so the output does not depend on which
    actor computed which unit.
    """
    m = job.model
    torch.manual_seed(m.seed)
    model = models.create(m.arch, in_channels=in_channels, num_classes=m.num_classes, **m.args)
    load_weights(model, job, in_channels)
    if m.tta == "flip":
        model = FlipAverage(model)
    return model.eval()
