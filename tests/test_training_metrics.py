"""Exact segmentation metrics from a confusion matrix."""

import numpy as np
import pytest
import torch

from denseclip_hf.training.metrics import confusion_matrix, segmentation_metrics


def test_confusion_matrix_and_metrics():
    labels = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
    predictions = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 3]])
    confusion = confusion_matrix(predictions, labels, num_labels=4)
    assert confusion.tolist() == [[1, 1, 0, 1], [0, 3, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    metrics = segmentation_metrics(confusion.numpy(), {0: "a", 1: "b", 2: "c", 3: "d"})
    # IoU: a = 1 / (3 + 2 - 1), b = 3 / (3 + 4 - 3), c = 0, d = 0 (predicted, never labelled).
    assert metrics["per_category_iou"] == pytest.approx({"a": 0.25, "b": 0.75, "c": 0.0, "d": 0.0})
    assert metrics["mean_iou"] == pytest.approx(0.25)
    assert metrics["per_category_accuracy"]["d"] is None
    assert metrics["mean_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert metrics["overall_accuracy"] == pytest.approx(4 / 7)
    absent = segmentation_metrics(np.diag([5, 0]), {0: "a", 1: "b"})
    assert absent["per_category_iou"]["b"] is None and absent["mean_iou"] == 1.0
