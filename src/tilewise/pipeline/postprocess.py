"""From stitched scores to what is stored: class labels and probabilities."""

from __future__ import annotations

import numpy as np

__all__ = ["labels_from_scores", "probabilities_from_scores"]


def labels_from_scores(scores: np.ndarray, dtype: str) -> np.ndarray:
    """Arg-max class per pixel of (K, h, w) scores; one score map means "score > 0"."""
    if scores.shape[0] == 1:
        return (scores[0] > 0).astype(dtype)
    return np.argmax(scores, axis=0).astype(dtype)


def probabilities_from_scores(scores: np.ndarray, dtype: str) -> np.ndarray:
    """Softmax over classes (sigmoid for one score map) as float16 or uint8 (p * 255, rounded)."""
    s = scores.astype(np.float32)
    if s.shape[0] == 1:
        p = 1.0 / (1.0 + np.exp(-s))
    else:
        e = np.exp(s - s.max(axis=0, keepdims=True))
        p = e / e.sum(axis=0, keepdims=True)
    if dtype == "uint8":
        return np.rint(p * 255.0).astype(np.uint8)
    return p.astype(np.float16)
