"""Typed YAML job specs: one file describes one run.

A job is a YAML mapping whose ``kind`` picks the model that validates it (``kind: predict`` ->
:class:`PredictJob`). Every model forbids unknown keys, and every field carries a description, so
:func:`json_schema` documents the YAML for editors (``tilewise schema``).

A bad spec is reported whole: :func:`load_job` raises one :class:`~tilewise.errors.ConfigError`
that lists every problem, one per line, as ``FILE: dotted.path: message``, e.g.::

    job.yaml: tiling.tilee: unknown key 'tilee'. Did you mean 'tile'?
    job.yaml: output.path: required field missing

Field rules are checked by pydantic, all together. The rules that tie fields to each other
(class names against classes, shard against chunk, the architecture's arguments and its tiling
facts) live in one after-validator of the job, which runs once every field is valid and reports
all of its own problems together.

Relative local paths in a job resolve against the folder of the YAML file (or the current
directory for jobs built in Python); ``file://`` URLs become plain absolute paths, because
zarr-python cannot create a store through one (zarr-python issue #2808); other URIs
(``s3://``, ``memory://``, fsspec chains such as ``simplecache::s3://``) are kept as written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Self, TypeAlias, Union, cast, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import models_json_schema

from tilewise.errors import ConfigError, PlanError, UnknownArchitectureError, did_you_mean
from tilewise.models import TilingFacts, entry, facts
from tilewise.models.ensemble import flip_facts
from tilewise.models.maskrcnn import INSTANCE_ARCHS, instance_arch_args, is_instance_arch

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "JOB_KINDS",
    "ComputeSpec",
    "InputSpec",
    "Job",
    "MaskSpec",
    "ModelSpec",
    "NormalizeSpec",
    "OutputSpec",
    "PredictJob",
    "TilingSpec",
    "is_pattern",
    "job_errors",
    "json_schema",
    "load_job",
    "parse_job",
    "resolve_batch_size",
    "resolve_location",
    "validate_files",
]

# ----------------------------------------------------------------------------------------------
# Locations
# ----------------------------------------------------------------------------------------------

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def resolve_location(value: str, base_dir: Path | None) -> str:
    """Turn a job's path or URI into what the stores should open.

    Args:
        value: a local path (absolute, relative or ``~``-prefixed), a ``file://`` URL, or any
            other fsspec URI (``s3://bucket/x.zarr``, ``memory://x.zarr``, ``zip::s3://...``).
        base_dir: the folder that relative paths are relative to (the YAML file's folder);
            ``None`` means the current working directory.

    Returns:
        A normalised absolute local path for local paths and ``file://`` URLs, or the URI
        unchanged for every other scheme.
    """
    if value[:7].lower() == "file://":
        local = value[7:]
    elif _URI.match(value) or "::" in value:
        return value
    else:
        local = value
    path = Path(local).expanduser()
    if not path.is_absolute():
        path = (Path(base_dir) if base_dir is not None else Path.cwd()) / path
    return os.path.abspath(path)


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context
    if isinstance(context, Mapping) and context.get("base_dir") is not None:
        return Path(context["base_dir"])
    return None


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------


class NormalizeSpec(BaseModel):
    """How input pixels become network input: ``(pixel * scale - mean) / std`` per channel."""

    model_config = ConfigDict(extra="forbid")

    scale: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        default="auto",
        description=(
            "Factor applied to raw pixel values first. 'auto' = 1/255 for uint8, 1/65535 for "
            "uint16 and 1 for floating-point images."
        ),
    )
    mean: list[float] | None = Field(
        default=None,
        description="Per-channel mean subtracted after scaling; null = no centring.",
    )
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None,
        description=(
            "Per-channel standard deviation divided by after centring; every value > 0, same "
            "length as mean when both are given; null = no division."
        ),
    )

    @field_validator("scale", mode="before")
    @classmethod
    def _scale_is_number_or_auto(cls, value: Any) -> Any:
        # One clear message instead of one error per member of the float | 'auto' union.
        if value == "auto" or (
            isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        ):
            return value
        raise ValueError(f"must be a number > 0 or 'auto'; got {_show(value)}")


class MaskSpec(BaseModel):
    """Which parts of the image hold anything worth segmenting (foreground).

    Write units without foreground are not computed: they are written as ``background_class``
    (probability 1 for it) without running the network.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["tissue", "nodata", "array"] = Field(
        description=(
            "'tissue': detect tissue on a low-resolution level of a slide (Otsu threshold of the "
            "darkness); 'nodata': pixels whose bands all equal `nodata` are background (scenes); "
            "'array': a mask image given by `path` (non-zero = foreground, any resolution)."
        )
    )
    level: int | None = Field(
        default=None,
        ge=0,
        description=(
            "tissue: the OME-Zarr level to detect on; null = the coarsest level at least 512 px "
            "on its short side (or a block-averaged read of level 0 when there is no pyramid)."
        ),
    )
    threshold: Annotated[float, Field(ge=0)] | Literal["otsu"] = Field(
        default="otsu",
        description="tissue: darkness (0..1) above which a pixel is tissue; 'otsu' = automatic.",
    )
    nodata: float | None = Field(
        default=None,
        description="nodata: the no-data value; null = the input's `nodata` attribute.",
    )
    path: str | None = Field(
        default=None,
        description=(
            "array: path or URI of the mask (Zarr array, group or OME-Zarr image); may contain "
            "{stem} for jobs over several images."
        ),
    )
    array: str | None = Field(default=None, description="array: the array inside a mask group.")
    min_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Units whose foreground fraction is at most this are skipped (0 = any pixel).",
    )
    background_class: int = Field(
        default=0, ge=0, description="The class written where nothing is computed."
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_location(value, _base_dir(info))


def is_pattern(location: str) -> bool:
    """Whether an input location is a glob pattern (``*``, ``?`` or ``[``) naming many images."""
    return any(c in location for c in "*?[")


class InputSpec(BaseModel):
    """The image (or images) to segment."""

    model_config = ConfigDict(extra="forbid")

    path: str | list[str] = Field(
        min_length=1,
        description=(
            "Local path or fsspec URI (memory://, s3://, file://, ...) of a Zarr array, Zarr "
            "group or OME-Zarr image; or a glob pattern (slides/*.ome.zarr) or a list of them "
            "for a job over many images (then output.path must contain {stem}). Relative paths "
            "are relative to the job file's folder."
        ),
    )
    array: str | None = Field(
        default=None,
        description="Path of the array inside a Zarr group; null = the path is the array itself.",
    )
    level: int = Field(
        default=0, ge=0, description="OME-Zarr multiscale level to read (0 = full resolution)."
    )
    axes: Literal["cyx", "yxc", "yx"] | None = Field(
        default=None,
        description="Axis order of the array; null = read it from the OME-Zarr metadata.",
    )
    normalize: NormalizeSpec = Field(
        default=NormalizeSpec(), description="How pixel values are normalised for the network."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options passed to fsspec when opening the input (credentials, endpoint).",
    )
    mask: MaskSpec | None = Field(
        default=None,
        description="Foreground mask: units without foreground are not computed; null = none.",
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, list):
            if any(not v for v in value):
                raise ValueError("every entry must be a non-empty path or URI")
            return [resolve_location(v, _base_dir(info)) for v in value]
        return resolve_location(value, _base_dir(info))

    @property
    def many(self) -> bool:
        """Whether the job names several images (a list or a glob pattern)."""
        if isinstance(self.path, list):
            return len(self.path) > 1 or any(is_pattern(p) for p in self.path)
        return is_pattern(self.path)


class ModelSpec(BaseModel):
    """The network: a registered architecture, its arguments and its weights."""

    model_config = ConfigDict(extra="forbid")

    package: str | None = Field(
        default=None,
        description=(
            "Path or URI of a model package (the folder a training job writes: model.yaml + "
            "weights.safetensors). It gives arch, args, num_classes, class_names, in_channels, "
            "weights and input.normalize; any of them the job also gives must agree with it."
        ),
    )
    arch: str = Field(
        description=(
            "Registered architecture name (list them with `tilewise models`), or an instance "
            "architecture (mask_rcnn_r50_fpn, mask_rcnn_r101_fpn, mask_rcnn_tiny) whose objects "
            "go to output.instances."
        )
    )
    num_classes: int = Field(
        ge=1,
        description="Number of output classes (score maps); for Mask R-CNN, background included.",
    )
    in_channels: int | None = Field(
        default=None, ge=1, description="Input channels; null = the input image's channel count."
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="The architecture's own keyword arguments (e.g. depth, base_width).",
    )
    weights: str | None = Field(
        default=None,
        description=(
            "Path or URI of a .safetensors or .pt state dict; null = freshly initialised weights "
            "(from seed). Relative paths are relative to the job file's folder."
        ),
    )
    tta: Literal["none", "flip"] = Field(
        default="none",
        description=(
            "Test-time augmentation: 'flip' averages the probabilities of the window and its "
            "horizontal mirror image (exact tiling is kept)."
        ),
    )
    seed: int = Field(default=0, description="Initialisation seed, used when no weights are given.")
    class_names: list[str] | None = Field(
        default=None,
        description="One name per class, for reports and metadata; null = class indices.",
    )

    @field_validator("arch")
    @classmethod
    def _arch_is_registered(cls, value: str) -> str:
        if is_instance_arch(value):
            return value
        try:
            entry(value)
        except UnknownArchitectureError as exc:
            raise ValueError(
                f"{exc} Instance architectures: {', '.join(sorted(INSTANCE_ARCHS))}."
            ) from None
        return value

    @property
    def instance(self) -> bool:
        """Whether the network finds objects (Mask R-CNN) rather than scoring pixels."""
        return is_instance_arch(self.arch)

    @field_validator("weights")
    @classmethod
    def _resolve_weights(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_location(value, _base_dir(info))

    def tiling_facts(self, in_channels: int) -> TilingFacts:
        """The tiling facts of this network as the job runs it (with its test-time flips)."""
        arch_facts = facts(
            self.arch, in_channels=in_channels, num_classes=self.num_classes, **self.args
        )
        if self.tta == "flip":
            arch_facts = flip_facts(arch_facts)
        return arch_facts

    @field_validator("args")
    @classmethod
    def _resolve_member_weights(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Ensemble members ({arch, args, weights}) name their own weights files; like
        # model.weights, relative paths are relative to the job file's folder.
        def resolve(member: Any) -> Any:
            if isinstance(member, dict) and isinstance(member.get("weights"), str):
                return {**member, "weights": resolve_location(member["weights"], _base_dir(info))}
            return member

        out = dict(value)
        if isinstance(out.get("members"), list):
            out["members"] = [resolve(m) for m in out["members"]]
        if "member" in out:
            out["member"] = resolve(out["member"])
        return out


# Windows per forward pass when a job gives none. On the CPU a batch buys nothing: 4 windows of
# 624 px through the bench's U-Net took 0.227 / 0.232 / 0.237 s at batches of 1 / 2 / 4, and
# 0.835 / 0.842 / 0.797 s at 736 px through a 1.95 M-weight one, while the activations of every
# window in a batch are held at once (a 16,384² run peaked at 3.17 GB PSS at batch 4, 1.61 GB at
# batch 1). A GPU needs batches to be kept busy.
DEFAULT_BATCH_SIZE: dict[str, int] = {"cpu": 1, "cuda": 4}


def resolve_batch_size(batch_size: int | None, device: str) -> int:
    """``batch_size``, or the default for ``device`` (a torch device type) when it is None."""
    if batch_size is not None:
        return batch_size
    return DEFAULT_BATCH_SIZE["cuda" if device == "cuda" else "cpu"]


class TilingSpec(BaseModel):
    """How the image is cut into model windows and stitched back."""

    model_config = ConfigDict(extra="forbid")

    tile: int = Field(
        default=512,
        ge=1,
        description=(
            "Output pixels per model window side; a multiple of the architecture's total stride."
        ),
    )
    halo: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Context pixels read on each side of a tile; null = the architecture's exact halo "
            "(stitch: crop then equals whole-image inference)."
        ),
    )
    stitch: Literal["crop", "blend", "sliding"] = Field(
        default="crop",
        description=(
            "'crop' keeps each window's centre (exact for translation-equivariant networks); "
            "'blend' cross-fades overlapping windows with weights summing to one; 'sliding' is "
            "PSPNet's evaluation: fixed windows of `tile` output pixels every `step` pixels, "
            "their probabilities averaged (for networks with global pooling)."
        ),
    )
    step: int | None = Field(
        default=None,
        ge=1,
        description="stitch: sliding only: window step in pixels; null = 2/3 of the tile.",
    )
    flip: bool = Field(
        default=False,
        description=(
            "stitch: sliding only: add the scores of the horizontally flipped window before the "
            "softmax, as PSPNet's evaluation does."
        ),
    )
    pad_mode: Literal["reflect", "symmetric", "constant"] = Field(
        default="reflect",
        description=(
            "How the image is extended beyond its border (numpy.pad mode, applied as if to the "
            "whole image)."
        ),
    )
    pad_value: float = Field(
        default=0.0, description="Fill value beyond the border when pad_mode is 'constant'."
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Model windows per forward pass; null = 4 on a GPU, 1 on the CPU (where a batch "
            "runs no faster per window and holds the activations of every window in it)."
        ),
    )

    def windows_per_forward(self, device: str) -> int:
        """``batch_size``, or its default for ``device`` (``"cuda"`` or ``"cpu"``)."""
        return resolve_batch_size(self.batch_size, device)


class InstancesSpec(BaseModel):
    """Instances numbered across the whole mosaic, each owned by exactly one write unit and seen
    whole through a halo: connected components of classes of the class map, or the detections
    of an instance architecture (Mask R-CNN) run on each unit's window."""

    model_config = ConfigDict(extra="forbid")

    classes: list[int] | None = Field(
        default=None,
        description=(
            "Class ids whose connected components are objects; null = every class but 0. "
            "Touching cells are separated when the network draws the background between them "
            "(U-Net's border-weighted loss)."
        ),
    )
    halo: int = Field(
        default=64,
        ge=1,
        description=(
            "Pixels around each write unit within which an object must lie whole; an object "
            "larger than that is an error that names the halo needed."
        ),
    )
    connectivity: Literal[1, 2] = Field(
        default=1, description="1 = 4-connected pixels form an object, 2 = 8-connected."
    )
    min_area: int = Field(default=0, ge=0, description="Objects of fewer pixels are dropped.")
    score_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Instance architectures: detections scoring below it are dropped.",
    )
    mask_threshold: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Instance architectures: a pixel belongs to a detection whose mask "
        "probability reaches it.",
    )
    max_detections: int = Field(
        default=1000,
        ge=1,
        description="Instance architectures: at most this many detections per window (unit + "
        "halo); raise it for windows crowded with objects.",
    )
    table: Literal["parquet", "csv"] = Field(
        default="parquet",
        description=(
            "Object table (id, class, score, bbox, area, centroid): a Parquet dataset "
            "`instances.parquet/` inside the output, or `instances.csv`."
        ),
    )


