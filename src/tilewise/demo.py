"""``tilewise demo``: train a U-Net on a real IHC slide with Ray Train, then segment a mosaic of it.

About two and a half minutes on 2 CPU cores, all of it through the parts a user runs:

1. **Mosaic.** A few thousand pixels a side, mirror-tiled (so the tiles join without seams) from
   scikit-image's immunohistochemistry image, a real IHC-stained tissue section that ships in
   the wheel; written block by block as an OME-Zarr (NGFF 0.5) image.
2. **Labels.** Derived from the stains by colour deconvolution (Ruifrok & Johnston, ``rgb2hed``):
   background, haematoxylin (nuclei) and DAB (the brown antibody stain); see :func:`ihc_labels`.
3. **Shards.** The four 256 x 256 quadrants of the IHC image with their labels, as training
   shards (Zarr groups holding ``image`` and ``label``): three to train on, the top-right one
   held out, so that validation scores tissue the network never saw.
4. **Training.** The train job ``jobs/ihc-train.yaml`` on Ray Train: a small same-padded U-Net,
   by default on one DDP worker of a local Ray (``workers=0`` trains in this process), with
   validation through the predict engine on the held-out shard. It writes a model package that
   keeps the weights of the best validation mean IU.
5. **Prediction.** The predict job ``jobs/ihc-demo.yaml`` names that package
   (``model: {package: ...}``), which brings the network, the classes and the normalisation;
   the mosaic is segmented by Ray actors reading and writing Zarr (overlap-tile, exact crop).
6. **Figures.** A PNG preview with the labels overlaid, and the FCN metrics (pixel accuracy,
   mean accuracy, mean IU, frequency-weighted IU) of the segmentation against the stain labels
   of the whole mosaic, counted block by block, beside those of predicting the most frequent
   class everywhere.

The job files point at ``../tilewise-demo`` (the default work folder, seen from ``jobs/``); the
demo moves those locations into its work folder. One Ray serves training and prediction. Running
the demo again with the same settings finds the training run complete (or resumes it from its
last checkpoint after an interruption) and keeps its package; other settings start a new run.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilewise.spec import PredictJob, TrainJob

__all__ = [
    "CLASS_NAMES",
    "build_mosaic",
    "build_shards",
    "evaluate",
    "ihc_labels",
    "predict_job",
    "run_demo",
    "train_job",
]

CLASS_NAMES = ["background", "haematoxylin", "DAB"]
JOBS = Path(__file__).resolve().parents[2] / "jobs"
JOB_FILE = JOBS / "ihc-demo.yaml"
TRAIN_FILE = JOBS / "ihc-train.yaml"
# Where the job files keep the demo's data, as written in them (relative to jobs/).
JOB_FOLDER = ("..", "tilewise-demo")
SHARDS = "ihc-shards"
BLOCK = 1024
# ihc_labels blurs with a Gaussian of sigma 1.5 truncated at 4 sigma: 6 px of reach. Labels of a
# block computed with this margin around it equal those of the whole image.
LABEL_HALO = 8


def ihc_labels(rgb: np.ndarray) -> np.ndarray:
    """Stain classes of an (h, w, 3) uint8 IHC image by colour deconvolution.

    The thresholds sit at the 75th (haematoxylin) and 85th (DAB) percentiles of the bundled image,
    after a light Gaussian blur so that labels follow stained regions rather than single pixels.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.color import rgb2hed

    hed = rgb2hed(rgb)
    h = gaussian_filter(hed[..., 0], 1.5)
    d = gaussian_filter(hed[..., 2], 1.5)
    labels = np.zeros(rgb.shape[:2], np.uint8)
    labels[h > 0.030] = 1
    labels[d > 0.100] = 2
    return labels


