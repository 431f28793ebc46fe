"""``tilewise run --plan``: what a job will compute and the memory each actor needs.

:func:`plan_job` opens the job's inputs and its existing outputs read-only, lays out the write
units and the model windows exactly as a run would, and estimates the host and device memory of
one predictor actor. It computes no pixel, creates nothing, and starts no Ray (it only connects
to a cluster whose address it is given, to read the cluster's resources).

**Memory model.** A predictor actor works on one write unit at a time (the *unit* below is the
largest of the image: at most one chunk or shard, read with its halo):

- host: the process baseline (:data:`HOST_BASELINE`, measured), the model weights (the network is
  built on the host before it moves to the device, and the raised glibc thresholds keep freed heap
  memory in the process), ``prefetch + 1`` raw read buffers (the unit being computed and the
  units read ahead; pinned on CUDA), and one unit's labels and probabilities being written. On a
  CPU actor the host also holds everything listed for the device.
- device: the weights, the raw unit and its normalised float32 copy, one batch of windows
  (float32), the forward pass's activations, the float32 accumulator (plus a weight sum for
  ``blend``/``sliding``), and the labels and probabilities computed there; on CUDA also the
  context (:data:`CUDA_CONTEXT`, an estimate).

A unit passes through three stages on the device (:data:`PHASES`): normalising, the batches,
making the outputs. Each item says in which stages it is held; a total is the peak, the largest
sum over the stages (matching, to within a few percent and from above, the engine itself traced
on the meta device; the tests check that). Not counted: Zarr's codec buffers, cuDNN/oneDNN kernel
workspaces, allocator caching and fragmentation, and on CUDA the context and runtime libraries
beyond the stated estimates.

**Activations are measured, not guessed.** :func:`forward_memory` builds the network on the
``meta`` device (shapes only, no weights: fast even for 100M-parameter nets) and runs one forward
pass of a batch under :class:`LiveTensorTracker`, a ``TorchDispatchMode`` that adds the bytes of
each tensor storage an op creates and subtracts them when the storage is freed; the peak of that
sum is the activation memory. Under ``bfloat16``/``float16`` precision the network runs in that
dtype on the meta device (autocast cannot run there), which is what autocast's convolutions and
matrix products produce; ops that autocast keeps in float32 (softmax, norms) are counted at the
lower precision.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tilewise.pipeline.cluster import cluster_address
from tilewise.pipeline.engine import TilePlan
from tilewise.spec import PredictJob

__all__ = [
    "CUDA_CONTEXT",
    "CUDA_HOST_RUNTIME",
    "HOST_BASELINE",
    "PHASES",
    "ClusterResources",
    "ForwardMemory",
    "ImagePlan",
    "LiveTensorTracker",
    "MemoryItem",
    "Plan",
    "forward_memory",
    "peak_of",
    "plan_job",
]

MiB = 1024**2
GiB = 1024**3

#: Resident memory of an idle predictor actor: a Ray worker process that has imported torch,
#: zarr, Ray and tilewise and built a tiny network. Measured with psutil inside a Ray 2.60 actor on
#: Linux x86-64 with the CPU build of torch 2.13: 317 MiB (torch alone 204 MiB, + zarr 9, + Ray 36,
#: + tilewise and the Ray worker runtime the rest); rounded up.
HOST_BASELINE = 320 * MiB

#: GPU memory taken by the CUDA context of an actor (kernels of torch, cuBLAS and cuDNN loaded
#: lazily). An estimate, not measured here: it varies with the GPU, the driver and the CUDA version
#: (a few hundred MB up to about 1 GB).
CUDA_CONTEXT = 500 * MiB

#: Extra host memory of a process that has initialised CUDA (the runtime libraries). An estimate,
#: not measured here (no GPU was available where the baseline was measured).
CUDA_HOST_RUNTIME = 500 * MiB

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Live tensor bytes under a dispatch mode
# ----------------------------------------------------------------------------------------------


class LiveTensorTracker(TorchDispatchMode):
    """Bytes of the tensor storages alive under this mode: their running sum and its peak.

    Every op's outputs are looked at when they are created: an output whose storage is new
    (not one of the op's inputs' storages, nor one already counted) adds its storage's size; a
    ``weakref.finalize`` on the storage subtracts it when the storage is freed. Views and in-place
    results share a storage, so they add nothing. Tensors that exist before the mode (weights,
    the input) are not counted unless passed to :meth:`track`.

    Works on any device, the ``meta`` device included (sizes without data). Kernel workspaces
    that an op allocates and frees inside itself are invisible here: only the tensors the ops
    return are counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def track(self, tensor: torch.Tensor) -> None:
        """Count a tensor made outside the mode (e.g. the input) as live from now on."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        size = int(storage.nbytes())
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        # Storages keep their Python object while any tensor uses them (PyObject preservation),
        # so this fires when the memory itself is released.
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.live -= size

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        flat_in, _ = tree_flatten((args, kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in flat_in if isinstance(t, torch.Tensor)}
        flat_out, _ = tree_flatten(out)
        for t in flat_out:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self.track(t)
        return out


@dataclass(frozen=True)
class ForwardMemory:
    """Tensor memory of one measured forward pass (bytes)."""

    peak: int
    """Peak of the live tensor bytes, the input included."""
    input: int
    """The input batch."""
    output: int
    """The scores returned (alive at the end)."""


def forward_memory(
    model: nn.Module,
    shape: tuple[int, int, int, int],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "meta",
    flip: bool = False,
    sliding: bool = False,
) -> ForwardMemory:
    """Measure the tensor memory of one forward pass of a ``(B, C, h, w)`` batch.

    The pass is the engine's: the network, with ``flip`` a second pass on the mirrored batch
    added to the first (PSPNet's evaluation), the scores turned to float32, and with ``sliding``
    to probabilities. It runs under ``torch.inference_mode()`` (no autograd buffers) and
    :class:`LiveTensorTracker`.

    Args:
        model: the network, on ``device`` and in ``dtype`` (build it under
            ``torch.device("meta")`` to measure without memory or arithmetic).
        shape: the batch shape.
        dtype: dtype of the input batch.
        device: where the batch is made and the pass runs.
        flip: add the pass on the horizontally mirrored batch.
        sliding: return probabilities (softmax) as ``stitch: sliding`` does.

    Returns:
        The peak (input included), the input's and the output's bytes.
    """
    from tilewise.models.ensemble import probabilities

    model = model.eval()
    tracker = LiveTensorTracker()
    with torch.inference_mode(), torch.device(device):
        x = torch.empty(shape, dtype=dtype, device=device)
        with tracker:
            tracker.track(x)
            scores = model(x)
            if isinstance(scores, tuple):  # an auxiliary head: the main output
                scores = scores[0]
            if flip:
                scores = scores + model(x.flip(-1)).flip(-1)
            scores = scores.float()
            if sliding:
                scores = probabilities(scores)
        out = int(scores.untyped_storage().nbytes())
    return ForwardMemory(tracker.peak, int(x.untyped_storage().nbytes()), out)


def _outputs_memory(
    num_classes: int, height: int, width: int, labels: str | None, probs: str | None
) -> tuple[int, int, list[int]]:
    """Measure labels and probabilities of a unit on the meta device.

    Returns the peak of new tensor bytes while both are made (the results and the temporaries
    of softmax and arg-max), and the bytes of each result (what crosses to the host).
    """
    from tilewise.pipeline.postprocess import labels_tensor, probabilities_tensor

    tracker = LiveTensorTracker()
    kept: list[torch.Tensor] = []
    with torch.inference_mode():
        scores = torch.empty((num_classes, height, width), dtype=torch.float32, device="meta")
        with tracker:
            if labels:
                kept.append(labels_tensor(scores, labels))
            if probs:
                kept.append(probabilities_tensor(scores, probs))
    return tracker.peak, tracker.live, [int(t.untyped_storage().nbytes()) for t in kept]


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


#: The stages of a unit on the device, in order. The raw and normalised unit live through the
#: first two, the accumulator through the last two; the rest of a stage's tensors are freed when
#: it ends, so the peak is that of the largest stage.
PHASES = ("normalise", "batches", "outputs")


@dataclass(frozen=True)
class MemoryItem:
    """One line of a memory estimate.

    ``phases`` names the stages of a unit (:data:`PHASES`) during which the memory is held;
    empty means all the time.
    """

    name: str
    bytes: int
    note: str = ""
    phases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "name": self.name,
            "bytes": int(self.bytes),
            "note": self.note,
            "phases": list(self.phases),  # [] = held all the time
        }


def peak_of(items: Sequence[MemoryItem]) -> tuple[int, str]:
    """The largest sum of the items held at once, and the stage where it occurs.

    Without staged items that is the plain sum, and the stage is ''.
    """
    if not any(i.phases for i in items):
        return sum(i.bytes for i in items), ""
    totals = [
        (sum(i.bytes for i in items if not i.phases or phase in i.phases), phase)
        for phase in PHASES
    ]
    return max(totals, key=lambda t: t[0])  # the first stage on a tie


@dataclass(frozen=True)
class ClusterResources:
    """What the actors can be given: this machine's resources or a Ray cluster's."""

    source: str
    """'this machine' or the cluster address."""
    local: bool
    cpus: float
    gpus: float
    memory: int
    """Host RAM in bytes (this machine's; the Ray 'memory' resource on a cluster)."""
    gpu_memory: int | None = None
    """Memory of one GPU in bytes, when CUDA is present here."""
    bf16: bool = True
    """Whether CUDA here supports bfloat16 (assumed on a cluster)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "source": self.source,
            "local": self.local,
            "cpus": self.cpus,
            "gpus": self.gpus,
            "memory_bytes": int(self.memory),
            "gpu_memory_bytes": None if self.gpu_memory is None else int(self.gpu_memory),
        }


def _local_resources() -> ClusterResources:
    import psutil

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_memory = None
    bf16 = True
    if gpus:
        gpu_memory = int(torch.cuda.get_device_properties(0).total_memory)
        bf16 = bool(torch.cuda.is_bf16_supported())
    return ClusterResources(
        "this machine",
        True,
        float(os.cpu_count() or 1),
        float(gpus),
        int(psutil.virtual_memory().total),
        gpu_memory,
        bf16,
    )


def _cluster_resources(address: str, where: str = "--address") -> ClusterResources:
    import ray

    from tilewise.pipeline.cluster import join

    started = False
    if not ray.is_initialized():
        join(address, where)
        started = True
    try:
        resources = ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
    return ClusterResources(
        address,
        False,
        float(resources.get("CPU", 0)),
        float(resources.get("GPU", 0)),
        int(resources.get("memory", 0)),
    )


@dataclass
class ImagePlan:
    """What one image of the job computes, and the memory an actor needs for it."""

    name: str
    input: str
    output: str
    input_shape: tuple[int, int, int]
    input_dtype: str
    arch: str
    parameters: int
    weights_bytes: int
    num_classes: int
    tile: int
    halo: int
    stitch: str
    window: tuple[int, int]
    step: int
    batch_size: int
    unit_side: int
    unit_max: tuple[int, int]
    read_max: tuple[int, int]
    units_total: int
    units_done: int
    units_background: int
    units_to_compute: int
    windows_min: int
    windows_max: int
    windows_total: int
    windows_to_compute: int
    units_few_windows: int
    """Units holding fewer windows than a batch (their batches run part-empty)."""
    output_pixels: int
    """Output pixels of the units this run computes."""
    computed_pixels: int
    """Input pixels the network processes for them."""
    full_output_pixels: int
    """Output pixels of the whole image."""
    full_computed_pixels: int
    """Input pixels the network would process for every unit of the image."""
    output_state: str
    """'none', 'resumable' (same job), 'complete' (same job, finished), 'foreign' (another job
    or not tilewise), 'replace' (--overwrite or output.overwrite: computed afresh)."""
    mask: str = ""
    host: list[MemoryItem] = field(default_factory=list)
    device: list[MemoryItem] = field(default_factory=list)

    @property
    def overlap(self) -> float:
        """Computed pixels per output pixel of the units this run computes (the figure the run
        report prints); of a full run when nothing is left to compute."""
        if self.output_pixels:
            return self.computed_pixels / self.output_pixels
        return self.full_computed_pixels / self.full_output_pixels

    @property
    def host_total(self) -> int:
        """Peak host bytes per actor."""
        return peak_of(self.host)[0]

    @property
    def device_total(self) -> int:
        """Peak device bytes per actor (0 on a CPU actor: everything is in :attr:`host`)."""
        return peak_of(self.device)[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (bytes as ints)."""
        return {
            "name": self.name,
            "input": self.input,
            "output": self.output,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "model": {
                "arch": self.arch,
                "parameters": self.parameters,
                "weights_bytes": self.weights_bytes,
                "num_classes": self.num_classes,
            },
            "tiling": {
                "tile": self.tile,
                "halo": self.halo,
                "stitch": self.stitch,
                "window": list(self.window),
                "step": self.step,
                "batch_size": self.batch_size,
            },
            "units": {
                "side": self.unit_side,
                "largest": list(self.unit_max),
                "largest_read": list(self.read_max),
                "total": self.units_total,
                "done": self.units_done,
                "background": self.units_background,
                "to_compute": self.units_to_compute,
            },
            "windows": {
                "per_unit_min": self.windows_min,
                "per_unit_max": self.windows_max,
                "total": self.windows_total,
                "to_compute": self.windows_to_compute,
                "units_below_batch": self.units_few_windows,
            },
            "output_pixels": self.output_pixels,
            "computed_pixels": self.computed_pixels,
            "full_output_pixels": self.full_output_pixels,
            "full_computed_pixels": self.full_computed_pixels,
            "overlap": round(self.overlap, 4),
            "output_state": self.output_state,
            "mask": self.mask,
            "memory": {
                "host": [i.to_dict() for i in self.host],
                "host_total": self.host_total,
                "device": [i.to_dict() for i in self.device],
                "device_total": self.device_total,
            },
        }


@dataclass
class Plan:
    """The plan of a whole job: one :class:`ImagePlan` per image, the actors, the verdict."""

    name: str
    images: list[ImagePlan]
    resources: ClusterResources
    actors: int
    cpus_each: float
    gpus_each: float
    device: str
    precision: str
    prefetch: int
    memory: ImagePlan
    """The image whose per-actor memory is the largest (every actor may work on any image)."""
    fits: bool | None
    verdict: str
    warnings: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        """Units, windows and pixels summed over the images."""
        keys = (
            "units_total",
            "units_done",
            "units_background",
            "units_to_compute",
            "windows_total",
            "windows_to_compute",
            "output_pixels",
            "computed_pixels",
            "full_output_pixels",
            "full_computed_pixels",
        )
        out: dict[str, Any] = {k: sum(getattr(i, k) for i in self.images) for k in keys}
        if out["output_pixels"]:
            out["overlap"] = round(out["computed_pixels"] / out["output_pixels"], 4)
        else:
            out["overlap"] = round(out["full_computed_pixels"] / out["full_output_pixels"], 4)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (bytes as ints)."""
        m = self.memory
        return {
            "name": self.name,
            "images": [i.to_dict() for i in self.images],
            "totals": self.totals(),
            "actors": {
                "count": self.actors,
                "cpus_each": self.cpus_each,
                "gpus_each": self.gpus_each,
                "device": self.device,
                "precision": self.precision,
                "prefetch": self.prefetch,
            },
            "resources": self.resources.to_dict(),
            "memory_per_actor": {
                "image": m.name,
                "host": [i.to_dict() for i in m.host],
                "host_total": m.host_total,
                "device": [i.to_dict() for i in m.device],
                "device_total": m.device_total,
            },
            "fits": self.fits,
            "verdict": self.verdict,
            "warnings": list(self.warnings),
        }

    def lines(self) -> list[str]:
        """The plan as text, one screen per image plus the actors and their memory."""
        out = [f"tilewise plan '{self.name}': nothing is computed or written"]
        for im in self.images:
            out += _image_lines(im, several=len(self.images) > 1)
        if len(self.images) > 1:
            t = self.totals()
            out += [
                f"totals ({len(self.images)} images)",
                f"  units    {t['units_total']} in all: {t['units_done']} done, "
                f"{t['units_background']} background, {t['units_to_compute']} to compute",
                f"  windows  {t['windows_total']:,} in all, {t['windows_to_compute']:,} to compute",
                f"  overlap  overhead {t['overlap']:.2f}x "
                + _overlap_detail(t["computed_pixels"], t["output_pixels"]),
            ]
        r = self.resources
        gpus = f"{self.gpus_each:g} GPU" + ("" if self.gpus_each == 1 else "s")
        out += [
            f"actors   {self.actors} x ({self.cpus_each:g} CPUs, {gpus}) on {self.device}, "
            f"precision {self.precision}, prefetch {self.prefetch}",
            f"  cluster  {r.source}: {r.cpus:g} CPUs, {r.gpus:g} GPUs, "
            f"{_size(r.memory)} RAM" + (f", {_size(r.gpu_memory)} per GPU" if r.gpu_memory else ""),
        ]
        m = self.memory
        which = f" for image {m.name}, the largest" if len(self.images) > 1 else ""
        on_cpu = "; the network runs on the CPU" if self.device == "cpu" else ""
        out.append(f"memory per actor, host{which}{on_cpu}")
        out += _memory_lines(m.host)
        if self.device == "cpu":
            out.append(
                "  note     tensors only: CPU convolution kernels allocate workspaces of their own "
                "and the allocator keeps freed memory, so measured peaks run higher "
                "(bench/large_mosaic.py's actor at 4096^2, U-Net depth 2, batch 1: 0.57 GB RSS "
                "where 0.41 GB was planned)"
            )
        if m.device:
            out.append(f"memory per actor, GPU{which}")
            out += _memory_lines(m.device)
        out += [f"warning: {w}" for w in self.warnings]
        out.append(self.verdict)
        return out


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _mpx(n: int) -> str:
    return f"{n / 1e6:.2f} Mpx"


def _overlap_detail(computed: int, output: int) -> str:
    if not output:
        return "(of a full run: nothing is left to compute)"
    return f"({_mpx(computed)} computed for {_mpx(output)} of output)"


_PHASE_WORDS = {
    ("normalise",): "while normalising",
    ("batches",): "per batch",
    ("outputs",): "after the batches",
    ("normalise", "batches"): "until the outputs",
    ("batches", "outputs"): "from the first batch",
}


_PEAK_WORDS = {
    "normalise": "while normalising",
    "batches": "during the batches",
    "outputs": "while making the outputs",
}


def _memory_lines(items: list[MemoryItem]) -> list[str]:
    lines = []
    for i in items:
        when = _PHASE_WORDS.get(i.phases, "+".join(i.phases))
        note = "; ".join(x for x in (i.note, when) if x)
        lines.append(f"  {i.name:<40} {_size(i.bytes):>10}  {note}".rstrip())
    total, phase = peak_of(items)
    label = f"total (peak {_PEAK_WORDS[phase]})" if phase else "total"
    lines.append(f"  {label:<40} {_size(total):>10}")
    return lines


def _image_lines(im: ImagePlan, *, several: bool) -> list[str]:
    c, h, w = im.input_shape
    state = {
        "none": "no output yet",
        "resumable": "output of this job exists: resuming",
        "complete": "output of this job is complete",
        "foreign": "output exists and belongs to another job: the run refuses it without "
        "--overwrite",
        "replace": "output exists and will be replaced: --overwrite or output.overwrite",
    }[im.output_state]
    window = (
        f"{im.window[0]}" if im.window[0] == im.window[1] else f"{im.window[0]} x {im.window[1]}"
    )
    lines = [
        f"image    {im.name}: {im.input}" if several else f"image    {im.input}",
        f"  input    {c} x {h} x {w} (bands x height x width), {im.input_dtype}",
        f"  model    {im.arch}: {im.parameters:,} parameters ({_size(im.weights_bytes)}), "
        f"{im.num_classes} classes",
        f"  tiling   tile {im.tile}, halo {im.halo}, stitch {im.stitch}, window {window}, "
        f"step {im.step}, batch {im.batch_size}",
        f"  units    {im.units_total} of {im.unit_side} px in all: {im.units_done} done, "
        f"{im.units_background} background, {im.units_to_compute} to compute",
        f"  windows  {im.windows_min}..{im.windows_max} per unit, {im.windows_total:,} in all, "
        f"{im.windows_to_compute:,} to compute",
        f"  overlap  overhead {im.overlap:.2f}x "
        + _overlap_detail(im.computed_pixels, im.output_pixels),
        f"  output   {im.output} ({state})",
    ]
    if im.mask:
        lines.insert(-1, f"  mask     {im.mask}")
    return lines


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def _axis_counts(
    axis: Any, side: int, size: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Per unit row (or column): windows, computed pixels, read extent and unit extent."""
    windows, pixels, reads, extents = [], [], [], []
    for u0 in range(0, size, side):
        u1 = min(u0 + side, size)
        ks = axis.windows_for(u0, u1)
        r0, r1 = axis.read_range(u0, u1)
        windows.append(len(ks))
        pixels.append(axis.computed_pixels(u0, u1))
        reads.append(r1 - r0)
        extents.append(u1 - u0)
    return windows, pixels, reads, extents


def _meta_model(job: PredictJob, in_channels: int, *, check_weights: bool = False) -> nn.Module:
    """The job's network on the meta device; with ``check_weights``, its weights file is read
    and refused as the run would refuse it (once per plan: the file may be large)."""
    from tilewise import models
    from tilewise.models.ensemble import FlipAverage
    from tilewise.pipeline.job import load_weights

    m = job.model
    with torch.device("meta"):
        model = models.create(m.arch, in_channels=in_channels, num_classes=m.num_classes, **m.args)
    if check_weights:
        # Copying into meta tensors checks every name and shape and stores nothing (torch warns
        # that it is a no-op, which is the point).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            load_weights(model, job, in_channels)
    if m.tta == "flip":
        model = FlipAverage(model)
    return model.eval()


def _tensor_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _output_state(job: PredictJob, fingerprint: str, units: int) -> tuple[str, set[int]]:
    """What exists at the output (read-only), and the units recorded done there."""
    from tilewise.pipeline.output import OutputStore

    store = OutputStore(job.output.path, job.output.storage_options)
    store.check_location()
    state = store.state()
    if state is None:
        return "none", set()
    if job.output.overwrite:  # the run deletes it, even a resumable output of this job
        return "replace", set()
    if state.get("fingerprint") != fingerprint:
        return "foreign", set()
    # The completion record decides, not the status: a run resumes whatever has no marker.
    done = {k for k in store.done_units() if 0 <= k < units}
    return ("complete" if len(done) == units else "resumable"), done


def _background(prepared: Any) -> tuple[set[int], str]:
    mask = prepared.job.input.mask
    if mask is None:
        return set(), ""
    from tilewise.pipeline.masks import background_units, resolve_nodata

    if mask.method == "nodata":
        value = resolve_nodata(prepared.image, mask)  # a missing value is refused in the plan too
        return set(), f"nodata ({value:g}): decided per unit by the actors (not counted here)"

    background, fg = background_units(
        prepared.image, prepared.grid, mask, storage_options=prepared.job.input.storage_options
    )
    if fg is None:
        return set(), f"{mask.method}: no mask, every unit is computed"
    return background, f"{mask.method} ({fg.source}): foreground {fg.fraction:.1%} of the mask"


@dataclass
class _Setting:
    """What the memory estimate needs besides the image."""

    device: str
    precision: str
    prefetch: int
    batch: int  # windows per forward, the job's or the device's default


_forward_cache: dict[tuple[Any, ...], ForwardMemory] = {}


def _forward(
    job: PredictJob,
    in_channels: int,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    plan: TilePlan,
) -> ForwardMemory:
    key = (job.model.model_dump_json(), in_channels, shape, dtype, plan.flip, plan.stitch)
    if key not in _forward_cache:
        _forward_cache[key] = forward_memory(
            _meta_model(job, in_channels).to(dtype),
            shape,
            dtype=dtype,
            flip=plan.flip,
            sliding=plan.stitch == "sliding",
        )
    return _forward_cache[key]


def _memory(
    im: ImagePlan, prepared: Any, setting: _Setting
) -> tuple[list[MemoryItem], list[MemoryItem]]:
    job: PredictJob = prepared.job
    plan: TilePlan = prepared.plan
    c = prepared.in_channels
    k = job.model.num_classes
    raw_dtype = prepared.image.dtype
    rh, rw = im.read_max
    uh, uw = im.unit_max
    wy, wx = im.window
    cuda = setting.device == "cuda"
    dtype = _DTYPES[setting.precision]
    batch = max(1, min(setting.batch, im.windows_max))
    until_outputs, per_batch = ("normalise", "batches"), ("batches",)
    from_batches, after = ("batches", "outputs"), ("outputs",)

    raw = c * rh * rw * raw_dtype.itemsize
    unit32 = c * rh * rw * 4
    weights = im.weights_bytes
    fwd = _forward(job, c, (batch, c, wy, wx), dtype, plan)
    # A float32 batch is the stack itself (counted below); a lower precision makes a copy.
    activations = fwd.peak - (fwd.input if dtype == torch.float32 else 0)
    out_peak, _, out_sizes = _outputs_memory(k, uh, uw, job.output.labels, job.output.probabilities)
    outputs = " + ".join(x for x in (job.output.labels, job.output.probabilities) if x)
    dev: list[MemoryItem] = [
        MemoryItem("model weights", weights, f"{im.parameters:,} parameters and buffers"),
    ]
    if cuda:  # on the CPU the raw unit is the read buffer itself
        dev.append(
            MemoryItem("unit read, raw", raw, f"{c} x {rh} x {rw} {raw_dtype}", until_outputs)
        )
    flips = ", two passes (flip)" if plan.flip or job.model.tta == "flip" else ""
    dev += [
        MemoryItem("unit normalised (float32)", unit32, f"{c} x {rh} x {rw}", until_outputs),
        MemoryItem(
            "batch of windows (float32)",
            batch * c * wy * wx * 4,
            f"{batch} x {c} x {wy} x {wx}",
            per_batch,
        ),
        MemoryItem(
            f"activations ({setting.precision})", activations, "measured" + flips, per_batch
        ),
        MemoryItem("accumulator (float32)", k * uh * uw * 4, f"{k} x {uh} x {uw}", from_batches),
    ]
    if plan.stitch != "crop":
        dev.append(MemoryItem("weight sum (float32)", uh * uw * 4, f"{uh} x {uw}", from_batches))
    dev.append(MemoryItem("labels and probabilities", out_peak, f"{outputs}, measured", after))
    if cuda:
        dev.append(MemoryItem("CUDA context", CUDA_CONTEXT, "estimate"))

    host: list[MemoryItem] = [
        MemoryItem("process (torch, zarr, Ray worker)", HOST_BASELINE, "measured baseline"),
    ]
    if cuda:
        host.append(MemoryItem("CUDA runtime libraries", CUDA_HOST_RUNTIME, "estimate"))
    host.append(
        MemoryItem("model weights", weights, "built here, then moved to the GPU" if cuda else "")
    )
    n_read = setting.prefetch + 1
    host.append(
        MemoryItem(
            f"read buffers ({n_read}: prefetch {setting.prefetch} + 1)",
            n_read * raw,
            f"{c} x {rh} x {rw} {raw_dtype} each" + (", pinned" if cuda else ""),
        )
    )
    # uint16 labels leave the device as int32 (torch has no general uint16) and are cast here.
    written = sum(out_sizes) + (uh * uw * 2 if job.output.labels == "uint16" else 0)
    host.append(MemoryItem("unit being written", written, f"{outputs} of {uh} x {uw}"))
    if not cuda:
        host += dev[1:]  # the weights are already counted
        dev = []
    return host, dev


def _plan_image(
    job: PredictJob, setting: _Setting, models_cache: dict[int, nn.Module]
) -> ImagePlan:
    from tilewise.models.layers import count_parameters
    from tilewise.pipeline.job import prepare

    p = prepare(job)
    plan, grid = p.plan, p.grid
    c, h, w = p.image.shape
    state, done = _output_state(job, p.fingerprint, len(grid))
    background, mask_note = _background(p)
    wy_n, py_n, ry_n, ey_n = _axis_counts(plan.y, grid.side, h)
    wx_n, px_n, rx_n, ex_n = _axis_counts(plan.x, grid.side, w)
    todo = [u for u in range(len(grid)) if u not in done and u not in background]
    windows_todo = computed = output = 0
    for u in todo:
        i, j = divmod(u, grid.cols)
        windows_todo += wy_n[i] * wx_n[j]
        computed += py_n[i] * px_n[j]
        output += ey_n[i] * ex_n[j]
    batch = setting.batch
    few = sum(1 for ny in wy_n for nx in wx_n if ny * nx < batch)
    if p.in_channels not in models_cache:
        models_cache[p.in_channels] = _meta_model(job, p.in_channels, check_weights=True)
    model = models_cache[p.in_channels]
    step = plan.y.step if plan.stitch == "sliding" else plan.y.tile  # type: ignore[union-attr]
    im = ImagePlan(
        name=job.name or "job",
        input=p.image.location,
        output=job.output.path,
        input_shape=(c, h, w),
        input_dtype=str(p.image.dtype),
        arch=job.model.arch + (" (flip TTA)" if job.model.tta == "flip" else ""),
        parameters=count_parameters(model),
        weights_bytes=_tensor_bytes(model),
        num_classes=job.model.num_classes,
        tile=plan.y.tile,
        halo=plan.y.halo,
        stitch=plan.stitch,
        window=(plan.y.window, plan.x.window),
        step=step,
        batch_size=setting.batch,
        unit_side=grid.side,
        unit_max=(max(ey_n), max(ex_n)),
        read_max=(max(ry_n), max(rx_n)),
        units_total=len(grid),
        units_done=len(done),
        units_background=len(background - done),
        units_to_compute=len(todo),
        windows_min=min(wy_n) * min(wx_n),
        windows_max=max(wy_n) * max(wx_n),
        windows_total=sum(wy_n) * sum(wx_n),
        windows_to_compute=windows_todo,
        units_few_windows=few,
        output_pixels=output,
        computed_pixels=computed,
        full_output_pixels=h * w,
        full_computed_pixels=sum(py_n) * sum(px_n),
        output_state=state,
        mask=mask_note,
    )
    im.host, im.device = _memory(im, p, setting)
    return im


def plan_job(
    job: PredictJob,
    *,
    address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> Plan:
    """Plan a job without running it: units, windows, overlap, actors and memory per actor.

    Args:
        job: the validated job (one image, or a list or glob of images).
        address: Ray cluster address (overrides ``compute.address`` and ``$RAY_ADDRESS``). With
            one, the cluster's resources are read (connect, read, disconnect); without, this
            machine's CPUs and GPUs are used and no Ray is started.
        workers: predictor actors (overrides ``compute.workers``).
        overwrite: plan the run of ``tilewise run --overwrite``: existing outputs are replaced,
            so every unit is computed.

    Returns:
        The plan (:meth:`Plan.lines` for text, :meth:`Plan.to_dict` for JSON).

    Raises:
        TilewiseError: what the run would reject (bad input, tiling, a CUDA job on a cluster
            without GPUs).
    """
    from tilewise.pipeline.driver import actor_layout
    from tilewise.pipeline.job import expand_images
    from tilewise.workers.predictor import precision_name

    singles = expand_images(job)
    if overwrite:
        singles = [
            j.model_copy(update={"output": j.output.model_copy(update={"overwrite": True})})
            for j in singles
        ]
    joined, where = cluster_address(address, job.compute.address)
    resources = _cluster_resources(joined, where) if joined else _local_resources()
    layout = actor_layout(job.compute, cpus=resources.cpus, gpus=resources.gpus, workers=workers)
    setting = _Setting(
        layout.device,
        precision_name(job.compute.precision, layout.device, resources.bf16),
        job.compute.prefetch,
        job.tiling.windows_per_forward(layout.device),
    )
    models_cache: dict[int, nn.Module] = {}
    images = [_plan_image(single, setting, models_cache) for single in singles]
    memory = max(images, key=lambda im: im.host_total + im.device_total)
    plan = Plan(
        name=job.name or "job",
        images=images,
        resources=resources,
        actors=layout.actors,
        cpus_each=layout.cpus_each,
        gpus_each=layout.gpus_each,
        device=layout.device,
        precision=setting.precision,
        prefetch=setting.prefetch,
        memory=memory,
        fits=None,
        verdict="",
    )
    plan.warnings = _warnings(plan)
    plan.fits, plan.verdict = _verdict(plan)
    return plan


def _warnings(plan: Plan) -> list[str]:
    out: list[str] = []
    for im in plan.images:
        who = f"{im.name}: " if len(plan.images) > 1 else ""
        batch = im.batch_size
        if im.windows_max < batch:
            out.append(
                f"{who}units hold at most {im.windows_max} windows but batches take {batch}: "
                f"every batch runs part-empty. Use a larger output.chunk (or shard), or "
                f"tiling.batch_size: {im.windows_max}."
            )
        elif im.units_few_windows and 4 * im.units_few_windows >= im.units_total:
            out.append(
                f"{who}{im.units_few_windows} of {im.units_total} units hold fewer windows than "
                f"a batch ({batch}): their batches run part-empty. Use a larger output.chunk "
                f"(or shard)."
            )
        if im.overlap > 2:
            if im.unit_side < im.tile:
                fix = (
                    f"Use output.chunk of at least the tile ({im.tile}): smaller units compute "
                    f"each window again"
                )
            else:
                ratio = im.window[0] * im.window[1] / im.tile**2
                fix = (
                    f"Use a larger tiling.tile: each window computes (window / tile)^2 = "
                    f"{ratio:.2f}x its tile"
                )
            out.append(
                f"{who}overlap overhead {im.overlap:.2f}x: the network computes more than twice "
                f"the output pixels (halo {im.halo} around tiles of {im.tile}). {fix}."
            )
        if im.output_state == "foreign":
            out.append(
                f"{who}output '{im.output}' exists and was written by another job; the run "
                f"refuses it. Use --overwrite, or another output.path."
            )
    from tilewise.pipeline.driver import ActorLayout, layout_shortfall

    layout = ActorLayout(plan.actors, plan.cpus_each, plan.gpus_each, plan.device)
    short = layout_shortfall(layout, cpus=plan.resources.cpus, gpus=plan.resources.gpus)
    if short:
        out.append(short)
    return out


def _verdict(plan: Plan) -> tuple[bool | None, str]:
    r, m = plan.resources, plan.memory
    checks: list[tuple[str, int, int]] = []
    if r.local:
        checks.append(("host", m.host_total * plan.actors, r.memory))
    if plan.device == "cuda" and r.gpu_memory and plan.gpus_each > 0:
        # Actors that share one GPU (actors_per_gpu, or fractional gpus_per_worker).
        per_gpu = min(plan.actors, max(1, round(1 / plan.gpus_each))) if plan.gpus_each < 1 else 1
        checks.append(("GPU", m.device_total * per_gpu, r.gpu_memory))
    if not checks:
        return None, (
            "fits: not checked (a cluster's node memory is not known here); per actor "
            f"{_size(m.host_total)} host" + (f", {_size(m.device_total)} GPU" if m.device else "")
        )
    parts = []
    fits = True
    for what, need, have in checks:
        ok = need <= have
        fits = fits and ok
        who = "this machine's RAM" if what == "host" else "one GPU"
        parts.append(f"{what} {_size(need)} of {_size(have)} ({who}){'' if ok else ' -- too much'}")
    head = "fits" if fits else "does NOT fit"
    tail = "" if fits else "; lower tiling.batch_size, output.chunk, compute.prefetch or workers"
    return fits, f"{head}: " + "; ".join(parts) + tail
