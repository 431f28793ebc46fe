"""Labels and probabilities computed next to the network, against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilewise.pipeline.postprocess import (
    argmax_classes,
    background_arrays,
    labels_from_scores,
    labels_tensor,
    probabilities_from_scores,
)


def test_labels_are_the_first_maximum_like_numpy() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, (4, 30, 40)).astype(np.float32)  # many ties
    assert np.array_equal(labels_from_scores(scores, "uint8"), np.argmax(scores, axis=0))
    assert labels_from_scores(scores, "uint16").dtype == np.uint16
    one = rng.normal(size=(1, 8, 8)).astype(np.float32)
    assert np.array_equal(labels_from_scores(one, "uint8"), (one[0] > 0).astype(np.uint8))
    assert labels_tensor(torch.from_numpy(scores), "uint8").dtype == torch.uint8


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_argmax_classes_equals_torch_argmax_with_ties_and_nans(classes: int) -> None:
    rng = np.random.default_rng(classes)
    for trial in range(20):
        scores = rng.integers(-2, 3, (classes, 17, 23)).astype(np.float32)  # many ties
        if trial % 2:
            scores[rng.random(scores.shape) < 0.1] = np.nan  # NaN wins, the first one
        t = torch.from_numpy(scores)
        expected = torch.argmax(t, dim=0)
        assert torch.equal(argmax_classes(t), expected)
        assert torch.equal(argmax_classes(t, torch.uint8), expected.to(torch.uint8))


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_probabilities_equal_a_float64_softmax_to_the_storage_precision(dtype: str) -> None:
    rng = np.random.default_rng(1)
    s = (rng.normal(size=(3, 20, 20)) * 4).astype(np.float32)
    e = np.exp(s.astype(np.float64) - s.max(axis=0))
    p = e / e.sum(axis=0)
    got = probabilities_from_scores(s, dtype)
    assert got.dtype == np.dtype(dtype)
    if dtype == "uint8":
        assert np.abs(got.astype(int) - np.rint(p * 255)).max() <= 1
    else:
        assert np.abs(got.astype(np.float64) - p).max() < 1e-3
    sig = probabilities_from_scores(s[:1], "float16").astype(np.float64)
    assert np.abs(sig - 1 / (1 + np.exp(-s[:1].astype(np.float64)))).max() < 1e-3


def test_background_is_the_class_with_probability_one() -> None:
    labels, probs = background_arrays(3, 4, 5, 2, "uint8", "uint8")
    assert labels is not None and probs is not None
    assert (labels == 2).all() and (probs[2] == 255).all() and (probs[:2] == 0).all()
    labels, probs = background_arrays(1, 2, 2, 0, None, "float16")
    assert labels is None and probs is not None and (probs == 0).all()
