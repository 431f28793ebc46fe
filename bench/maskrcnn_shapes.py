"""Train the tiny Mask R-CNN on synthetic shapes and report mask and box AP@0.5 on held-out images.

    python bench/maskrcnn_shapes.py                        # 2 CPU cores: about 5 minutes
    python bench/maskrcnn_shapes.py --steps 100            # a quick look
    python bench/maskrcnn_shapes.py --steps 3000 --out /tmp/shapes.json
    python bench/maskrcnn_shapes.py --save-weights /tmp/shapes.safetensors   # for the mosaic

Data (generated from ``--seed``, nothing is downloaded): RGB images of 96 to 128 px a side (each
side drawn separately, so most are not multiples of 32) holding 1 to 4 objects of two classes,
squares (class 1, side 12 to 36 px, axis-aligned) and discs (class 2, diameter 12 to 36 px), placed
without overlap. Every object and the background get random colours from the same distribution,
plus a random linear shading of the background and pixel noise, so the class is the shape, not
the colour. ``--train-images`` images are made once and drawn in random batches of ``--batch``
(flipped at random); ``--test-images`` different images are held out.

Model: ``build_mask_rcnn(3, "tiny")`` (GroupNorm ResNet of basic blocks 8/16/32/64, FPN 32),
trained from scratch with Adam (``--lr``, decayed ×0.1 at 70 % and 90 % of the steps); images are
normalised per channel with the training set's mean and standard deviation. Evaluation runs the
model in ``eval()`` mode with its default inference rules (score > 0.05, per-class NMS 0.5, at
most 100 detections) and computes COCO-style AP at IoU 0.5 (101-point interpolation, per class,
then the mean over the two classes) with :func:`tilewise.models.detection.detection_ap`, for masks
(pasted probabilities ≥ 0.5 against the instance masks) and boxes.

The figures are printed and, with ``--out``, written as JSON (settings, loss curve, AP per class,
timings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilewise.models.detection import detection_ap
from tilewise.models.maskrcnn import build_mask_rcnn, targets_from_instances

CLASSES = {1: "square", 2: "disc"}


def make_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """One ``(3, H, W)`` float32 image, its ``(H, W)`` instance labels and the class per id."""
    h, w = (int(v) for v in rng.integers(96, 129, size=2))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    bg = rng.uniform(0, 1, 3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, (3, 2)).astype(np.float32)
    img = bg[:, None, None] + slope[:, :1, None] * yy / h + slope[:, 1:, None] * xx / w
    labels = np.zeros((h, w), dtype=np.int32)
    classes: dict[int, int] = {}
    n = int(rng.integers(1, 5))
    for _ in range(50):  # placement attempts
        if len(classes) == n:
            break
        kind = int(rng.integers(1, 3))
        size = rng.uniform(12, 36)
        cy, cx = rng.uniform(size / 2, h - size / 2), rng.uniform(size / 2, w - size / 2)
        if kind == 1:
            m = (np.abs(yy + 0.5 - cy) <= size / 2) & (np.abs(xx + 0.5 - cx) <= size / 2)
        else:
            m = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= (size / 2) ** 2
        # No overlap, and a pixel of background between objects.
        grown = np.zeros_like(m)
        grown[:-1] |= m[1:]
        grown[1:] |= m[:-1]
        grown[:, :-1] |= m[:, 1:]
        grown[:, 1:] |= m[:, :-1]
        if (labels[m | grown] != 0).any():
            continue
        i = len(classes) + 1
        labels[m] = i
        classes[i] = kind
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        img[:, m] = colour[:, None]
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    return img.astype(np.float32), labels, classes


def make_set(
    n: int, rng: np.random.Generator
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    out = []
    for _ in range(n):
        img, labels, classes = make_image(rng)
        out.append((torch.from_numpy(img), targets_from_instances(labels, classes)))
    return out


def flip(img: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Horizontal flip of an image and its target."""
    w = img.shape[-1]
    b = t["boxes"].clone()
    b[:, 0], b[:, 2] = w - t["boxes"][:, 2], w - t["boxes"][:, 0]
    return img.flip(-1), {"boxes": b, "labels": t["labels"], "masks": t["masks"].flip(-1)}


