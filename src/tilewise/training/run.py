"""The driver of a train job: check everything, run Ray Train, write the model package.

Every check that can fail on the user's data runs here, before any worker starts: the shards
(shapes, label values or, for an instance architecture, object ids and their classes, band
counts, patch size), the train/validation split, the number of
workers against the number of shards, and the initial weights. Then a ``TorchTrainer`` runs
:func:`~tilewise.training.loop.train_loop` on ``scaling.workers`` workers (0 = in this process).
Running the same job again (same ``name`` and ``storage``) resumes from its last checkpoint, which
is Ray Train V2's resume-by-name; a finished run is not run again. The run folder keeps the fields
of the job that decide its weights (``job.json``): a changed job is refused rather than resumed
from, or reported finished with, another job's checkpoints, unless ``overwrite`` starts it afresh.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tilewise.errors import ConfigError, TilewiseError
from tilewise.spec import TrainJob

__all__ = [
    "TrainSummary",
    "load_init",
    "prepare_training",
    "run_training",
    "training_fingerprint",
]

#: The run folder's record of the job that started it (:func:`training_fingerprint`).
RUN_RECORD = "job.json"


@dataclass
class TrainSummary:
    """What a training run did; printed at the end."""

    name: str
    status: str
    steps: int
    steps_per_epoch: int
    seconds: float
    package: str
    run_dir: str
    workers: int
    train_shards: int
    val_shards: int
    final: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The one-screen report."""
        loss = self.final.get("loss")
        best = ", ".join(
            f"{k} {v:.4f}" for k, v in self.best.items() if k.startswith("val_") and v == v
        )
        return [
            f"tilewise train '{self.name}': {self.status}",
            f"  steps    {self.steps} ({self.steps_per_epoch} per epoch) on {self.workers} "
            f"worker(s), {self.seconds:.1f} s",
            f"  shards   {self.train_shards} for training, {self.val_shards} held out",
            f"  loss     {loss:.4f} at the last step" if loss is not None else "  loss     -",
            f"  best     step {self.best.get('step', '-')}: {best or '-'}",
            f"  package  {self.package}",
            f"  run      {self.run_dir} (metrics.jsonl, curves.png, tensorboard/, checkpoints)",
        ]


def load_init(job: TrainJob, in_channels: int) -> dict[str, Any]:
    """The state dict ``model.init`` names: a weights file, or a model package that must hold
    this job's architecture, arguments, classes and input channels."""
    from tilewise.models.weights import load_state_file
    from tilewise.packages import load_manifest

    m = job.model
    assert m.init is not None
    location = m.init
    if not location.endswith((".safetensors", ".pt", ".pth")):  # a package folder
        manifest = load_manifest(location)
        given = (m.arch, m.args, m.num_classes, in_channels)
        held = (manifest.arch, manifest.args, manifest.num_classes, manifest.in_channels)
        if given != held:
            raise ConfigError(
                f"model.init: the package '{location}' holds {manifest.arch} {manifest.args} "
                f"with {manifest.num_classes} classes and {manifest.in_channels} input channels; "
                f"this job trains {m.arch} {m.args} with {m.num_classes} classes and "
                f"{in_channels} channels. Start from a matching package, or from a weights file "
                f"with matching shapes."
            )
        location = manifest.weights_location(location)
    return load_state_file(location, what="model.init")


def _split(job: TrainJob, locations: list[str]) -> tuple[list[str], list[str]]:
    """Hold out ``val_fraction`` of the shards (by shard, seeded) when no val_shards are given."""
    if job.data.val_shards is not None or job.data.val_fraction == 0 or len(locations) < 2:
        return locations, []
    n_val = max(1, round(len(locations) * job.data.val_fraction))
    n_val = min(n_val, len(locations) - 1)
    order = np.random.default_rng(job.seed).permutation(len(locations))
    held = {int(i) for i in order[:n_val]}
    return (
        [loc for i, loc in enumerate(locations) if i not in held],
        [loc for i, loc in enumerate(locations) if i in held],
    )


