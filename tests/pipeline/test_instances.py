"""Instance stitching: tiled instances against whole-image connected components, on Ray too.

The reference is ``scipy.ndimage.label`` of each class over the whole image, computed here and
never through tilewise; the check is StarDist's ``test_big``: every object matched one to one at
IoU >= 0.99 (matching accuracy 1.0), no object split, ids 1..N.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import ndimage

from tilewise.errors import PlanError
from tilewise.pipeline.instance_stage import run_instances
from tilewise.pipeline.instances import (
    MAX_ID,
    ComponentsFactory,
    ComponentsSource,
    Obj,
    id_offsets,
    instances_in_memory,
)
from tilewise.pipeline.output import OutputLayout, OutputStore

H, W, CHUNK, HALO = 600, 700, 128, 40
CLASS_NAMES = ["background", "stroma", "nuclei", "other"]


# -- the synthetic mosaic -----------------------------------------------------------------------
def _disc(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= r * r


def _put(img: np.ndarray, shape: np.ndarray, y0: int, x0: int, value: int, free: bool) -> bool:
    """Paint ``shape`` (clipped to the image) at (y0, x0); with ``free``, only where it and a
    2-px margin around it are background, so that objects of one class never merge."""
    h, w = shape.shape
    ys = slice(max(0, y0), min(img.shape[0], y0 + h))
    xs = slice(max(0, x0), min(img.shape[1], x0 + w))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return False
    part = shape[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    if free:
        grown = ndimage.binary_dilation(np.pad(shape, 2), iterations=2)
        gy = slice(max(0, y0 - 2), min(img.shape[0], y0 + h + 2))
        gx = slice(max(0, x0 - 2), min(img.shape[1], x0 + w + 2))
        halo = grown[gy.start - y0 + 2 : gy.stop - y0 + 2, gx.start - x0 + 2 : gx.stop - x0 + 2]
        if (img[gy, gx][halo] != 0).any():
            return False
    img[ys, xs][part] = value
    return True


def _mosaic(seed: int = 0) -> np.ndarray:
    """Discs, rings, irregular blobs, U shapes, diagonal chains and specks of classes 1 and 2 (and
    an unlisted class 3), many across the 128-px unit borders or the image border, some pairs of
    different classes touching."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W), np.uint8)
    # Touching pairs of different classes right on unit borders and corners.
    for cy, cx in [(128, 256), (256, 128), (384, 512), (0, 640), (599, 300)]:
        _put(img, _disc(9), cy - 9, cx - 18, 1, free=False)
        _put(img, _disc(9), cy - 9, cx - 1, 2, free=False)
    u = np.zeros((30, 24), bool)
    u[:, :5] = u[:, -5:] = u[-5:, :] = True  # a U: its arms meet only at the bottom
    for cy, cx in [(110, 120), (240, 500), (500, 630)]:
        _put(img, u, cy, cx, 1, free=True)
    ring = _disc(13) & ~np.pad(_disc(8), 5)
    for cy, cx in [(128, 384), (512, 0)]:
        _put(img, ring, cy - 13, cx - 13, 2, free=True)
    chain = np.eye(12, dtype=bool)  # one object with connectivity 2, twelve with 1
    for cy, cx in [(120, 60), (250, 250), (380, 380)]:
        _put(img, chain, cy, cx, 1, free=True)
    placed = 0
    while placed < 260:
        kind = rng.integers(0, 4)
        cls = int(rng.integers(1, 3)) if rng.random() > 0.1 else 3
        if kind == 0:
            shape = _disc(int(rng.integers(2, 15)))
        elif kind == 1:
            shape = ndimage.gaussian_filter(rng.random((26, 26)), 3) > 0.5
        elif kind == 2:
            shape = rng.random((int(rng.integers(1, 3)), int(rng.integers(1, 3)))) < 0.8  # specks
        else:
            shape = _disc(int(rng.integers(4, 12)))[:, : int(rng.integers(3, 10))]
        y0 = int(rng.integers(-10, H - 5))
        x0 = int(rng.integers(-10, W - 5))
        placed += _put(img, shape, y0, x0, cls, free=True)
    return img


MOSAIC = _mosaic()


def _reference(img: np.ndarray, classes: list[int], connectivity: int, min_area: int) -> Any:
    """Whole-image components: an object-index image (0 = none) and each object's facts."""
    structure = ndimage.generate_binary_structure(2, connectivity)
    index = np.zeros(img.shape, np.int64)
    facts = []
    for c in classes:
        lab, n = ndimage.label(img == c, structure=structure)
        for k in range(1, n + 1):
            mask = lab == k
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            facts.append(
                {
                    "class": c,
                    "area": area,
                    "bbox": (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1),
                    "centroid": ndimage.center_of_mass(mask),
                    "first": int(np.flatnonzero(mask.ravel())[0]),  # raster-first pixel
                }
            )
            index[mask] = len(facts)
    return index, facts