def batch(
    items: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Zero-pad images (and masks) of different sizes to one batch; boxes are unchanged."""
    h = max(i.shape[1] for i, _ in items)
    w = max(i.shape[2] for i, _ in items)
    images = torch.zeros(len(items), 3, h, w)
    targets = []
    for k, (img, t) in enumerate(items):
        images[k, :, : img.shape[1], : img.shape[2]] = img
        masks = torch.zeros(t["masks"].shape[0], h, w, dtype=torch.uint8)
        masks[:, : img.shape[1], : img.shape[2]] = t["masks"]
        targets.append({"boxes": t["boxes"], "labels": t["labels"], "masks": masks})
    return images, targets


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    p.add_argument("--seed", type=int, default=0, help="data, weights and sampling seed")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--save-weights",
        type=Path,
        help="write the trained weights (.safetensors) and, beside them, the normalisation "
        "(.json: mean and std per channel) for bench/maskrcnn_mosaic.py",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    train = make_set(args.train_images, rng)
    test = make_set(args.test_images, rng)
    pixels = torch.cat([img.reshape(3, -1) for img, _ in train], dim=1)
    mean, std = pixels.mean(1)[:, None, None], pixels.std(1)[:, None, None]
    train = [((img - mean) / std, t) for img, t in train]
    test = [((img - mean) / std, t) for img, t in test]
    n_objects = {c: sum(int((t["labels"] == c).sum()) for _, t in test) for c in CLASSES}
    t_data = time.perf_counter() - t0
    print(
        f"data: {len(train)} train / {len(test)} test images, test objects "
        f"{ {CLASSES[c]: n for c, n in n_objects.items()} } ({t_data:.1f} s)"
    )

    model = build_mask_rcnn(3, "tiny")
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [int(0.7 * args.steps), int(0.9 * args.steps)], gamma=0.1
    )
    curve: list[dict[str, float]] = []
    window: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        picks = rng.choice(len(train), size=args.batch, replace=False)
        items = [flip(*train[i]) if rng.random() < 0.5 else train[i] for i in picks]
        images, targets = batch(items)
        losses = model(images, targets)
        assert isinstance(losses, dict)
        total = sum(losses.values())
        assert isinstance(total, torch.Tensor)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        window.append(float(total.detach()))
        if step % 50 == 0 or step == args.steps:
            mean_loss = float(np.mean(window))
            window = []
            curve.append({"step": step, "loss": mean_loss})
            print(f"step {step:5d}  loss {mean_loss:.4f}  ({time.perf_counter() - t0:.0f} s)")
    t_train = time.perf_counter() - t0

    model.eval()
    t0 = time.perf_counter()
    preds = []
    with torch.no_grad():
        for img, _ in test:
            preds.append(model.detect(img[None])[0])
    t_eval = time.perf_counter() - t0
    targets = [t for _, t in test]
    mask_ap = detection_ap(preds, targets, iou_type="mask", iou_threshold=0.5)
    box_ap = detection_ap(preds, targets, iou_type="box", iou_threshold=0.5)
    mask_map = float(np.mean(list(mask_ap.values())))
    box_map = float(np.mean(list(box_ap.values())))
    per_class = ", ".join(
        f"{CLASSES[c]} mask {mask_ap[c]:.3f} box {box_ap[c]:.3f}" for c in sorted(mask_ap)
    )
    print(
        f"\nmask AP@0.5 {mask_map:.3f}   box AP@0.5 {box_map:.3f}   ({per_class})\n"
        f"train {t_train:.0f} s ({1000 * t_train / args.steps:.0f} ms/step, batch {args.batch}), "
        f"eval {1000 * t_eval / len(test):.0f} ms/image, {n_params:,} parameters, "
        f"{args.threads} threads"
    )
    if args.save_weights:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(args.save_weights))
        norm = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
        args.save_weights.with_suffix(".json").write_text(json.dumps(norm))
        print(f"wrote {args.save_weights}")
    if args.out:
        result = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "parameters": n_params,
            "test_objects": {CLASSES[c]: n for c, n in n_objects.items()},
            "mask_ap50": mask_map,
            "box_ap50": box_map,
            "mask_ap50_per_class": {CLASSES[c]: v for c, v in mask_ap.items()},
            "box_ap50_per_class": {CLASSES[c]: v for c, v in box_ap.items()},
            "train_seconds": t_train,
            "eval_ms_per_image": 1000 * t_eval / len(test),
            "loss_curve": curve,
        }
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
