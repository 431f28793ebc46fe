"""Mask R-CNN over a mosaic: a predict job (tiled, stitched by the instance stage) against the
same network on the whole image at once, both scored against the ground truth.

    python bench/maskrcnn_shapes.py --save-weights /tmp/shapes.safetensors   # train (~4 min)
    python bench/maskrcnn_mosaic.py --weights /tmp/shapes.safetensors        # this bench
    python bench/maskrcnn_mosaic.py --weights ... --size 1536 --chunk 256 --workers 2

The mosaic (``--size`` px square, seeded) is drawn like maskrcnn_shapes.py's images: squares
(class 1) and discs (class 2), 12 to 36 px, random colours, placed a pixel apart, on a background
whose colour drifts slowly across the mosaic, plus pixel noise. It is written as a float32 Zarr
array and segmented by a predict job (``arch: mask_rcnn_tiny``, the weights and the training set's
normalisation, ``output.chunk`` units with ``output.instances.halo``) on a local Ray with
``--workers`` actors. The whole-image reference runs the network once on the entire mosaic
(no windows: feature maps of the whole mosaic, every proposal count raised to 20,000).

The scoring holds every object's mask at full mosaic size (AP is computed on whole masks), so
keep ``--size`` to a few thousand px. Both are scored with COCO-style mask AP at IoU 0.5
(:func:`tilewise.models.detection.detection_ap`) against the drawn objects; for the tiled output
each object's mask is its id's pixels in ``instances/0`` and its score the table's. Also printed:
objects found, ground-truth objects covered more than a fifth by each of two detections ("split"),
how many tiled objects have a whole-image counterpart at mask IoU >= 0.5 / 0.9, and the seconds
of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from tilewise.models.detection import detection_ap, paste_masks
from tilewise.models.maskrcnn import create_instance_model

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def mosaic(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """``(3, size, size)`` float32 image, ``(size, size)`` instance ids and each id's class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    # A background that drifts slowly: a random colour plus two gentle waves per channel.
    image = np.empty((3, size, size), np.float32)
    for c in range(3):
        base = rng.uniform(0.2, 0.8)
        fy, fx = rng.uniform(0.5, 2.0, 2) * 2 * np.pi / size
        image[c] = base + 0.2 * np.sin(fy * yy + rng.uniform(0, 6)) * np.cos(fx * xx)
    labels = np.zeros((size, size), np.int32)
    classes: dict[int, int] = {}
    target = size * size // 3000  # about one object per 55 x 55 px
    for _ in range(target * 10):
        if len(classes) == target:
            break
        kind = int(rng.integers(1, 3))
        s = rng.uniform(12, 36)
        cy, cx = rng.uniform(s / 2, size - s / 2, 2)
        y0, y1 = int(max(0, cy - s / 2 - 2)), int(min(size, cy + s / 2 + 3))
        x0, x1 = int(max(0, cx - s / 2 - 2)), int(min(size, cx + s / 2 + 3))
        py, px = yy[y0:y1, x0:x1] + 0.5 - cy, xx[y0:y1, x0:x1] + 0.5 - cx
        if kind == 1:
            m = (np.abs(py) <= s / 2) & (np.abs(px) <= s / 2)
            grown = (np.abs(py) <= s / 2 + 1.5) & (np.abs(px) <= s / 2 + 1.5)
        else:
            m = py**2 + px**2 <= (s / 2) ** 2
            grown = py**2 + px**2 <= (s / 2 + 1.5) ** 2
        if (labels[y0:y1, x0:x1][grown] != 0).any():
            continue
        i = len(classes) + 1
        labels[y0:y1, x0:x1][m] = i
        classes[i] = kind
        image[:, y0:y1, x0:x1][:, m] = rng.uniform(0, 1, (3, 1))
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    return image, labels, classes