def _instances_problems(
    output: OutputSpec, num_classes: int
) -> list[tuple[tuple[str | int, ...], str]]:
    """Instances are components of the class map: it must be written, and the classes exist."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    assert output.instances is not None
    if output.labels is None:
        problems.append(
            (
                ("output", "instances"),
                "instances are found in the class map, but labels is null; set labels: uint8 "
                "(or uint16).",
            )
        )
    # One score map (a sigmoid) labels pixels 0 or 1.
    values = max(2, num_classes)
    bad = [c for c in output.instances.classes or [] if not 0 < c < values]
    if bad:
        problems.append(
            (
                ("output", "instances", "classes"),
                f"must be classes of the model other than the background 0 (1..{values - 1}); "
                f"got {bad}.",
            )
        )
    return problems


class PreviewSpec(BaseModel):
    """A PNG quicklook of the result, written at the end of a run."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        default=None,
        description=(
            "Where the PNG goes (local path); null = beside the output, named after it "
            "(`out.zarr` -> `out.preview.png`). Relative paths are relative to the job file."
        ),
    )
    level: int | Literal["auto"] = Field(
        default="auto",
        description=(
            "Pyramid level shown (0 = full resolution); 'auto' = the finest level whose longer "
            "side is at most max_size."
        ),
    )
    max_size: int = Field(
        default=2048, ge=16, description="Longest side in pixels that 'auto' aims for."
    )
    alpha: float = Field(
        default=0.55, ge=0.0, le=1.0, description="Opacity of the label colours over the image."
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_location(value, _base_dir(info))


class OutputSpec(BaseModel):
    """Where and how the segmentation is written (OME-Zarr)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        description=(
            "Local path or fsspec URI of the output OME-Zarr. Relative paths are relative to the "
            "job file's folder."
        ),
    )
    labels: Literal["uint8", "uint16"] | None = Field(
        default="uint8", description="Data type of the class-label map; null = no label map."
    )
    probabilities: Literal["float16", "uint8"] | None = Field(
        default=None,
        description=(
            "Data type of per-class probabilities (uint8 = quantised to 0..255); null = none."
        ),
    )
    chunk: int | None = Field(
        default=None, ge=1, description="Output chunk side in pixels; null = the planner's choice."
    )
    shard: int | None = Field(
        default=None,
        ge=1,
        description="Output shard side in pixels, a multiple of chunk; null = no sharding.",
    )
    compressor: Literal["zstd", "blosc-lz4", "none"] = Field(
        default="blosc-lz4",
        description=(
            "Compression codec of the output chunks: 'blosc-lz4' (bit-shuffled LZ4) compresses "
            "float16 probabilities and labels as well as zstd does, 3x faster; 'zstd' (level 1)."
        ),
    )
    levels: int | Literal["auto"] = Field(
        default="auto",
        description=(
            "Pyramid levels of each output image, level 0 included (each halves the one above: "
            "labels by the mode of 2x2 blocks, probabilities by their mean); 'auto' = until the "
            "coarsest level fits one chunk; 1 = no pyramid."
        ),
    )
    instances: InstancesSpec | None = Field(
        default=None,
        description=(
            "Also write an instance label image `instances/` (uint32, unique ids across the "
            "mosaic) and an object table, from the class map; needs `labels`."
        ),
    )
    preview: PreviewSpec | None = Field(
        default=None,
        description=(
            "Write a PNG quicklook (the image with the labels overlaid, and a legend) when the "
            "run finishes; `preview: {}` takes the defaults. The run report names the file."
        ),
    )
    overwrite: bool = Field(
        default=False,
        description="Replace an existing output written by a different job (never done silently).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options passed to fsspec when opening the output (credentials, endpoint).",
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str, info: ValidationInfo) -> str:
        return resolve_location(value, _base_dir(info))

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 16:
            raise ValueError(
                f"levels must be between 1 (level 0 only) and 16, or 'auto'; got {value}"
            )
        return value

    @field_validator("preview", mode="before")
    @classmethod
    def _preview_flag(cls, value: Any) -> Any:
        # `preview: true` reads as "a preview with the defaults", `false` as none.
        if value is True:
            return {}
        return None if value is False else value


class ComputeSpec(BaseModel):
    """Where the job runs: the Ray cluster and the predictor actors."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        default=None,
        description="Ray cluster address; null = $RAY_ADDRESS, or an embedded local Ray.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="Number of predictor actors; null = one per GPU, or one on a CPU-only cluster.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Device the actors run the network on; 'auto' = CUDA when present.",
    )
    cpus_per_worker: float | None = Field(
        default=None,
        gt=0,
        description=(
            "CPUs reserved per actor (its torch threads); null = the cluster's CPUs divided by "
            "the workers. Outputs are bit-identical across worker counts and unit orders at a "
            "fixed value: CPU kernels sum in a thread-dependent order."
        ),
    )
    gpus_per_worker: float | None = Field(
        default=None,
        ge=0,
        description=(
            "GPUs reserved per actor (fractions share a GPU; 2 or more split each batch over "
            "the actor's GPUs); null = 1 when using CUDA (see actors_per_gpu)."
        ),
    )
    actors_per_gpu: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Predictor actors sharing each GPU (gpus_per_worker = 1 / actors_per_gpu); several "
            "actors keep a GPU busy while one of them reads or writes. null = 1."
        ),
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Forward-pass precision: 'bfloat16'/'float16' run the network under autocast (AMP) "
            "with stitching in float32; 'float32' is exact to float rounding; 'auto' = bfloat16 "
            "on CUDA (float16 where bfloat16 is unsupported), float32 on CPU."
        ),
    )
    prefetch: int = Field(
        default=2,
        ge=0,
        le=16,
        description=(
            "Write units each actor reads ahead while it computes (read threads); 0 = read "
            "each unit when its turn comes."
        ),
    )


