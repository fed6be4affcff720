"""DenseCLIP's losses on the score map and the segmentation decoder: the per-pixel cross-entropy of the decoder and of
the identity loss on the score map (Eq. 7), and the detection objective on the score map (Eq. 8). The detectors'
heads have theirs in `loss_denseclip_detection.py`.

Shipped with saved models as remote code (the model's forward computes its loss).
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .tensor_ops import channels_last_float, resize_bilinear

# How per-pixel losses are averaged (`DenseClipConfig.loss_reduction`), each name with what it means.
LOSS_REDUCTIONS = {
    "mean_non_ignored": "the mean over the labelled pixels (PyTorch's and transformers' convention)",
    "mean_all_pixels": "the mean over all pixels, ignored ones counting as zero (mmseg 0.x, the authors')",
}


def check_labels(labels: Any, batch: int, num_labels: int, ignore_index: int) -> torch.Tensor:
    """The entry check of `labels`: an integer tensor `(batch, height, width)` of class ids in `0..num_labels-1` or
    `ignore_index` (one min/max reduction); returns it as int64. Otherwise a `TypeError` / `ValueError`."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of class ids (torch.long), got {kind}.")
    if labels.ndim != 3 or labels.shape[0] != batch or labels.numel() == 0:
        raise ValueError(
            f"labels must have shape (batch={batch}, height, width) with non-zero sides, got {tuple(labels.shape)}."
        )
    labels = labels.long()
    valid = labels.masked_fill(labels == ignore_index, 0)
    low, high = torch.stack(torch.aminmax(valid)).tolist()  # one reduction, one host sync
    if low < 0 or high >= num_labels:
        bad = torch.unique(valid[(valid < 0) | (valid >= num_labels)])[:10].tolist()
        raise ValueError(
            f"labels hold class ids {bad} outside the valid range 0..{num_labels - 1} ({num_labels} classes); "
            f"mark pixels to ignore with semantic_loss_ignore_index={ignore_index}, or remap the label values "
            "(e.g. reduce_labels for ADE20K)."
        )
    return labels


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Cross-entropy of `logits` `(batch, classes, h, w)`, bilinearly resized to `labels` `(batch, H, W)`.

    `reduction="mean_non_ignored"` averages over labelled pixels; `"mean_all_pixels"` over all pixels (mmseg 0.x).
    """
    losses = UpsampledCrossEntropy.apply(logits, labels, ignore_index)
    if reduction == "mean_all_pixels":
        return losses.mean()
    return losses.sum() / (labels != ignore_index).sum().clamp(min=1)


def _classes_last(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """`(batch, classes, h, w)` -> float32 logits bilinearly resized to `size`, classes last `(batch, H, W, classes)`:
    resized in channels-last memory, so that each pixel's classes are one contiguous row (1.5x faster to soft-max on
    CPU than the channel dimension of a `(batch, classes, H, W)` tensor)."""
    return resize_bilinear(channels_last_float(logits), size).permute(0, 2, 3, 1)


class UpsampledCrossEntropy(torch.autograd.Function):
    """Per-pixel cross-entropy of logits `(batch, classes, h, w)` bilinearly resized to `labels` `(batch, H, W)` ->
    losses `(batch, H, W)`, 0 where `labels == ignore_index`; the values and gradients of `F.cross_entropy` on the
    resized logits.

    The full-resolution logits (ADE20K: 150 x 512 x 512 floats, 157 MB per image and loss) are not kept for the
    backward pass: it keeps the small logits, recomputes the resize one image at a time and forms the gradient
    softmax - one-hot in place.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        ignored = labels == ignore_index
        targets = labels.masked_fill(ignored, 0).unsqueeze(-1)
        losses = [
            -_classes_last(logits[image : image + 1], labels.shape[-2:])
            .log_softmax(-1)
            .gather(-1, targets[image : image + 1])
            for image in range(logits.shape[0])
        ]
        ctx.save_for_backward(logits, targets, ignored)
        return torch.cat(losses).squeeze(-1).masked_fill_(ignored, 0)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, ignored = ctx.saved_tensors
        grad_losses = grad_losses.masked_fill(ignored, 0).unsqueeze(-1)
        gradients = []
        for image in range(logits.shape[0]):
            with torch.enable_grad():
                leaf = logits[image : image + 1].detach().requires_grad_()
                rows = _classes_last(leaf, targets.shape[1:3])
            one = slice(image, image + 1)
            grad_rows = rows.detach().softmax(-1)
            grad_rows.scatter_add_(-1, targets[one], torch.full(targets[one].shape, -1.0, device=grad_rows.device))
            gradients.append(torch.autograd.grad(rows, leaf, grad_rows.mul_(grad_losses[one]))[0])
        return torch.cat(gradients), None, None


