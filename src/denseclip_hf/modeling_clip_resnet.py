"""CLIP's ResNet image tower ("ModifiedResNet", Radford et al. 2021) and the building blocks it shares with DenseCLIP.

pixels -> 3-convolution stem (stride 4) -> 4 stages of anti-aliased bottlenecks (strides 4, 8, 16, 32) -> attention
pool over the mean token and every spatial token: the global and dense embeddings z_bar and z of DenseCLIP's Eq. 1.

transformers has CLIP's ViT but not its ResNets; DenseCLIP's segmentation and detection models, and the converters of
OpenAI / the DenseCLIP authors' checkpoints, all build this tower from a `DenseClipResNetConfig`. Shipped with saved
models as remote code. Each module with its own initialisation has `_init_denseclip_weights()` (see
`DenseClipPreTrainedModel._init_weights`).
"""

import math
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_denseclip import PYRAMID_STRIDES, DenseClipResNetConfig
from .tensor_ops import same_size


def multi_head_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Scaled dot-product attention of projected `queries` `(batch, Q, C)` over projected `keys` and `values`
    `(batch, M, C)`, split into `num_heads` heads of `C / num_heads` channels -> `(batch, Q, C)`."""

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (num_heads, -1)).transpose(1, 2)

    attended = F.scaled_dot_product_attention(heads(queries), heads(keys), heads(values))
    return attended.transpose(1, 2).flatten(2)


def resize_position_embedding(table: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resizes a positional embedding table `(1 + side * side, channels)`: row 0 (class / mean token) is kept, the
    square grid of the others is interpolated (`mode` `"bilinear"` or `"bicubic"`, align_corners=False) to `size`, or
    (`mode="crop"`, the authors' detectors) its top-left `size` part is taken -> `(1 + height * width, channels)`.
    A `ValueError` when `size` does not fit in the grid for `"crop"`."""
    side = math.isqrt(table.shape[0] - 1)
    if same_size((side, side), size):
        return table
    if mode == "crop":
        height, width = size
        if height > side or width > side:
            raise ValueError(
                f"The positional table holds a {side}x{side} grid, which position_embedding_interpolation='crop' "
                f"crops to the feature map, but the map is {height}x{width}: use smaller inputs (the authors' "
                f"detectors: at most {side} feature cells per side, e.g. 32 * {side} = {32 * side} pixels for a "
                "ResNet), or a model with a larger grid (`image_size`)."
            )
        grid = table[1:].reshape(side, side, -1)[:height, :width]
        return torch.cat([table[:1], grid.reshape(height * width, -1)])
    grid = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode=mode, align_corners=False)
    return torch.cat([table[:1], grid.flatten(2).transpose(1, 2)[0]])


@contextmanager
def _running_statistics_restored(module: nn.Module):
    """Puts the running statistics of `module`'s BatchNorms back as they were on entry when the block exits."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()) for norm in norms]
    try:
        yield
    finally:  # through `.data`: the replay's own graph keeps the statistics' tensors, whose versions must not move
        for norm, (mean, var, count) in zip(norms, saved, strict=True):
            norm.running_mean.data.copy_(mean)
            norm.running_var.data.copy_(var)
            norm.num_batches_tracked.data.copy_(count)


def recompute_in_backward(
    module: nn.Module, function: Callable, *inputs: torch.Tensor, checkpoint_function: Callable | None = None
) -> torch.Tensor:
    """`function(*inputs)` (a part of `module`) with its activations recomputed in the backward pass instead of kept
    (`checkpoint_function`, by default `torch.utils.checkpoint` without re-entry; transformers' gradient
    checkpointing passes its own), such that the replay leaves the running statistics of `module`'s train-mode
    BatchNorms as the forward left them: a BatchNorm updates them on every call, and the replay would otherwise
    apply the momentum a second time. The gradients are those of the plain call."""
    checkpoint_function = checkpoint_function or partial(checkpoint, use_reentrant=False)
    calls = []

    def run(*arguments: torch.Tensor) -> torch.Tensor:
        if not calls:  # the forward pass
            calls.append(True)
            return function(*arguments)
        with _running_statistics_restored(module):  # the replay
            return function(*arguments)

    return checkpoint_function(run, *inputs)


class DenseClipConvNormAct(nn.Module):
    """Convolution (no bias, "same" padding) -> BatchNorm -> ReLU (in place on the BatchNorm's output, which nothing
    else reads: one image-sized tensor fewer per layer)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def _init_denseclip_weights(self) -> None:
        init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(hidden_states)))


