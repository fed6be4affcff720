"""Validation: class-id predictions of a model and their confusion matrix, exact across processes.

[`predict_label_maps`] is the one place where validation (and the training run's prediction grid) runs the model on
images, so that the test protocol is chosen there for every caller.
"""

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..image_processing_denseclip import DenseClipImageProcessor
from .metrics import confusion_matrix


@torch.no_grad()
def predict_label_maps(
    model: torch.nn.Module,
    pixel_values: list[torch.Tensor],
    target_sizes: list[tuple[int, int]],
    image_processor: DenseClipImageProcessor,
) -> list[torch.Tensor]:
    """Class-id maps `(H_i, W_i)` at `target_sizes` of preprocessed images `(3, h_i, w_i)`.

    Whole-image inference: images of equal size share a forward, whose logits the processor's post-processing resizes
    (bilinear) to each target size before the argmax.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, pixels in enumerate(pixel_values):
        by_shape.setdefault(tuple(pixels.shape), []).append(index)
    predictions: list[torch.Tensor | None] = [None] * len(pixel_values)
    for indices in by_shape.values():
        outputs = model(pixel_values=torch.stack([pixel_values[index] for index in indices]))
        sizes = [target_sizes[index] for index in indices]
        for index, label_map in zip(
            indices, image_processor.post_process_semantic_segmentation(outputs, target_sizes=sizes), strict=True
        ):
            predictions[index] = label_map
    return predictions


def evaluate(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    image_processor: DenseClipImageProcessor,
    num_labels: int,
    ignore_index: int,
) -> np.ndarray:
    """The validation confusion matrix `(num_labels, num_labels)` over the whole dataset, on every process.

    `dataloader` yields [`EvaluationCollator`] batches (prepared by Accelerate); predictions come from
    [`predict_label_maps`] at the original label size. Each process counts its images; `gather_for_metrics` drops the
    samples repeated to even out the last batch, so the counts are exactly those of one pass over the data. The model
    is left in the mode (train / eval) it came in.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=accelerator.device)
    for batch in dataloader:
        labels = batch["labels"]
        predictions = predict_label_maps(
            model, batch["pixel_values"], [tuple(label.shape) for label in labels], image_processor
        )
        per_image = torch.stack(
            [confusion_matrix(p, t, num_labels, ignore_index) for p, t in zip(predictions, labels, strict=True)]
        )
        total += accelerator.gather_for_metrics(per_image).sum(dim=0)
    model.train(was_training)
    return total.cpu().numpy()


__all__ = ["evaluate", "predict_label_maps"]