def prepare_training(job: TrainJob) -> dict[str, Any]:
    """Open and check the data and the initial weights; the config every worker gets.

    Raises:
        TilewiseError: any problem with the shards, the split, the workers or the weights,
            before anything is written or any worker starts.
    """
    from tilewise.training.shards import expand_locations, open_shards

    d = job.data
    options = d.storage_options
    locations = expand_locations(d.shards, storage_options=options)
    train_locations, held_out = _split(job, locations)
    train = open_shards(
        train_locations,
        num_classes=job.model.num_classes,
        ignore_index=d.ignore_index,
        patch_size=job.patch.size,
        storage_options=options,
        instances=job.model.instance,
    )
    val_locations = held_out if d.val_shards is None else d.val_shards
    val = (
        open_shards(
            val_locations,
            num_classes=job.model.num_classes,
            ignore_index=d.ignore_index,
            patch_size=1,  # validated whole, by overlap-tile: no patch is cut from them
            storage_options=options,
            instances=job.model.instance,
        )
        if val_locations
        else []
    )
    _check_held_out(train, val)
    if not job.model.instance:
        _check_weight_maps(job, train)
    bands = {s.shape[0] for s in train + val}
    if len(bands) > 1:
        raise ConfigError(
            f"training and validation shards have different band counts {sorted(bands)}; "
            f"every shard must have the bands the network takes."
        )
    in_channels = train[0].shape[0]
    if job.model.in_channels is not None and job.model.in_channels != in_channels:
        raise ConfigError(
            f"model.in_channels is {job.model.in_channels} but the shards have {in_channels} "
            f"bands; set model.in_channels: {in_channels} or leave it out."
        )
    for name in ("mean", "std"):
        values = getattr(job.normalize, name)
        if values is not None and len(values) not in {1, in_channels}:
            raise ConfigError(
                f"normalize.{name} needs one value per band of the shards ({in_channels}), or "
                f"one for all bands; got {len(values)}: {values}. Give the {name} of each band "
                f"measured on the shards, or leave normalize.{name} out."
            )
    workers = max(1, job.scaling.workers)
    if workers > len(train):
        raise ConfigError(
            f"scaling.workers ({job.scaling.workers}) is more than the training shards "
            f"({len(train)}): in each epoch every worker reads its own shards. Use at most "
            f"{len(train)} workers or split the data into more shards."
        )
    if job.model.init is not None:
        from tilewise.training.loop import build_network

        try:
            build_network(job, in_channels)
        except RuntimeError as exc:  # load_state_dict: wrong keys or shapes
            first = " ".join(str(exc).strip().splitlines()[:2])
            raise ConfigError(
                f"model.init '{job.model.init}' does not fit {job.model.arch} with "
                f"{in_channels} input channels and {job.model.num_classes} classes: {first}"
            ) from None
    patch_px = job.patch.size**2
    pixels = sum(s.height * s.width for s in train)
    per_epoch = job.steps_per_epoch or max(1, pixels // (patch_px * job.batch_size * workers))
    total = job.steps if job.steps is not None else (job.epochs or 1) * per_epoch
    return {
        "job": job.model_dump(mode="json"),
        "train_shards": train,
        "val_shards": val,
        "in_channels": in_channels,
        "steps": total,
        "per_epoch": per_epoch,
        "threads": int(job.scaling.cpus_per_worker),
        "root": f"{job.storage.rstrip('/')}/{job.run_name}",
    }


def _first_few(locations: list[str]) -> str:
    """Up to three locations, quoted, for a message."""
    return ", ".join(repr(loc) for loc in locations[:3]) + (" ..." if len(locations) > 3 else "")


def _check_held_out(train: list[Any], val: list[Any]) -> None:
    """Refuse a validation shard that is also trained on: its figures would not be held out,
    and the best weights would be chosen on training data."""
    from tilewise.pipeline.stores import normalised_location

    trained = {normalised_location(s.location) for s in train}
    both = [s.location for s in val if normalised_location(s.location) in trained]
    if both:
        raise ConfigError(
            f"data.val_shards: {len(both)} validation shard(s) are also training shards "
            f"(data.shards): {_first_few(both)}. Held-out shards must not be trained on, or "
            f"the validation figures and the best weights are chosen on training data. Remove "
            f"them from data.shards (e.g. a narrower pattern), or leave val_shards out to hold "
            f"out val_fraction of the shards."
        )


def _check_weight_maps(job: TrainJob, train: list[Any]) -> None:
    """A loss with U-Net's weighted cross-entropy needs every training shard's weight map."""
    from tilewise.losses import build_loss

    if not getattr(build_loss(job.loss), "needs_weights", False):
        return
    lacking = [s.location for s in train if not s.has_weight]
    if lacking:
        raise ConfigError(
            f"loss: weighted_cross_entropy needs a 'weight' array (U-Net's weight map) in every "
            f"training shard; {len(lacking)} of {len(train)} have none: {_first_few(lacking)}. "
            f"Cut the shards with `tilewise shards IMAGE OBJECT_IDS DEST --unet-weights`, or "
            f"use a loss without weight maps (cross_entropy, dice)."
        )


def training_fingerprint(job: TrainJob) -> dict[str, Any]:
    """The fields of a train job that decide its weights: all but where it runs and is kept
    (``name``, ``storage``, ``package``, ``scaling``, ``checkpoint``, shard storage options,
    the chunk cache, the validation batch) and its length (``steps``, ``epochs``). A run may
    move between in-process and a cluster, change its checkpoint interval, or be made longer
    (it goes on from its last checkpoint), and still be resumed."""
    d = job.model_dump(mode="json")
    for key in ("name", "storage", "package", "scaling", "checkpoint", "steps", "epochs"):
        d.pop(key, None)
    d["data"].pop("storage_options", None)
    d["data"].pop("cache_mb", None)
    d["validation"].pop("batch_size", None)
    return d


def _differences(given: Any, held: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted paths where two JSON values differ, with both values."""
    if isinstance(given, dict) and isinstance(held, dict):
        found: list[tuple[str, Any, Any]] = []
        for key in sorted(set(given) | set(held), key=str):
            found += _differences(given.get(key), held.get(key), f"{path}.{key}".lstrip("."))
        return found
    return [] if given == held else [(path or "(job)", given, held)]


def _claim_run(job: TrainJob, root: str, total: int, *, overwrite: bool) -> None:
    """Check that the run folder belongs to this job (or is new), and record the job in it.

    Raises:
        ConfigError: the folder holds a run of a different job, or one already trained past
            ``total`` steps, and ``overwrite`` is not set; nothing in it is touched.
    """
    from tilewise.training.checkpoints import CheckpointStore

    store = CheckpointStore(root, job.data.storage_options)
    fs, record = store.fs, f"{store.base}/{RUN_RECORD}"
    mine = training_fingerprint(job)
    if overwrite and fs.exists(store.base):
        fs.rm(store.base, recursive=True)
    elif fs.exists(record):
        held = json.loads(fs.cat_file(record))
        changed = _differences(mine, held)
        done = max(store.steps(), default=0)
        if not changed and total < done:
            raise ConfigError(
                f"run '{job.run_name}' in '{job.storage}' has trained {done} steps already, more "
                f"than the {total} this job asks for; a run cannot be made shorter. Ask for at "
                f"least {done} steps (a longer run goes on from its last checkpoint), give this "
                f"job another name, or use --overwrite to start run '{job.run_name}' afresh."
            )
        if not changed:
            return
        where, given, was = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(c[0] for c in changed[1:4])})"
        raise ConfigError(
            f"run '{job.run_name}' in '{job.storage}' was started by a different train job: "
            f"{where} is {json.dumps(given)} here but {json.dumps(was)} in the run"
            f"{more if len(changed) > 1 else ''}. Its checkpoints are left as they are. Run "
            f"the job as it was to resume it, give this one another name to start a new run, "
            f"or use --overwrite to start run '{job.run_name}' afresh."
        )
    fs.makedirs(store.base, exist_ok=True)
    fs.pipe_file(record, json.dumps(mine, indent=1, sort_keys=True).encode())


def _finished(job: TrainJob, total: int) -> bool:
    from tilewise.packages import load_manifest

    try:
        manifest = load_manifest(job.package_location)
    except TilewiseError:
        return False
    training = manifest.training or {}
    return training.get("run") == job.run_name and training.get("steps") == total


def run_training(
    job: TrainJob,
    *,
    address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainSummary:
    """Train to completion (resuming a previous run of the same name), write the package.

    Args:
        job: the train job.
        address: the Ray cluster of the workers (else ``scaling.address``, ``RAY_ADDRESS`` or an
            embedded one); refused for an in-process run (``scaling.workers: 0``), which would
            not use it.
        progress: show the progress bar.
        overwrite: start the run afresh, deleting the run folder of the same name, even of a
            different job.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tilewise.training.loop import train_loop

    s = job.scaling
    if s.workers == 0 and (address or s.address):
        given = f"--address {address}" if address else f"scaling.address {s.address}"
        raise ConfigError(
            f"{given}: this train job runs in-process (scaling.workers: 0), so it would not "
            f"use a cluster. Set scaling.workers (or --workers) to the number of Ray Train "
            f"workers to train on the cluster, or leave the address out."
        )
    t0 = time.perf_counter()
    # Ray Train logs every report at INFO (in this process when workers is 0): the progress bar
    # and metrics.jsonl say it once.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    config = prepare_training(job)
    total, per_epoch, root = config["steps"], config["per_epoch"], config["root"]
    summary = TrainSummary(
        name=job.run_name,
        status="complete",
        steps=total,
        steps_per_epoch=per_epoch,
        seconds=0.0,
        package=job.package_location,
        run_dir=root,
        workers=job.scaling.workers,
        train_shards=len(config["train_shards"]),
        val_shards=len(config["val_shards"]),
    )
    _claim_run(job, root, total, overwrite=overwrite)
    if not overwrite and _finished(job, total):
        summary.status = "complete (already)"
        _fill_metrics(summary, job)
        return summary
    started = False
    if s.workers > 0:
        from tilewise.pipeline.driver import _connect

        started = _connect(address or s.address)
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.gpus_per_worker:
        resources["GPU"] = s.gpus_per_worker
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if s.gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=s.workers,
                use_gpu=bool(s.gpus_per_worker),
                resources_per_worker=resources if s.workers else None,
            ),
            run_config=RunConfig(
                name=job.run_name,
                storage_path=job.storage,
                # a lost worker restarts the group from the last checkpoint
                failure_config=FailureConfig(max_failures=3),
            ),
        )
        try:
            with _Progress(job, root, total, enabled=progress):
                result = trainer.fit()
            if result.error is not None:
                raise result.error
        except SystemExit:
            # Ray Train's own Ctrl-C handler aborts the run, and the driver's wait then ends in
            # SystemExit(1) with nothing said: report it as the interruption it is (resumable).
            raise KeyboardInterrupt from None
        except Exception as exc:
            # A worker's user-facing error (a loss that does not fit the data...) arrives
            # wrapped in Ray Train's WorkerGroupError and a RayTaskError: say it as one line.
            mistake = _user_error(exc)
            if mistake is None:
                raise
            raise mistake from None
        _write_package(job, config)
        _write_curves(job, root)
    finally:
        if started:
            import ray

            ray.shutdown()
    summary.seconds = round(time.perf_counter() - t0, 2)
    _fill_metrics(summary, job)
    return summary


