"""Batches of training patches, read, augmented and stacked in background threads.

A :class:`PatchLoader` keeps up to ``prefetch`` batches ready in a bounded queue, so that the
training step finds its next batch waiting whenever the loader keeps up. Its threads read each
patch straight from Zarr (:meth:`Shard.read`, a window of the shard's chunks), augment it and
stack the batch as torch tensors: image float32 after the normaliser, label int64, weight
float32 (or ``None``).

Determinism, whatever the threads do: the patches are drawn in batch order under a lock, each
patch is augmented with a generator seeded by ``(seed, patch number)``, and batches are handed
out in order. Prefetching draws ahead of training, so the loader keeps the caller's sampler at
the point of the batches *handed out*: ``sampler.state()`` taken between steps is the state to
checkpoint, and a loader built on a sampler resumed from it (same seed) continues with the very
batches, augmentations included, that the uninterrupted run would have produced.

``in_memory=True`` reads every shard into RAM first (:meth:`Shard.load`): the baseline that a
benchmark holds the Zarr loader against.

Instance shards (Mask R-CNN): the batch's ``label`` holds each patch's object ids (int64), and
the threads also turn every augmented patch into its Mask R-CNN target
(:func:`tilewise.training.instances.patch_target`: boxes, labels, masks), handed out as
:attr:`PatchLoader.targets` beside the batch, as :attr:`PatchLoader.patches` is.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from tilewise.errors import ConfigError
from tilewise.training.sampling import Patch, PatchSampler

__all__ = ["AugmentFn", "Batch", "Normalize", "PatchLoader"]

Normalize = Callable[[torch.Tensor], torch.Tensor]
#: ``(image, label, weight, rng) -> (image, label, weight)``, e.g. an :class:`Augment`.
AugmentFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray | None, np.random.Generator],
    tuple[np.ndarray, np.ndarray, np.ndarray | None],
]


class Batch(NamedTuple):
    """One batch: ``image`` (N, C, h, w) float32, ``label`` (N, h, w) int64, ``weight``
    (N, h, w) float32 or ``None``. Unpacks as ``image, label, weight = batch``."""

    image: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor | None


class _Ready(NamedTuple):
    batch: Batch
    patches: list[Patch]
    position: tuple[int, dict[str, Any]]  # the sampler after this batch's patches
    targets: list[dict[str, torch.Tensor]] | None  # Mask R-CNN targets (instance shards)


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


class _Pipeline:
    """What the threads share. The threads hold this, never the :class:`PatchLoader`, so that a
    loader dropped without ``close()`` is still collected and its finaliser stops them."""

    def __init__(
        self,
        sampler: PatchSampler,
        sources: Sequence[Any],
        batch_size: int,
        augment: AugmentFn | None,
        normalize: Normalize,
        seed: list[int],
        prefetch: int,
        num_batches: int | None,
        with_weight: bool,
        pin_memory: bool,
    ) -> None:
        self.sampler = sampler  # the loader's own clone: drawn ahead of the caller's
        self.sources = sources
        self.batch_size = batch_size
        self.augment = augment
        self.normalize = normalize
        self.seed = seed
        self.prefetch = prefetch
        self.num_batches = num_batches
        self.with_weight = with_weight
        self.pin_memory = pin_memory
        self.instances = bool(getattr(sources[0], "instances", False)) if sources else False
        self.cond = threading.Condition()
        self.ready: dict[int, _Ready] = {}
        self.next_assign = 0
        self.next_yield = 0
        self.closed = False
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []
        # Statistics (under cond).
        self.started = 0.0
        self.patches_made = 0
        self.bytes_read = 0
        self.read_s = 0.0
        self.augment_s = 0.0
        self.collate_s = 0.0

    def work(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.closed and self.next_assign - self.next_yield >= self.prefetch:
                        self.cond.wait()
                    if self.closed or (
                        self.num_batches is not None and self.next_assign >= self.num_batches
                    ):
                        return
                    k = self.next_assign
                    self.next_assign += 1
                    first = self.sampler.drawn
                    patches = self.sampler.take(self.batch_size)
                    position = self.sampler.position()
                batch, targets = self.build(patches, first)
                with self.cond:
                    if self.closed:
                        return
                    self.ready[k] = _Ready(batch, patches, position, targets)
                    self.cond.notify_all()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            with self.cond:
                if self.error is None:
                    self.error = exc
                self.cond.notify_all()

    def build(
        self, patches: list[Patch], first: int
    ) -> tuple[Batch, list[dict[str, torch.Tensor]] | None]:
        from tilewise.training.instances import patch_target

        ph, pw = self.sampler.patch_size
        images, labels, weights = [], [], []
        targets: list[dict[str, torch.Tensor]] | None = [] if self.instances else None
        read_s = augment_s = 0.0
        nbytes = 0
        for j, (i, y0, x0) in enumerate(patches):
            t0 = time.perf_counter()
            image, label, weight = self.sources[i].read(
                y0, y0 + ph, x0, x0 + pw, with_weight=self.with_weight
            )
            t1 = time.perf_counter()
            nbytes += image.nbytes + label.nbytes + (0 if weight is None else weight.nbytes)
            if self.augment is not None:
                rng = np.random.default_rng([*self.seed, first + j])
                image, label, weight = self.augment(image, label, weight, rng)
            if targets is not None:
                targets.append(patch_target(label, self.sources[i].object_classes()))
            augment_s += time.perf_counter() - t1
            read_s += t1 - t0
            images.append(image)
            labels.append(label)
            weights.append(weight)
        t2 = time.perf_counter()
        x = torch.from_numpy(np.stack(images))
        y = torch.from_numpy(np.stack(labels).astype(np.int64, copy=False))
        w = None
        if self.with_weight:
            w = torch.from_numpy(np.stack(weights).astype(np.float32, copy=False))
        # Without pinned memory the consumer normalises (next_batch): a torch op on a whole
        # batch here would give this thread an OpenMP team of its own, and while a process
        # holds more team threads than cores, libgomp's teams sleep at their barriers instead
        # of spinning, the training step's among them. With pinned memory (a GPU) the step's
        # work is on the device, and the batch is normalised and pinned ready here.
        if self.pin_memory:
            x, y = self.to_input(x).pin_memory(), y.pin_memory()
            w = None if w is None else w.pin_memory()
        collate_s = time.perf_counter() - t2
        with self.cond:
            self.patches_made += len(patches)
            self.bytes_read += nbytes
            self.read_s += read_s
            self.augment_s += augment_s
            self.collate_s += collate_s
        return Batch(x, y, w), targets

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked raw images -> the float32 network input."""
        x = self.normalize(x)
        return x if x.dtype == torch.float32 else x.to(torch.float32)

    def stop(self, timeout: float = 60.0) -> None:
        with self.cond:
            self.closed = True
            self.ready.clear()
            self.cond.notify_all()
        current = threading.current_thread()
        for thread in self.threads:
            if thread is not current:
                thread.join(timeout)


