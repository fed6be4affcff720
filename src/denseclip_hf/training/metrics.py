"""Exact semantic segmentation metrics from a confusion matrix (no network, unlike `evaluate.load("mean_iou")`).

The confusion matrix counts pixels: entry `[g, p]` is the number of pixels of ground-truth class `g` predicted as
class `p`; ignored pixels and labels outside `[0, num_labels)` are left out. Matrices add up across batches and
processes, so the metrics of a distributed evaluation are exactly those of a single pass over the data.
"""

import math

import numpy as np
import torch

from ..configuration_denseclip import IGNORE_INDEX


def confusion_matrix(
    predictions: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pixel confusion matrix `(num_labels, num_labels)` int64 of `predictions` against `labels`, same shape each."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape.")
    labels = labels.long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_labels)
    pairs = labels[valid] * num_labels + predictions.long()[valid]
    return torch.bincount(pairs, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def segmentation_metrics(confusion: np.ndarray, id2label: dict[int, str] | None = None) -> dict:
    """mIoU, mean class accuracy, pixel accuracy and per-class values from a confusion matrix `(classes, classes)`.

    A class absent from both the ground truth and the predictions has IoU `None` (NaN) and is left out of the means,
    as in mmseg and `evaluate`'s `mean_iou`; a class absent from the ground truth has accuracy `None`.

    Returns:
        `{"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"}`, the per-class
        entries as `{class name: value or None}` (names from `id2label`, else the class index as a string).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positives = np.diag(confusion)
    ground_truth = confusion.sum(axis=1)
    union = ground_truth + confusion.sum(axis=0) - true_positives
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positives / union, np.nan)
        accuracy = np.where(ground_truth > 0, true_positives / ground_truth, np.nan)
    names = [(id2label or {}).get(label, str(label)) for label in range(len(confusion))]
    return {
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(accuracy),
        "overall_accuracy": float(true_positives.sum() / ground_truth.sum()) if ground_truth.sum() else None,
        "per_category_iou": {name: _none_if_nan(value) for name, value in zip(names, iou, strict=True)},
        "per_category_accuracy": {name: _none_if_nan(value) for name, value in zip(names, accuracy, strict=True)},
    }


def _nanmean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _metric_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """`(class, IoU %, accuracy %)` per class, then `("mean", mIoU %, mean accuracy %)`."""
    rows = [
        (name, _percent(iou), _percent(metrics["per_category_accuracy"][name]))
        for name, iou in metrics["per_category_iou"].items()
    ]
    return [*rows, ("mean", _percent(metrics["mean_iou"]), _percent(metrics["mean_accuracy"]))]


def format_metrics_table(metrics: dict) -> str:
    """A text table of per-class IoU and accuracy (in %) followed by the means, for logs."""
    rows = _metric_rows(metrics)
    width = max(len("class"), *(len(name) for name, _, _ in rows))
    rule = f"{'-' * width}-+--------+-------"
    lines = [f"{'class':<{width}} |    IoU |    Acc", rule]
    lines += [f"{name:<{width}} | {iou:>6} | {accuracy:>6}" for name, iou, accuracy in rows[:-1]]
    lines += [rule, f"{rows[-1][0]:<{width}} | {rows[-1][1]:>6} | {rows[-1][2]:>6}"]
    lines.append(f"pixel accuracy: {_percent(metrics['overall_accuracy'])}%")
    return "\n".join(lines)


def format_metrics_markdown(metrics: dict) -> str:
    """The same table in Markdown: one row per class, then the means and the pixel accuracy in bold."""
    rows = _metric_rows(metrics)
    lines = ["| class | IoU (%) | accuracy (%) |", "|---|---:|---:|"]
    lines += [f"| {name} | {iou} | {accuracy} |" for name, iou, accuracy in rows[:-1]]
    lines.append(f"| **mean** | **{rows[-1][1]}** | **{rows[-1][2]}** |")
    lines.append(f"| **pixel accuracy** | | **{_percent(metrics['overall_accuracy'])}** |")
    return "\n".join(lines) + "\n"


__all__ = ["confusion_matrix", "format_metrics_markdown", "format_metrics_table", "segmentation_metrics"]
