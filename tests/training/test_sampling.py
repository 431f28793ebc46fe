"""Tests of the shard assignment and the patch samplers (coverage, balance, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tilewise.errors import ConfigError
from tilewise.training import shards as shards_module
from tilewise.training.sampling import (
    ClassBalancedSampler,
    ForegroundSampler,
    UniformSampler,
    assign_shards,
    build_class_index,
    make_sampler,
    sampler_from_state,
)
from tilewise.training.shards import Shard, open_shards

from . import make_shard, write_shard

# ------------------------------------------------------------------------ assign_shards


@pytest.mark.parametrize(("n_shards", "world"), [(10, 3), (4, 4), (7, 1), (9, 2)])
def test_assign_shards_is_a_disjoint_cover(n_shards: int, world: int) -> None:
    for epoch in range(4):
        parts = [assign_shards(n_shards, world, r, epoch, seed=5) for r in range(world)]
        flat = [i for part in parts for i in part]
        assert sorted(flat) == list(range(n_shards))  # disjoint and complete
        sizes = sorted(len(p) for p in parts)
        assert sizes[-1] - sizes[0] <= 1 and sizes[0] >= 1
        assert parts == [assign_shards(n_shards, world, r, epoch, seed=5) for r in range(world)]


def test_assign_shards_reshuffles_per_epoch_and_seed() -> None:
    deals = {tuple(assign_shards(12, 3, 0, epoch, seed=1)) for epoch in range(6)}
    assert len(deals) > 1
    assert assign_shards(12, 3, 1, 0, seed=1) != assign_shards(12, 3, 1, 0, seed=2)


def test_assign_shards_needs_a_shard_per_worker() -> None:
    with pytest.raises(ConfigError, match="3 shard\\(s\\) cannot feed 4 training workers"):
        assign_shards(3, 4, 0, 0, seed=0)
    with pytest.raises(ConfigError, match="rank"):
        assign_shards(4, 2, 2, 0, seed=0)


# ------------------------------------------------------------------------ test data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Shard], list[np.ndarray]]:
    """Two shards: ``shapes_label`` labels on 64 x 80 and a bigger 96 x 72 with a tiny class 3
    blob (5 pixels), chunked at 16 so that scans go block by block."""
    root = tmp_path_factory.mktemp("sampling")
    loc_a, _, label_a, _ = make_shard(root / "a.zarr", shape=(1, 64, 80), chunks=16)
    label_b = np.zeros((96, 72), np.uint8)
    label_b[10:40, 5:30] = 1
    label_b[70, 60:65] = 3
    label_b[90:, :] = 255
    loc_b = write_shard(root / "b.zarr", np.zeros((1, 96, 72), np.uint8), label_b, chunks=16)
    shards = open_shards([loc_a, loc_b], num_classes=5, patch_size=16)
    return shards, [label_a, label_b]


def _inside(patch: tuple[int, int, int], shards: list[Shard], size: int) -> bool:
    i, y0, x0 = patch
    return 0 <= y0 <= shards[i].height - size and 0 <= x0 <= shards[i].width - size


# ------------------------------------------------------------------------ class index


def test_class_index_matches_brute_force_counts_per_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks of 24 x 48 px (chunk-aligned) cut the 10 px cells: counts must still add up.
    monkeypatch.setattr(shards_module, "_BLOCK_PIXELS", 2 * 24 * 24)
    rng = np.random.default_rng(3)
    label = rng.integers(0, 4, (70, 95)).astype(np.uint8)
    label[rng.random(label.shape) < 0.1] = 255
    loc = write_shard(tmp_path / "r.zarr", np.zeros((1, 70, 95), np.uint8), label, chunks=24)
    (shard,) = open_shards([loc], num_classes=4, patch_size=20, check_labels=False)
    index = build_class_index(shard, 10)
    padded = np.full((80, 100), 255, np.uint8)
    padded[:70, :95] = label
    cells = padded.reshape(8, 10, 10, 10).transpose(0, 2, 1, 3).reshape(80, 100)
    assert (index.rows, index.cols) == (7, 10)
    for c in range(4):
        per_cell = (cells == c).sum(axis=1)
        np.testing.assert_array_equal(index.cells[c], np.flatnonzero(per_cell))
        np.testing.assert_array_equal(index.counts[c], per_cell[per_cell > 0])


# ------------------------------------------------------------------------ samplers


def test_uniform_sampler_covers_origins_in_proportion(
    dataset: tuple[list[Shard], list[np.ndarray]],
) -> None:
    shards, _ = dataset
    sampler = UniformSampler(shards, 16, seed=0)
    patches = sampler.take(6000)
    assert all(_inside(p, shards, 16) for p in patches)
    origins = np.array([(64 - 15) * (80 - 15), (96 - 15) * (72 - 15)])
    share_a = sum(p.shard == 0 for p in patches) / len(patches)
    assert share_a == pytest.approx(origins[0] / origins.sum(), abs=0.03)
    ys = [p.y0 for p in patches if p.shard == 1]
    assert min(ys) == 0 and max(ys) == 96 - 16  # both extremes reachable
    assert UniformSampler(shards, 16, seed=0).take(50) == patches[:50]
    assert UniformSampler(shards, 16, seed=1).take(50) != patches[:50]


def test_class_balanced_patches_contain_their_class_and_classes_are_balanced(
    dataset: tuple[list[Shard], list[np.ndarray]],
) -> None:
    shards, labels = dataset
    sampler = ClassBalancedSampler(shards, 16, seed=(7, 0, 1))
    assert sampler.classes == [0, 1, 2, 3]  # class 4 is in no shard; 255 is ignored
    drawn = []
    for _ in range(4000):
        (i, y0, x0), c = sampler.sample_with_class()
        assert _inside((i, y0, x0), shards, 16)
        assert (labels[i][y0 : y0 + 16, x0 : x0 + 16] == c).any()
        drawn.append(c)
    shares = np.bincount(drawn, minlength=5) / len(drawn)
    np.testing.assert_allclose(shares[:4], 0.25, atol=0.03)
    assert shares[4] == 0
    # Class 3 covers 5 of 11,520 pixels, yet a quarter of the patches contain it.


def test_class_balanced_centres_near_the_class(
    dataset: tuple[list[Shard], list[np.ndarray]],
) -> None:
    shards, labels = dataset
    sampler = ClassBalancedSampler(shards, 32, seed=2, cell=4)
    assert sampler.cell == 4
    for _ in range(500):
        (i, y0, x0), c = sampler.sample_with_class()
        shard = shards[i]
        yc, xc = y0 + 16, x0 + 16
        # Unclamped patches are centred within one cell (4 px) of a pixel of the class.
        if 0 < y0 < shard.height - 32 and 0 < x0 < shard.width - 32:
            near = labels[i][max(0, yc - 4) : yc + 5, max(0, xc - 4) : xc + 5]
            assert (near == c).any()


def test_foreground_sampler(dataset: tuple[list[Shard], list[np.ndarray]]) -> None:
    shards, labels = dataset

    def has_foreground(p: tuple[int, int, int]) -> bool:
        i, y0, x0 = p
        window = labels[i][y0 : y0 + 16, x0 : x0 + 16]
        return bool(((window != 0) & (window != 255)).any())

    always = ForegroundSampler(shards, 16, seed=0, p=1.0).take(1000)
    assert all(has_foreground(p) for p in always)
    never = ForegroundSampler(shards, 16, seed=0, p=0.0).take(3000)
    half = ForegroundSampler(shards, 16, seed=0, p=0.5).take(3000)
    # Brute force: the share of all patch origins (every one equally likely) with foreground.
    origins = [
        (i, y0, x0)
        for i, shard in enumerate(shards)
        for y0 in range(shard.height - 15)
        for x0 in range(shard.width - 15)
    ]
    q = np.mean([has_foreground(p) for p in origins])
    assert 0.2 < q < 0.8
    assert np.mean([has_foreground(p) for p in never]) == pytest.approx(q, abs=0.03)
    assert np.mean([has_foreground(p) for p in half]) == pytest.approx(0.5 + 0.5 * q, abs=0.03)
    # background=1: class 1 no longer counts as foreground.
    sampler = ForegroundSampler(shards, 16, seed=0, p=1.0, background=1)
    for i, y0, x0 in sampler.take(300):
        window = labels[i][y0 : y0 + 16, x0 : x0 + 16]
        assert (np.isin(window, [0, 2, 3])).any()


def test_samplers_fall_back_to_uniform_without_labels(tmp_path: Path) -> None:
    label = np.full((40, 40), 255, np.uint8)
    loc = write_shard(tmp_path / "u.zarr", np.zeros((1, 40, 40), np.uint8), label)
    shards = open_shards([loc], num_classes=2, patch_size=16)
    balanced = ClassBalancedSampler(shards, 16, seed=0)
    assert balanced.classes == [] and all(_inside(p, shards, 16) for p in balanced.take(100))
    foreground = ForegroundSampler(shards, 16, seed=0, p=1.0)
    assert all(_inside(p, shards, 16) for p in foreground.take(100))


@pytest.mark.parametrize(
    ("kind", "params"),
    [("uniform", {}), ("class_balanced", {"cell": 8}), ("foreground", {"p": 0.7})],
)
def test_resume_gives_the_same_next_patches(
    dataset: tuple[list[Shard], list[np.ndarray]], kind: str, params: dict[str, float]
) -> None:
    shards, _ = dataset
    uninterrupted = make_sampler(kind, shards, 16, seed=(3, 1, 0), **params)
    expected = uninterrupted.take(60)
    first = make_sampler(kind, shards, 16, seed=(3, 1, 0), **params)
    assert first.take(25) == expected[:25]
    state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
    first.take(5)  # drawing on after the save changes nothing
    resumed = sampler_from_state(shards, state)
    assert type(resumed) is type(uninterrupted) and resumed.drawn == 25
    assert resumed.take(35) == expected[25:]
    again = make_sampler(kind, shards, 16, seed=99, **params)
    again.set_state(state)
    assert again.take(35) == expected[25:]


def test_state_of_other_shards_or_kind_is_refused(
    dataset: tuple[list[Shard], list[np.ndarray]],
) -> None:
    shards, _ = dataset
    state = UniformSampler(shards, 16, seed=0).state()
    with pytest.raises(ConfigError, match="same shards"):
        UniformSampler(shards[::-1], 16, seed=0).set_state(state)
    with pytest.raises(ConfigError, match="'uniform' sampler"):
        ForegroundSampler(shards, 16, seed=0).set_state(state)
    with pytest.raises(ConfigError, match="patch_size"):
        UniformSampler(shards, 8, seed=0).set_state(state)


def test_clone_and_seek(dataset: tuple[list[Shard], list[np.ndarray]]) -> None:
    shards, _ = dataset
    sampler = ClassBalancedSampler(shards, 16, seed=4)
    sampler.take(3)
    twin = sampler.clone()
    ahead = twin.take(10)
    assert sampler.take(10) == ahead  # the clone drew on its own generator
    position = twin.position()
    sampler.seek(position)
    assert sampler.take(5) == twin.take(5)


def test_make_sampler_names_and_settings(dataset: tuple[list[Shard], list[np.ndarray]]) -> None:
    shards, _ = dataset
    with pytest.raises(ConfigError, match="Did you mean 'class_balanced'"):
        make_sampler("class_balance", shards, 16, seed=0)
    with pytest.raises(ConfigError, match="bad settings"):
        make_sampler("uniform", shards, 16, seed=0, p=0.5)
    with pytest.raises(ConfigError, match="probability"):
        make_sampler("foreground", shards, 16, seed=0, p=1.5)
    with pytest.raises(ConfigError, match="does not fit"):
        make_sampler("uniform", shards, 65, seed=0)