class PatchLoader:
    """Background threads turning a sampler's patches into batches (see the module docstring).

    Args:
        sampler: where the patches come from; the loader keeps it at the point of the batches
            handed out (``sampler.state()`` is what a checkpoint saves).
        batch_size: patches per batch.
        augment: applied to each patch (an :class:`~tilewise.training.augment.Augment`, or any
            callable ``(image, label, weight, rng) -> (image, label, weight)``), or ``None``.
        normalize: raw stacked images (N, C, h, w) -> float32 network input, e.g.
            :class:`tilewise.pipeline.job.Normalizer`; ``None`` only converts to float32.
        seed: seeds the per-patch augmentation generators, as ``(seed..., patch number)``.
        prefetch: batches kept ready ahead of the consumer (the bound of the queue).
        workers: reader threads (Zarr decoding and scipy release the GIL for much of the work).
        num_batches: batches in all, then :class:`StopIteration`; ``None``: without end.
        weights: ``None``: give the weight maps when every shard has one; ``True``: require
            them; ``False``: never read them.
        in_memory: read every shard into RAM first and cut the patches from there.
        pin_memory: page-locked batches for faster copies to a GPU (only with CUDA).

    Use it as a context manager or call :meth:`close`; iterating to the end closes it too, and
    a loader that is garbage-collected stops its threads. An exception in a reader thread is
    raised again by the :meth:`next_batch` that would have returned its batch.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        *,
        batch_size: int,
        augment: AugmentFn | None = None,
        normalize: Normalize | None = None,
        seed: int | Sequence[int] = 0,
        prefetch: int = 4,
        workers: int = 1,
        num_batches: int | None = None,
        weights: bool | None = None,
        in_memory: bool = False,
        pin_memory: bool = False,
    ) -> None:
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("prefetch", prefetch, 1),
            ("workers", workers, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"loader {name} must be an integer >= {low}; got {value!r}.")
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 0):
            raise ConfigError(f"num_batches must be None or an integer >= 0; got {num_batches!r}.")
        shards = sampler.shards
        have = [s.has_weight for s in shards]
        if weights is True and not all(have):
            lacking = [s.location for s in shards if not s.has_weight]
            raise ConfigError(
                f"the loss needs a weight map per pixel, but these shards have no 'weight' "
                f"array: {lacking}. Add one to every shard (e.g. tilewise.losses.unet_weight_map) "
                f"or use a loss without weights."
            )
        with_weight = all(have) if weights is None else bool(weights)
        self.sampler = sampler
        self.batch_size = batch_size
        self.in_memory = in_memory
        self.workers = workers
        self.seed = [int(seed)] if isinstance(seed, int | np.integer) else [int(s) for s in seed]
        sources: Sequence[Any] = [s.load() for s in shards] if in_memory else shards
        self._pipe = _Pipeline(
            sampler.clone(),
            sources,
            batch_size,
            augment,
            normalize or _as_float32,
            self.seed,
            prefetch,
            num_batches,
            with_weight,
            pin_memory and torch.cuda.is_available(),
        )
        self._finalizer = weakref.finalize(self, self._pipe.stop)
        self._wait_s = 0.0
        self._batches = 0
        #: The patches of the last batch handed out.
        self.patches: list[Patch] = []
        #: The Mask R-CNN targets of the last batch handed out (instance shards; else None).
        self.targets: list[dict[str, torch.Tensor]] | None = None

    # -------------------------------------------------------------------- lifecycle

    def start(self) -> PatchLoader:
        """Start the threads (done by the first :meth:`next_batch` if not called)."""
        pipe = self._pipe
        if pipe.closed:
            raise RuntimeError("this PatchLoader is closed; make a new one")
        if not pipe.threads:
            pipe.started = time.perf_counter()
            for n in range(self.workers):
                thread = threading.Thread(
                    target=pipe.work, name=f"tilewise-loader-{n}", daemon=True
                )
                pipe.threads.append(thread)
                thread.start()
        return self

    def close(self) -> None:
        """Stop the threads and wait for them (each finishes the batch it is building)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (or the loader ran to its end)."""
        return self._pipe.closed

    def __enter__(self) -> PatchLoader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- batches

    def next_batch(self) -> Batch:
        """The next batch, waiting for it if it is not ready yet.

        Raises:
            StopIteration: after ``num_batches`` batches.
            Exception: whatever a reader thread raised (the loader is then closed).
        """
        pipe = self._pipe
        if pipe.num_batches is not None and self._batches >= pipe.num_batches:
            self.close()
            raise StopIteration
        self.start()
        t0 = time.perf_counter()
        with pipe.cond:
            k = pipe.next_yield
            while k not in pipe.ready and pipe.error is None and not pipe.closed:
                pipe.cond.wait()
            ready = pipe.ready.pop(k, None)
            error = pipe.error
            if ready is not None:
                pipe.next_yield += 1
                pipe.cond.notify_all()
        self._wait_s += time.perf_counter() - t0
        if ready is None:
            self.close()
            if error is not None:
                raise error
            raise RuntimeError("this PatchLoader is closed; make a new one")
        self.sampler.seek(ready.position)
        self.patches = ready.patches
        self.targets = ready.targets
        self._batches += 1
        if pipe.pin_memory:
            return ready.batch
        t0 = time.perf_counter()
        batch = ready.batch._replace(image=pipe.to_input(ready.batch.image))
        with pipe.cond:
            pipe.collate_s += time.perf_counter() - t0
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    # -------------------------------------------------------------------- statistics

    def stats(self) -> dict[str, float]:
        """Throughput and waiting so far.

        Keys: ``batches`` and ``patches`` handed out; ``seconds`` since the start;
        ``patches_per_s`` handed out per second; ``bytes_read`` (decoded pixels, labels and
        weights read) and ``mb_per_s``; ``read_s``, ``augment_s`` and ``collate_s``, thread time
        spent reading, augmenting and stacking/normalising; ``capacity_patches_per_s``, what
        the threads could deliver with no consumer to wait for (patches made per second of
        their busy time, times the thread count); ``wait_s``, the consumer's time waiting in
        :meth:`next_batch`, and ``wait_fraction`` of ``seconds``.
        """
        pipe = self._pipe
        with pipe.cond:
            made, nbytes = pipe.patches_made, pipe.bytes_read
            read_s, augment_s, collate_s = pipe.read_s, pipe.augment_s, pipe.collate_s
        seconds = time.perf_counter() - pipe.started if pipe.started else 0.0
        busy = read_s + augment_s + collate_s
        patches = self._batches * self.batch_size
        return {
            "batches": float(self._batches),
            "patches": float(patches),
            "seconds": seconds,
            "patches_per_s": patches / seconds if seconds > 0 else 0.0,
            "bytes_read": float(nbytes),
            "mb_per_s": nbytes / 1e6 / seconds if seconds > 0 else 0.0,
            "read_s": read_s,
            "augment_s": augment_s,
            "collate_s": collate_s,
            "capacity_patches_per_s": made * self.workers / busy if busy > 0 else 0.0,
            "wait_s": self._wait_s,
            "wait_fraction": self._wait_s / seconds if seconds > 0 else 0.0,
        }
