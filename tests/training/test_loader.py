"""Tests of the patch loader: batch contents, order, resume, errors, shutdown, statistics."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tilewise.errors import ConfigError
from tilewise.training.augment import Augment, AugmentConfig
from tilewise.training.loader import Batch, PatchLoader
from tilewise.training.sampling import (
    PatchSampler,
    UniformSampler,
    make_sampler,
    sampler_from_state,
)
from tilewise.training.shards import Shard, open_shards

from . import make_shard

PATCH = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Shard], list[tuple]]:
    root = tmp_path_factory.mktemp("loader")
    made = [
        make_shard(root / "a.zarr", shape=(3, 64, 80), seed=1, weight=True),
        make_shard(root / "b.zarr", shape=(3, 48, 56), seed=2, weight=True),
    ]
    shards = open_shards([m[0] for m in made], num_classes=3, patch_size=PATCH)
    return shards, [m[1:] for m in made]


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tilewise-loader")]


@pytest.fixture(autouse=True)
def no_threads_left() -> object:
    yield
    gc.collect()
    assert _loader_threads() == []


def _same(a: Batch, b: Batch) -> None:
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert torch.equal(a.label, b.label)
    assert (a.weight is None) == (b.weight is None)
    if a.weight is not None and b.weight is not None:
        assert torch.equal(a.weight, b.weight)


def test_batches_hold_the_sampled_patches(data: tuple[list[Shard], list[tuple]]) -> None:
    shards, arrays = data
    expected_patches = UniformSampler(shards, PATCH, seed=3).take(4 * 5)
    sampler = UniformSampler(shards, PATCH, seed=3)
    with PatchLoader(sampler, batch_size=5, workers=3) as loader:
        for b in range(4):
            image, label, weight = loader.next_batch()
            assert image.dtype == torch.float32 and image.shape == (5, 3, PATCH, PATCH)
            assert label.dtype == torch.int64 and label.shape == (5, PATCH, PATCH)
            assert weight is not None and weight.dtype == torch.float32
            assert loader.patches == expected_patches[5 * b : 5 * b + 5]
            for n, (i, y0, x0) in enumerate(loader.patches):
                src_image, src_label, src_weight = arrays[i]
                window = np.s_[y0 : y0 + PATCH, x0 : x0 + PATCH]
                np.testing.assert_array_equal(image[n].numpy(), src_image[(slice(None), *window)])
                np.testing.assert_array_equal(label[n].numpy(), src_label[window])
                np.testing.assert_array_equal(weight[n].numpy(), src_weight[window])


def test_normaliser_is_applied(data: tuple[list[Shard], list[tuple]]) -> None:
    shards, arrays = data
    sampler = UniformSampler(shards, PATCH, seed=0)
    with PatchLoader(
        sampler, batch_size=2, normalize=lambda x: (x.double() - 100) / 50, weights=False
    ) as loader:
        batch = loader.next_batch()
        i, y0, x0 = loader.patches[1]
    assert batch.weight is None and batch.image.dtype == torch.float32
    raw = arrays[i][0][:, y0 : y0 + PATCH, x0 : x0 + PATCH].astype(np.float64)
    np.testing.assert_allclose(batch.image[1].numpy(), (raw - 100) / 50, rtol=1e-6)


def test_the_reader_threads_run_no_torch_op_on_a_cpu_host(
    data: tuple[list[Shard], list[tuple]],
) -> None:
    # A torch op on a whole batch in a reader thread gives it an OpenMP team, and a second
    # team makes the training step's sleep at its barriers (PatchLoader's build): without
    # pinned memory the normaliser runs on the thread that takes the batch.
    shards, _ = data
    ran_on: list[str] = []

    def normalize(x: torch.Tensor) -> torch.Tensor:
        ran_on.append(threading.current_thread().name)
        return x.float() / 255

    with PatchLoader(
        UniformSampler(shards, PATCH, seed=0), batch_size=2, workers=2, normalize=normalize
    ) as loader:
        batches = [loader.next_batch() for _ in range(3)]
    assert ran_on == [threading.current_thread().name] * 3
    assert all(b.image.dtype == torch.float32 and b.image.max() <= 1 for b in batches)


def test_threads_and_memory_do_not_change_the_batches(
    data: tuple[list[Shard], list[tuple]],
) -> None:
    shards, _ = data
    augment = Augment(AugmentConfig(elastic_p=0.5, brightness=0.1, contrast=0.1))

    def batches(**kwargs: object) -> list[Batch]:
        sampler = make_sampler("class_balanced", shards, PATCH, seed=(1, 2, 3))
        with PatchLoader(
            sampler,
            batch_size=3,
            augment=augment,
            seed=(1, 2, 3),
            **kwargs,
        ) as loader:
            return [loader.next_batch() for _ in range(6)]

    reference = batches(workers=1)
    for other in (batches(workers=3, prefetch=2), batches(in_memory=True, workers=2)):
        for a, b in zip(reference, other, strict=True):
            _same(a, b)


def test_resume_continues_with_the_same_batches(data: tuple[list[Shard], list[tuple]]) -> None:
    shards, _ = data
    augment = Augment(AugmentConfig(elastic_p=1.0, brightness=0.1))

    def new_sampler() -> PatchSampler:
        return make_sampler("foreground", shards, PATCH, seed=(5, 0, 0), p=0.6)

    with PatchLoader(new_sampler(), batch_size=4, augment=augment, seed=7) as loader:
        uninterrupted = [loader.next_batch() for _ in range(6)]
    sampler = new_sampler()
    with PatchLoader(sampler, batch_size=4, augment=augment, seed=7, prefetch=3) as loader:
        for n in range(3):
            _same(loader.next_batch(), uninterrupted[n])
        time.sleep(0.2)  # let the threads draw ahead: the caller's sampler must not follow
        state = sampler.state()
    assert state["drawn"] == 12
    resumed = sampler_from_state(shards, state)
    with PatchLoader(resumed, batch_size=4, augment=augment, seed=7) as loader:
        for n in range(3, 6):
            _same(loader.next_batch(), uninterrupted[n])


def test_reader_errors_reach_the_consumer_and_threads_stop(
    data: tuple[list[Shard], list[tuple]],
) -> None:
    shards, _ = data
    calls = []

    def failing(
        image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        calls.append(1)
        if len(calls) == 7:
            raise ValueError("boom in patch 7")
        return image, label, weight

    loader = PatchLoader(
        UniformSampler(shards, PATCH, seed=0), batch_size=3, augment=failing, workers=2, prefetch=1
    )
    loader.next_batch()
    loader.next_batch()
    with pytest.raises(ValueError, match="boom in patch 7"):
        loader.next_batch()
    assert loader.closed and _loader_threads() == []
    with pytest.raises(RuntimeError, match="closed"):
        loader.next_batch()


def test_num_batches_then_stop(data: tuple[list[Shard], list[tuple]]) -> None:
    shards, _ = data
    loader = PatchLoader(UniformSampler(shards, PATCH, seed=0), batch_size=2, num_batches=5)
    assert len(list(loader)) == 5
    assert loader.closed and _loader_threads() == []
    stats = loader.stats()
    assert stats["batches"] == 5 and stats["patches"] == 10
    # 10 patches of 3 x 16 x 16 uint8 pixels, uint8 labels and float32 weights.
    assert stats["bytes_read"] == 10 * (3 * 256 + 256 + 4 * 256)
    assert stats["wait_s"] >= 0 and stats["patches_per_s"] > 0


def test_close_and_garbage_collection_stop_the_threads(
    data: tuple[list[Shard], list[tuple]],
) -> None:
    shards, _ = data
    loader = PatchLoader(UniformSampler(shards, PATCH, seed=0), batch_size=2, workers=3)
    loader.next_batch()
    assert len(_loader_threads()) == 3
    loader.close()
    assert _loader_threads() == []
    dropped = PatchLoader(UniformSampler(shards, PATCH, seed=0), batch_size=2, workers=2)
    dropped.next_batch()
    del dropped  # never closed: its finaliser stops the threads


def test_the_queue_is_bounded(data: tuple[list[Shard], list[tuple]]) -> None:
    shards, _ = data
    with PatchLoader(
        UniformSampler(shards, PATCH, seed=0), batch_size=2, prefetch=3, workers=2
    ) as loader:
        loader.next_batch()
        time.sleep(0.3)  # ample time to run ahead if nothing stopped it
        stats = loader.stats()
    # 1 batch handed out + at most 3 ready or in the making.
    assert stats["patches"] == 2
    assert loader._pipe.patches_made <= (1 + 3) * 2


def test_weight_maps_required_or_left_out(tmp_path: Path) -> None:
    loc_a, *_ = make_shard(tmp_path / "a.zarr", weight=True)
    loc_b, *_ = make_shard(tmp_path / "b.zarr", weight=False)
    shards = open_shards([loc_a, loc_b], num_classes=3, patch_size=PATCH)
    with pytest.raises(ConfigError, match=r"b\.zarr"):
        PatchLoader(UniformSampler(shards, PATCH, seed=0), batch_size=2, weights=True)
    with PatchLoader(UniformSampler(shards, PATCH, seed=0), batch_size=2) as loader:
        assert loader.next_batch().weight is None  # not every shard has one
    with pytest.raises(ConfigError, match="batch_size"):
        PatchLoader(UniformSampler(shards, PATCH, seed=0), batch_size=0)
