import numpy as np
import pytest

from segserve.tools.scoring import binary_iou, class_iou, confusion_matrix, mean_iou, pixel_accuracy


def test_confusion_rows_are_truth_columns_prediction():
    truth = np.array([[0, 0, 1, 1]], np.uint8)
    predicted = np.array([[0, 1, 1, 1]], np.uint8)
    matrix = confusion_matrix(truth, predicted, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    iou = class_iou(matrix)
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(2 / 3) and np.isnan(iou[2])
    assert mean_iou(truth, predicted, 3) == pytest.approx((0.5 + 2 / 3) / 2)  # the absent class does not count
    assert pixel_accuracy(matrix) == pytest.approx(0.75)


def test_where_keeps_only_those_pixels():
    truth = np.array([[0, 1], [1, 1]], np.uint8)
    predicted = np.array([[1, 1], [1, 1]], np.uint8)
    where = np.array([[False, True], [True, True]])
    assert mean_iou(truth, predicted, 2, where) == 1.0
    assert mean_iou(truth, predicted, 2) == pytest.approx(0.75 / 2)


def test_binary_iou():
    a = np.zeros((4, 4), bool)
    assert binary_iou(a, a) == 1.0
    b = a.copy()
    b[:2] = True
    c = a.copy()
    c[:1] = True
    assert binary_iou(b, c) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(a, a[:2], 2)
