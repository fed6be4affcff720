"""Tensor operations shared by the DenseCLIP model, its losses and its test protocol.

Shipped with saved models as remote code: imports torch only.
"""

import torch
import torch.nn.functional as F


def resize_bilinear(hidden_states: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """`(batch, channels, h, w)` -> `(batch, channels, *size)`, bilinear with `align_corners=False` (mmseg's
    `resize`); a no-op when the size already matches."""
    if tuple(hidden_states.shape[-2:]) == tuple(size):
        return hidden_states
    return F.interpolate(hidden_states, size=size, mode="bilinear", align_corners=False)


def channels_last_float(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits `(batch, classes, h, w)` in channels-last memory: each pixel's classes one contiguous row. On CPU
    the test protocol's full-resolution steps are faster so (dividing 150x512x683 slide sums by the window count: 15
    instead of 330 ms), and the loss soft-maxes along the rows; the values are the same as in channels-first memory.
    """
    return logits.float().contiguous(memory_format=torch.channels_last)
