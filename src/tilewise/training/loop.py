"""The training loop: what each Ray Train worker runs (``train_loop``), and its checkpoints.

Every worker builds the same network from the job's seed, and Ray Train wraps it in DDP (gloo on
CPU, NCCL on GPU). In each epoch a worker samples patches only from its own shards
(:func:`~tilewise.training.sampling.assign_shards`: disjoint, reshuffled per epoch, seeded), with
a sampler seeded by ``(seed, epoch, rank)``. A checkpoint holds the weights (safetensors), the
optimiser and schedule states, the step and every rank's sampler state, so a resumed run draws
exactly the patches the uninterrupted one would have drawn.

Rank 0 validates on the held-out shards through the predict engine itself (overlap-tile, the
code path of predict jobs), writes the metrics (JSONL), keeps the best weights, and at the end
writes the model package.

An instance architecture (Mask R-CNN) runs the same loop on instance shards with these
differences: each patch comes with its target (boxes, labels, masks; see
:mod:`tilewise.training.instances`), the loss is the sum of the network's own five losses (each
also logged), DDP looks for parameters a step did not use (a batch without objects leaves the
mask head idle), and validation runs ``detect`` window by window and scores mask and box AP at
IoU 0.5 (``val_mask_ap50``, ``val_box_ap50``).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from tilewise import models
from tilewise.losses import build_loss
from tilewise.metrics import ConfusionMatrix
from tilewise.models import TilingFacts
from tilewise.spec import TrainJob

__all__ = ["build_network", "lr_factor", "train_loop", "validate", "validation_metric"]

# The FCN paper's four metrics (and Dice), reported as val_<name>.
VALIDATION_METRICS = (
    "pixel_accuracy",
    "mean_accuracy",
    "mean_iou",
    "frequency_weighted_iou",
    "mean_dice",
)


def lr_factor(job: TrainJob, step: int, total: int) -> float:
    """The schedule's learning-rate multiplier at ``step`` (0-based) of ``total`` steps."""
    s = job.schedule
    factor = 1.0
    if s.name == "step":
        assert s.step_size is not None  # the spec requires it
        factor = s.gamma ** (step // s.step_size)
    elif s.name == "poly":
        factor = (1 - min(step, total) / max(1, total)) ** s.power
    if s.warmup_steps and step < s.warmup_steps:
        factor *= 0.1 + 0.9 * step / s.warmup_steps
    return factor


def _optimizer(job: TrainJob, params: Any) -> torch.optim.Optimizer:
    o = job.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _autocast(job: TrainJob, device: torch.device) -> Any:
    name = job.amp
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    if name == "float32":
        return nullcontext()
    dtype = torch.bfloat16 if name == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _crop(t: torch.Tensor, margin: int) -> torch.Tensor:
    """Labels/weights cut to a valid-convolution network's output (``margin`` per side)."""
    return t[..., margin : t.shape[-2] - margin, margin : t.shape[-1] - margin] if margin else t


def build_network(job: TrainJob, in_channels: int) -> nn.Module:
    """The job's network: from ``model.init`` weights, or seeded (the same on every rank)."""
    m = job.model
    torch.manual_seed(job.seed)
    model: nn.Module
    if m.instance:
        from tilewise.models.maskrcnn import create_instance_model

        model = create_instance_model(
            m.arch, in_channels=in_channels, num_classes=m.num_classes, **m.args
        )
    else:
        model = models.create(m.arch, in_channels=in_channels, num_classes=m.num_classes, **m.args)
    if m.init:
        from tilewise.training.run import load_init

        model.load_state_dict(load_init(job, in_channels))
    return model


def validate(
    model: nn.Module,
    job: TrainJob,
    shards: list[Any],
    normalizer: Any,
    device: torch.device,
) -> dict[str, float]:
    """The FCN metrics of ``model`` on the validation shards, by overlap-tile inference.

    Each shard is predicted unit by unit with the predict jobs' engine (crop stitching with the
    network's exact halo), so a shard is never held whole, and compared with its labels.
    """
    from tilewise.pipeline.engine import TileEngine, TilePlan
    from tilewise.pipeline.postprocess import argmax_classes
    from tilewise.pipeline.units import UnitGrid

    facts = _facts(job, shards[0].shape[0])
    tile = job.validation.tile or _default_tile(job, facts)
    confusion = ConfusionMatrix(job.model.num_classes, job.data.ignore_index)
    was_training = model.training
    model.eval()
    try:
        for shard in shards:
            source = _ShardImage(shard)
            plan = TilePlan.build(
                facts,
                height=shard.height,
                width=shard.width,
                tile=tile,
                halo=None,
                stitch="crop",
                pad_mode="reflect",
                arch=job.model.arch,
            )
            engine = TileEngine(
                model,
                plan,
                batch_size=job.validation.batch_size,
                device=device,
                preprocess=normalizer,
            )
            for unit in UnitGrid(shard.height, shard.width, max(tile, 512 // tile * tile)):
                scores = engine.compute_unit(engine.read_unit(source, unit), unit)
                pred = argmax_classes(scores).cpu().numpy()
                label = shard.read_array("label", unit.y0, unit.y1, unit.x0, unit.x1)
                confusion.update(pred, label.astype(np.int64))
    finally:
        model.train(was_training)
    summary = confusion.summary()
    return {k: summary[k] for k in VALIDATION_METRICS}


def validation_metric(job: TrainJob) -> str:
    """The validation score that picks the best weights (``validation.metric``, whose null
    default is mean_iou for dense architectures and mask_ap50 for instance ones)."""
    metric = job.validation.metric
    if metric is None:
        return "mask_ap50" if job.model.instance else "mean_iou"
    return str(metric)


def _facts(job: TrainJob, in_channels: int) -> TilingFacts:
    m = job.model
    return models.facts(m.arch, in_channels=in_channels, num_classes=m.num_classes, **m.args)


def _default_tile(job: TrainJob, facts: Any) -> int:
    """The patch's output size, rounded down to the network's stride (at least one stride)."""
    out = job.patch.size - 2 * facts.margin
    return max(facts.stride, out // facts.stride * facts.stride)


class _ShardImage:
    """A shard's image as the engine's ImageSource (shape and windowed reads)."""

    def __init__(self, shard: Any) -> None:
        self.shard = shard
        self.shape = shard.shape
        self.dtype = shard.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        image: np.ndarray = self.shard.read_array("image", y0, y1, x0, x1)
        return image


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker's loop (see the module docstring)."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from tilewise.pipeline.job import Normalizer
    from tilewise.training.augment import Augment, AugmentConfig
    from tilewise.training.checkpoints import CheckpointStore, MetricsLog
    from tilewise.training.loader import PatchLoader
    from tilewise.training.report import TensorBoardLog
    from tilewise.training.sampling import assign_shards, make_sampler
    from tilewise.training.shards import CHUNK_CACHE

    job = TrainJob.model_validate(config["job"])
    CHUNK_CACHE.reset(job.data.cache_mb * 2**20)
    train_shards, val_shards = config["train_shards"], config["val_shards"]
    in_channels, total, per_epoch = config["in_channels"], config["steps"], config["per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads_before = torch.get_num_threads()  # in-process runs give the caller's back
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = get_device() if world > 0 else torch.device("cpu")

    model = build_network(job, in_channels)
    instance = job.model.instance
    margin = 0 if instance else _facts(job, in_channels).margin
    optimizer = _optimizer(job, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(job, step, total)
    )
    start, best = 0, -math.inf
    store = CheckpointStore(config["root"], job.data.storage_options)
    latest = store.latest()  # a rerun of the job, or Ray restarting a failed worker group
    if latest is not None:
        weights, state = latest
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best = int(state["step"]), float(state["best"])
    # steps after the checkpoint are computed again: their rows go
    log = MetricsLog(store, start) if rank == 0 else None
    # TensorBoard scalars beside metrics.jsonl (local run folders only), resumed the same way
    tensorboard = (
        TensorBoardLog(f"{store.base}/tensorboard", resume_step=start)
        if rank == 0 and store.local
        else None
    )
    if world > 1:
        # Mask R-CNN: a batch without objects (or without a positive proposal) leaves the mask
        # head out of the graph, which plain DDP would wait for forever
        options = {"find_unused_parameters": True} if instance else None
        net = prepare_model(model, parallel_strategy_kwargs=options)
    else:
        net = model.to(device)
    criterion = None if instance else build_loss(job.loss).to(device)
    # weighted_cross_entropy alone or as a term of a sum: the loader reads the weight maps
    weighted = bool(getattr(criterion, "needs_weights", False))
    metric = validation_metric(job)
    normalizer = Normalizer(job.normalize, train_shards[0].dtype, in_channels)

    def sampler_for(epoch: int) -> Any:
        # Every rank takes batch_size patches per step, so after ``step`` steps each rank has
        # drawn (step - epoch * per_epoch) * batch_size patches of this epoch: a resumed run
        # re-creates the epoch's sampler and skips them (positions only, no pixels read).
        mine = [train_shards[i] for i in assign_shards(len(train_shards), world, rank, epoch,
                                                        job.seed)]  # fmt: skip
        params: dict[str, Any] = {}
        if job.patch.sampler == "foreground":
            params = {"p": job.patch.foreground_p, "background": job.patch.background_class}
        sampler = make_sampler(
            job.patch.sampler, mine, job.patch.size, seed=(job.seed, epoch, rank), **params
        )
        sampler.take(max(0, step - epoch * per_epoch) * job.batch_size)
        return sampler

    augment = Augment(AugmentConfig.from_spec(job.augment))

    def loader_for(sampler: Any, epoch: int) -> PatchLoader:
        return PatchLoader(
            sampler,
            batch_size=job.batch_size,
            augment=augment,
            normalize=normalizer,
            seed=(job.seed, epoch, rank),
            weights=weighted,
            pin_memory=device.type == "cuda",
        )

    step = start
    epoch = step // per_epoch
    sampler = sampler_for(epoch)
    loader = loader_for(sampler, epoch)
    t_start, seconds_waited = time.perf_counter(), 0.0
    read: set[str] = set()  # shards this rank read patches from in this epoch
    net.train()
    try:
        while step < total:
            if step // per_epoch != epoch:
                loader.close()
                _log_shards(store, rank, epoch, sampler, read)
                read = set()
                epoch = step // per_epoch
                sampler = sampler_for(epoch)
                loader = loader_for(sampler, epoch)
            t_wait = time.perf_counter()
            x, y, w = loader.next_batch()
            seconds_waited += time.perf_counter() - t_wait
            read.update(sampler.shards[p.shard].location for p in loader.patches)
            x, y = x.to(device), y.to(device)
            # Dropout draws from torch's generator: seeded per (seed, rank, step), so a resumed
            # run drops exactly what the uninterrupted one dropped, and ranks drop differently.
            torch.manual_seed(
                int(np.random.SeedSequence([job.seed, rank, step]).generate_state(1)[0])
            )
            parts: dict[str, torch.Tensor] = {}
            if instance:
                assert loader.targets is not None, "instance shards give targets"
                targets = [{k: v.to(device) for k, v in t.items()} for t in loader.targets]
                with _autocast(job, device):
                    parts = net(x, targets)  # train mode: the five losses
                parts = {k: v.float() for k, v in parts.items()}
                loss = torch.stack(list(parts.values())).sum()
            else:
                assert criterion is not None
                with _autocast(job, device):
                    scores = net(x)
                scores = scores.float()
                y = _crop(y, margin)
                if weighted:
                    assert w is not None, "weighted_cross_entropy needs shards with a weight array"
                    loss = criterion(scores, y, _crop(w.to(device), margin))
                else:
                    loss = criterion(scores, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            metrics: dict[str, Any] = {
                "step": step,
                "epoch": epoch,
                "loss": float(loss.detach()),
                **{k: float(v.detach()) for k, v in parts.items()},
                "lr": optimizer.param_groups[0]["lr"],
            }
            validate_now = bool(val_shards) and (step % job.validation.every == 0 or step == total)
            save_now = step % job.checkpoint.every == 0 or step == total or validate_now
            if validate_now and rank == 0:
                if instance:
                    from tilewise.training.instances import (
                        DEFAULT_VALIDATION_TILE,
                        validate_instances,
                    )

                    scores_val = validate_instances(
                        _inner(net),
                        val_shards,
                        normalizer,
                        device,
                        tile=job.validation.tile or DEFAULT_VALIDATION_TILE,
                        batch_size=job.validation.batch_size,
                    )
                else:
                    scores_val = validate(_inner(net), job, val_shards, normalizer, device)
                metrics.update({f"val_{k}": v for k, v in scores_val.items()})
                score = scores_val[metric]
                if not math.isnan(score) and score > best:
                    best = score
                    store.save_best(_inner(net).state_dict(), metrics)
            if not save_now:
                if log is not None:
                    log.add(metrics)
                if tensorboard is not None:
                    tensorboard.add(metrics)
                continue
            loader_stats = loader.stats()
            metrics["loader_patches_per_s"] = loader_stats.get("patches_per_s", 0.0)
            metrics["waited_s"] = round(seconds_waited, 3)
            metrics["seconds"] = round(time.perf_counter() - t_start, 3)
            if rank == 0:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "best": best,
                }
                store.save(step, _inner(net).state_dict(), state, job.checkpoint.keep)
                if log is not None:
                    log.add(metrics)
                    log.flush()
                if tensorboard is not None:  # on disk up to the checkpoint before a resume
                    tensorboard.add(metrics)
                    tensorboard.flush()
            ray.train.report(metrics)  # collective: the ranks wait for the checkpoint
        _log_shards(store, rank, epoch, sampler, read)
    finally:
        loader.close()
        if tensorboard is not None:
            tensorboard.close()
        torch.set_num_threads(threads_before)


def _log_shards(store: Any, rank: int, epoch: int, sampler: Any, read: set[str]) -> None:
    """Which shards a rank was dealt in an epoch and which it read (``shards-rank<r>.jsonl``)."""
    if not read:
        return
    row = {
        "epoch": epoch,
        "rank": rank,
        "assigned": sorted(s.location for s in sampler.shards),
        "read": sorted(read),
    }
    store.append_line(f"shards-rank{rank}.jsonl", json.dumps(row))


def _inner(net: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (its state dict has no ``module.`` prefix)."""
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        inner: nn.Module = net.module
        return inner
    return net