def _mirror_tile(base: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Rows/cols [y0, y1) × [x0, x1) of the plane tiled with alternately flipped copies."""
    from tilewise.pipeline.geometry import source_indices

    n = base.shape[0]
    yi = source_indices(y0, y1, n, "symmetric")
    xi = source_indices(x0, x1, n, "symmetric")
    return base[yi][:, xi]


def build_mosaic(path: Path, size: int) -> None:
    """Write a (3, size, size) uint8 OME-Zarr image mirror-tiled from the IHC image."""
    import zarr
    from skimage import data

    ihc = data.immunohistochemistry()
    root = zarr.open_group(str(path), mode="w")
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": "ihc-mosaic",
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.5]}],
                    }
                ],
            }
        ],
    }
    arr = root.create_array(
        "0",
        shape=(3, size, size),
        chunks=(3, 512, 512),
        dtype="uint8",
        dimension_names=("c", "y", "x"),
    )
    for y0 in range(0, size, BLOCK):
        for x0 in range(0, size, BLOCK):
            y1, x1 = min(y0 + BLOCK, size), min(x0 + BLOCK, size)
            arr[:, y0:y1, x0:x1] = _mirror_tile(ihc, y0, y1, x0, x1).transpose(2, 0, 1)


def build_shards(folder: Path) -> list[Path]:
    """Write the four 256 x 256 quadrants of the IHC image as training shards; return them.

    Each shard is a Zarr group with ``image`` (3, 256, 256) uint8 and ``label`` (256, 256) uint8
    (:func:`ihc_labels` of the whole image, cut to the quadrant). The top-right quadrant, whose
    class mix is nearest the whole image's, is ``val-0.zarr``; the others are
    ``train-0.zarr`` .. ``train-2.zarr``.
    """
    import zarr
    from skimage import data

    ihc = data.immunohistochemistry()
    labels = ihc_labels(ihc)
    half = ihc.shape[0] // 2
    names = {(0, 0): "train-0", (0, 1): "val-0", (1, 0): "train-1", (1, 1): "train-2"}
    written = []
    for (row, col), name in names.items():
        ys, xs = slice(row * half, (row + 1) * half), slice(col * half, (col + 1) * half)
        path = folder / f"{name}.zarr"
        group = zarr.open_group(str(path), mode="w")
        image = np.ascontiguousarray(ihc[ys, xs].transpose(2, 0, 1))
        group.create_array("image", data=image, chunks=(3, half, half))
        group.create_array("label", data=labels[ys, xs], chunks=(half, half))
        written.append(path)
    return written


def _relocate(location: str, work: Path) -> str:
    """A job file's location under ``../tilewise-demo`` moved into the demo's work folder;
    any other location is kept (and resolves against the job file's folder)."""
    parts = Path(location).parts
    if parts[: len(JOB_FOLDER)] == JOB_FOLDER:
        return str(work.joinpath(*parts[len(JOB_FOLDER) :]))
    return location


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        from tilewise.errors import ConfigError

        raise ConfigError(f"{path}: a job must be a mapping; got a {type(data).__name__}.")
    return data


def train_job(work: Path, *, steps: int | None = None, workers: int | None = None) -> TrainJob:
    """``jobs/ihc-train.yaml`` with its data, runs and package in ``work``.

    Args:
        work: the demo's work folder (absolute).
        steps: optimiser steps; None = the job file's.
        workers: Ray Train workers (0 = in this process); None = the job file's.
    """
    from tilewise.spec import parse_job

    data = _read_yaml(TRAIN_FILE)
    d = data["data"]
    d["shards"] = [_relocate(s, work) for s in d["shards"]]
    if d.get("val_shards"):
        d["val_shards"] = [_relocate(s, work) for s in d["val_shards"]]
    for key in ("storage", "package"):
        if data.get(key):
            data[key] = _relocate(data[key], work)
    if steps is not None:
        data["steps"] = steps
    if workers is not None:
        data.setdefault("scaling", {})["workers"] = workers
    job = parse_job(data, base_dir=TRAIN_FILE.parent, source=str(TRAIN_FILE))
    if not isinstance(job, TrainJob):
        from tilewise.errors import ConfigError

        raise ConfigError(f"{TRAIN_FILE}: the demo needs a train job (kind: train).")
    return job


def predict_job(work: Path, package: str) -> PredictJob:
    """``jobs/ihc-demo.yaml`` reading the mosaic in ``work`` with the model package ``package``,
    writing (over) its output in ``work``."""
    from tilewise.spec import parse_job

    data = _read_yaml(JOB_FILE)
    data["input"]["path"] = _relocate(data["input"]["path"], work)
    data["output"]["path"] = _relocate(data["output"]["path"], work)
    data["output"]["overwrite"] = True  # the mosaic was just rewritten
    if data["output"].get("preview", {}).get("path"):
        data["output"]["preview"]["path"] = _relocate(data["output"]["preview"]["path"], work)
    data["model"]["package"] = package  # the one just trained, wherever its run keeps it
    job = parse_job(data, base_dir=JOB_FILE.parent, source=str(JOB_FILE))
    if not isinstance(job, PredictJob):
        from tilewise.errors import ConfigError

        raise ConfigError(f"{JOB_FILE}: the demo needs a predict job (kind: predict).")
    return job


def _keep_or_reset_run(job: TrainJob) -> None:
    """Keep the run folder only for this very job, so that Ray Train's resume-by-name resumes
    (or finds complete) the demo's own run, never a run of other settings."""
    run_dir = Path(job.storage) / job.run_name
    record = run_dir / "demo-job.json"
    wanted = json.dumps(job.model_dump(mode="json"), sort_keys=True)
    if run_dir.exists() and (not record.exists() or record.read_text() != wanted):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(wanted)


class _ValidationLines(threading.Thread):
    """Print each validation of a running job as ``metrics.jsonl`` gains it (rank 0 writes it
    after every step, and the validation's scores with the step that ran one)."""

    def __init__(self, path: Path, total: int) -> None:
        super().__init__(daemon=True)
        self.path, self.total = path, total
        self.stopped = threading.Event()
        self.t0 = time.perf_counter()
        self._read = 0

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.poll()

    def poll(self) -> None:
        """Print the validations logged since the last poll."""
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self._read)
            text = fh.read()
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits
        self._read += len(complete)
        for line in complete.splitlines():
            row = json.loads(line)
            if "val_mean_iou" in row:
                # A validation step is also a checkpoint step, whose row has the loop's seconds
                # (of this run, or of the earlier one that a rerun finds complete).
                seconds = row.get("seconds", time.perf_counter() - self.t0)
                print(
                    f"      step {row['step']:>4}/{self.total}  loss {row['loss']:.3f}  "
                    f"held-out quadrant: pixel accuracy {row['val_pixel_accuracy']:.3f}, "
                    f"mean IU {row['val_mean_iou']:.3f}  ({seconds:.0f} s of training)",
                    flush=True,
                )

    def stop(self) -> None:
        """Stop watching, after printing what the log gained since the last poll."""
        self.stopped.set()
        self.join()
        self.poll()


def evaluate(mosaic: Path, labels_path: Path, *, block: int = BLOCK) -> Any:
    """The confusion matrix of a segmentation against :func:`ihc_labels` of the mosaic.

    Counted block by block, so neither the mosaic nor its labels are ever whole in memory. The
    truth of each block is computed on the block plus :data:`LABEL_HALO` pixels around it (cut
    at the image border) and cropped, which makes it equal the labels of the whole mosaic.

    Returns:
        A :class:`~tilewise.metrics.ConfusionMatrix` (rows = stain labels, columns = output).
    """
    import zarr

    from tilewise.metrics import ConfusionMatrix

    image = zarr.open_array(str(mosaic / "0"), mode="r")
    pred = zarr.open_array(str(labels_path), mode="r")
    height, width = image.shape[-2:]
    confusion = ConfusionMatrix(len(CLASS_NAMES))
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            y1, x1 = min(y0 + block, height), min(x0 + block, width)
            a0, b0 = max(0, y0 - LABEL_HALO), max(0, x0 - LABEL_HALO)
            a1, b1 = min(height, y1 + LABEL_HALO), min(width, x1 + LABEL_HALO)
            rgb = np.asarray(image[:, a0:a1, b0:b1]).transpose(1, 2, 0)
            truth = ihc_labels(rgb)[y0 - a0 : y1 - a0, x0 - b0 : x1 - b0]
            confusion.update(np.asarray(pred[y0:y1, x0:x1]), truth)
    return confusion


def _majority(confusion: Any) -> Any:
    """The confusion matrix of predicting the most frequent true class everywhere."""
    from tilewise.metrics import ConfusionMatrix

    truth = confusion.counts.sum(axis=1)
    baseline = ConfusionMatrix(confusion.num_classes)
    baseline.counts[:, int(np.argmax(truth))] = truth
    return baseline


def _cpus() -> int:
    """CPUs this machine gives the demo's Ray (they bound the threads of the workers)."""
    import ray

    available = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, min(os.cpu_count() or 1, available))