class DenseClipResNetStem(nn.Module):
    """CLIP's 3-convolution stem: 3x3 convolutions with stride 2, 1 and 1 (each with BatchNorm and ReLU), then a 2x
    average pool. `(batch, channels, H, W)` -> `(batch, width, H / 4, W / 4)`. With `recompute_in_backward` its
    activations are recomputed in the backward pass of training instead of kept (`recompute_in_backward`)."""

    def __init__(self, in_channels: int, width: int, recompute_in_backward: bool = False):
        super().__init__()
        self.layers = nn.Sequential(
            DenseClipConvNormAct(in_channels, width // 2, stride=2),
            DenseClipConvNormAct(width // 2, width // 2),
            DenseClipConvNormAct(width // 2, width),
        )
        self.pool = nn.AvgPool2d(2)
        self.recompute_in_backward = recompute_in_backward

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.recompute_in_backward and self.training and torch.is_grad_enabled():
            return recompute_in_backward(self, self._forward, pixel_values)
        return self._forward(pixel_values)


class DenseClipResNetShortcut(nn.Module):
    """Projection shortcut of a bottleneck that changes shape: `stride`x average pool, 1x1 convolution, BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def _init_denseclip_weights(self) -> None:
        init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.pool(hidden_states)))


class DenseClipResNetBottleneck(GradientCheckpointingLayer):
    """CLIP's anti-aliased bottleneck: 1x1 conv -> 3x3 conv -> `stride`x average pool (instead of a strided conv) ->
    1x1 conv to `4 * channels`, BatchNorm after each conv, added to the shortcut, then ReLU (the sum and the ReLU in
    place on the last BatchNorm's output, as the authors' `out += identity; relu(out)`).

    `(batch, in_channels, h, w)` -> `(batch, 4 * channels, h / stride, w / stride)`. Recomputed in the backward pass
    under gradient checkpointing (`model.gradient_checkpointing_enable()`).
    """

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        out_channels = 4 * channels
        self.reduce = DenseClipConvNormAct(in_channels, channels, kernel_size=1)
        self.spatial = DenseClipConvNormAct(channels, channels, kernel_size=3)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.expand = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.expand_norm = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            DenseClipResNetShortcut(in_channels, out_channels, stride)
            if stride > 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.activation = nn.ReLU(inplace=True)

    def _init_denseclip_weights(self) -> None:
        init.kaiming_normal_(self.expand.weight, mode="fan_out", nonlinearity="relu")
        init.zeros_(self.expand_norm.weight)  # CLIP's init: each residual branch starts at zero

    # transformers' gradient checkpointing (`model.gradient_checkpointing_enable()`) sets the checkpoint function of
    # each layer; the block's replay must keep its BatchNorms' running statistics (`recompute_in_backward`).
    @property
    def _gradient_checkpointing_func(self) -> Callable:
        return partial(recompute_in_backward, self, checkpoint_function=self._checkpoint_function)

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, function: Callable) -> None:
        self._checkpoint_function = function

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.expand_norm(self.expand(self.pool(self.spatial(self.reduce(hidden_states)))))
        return self.activation(residual.add_(self.shortcut(hidden_states)))


class DenseClipAttentionPool(nn.Module):
    """CLIP's attention pool, keeping every output token (Eq. 1).

    The last stage's mean token x_bar and its spatial tokens x, plus positional embeddings (row 0 for the mean token;
    the square grid of the others resized, or cropped, to the feature map on every call), go through one multi-head
    self-attention with biased q/k/v projections and an output projection into the joint embedding space.
    """

    def __init__(self, embed_dim: int, num_heads: int, grid: int, projection_dim: int, interpolation: str):
        super().__init__()
        self.num_heads = num_heads
        self.interpolation = interpolation
        self.position_embedding = nn.Parameter(torch.empty(grid * grid + 1, embed_dim))
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, projection_dim)

    def _init_denseclip_weights(self) -> None:
        # CLIP's init: std embed_dim ** -0.5 for the positions and every projection.
        std = self.q_proj.in_features**-0.5
        init.normal_(self.position_embedding, std=std)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            init.normal_(linear.weight, std=std)
            init.zeros_(linear.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features` x_4 `(batch, embed_dim, h, w)` -> z_bar `(batch, D)` and z `(batch, D, h, w)`."""
        height, width = features.shape[-2:]
        tokens = features.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + resize_position_embedding(self.position_embedding, (height, width), self.interpolation).to(
            tokens.dtype
        )
        attended = multi_head_attention(self.q_proj(tokens), self.k_proj(tokens), self.v_proj(tokens), self.num_heads)
        # Eq. 1: [z_bar, z] = MHSA([x_bar, x]); token 0 is z_bar, the spatial tokens form z.
        embeddings = self.out_proj(attended)
        return embeddings[:, 0], embeddings[:, 1:].transpose(1, 2).unflatten(2, (height, width))


class DenseClipResNetVisionModel(nn.Module):
    """CLIP's ModifiedResNet image tower: stem, 4 stages of bottlenecks (strides 4, 8, 16, 32), attention pool (none
    when `needs_embeddings=False`: the authors' `CLIPResNet`).

    `forward(pixel_values)` `(batch, 3, H, W)` returns the stem's output `(batch, width, H / 4, W / 4)` followed by
    the 4 stage outputs `(batch, pyramid_channels[i], H / stride, W / stride)`, then z_bar `(batch, D)` and z
    `(batch, D, H / 32, W / 32)` (both `None` without the attention pool).
    """

    def __init__(
        self, config: DenseClipResNetConfig, projection_dim: int, interpolation: str, needs_embeddings: bool = True
    ):
        super().__init__()
        self.stem = DenseClipResNetStem(config.num_channels, config.width, config.recompute_stem_in_backward)
        stages, in_channels = [], config.width
        for stage, (depth, out_channels) in enumerate(zip(config.layers, config.pyramid_channels, strict=True)):
            blocks = []
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(DenseClipResNetBottleneck(in_channels, out_channels // 4, stride))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.attention_pool = (
            DenseClipAttentionPool(
                config.embed_dim, config.attention_pool_heads, config.image_size // 32, projection_dim, interpolation
            )
            if needs_embeddings
            else None
        )

    def forward(
        self, pixel_values: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]:
        hidden_states = self.stem(pixel_values)
        features = [hidden_states]
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            features.append(hidden_states)
        if self.attention_pool is None:
            return tuple(features), None, None
        return (tuple(features), *self.attention_pool(hidden_states))


def stored_table_mode(mode: str) -> str:
    """How a stored positional table is resized once to another grid (`resize_position_embeddings`): with the
    per-call mode, except for `"crop"`, whose table is made bilinearly (the authors' detectors interpolate CLIP's 7x7
    grid to 42x42 at initialisation, then crop it on every call)."""
    return "bilinear" if mode == "crop" else mode


def resize_attention_pool_grid(pool: DenseClipAttentionPool | None, image_size: int) -> None:
    """Stores `pool`'s positional grid for `image_size` x `image_size` inputs (stride 32); no pool, no grid."""
    if image_size % PYRAMID_STRIDES[-1]:
        raise ValueError(f"image_size={image_size} must be a multiple of {PYRAMID_STRIDES[-1]}.")
    if pool is None:
        return
    side = image_size // PYRAMID_STRIDES[-1]
    table = resize_position_embedding(
        pool.position_embedding.detach(), (side, side), stored_table_mode(pool.interpolation)
    )
    pool.position_embedding = nn.Parameter(table.clone())
