"""How good a mask is against the truth: one confusion matrix, and the IoU read from it.

`make evaluate` (model/evaluate.py), `make bench-tiling` (bench/tiling.py) and the tests all score masks
here, so a figure in the docs and the threshold in a test mean the same thing.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int,
                     where: np.ndarray | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class.

    `where` (a boolean array of the masks' shape) keeps only those pixels, e.g. a band around tile seams.
    """
    if truth.shape != predicted.shape:
        raise ValueError(f"truth {truth.shape} and prediction {predicted.shape} differ in shape")
    if where is not None:
        truth, predicted = truth[where], predicted[where]
    truth, predicted = truth.ravel().astype(np.int64), predicted.ravel().astype(np.int64)
    return np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def class_iou(matrix: np.ndarray) -> np.ndarray:
    """Per-class intersection over union from a confusion matrix; NaN for a class in neither mask."""
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - hits
    return np.divide(hits, union, out=np.full_like(hits, np.nan), where=union > 0)


def mean_iou(truth: np.ndarray, predicted: np.ndarray, num_classes: int, where: np.ndarray | None = None) -> float:
    """Mean IoU over the classes present in the truth or the prediction."""
    return float(np.nanmean(class_iou(confusion_matrix(truth, predicted, num_classes, where))))


def binary_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    iou = class_iou(confusion_matrix(truth.astype(np.uint8), predicted.astype(np.uint8), 2))[1]
    return 1.0 if np.isnan(iou) else float(iou)


def pixel_accuracy(matrix: np.ndarray) -> float:
    """Share of pixels whose predicted class is the true one."""
    return float(np.diag(matrix).sum() / matrix.sum())