class _RuleError(ValueError):
    """Problems found by a cross-field rule, each with its location relative to the job."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{_dotted(loc)}: {message}" for loc, message in problems))


Problems = list[tuple[tuple[str | int, ...], str]]


def _class_weight_problems(loss: Any, num_classes: int, where: tuple[str | int, ...]) -> Problems:
    """One class weight per class in a cross-entropy loss (and in a sum's terms); the loss's
    own keys and values are checked when it is built."""
    if not isinstance(loss, Mapping):
        return []
    if loss.get("kind") == "sum" and isinstance(loss.get("terms"), list):
        return [
            problem
            for i, term in enumerate(loss["terms"])
            for problem in _class_weight_problems(term, num_classes, (*where, f"terms[{i}]"))
        ]
    weights = loss.get("class_weights")
    if not isinstance(weights, list) or len(weights) == num_classes:
        return []
    return [
        (
            (*where, "class_weights"),
            f"needs one weight per class ({num_classes}, model.num_classes); got "
            f"{len(weights)}: {_show(weights)}.",
        )
    ]


def _class_name_problems(model: ModelSpec | TrainModelSpec) -> Problems:
    """One name per class, when names are given (predict and train jobs alike)."""
    if model.class_names is None or len(model.class_names) == model.num_classes:
        return []
    return [
        (
            ("model", "class_names"),
            f"must have one name per class ({model.num_classes}, num_classes); got "
            f"{len(model.class_names)} names.",
        )
    ]


def _instance_arg_problems(model: ModelSpec | TrainModelSpec) -> Problems:
    """``model.args`` values that Mask R-CNN's config refuses (the names are known)."""
    from tilewise.models.maskrcnn import instance_config

    try:
        instance_config(model.arch, **model.args)
    except ConfigError as exc:
        return [(("model", "args"), f"{exc}")]
    except (TypeError, ValueError) as exc:
        return [
            (
                ("model", "args"),
                f"are not valid Mask R-CNN settings ({exc}); see MaskRCNNConfig for each "
                f"setting's type.",
            )
        ]
    return []


def _unknown_arg_problems(model: ModelSpec | TrainModelSpec) -> Problems:
    """``model.args`` keys the architecture does not take, with the ones it does."""
    allowed = instance_arch_args() if model.instance else entry(model.arch).arg_names()
    return [
        (
            ("model", "args", key),
            f"unknown argument '{key}' for arch '{model.arch}'.{did_you_mean(key, allowed)} "
            f"It takes: {', '.join(allowed) or 'no arguments'}.",
        )
        for key in model.args
        if key not in allowed
    ]


class CRFSpec(BaseModel):
    """DeepLab's fully connected CRF, truncated at ``radius * step`` pixels per mean-field
    iteration so that tiling stays exact (the CRF halo is ``iterations * radius * step``)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(default=10, ge=0, description="Mean-field iterations (DeepLab: 10).")
    w_appearance: float = Field(
        default=4.0, ge=0, description="w1: weight of the appearance (bilateral) kernel."
    )
    theta_alpha: float = Field(
        default=60.0, gt=0, description="σα: spatial scale of the appearance kernel, pixels."
    )
    theta_beta: float = Field(
        default=5.0,
        gt=0,
        description="σβ: colour scale of the appearance kernel, in the input's intensity units.",
    )
    w_smoothness: float = Field(default=3.0, ge=0, description="w2: smoothness kernel weight.")
    theta_gamma: float = Field(
        default=3.0, gt=0, description="σγ: spatial scale of the smoothness kernel, pixels."
    )
    radius: int = Field(
        default=5, ge=1, description="R: the appearance kernel has (2R+1)^2 - 1 taps."
    )
    step: int = Field(
        default=1,
        ge=1,
        description="d: taps d pixels apart, so each iteration reaches R*d pixels (and the halo "
        "grows with it).",
    )


class PostprocessSpec(BaseModel):
    """Refinements applied to each unit's scores before they are written."""

    model_config = ConfigDict(extra="forbid")

    crf: CRFSpec | None = Field(
        default=None,
        description=(
            "Refine the scores with DeepLab's fully connected CRF (`crf: {}` = its defaults). "
            "Each unit is predicted with the CRF halo around it, so tiling stays exact."
        ),
    )


class PredictJob(BaseModel):
    """Segment one image with one network, tile by tile, into an OME-Zarr output."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["predict"] = Field(description="Job kind: 'predict' segments an image.")
    name: str | None = Field(
        default=None,
        description="Run name shown in progress and reports; null = the job file's name (stem).",
    )
    input: InputSpec = Field(description="The image to segment and how to read it.")
    model: ModelSpec = Field(description="The network and its weights.")
    tiling: TilingSpec = Field(
        default=TilingSpec(), description="Tile size, halo and stitching of the model windows."
    )
    output: OutputSpec = Field(description="Where and how the result is written.")
    compute: ComputeSpec = Field(
        default=ComputeSpec(), description="The Ray cluster and the predictor actors."
    )
    postprocess: PostprocessSpec = Field(
        default=PostprocessSpec(), description="Refinements of the scores (DeepLab's CRF)."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_package(cls, data: Any, info: ValidationInfo) -> Any:
        """Fill the network's settings from ``model.package``; refuse any that disagree."""
        if not isinstance(data, Mapping):
            return data
        model = data.get("model")
        if not isinstance(model, Mapping) or model.get("package") is None:
            return data
        from tilewise.packages import load_manifest

        location = resolve_location(str(model["package"]), _base_dir(info))
        try:
            manifest = load_manifest(location)
        except ConfigError as exc:
            raise _RuleError([(("model", "package"), str(exc))]) from None
        problems: list[tuple[tuple[str | int, ...], str]] = []
        merged = {**model, "package": location}
        given_args = model.get("args")
        for key, value in (
            ("arch", manifest.arch),
            ("num_classes", manifest.num_classes),
            ("in_channels", manifest.in_channels),
            ("args", manifest.args),
            ("class_names", manifest.class_names),
        ):
            given = given_args if key == "args" else model.get(key)
            if given is not None and given != value:
                problems.append(
                    (
                        ("model", key),
                        f"the package '{location}' holds a network with {key} {_show(value)}; "
                        f"got {_show(given)}. Remove model.{key} (the package gives it) or name "
                        f"a package made with it.",
                    )
                )
            merged[key] = value
        weights = manifest.weights_location(location)
        # A validated job, dumped and validated again (in each actor), names both: that is fine.
        if model.get("weights") is not None and model["weights"] != weights:
            problems.append(
                (
                    ("model", "weights"),
                    f"the package '{location}' brings its own weights; got weights "
                    f"{_show(model['weights'])} too. Give model.package or model.weights, not "
                    f"both.",
                )
            )
        merged["weights"] = weights
        result = {**data, "model": merged}
        inp = data.get("input")
        if isinstance(inp, Mapping) and manifest.normalize:
            given_norm = inp.get("normalize")
            if given_norm is None:
                result["input"] = {**inp, "normalize": manifest.normalize}
            else:
                try:
                    same = NormalizeSpec.model_validate(given_norm) == NormalizeSpec.model_validate(
                        manifest.normalize
                    )
                except ValidationError:
                    same = True  # the field's own validation reports it
                if not same:
                    problems.append(
                        (
                            ("input", "normalize"),
                            f"the network in '{location}' was trained with normalize "
                            f"{_show(manifest.normalize)}; got {_show(given_norm)}. Remove "
                            f"input.normalize to use the package's.",
                        )
                    )
        if problems:
            raise _RuleError(problems)
        return result

    @model_validator(mode="after")
    def check_rules(self) -> Self:
        """Check the rules that tie fields together; report all their problems at once."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        model, output = self.model, self.output

        problems.extend(_class_name_problems(model))
        norm = self.input.normalize
        if norm.mean is not None and norm.std is not None and len(norm.mean) != len(norm.std):
            problems.append(
                (
                    ("input", "normalize", "std"),
                    f"must have one value per mean value ({len(norm.mean)}); got {len(norm.std)}.",
                )
            )
        if self.input.many and "{stem}" not in output.path:
            problems.append(
                (
                    ("output", "path"),
                    "a job over several images (input.path is a list or a glob pattern) needs "
                    "one output per image: put {stem} (the image's file name without .zarr) in "
                    f"output.path, e.g. out/{{stem}}.seg.zarr; got {output.path!r}.",
                )
            )
        mask = self.input.mask
        if mask is not None:
            if mask.method == "array" and mask.path is None:
                problems.append(
                    (
                        ("input", "mask", "path"),
                        "method 'array' needs the mask image: set path to a Zarr array or "
                        "OME-Zarr image (non-zero = foreground).",
                    )
                )
            if mask.background_class >= model.num_classes:
                problems.append(
                    (
                        ("input", "mask", "background_class"),
                        f"must be a class of the model (0..{model.num_classes - 1}); got "
                        f"{mask.background_class}.",
                    )
                )
        compute = self.compute
        if compute.actors_per_gpu is not None and compute.gpus_per_worker is not None:
            problems.append(
                (
                    ("compute", "actors_per_gpu"),
                    "give either actors_per_gpu or gpus_per_worker, not both (actors_per_gpu n "
                    "means gpus_per_worker 1/n).",
                )
            )
        if model.instance:
            problems.extend(self._instance_arch_problems())
        elif output.labels is None and output.probabilities is None:
            problems.append(
                (
                    ("output",),
                    "nothing to write: labels and probabilities are both null. Set labels: uint8 "
                    "and/or probabilities: float16.",
                )
            )
        if output.instances is not None and not model.instance:
            problems.extend(_instances_problems(output, model.num_classes))
            # Compared with the defaults, not the fields set: a dumped job is validated again.
            default = InstancesSpec()
            for key in ("score_threshold", "mask_threshold", "max_detections"):
                if getattr(output.instances, key) == getattr(default, key):
                    continue
                problems.append(
                    (
                        ("output", "instances", key),
                        f"applies to instance architectures (Mask R-CNN) only; arch "
                        f"'{model.arch}' gives a class map whose components are the objects. "
                        f"Remove it.",
                    )
                )
        if output.chunk is not None and output.shard is not None and output.shard % output.chunk:
            lower = max(output.chunk, output.shard // output.chunk * output.chunk)
            problems.append(
                (
                    ("output", "shard"),
                    f"shard ({output.shard}) must be a multiple of chunk ({output.chunk}); got "
                    f"{output.shard}. Use shard: {lower} or {lower + output.chunk}.",
                )
            )

        unknown = _unknown_arg_problems(model)
        problems.extend(unknown)
        if not unknown and not model.instance:
            problems.extend(self._tiling_problems())
        elif not unknown:
            problems.extend(_instance_arg_problems(model))

        if problems:
            raise _RuleError(problems)
        if model.instance:
            # An instance network writes objects only: no class map unless asked (it was
            # refused above), and the instance stage with its defaults unless configured.
            self.output.labels = None
            if self.output.instances is None:
                self.output.instances = InstancesSpec()
        return self

    def _instance_arch_problems(self) -> Problems:
        """An instance architecture finds objects in each unit's window: what does not apply."""
        model, output = self.model, self.output
        arch = model.arch
        problems: Problems = []
        if model.num_classes < 2:
            problems.append(
                (
                    ("model", "num_classes"),
                    f"counts the background as class 0 for '{arch}' and must be at least 2; got "
                    f"{model.num_classes}. Use 1 + the number of object classes.",
                )
            )
        # (field, whether the job sets it, why it does not apply)
        not_for_objects: list[tuple[tuple[str, ...], bool, str]] = [
            (
                ("output", "labels"),
                "labels" in output.model_fields_set and output.labels is not None,
                "it writes no class map (the objects' pixels are in instances/)",
            ),
            (
                ("output", "probabilities"),
                output.probabilities is not None,
                "it writes no score maps",
            ),
            (
                ("output", "preview"),
                output.preview is not None,
                "previews draw the class map, which it does not write",
            ),
            (
                ("postprocess", "crf"),
                self.postprocess.crf is not None,
                "the CRF refines score maps, which it does not have",
            ),
            (
                ("input", "mask"),
                self.input.mask is not None,
                "foreground masks are not supported for instance architectures yet",
            ),
            (("model", "tta"), model.tta != "none", "flip averaging applies to score maps"),
            (
                ("tiling",),
                self.tiling != TilingSpec(),
                "its windows are the write units (output.chunk) grown by output.instances.halo",
            ),
        ]
        for loc, given, why in not_for_objects:
            if given:
                problems.append(
                    (loc, f"does not apply to instance architecture '{arch}': {why}. Remove it.")
                )
        spec = output.instances
        if spec is not None:
            if spec.connectivity != 1:
                problems.append(
                    (
                        ("output", "instances", "connectivity"),
                        f"applies to components of a class map; '{arch}' finds objects itself. "
                        f"Remove it.",
                    )
                )
            bad = [c for c in spec.classes or [] if not 0 < c < model.num_classes]
            if bad:
                problems.append(
                    (
                        ("output", "instances", "classes"),
                        f"must be object classes of the model (1..{model.num_classes - 1}); got "
                        f"{bad}.",
                    )
                )
        return problems

    def _tiling_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        from tilewise.pipeline.geometry import check_tiling

        model, tiling = self.model, self.tiling
        try:
            arch_facts = model.tiling_facts(model.in_channels or 3)
        except ConfigError as exc:
            return [(("model", "args"), str(exc))]
        try:
            check_tiling(
                arch_facts,
                tile=tiling.tile,
                halo=tiling.halo,
                stitch=tiling.stitch,
                arch=model.arch,
                step=tiling.step,
                flip=tiling.flip,
            )
        except PlanError as exc:
            message = str(exc)
            if message.startswith("halo") or "tiling.halo" in message:
                field = "halo"
            elif message.startswith("tiling.step"):
                field = "step"
            elif message.startswith("stitch"):
                field = "stitch"
            else:
                field = "tile"
            return [(("tiling", field), message)]
        return []


# ----------------------------------------------------------------------------------------------
# Training jobs
# ----------------------------------------------------------------------------------------------


def _resolve_all(values: list[str], info: ValidationInfo) -> list[str]:
    if any(not isinstance(v, str) or not v.strip() for v in values):
        raise ValueError("every entry must be a non-empty path, glob pattern or URI")
    return [resolve_location(v, _base_dir(info)) for v in values]


class TrainDataSpec(BaseModel):
    """The sharded dataset: Zarr groups with an ``image`` (C, H, W) and a ``label`` (H, W), or
    for an instance architecture an ``image``, ``instances`` (H, W) and ``instance_classes``."""

    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(
        min_length=1,
        description=(
            "Training shards: paths, glob patterns or fsspec URIs of Zarr groups, each holding "
            "'image' (C, H, W), 'label' (H, W) integers and optionally 'weight' (H, W) floats "
            "(U-Net's weight map). For an instance architecture (Mask R-CNN) a shard holds "
            "'image', 'instances' (H, W) integers (0 = background, every other value one "
            "object) and optionally 'instance_classes' (N, 2) integer rows (id, class) with "
            "class in 1..num_classes-1 (without it every object is class 1). Relative paths "
            "are relative to the job file's folder."
        ),
    )
    val_shards: list[str] | None = Field(
        default=None,
        description=(
            "Held-out shards for validation; null = val_fraction of the shards, chosen by seed."
        ),
    )
    val_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Share of the shards held out when val_shards is null (the split is by shard).",
    )
    ignore_index: int = Field(
        default=255,
        ge=0,
        description=(
            "Label value that counts nowhere (unlabelled pixels); not used by instance "
            "architectures, whose shards have no ignored pixels."
        ),
    )
    storage_options: dict[str, Any] | None = Field(
        default=None, description="fsspec options (credentials, endpoints) for shard URIs."
    )
    cache_mb: int = Field(
        default=256,
        ge=0,
        description=(
            "Decoded shard chunks each worker keeps, in MB (patches overlap chunks that other "
            "patches decoded already); 0 = decode every patch's chunks anew."
        ),
    )

    @field_validator("shards", "val_shards")
    @classmethod
    def _resolve(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if value is None else _resolve_all(value, info)


class TrainModelSpec(BaseModel):
    """The network to train."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="Registered architecture name (`tilewise models`).")
    num_classes: int = Field(
        ge=1,
        description=(
            "Number of classes (label values 0..n-1); for Mask R-CNN, the background 0 and the "
            "object classes (at least 2)."
        ),
    )
    in_channels: int | None = Field(
        default=None, ge=1, description="Input channels; null = the shards' band count."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="The architecture's own keyword arguments."
    )
    class_names: list[str] | None = Field(
        default=None, description="One name per class, stored in the model package."
    )
    init: str | None = Field(
        default=None,
        description=(
            "Weights to start from: a .safetensors/.pt state dict or a model package folder; "
            "null = initialised from seed."
        ),
    )

    @field_validator("arch")
    @classmethod
    def _arch_is_registered(cls, value: str) -> str:
        return ModelSpec._arch_is_registered(value)

    @property
    def instance(self) -> bool:
        """Whether the network finds objects (Mask R-CNN) rather than scoring pixels."""
        return is_instance_arch(self.arch)

    @field_validator("init")
    @classmethod
    def _resolve_init(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_location(value, _base_dir(info))


class PatchSpec(BaseModel):
    """The training patches sampled from the shards."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(
        ge=8,
        description=(
            "Patch side in pixels (a valid input size of the net; any size for Mask R-CNN, "
            "which pads its input)."
        ),
    )
    sampler: Literal["uniform", "class_balanced", "foreground"] = Field(
        default="uniform",
        description=(
            "uniform: anywhere; class_balanced: centred on a pixel of a class drawn uniformly "
            "(rare classes as often as common ones; for Mask R-CNN the classes of the objects' "
            "pixels and the background); foreground: centred on a non-background pixel (for "
            "Mask R-CNN, a pixel of an object) with probability foreground_p."
        ),
    )
    foreground_p: float = Field(
        default=0.5, ge=0, le=1, description="foreground sampler: share of foreground patches."
    )
    background_class: int = Field(
        default=0,
        ge=0,
        description="foreground sampler: the class that is not foreground (0 for Mask R-CNN).",
    )


