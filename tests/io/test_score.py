"""tilewise score: the FCN metrics of an output against a reference label raster, streamed.

Every count is checked against a confusion matrix and metrics computed here with numpy from the
two whole images (read back with zarr and written with rasterio / PIL), never against the
scorer's own output.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import zarr
from affine import Affine
from PIL import Image

from tests.conftest import write_input
from tests.reference import whole_image
from tilewise import models
from tilewise.errors import InputError, StoreNotFoundError
from tilewise.io import score as score_module
from tilewise.io.score import score
from tilewise.pipeline.output import OutputLayout, OutputStore

H, W, K = 300, 420, 3
NAMES = ["background", "tumour", "stroma"]
TRANSFORM = [10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0]
NODATA = 250


def _write_output(
    path: Path,
    labels: np.ndarray,
    *,
    geo: bool = True,
    finish: bool = True,
    with_labels: bool = True,
) -> None:
    """An output in the layout `tilewise run` writes (the pipeline's own OutputStore)."""
    store = OutputStore(str(path))
    layout = OutputLayout(
        height=labels.shape[0],
        width=labels.shape[1],
        num_classes=K,
        chunk=64,
        shard=None,
        labels="uint8" if with_labels else None,
        probabilities=None if with_labels else "float16",
        compressor="zstd",
        scale=None,
        class_names=NAMES,
    )
    carried = {"proj:code": "EPSG:32633", "spatial:transform": TRANSFORM} if geo else {}
    store.prepare(
        layout,
        fingerprint="f",
        job={"model": {"num_classes": K, "class_names": NAMES}},
        carried=carried,
        overwrite=True,
    )
    if with_labels:
        store.group()["labels/0"][:] = labels
    if finish:
        store.finish({})


def _write_reference(path: Path, values: np.ndarray, **profile: Any) -> None:
    """A one-band GeoTIFF on the output's grid (what a GIS exports); ``profile`` overrides."""
    meta: dict[str, Any] = {
        "driver": "GTiff",
        "height": values.shape[-2],
        "width": values.shape[-1],
        "count": 1 if values.ndim == 2 else values.shape[0],
        "dtype": values.dtype,
        "crs": "EPSG:32633",
        "transform": Affine(*TRANSFORM),
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": 128,
        "blockysize": 128,
    }
    meta.update(profile)
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(values if values.ndim == 3 else values[None])


def _expected(pred: np.ndarray, truth: np.ndarray, counted: np.ndarray) -> dict[str, Any]:
    """The confusion matrix and the FCN paper's metrics, from the two whole images."""
    t, p = truth[counted].astype(np.int64), pred[counted].astype(np.int64)
    n = np.bincount(K * t + p, minlength=K * K).reshape(K, K)
    diag, rows, cols = np.diag(n), n.sum(1), n.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iu = diag / (rows + cols - diag)
        acc = diag / rows
    return {
        "counts": n,
        "pixel_accuracy": diag.sum() / n.sum(),
        "mean_accuracy": np.nanmean(acc),
        "mean_iu": np.nanmean(iu),
        "frequency_weighted_iu": (rows * np.nan_to_num(iu)).sum() / rows.sum(),
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An output, and a reference that differs from it in 20 % of its pixels, has a no-data
    block and some pixels of ignore index 255."""
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(4)
    pred = rng.integers(0, K, (H // 30 + 1, W // 30 + 1)).repeat(30, 0).repeat(30, 1)[:H, :W]
    pred = pred.astype(np.uint8)
    truth = pred.copy()
    flip = rng.random((H, W)) < 0.2
    truth[flip] = rng.integers(0, K, int(flip.sum()))
    truth[truth == 2] = np.where(rng.random(int((truth == 2).sum())) < 0.3, 1, 2)  # class bias
    truth[40:90, 100:260] = NODATA
    truth[200:203, :] = 255
    _write_output(root / "out.zarr", pred)
    _write_reference(root / "truth.tif", truth)
    return {"root": root, "pred": pred, "truth": truth}


def _check(report: Any, expected: dict[str, Any]) -> None:
    assert np.array_equal(report.confusion.counts, expected["counts"])
    data = report.to_dict()
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iu", "frequency_weighted_iu"):
        assert data[key] == pytest.approx(expected[key], rel=1e-12), key


@pytest.mark.parametrize(("block_pixels", "workers"), [(64 * 64, 3), (1 << 22, 1)])
def test_metrics_equal_the_whole_images_compared_at_once(
    made: dict[str, Any], monkeypatch: pytest.MonkeyPatch, block_pixels: int, workers: int
) -> None:
    """Many small blocks on three threads, or a band of chunks at a time: the same counts as
    the whole images, no-data and the ignore index left out."""
    monkeypatch.setattr(score_module, "BLOCK_PIXELS", block_pixels)
    pred, truth = made["pred"], made["truth"]
    report = score(
        str(made["root"] / "out.zarr"),
        str(made["root"] / "truth.tif"),
        ignore_index=255,
        workers=workers,
    )
    counted = (truth != NODATA) & (truth != 255)
    _check(report, _expected(pred, truth, counted))
    assert report.nodata_pixels == int((truth == NODATA).sum())
    assert report.ignored_pixels == int((truth == 255).sum())
    assert report.counted_pixels == int(counted.sum())
    assert report.blocks > 20 if block_pixels == 64 * 64 else report.blocks == -(-H // 64)
    assert report.to_dict()["mean_iu"] < 0.9  # the reference really differs


def test_a_png_reference_without_georeferencing(made: dict[str, Any], tmp_path: Path) -> None:
    """A label PNG from an annotation tool (no grid to compare, read in order by one thread)."""
    truth = made["truth"].copy()
    truth[truth == NODATA] = 255
    Image.fromarray(truth).save(tmp_path / "truth.png")
    report = score(str(made["root"] / "out.zarr"), str(tmp_path / "truth.png"), ignore_index=255)
    _check(report, _expected(made["pred"], truth, truth != 255))
    assert report.workers == 1 and report.nodata_pixels == 0


def test_the_cli_prints_the_metrics_and_json(
    made: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from tilewise.cli import main

    out, ref = str(made["root"] / "out.zarr"), str(made["root"] / "truth.tif")
    assert main(["score", out, ref, "--ignore-index", "255", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    truth = made["truth"]
    expected = _expected(made["pred"], truth, (truth != NODATA) & (truth != 255))
    assert data["confusion"]["counts"] == expected["counts"].tolist()
    assert [row["name"] for row in data["per_class"]] == NAMES
    assert [row["reference_pixels"] for row in data["per_class"]] == list(expected["counts"].sum(1))
    assert main(["score", out, ref, "--ignore-index", "255"]) == 0
    text = capsys.readouterr().out
    assert f"mean IU {expected['mean_iu']:.4f}" in text
    assert f"pixel accuracy {expected['pixel_accuracy']:.4f}" in text
    assert "1 tumour" in text and "confusion (rows: reference, columns: output)" in text

    # 255 is not a class of this model: without --ignore-index that is one line, with the fix.
    assert main(["score", out, ref]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "hold class 255 at row 200, column 0" in err and "--ignore-index 255" in err


def _mistakes(made: dict[str, Any], tmp: Path) -> list[tuple[str, str, str, str]]:
    """(what, output, labels, part of the message) for each mistake a user can make."""
    truth, pred = made["truth"], made["pred"]
    _write_reference(tmp / "small.tif", truth[:-10])
    _write_reference(tmp / "bands.tif", np.stack([truth, truth]))
    _write_reference(
        tmp / "shifted.tif", truth, transform=Affine(*TRANSFORM) @ Affine.translation(3, 0)
    )
    _write_reference(tmp / "utm34.tif", truth, crs="EPSG:32634")
    _write_reference(tmp / "fraction.tif", truth.astype(np.float32) + 0.5, nodata=None)
    _write_output(tmp / "unfinished.zarr", pred, finish=False)
    _write_output(tmp / "probs_only.zarr", pred, with_labels=False)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp / "scene.png")
    from tilewise.io.ingest import ingest

    ingest(str(tmp / "scene.png"), str(tmp / "scene.zarr"))
    shard = zarr.open_group(tmp / "shard.zarr", mode="w")  # a training shard: image + label
    shard.create_array("image", data=np.zeros((3, H, W), np.uint8))
    shard.create_array("label", data=truth)
    out, ref = str(made["root"] / "out.zarr"), str(made["root"] / "truth.tif")
    return [
        ("size", out, str(tmp / "small.tif"), f"are {H - 10} x {W} px but the output"),
        ("bands", out, str(tmp / "bands.tif"), "have 2 bands; a label raster has one band"),
        ("grid", out, str(tmp / "shifted.tif"), "lie on another grid than the output"),
        ("crs", out, str(tmp / "utm34.tif"), "are in EPSG:32634 but the output"),
        ("fraction", out, str(tmp / "fraction.tif"), "labels are whole-number ids"),
        ("unfinished", str(tmp / "unfinished.zarr"), ref, "is not complete"),
        ("no labels", str(tmp / "probs_only.zarr"), ref, "set output.labels in the job"),
        ("an input", str(tmp / "scene.zarr"), ref, "is an image that `tilewise ingest` wrote"),
        ("no output", str(tmp / "none.zarr"), ref, "run its job first"),
        ("no labels file", out, str(tmp / "none.tif"), "does not exist; check the path"),
        ("a shard", out, str(tmp / "shard.zarr"), f"e.g. '{tmp / 'shard.zarr'}/label'"),
    ]


def test_each_mistake_is_one_line_that_says_what_and_how_to_fix_it(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tilewise.cli import main

    for what, out, ref, part in _mistakes(made, tmp_path):
        assert main(["score", out, ref, "--ignore-index", "255"]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (what, err)
        assert part in err, (what, err)
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        score(str(made["root"] / "out.zarr"), str(tmp_path / "none.tif"))
    with pytest.raises(InputError, match="has 3 classes"):
        score(str(made["root"] / "out.zarr"), str(made["root"] / "truth.tif"))


@pytest.mark.usefixtures("ray_cluster")
def test_a_predict_job_scored_against_whole_image_inference(tmp_path: Path) -> None:
    """The whole chain: a job on Ray, then its output scored against the labels of one forward
    of the whole image (pixels whose arg-max is a near-tie marked no-data): every counted pixel
    agrees, and a reference with known changes gives exactly the expected matrix."""
    from tilewise.pipeline.driver import run_job
    from tilewise.spec import parse_job

    write_input(tmp_path / "in.zarr", shape=(3, 150, 190))
    run_job(
        parse_job(
            {
                "kind": "predict",
                "name": "s",
                "input": {"path": str(tmp_path / "in.zarr")},
                "model": {
                    "arch": "unet_same",
                    "num_classes": 3,
                    "seed": 3,
                    "args": {"depth": 2, "base_width": 4},
                },
                "tiling": {"tile": 32},
                "output": {"path": str(tmp_path / "out.zarr"), "labels": "uint8", "chunk": 64},
            }
        ),
        progress=False,
    )
    image = zarr.open_array(tmp_path / "in.zarr", mode="r")[:].astype(np.float32) / 255
    torch.manual_seed(3)
    model = models.create("unet_same", in_channels=3, num_classes=3, depth=2, base_width=4)
    scores = np.sort(whole_image(model, image, model.tiling), axis=0)
    expected = np.argmax(whole_image(model, image, model.tiling), axis=0).astype(np.uint8)
    clear = scores[-1] - scores[-2] > 1e-4
    reference = np.where(clear, expected, NODATA).astype(np.uint8)
    Image.fromarray(reference).save(tmp_path / "ref.png")  # no no-data in a PNG: use 250
    same = score(str(tmp_path / "out.zarr"), str(tmp_path / "ref.png"), ignore_index=NODATA)
    assert same.counted_pixels == int(clear.sum()) > 0.99 * 150 * 190
    assert same.metrics["pixel_accuracy"] == 1.0
    assert np.count_nonzero(same.confusion.counts - np.diag(np.diag(same.confusion.counts))) == 0

    changed = reference.copy()
    changed[clear & (expected == 0)] = 1  # every clear background pixel called class 1
    Image.fromarray(changed).save(tmp_path / "changed.png")
    report = score(str(tmp_path / "out.zarr"), str(tmp_path / "changed.png"), ignore_index=NODATA)
    n = _expected(expected, changed, clear)["counts"]
    assert np.array_equal(report.confusion.counts, n)
    assert n[1, 0] == int((clear & (expected == 0)).sum()) > 0


def _job_over_two_images(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A predict job over a glob of two images, their outputs (as `tilewise run` lays them out)
    and a reference GeoTIFF for each, truth/{stem}.tif."""
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    rng = np.random.default_rng(7)
    pairs = {}
    for stem, (h, w) in {"a": (130, 170), "b": (90, 210)}.items():
        write_input(tmp_path / "in" / f"{stem}.zarr", shape=(3, h, w))
        pred = rng.integers(0, K, (h, w)).astype(np.uint8)
        truth = np.where(rng.random((h, w)) < 0.7, pred, rng.integers(0, K, (h, w)))
        truth = truth.astype(np.uint8)
        truth[:5] = NODATA
        _write_output(tmp_path / "out" / f"{stem}.seg.zarr", pred)
        _write_reference(tmp_path / "truth" / f"{stem}.tif", truth)
        pairs[stem] = (pred, truth)
    job = tmp_path / "job.yaml"
    job.write_text(
        "kind: predict\n"
        "input: {path: in/*.zarr}\n"
        "model: {arch: unet_same, num_classes: 3, args: {depth: 2, base_width: 4}}\n"
        "output: {path: 'out/{stem}.seg.zarr', labels: uint8}\n"
    )
    return job, pairs


def test_a_job_over_many_images_is_scored_image_by_image_and_as_a_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The totals are the FCN paper's: the metrics of the summed matrix, not a mean of the
    images' metrics."""
    from tilewise.cli import main
    from tilewise.io.score import score_job

    job, pairs = _job_over_two_images(tmp_path)
    report = score_job(str(job), str(tmp_path / "truth" / "{stem}.tif"))
    assert [Path(r.output).name for r in report.images] == ["a.seg.zarr", "b.seg.zarr"]
    for r, (pred, truth) in zip(report.images, pairs.values(), strict=True):
        _check(r, _expected(pred, truth, truth != NODATA))
    preds = np.concatenate([p.ravel() for p, _ in pairs.values()])
    truths = np.concatenate([t.ravel() for _, t in pairs.values()])
    expected = _expected(preds, truths, truths != NODATA)
    _check(report, expected)
    means = np.mean([r.to_dict()["mean_iu"] for r in report.images])
    assert report.to_dict()["mean_iu"] != pytest.approx(means, rel=1e-9)

    assert main(["score", str(job), str(tmp_path / "truth" / "{stem}.tif")]) == 0
    text = capsys.readouterr().out
    assert "all 2 images together" in text and f"mean IU {expected['mean_iu']:.4f}" in text

    # Mistakes: one line each, before anything is counted.
    (tmp_path / "truth" / "b.tif").unlink()
    (tmp_path / "train.yaml").write_text(
        "kind: train\ndata: {shards: [s/*.zarr]}\npatch: {size: 64}\n"
        "model: {arch: unet_same, num_classes: 3}\nsteps: 1\n"
    )
    for argv, part in [
        ([str(job), str(tmp_path / "truth.tif")], "put {stem} (each image's name) in the path"),
        ([str(job), str(tmp_path / "truth" / "{stem}.tif")], "image 'b': labels '"),
        ([str(tmp_path / "train.yaml"), "t.tif"], "score reads the outputs of a predict job"),
    ]:
        assert main(["score", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and part in err and "Traceback" not in err, err


# -- objects -----------------------------------------------------------------------------------


def _brute_force(
    pred: np.ndarray, ref: np.ndarray, valid: np.ndarray, thresholds: tuple[float, ...]
) -> list[tuple[int, int, int, float]]:
    """(TP, FP, FN, summed IoU of the matches) per threshold, from masks of every pair of objects
    inside ``valid``: pairs at or above the threshold taken by IoU, each object once."""
    pred, ref = np.where(valid, pred, 0), np.where(valid, ref, 0)
    p_ids, r_ids = np.unique(pred[pred > 0]), np.unique(ref[ref > 0])
    pairs = []
    for p in p_ids:
        pm = pred == p
        for r in np.unique(ref[pm & (ref > 0)]):
            rm = ref == r
            pairs.append(((pm & rm).sum() / (pm | rm).sum(), int(p), int(r)))
    pairs.sort(key=lambda x: -x[0])
    out = []
    for t in thresholds:
        used_p, used_r, total = set(), set(), 0.0
        for iou, p, r in pairs:
            if iou >= t and p not in used_p and r not in used_r:
                used_p.add(p)
                used_r.add(r)
                total += iou
        tp = len(used_p)
        out.append((tp, len(p_ids) - tp, len(r_ids) - tp, total))
    return out


def _objects(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Blobs of many sizes, numbered 1..N (connected components of smoothed noise)."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 4)
    return ndimage.label(noise > 0.35 * noise.std())[0]


def test_object_matching_equals_a_brute_force_over_every_pair() -> None:
    """Blocks of any shape summed into ObjectCounts give the whole images' matches."""
    from scipy import ndimage

    from tilewise.io.score import THRESHOLDS, ObjectCounts, match_objects

    pred = _objects((160, 200), seed=1)
    ref = ndimage.grey_dilation(pred, size=3) * (np.random.default_rng(2).random(pred.shape) > 0.1)
    ref[ref % 7 == 3] = 0  # objects the output has and the reference lacks
    ref[5:25, 150:190] = ref.max() + 1  # one the output lacks
    valid = np.ones(pred.shape, bool)
    valid[100:130, :60] = False
    expected = _brute_force(pred, ref, valid, THRESHOLDS)
    assert expected[0][0] > 10 and expected[0][1] > 0 and expected[0][2] > 0
    assert expected[-1][0] < expected[0][0]  # the thresholds matter here
    counts = ObjectCounts()
    for ys, xs in [(slice(0, 70), slice(0, 200)), (slice(70, 160), slice(0, 33)),
                   (slice(70, 160), slice(33, 200))]:  # fmt: skip
        v = valid[ys, xs]
        counts.add(pred[ys, xs][v], ref[ys, xs][v])
    matches, n_pred, n_ref = match_objects(counts)
    assert n_pred == len(np.unique(pred[valid & (pred > 0)]))
    assert n_ref == len(np.unique(ref[valid & (ref > 0)]))
    assert [(m.tp, m.fp, m.fn) for m in matches] == [e[:3] for e in expected]
    assert [m.matched_iou for m in matches] == pytest.approx([e[3] for e in expected], rel=1e-12)
    tp, fp, fn, iou = expected[0]
    metrics = matches[0].metrics()
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert metrics["panoptic_quality"] == pytest.approx(iou / (tp + fp / 2 + fn / 2))


@pytest.mark.usefixtures("ray_cluster")
def test_a_jobs_instances_scored_against_reference_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real job with the instance stage; the reference is its objects with some removed, one
    added, some grown, and a no-data block: the report equals the brute force on the arrays."""
    from scipy import ndimage

    from tilewise.cli import main
    from tilewise.io.score import THRESHOLDS, score_instances
    from tilewise.pipeline.driver import run_job
    from tilewise.spec import parse_job

    noise = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(3, 200, 240)), (0, 6, 6))
    data = ((noise - noise.min()) / (noise.max() - noise.min()) * 255).astype(np.uint8)
    zarr.create_array(tmp_path / "in.zarr", data=data, chunks=(3, 64, 64),
                      dimension_names=("c", "y", "x"))  # fmt: skip
    job = {
        "kind": "predict",
        "input": {"path": str(tmp_path / "in.zarr")},
        "model": {"arch": "unet_same", "num_classes": 3, "args": {"depth": 2, "base_width": 4}},
        "tiling": {"tile": 64},
        "output": {
            "path": str(tmp_path / "out.zarr"),
            "chunk": 128,
            "instances": {"halo": 256, "connectivity": 2},
        },
    }
    run_job(parse_job(job), progress=False)
    inst = zarr.open_group(tmp_path / "out.zarr", mode="r")["instances/0"][:]
    assert inst.max() > 3
    ref = ndimage.grey_dilation(inst, size=3).astype(np.int64)
    ref[ref == 2] = 0
    ref[0:10, 0:10] = ref.max() + 1
    ref[150:170, 20:90] = NODATA
    Image.fromarray(ref.astype(np.uint16)).save(tmp_path / "ref.png")
    with warnings.catch_warnings():  # a PNG has no georeferencing, and that is expected here
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "ref.png", "r+") as png:  # no-data, as GDAL keeps it
            png.nodata = NODATA
    valid = ref != NODATA
    expected = _brute_force(inst, ref, valid, THRESHOLDS)
    report = score_instances(str(tmp_path / "out.zarr"), str(tmp_path / "ref.png"))
    assert [(m.tp, m.fp, m.fn) for m in report.matches] == [e[:3] for e in expected]
    assert report.nodata_pixels == int((~valid).sum())
    assert report.output_objects == len(np.unique(inst[valid & (inst > 0)]))

    assert main(["score", str(tmp_path / "out.zarr"), str(tmp_path / "ref.png"),
                 "--instances", "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["matches"][0]["tp"] == expected[0][0]
    assert data["dsb2018_score"] == pytest.approx(
        np.mean([tp / (tp + fp + fn) for tp, fp, fn, _ in expected])
    )
    for argv, part in [
        (["--instances", "--ignore-index", "0"], "--ignore-index is for class maps"),
        ([], "scored with --instances"),  # object ids are not the model's 3 classes
    ]:
        assert main(["score", str(tmp_path / "out.zarr"), str(tmp_path / "ref.png"), *argv]) == 2
        err = capsys.readouterr().err
        assert part in err and err.count("\n") == 1, err


def test_a_jobs_objects_are_summed_over_its_images(tmp_path: Path) -> None:
    """`score JOB --instances`: every image's matches, and their sums for the whole job."""
    from tilewise.io.score import THRESHOLDS, score_job

    job, pairs = _job_over_two_images(tmp_path)
    expected_total = np.zeros((len(THRESHOLDS), 3), np.int64)
    per_image = []
    for k, (stem, (pred, _)) in enumerate(pairs.items()):
        objects = _objects(pred.shape, seed=10 + k).astype(np.uint32)
        reference = np.roll(objects, 2, axis=1).astype(np.uint16)
        reference[reference % 5 == 1] = 0
        root = zarr.open_group(tmp_path / "out" / f"{stem}.seg.zarr", mode="r+")
        group = root.create_group("instances")  # as the instance stage leaves it, finished
        group.create_array("0", data=objects, chunks=(64, 64))
        group.attrs["tilewise"] = {"status": "complete"}
        _write_reference(tmp_path / "truth" / f"{stem}.tif", reference, nodata=None)
        brute = _brute_force(objects, reference, np.ones(objects.shape, bool), THRESHOLDS)
        per_image.append([b[:3] for b in brute])
        expected_total += np.array([b[:3] for b in brute])
    report = score_job(str(job), str(tmp_path / "truth" / "{stem}.tif"), instances=True)
    assert [[(m.tp, m.fp, m.fn) for m in r.matches] for r in report.images] == per_image
    assert [(m.tp, m.fp, m.fn) for m in report.matches] == [tuple(t) for t in expected_total]
    assert "all 2 images together" in "\n".join(report.lines())