def _check_against_reference(
    labels: np.ndarray, table: pd.DataFrame, img: np.ndarray, connectivity: int, min_area: int,
    chunk: int,
) -> None:  # fmt: skip
    ref, facts = _reference(img, [1, 2], connectivity, min_area)
    n = len(facts)
    assert n > 150  # the mosaic really has many objects
    # Matching at IoU >= 0.99 through the contingency table of (reference object, tiled id).
    both = (ref > 0) | (labels > 0)
    pairs, inter = np.unique(
        np.stack([ref[both], labels[both].astype(np.int64)]), axis=1, return_counts=True
    )
    ref_area = np.bincount(ref.ravel(), minlength=n + 1)
    ids, id_area = np.unique(labels, return_counts=True)
    area_of_id = dict(zip(ids.tolist(), id_area.tolist(), strict=True))
    match = {}
    for (r, t), i in zip(pairs.T.tolist(), inter.tolist(), strict=True):
        if r and t and i / (ref_area[r] + area_of_id[t] - i) >= 0.99:
            assert r not in match, "a reference object matched twice (split)"
            match[r] = t
    assert len(match) == n and len(set(match.values())) == n  # matching accuracy 1.0
    assert sorted(ids[ids > 0].tolist()) == list(range(1, n + 1))  # ids unique and 1..N
    for r in range(1, n + 1):  # no object split: one id over each object's pixels
        assert np.unique(labels[ref == r]).tolist() == [match[r]]
    assert not labels[ref == 0].any()
    # Ids follow (owner unit, anchor raster order): computed here from the reference alone.
    cols = -(-img.shape[1] // chunk)

    def owner(first: int) -> tuple[int, int]:
        ay, ax = divmod(first, img.shape[1])
        return ((ay // chunk) * cols + ax // chunk, first)

    order = sorted(range(1, n + 1), key=lambda r: owner(facts[r - 1]["first"]))
    assert [match[r] for r in order] == list(range(1, n + 1))
    # The table equals the reference's facts.
    table = table.sort_values("id").reset_index(drop=True)
    assert table["id"].tolist() == list(range(1, n + 1))
    by_id = {match[r]: facts[r - 1] for r in range(1, n + 1)}
    for row in table.itertuples(index=False):
        fact = by_id[row.id]
        assert (row[1], row.area) == (fact["class"], fact["area"])
        assert row.class_name == CLASS_NAMES[fact["class"]] and row.score == 1.0
        assert (row.bbox_y0, row.bbox_x0, row.bbox_y1, row.bbox_x1) == fact["bbox"]
        assert np.allclose((row.centroid_y, row.centroid_x), fact["centroid"], atol=1e-9)


@pytest.mark.parametrize(
    ("connectivity", "min_area", "chunk", "halo"),
    [(1, 0, CHUNK, HALO), (2, 4, CHUNK, HALO), (2, 0, 32, HALO)],  # 32: two rings of neighbours
)
def test_tiled_instances_equal_whole_image_components(
    connectivity: int, min_area: int, chunk: int, halo: int
) -> None:
    source = ComponentsSource(MOSAIC, [1, 2], connectivity, min_area)
    result = instances_in_memory(source, (H, W), chunk, halo, CLASS_NAMES)
    assert result.labels.dtype == np.uint32
    _check_against_reference(
        result.labels, result.table.to_pandas(), MOSAIC, connectivity, min_area, chunk
    )


def test_object_larger_than_the_halo_is_refused_in_memory() -> None:
    img = np.zeros((200, 200), np.uint8)
    img[50:60, 20:150] = 1  # 130 px long
    with pytest.raises(PlanError, match=r"needs a halo larger than 32 px.*instances\.halo"):
        instances_in_memory(ComponentsSource(img, [1]), img.shape, 64, 32)
    assert instances_in_memory(ComponentsSource(img, [1]), img.shape, 64, 130).objects == 1


def test_ids_beyond_uint32_are_refused() -> None:
    assert id_offsets([2, 0, 3]).tolist() == [0, 2, 2, 5]
    assert id_offsets([MAX_ID - 1, 1])[-1] == MAX_ID  # exactly full is fine
    with pytest.raises(PlanError, match="uint32"):
        id_offsets([MAX_ID - 1, 2])


# -- overlapping detections ---------------------------------------------------------------------
def _square(y0: int, x0: int, h: int, w: int) -> tuple[int, int, np.ndarray]:
    return y0, x0, np.ones((h, w), bool)


# (class, score, y0, x0, mask): A and C overlap and tie at 0.9; B (0.5) lies under both, D (0.95)
# over A and B. Units are 64 px, three per row.
DETECTIONS = {
    "A": (1, 0.9, *_square(50, 50, 20, 20)),  # anchor (60, 60): unit 0 (chunk 64)
    "B": (2, 0.5, *_square(60, 60, 20, 20)),  # anchor (70, 70): unit 4
    "C": (1, 0.9, *_square(45, 62, 17, 30)),  # anchor (53, 77): unit 1
    "D": (2, 0.95, *_square(62, 62, 4, 4)),  # anchor (64, 64): unit 4, before B in raster order
}


class Detections:
    """A fake detector: fixed global detections, returned cut to the window as a detector would
    cut them, anchored at their (whole) box centre; listed in the order given."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def find(self, y0: int, y1: int, x0: int, x1: int) -> list[Obj]:
        found = []
        for name in self.names:
            cls, score, oy, ox, mask = DETECTIONS[name]
            h, w = mask.shape
            cy0, cy1, cx0, cx1 = max(y0, oy), min(y1, oy + h), max(x0, ox), min(x1, ox + w)
            if cy0 < cy1 and cx0 < cx1:
                cut = mask[cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
                found.append(Obj(cls, score, cut, cy0, cx0, (oy + h // 2, ox + w // 2)))
        return found


def _expected_overlaps() -> np.ndarray:
    """Worked by hand: ids by (owner unit, anchor) are A 1, C 2, D 3, B 4; the higher score is
    on top, and of A and C (equal scores) the lower id, A."""
    expected = np.zeros((150, 150), np.uint32)
    expected[60:80, 60:80] = 4  # B, lowest score
    expected[45:62, 62:92] = 2  # C over B
    expected[50:70, 50:70] = 1  # A over B and C
    expected[62:66, 62:66] = 3  # D over all
    return expected


@pytest.mark.parametrize("names", [list("ABCD"), list("DCBA")])
def test_overlapping_detections_paint_the_higher_score_on_top(names: list[str]) -> None:
    result = instances_in_memory(Detections(names), (150, 150), 64, 32, ["bg", "cat", "dog"])
    assert np.array_equal(result.labels, _expected_overlaps())
    table = result.table.to_pandas()
    assert table["id"].tolist() == [1, 2, 3, 4]
    assert table["score"].tolist() == [0.9, 0.9, 0.95, 0.5]
    assert table["class_name"].tolist() == ["cat", "cat", "dog", "dog"]
    assert table["area"].tolist() == [400, 510, 16, 400]  # whole masks, not the painted parts


# -- the Ray stage ------------------------------------------------------------------------------
def _output(path: Path, labels: np.ndarray, chunk: int = CHUNK) -> Path:
    layout = OutputLayout(*labels.shape, 4, chunk, None, "uint8", None, "zstd", None, CLASS_NAMES)
    store = OutputStore(str(path))
    store.prepare(layout, fingerprint="f", job={}, carried={}, overwrite=False)
    store.group()["labels/0"][:] = labels
    return path


def _files(path: Path) -> dict[str, bytes]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in files}


def _digest(path: Path) -> str:
    return hashlib.sha256(repr(sorted(_files(path).items())).encode()).hexdigest()


def _run(out: Path, workers: int, **kwargs: Any) -> Any:
    factory = ComponentsFactory(str(out), (1, 2), connectivity=2, min_area=4)
    return run_instances(
        str(out), factory, chunk=kwargs.pop("chunk", CHUNK), halo=kwargs.pop("halo", HALO),
        image_shape=(H, W), workers=workers, class_names=CLASS_NAMES, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("instances")
    one, two = _output(root / "one.zarr", MOSAIC), _output(root / "two.zarr", MOSAIC)
    return {"one": one, "two": two, "report_one": _run(one, 1), "report_two": _run(two, 2)}


def test_ray_stage_is_independent_of_the_worker_count(stage_runs: dict[str, Any]) -> None:
    one, two = stage_runs["one"], stage_runs["two"]
    assert _files(one / "instances/0") == _files(two / "instances/0")  # byte-identical chunks
    labels = zarr.open_array(one / "instances/0", mode="r")
    assert labels.dtype == np.uint32 and labels.chunks == (CHUNK, CHUNK)
    memory = instances_in_memory(
        ComponentsSource(MOSAIC, [1, 2], 2, 4), (H, W), CHUNK, HALO, CLASS_NAMES
    )
    assert np.array_equal(labels[:], memory.labels)
    t1, t2 = (pd.read_parquet(p / "instances.parquet") for p in (one, two))
    expected = memory.table.to_pandas()
    for table in (t1, t2):
        pd.testing.assert_frame_equal(table.sort_values("id").reset_index(drop=True), expected)
    _check_against_reference(labels[:], t2, MOSAIC, 2, 4, CHUNK)
    r1, r2 = stage_runs["report_one"], stage_runs["report_two"]
    assert r1.objects == r2.objects == memory.objects and r2.units_found == r2.units == 30
    assert r2.max_objects_per_unit == max(memory.counts)


def test_instances_read_as_an_ome_zarr_label_image(stage_runs: dict[str, Any]) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    out = stage_runs["one"]
    node = next(iter(Reader(parse_url(str(out / "instances")))()))
    assert any(isinstance(spec, Label) for spec in node.specs)
    assert np.array_equal(np.asarray(node.data[0]), zarr.open_array(out / "instances/0")[:])
    state = zarr.open_group(out / "instances", mode="r").attrs["tilewise"]
    assert state["status"] == "complete" and state["report"]["objects"] > 150


def test_resume_repaints_lost_units_with_the_same_bytes(
    stage_runs: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "resume.zarr"
    shutil.copytree(stage_runs["two"], out)
    before = _digest(out / "instances/0"), _files(out / "instances.parquet")
    base = out / ".tilewise/instances"
    for u in (3, 7, 12, 29):  # lose these units' pixels and markers
        (base / "painted" / str(u)).unlink()
        i, j = divmod(u, 6)
        (out / f"instances/0/c/{i}/{j}").unlink(missing_ok=True)  # all-zero chunks are not stored
    (out / "instances.parquet/part-000007.parquet").unlink(missing_ok=True)
    for record in base.glob("objects/8.*.npz"):  # and one unit's phase 1
        record.unlink()
    (base / "painted" / "8").unlink()
    report = _run(out, 2)
    assert (report.units_found, report.units_painted) == (1, 5)
    assert (_digest(out / "instances/0"), _files(out / "instances.parquet")) == before
    again = _run(out, 2)  # a finished stage does nothing
    assert (again.units_found, again.units_painted) == (0, 0)


@pytest.mark.usefixtures("ray_cluster")
def test_an_object_larger_than_the_halo_leaves_nothing_presented_as_finished(
    tmp_path: Path,
) -> None:
    img = MOSAIC.copy()
    img[290:320, 190:350] = 0
    img[300:310, 200:340] = 2  # 140 px long against a 40 px halo
    out = _output(tmp_path / "big.zarr", img)
    with pytest.raises(PlanError, match=r"y=300, x=200.*needs a halo larger than 40 px"):
        _run(out, 1)
    root = zarr.open_group(out, mode="r")
    assert "instances" not in root and not (out / "instances.parquet").exists()
    # Raising the halo (and nothing else) finishes the job from the same output.
    report = _run(out, 2, halo=96, table_format="csv")
    assert report.units_found == 30  # records of the 40 px halo were not reused
    table = pd.read_csv(out / "instances.csv")
    labels = zarr.open_array(out / "instances/0", mode="r")[:]
    assert not (out / "instances.parquet").exists()
    _check_against_reference(labels, table, img, 2, 4, CHUNK)


@pytest.mark.usefixtures("ray_cluster")
def test_ray_stage_runs_any_object_source(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "det.zarr", mode="w")  # a bare output: no labels/0

    class Factory:  # defined here, so Ray pickles it (and Detections) by value
        fingerprint = "detections"

        def __call__(self) -> Detections:
            return Detections(list("DCBA"))

    report = run_instances(
        str(tmp_path / "det.zarr"), Factory(), chunk=64, halo=32, image_shape=(150, 150),
        workers=2, class_names=["bg", "cat", "dog"],
    )  # fmt: skip
    assert report.objects == 4
    labels = zarr.open_array(tmp_path / "det.zarr/instances/0", mode="r")
    assert labels.chunks == (64, 64) and np.array_equal(labels[:], _expected_overlaps())


@pytest.mark.usefixtures("ray_cluster")
def test_units_must_be_the_outputs_write_units(tmp_path: Path) -> None:
    out = _output(tmp_path / "o.zarr", MOSAIC)
    with pytest.raises(PlanError, match=r"chunk 64 is not the output's write unit \(128, 128\)"):
        _run(out, 1, chunk=64)
    assert not (out / ".tilewise/instances").exists()