class ElasticSpec(BaseModel):
    """U-Net's elastic deformation: random displacements on a coarse grid, bicubic in between."""

    model_config = ConfigDict(extra="forbid")

    grid: int = Field(default=3, ge=2, description="Control points per side (the paper: 3 x 3).")
    std: float = Field(
        default=10.0, ge=0, description="Standard deviation of the displacements in px (10)."
    )
    p: float = Field(default=1.0, ge=0, le=1, description="Share of patches deformed.")


class JitterSpec(BaseModel):
    """Random brightness and contrast changes of the image (never of the labels)."""

    model_config = ConfigDict(extra="forbid")

    brightness: float = Field(default=0.1, ge=0, description="Max shift, in normalised units.")
    contrast: float = Field(default=0.1, ge=0, description="Max relative contrast change.")


class AugmentSpec(BaseModel):
    """Augmentation of each patch (image, labels and weight map alike, except jitter)."""

    model_config = ConfigDict(extra="forbid")

    flip: bool = Field(default=True, description="Random horizontal and vertical flips.")
    rotate90: bool = Field(default=True, description="Random multiples of 90 degrees.")
    elastic: ElasticSpec | None = Field(
        default=None, description="U-Net's elastic deformation; null = off."
    )
    jitter: JitterSpec | None = Field(default=None, description="Intensity jitter; null = off.")


