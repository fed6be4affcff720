"""Tensor operations shared by the DenseCLIP model, its losses and its test protocol.

Shipped with saved models as remote code: imports torch only.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true


def same_size(size: Sequence[int], other: Sequence[int]) -> bool:
    """Whether two `(height, width)` sizes are equal. Under `torch.export` with dynamic sizes (symbolic ints): True
    only where they are equal for every input size, so that an exported graph keeps a resize (exact where the sizes
    turn out equal) instead of baking in the example input's decision; eager sizes are ints, compared as usual."""
    return all(statically_known_true(side == other_side) for side, other_side in zip(size, other, strict=True))


def resize_bilinear(hidden_states: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """`(batch, channels, h, w)` -> `(batch, channels, *size)`, bilinear with `align_corners=False` (mmseg's
    `resize`); a no-op when the size already matches (`same_size`)."""
    if same_size(hidden_states.shape[-2:], size):
        return hidden_states
    return F.interpolate(hidden_states, size=size, mode="bilinear", align_corners=False)


def channels_last_float(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits `(batch, classes, h, w)` in channels-last memory: each pixel's classes one contiguous row. On CPU
    the test protocol's full-resolution steps are faster so (dividing 150x512x683 slide sums by the window count: 15
    instead of 330 ms), and the loss soft-maxes along the rows; the values are the same as in channels-first memory.
    """
    return logits.float().contiguous(memory_format=torch.channels_last)
