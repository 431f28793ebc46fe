"""Tests of the training shards: opening, the checks before training, reads and class counts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from tilewise.errors import ConfigError, InputError, StoreNotFoundError
from tilewise.training import shards as shards_module
from tilewise.training.shards import Shard, expand_locations, open_shards

from . import make_shard, shapes_label, write_shard


def test_open_reads_exact_windows_and_facts(tmp_path: Path) -> None:
    loc_b, image_b, label_b, weight_b = make_shard(tmp_path / "b.zarr", seed=1, weight=True)
    loc_a, image_a, label_a, _ = make_shard(tmp_path / "a.zarr", seed=2)
    shards = open_shards([str(tmp_path / "*.zarr")], num_classes=3, patch_size=32)
    assert [s.location for s in shards] == [loc_a, loc_b]  # glob matches sorted
    a, b = shards
    assert a.shape == (3, 64, 80) and a.dtype == np.uint8 and not a.has_weight
    assert b.has_weight and (a.height, a.width) == (64, 80)
    image, label, weight = b.read(10, 50, 7, 71)
    np.testing.assert_array_equal(image, image_b[:, 10:50, 7:71])
    np.testing.assert_array_equal(label, label_b[10:50, 7:71])
    assert weight is not None and weight.dtype == np.float32
    np.testing.assert_array_equal(weight, weight_b[10:50, 7:71])
    assert b.read(0, 4, 0, 4, with_weight=False)[2] is None
    image, label, weight = a.read(0, 64, 0, 80)
    np.testing.assert_array_equal(image, image_a)
    np.testing.assert_array_equal(label, label_a)
    assert weight is None
    with pytest.raises(ValueError, match="outside"):
        a.read(0, 65, 0, 10)


def test_class_counts_match_bincount_and_skip_ignored(tmp_path: Path) -> None:
    loc, _, label, _ = make_shard(tmp_path / "s.zarr", shape=(1, 90, 70), chunks=16)
    (shard,) = open_shards([loc], num_classes=4, patch_size=8)
    kept = label[label != 255]
    np.testing.assert_array_equal(shard.class_counts(), np.bincount(kept, minlength=4))
    assert shard.class_counts()[3] == 0 and (label == 255).any()


def test_label_blocks_tile_the_array_in_small_chunk_aligned_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards_module, "_BLOCK_PIXELS", 2 * 16 * 16)
    loc, _, label, _ = make_shard(tmp_path / "s.zarr", shape=(1, 70, 90), chunks=16)
    (shard,) = open_shards([loc], num_classes=3, patch_size=8, check_labels=False)
    covered = np.zeros(label.shape, np.int64)
    for y0, x0, block in shard.label_blocks():
        assert block.size <= 2 * 16 * 16  # never the whole array
        assert y0 % 16 == 0 and x0 % 16 == 0
        np.testing.assert_array_equal(
            block, label[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]]
        )
        covered[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] += 1
    assert (covered == 1).all()


def test_bad_label_value_reports_first_value_and_pixel_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards_module, "_BLOCK_PIXELS", 16 * 16)  # scanned in many blocks
    label = shapes_label(64, 80)
    label[40, 50] = 7  # first in row-major order
    label[50:52, 10:13] = 9  # 6 more, in a later block row
    image = np.zeros((2, 64, 80), np.uint16)
    loc = write_shard(tmp_path / "bad.zarr", image, label, chunks=16)
    with pytest.raises(InputError) as info:
        open_shards([loc], num_classes=3, patch_size=16)
    message = str(info.value)
    assert "bad.zarr" in message and "label value 7" in message and "(y=40, x=50)" in message
    assert "7 pixel(s)" in message and "0..2" in message and "ignore_index 255" in message
    # With the check deferred, the first class_counts() raises the same error.
    (shard,) = open_shards([loc], num_classes=3, patch_size=16, check_labels=False)
    with pytest.raises(InputError, match="label value 7"):
        shard.class_counts()
    # 7 and 9 are fine with 10 classes.
    (shard,) = open_shards([loc], num_classes=10, patch_size=16)
    assert shard.class_counts()[9] == 6


def test_ignore_index_none_makes_255_invalid(tmp_path: Path) -> None:
    loc, *_ = make_shard(tmp_path / "s.zarr")
    with pytest.raises(InputError, match=r"label value 255 .* must be 0\.\.2,"):
        open_shards([loc], num_classes=3, ignore_index=None, patch_size=16)


def test_missing_arrays_are_named_with_what_the_group_holds(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("image", data=np.zeros((3, 32, 32), np.uint8))
    group.create_array("mask", data=np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError) as info:
        open_shards([str(tmp_path / "g.zarr")], num_classes=2, patch_size=16)
    message = str(info.value)
    assert "g.zarr" in message and "no 'label'" in message and "image, mask" in message


def test_a_plain_array_is_not_a_shard(tmp_path: Path) -> None:
    zarr.create_array(str(tmp_path / "a.zarr"), data=np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(InputError, match="is a Zarr array"):
        open_shards([str(tmp_path / "a.zarr")], num_classes=2, patch_size=16)


def test_shape_mismatches_give_both_shapes(tmp_path: Path) -> None:
    image = np.zeros((3, 64, 80), np.uint8)
    loc = write_shard(tmp_path / "l.zarr", image, np.zeros((64, 81), np.uint8))
    with pytest.raises(InputError, match=r"label shape \(64, 81\).*\(3, 64, 80\)"):
        open_shards([loc], num_classes=2, patch_size=16)
    loc = write_shard(
        tmp_path / "w.zarr", image, np.zeros((64, 80), np.uint8), np.ones((60, 80), np.float32)
    )
    with pytest.raises(InputError, match=r"w\.zarr.*weight shape \(60, 80\).*\(3, 64, 80\)"):
        open_shards([loc], num_classes=2, patch_size=16)
    loc = write_shard(tmp_path / "d.zarr", image[0], np.zeros((64, 80), np.uint8))
    with pytest.raises(InputError, match=r"d\.zarr.*\(C, H, W\)"):
        open_shards([loc], num_classes=2, patch_size=16)


def test_float_labels_are_refused(tmp_path: Path) -> None:
    loc = write_shard(
        tmp_path / "f.zarr", np.zeros((1, 32, 32), np.uint8), np.zeros((32, 32), np.float32)
    )
    with pytest.raises(InputError, match=r"integer class ids.*float32"):
        open_shards([loc], num_classes=2, patch_size=16)


def test_shards_must_share_band_count_and_dtype(tmp_path: Path) -> None:
    loc_a, *_ = make_shard(tmp_path / "a.zarr", shape=(3, 32, 32))
    loc_b, *_ = make_shard(tmp_path / "b.zarr", shape=(4, 32, 32))
    with pytest.raises(InputError) as info:
        open_shards([loc_a, loc_b], num_classes=3, patch_size=16)
    message = str(info.value)
    assert "b.zarr' has 4 band(s)" in message and "a.zarr' has 3" in message
    loc_c = write_shard(
        tmp_path / "c.zarr", np.zeros((3, 32, 32), np.uint16), np.zeros((32, 32), np.uint8)
    )
    with pytest.raises(InputError, match=r"dtype uint16.*uint8"):
        open_shards([loc_a, loc_c], num_classes=3, patch_size=16)


def test_patch_larger_than_a_shard(tmp_path: Path) -> None:
    loc_a, *_ = make_shard(tmp_path / "a.zarr", shape=(3, 64, 80))
    loc_b, *_ = make_shard(tmp_path / "b.zarr", shape=(3, 48, 100))
    with pytest.raises(ConfigError) as info:
        open_shards([loc_a, loc_b], num_classes=3, patch_size=(56, 64))
    message = str(info.value)
    assert "56x64" in message and "b.zarr" in message and "48x100" in message
    assert len(open_shards([loc_a, loc_b], num_classes=3, patch_size=(48, 80))) == 2


def test_locations_that_match_nothing(tmp_path: Path) -> None:
    loc, *_ = make_shard(tmp_path / "a.zarr")
    with pytest.raises(ConfigError, match=r"'.*/none\*\.zarr'"):
        open_shards([loc, str(tmp_path / "none*.zarr")], num_classes=3, patch_size=16)
    with pytest.raises(ConfigError, match="match"):
        open_shards([], num_classes=3, patch_size=16)
    with pytest.raises(StoreNotFoundError, match=r"missing\.zarr"):
        open_shards([str(tmp_path / "missing.zarr")], num_classes=3, patch_size=16)


def test_bad_arguments(tmp_path: Path) -> None:
    loc, *_ = make_shard(tmp_path / "a.zarr")
    with pytest.raises(ConfigError, match="num_classes"):
        open_shards([loc], num_classes=0, patch_size=16)
    with pytest.raises(ConfigError, match="ignore_index \\(1\\) is also a class id"):
        open_shards([loc], num_classes=3, ignore_index=1, patch_size=16)
    with pytest.raises(ConfigError, match="patch_size"):
        open_shards([loc], num_classes=3, patch_size=(16, 0))


def test_url_globs_through_fsspec() -> None:
    rng = np.random.default_rng(0)
    for name in ("z2", "z1"):
        write_shard(
            f"memory://tw-train-test/{name}.zarr",
            rng.integers(0, 9, (2, 40, 40), dtype=np.uint8),
            shapes_label(40, 40),
            chunks=16,
        )
    locations = expand_locations(["memory://tw-train-test/*.zarr"])
    assert locations == ["memory:///tw-train-test/z1.zarr", "memory:///tw-train-test/z2.zarr"]
    shards = open_shards(locations, num_classes=3, patch_size=16)
    _, label, _ = shards[0].read(0, 40, 0, 40)
    np.testing.assert_array_equal(label, shapes_label(40, 40))


def test_pickle_keeps_counts_and_reopens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loc, image, _, _ = make_shard(tmp_path / "a.zarr")
    (shard,) = open_shards([loc], num_classes=3, patch_size=16)
    shard.read(0, 8, 0, 8)  # opens the arrays, which do not travel
    copy: Shard = pickle.loads(pickle.dumps(shard))
    assert copy == shard

    def no_scan(self: Shard) -> None:
        raise AssertionError("the counts should have travelled with the shard")

    monkeypatch.setattr(Shard, "label_blocks", no_scan)
    np.testing.assert_array_equal(copy.class_counts(), shard.class_counts())
    np.testing.assert_array_equal(copy.read(3, 9, 4, 12)[0], image[:, 3:9, 4:12])


def test_in_memory_shard_reads_like_the_zarr_one(tmp_path: Path) -> None:
    loc, *_ = make_shard(tmp_path / "a.zarr", weight=True)
    (shard,) = open_shards([loc], num_classes=3, patch_size=16)
    memory = shard.load()
    for window in [(0, 64, 0, 80), (5, 17, 60, 80)]:
        for got, want in zip(memory.read(*window), shard.read(*window), strict=True):
            assert got is not None and want is not None
            np.testing.assert_array_equal(got, want)
    image, _, _ = memory.read(0, 2, 0, 2)
    image[:] = 0  # a copy: the held image stays
    assert memory.image[:, 0:2, 0:2].any()


@pytest.mark.parametrize("budget", [0, 3 * 16 * 20, 10**8])
def test_reads_through_the_chunk_cache_equal_plain_slices(tmp_path: Path, budget: int) -> None:
    from tilewise.training.shards import CHUNK_CACHE

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (3, 50, 70)).astype(np.uint8)
    label = rng.integers(0, 3, (50, 70)).astype(np.uint8)
    weight = rng.random((50, 70)).astype(np.float32)
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    group.create_array("image", data=image, chunks=(3, 16, 20))
    group.create_array("label", data=label, chunks=(16, 20))
    group.create_array("weight", data=weight, chunks=(16, 20))
    (shard,) = open_shards([str(tmp_path / "s.zarr")], num_classes=3, patch_size=8)
    before = CHUNK_CACHE.budget
    CHUNK_CACHE.set_budget(budget)  # 0: off; one image block: evicted mid-read; all of it
    try:
        for _ in range(40):
            y0, x0 = int(rng.integers(0, 42)), int(rng.integers(0, 62))
            h, w = int(rng.integers(1, 51 - y0)), int(rng.integers(1, 71 - x0))
            got_image, got_label, got_weight = shard.read(y0, y0 + h, x0, x0 + w)
            assert np.array_equal(got_image, image[:, y0 : y0 + h, x0 : x0 + w])
            assert np.array_equal(got_label, label[y0 : y0 + h, x0 : x0 + w])
            assert got_weight is not None
            assert np.array_equal(got_weight, weight[y0 : y0 + h, x0 : x0 + w])
            got_image[:] = 0  # callers own what they get: the kept blocks stay intact
        assert CHUNK_CACHE.nbytes <= budget
    finally:
        CHUNK_CACHE.set_budget(before)