class OptimizerSpec(BaseModel):
    """The optimiser: SGD with momentum as in the papers, or Adam."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["sgd", "adam"] = Field(default="sgd", description="sgd | adam.")
    lr: float = Field(default=0.01, gt=0, description="Learning rate.")
    momentum: float = Field(
        default=0.99, ge=0, lt=1, description="SGD momentum (U-Net: 0.99; FCN: 0.9)."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="L2 weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="Adam's betas.")


class ScheduleSpec(BaseModel):
    """The learning-rate schedule over the steps."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["constant", "step", "poly"] = Field(
        default="constant",
        description="constant | step (times gamma every step_size steps) | poly (DeepLab: "
        "(1 - step/steps)^power).",
    )
    step_size: int | None = Field(default=None, ge=1, description="step: steps between decays.")
    gamma: float = Field(default=0.1, gt=0, description="step: decay factor.")
    power: float = Field(default=0.9, gt=0, description="poly: exponent (DeepLab: 0.9).")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up from lr/10.")


class ScalingSpec(BaseModel):
    """Ray Train's scaling: data-parallel workers (DDP) and their resources."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        default=None, description="Ray cluster address; null = $RAY_ADDRESS or embedded Ray."
    )
    workers: int = Field(
        default=1, ge=0, description="DDP workers; 0 = in the driver's process (quick tests)."
    )
    gpus_per_worker: float = Field(default=0, ge=0, description="GPUs per worker (0 = CPU).")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs (torch threads) per worker.")


class CheckpointSpec(BaseModel):
    """Checkpoints: model, optimiser, schedule, step and sampler state."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=100, ge=1, description="Steps between checkpoints.")
    keep: int = Field(default=2, ge=1, description="Checkpoints kept (plus the best one).")


