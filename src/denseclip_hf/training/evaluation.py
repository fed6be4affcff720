"""Evaluation: a model's class-id predictions under an explicit test protocol, and their confusion matrix, exact across
processes.

[`predict_label_maps`] is the one place where evaluation runs the model on images: the validation of a training run
(periodic and final), its prediction grid, and `examples/evaluate_seg.py` all go through it, each with an
[`EvaluationProtocol`] (sliding windows or the whole image, one scale or several, flips) that it states explicitly.

Batching: every image runs at its own size, nothing is padded. Images whose inputs have the same sizes at every scale
(and the same label size) share one `predict_probabilities` call, which is exact: in eval mode no layer mixes the
samples of a batch (BatchNorm uses its stored statistics), so a batch gives each image what it gets alone. Images of
other sizes run in their own calls. A multi-scale test prepares each image at every ratio (`scale_ratios`); images of
one original size have the same size at every ratio, so they share one call over all scales and flips.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, extract_model_from_parallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..configuration_denseclip import DenseClipConfig, resolve_test_protocol
from ..image_processing_denseclip import DenseClipImageProcessor
from .data import EvaluationCollator
from .metrics import confusion_matrix


@dataclass(frozen=True)
class EvaluationProtocol:
    """How evaluation runs the model (the arguments of `DenseClipForSemanticSegmentation.predict_probabilities`).

    Attributes:
        mode: `"slide"` (windows of `crop_size` every `stride` pixels) or `"whole"` (one pass per image).
        crop_size, stride: `(height, width)` of the windows and of their step; `None` under `"whole"`.
        scale_ratios: Ratios of the processor's `size` at which each image is prepared (the authors' multi-scale test:
            `MULTI_SCALE_RATIOS`); `None` for a single scale, the processor's `size` itself.
        flip: Also run each input mirrored horizontally and average.
    """

    mode: str
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scale_ratios: tuple[float, ...] | None = None
    flip: bool = False

    @classmethod
    def for_model(
        cls,
        config: DenseClipConfig,
        mode: str | None = None,
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        scale_ratios: Sequence[float] | None = None,
        flip: bool = False,
        owner: str = "EvaluationProtocol",
        names: tuple[str, str, str] = ("mode", "crop_size", "stride"),
    ) -> "EvaluationProtocol":
        """The protocol of a model with `config` (a `DenseClipConfig`), by the rule the model itself follows
        (`resolve_test_protocol`: its `test_mode`, `test_crop_size` and `test_stride`, each replaced by the value given
        here; a `crop_size` given without a `stride` gets the authors' stride for it, two thirds of the crop). A
        `ValueError` names the setting (`names` of mode, crop size and stride, as seen by `owner`) and the fix."""
        mode, crop, steps = resolve_test_protocol(
            config, mode, _int_or_pair(crop_size), _int_or_pair(stride), owner=owner, names=names
        )
        if scale_ratios is not None:
            scale_ratios = tuple(float(ratio) for ratio in scale_ratios)
            if not scale_ratios or min(scale_ratios) <= 0:
                raise ValueError(f"{owner}: scale ratios must be positive numbers, got {list(scale_ratios)}.")
        if mode == "whole":
            crop = steps = None
        return cls(mode=mode, crop_size=crop, stride=steps, scale_ratios=scale_ratios, flip=bool(flip))

    def to_dict(self) -> dict:
        """JSON-ready settings: `{"mode", "crop_size", "stride", "scale_ratios", "flip"}` (pairs as lists)."""
        return {
            "mode": self.mode,
            "crop_size": None if self.crop_size is None else list(self.crop_size),
            "stride": None if self.stride is None else list(self.stride),
            "scale_ratios": None if self.scale_ratios is None else list(self.scale_ratios),
            "flip": self.flip,
        }

    def describe(self) -> str:
        """One line for logs, e.g. `slide 640x640 windows, stride 426x426, 6 scales, flip`."""
        if self.mode == "slide":
            text = f"slide {self.crop_size[0]}x{self.crop_size[1]} windows, stride {self.stride[0]}x{self.stride[1]}"
        else:
            text = "whole image"
        scales = "single scale" if self.scale_ratios is None else f"scales {list(self.scale_ratios)}"
        return f"{text}, {scales}" + (", flip" if self.flip else "")


def _int_or_pair(value: int | Sequence[int] | None) -> int | list[int] | None:
    """A flag value `512`, `[512]` or `[512, 683]` as an int or a `[height, width]` list (`None` stays)."""
    if value is None or isinstance(value, int):
        return value
    value = list(value)
    return value[0] if len(value) == 1 else value


@torch.no_grad()
def predict_label_maps(
    model: torch.nn.Module,
    pixel_values: Sequence[Sequence[torch.Tensor]],
    output_sizes: Sequence[tuple[int, int]],
    protocol: EvaluationProtocol,
) -> list[torch.Tensor]:
    """Class-id maps `(H_i, W_i)` at `output_sizes` by `protocol`: `predict_probabilities(...).argmax(1)`.

    `pixel_values[i]` holds image `i` prepared at each scale of the protocol, `(3, h_s, w_s)` tensors (one for a
    single scale), as [`EvaluationCollator`] gives them. Images with the same input sizes at every scale and the same
    output size share a call (exact; see the module docstring). `model` may be wrapped by Accelerate (DDP,
    `torch.compile`); it runs in the mode it is in (call `model.eval()` first).
    """
    segmenter = extract_model_from_parallel(model)
    groups: dict[tuple, list[int]] = {}
    for index, (scales, size) in enumerate(zip(pixel_values, output_sizes, strict=True)):
        groups.setdefault((tuple(tuple(pixels.shape) for pixels in scales), tuple(size)), []).append(index)
    predictions: list[torch.Tensor | None] = [None] * len(pixel_values)
    for (shapes, size), indices in groups.items():
        inputs = [torch.stack([pixel_values[index][scale] for index in indices]) for scale in range(len(shapes))]
        probabilities = segmenter.predict_probabilities(
            inputs, size, flip=protocol.flip, mode=protocol.mode, crop_size=protocol.crop_size, stride=protocol.stride
        )
        for index, label_map in zip(indices, probabilities.argmax(1), strict=True):
            predictions[index] = label_map
    return predictions


def predict_examples(
    model: torch.nn.Module,
    examples: Sequence[dict],
    image_processor: DenseClipImageProcessor,
    protocol: EvaluationProtocol,
    device: torch.device | str | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ground truth and predictions `(H, W)` int64 of dataset examples (`image`, `label` columns) by `protocol`,
    for pictures: the label maps as the evaluation reads them (reduced if the processor reduces labels) and
    [`predict_label_maps`] at their size. The model is left in the mode it came in."""
    batch = EvaluationCollator(image_processor, scale_ratios=protocol.scale_ratios)(list(examples))
    pixel_values = [[pixels.to(device) for pixels in scales] for scales in batch["pixel_values"]]
    was_training = model.training
    model.eval()
    predictions = predict_label_maps(model, pixel_values, [tuple(label.shape) for label in batch["labels"]], protocol)
    model.train(was_training)
    return [label.numpy() for label in batch["labels"]], [prediction.cpu().numpy() for prediction in predictions]


def share_main_process_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Copies the main process's buffers into every process's model (a no-op with one process).

    A DDP forward first broadcasts the main process's buffers: BatchNorm statistics, which without SyncBatchNorm (CPU)
    each process updates from its own batches. Evaluation calls the model's own methods (no DDP forward, whose
    collectives would need the same number of calls on every process), so it does that first: every process then
    evaluates the model that the main process saves."""
    if accelerator.num_processes > 1:
        for buffer in extract_model_from_parallel(model).buffers():
            broadcast(buffer, from_process=0)


def evaluate(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    protocol: EvaluationProtocol,
    num_labels: int,
    ignore_index: int,
    progress: str | None = None,
) -> np.ndarray:
    """The confusion matrix `(num_labels, num_labels)` int64 over the whole dataset by `protocol`, on every process.

    `dataloader` yields [`EvaluationCollator`] batches at the protocol's scales (prepared by Accelerate); predictions
    come from [`predict_label_maps`] at the original label size. Each process counts its images;
    `gather_for_metrics` drops the samples repeated to even out the last batch, so the counts are exactly those of one
    pass over the data. Every process first takes the main process's buffers (as a DDP forward would). With
    `progress` (a description), the local main process shows a progress bar over its batches. The model is left in
    the mode (train / eval) it came in.
    """
    share_main_process_buffers(model, accelerator)
    was_training = model.training
    model.eval()
    total = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=accelerator.device)
    batches = tqdm(dataloader, desc=progress, disable=progress is None or not accelerator.is_local_main_process)
    for batch in batches:
        labels = batch["labels"]
        sizes = [tuple(label.shape) for label in labels]
        predictions = predict_label_maps(model, batch["pixel_values"], sizes, protocol)
        per_image = torch.stack(
            [confusion_matrix(p, t, num_labels, ignore_index) for p, t in zip(predictions, labels, strict=True)]
        )
        total += accelerator.gather_for_metrics(per_image).sum(dim=0)
    model.train(was_training)
    return total.cpu().numpy()


__all__ = ["EvaluationProtocol", "evaluate", "predict_examples", "predict_label_maps", "share_main_process_buffers"]