def targets_of(labels: np.ndarray, classes: dict[int, int]) -> dict[str, torch.Tensor]:
    ids = [i for i in np.unique(labels) if i]
    return {
        "labels": torch.tensor([classes[int(i)] for i in ids]),
        "masks": torch.from_numpy(np.stack([labels == i for i in ids])),
    }


def whole_image(
    image: np.ndarray, weights: Path, norm: dict[str, list[float]], score: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The network on the whole mosaic at once; masks pasted one box at a time."""
    from safetensors.torch import load_file

    big = 20000
    model = create_instance_model(
        "mask_rcnn_tiny",
        in_channels=3,
        num_classes=3,
        rpn_pre_nms_top_n_test=big,
        rpn_post_nms_top_n_test=big,
        box_detections_per_img=big,
    )
    model.load_state_dict(load_file(str(weights)))
    mean = torch.tensor(norm["mean"])[:, None, None]
    std = torch.tensor(norm["std"])[:, None, None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = (torch.from_numpy(image) - mean) / std
        found = model.eval().detect(x[None], paste=False)[0]
    keep = found["scores"] >= score
    boxes, probs = found["boxes"][keep], found["mask_probs"][keep]
    h, w = image.shape[1:]
    masks = torch.zeros((int(keep.sum()), h, w), dtype=torch.bool)
    for k, (b, p) in enumerate(zip(boxes, probs, strict=True)):
        y0, x0 = max(0, int(b[1]) - 2), max(0, int(b[0]) - 2)
        y1, x1 = min(h, int(b[3]) + 3), min(w, int(b[2]) + 3)
        local = (b - torch.tensor([x0, y0, x0, y0], dtype=b.dtype))[None]
        masks[k, y0:y1, x0:x1] = paste_masks(p[None], local, y1 - y0, x1 - x0)[0] >= 0.5
    seconds = time.perf_counter() - t0
    return {
        "scores": found["scores"][keep],
        "labels": found["labels"][keep],
        "masks": masks,
    }, seconds


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", type=Path, required=True, help="from maskrcnn_shapes.py")
    p.add_argument("--size", type=int, default=1024, help="mosaic side in px (default 1024)")
    p.add_argument("--chunk", type=int, default=512, help="write unit side (default 512)")
    p.add_argument("--halo", type=int, default=64, help="instances.halo (default 64)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (default 2)")
    p.add_argument("--score", type=float, default=0.5, help="score threshold (default 0.5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()

    from tilewise.pipeline.driver import run_job
    from tilewise.spec import parse_job

    norm = json.loads(args.weights.with_suffix(".json").read_text())
    image, labels, classes = mosaic(args.size, args.seed)
    truth = targets_of(labels, classes)
    n_gt = len(classes)
    work = Path(tempfile.mkdtemp(prefix="maskrcnn-mosaic-"))
    try:
        zarr.create_array(
            work / "in.zarr", data=image, chunks=(3, 256, 256), dimension_names=("c", "y", "x")
        )
        job = parse_job(
            {
                "kind": "predict",
                "input": {
                    "path": str(work / "in.zarr"),
                    "normalize": {"scale": 1.0, "mean": norm["mean"], "std": norm["std"]},
                },
                "model": {
                    "arch": "mask_rcnn_tiny",
                    "num_classes": 3,
                    "weights": str(args.weights),
                    "class_names": ["background", "square", "disc"],
                },
                "output": {
                    "path": str(work / "out.zarr"),
                    "chunk": args.chunk,
                    "instances": {"halo": args.halo, "score_threshold": args.score},
                },
                "compute": {"workers": args.workers, "cpus_per_worker": 1},
            }
        )
        t0 = time.perf_counter()
        report = run_job(job, progress=False)
        t_tiled = time.perf_counter() - t0
        import pyarrow.dataset as ds

        inst = zarr.open_group(work / "out.zarr", mode="r")["instances/0"][:]
        table = ds.dataset(work / "out.zarr" / "instances.parquet").to_table().to_pandas()
        table = table.sort_values("id")
        tiled = {
            "scores": torch.tensor(table["score"].to_numpy()),
            "labels": torch.tensor(table["class"].to_numpy()),
            "masks": torch.from_numpy(np.stack([inst == i for i in table["id"]])),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    whole, t_whole = whole_image(image, args.weights, norm, args.score)

    many = 100000
    ap_tiled = detection_ap([tiled], [truth], iou_type="mask", max_detections=many)
    ap_whole = detection_ap([whole], [truth], iou_type="mask", max_detections=many)
    # A ground-truth object is "split" when two detections each cover more than a fifth of it
    # (a cut at a unit border would do that; so does a detector's own duplicate).
    # The whole-image detections are painted as the stage paints (higher scores on top).
    painted = np.zeros(labels.shape, np.int64)
    for k in torch.argsort(whole["scores"]).tolist():
        painted[whole["masks"][k].numpy()] = k + 1
    split_tiled = split_whole = 0
    for i in range(1, n_gt + 1):
        obj = labels == i
        fifth = obj.sum() / 5
        for image_ids, name in ((inst, "tiled"), (painted, "whole")):
            ids, counts = np.unique(image_ids[obj], return_counts=True)
            many = sum(1 for j, c in zip(ids, counts, strict=True) if j and c > fifth) > 1
            if name == "tiled":
                split_tiled += many
            else:
                split_whole += many
    # Each tiled object against the whole-image detections whose pixels it touches.
    best = []
    for i in range(len(tm := tiled["masks"])):
        ys, xs = np.nonzero(tm[i].numpy())
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        a = tm[i, y0:y1, x0:x1]
        touching = torch.nonzero(whole["masks"][:, y0:y1, x0:x1].flatten(1).any(1)).flatten()
        ious = [
            float((a & whole["masks"][j, y0:y1, x0:x1]).sum())
            / float(a.sum() + whole["masks"][j].sum() - (a & whole["masks"][j, y0:y1, x0:x1]).sum())
            for j in touching.tolist()
        ]
        best.append(max(ious, default=0.0))
    best_t = torch.tensor(best)
    result = {
        "size": args.size,
        "chunk": args.chunk,
        "halo": args.halo,
        "workers": args.workers,
        "objects": n_gt,
        "found_tiled": len(table),
        "found_whole": len(whole["scores"]),
        "split_objects_tiled": split_tiled,
        "split_objects_whole": split_whole,
        "mask_ap50_tiled": float(np.mean(list(ap_tiled.values()))),
        "mask_ap50_whole": float(np.mean(list(ap_whole.values()))),
        "tiled_matched_whole_iou50": float((best_t >= 0.5).float().mean()),
        "tiled_matched_whole_iou90": float((best_t >= 0.9).float().mean()),
        "seconds_tiled": round(t_tiled, 2),
        "seconds_whole": round(t_whole, 2),
        "units": report.units_total,
        "overlap": round(report.overlap, 3),
    }
    print(
        f"mosaic {args.size}^2, {n_gt} objects; units {args.chunk} px, halo {args.halo}, "
        f"{args.workers} workers\n"
        f"{'':<22}{'tiled (predict job)':>20}{'whole image':>14}\n"
        f"{'objects found':<22}{result['found_tiled']:>20}{result['found_whole']:>14}\n"
        f"{'mask AP@0.5':<22}{result['mask_ap50_tiled']:>20.3f}{result['mask_ap50_whole']:>14.3f}\n"
        f"{'seconds':<22}{t_tiled:>20.1f}{t_whole:>14.1f}\n"
        f"{'objects split':<22}{split_tiled:>20}{split_whole:>14}\n"
        f"tiled objects with a whole-image match at mask IoU "
        f">= 0.5: {result['tiled_matched_whole_iou50']:.3f}, >= 0.9: "
        f"{result['tiled_matched_whole_iou90']:.3f}; overlap overhead {report.overlap:.2f}x"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