class ValidationSpec(BaseModel):
    """Validation on the held-out shards through the predict engine (overlap-tile), or for an
    instance architecture by detection AP in whole windows."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=200, ge=1, description="Steps between validations.")
    tile: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Tile of the overlap-tile engine; null = patch.size. For Mask R-CNN the side of the "
            "windows detected whole (ground truth cut to the same window); null = 256."
        ),
    )
    batch_size: int = Field(default=4, ge=1, description="Windows per forward pass.")
    metric: (
        Literal[
            "mean_iou",
            "pixel_accuracy",
            "mean_accuracy",
            "frequency_weighted_iou",
            "mask_ap50",
            "box_ap50",
        ]
        | None
    ) = Field(
        default=None,
        description=(
            "The score that picks the best weights: an FCN metric (mean_iou, pixel_accuracy, "
            "mean_accuracy, frequency_weighted_iou) for dense architectures, mask_ap50 or "
            "box_ap50 (COCO AP at IoU 0.5) for Mask R-CNN; null = mean_iou, or mask_ap50 for "
            "Mask R-CNN."
        ),
    )


_INSTANCE_METRICS = ("mask_ap50", "box_ap50")


class TrainJob(BaseModel):
    """Train a network on sharded Zarr data with Ray Train; the result is a model package."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train"] = Field(description="Job kind: 'train' trains a network.")
    name: str | None = Field(
        default=None,
        description=(
            "Run name; running the job again with the same name and storage resumes it from "
            "its last checkpoint. null = the job file's name (stem)."
        ),
    )
    data: TrainDataSpec = Field(description="The training and validation shards.")
    model: TrainModelSpec = Field(
        description="The network to train: architecture, classes, initial weights."
    )
    normalize: NormalizeSpec = Field(
        default=NormalizeSpec(),
        description="Input normalisation, stored in the package for predict jobs.",
    )
    patch: PatchSpec = Field(description="Patch size and sampler.")
    augment: AugmentSpec = Field(default=AugmentSpec(), description="Patch augmentation.")
    loss: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "cross_entropy"},
        description=(
            "The loss: {kind: cross_entropy | weighted_cross_entropy | dice | sum, ...} "
            "(see tilewise.losses.build_loss). Mask R-CNN trains with its own five losses: "
            "leave it out."
        ),
    )
    optimizer: OptimizerSpec = Field(default=OptimizerSpec(), description="The optimiser.")
    schedule: ScheduleSpec = Field(default=ScheduleSpec(), description="Learning-rate schedule.")
    steps: int | None = Field(
        default=None, ge=1, description="Optimiser steps in all (give steps or epochs)."
    )
    epochs: int | None = Field(
        default=None, ge=1, description="Epochs (shard reassignments) in all (steps or epochs)."
    )
    steps_per_epoch: int | None = Field(
        default=None,
        ge=1,
        description="Steps per epoch; null = the shards' pixels / (patch px x batch x workers).",
    )
    batch_size: int = Field(default=8, ge=1, description="Patches per step and worker.")
    amp: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Mixed precision: auto = bfloat16 on CUDA, float32 on CPU (and for Mask R-CNN)."
        ),
    )
    scaling: ScalingSpec = Field(default=ScalingSpec(), description="Workers and resources.")
    checkpoint: CheckpointSpec = Field(default=CheckpointSpec(), description="Checkpoints.")
    validation: ValidationSpec = Field(default=ValidationSpec(), description="Validation.")
    storage: str = Field(
        default="runs",
        description=(
            "Where runs keep checkpoints and logs (local path or fsspec URI); relative paths "
            "are relative to the job file's folder."
        ),
    )
    package: str | None = Field(
        default=None,
        description="Where the trained model package goes; null = <storage>/<name>/model.",
    )
    seed: int = Field(default=0, description="Seed of weights, shard order, patches, augment.")

    @field_validator("storage", "package")
    @classmethod
    def _resolve_locations(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_location(value, _base_dir(info))

    @field_validator("loss")
    @classmethod
    def _loss_builds(cls, value: dict[str, Any]) -> dict[str, Any]:
        from tilewise.losses import build_loss

        try:
            build_loss(value, path="loss")
        except ConfigError as exc:
            # build_loss names the dotted path itself ('loss.terms[0].kind: ...'): keep what
            # follows 'loss' as the place within it (the caller adds 'loss').
            head, _, message = str(exc).partition(": ")
            if not head.startswith("loss") or not message:
                head, message = "loss", str(exc)
            within = head.removeprefix("loss").lstrip(".")
            raise _RuleError([((within,) if within else (), message)]) from None
        return value

    @model_validator(mode="after")
    def check_rules(self) -> Self:
        """Check the rules that tie fields together; report all their problems at once."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        model = self.model
        if (self.steps is None) == (self.epochs is None):
            problems.append(
                (
                    ("steps",),
                    "give the length of the run as steps or as epochs (exactly one); got "
                    f"steps {_show(self.steps)} and epochs {_show(self.epochs)}.",
                )
            )
        problems.extend(_class_name_problems(model))
        if model.instance:
            # ignore_index is not checked: instance shards have no ignored pixels (0 is the
            # background), so the default 255 and any other value are unused alike
            problems.extend(self._instance_arch_problems())
        else:
            problems.extend(self._dense_arch_problems())
        if self.schedule.name == "step" and self.schedule.step_size is None:
            problems.append(
                (("schedule", "step_size"), "schedule 'step' needs step_size (steps per decay).")
            )
        unknown = _unknown_arg_problems(model)
        problems.extend(unknown)
        if not unknown and model.instance:
            problems.extend(self._instance_arg_problems())
        elif not unknown:
            # Mask R-CNN pads its input itself: the size rule and the margin are dense-only
            try:
                arch_facts = facts(
                    model.arch,
                    in_channels=model.in_channels or 3,
                    num_classes=model.num_classes,
                    **model.args,
                )
            except ConfigError as exc:
                problems.append((("model", "args"), str(exc)))
            else:
                rule, size = arch_facts.size_rule, self.patch.size
                if not rule.is_valid(size):
                    lower = max(rule.minimum, size - (size - rule.minimum) % rule.step)
                    fix = (
                        f"{rule.ceil(size)}"
                        if size < rule.minimum
                        else f"{lower} or " + str(rule.ceil(size))
                    )
                    problems.append(
                        (
                            ("patch", "size"),
                            f"{size} px is not a valid input size for arch '{model.arch}' "
                            f"(valid: {rule.minimum} + k x {rule.step}); got {size}. Use "
                            f"size: {fix}.",
                        )
                    )
                elif size - 2 * arch_facts.margin < 1:
                    problems.append(
                        (("patch", "size"), f"{size} px leaves no output after the margin.")
                    )
        if problems:
            raise _RuleError(problems)
        return self

    def _dense_arch_problems(self) -> Problems:
        """The rules of a network that scores pixels (everything but Mask R-CNN)."""
        model = self.model
        problems: Problems = []
        if self.data.ignore_index < model.num_classes:
            problems.append(
                (
                    ("data", "ignore_index"),
                    f"must not be a class (0..{model.num_classes - 1}); got "
                    f"{self.data.ignore_index}. Use e.g. 255.",
                )
            )
        if self.patch.background_class >= model.num_classes:
            problems.append(
                (
                    ("patch", "background_class"),
                    f"must be a class of the model (0..{model.num_classes - 1}); got "
                    f"{self.patch.background_class}.",
                )
            )
        problems.extend(_class_weight_problems(self.loss, model.num_classes, ("loss",)))
        metric = self.validation.metric
        if metric in _INSTANCE_METRICS:
            problems.append(
                (
                    ("validation", "metric"),
                    f"{metric} scores detected objects, but arch '{model.arch}' scores pixels; "
                    f"got {metric}. Use mean_iou, pixel_accuracy, mean_accuracy or "
                    f"frequency_weighted_iou (or leave it out: mean_iou).",
                )
            )
        return problems

    def _instance_arch_problems(self) -> Problems:
        """The rules of an instance architecture (Mask R-CNN): what does not apply to it."""
        model = self.model
        problems: Problems = []
        arch = model.arch
        if model.num_classes < 2:
            problems.append(
                (
                    ("model", "num_classes"),
                    f"counts the background as class 0 for '{arch}' and must be at least 2; got "
                    f"{model.num_classes}. Use 1 + the number of object classes.",
                )
            )
        if self.loss != {"kind": "cross_entropy"}:
            problems.append(
                (
                    ("loss",),
                    f"does not apply to instance architecture '{arch}': Mask R-CNN trains with "
                    f"its own five losses (objectness, proposal boxes, classifier, boxes, "
                    f"masks), summed; got {_show(self.loss)}. Remove it.",
                )
            )
        metric = self.validation.metric
        if metric is not None and metric not in _INSTANCE_METRICS:
            problems.append(
                (
                    ("validation", "metric"),
                    f"{metric} scores class maps, which instance architecture '{arch}' does not "
                    f"make; got {metric}. Use mask_ap50 or box_ap50 (or leave it out: "
                    f"mask_ap50).",
                )
            )
        if self.patch.background_class != 0:
            problems.append(
                (
                    ("patch", "background_class"),
                    f"the background of an instance shard is id 0 and every object is "
                    f"foreground for '{arch}'; got {self.patch.background_class}. Remove it.",
                )
            )
        return problems

    def _instance_arg_problems(self) -> Problems:
        return _instance_arg_problems(self.model)

    @property
    def run_name(self) -> str:
        """The run's name (``name``, else 'train')."""
        return self.name or "train"

    @property
    def package_location(self) -> str:
        """Where the model package is written."""
        if self.package is not None:
            return self.package
        return f"{self.storage.rstrip('/')}/{self.run_name}/model"


JOB_KINDS: dict[str, type[BaseModel]] = {"predict": PredictJob, "train": TrainJob}
Job: TypeAlias = Annotated[PredictJob | TrainJob, Field(discriminator="kind")]


# ----------------------------------------------------------------------------------------------
# Errors as lines
# ----------------------------------------------------------------------------------------------


def _dotted(loc: Sequence[str | int]) -> str:
    return ".".join(str(step) for step in loc) or "(top level)"


def _show(value: Any) -> str:
    """A given value as the user wrote it in YAML, shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        # As YAML's flow style, so that two mappings that differ can be told apart.
        text = yaml.safe_dump(dict(value), default_flow_style=True, width=10**6).strip()
        return text if len(text) <= 60 else text[:57] + "..."
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _non_null(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(annotation, False)``."""
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not NoneType]
        if len(members) < len(get_args(annotation)) and len(members) == 1:
            return members[0], True
    return annotation, False