def _user_error(exc: BaseException) -> TilewiseError | None:
    """The tilewise error a worker raised, found inside the errors Ray Train wraps it in."""
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        cause = getattr(error, "cause", None)  # RayTaskError: the worker's own exception
        if isinstance(cause, BaseException):
            stack.append(cause)
        elif isinstance(error, TilewiseError):
            return error
        stack.extend(getattr(error, "worker_failures", {}).values())
        stack.extend(
            e
            for e in (getattr(error, "controller_failure", None), error.__cause__)
            if isinstance(e, BaseException)
        )
    return None


class _Progress:
    """A progress bar fed from the run's metrics.jsonl (steps, loss, last validation), polled
    from the driver: the workers may be other processes or machines."""

    def __init__(self, job: TrainJob, root: str, total: int, *, enabled: bool) -> None:
        import threading

        self.job, self.root, self.total, self.enabled = job, root, total, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from tilewise.training.checkpoints import CheckpointStore, read_metrics
        from tilewise.training.loop import validation_metric

        store = CheckpointStore(self.root, self.job.data.storage_options)
        key = f"val_{validation_metric(self.job)}"
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  {task.fields[val]}"),
            TimeElapsedColumn(),
        )
        # On stderr: stdout carries only the summary (--json)
        with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
            task = bar.add_task(self.job.run_name, total=self.total, loss="-", val="")
            while True:
                stopping = self._stop.wait(1.0)
                try:
                    rows = read_metrics(store)
                except (OSError, ValueError):  # a line being written: next time
                    rows = []
                if rows:
                    scored = [r for r in rows if key in r]
                    val = f"{key} {scored[-1][key]:.3f}" if scored else ""
                    bar.update(task, completed=rows[-1]["step"],
                               loss=f"{rows[-1]['loss']:.4f}", val=val)  # fmt: skip
                if stopping:
                    return