def run_demo(
    *,
    workdir: str | Path = "tilewise-demo",
    size: int = 4096,
    progress: bool = True,
    steps: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Build the mosaic and shards, train, segment, preview; print and return the figures.

    Args:
        workdir: folder for the data, the training run and the results.
        size: side of the square mosaic in pixels.
        progress: show the prediction's progress bar.
        steps: training steps; None = those of ``jobs/ihc-train.yaml``.
        workers: Ray Train workers (0 = train in this process); None = the job file's.

    Returns:
        The FCN metrics of the segmentation (``pixel_accuracy``, ``mean_accuracy``, ``mean_iu``,
        ``frequency_weighted_iu``, ``iu_per_class``), those of predicting the most frequent
        class everywhere (``baseline_*``), the best validation mean IU (``val_mean_iu``), the
        package and output locations, and timings (``train_seconds``, ``seconds``,
        ``mpx_per_s``).
    """
    import ray

    from tilewise.pipeline.driver import _connect, run_job
    from tilewise.training.run import run_training

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mosaic = work / "ihc-mosaic.ome.zarr"
    t0 = time.perf_counter()
    print(f"[1/5] mosaic {size} x {size} from scikit-image's IHC slide -> {mosaic}")
    build_mosaic(mosaic, size)
    shards = build_shards(work / SHARDS)
    print(
        f"[2/5] {len(shards)} shards (the 256 x 256 quadrants, stain labels by colour "
        f"deconvolution) -> {work / SHARDS}"
    )
    started = _connect(None)  # one Ray for training and prediction (or the caller's)
    try:
        job = train_job(work, steps=steps, workers=workers)
        # Every worker gets an equal part of the machine: the job file's CPUs would not fit a
        # smaller machine (Ray would wait for them for ever) and leave a bigger one idle.
        cpus = max(1, _cpus() // max(1, job.scaling.workers))
        job = job.model_copy(
            update={"scaling": job.scaling.model_copy(update={"cpus_per_worker": float(cpus)})}
        )
        _keep_or_reset_run(job)
        where = (
            f"{job.scaling.workers} Ray Train worker(s)"
            if job.scaling.workers
            else "this process (workers 0)"
        )
        print(
            f"[3/5] training {job.model.arch} {job.model.args} for {job.steps} steps on {where}, "
            f"{int(job.scaling.cpus_per_worker)} thread(s) each ({TRAIN_FILE.name})"
        )
        watcher = _ValidationLines(
            Path(job.storage) / job.run_name / "metrics.jsonl", job.steps or 0
        )
        watcher.start()
        try:
            summary = run_training(job, progress=progress)
        finally:
            watcher.stop()
        print("\n".join("      " + line for line in summary.lines()))
        print("[4/5] segmenting the mosaic with the package, on Ray actors (overlap-tile, crop)")
        predict = predict_job(work, summary.package)
        report = run_job(predict, progress=progress)
        print("\n".join(report.lines()))
    finally:
        if started:
            ray.shutdown()
    labels_path = Path(predict.output.path) / "labels" / "0"
    png = Path(report.preview or "")  # the predict job draws it (output.preview)
    confusion = evaluate(mosaic, labels_path)
    baseline = _majority(confusion)
    iu = confusion.iou_per_class()
    result: dict[str, Any] = {
        "pixel_accuracy": confusion.pixel_accuracy(),
        "mean_accuracy": confusion.mean_accuracy(),
        "mean_iu": confusion.mean_iou(),
        "frequency_weighted_iu": confusion.frequency_weighted_iou(),
        "iu_per_class": dict(zip(CLASS_NAMES, (float(v) for v in iu), strict=True)),
        "baseline_pixel_accuracy": baseline.pixel_accuracy(),
        "baseline_mean_iu": baseline.mean_iou(),
        "val_mean_iu": float(summary.best.get("val_mean_iou", float("nan"))),
        "package": summary.package,
        "output": predict.output.path,
        "preview": str(png),
        "train_seconds": summary.seconds,
        "mpx_per_s": report.mpx_per_s,
    }
    majority = CLASS_NAMES[int(np.argmax(confusion.counts.sum(axis=1)))]
    print(f"[5/5] preview {png}")
    print(
        f"      FCN metrics against the stain labels of the mosaic ({confusion.total / 1e6:.1f} "
        f"Mpx): pixel accuracy {result['pixel_accuracy']:.3f}, mean accuracy "
        f"{result['mean_accuracy']:.3f}, mean IU {result['mean_iu']:.3f}, frequency-weighted "
        f"IU {result['frequency_weighted_iu']:.3f}"
    )
    print(
        "      IU per class: "
        + ", ".join(f"{n} {v:.3f}" for n, v in zip(CLASS_NAMES, iu, strict=True))
    )
    print(
        f"      ({majority} everywhere would score pixel accuracy "
        f"{result['baseline_pixel_accuracy']:.3f}, mean IU {result['baseline_mean_iu']:.3f})"
    )
    result["seconds"] = time.perf_counter() - t0
    print(f"demo finished in {result['seconds']:.0f} s")
    return result