def _annotation_at(root: type[BaseModel], loc: Sequence[str | int]) -> Any:
    """The type annotation at ``loc`` under ``root``, or None when the path leaves the models."""
    current: Any = root
    for step in loc:
        current, _ = _non_null(current)
        origin = get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if not isinstance(step, str) or step not in current.model_fields:
                return None
            current = current.model_fields[step].annotation
        elif origin is list and isinstance(step, int):
            current = get_args(current)[0]
        elif origin is dict:
            current = get_args(current)[1]
        else:
            return None
    return current


def _model_keys(root: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    annotation, _ = _non_null(_annotation_at(root, loc))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _sections_with_key(root: type[BaseModel], key: str, exclude: Sequence[str | int]) -> list[str]:
    """The job's sections (``input``, ``tiling``, ... and the top level) that take ``key``."""
    homes = [key] if key in root.model_fields and tuple(exclude) != () else []
    for name in root.model_fields:
        if (name,) != tuple(exclude) and key in _model_keys(root, (name,)):
            homes.append(f"{name}.{key}")
    return homes


def _literal_choices(root: type[BaseModel], loc: Sequence[str | int]) -> str | None:
    annotation, nullable = _non_null(_annotation_at(root, loc))
    if get_origin(annotation) is not Literal:
        return None
    choices = ", ".join(repr(choice) for choice in get_args(annotation))
    return choices + (" or null" if nullable else "")


_TYPE_MESSAGES = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping (key: value)",
}


