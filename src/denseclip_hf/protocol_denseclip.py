"""DenseCLIP's test protocol (the authors' mmseg `slide_inference`, `whole_inference`, `inference` and `aug_test`):
how a segmentation model that maps an image to low-resolution logits is run on a whole image, in sliding windows, at
several scales and mirrored, to give logits or probabilities at the image's resolution.

Module-level functions over `logits_fn(pixel_values) -> logits`: any callable that maps `(n, 3, h, w)` inputs to logits
`(n, num_labels, h', w')` at any resolution (the model's single pass gives h' = h / 4). Which protocol and window a
model runs by default is a setting (`DenseClipConfig.test_mode`, `test_crop_size`, `test_stride`; one rule resolves
them: `configuration_denseclip.resolve_test_protocol`). Shipped with saved models as remote code.
"""

from collections.abc import Callable, Sequence

import torch

from .sliding_windows import window_accumulation
from .tensor_ops import channels_last_float, resize_bilinear

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def slide_logits(
    logits_fn: LogitsFn, pixel_values: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """The authors' `slide_inference`: logits `(batch, num_labels, H, W)` at the input resolution.

    `pixel_values` `(batch, 3, H, W)` is cut into windows of `crop_size` every `stride` pixels (see
    `sliding_windows`; a side shorter than the crop is taken whole, so every window has the same size). Each window
    runs through `logits_fn` on its own (with the whole batch of images), as in the authors' loop: a batch of windows
    computes the same values, but its larger activations each take fresh memory from the system (on this CPU, RN50
    on a 512x683 image: 1.6 instead of 0.8 GB of new pages, 12% more CPU time). Each window's logits are bilinearly
    resized to the window, summed into place and divided by the number of windows covering each pixel. Accumulated
    in float32, channels-last.

    The full-resolution logits are touched no more than the sum needs (`window_accumulation`): a single window (an
    image no larger than the crop) is the result as it is resized; otherwise each window's region is copied where no
    earlier window wrote and added where one did, and only pixels under more than one window are divided. The same
    values as the authors' zero-filled sum divided everywhere (`0 + w == w`, `w / 1 == w`).
    """
    batch, _, height, width = pixel_values.shape
    window, corners, writes, divisions = window_accumulation(height, width, crop_size, stride)
    summed = None
    for (top, left), parts in zip(corners, writes, strict=True):
        crop = pixel_values[..., top : top + window[0], left : left + window[1]]
        logits = resize_bilinear(channels_last_float(logits_fn(crop)), window)
        if len(corners) == 1:
            return logits
        if summed is None:
            summed = torch.empty(
                (batch, logits.shape[1], height, width),
                dtype=logits.dtype,
                device=logits.device,
                memory_format=torch.channels_last,
            )
        for add, (row_begin, row_end, col_begin, col_end) in parts:
            source = logits[..., row_begin - top : row_end - top, col_begin - left : col_end - left]
            target = summed[..., row_begin:row_end, col_begin:col_end]
            target.add_(source) if add else target.copy_(source)
        del logits  # its memory goes back before the next window's
    for (row_begin, row_end, col_begin, col_end), count in divisions:
        summed[..., row_begin:row_end, col_begin:col_end].div_(count)
    return summed


def protocol_logits(
    logits_fn: LogitsFn,
    pixel_values: torch.Tensor,
    mode: str,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """Logits `(batch, num_labels, H, W)` at the input resolution: `mode="slide"` is `slide_logits`, `"whole"` the
    authors' `whole_inference` (one pass, logits bilinearly resized to the input)."""
    if mode == "slide":
        return slide_logits(logits_fn, pixel_values, crop_size, stride)
    return resize_bilinear(channels_last_float(logits_fn(pixel_values)), pixel_values.shape[-2:])


def _softmax_over_classes(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of channels-last `(batch, classes, H, W)` logits, computed along the contiguous rows."""
    return logits.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)


def protocol_probabilities(
    logits_fn: LogitsFn,
    inputs: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    flip: bool,
    mode: str,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """The authors' `inference` / `aug_test`: softmax probabilities `(batch, num_labels, *output_size)` (in
    channels-last memory, see `tensor_ops.channels_last_float`).

    For each input `(batch, 3, H_i, W_i)` (the scales of a multi-scale test), and with `flip` also for its horizontal
    mirror: `protocol_logits`, bilinearly resized (align_corners=False) to `output_size`, soft-maxed over the classes
    (a mirrored input's probabilities mirrored back); the average of all of them, summed in the authors' order.
    """
    total, count = None, 0
    for pixel_values in inputs:
        for mirrored in (False, True) if flip else (False,):
            view = pixel_values.flip(-1) if mirrored else pixel_values
            logits = resize_bilinear(protocol_logits(logits_fn, view, mode, crop_size, stride), output_size)
            probabilities = _softmax_over_classes(logits)
            probabilities = probabilities.flip(-1) if mirrored else probabilities
            total = probabilities if total is None else total.add_(probabilities)
            count += 1
    return total.div_(count)