def detection_targets(
    boxes: torch.Tensor, labels: torch.Tensor, num_labels: int, size: tuple[int, int], stride: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """The binary targets y~ of Eq. 8 for one image, on its stride-`stride` grid of `size` = `(H4, W4)` cells.

    `boxes` `(num_boxes, 4)` are `(x1, y1, x2, y2)` in input pixels, `labels` `(num_boxes,)` class ids `0..K-1`.
    Returns `targets` `(H4 * W4, K)` (float; row-major cells) and `mask` `(H4 * W4,)` (bool). The authors' rule (their
    `build_seg_target`): each coordinate is divided by `stride`, truncated to an integer and clamped to the grid
    (`0..W4-1` for x, `0..H4-1` for y), and the box covers the cells `x1' <= j < x2'`, `y1' <= i < y2'` (so a box
    reaching the right or bottom border leaves the last column or row out, as theirs does). `targets[cell, k]` is 1
    when the cell is inside a box of class k; `mask` is True inside any box (the pixels outside all boxes are
    ignored).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"boxes must be (num_boxes, 4) as (x1, y1, x2, y2) and labels (num_boxes,), got {tuple(boxes.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_labels):
        raise ValueError(f"labels must be class ids in 0..{num_labels - 1}, got {labels.tolist()}.")
    cells = (boxes.double() / stride).long()  # truncated toward zero, as the authors' `.long()`
    cells_x, cells_y = cells[:, 0::2].clamp(0, size[1] - 1), cells[:, 1::2].clamp(0, size[0] - 1)
    rows = torch.arange(size[0], device=boxes.device)[None]
    columns = torch.arange(size[1], device=boxes.device)[None]
    inside_y = (rows >= cells_y[:, :1]) & (rows < cells_y[:, 1:])  # (num_boxes, H4)
    inside_x = (columns >= cells_x[:, :1]) & (columns < cells_x[:, 1:])  # (num_boxes, W4)
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1).float()  # (num_boxes, H4 * W4)
    classes = F.one_hot(labels.long(), num_labels).float()  # (num_boxes, K)
    targets = (inside.T @ classes).clamp(max=1)
    return targets, inside.sum(0) > 0


def detection_score_map_loss(
    score_map: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    image_size: tuple[int, int],
    temperature: float = 0.07,
    stride: int = 4,
) -> torch.Tensor:
    """The auxiliary detection objective of Eq. 8: BCE(sigmoid(s / tau), y~), a scalar.

    `score_map` `(batch, K, h, w)` is `DenseClipModelOutput.score_map` (or `DenseClipBackbone`'s); `boxes[b]`
    `(num_boxes_b, 4)` `(x1, y1, x2, y2)` in pixels of the `(batch, 3, *image_size)` input, `labels[b]`
    `(num_boxes_b,)`. As in the authors' detection code, the score map is divided by `temperature` first, then
    bilinearly resized to the stride-`stride` grid `(H4, W4) = image_size // stride`; the targets are
    `detection_targets`; the binary cross-entropy is summed over the cells inside a box (all K channels) and divided
    by the number of those (cell, class) pairs. An image without boxes contributes nothing.

    A batch without any box gives 0 (with gradients, all zero), where the authors' code divides 0 by 0 and returns
    NaN: mmdet's COCO loader keeps images whose annotations are all crowd boxes (ignored boxes, not gt boxes) or all
    skipped as degenerate (width or height below 1 pixel), so such a batch can occur in COCO training, and one NaN
    loss would turn every weight into NaN through the gradient clipping and the optimizer step. With at least one box
    the value is the authors'.
    """
    if score_map.ndim != 4 or len(boxes) != score_map.shape[0] or len(labels) != score_map.shape[0]:
        raise ValueError(
            f"score_map must be (batch, K, h, w) with one boxes and one labels tensor per image, got "
            f"{tuple(score_map.shape)}, {len(boxes)} boxes and {len(labels)} labels."
        )
    batch, num_labels = score_map.shape[:2]
    size = (image_size[0] // stride, image_size[1] // stride)
    logits = (
        resize_bilinear(score_map.float() / temperature, size).flatten(2).transpose(1, 2)
    )  # Eq. 8: s / tau, (b, H4W4, K)
    targets, masks = zip(
        *(detection_targets(box, label, num_labels, size, stride) for box, label in zip(boxes, labels, strict=True)),
        strict=True,
    )
    targets, masks = torch.stack(targets).to(logits.device), torch.stack(masks).to(logits.device)
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # Eq. 8
    return (losses * masks[..., None]).sum() / (masks.sum() * num_labels).clamp(min=1)