def _message(error: Mapping[str, Any], root: type[BaseModel]) -> str:
    """One pydantic error as a short sentence (without its location)."""
    kind: str = error["type"]
    loc: tuple[str | int, ...] = tuple(error["loc"])
    given = error.get("input")
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    if kind == "missing":
        return "required field missing"
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        allowed = _model_keys(root, loc[:-1])
        hint = did_you_mean(key, allowed)
        if hint or not allowed:
            return f"unknown key '{key}'.{hint}"
        # A key that is right but in the wrong section (output.mask for input.mask, a top-level
        # tile for tiling.tile) is the likelier mistake than a new key: say where it goes.
        homes = _sections_with_key(root, key, loc[:-1])
        if homes:
            where = " or ".join(f"'{home}'" for home in homes)
            return (
                f"unknown key '{key}' here. It belongs at {where}: move it there. "
                f"Allowed keys here: {', '.join(allowed)}."
            )
        return f"unknown key '{key}'. Allowed keys: {', '.join(allowed)}."
    if kind == "literal_error":
        choices = _literal_choices(root, loc)
        if choices is not None:
            return f"must be one of {choices}; got {_show(given)}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind in ("model_type", "model_attributes_type"):
        keys = _model_keys(root, loc)
        return f"must be a mapping with keys {', '.join(keys)}; got {_show(given)}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}; got {_show(given)}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}; got {_show(given)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]}; got {_show(given)}"
    return f"{error['msg']}; got {_show(given)}"


def _error_lines(exc: ValidationError, root: type[BaseModel], source: str) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _RuleError):
            lines += [f"{source}: {_dotted(loc + sub)}: {msg}" for sub, msg in cause.problems]
        else:
            lines.append(f"{source}: {_dotted(loc)}: {_message(error, root)}")
    return lines


# ----------------------------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------------------------


def _validate(
    data: Mapping[str, Any], base_dir: Path | None, source: str
) -> tuple[Job | None, list[str]]:
    kinds = ", ".join(repr(k) for k in JOB_KINDS)
    kind = data.get("kind")
    if kind is None:
        return None, [f"{source}: kind: required field missing; set it to one of {kinds}"]
    if not isinstance(kind, str) or kind not in JOB_KINDS:
        hint = did_you_mean(kind, JOB_KINDS) if isinstance(kind, str) else ""
        return None, [f"{source}: kind: unknown job kind {_show(kind)}.{hint} Known kinds: {kinds}"]
    model = JOB_KINDS[kind]
    try:
        job = model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        return None, _error_lines(exc, model, source)
    return cast(Job, job), []


def _check_file(path: str | Path) -> tuple[Job | None, list[str]]:
    source = str(path)
    file = Path(os.path.abspath(path))
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None, [f"{source}: file not found"]
    except IsADirectoryError:
        return None, [f"{source}: is a folder, not a YAML job file"]
    except OSError as exc:
        return None, [f"{source}: cannot read the file: {exc.strerror or exc}"]
    try:
        data = yaml.safe_load(raw)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        extra = f" ({exc.context})" if exc.problem and exc.context else ""
        return None, [f"{source}: cannot parse YAML{where}: {problem}{extra}"]
    except yaml.YAMLError as exc:
        return None, [f"{source}: cannot parse YAML: {exc}"]
    if data is None:
        return None, [f"{source}: the file is empty; a job is a YAML mapping (kind: predict, ...)"]
    if not isinstance(data, Mapping):
        return None, [
            f"{source}: the top level must be a YAML mapping (kind: predict, input: ..., ...); "
            f"got a {type(data).__name__}"
        ]
    data = dict(data)
    if data.get("name") is None:
        data["name"] = file.stem
    return _validate(data, file.parent, source)


def parse_job(
    data: Mapping[str, Any], *, base_dir: Path | None = None, source: str = "<job>"
) -> Job:
    """Validate an already-loaded job mapping.

    Args:
        data: the job as a mapping (what ``yaml.safe_load`` returns for a job file).
        base_dir: folder that relative local paths resolve against; None = the current directory.
        source: name shown at the start of every error line.

    Returns:
        The validated job (the model that its ``kind`` selects).

    Raises:
        ConfigError: listing every problem, one per line, as ``SOURCE: dotted.path: message``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a job must be a mapping; got a {type(data).__name__}")
    job, lines = _validate(data, base_dir, source)
    if job is None:
        raise ConfigError("\n".join(lines))
    return job


def load_job(path: str | Path) -> Job:
    """Read and validate a YAML job file.

    Relative local paths in the job resolve against the file's folder, and ``name`` defaults to
    the file's stem.

    Args:
        path: the YAML file.

    Returns:
        The validated job.

    Raises:
        ConfigError: listing every problem, one per line, as ``FILE: dotted.path: message``
            (or one line when the file cannot be read or parsed).
    """
    job, lines = _check_file(path)
    if job is None:
        raise ConfigError("\n".join(lines))
    return job


def job_errors(path: str | Path) -> list[str]:
    """The problems of one job file, one line each; an empty list when the job is valid.

    Args:
        path: the YAML file.

    Returns:
        Lines of the form ``FILE: dotted.path: message``.
    """
    return _check_file(path)[1]


def validate_files(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """The problems of several job files (``tilewise validate a.yaml b.yaml``).

    Args:
        paths: the YAML files.

    Returns:
        For each file (as given), its error lines; an empty list for a valid file.
    """
    return {str(path): job_errors(path) for path in paths}


def json_schema() -> dict[str, Any]:
    """The JSON schema of every job kind, for editors' YAML completion (``tilewise schema``).

    Returns:
        A JSON Schema (draft 2020-12) document: a ``oneOf`` over the job kinds, with an
        OpenAPI-style ``discriminator`` on ``kind`` and the models under ``$defs``.
    """
    models = [(model, "validation") for model in JOB_KINDS.values()]
    refs, top = models_json_schema(models, ref_template="#/$defs/{model}")  # type: ignore[arg-type]
    mapping = {kind: refs[(model, "validation")]["$ref"] for kind, model in JOB_KINDS.items()}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tilewise job",
        "description": "A tilewise job spec; `kind` selects the job type.",
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "kind", "mapping": mapping},
        "$defs": top["$defs"],
    }