def _write_package(job: TrainJob, config: dict[str, Any]) -> None:
    """The model package: the best validated weights, else the last checkpoint's."""
    from tilewise.packages import save_package
    from tilewise.training.checkpoints import CheckpointStore

    store = CheckpointStore(config["root"], job.data.storage_options)
    best = store.best()
    if best is not None:
        weights, chosen = best
    else:
        latest = store.latest()
        if latest is None:
            raise ConfigError(
                f"training run '{job.run_name}' ended without a checkpoint; nothing to package."
            )
        weights, state = latest
        chosen = {"step": state["step"]}
    m = job.model
    save_package(
        job.package_location,
        weights,
        arch=m.arch,
        args=m.args,
        in_channels=config["in_channels"],
        num_classes=m.num_classes,
        class_names=m.class_names,
        normalize=job.normalize.model_dump(mode="json"),
        training={
            "run": job.run_name,
            "steps": config["steps"],
            "weights_of_step": chosen.get("step"),
            "metrics": {k: v for k, v in chosen.items() if isinstance(v, int | float)},
        },
        overwrite=True,
    )


def _write_curves(job: TrainJob, root: str) -> None:
    """curves.png in the run folder: loss, learning rate and validation metrics over steps."""
    from tilewise.training.checkpoints import CheckpointStore, read_metrics
    from tilewise.training.report import curves_png

    store = CheckpointStore(root, job.data.storage_options)
    rows = read_metrics(store)
    if rows:
        store.fs.pipe_file(f"{store.base}/curves.png", curves_png(rows, title=job.run_name))


def _fill_metrics(summary: TrainSummary, job: TrainJob) -> None:
    from tilewise.training.checkpoints import CheckpointStore, read_metrics
    from tilewise.training.loop import validation_metric

    rows = read_metrics(CheckpointStore(summary.run_dir, job.data.storage_options))
    if rows:
        summary.final = rows[-1]
    key = f"val_{validation_metric(job)}"
    scored = [r for r in rows if key in r and not math.isnan(float(r[key]))]
    if scored:
        summary.best = max(scored, key=lambda r: float(r[key]))
