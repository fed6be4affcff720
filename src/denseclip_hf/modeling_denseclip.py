"""DenseCLIP: language-guided dense prediction with context-aware prompting (Rao et al., CVPR 2022).

Read top to bottom, this file follows the data:
pixels -> image encoder (CLIP ViT or ResNet) -> stride 4/8/16/32 pyramid, global and dense embeddings z_bar, z (Eq. 1)
-> class text embeddings t from learnable contexts (Eq. 3; or from the image, pre-model, Eq. 4)
-> prompting (post-model, Eqs. 5-6) -> pixel-text score map s (Eq. 2), joined to the pyramid (x' = [x, s])
-> decoder (Semantic FPN) -> logits -> losses (Eq. 7).

Image encoders, promptings and decoders are each one small interface (`DenseClipImageEncoder`, `DenseClipPrompting`,
`DenseClipDecoder`) with its implementations registered by name (`IMAGE_ENCODERS`, `PROMPTINGS`, `DECODERS`); the
config says which (`image_encoder_family`, `prompting_type`, `decoder_type`). Modules and parameters:

    DenseClipForSemanticSegmentation
    ├── denseclip: DenseClipModel                      the base model: pixels -> language-guided pyramid
    │   ├── image_encoder: DenseClipViTImageEncoder    vision_model (CLIPVisionModel), visual_projection, pyramid
    │   │              or DenseClipResNetImageEncoder  vision_model (stem, stages, attention_pool)
    │   │              or DenseClipBackboneImageEncoder backbone (any transformers AutoBackbone), attention_pool
    │   ├── text_encoder: DenseClipTextEncoder         text_model (CLIPTextModel), text_projection; frozen
    │   ├── prompting: DenseClipPostModelPrompting     context_embeddings, context_decoder, gamma
    │   │          or DenseClipLanguageOnlyPrompting   context_embeddings
    │   │          or DenseClipPreModelPrompting       queries, context_decoder, context_projection
    │   │          or DenseClipNoTextPrompting         nothing (the baseline: no text_encoder, attention_pool,
    │   │                                              visual_projection; the pyramid goes to the decoder as it is)
    │   └── class_token_ids                            buffer (not saved: it is in the config)
    └── decoder: DenseClipSemanticFPNDecoder           neck (FPN), head (Semantic FPN head)
             or DenseClipUperNetDecoder               pyramid_pooling (PPM), laterals, fpn_convs, fusion
"""

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from transformers import (
    MODEL_FOR_BACKBONE_MAPPING,
    AutoBackbone,
    AutoConfig,
    AutoTokenizer,
    CLIPConfig,
    CLIPTextModel,
    CLIPVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BackboneOutput, SemanticSegmenterOutput
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .configuration_denseclip import (
    PYRAMID_STRIDES,
    TEST_MODES,
    BackboneSettings,
    ClipResNetSettings,
    ClipViTSettings,
    DenseClipBackboneConfig,
    DenseClipConfig,
    DenseClipResNetConfig,
    check_test_protocol,
    input_size_multiple,
    pyramid_backbone_config,
)
from .sliding_windows import sliding_windows

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DenseClipImageEncoderOutput(ModelOutput):
    r"""
    What every image encoder returns (see `DenseClipImageEncoder`).

    Args:
        pyramid (`tuple(torch.FloatTensor)`):
            4 feature maps `(batch, channels_i, height / stride, width / stride)` for strides 4, 8, 16 and 32.
        global_embedding (`torch.FloatTensor` of shape `(batch, projection_dim)`):
            The global image embedding z_bar (Eq. 1); `None` from an encoder built with `needs_embeddings=False`.
        dense_embedding (`torch.FloatTensor` of shape `(batch, projection_dim, h, w)`):
            The language-compatible feature map z (Eq. 1), not normalized; stride `patch_size` (ViT) or 32 (ResNet);
            `None` from an encoder built with `needs_embeddings=False`.
    """

    pyramid: tuple[torch.FloatTensor, ...] | None = None
    global_embedding: torch.FloatTensor | None = None
    dense_embedding: torch.FloatTensor | None = None


@dataclass
class DenseClipModelOutput(ModelOutput):
    r"""
    Output of [`DenseClipModel`]: the language-guided pyramid and what it was made from.

    Args:
        pyramid (`tuple(torch.FloatTensor)`):
            The 4 image-encoder levels `(batch, channels_i, height / stride, width / stride)` for strides 4, 8, 16 and
            32, with the score map concatenated on the channels of level `config.score_map_level` (x' = [x, s],
            Sec. 3.2; that level has `channels_i + num_labels` channels). `DenseClipModel.pyramid_channels` lists the
            channels.
        score_map (`torch.FloatTensor` of shape `(batch, num_labels, h, w)`):
            Pixel-text cosine similarities s (Eq. 2) on the dense embedding grid (stride `patch_size` for ViT, 32 for
            ResNet). `None` for a prompting without text (`prompting_type="none"`, the CLIP + Semantic FPN baseline),
            whose pyramid is the image encoder's unchanged; `global_embedding`, `dense_embedding` and
            `text_embeddings` are then `None` too.
        global_embedding (`torch.FloatTensor` of shape `(batch, projection_dim)`):
            The global image embedding z_bar (Eq. 1).
        dense_embedding (`torch.FloatTensor` of shape `(batch, projection_dim, h, w)`):
            The language-compatible feature map z (Eq. 1), not normalized, on the score map's grid.
        text_embeddings (`torch.FloatTensor` of shape `(batch, num_labels, projection_dim)`):
            Class text embeddings t after prompting (Eq. 6), not normalized.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The 4 image-encoder levels before the score map is joined.
    """

    pyramid: tuple[torch.FloatTensor, ...] | None = None
    score_map: torch.FloatTensor | None = None
    global_embedding: torch.FloatTensor | None = None
    dense_embedding: torch.FloatTensor | None = None
    text_embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DenseClipSemanticSegmenterOutput(SemanticSegmenterOutput):
    r"""
    Output of [`DenseClipForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            `decode_loss + identity_loss_weight * identity_loss`.
        logits (`torch.FloatTensor` of shape `(batch, num_labels, height / 4, width / 4)`):
            Per-pixel class scores at a quarter of the input size (the single pass); `(batch, num_labels, height,
            width)` at the input size for a test protocol (`forward(test_mode="slide" | "whole")`, the default in eval
            mode without labels), whose other outputs are then `None`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The 4 image-encoder pyramid levels `(batch, channels, height / stride, width / stride)` for strides 4, 8,
            16 and 32, before the score map is concatenated (channels: the ViT width, or the ResNet stage widths).
        score_map (`torch.FloatTensor` of shape `(batch, num_labels, h, w)`):
            Pixel-text cosine similarities s (Eq. 2) on the dense embedding grid (stride `patch_size` for ViT, 32 for
            ResNet).
        text_embeddings (`torch.FloatTensor` of shape `(batch, num_labels, projection_dim)`):
            Class text embeddings t after post-model prompting (Eq. 6), not normalized.
        decode_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Cross-entropy of the logits upsampled to the label size.
        identity_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Unweighted auxiliary cross-entropy of `score_map / temperature` (Eq. 7).
    """

    score_map: torch.FloatTensor | None = None
    text_embeddings: torch.FloatTensor | None = None
    decode_loss: torch.FloatTensor | None = None
    identity_loss: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks shared by the image encoders, the context decoder and the decoder
# ---------------------------------------------------------------------------------------------------------------------


def multi_head_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Scaled dot-product attention of projected `queries` `(batch, Q, C)` over projected `keys` and `values`
    `(batch, M, C)`, split into `num_heads` heads of `C / num_heads` channels -> `(batch, Q, C)`."""

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (num_heads, -1)).transpose(1, 2)

    attended = F.scaled_dot_product_attention(heads(queries), heads(keys), heads(values))
    return attended.transpose(1, 2).flatten(2)


def _same_size(size: Sequence[int], other: Sequence[int]) -> bool:
    """Whether two `(height, width)` sizes are equal. Under `torch.export` with dynamic sizes (symbolic ints): True
    only where they are equal for every input size, so that an exported graph keeps the resize (exact where the sizes
    turn out equal) instead of baking in the example input's decision as a constant."""
    return all(statically_known_true(side == other_side) for side, other_side in zip(size, other, strict=True))


def _resize(hidden_states: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize (align_corners=False); a no-op when the size already matches (`_same_size`)."""
    if _same_size(hidden_states.shape[-2:], size):
        return hidden_states
    return F.interpolate(hidden_states, size=size, mode="bilinear", align_corners=False)


def _channels_last(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits `(batch, classes, h, w)` in channels-last memory: each pixel's classes one contiguous row. On CPU
    the test protocol's full-resolution steps are faster so (dividing 150x512x683 slide sums by the window count: 15
    instead of 330 ms), and the loss soft-maxes along the rows; the values are the same as in channels-first memory.
    """
    return logits.float().contiguous(memory_format=torch.channels_last)


def resize_position_embedding(table: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resizes a positional embedding table `(1 + side * side, channels)`: row 0 (class / mean token) is kept, the
    square grid of the others is interpolated (align_corners=False) to `size` -> `(1 + height * width, channels)`."""
    side = math.isqrt(table.shape[0] - 1)
    if _same_size((side, side), size):
        return table
    grid = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode=mode, align_corners=False)
    return torch.cat([table[:1], grid.flatten(2).transpose(1, 2)[0]])


def check_pixel_tensor(
    pixel_values: Any, channels: int, minimum: int = PYRAMID_STRIDES[-1], purpose: str = ""
) -> None:
    """The entry check of every model input: a floating-point tensor `(batch, channels, height, width)` with both
    sides at least `minimum` (default: the pyramid's coarsest stride); otherwise a `TypeError` / `ValueError` saying
    what to pass. `purpose` (e.g. " for the test protocol") is named in the size error."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor (batch, {channels}, height, width), got "
            f"{type(pixel_values).__name__}: prepare images with DenseClipImageProcessor(return_tensors='pt')."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor of normalized images, got {pixel_values.dtype}: prepare "
            "images with DenseClipImageProcessor (it rescales and normalizes them), or call `.float()`."
        )
    if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}: "
            "add a batch dimension with `pixel_values[None]` and pass channels first."
        )
    if pixel_values.shape[0] == 0 or min(pixel_values.shape[-2:]) < minimum:
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} are too small{purpose}: the batch must not be empty "
            f"and the height and width must be at least {minimum} pixels (the pyramid's coarsest stride); resize or "
            "pad the images."
        )


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


class DenseClipConvNormAct(nn.Module):
    """Convolution (no bias, "same" padding) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(hidden_states)))


# ---------------------------------------------------------------------------------------------------------------------
# Image encoders: pixels -> pyramid, z_bar and z (Eq. 1)
# ---------------------------------------------------------------------------------------------------------------------


class DenseClipImageEncoder(nn.Module):
    """The image encoder interface.

    Built from the `DenseClipConfig` alone. `forward(pixel_values)` takes normalized images `(batch, 3, height, width)`
    and returns a `DenseClipImageEncoderOutput`: the pyramid, 4 maps `(batch, pyramid_channels[i], height / stride,
    width / stride)` at strides 4, 8, 16, 32; the global embedding z_bar `(batch, D)`; the dense embedding z
    `(batch, D, h, w)` in the text embedding space (D = `config.projection_dim`). Bad input is a `ValueError`.
    `resize_position_embeddings(image_size)` stores the positional embedding for `image_size` x `image_size` inputs.
    Built with `needs_embeddings=False` (a prompting without text, `DenseClipPrompting.uses_text`), an encoder builds
    no projection into the text space (no attention pool, no visual projection) and returns only the pyramid
    (z_bar and z `None`), as the authors' `CLIPResNet` of their `fpn_clip*` baselines.

    Each family's defaults (`pyramid_channels`, the score map's stride, feature layers) come from its
    `ImageEncoderSettings` in the configuration file; `IMAGE_ENCODERS` maps its name to the module.
    """

    def __init__(self, config: DenseClipConfig, needs_embeddings: bool = True):
        super().__init__()
        self.pyramid_channels: list[int] = config.image_encoder_settings.pyramid_channels()
        self.needs_embeddings = needs_embeddings
        self.num_channels: int = config.vision_config.num_channels

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """A `TypeError` unless `pixel_values` is a floating-point tensor, a `ValueError` unless it is
        `(batch, num_channels, height, width)` with sides of at least the pyramid's coarsest stride."""
        check_pixel_tensor(pixel_values, self.num_channels)

    def resize_position_embeddings(self, image_size: int) -> None:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> DenseClipImageEncoderOutput:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------------
# Image encoder, CLIP ViT: pixels -> patch tokens -> pyramid, z_bar and z (Eq. 1)
# ---------------------------------------------------------------------------------------------------------------------


def drop_path(hidden_states: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zeroes the whole residual branch of each sample with probability `rate` in training, and
    scales the kept ones by `1 / (1 - rate)`. `hidden_states` `(batch, ...)`."""
    if not training or rate == 0.0:
        return hidden_states
    keep = 1.0 - rate
    mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep)
    return hidden_states * mask / keep if keep > 0 else hidden_states * mask


def _drop_path_hook(rate: float, module: nn.Module, args: tuple, output):
    """Forward hook: stochastic depth on a residual branch (an attention's `(output, weights)`, or an MLP output)."""
    if isinstance(output, tuple):
        return (drop_path(output[0], rate, module.training), *output[1:])
    return drop_path(output, rate, module.training)


def _pyramid_level(channels: int, patch_size: int, stride: int) -> nn.Sequential:
    """GroupNorm, then 2x transposed convolutions (with BatchNorm + GELU between) or a max-pool to reach `stride`."""
    layers: list[nn.Module] = [nn.GroupNorm(1, channels)]
    if stride > patch_size:
        layers.append(nn.MaxPool2d(stride // patch_size))
    for step in range(int(math.log2(patch_size // stride)) if patch_size > stride else 0):
        if step > 0:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class DenseClipViTPyramid(nn.Module):
    """Turns 4 ViT feature maps at stride `patch_size` into a stride 4/8/16/32 pyramid (the authors' `fpn1-4`).

    For ViT-B/16: level 0 upsamples 4x with two transposed convolutions, level 1 upsamples 2x, level 2 keeps the
    map and level 3 max-pools 2x; every level starts with a GroupNorm over all channels.
    """

    def __init__(self, channels: int, patch_size: int):
        super().__init__()
        self.levels = nn.ModuleList(_pyramid_level(channels, patch_size, stride) for stride in PYRAMID_STRIDES)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`features`: 4 maps `(batch, channels, h, w)` -> 4 maps `(batch, channels, H / stride, W / stride)`."""
        return tuple(level(feature) for level, feature in zip(self.levels, features, strict=True))


class DenseClipViTImageEncoder(DenseClipImageEncoder):
    """CLIP ViT image encoder that also returns the pyramid and the dense embedding z.

    Input `pixel_values` `(batch, 3, height, width)` of any size divisible by the patch size, square or not: the
    positional embedding is resized to the patch grid on every call (`config.position_embedding_interpolation`).
    The pyramid is read from the patch tokens of `config.vision_feature_layers`, all `hidden_size` channels wide.
    """

    def __init__(self, config: DenseClipConfig, needs_embeddings: bool = True):
        super().__init__(config, needs_embeddings)
        vision_config = config.vision_config
        self.vision_model = CLIPVisionModel(vision_config)
        if needs_embeddings:
            self.visual_projection = nn.Linear(vision_config.hidden_size, config.projection_dim, bias=False)
        else:
            # Nothing reads the final tokens' norm (the authors' baseline ViT has no projection either).
            self.vision_model.post_layernorm = nn.Identity()
        self.pyramid = DenseClipViTPyramid(vision_config.hidden_size, vision_config.patch_size)
        self.feature_layers = list(config.vision_feature_layers)
        self.interpolation = config.position_embedding_interpolation
        # Stochastic depth as in the authors' ViT (rates rising linearly to `drop_path_rate` at the last layer).
        # transformers' CLIP layers have none: hooks on each layer's two residual branches add it.
        rates = torch.linspace(0, config.drop_path_rate, vision_config.num_hidden_layers).tolist()
        for layer, rate in zip(self.vision_model.encoder.layers, rates, strict=True):
            if rate > 0:
                layer.self_attn.register_forward_hook(partial(_drop_path_hook, rate))
                layer.mlp.register_forward_hook(partial(_drop_path_hook, rate))

    def embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + class tokens plus positions: `(batch, 1 + h * w, hidden)` and the patch grid `(h, w)`."""
        embeddings = self.vision_model.embeddings
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
        batch, _, height, width = patches.shape
        class_token = embeddings.class_embedding.expand(batch, 1, -1)
        tokens = torch.cat([class_token, patches.flatten(2).transpose(1, 2)], dim=1)
        positions = resize_position_embedding(
            embeddings.position_embedding.weight, (height, width), self.interpolation
        )
        return tokens + positions.unsqueeze(0), (height, width)

    def resize_position_embeddings(self, image_size: int) -> None:
        embeddings = self.vision_model.embeddings
        if image_size % embeddings.patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of the patch size {embeddings.patch_size}.")
        side = image_size // embeddings.patch_size
        table = resize_position_embedding(
            embeddings.position_embedding.weight.detach(), (side, side), self.interpolation
        )
        embeddings.position_embedding = nn.Embedding.from_pretrained(table.clone(), freeze=False)
        embeddings.image_size, embeddings.num_patches, embeddings.num_positions = image_size, side * side, len(table)
        embeddings.position_ids = torch.arange(len(table), device=table.device).expand((1, -1))

    def forward(self, pixel_values: torch.Tensor) -> DenseClipImageEncoderOutput:
        self.check_pixel_values(pixel_values)
        patch_size = self.vision_model.config.patch_size
        if pixel_values.shape[-2] % patch_size or pixel_values.shape[-1] % patch_size:
            raise ValueError(
                f"pixel_values height and width must be multiples of the patch size {patch_size}, got "
                f"{tuple(pixel_values.shape[-2:])}: resize or pad the images (DenseClipImageProcessor rounds them "
                "with test_mode='whole' or label maps), or run a test protocol (test_mode='slide' or 'whole')."
            )
        hidden_states, (height, width) = self.embed(pixel_values)
        hidden_states = self.vision_model.pre_layrnorm(hidden_states)
        features = []
        for index, layer in enumerate(self.vision_model.encoder.layers):
            hidden_states = layer(hidden_states, None)
            if index in self.feature_layers:
                features.append(hidden_states[:, 1:].transpose(1, 2).unflatten(2, (height, width)))
        if not self.needs_embeddings:
            return DenseClipImageEncoderOutput(pyramid=self.pyramid(features))
        # Eq. 1 (ViT): post_layernorm + projection of ALL final tokens; token 0 is z_bar, the others form z.
        embeddings = self.visual_projection(self.vision_model.post_layernorm(hidden_states))
        return DenseClipImageEncoderOutput(
            pyramid=self.pyramid(features),
            global_embedding=embeddings[:, 0],
            dense_embedding=embeddings[:, 1:].transpose(1, 2).unflatten(2, (height, width)),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Image encoder, CLIP ResNet: pixels -> stem -> 4 bottleneck stages (the pyramid) -> attention pool: z_bar, z (Eq. 1)
# ---------------------------------------------------------------------------------------------------------------------


class DenseClipResNetStem(nn.Module):
    """CLIP's 3-convolution stem: 3x3 convolutions with stride 2, 1 and 1 (each with BatchNorm and ReLU), then a 2x
    average pool. `(batch, channels, H, W)` -> `(batch, width, H / 4, W / 4)`."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(
            DenseClipConvNormAct(in_channels, width // 2, stride=2),
            DenseClipConvNormAct(width // 2, width // 2),
            DenseClipConvNormAct(width // 2, width),
        )
        self.pool = nn.AvgPool2d(2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(pixel_values))


class DenseClipResNetShortcut(nn.Module):
    """Projection shortcut of a bottleneck that changes shape: `stride`x average pool, 1x1 convolution, BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.pool(hidden_states)))


class DenseClipResNetBottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: 1x1 conv -> 3x3 conv -> `stride`x average pool (instead of a strided conv) ->
    1x1 conv to `4 * channels`, BatchNorm after each conv, added to the shortcut, then ReLU.

    `(batch, in_channels, h, w)` -> `(batch, 4 * channels, h / stride, w / stride)`.
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
        self.activation = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.expand_norm(self.expand(self.pool(self.spatial(self.reduce(hidden_states)))))
        return self.activation(residual + self.shortcut(hidden_states))


class DenseClipAttentionPool(nn.Module):
    """CLIP's attention pool, keeping every output token (Eq. 1).

    The last stage's mean token x_bar and its spatial tokens x, plus positional embeddings (row 0 for the mean token;
    the square grid of the others resized to the feature map on every call), go through one multi-head self-attention
    with biased q/k/v projections and an output projection into the joint embedding space.
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
    when `needs_embeddings=False`: the authors' `CLIPResNet`)."""

    def __init__(
        self, config: DenseClipResNetConfig, projection_dim: int, interpolation: str, needs_embeddings: bool = True
    ):
        super().__init__()
        self.stem = DenseClipResNetStem(config.num_channels, config.width)
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

    def forward(self, pixel_values: torch.Tensor) -> DenseClipImageEncoderOutput:
        hidden_states = self.stem(pixel_values)
        pyramid = []
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            pyramid.append(hidden_states)
        if self.attention_pool is None:
            return DenseClipImageEncoderOutput(pyramid=tuple(pyramid))
        global_embedding, dense_embedding = self.attention_pool(hidden_states)
        return DenseClipImageEncoderOutput(
            pyramid=tuple(pyramid), global_embedding=global_embedding, dense_embedding=dense_embedding
        )


class DenseClipResNetImageEncoder(DenseClipImageEncoder):
    """CLIP ResNet image encoder: its 4 stage outputs are the pyramid, its attention pool gives z_bar and z (Eq. 1).

    Input `pixel_values` `(batch, 3, height, width)` of any size of at least 32 pixels, square or not: the attention
    pool's positional grid is resized to the stride-32 feature map on every call
    (`config.position_embedding_interpolation`).
    """

    def __init__(self, config: DenseClipConfig, needs_embeddings: bool = True):
        super().__init__(config, needs_embeddings)
        self.vision_model = DenseClipResNetVisionModel(
            config.vision_config, config.projection_dim, config.position_embedding_interpolation, needs_embeddings
        )

    def forward(self, pixel_values: torch.Tensor) -> DenseClipImageEncoderOutput:
        self.check_pixel_values(pixel_values)
        return self.vision_model(pixel_values.to(self.vision_model.stem.layers[0].conv.weight.dtype))

    def resize_position_embeddings(self, image_size: int) -> None:
        _resize_attention_pool_grid(self.vision_model.attention_pool, image_size)


def _resize_attention_pool_grid(pool: DenseClipAttentionPool | None, image_size: int) -> None:
    """Stores `pool`'s positional grid for `image_size` x `image_size` inputs (stride 32); no pool, no grid."""
    if image_size % PYRAMID_STRIDES[-1]:
        raise ValueError(f"image_size={image_size} must be a multiple of {PYRAMID_STRIDES[-1]}.")
    if pool is None:
        return
    side = image_size // PYRAMID_STRIDES[-1]
    table = resize_position_embedding(pool.position_embedding.detach(), (side, side), pool.interpolation)
    pool.position_embedding = nn.Parameter(table.clone())


# ---------------------------------------------------------------------------------------------------------------------
# Image encoder, any transformers backbone (Sec. 4.3): pixels -> its last 4 stages (pyramid) -> new attention pool
# ---------------------------------------------------------------------------------------------------------------------


class DenseClipBackboneImageEncoder(DenseClipImageEncoder):
    """Any transformers `AutoBackbone` (ResNet, Swin, ConvNeXt, ...; timm models through `TimmBackbone`) as the image
    encoder (Sec. 4.3): its last 4 stages (strides 4-32) are the pyramid, and a newly initialised CLIP-style attention
    pool over the last stage gives z_bar `(batch, D)` and z `(batch, D, H / 32, W / 32)` in the text embedding space
    (Eq. 1), the authors' recipe for backbones not trained with text.

    Input `pixel_values` `(batch, 3, height, width)`, each side a multiple of 32.
    """

    def __init__(self, config: DenseClipConfig, needs_embeddings: bool = True):
        super().__init__(config, needs_embeddings)
        self.backbone = AutoBackbone.from_config(pyramid_backbone_config(config.vision_config))
        self._drop_unused_backbone_modules()
        self.attention_pool = (
            DenseClipAttentionPool(
                self.pyramid_channels[-1],
                config.backbone_attention_pool_heads,
                config.backbone_attention_pool_image_size // PYRAMID_STRIDES[-1],
                config.projection_dim,
                config.position_embedding_interpolation,
            )
            if needs_embeddings
            else None
        )

    def _drop_unused_backbone_modules(self) -> None:
        """Replaces by `nn.Identity` the modules a transformers backbone keeps but its feature maps never use, those
        whose weights checkpoints may lack (`_keys_to_ignore_on_load_missing`; SwinBackbone: SwinModel's final
        `layernorm`), so that every trainable parameter gets a gradient, as multi-process training (DDP) requires."""
        patterns = [re.compile(pattern) for pattern in self.backbone._keys_to_ignore_on_load_missing or ()]
        for name, module in list(self.backbone.named_modules()):
            own = [f"{name}.{parameter}" for parameter, _ in module.named_parameters(recurse=False)]
            if name and own and all(any(pattern.search(key) for pattern in patterns) for key in own):
                self.backbone.set_submodule(name, nn.Identity())

    def forward(self, pixel_values: torch.Tensor) -> DenseClipImageEncoderOutput:
        self.check_pixel_values(pixel_values)
        if any(side < PYRAMID_STRIDES[-1] or side % PYRAMID_STRIDES[-1] for side in pixel_values.shape[-2:]):
            raise ValueError(
                f"pixel_values height and width must be multiples of {PYRAMID_STRIDES[-1]} (the backbone's last stage "
                f"has stride {PYRAMID_STRIDES[-1]}), got {tuple(pixel_values.shape[-2:])}."
            )
        dtype = next(self.backbone.parameters()).dtype
        pyramid = tuple(self.backbone(pixel_values.to(dtype)).feature_maps)
        if self.attention_pool is None:
            return DenseClipImageEncoderOutput(pyramid=pyramid)
        global_embedding, dense_embedding = self.attention_pool(pyramid[-1])
        return DenseClipImageEncoderOutput(
            pyramid=pyramid, global_embedding=global_embedding, dense_embedding=dense_embedding
        )

    def resize_position_embeddings(self, image_size: int) -> None:
        _resize_attention_pool_grid(self.attention_pool, image_size)

    def load_backbone_weights(self, name_or_path: str | os.PathLike, **hub_kwargs) -> None:
        """Copies the weights of a backbone checkpoint (Hub id or folder; an image classifier's too) into
        `backbone`; a `ValueError` when its architecture differs from this encoder's."""
        config = self.backbone.config
        # The backbone class itself: `AutoBackbone.from_pretrained` asks the Hub whether the name is a repository
        # first, even for a local folder (transformers 5), which fails offline.
        backbone = MODEL_FOR_BACKBONE_MAPPING[type(config)].from_pretrained(
            os.fspath(name_or_path), config=config, **hub_kwargs
        )
        own = self.backbone.state_dict().keys()
        try:
            self.backbone.load_state_dict({key: value for key, value in backbone.state_dict().items() if key in own})
        except RuntimeError as error:
            raise ValueError(f"The backbone checkpoint {os.fspath(name_or_path)!r} does not fit: {error}") from error


# The image encoder of each family (`DenseClipConfig.image_encoder_family`, `ImageEncoderSettings.name`).
IMAGE_ENCODERS: dict[str, type[DenseClipImageEncoder]] = {
    ClipViTSettings.name: DenseClipViTImageEncoder,
    ClipResNetSettings.name: DenseClipResNetImageEncoder,
    BackboneSettings.name: DenseClipBackboneImageEncoder,
}


# ---------------------------------------------------------------------------------------------------------------------
# Text side: class names + contexts -> CLIP text tower -> t (Eq. 3)
# ---------------------------------------------------------------------------------------------------------------------


class DenseClipTextEncoder(nn.Module):
    """CLIP text tower that reads `[SOT, p_1..p_N, name tokens, EOT]`: N learnable contexts after the start token.

    The tower is causal and only the end token's output is read, which allows two exact savings over running every
    position of every prompt (the authors' code): the start token and the contexts, the same in every class's prompt,
    run once (their keys and values shared by all classes, as a key-value cache would), and positions after the
    longest name's end token are not computed. With the authors' 13 positions (N = 8) and names of up to 3 tokens the
    tower computes 9 + 4 K instead of 13 K positions for K classes.
    """

    def __init__(self, config: DenseClipConfig):
        super().__init__()
        self.text_model = CLIPTextModel(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)

    def forward(self, class_token_ids: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """`class_token_ids` `(classes, length)` and `contexts` `(N, hidden)` -> text embeddings `(classes, D)`.

        Contexts per image, `(batch, N, hidden)`, give text embeddings per image, `(batch, classes, D)`.
        """
        if contexts.dim() == 2:
            return self._encode(class_token_ids, contexts.unsqueeze(0))[0]
        return self._encode(class_token_ids, contexts)

    def _encode(self, class_token_ids: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """`class_token_ids` `(classes, length)` and `contexts` `(groups, N, hidden)` -> `(groups, classes, D)`."""
        if bool((class_token_ids[:, 0] != class_token_ids[0, 0]).any()):
            raise ValueError(
                "Every class prompt must start with the same start token (SOT): tokenize the class names with "
                "`denseclip_hf.tokenize_class_names`."
            )
        text_model = self.text_model
        groups, num_contexts = contexts.shape[:2]
        num_classes = class_token_ids.shape[0]
        # Index of each name's end token; nothing after the longest name's end token can change any output.
        end_indices = (class_token_ids == text_model.config.eos_token_id).int().argmax(-1)
        name_length = int(end_indices.max()) + 1
        token_embeddings = text_model.embeddings.token_embedding(class_token_ids[:, :name_length])
        positions = text_model.embeddings.position_embedding.weight
        prefix_length = 1 + num_contexts
        # Eq. 3: [SOT, p, e_k], with the start token kept in front as in the authors' code.
        prefix = (
            torch.cat([token_embeddings[:1, :1].expand(groups, 1, -1), contexts.to(token_embeddings.dtype)], dim=1)
            + positions[:prefix_length]
        )
        names = token_embeddings[:, 1:] + positions[prefix_length : prefix_length + name_length - 1]
        names = names.repeat(groups, 1, 1)
        for layer in text_model.encoder.layers:
            prefix, names = _shared_prefix_layer(layer, prefix, names, self.training)
        # Each prompt's positions after the contexts: the last context's output, then the name tokens'.
        hidden_states = torch.cat([prefix[:, -1:].repeat_interleave(num_classes, dim=0), names], dim=1)
        hidden_states = text_model.final_layer_norm(hidden_states)
        prompts = torch.arange(groups * num_classes, device=hidden_states.device)
        pooled = hidden_states[prompts, end_indices.repeat(groups)]
        return self.text_projection(pooled).view(groups, num_classes, -1)


def _shared_prefix_layer(
    layer: nn.Module, prefix: torch.Tensor, names: torch.Tensor, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm CLIP text layer (causal self-attention, MLP) over prompts that share their first positions.

    `prefix` `(groups, P, hidden)`: the shared positions of each group of prompts; `names` `(groups * classes, S,
    hidden)`: the positions after them, group by group. The prefix attends causally to itself; each prompt's later
    positions attend to its group's whole prefix and causally to their own prompt, as in the full causal sequence.
    """
    attention = layer.self_attn
    groups, prefix_length = prefix.shape[:2]
    prompts_per_group, name_length = names.shape[0] // groups, names.shape[1]
    dropout = attention.dropout if training else 0.0

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (attention.num_heads, -1)).transpose(1, 2)

    def per_prompt(states: torch.Tensor) -> torch.Tensor:
        return states.repeat_interleave(prompts_per_group, dim=0)

    normed_prefix, normed_names = layer.layer_norm1(prefix), layer.layer_norm1(names)
    prefix_keys, prefix_values = attention.k_proj(normed_prefix), attention.v_proj(normed_prefix)
    attended_prefix = F.scaled_dot_product_attention(
        heads(attention.q_proj(normed_prefix)),
        heads(prefix_keys),
        heads(prefix_values),
        dropout_p=dropout,
        is_causal=True,
    )
    keys = torch.cat([per_prompt(prefix_keys), attention.k_proj(normed_names)], dim=1)
    values = torch.cat([per_prompt(prefix_values), attention.v_proj(normed_names)], dim=1)
    mask = torch.ones(name_length, prefix_length + name_length, dtype=torch.bool, device=names.device)
    attended_names = F.scaled_dot_product_attention(
        heads(attention.q_proj(normed_names)),
        heads(keys),
        heads(values),
        attn_mask=mask.tril(prefix_length),
        dropout_p=dropout,
    )
    prefix = prefix + attention.out_proj(attended_prefix.transpose(1, 2).flatten(2))
    names = names + attention.out_proj(attended_names.transpose(1, 2).flatten(2))
    return prefix + layer.mlp(layer.layer_norm2(prefix)), names + layer.mlp(layer.layer_norm2(names))


def tokenize_class_names(class_names: list[str], tokenizer, length: int) -> list[list[int]]:
    """Token ids `[SOT, name..., EOT, 0...]` of each class name, `length` ids each (the authors' `tokenize`).

    Raises a `ValueError` naming the class when a name needs more than `length` tokens.
    """
    token_ids = []
    for label, name in enumerate(class_names):
        ids = tokenizer(name, add_special_tokens=True)["input_ids"]
        if len(ids) > length:
            raise ValueError(
                f"Class {label} ({name!r}) needs {len(ids)} tokens with its start and end tokens, more than "
                f"class_name_token_length={length}: shorten the name or pass class_name_token_length={len(ids)}."
            )
        token_ids.append(ids + [0] * (length - len(ids)))
    return token_ids


# ---------------------------------------------------------------------------------------------------------------------
# Prompting: how the class text embeddings meet the image (pre-model: Eq. 4, post-model: Eqs. 5-6)
# ---------------------------------------------------------------------------------------------------------------------


class DenseClipPrompting(nn.Module):
    """The prompting interface: what the text encoder reads besides the class names, and how its output meets the
    image.

    Built from the `DenseClipConfig`. `text_contexts(image)` returns the vectors the text encoder reads between the
    start token and each class name (Eq. 3), `(N, text hidden size)`, the same for every image: the class text
    embeddings t `(num_labels, D)` (`DenseClipModel.get_text_embeddings`) then do not depend on the image (`image` may
    be `None`). Pre-model prompting returns contexts per image, `(batch, N, text hidden size)`, and t is then
    `(batch, num_labels, D)`. `forward(text_embeddings, image)` takes t and the image encoder's output and returns
    the text embeddings the score map is made of, `(batch, num_labels, D)`. `PROMPTINGS` maps each
    `config.prompting_type` to its module.

    Class attributes: `contexts_depend_on_image` (True only when `text_contexts` reads the image, so that t is per
    image, `(batch, num_labels, D)`, and cannot be cached) and `uses_text` (False only for a baseline with no text at
    all: no text encoder, score map or identity loss).
    """

    contexts_depend_on_image: ClassVar[bool] = False
    uses_text: ClassVar[bool] = True

    def text_contexts(self, image: DenseClipImageEncoderOutput | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, text_embeddings: torch.Tensor, image: DenseClipImageEncoderOutput) -> torch.Tensor:
        raise NotImplementedError


def visual_context(image: DenseClipImageEncoderOutput) -> torch.Tensor:
    """The visual context [z_bar, z] the context decoder attends to (Eqs. 4-5): z_bar `(batch, D)` and z
    `(batch, D, h, w)` -> `(batch, 1 + h * w, D)`."""
    return torch.cat([image.global_embedding.unsqueeze(1), image.dense_embedding.flatten(2).transpose(1, 2)], dim=1)


class DenseClipContextAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a dropout after the output projection."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`queries` `(batch, Q, hidden)` attend to `memory` `(batch, M, hidden)` -> `(batch, Q, hidden)`."""
        attended = multi_head_attention(self.q_proj(queries), self.k_proj(memory), self.v_proj(memory), self.num_heads)
        return self.dropout(self.out_proj(attended))


class DenseClipContextDecoderLayer(nn.Module):
    """Pre-norm Transformer decoder layer: self-attention, cross-attention to the visual context, 4x GELU MLP."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.self_attn = DenseClipContextAttention(hidden_size, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = DenseClipContextAttention(hidden_size, num_heads, dropout)
        self.norm3 = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, 4 * hidden_size)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(4 * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`hidden_states` `(batch, classes, hidden)`, `memory` `(batch, 1 + h * w, hidden)`."""
        normed = self.norm1(hidden_states)
        hidden_states = hidden_states + self.self_attn(normed, normed)
        hidden_states = hidden_states + self.cross_attn(self.norm2(hidden_states), memory)
        mlp = self.fc2(self.dropout(self.activation(self.fc1(self.norm3(hidden_states)))))
        return hidden_states + self.dropout(mlp)


class DenseClipContextDecoder(nn.Module):
    """TransDecoder of Eqs. 4-5: the queries (the text embeddings t for post-model prompting, the learnable q for
    pre-model prompting) attend to the visual context [z_bar, z], the memory."""

    def __init__(self, config: DenseClipConfig):
        super().__init__()
        embed_dim, hidden_size = config.projection_dim, config.context_decoder_hidden_size
        self.memory_projection = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden_size), nn.LayerNorm(hidden_size)
        )
        self.text_projection = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden_size))
        self.layers = nn.ModuleList(
            DenseClipContextDecoderLayer(hidden_size, config.context_decoder_heads, config.context_decoder_dropout)
            for _ in range(config.context_decoder_layers)
        )
        self.output_projection = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, embed_dim))

    def forward(self, text_embeddings: torch.Tensor, visual_context: torch.Tensor) -> torch.Tensor:
        """`text_embeddings` (the queries) `(batch, classes, D)` attend to `visual_context` `(batch, 1 + h * w, D)`.

        Returns v_post (or v_pre) `(batch, classes, D)`.
        """
        memory = self.memory_projection(visual_context)
        hidden_states = self.text_projection(text_embeddings)
        for layer in self.layers:
            hidden_states = layer(hidden_states, memory)
        return self.output_projection(hidden_states)


class DenseClipLanguageOnlyPrompting(DenseClipPrompting):
    """Language-domain prompting only (Table 2, row 3): N learnable contexts p before each class name (Eq. 3), and
    the class text embeddings t used as they are for every image (no vision-to-language decoder)."""

    def __init__(self, config: DenseClipConfig):
        super().__init__()
        self.context_embeddings = nn.Parameter(torch.empty(config.num_context_tokens, config.text_config.hidden_size))

    def text_contexts(self, image: DenseClipImageEncoderOutput | None = None) -> torch.Tensor:
        """The learnable contexts p `(N, text hidden size)`, shared by every image and class (Eq. 3)."""
        return self.context_embeddings

    def forward(self, text_embeddings: torch.Tensor, image: DenseClipImageEncoderOutput) -> torch.Tensor:
        """`text_embeddings` t `(classes, D)` -> the same t for every image, `(batch, classes, D)`."""
        return text_embeddings.expand(image.global_embedding.shape[0], -1, -1)


class DenseClipPostModelPrompting(DenseClipLanguageOnlyPrompting):
    """Post-model prompting, the paper's DenseCLIP: N learnable contexts p before each class name (Eq. 3), then the
    class text embeddings refined with the image's context, t <- t + gamma * TransDecoder(t, [z_bar, z]) (Eqs. 5-6).
    """

    def __init__(self, config: DenseClipConfig):
        super().__init__(config)
        self.context_decoder = DenseClipContextDecoder(config)
        self.gamma = nn.Parameter(torch.full((config.projection_dim,), float(config.gamma_init_value)))

    def forward(self, text_embeddings: torch.Tensor, image: DenseClipImageEncoderOutput) -> torch.Tensor:
        """`text_embeddings` t `(classes, D)`, z_bar `(batch, D)` and z `(batch, D, h, w)` -> `(batch, classes, D)`."""
        text_embeddings = super().forward(text_embeddings, image)
        v_post = self.context_decoder(text_embeddings, visual_context(image))  # Eq. 5
        return text_embeddings + self.gamma * v_post  # Eq. 6


class DenseClipPreModelPrompting(DenseClipPrompting):
    """Pre-model prompting (Table 2 row 4): N learnable queries q attend to the image's [z_bar, z] in a Transformer
    decoder, v_pre = TransDecoder(q, [z_bar, z]) (Eq. 4), and the visual contexts v_pre, projected to the text
    tower's width, replace the learnable contexts p before each class name (Eq. 3). The text tower then runs for every
    image: t is per image, `(batch, num_labels, D)`, and cannot be cached.
    """

    contexts_depend_on_image: ClassVar[bool] = True

    def __init__(self, config: DenseClipConfig):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(config.num_context_tokens, config.projection_dim))
        self.context_decoder = DenseClipContextDecoder(config)
        self.context_projection = nn.Linear(config.projection_dim, config.text_config.hidden_size)

    def text_contexts(self, image: DenseClipImageEncoderOutput | None = None) -> torch.Tensor:
        """z_bar `(batch, D)` and z `(batch, D, h, w)` -> the visual contexts of each image `(batch, N, text hidden
        size)`. Raises a `ValueError` without the image."""
        if image is None:
            raise ValueError(
                "prompting_type='pre_model' reads the image into the text tower's contexts: pass the image encoder's "
                "output (`get_text_embeddings(image)`), or use the model's forward."
            )
        context = visual_context(image)
        # A copy per image, not an expanded view (which, made under `no_grad`, trips `torch.utils.flop_counter`).
        queries = self.queries.to(context.dtype).unsqueeze(0).repeat(context.shape[0], 1, 1)
        v_pre = self.context_decoder(queries, context)  # Eq. 4
        return self.context_projection(v_pre)

    def forward(self, text_embeddings: torch.Tensor, image: DenseClipImageEncoderOutput) -> torch.Tensor:
        """t, already per image `(batch, classes, D)` (or `(classes, D)` given to the forward, then the same for every
        image) -> `(batch, classes, D)`."""
        return text_embeddings.expand(image.global_embedding.shape[0], -1, -1)


class DenseClipNoTextPrompting(DenseClipPrompting):
    """No text at all: the CLIP + Semantic FPN baseline (Table 1, Table 2 row 2, the authors' `fpn_clip*` configs).
    The model builds no text encoder and its image encoder no attention pool / visual projection; the decoder reads
    the image encoder's pyramid unchanged (no score map, no identity loss). It has no parameters and is never
    called."""

    uses_text: ClassVar[bool] = False

    def __init__(self, config: DenseClipConfig):
        super().__init__()


# The prompting of each `DenseClipConfig.prompting_type` (`PROMPTING_TYPES`).
PROMPTINGS: dict[str, type[DenseClipPrompting]] = {
    "post_model": DenseClipPostModelPrompting,
    "language_only": DenseClipLanguageOnlyPrompting,
    "pre_model": DenseClipPreModelPrompting,
    "none": DenseClipNoTextPrompting,
}


# ---------------------------------------------------------------------------------------------------------------------
# Pixel-text score map (Eq. 2), joined to the pyramid (Sec. 3.2)
# ---------------------------------------------------------------------------------------------------------------------


def pixel_text_score_map(dense_embedding: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Eq. 2: s = z_hat t_hat^T, cosine similarity of every pixel with every class.

    `dense_embedding` `(batch, D, h, w)` and `text_embeddings` `(batch, classes, D)` -> `(batch, classes, h, w)`.
    """
    return torch.einsum("bdhw,bkd->bkhw", F.normalize(dense_embedding, dim=1), F.normalize(text_embeddings, dim=2))


def join_score_map(pyramid: tuple[torch.Tensor, ...], score_map: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
    """Sec. 3.2: x' = [x, s], the score map `(batch, classes, h, w)` concatenated on the channels of pyramid level
    `level` (bilinearly resized to that level's size when its stride differs). Other levels are unchanged."""
    features = list(pyramid)
    score_map = _resize(score_map, features[level].shape[-2:]).to(features[level].dtype)
    features[level] = torch.cat([features[level], score_map], dim=1)
    return tuple(features)


# ---------------------------------------------------------------------------------------------------------------------
# Decoders: language-guided pyramid -> logits (Semantic FPN: FPN neck + Semantic FPN head)
# ---------------------------------------------------------------------------------------------------------------------


class DenseClipDecoder(nn.Module):
    """The decoder interface: the language-guided pyramid -> per-pixel class logits.

    Built from the `DenseClipConfig` and the pyramid's channels `in_channels` (4 ints, `DenseClipModel.
    pyramid_channels`). `forward(pyramid)` takes the 4 maps `(batch, in_channels[i], H / stride, W / stride)`
    (strides 4, 8, 16, 32) and returns logits `(batch, num_labels, H / 4, W / 4)`. `DECODERS` maps each
    `config.decoder_type` to its module.
    """

    def forward(self, pyramid: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError


class DenseClipFPN(nn.Module):
    """Feature Pyramid Network neck: 1x1 laterals, nearest top-down sums, 3x3 output convolutions."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(width, channels, 1) for width in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """4 maps `(batch, in_channels[i], h_i, w_i)` -> 4 maps `(batch, channels, h_i, w_i)`."""
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, features, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + F.interpolate(
                laterals[level], size=laterals[level - 1].shape[-2:], mode="nearest"
            )
        return tuple(conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=True))


class DenseClipSemanticFPNHead(nn.Module):
    """Semantic FPN head (Kirillov et al.): each level is brought to stride 4 by (conv + 2x upsample) steps, the
    levels are summed and a 1x1 classifier gives the logits `(batch, num_labels, H / 4, W / 4)`."""

    def __init__(self, in_channels: int, channels: int, num_labels: int, dropout: float):
        super().__init__()
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(
                DenseClipConvNormAct(in_channels if step == 0 else channels, channels) for step in range(max(1, level))
            )
            for level in range(len(PYRAMID_STRIDES))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_labels, 1)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        output = None
        for level, (hidden_states, blocks) in enumerate(zip(features, self.scale_heads, strict=True)):
            for block in blocks:
                hidden_states = block(hidden_states)
                if level > 0:
                    hidden_states = _resize(hidden_states, (2 * hidden_states.shape[-2], 2 * hidden_states.shape[-1]))
            output = hidden_states if output is None else output + _resize(hidden_states, output.shape[-2:])
        return self.classifier(self.dropout(output))


class DenseClipSemanticFPNDecoder(DenseClipDecoder):
    """Semantic FPN, the paper's segmentation decoder (Sec. 4.1): an FPN neck, then the Semantic FPN head."""

    def __init__(self, config: DenseClipConfig, in_channels: list[int]):
        super().__init__()
        self.neck = DenseClipFPN(in_channels, config.fpn_channels)
        self.head = DenseClipSemanticFPNHead(
            config.fpn_channels, config.decode_head_channels, config.num_labels, config.decode_head_dropout
        )

    def forward(self, pyramid: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.head(self.neck(pyramid))


class DenseClipPyramidPooling(nn.Module):
    """UperNet's pyramid pooling module (PPM): the last level, average-pooled to each of `pool_scales` sizes, through a
    1x1 conv-BN-ReLU and upsampled back, concatenated with the level itself, fused by a 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, channels: int, pool_scales: list[int]):
        super().__init__()
        self.pool_scales = list(pool_scales)
        self.pools = nn.ModuleList(DenseClipConvNormAct(in_channels, channels, 1) for _ in self.pool_scales)
        self.bottleneck = DenseClipConvNormAct(in_channels + len(self.pool_scales) * channels, channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(batch, in_channels, h, w)` -> `(batch, channels, h, w)`."""
        pooled = [
            _resize(conv(F.adaptive_avg_pool2d(features, scale)), features.shape[-2:])
            for scale, conv in zip(self.pool_scales, self.pools, strict=True)
        ]
        return self.bottleneck(torch.cat([features, *pooled], dim=1))


class DenseClipUperNetDecoder(DenseClipDecoder):
    """UperNet (Xiao et al.), the decoder of the paper's Swin rows (Table 5): the PPM on the last level and 1x1
    laterals on the others, summed top-down (bilinear), 3x3 convs on the 3 finer levels, every level resized to
    stride 4, concatenated and fused by a 3x3 conv; dropout and a 1x1 classifier give `(batch, num_labels, H / 4,
    W / 4)`. All convs are conv-BN-ReLU with `decode_head_channels` channels (mmseg: 512). mmseg's UperNet configs
    add an auxiliary FCN head (weight 0.4) on level 3 in training; the paper does not mention it and it is left out.
    """

    def __init__(self, config: DenseClipConfig, in_channels: list[int]):
        super().__init__()
        channels = config.decode_head_channels
        self.pyramid_pooling = DenseClipPyramidPooling(in_channels[-1], channels, config.upernet_pool_scales)
        self.lateral_convs = nn.ModuleList(DenseClipConvNormAct(width, channels, 1) for width in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(DenseClipConvNormAct(channels, channels) for _ in in_channels[:-1])
        self.fusion = DenseClipConvNormAct(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(config.decode_head_dropout)
        self.classifier = nn.Conv2d(channels, config.num_labels, 1)

    def forward(self, pyramid: tuple[torch.Tensor, ...]) -> torch.Tensor:
        laterals = [conv(level) for conv, level in zip(self.lateral_convs, pyramid, strict=False)]
        laterals.append(self.pyramid_pooling(pyramid[-1]))
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + _resize(laterals[level], laterals[level - 1].shape[-2:])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        fused = self.fusion(torch.cat([_resize(output, outputs[0].shape[-2:]) for output in outputs], dim=1))
        return self.classifier(self.dropout(fused))


# The decoder of each `DenseClipConfig.decoder_type` (`DECODER_TYPES`).
DECODERS: dict[str, type[DenseClipDecoder]] = {
    "semantic_fpn": DenseClipSemanticFPNDecoder,
    "upernet": DenseClipUperNetDecoder,
}


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


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
    return _resize(_channels_last(logits), size).permute(0, 2, 3, 1)


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
    by the number of those (cell, class) pairs. An image without boxes contributes nothing (0 when none has any).
    """
    if score_map.ndim != 4 or len(boxes) != score_map.shape[0] or len(labels) != score_map.shape[0]:
        raise ValueError(
            f"score_map must be (batch, K, h, w) with one boxes and one labels tensor per image, got "
            f"{tuple(score_map.shape)}, {len(boxes)} boxes and {len(labels)} labels."
        )
    batch, num_labels = score_map.shape[:2]
    size = (image_size[0] // stride, image_size[1] // stride)
    logits = _resize(score_map.float() / temperature, size).flatten(2).transpose(1, 2)  # Eq. 8: s / tau, (b, H4W4, K)
    targets, masks = zip(
        *(detection_targets(box, label, num_labels, size, stride) for box, label in zip(boxes, labels, strict=True)),
        strict=True,
    )
    targets, masks = torch.stack(targets).to(logits.device), torch.stack(masks).to(logits.device)
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # Eq. 8
    return (losses * masks[..., None]).sum() / (masks.sum() * num_labels).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# Test protocol (the authors' slide_inference / inference / aug_test)
# ---------------------------------------------------------------------------------------------------------------------
# Module-level functions over `logits_fn(pixel_values) -> logits`: any callable that maps `(n, 3, h, w)` inputs to
# logits `(n, num_labels, h', w')` at any resolution (the model's single pass gives h' = h / 4).

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def slide_logits(
    logits_fn: LogitsFn, pixel_values: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """The authors' `slide_inference`: logits `(batch, num_labels, H, W)` at the input resolution.

    `pixel_values` `(batch, 3, H, W)` is cut into windows of `crop_size` every `stride` pixels (see
    `sliding_windows`; a side shorter than the crop is taken whole, so every window has the same size). All
    windows of the batch run through `logits_fn` as one batch (exact: in eval mode no layer mixes samples); each
    window's logits are bilinearly resized to the window, summed into place and divided by the number of windows
    covering each pixel. Accumulated in float32.
    """
    batch, _, height, width = pixel_values.shape
    window, corners = sliding_windows(height, width, crop_size, stride)
    crops = torch.cat([pixel_values[..., top : top + window[0], left : left + window[1]] for top, left in corners])
    window_logits = _resize(_channels_last(logits_fn(crops)), window).unflatten(0, (len(corners), batch))
    summed = torch.empty(
        (batch, window_logits.shape[2], height, width),
        dtype=window_logits.dtype,
        device=window_logits.device,
        memory_format=torch.channels_last,
    ).zero_()
    coverage = window_logits.new_zeros(1, 1, height, width)
    for (top, left), logits in zip(corners, window_logits, strict=True):
        summed[..., top : top + window[0], left : left + window[1]] += logits
        coverage[..., top : top + window[0], left : left + window[1]] += 1
    return summed.div_(coverage)


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
    return _resize(_channels_last(logits_fn(pixel_values)), pixel_values.shape[-2:])


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
    channels-last memory, see `_channels_last`).

    For each input `(batch, 3, H_i, W_i)` (the scales of a multi-scale test), and with `flip` also for its horizontal
    mirror: `protocol_logits`, bilinearly resized (align_corners=False) to `output_size`, soft-maxed over the classes
    (a mirrored input's probabilities mirrored back); the average of all of them, summed in the authors' order.
    """
    total, count = None, 0
    for pixel_values in inputs:
        for mirrored in (False, True) if flip else (False,):
            view = pixel_values.flip(-1) if mirrored else pixel_values
            logits = _resize(protocol_logits(logits_fn, view, mode, crop_size, stride), output_size)
            probabilities = _softmax_over_classes(logits)
            probabilities = probabilities.flip(-1) if mirrored else probabilities
            total = probabilities if total is None else total.add_(probabilities)
            count += 1
    return total.div_(count)


# ---------------------------------------------------------------------------------------------------------------------
# Building DenseCLIP on CLIP weights (`from_clip_pretrained`): resolve the source, tokenize the labels, load, check
# ---------------------------------------------------------------------------------------------------------------------

# CLIPModel checkpoint keys -> `DenseClipModel`'s CLIP towers. The converter writes ResNet towers with the same
# `vision_model.` prefix (a `DenseClipResNetVisionModel`), so one mapping serves both families.
CLIP_KEY_MAPPING = {
    r"^text_model\.": "text_encoder.text_model.",
    r"^text_projection\.": "text_encoder.text_projection.",
    r"^vision_model\.": "image_encoder.vision_model.",
    r"^visual_projection\.": "image_encoder.visual_projection.",
}
# `from_pretrained` arguments that say where and how to fetch files, shared by config, tokenizer and weights.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
_CONFIG_SETTINGS = frozenset(setting.name for setting in fields(DenseClipConfig))


@dataclass
class ClipSource:
    """Where `from_clip_pretrained` reads CLIP from: the towers' configs, how to load their weights, and the tokenizer
    that goes with them."""

    name: str
    text_config: PreTrainedConfig
    vision_config: PreTrainedConfig
    projection_dim: int
    weights: dict = field(repr=False)  # `from_pretrained` arguments that read the weights
    tokenizer_path: str
    tokenizer_kwargs: dict = field(default_factory=dict)


def resolve_clip_source(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
    **hub_kwargs,
) -> ClipSource:
    """Step 1: a transformers `CLIPModel` (Hub id or folder: its config, weights and tokenizer), or an OpenAI/OpenCLIP
    checkpoint file, converted in memory (`denseclip_hf.convert_clip_original_to_hf.convert_clip_checkpoint`)."""
    name = os.fspath(pretrained_model_name_or_path)
    if os.path.isfile(name):
        clip = convert_clip_checkpoint_file(
            name, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act
        )
        return ClipSource(
            name,
            clip.text_config,
            clip.vision_config,
            clip.projection_dim,
            weights={"pretrained_model_name_or_path": None, "state_dict": clip.state_dict},
            tokenizer_path=clip.tokenizer_path,
        )
    options = {"vision_heads": vision_heads, "text_heads": text_heads, "hidden_act": hidden_act}
    if any(value is not None for value in options.values()):
        raise ValueError(
            f"{sorted(option for option, value in options.items() if value is not None)} only apply to OpenAI or "
            f"OpenCLIP checkpoint files; {name!r} is read as a transformers CLIPModel, whose config already has them."
        )
    clip_config = CLIPConfig.from_pretrained(name, **hub_kwargs)
    return ClipSource(
        name,
        clip_config.text_config,
        clip_config.vision_config,
        clip_config.projection_dim,
        weights={"pretrained_model_name_or_path": name, **hub_kwargs},
        tokenizer_path=name,
        tokenizer_kwargs=hub_kwargs,
    )


def convert_clip_checkpoint_file(path: str, **options):
    """An OpenAI/OpenCLIP checkpoint file in this package's CLIP layout (a `ConvertedClip`): reading those formats is
    the converter's job, so this needs the `denseclip_hf` package (absent when this file runs as remote code)."""
    try:
        from denseclip_hf.convert_clip_original_to_hf import convert_clip_checkpoint
    except ImportError as error:
        raise ImportError(
            f"{path!r} is an OpenAI/OpenCLIP checkpoint file: reading it needs the denseclip_hf package, which is not "
            "installed here (`pip install denseclip_hf`). Or convert it to a transformers CLIPModel folder where the "
            "package is installed (`python -m denseclip_hf.convert_clip_original_to_hf`) and pass the folder."
        ) from error
    return convert_clip_checkpoint(path, **options)


def load_clip_tokenizer(source: ClipSource, tokenizer=None):
    """Step 2a: `tokenizer`, or the CLIP tokenizer that goes with `source`; a `ValueError` when there is none with the
    text tower's vocabulary."""
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path, **source.tokenizer_kwargs)
        except (OSError, ValueError) as error:
            tokenizer = error
    vocab_size = source.text_config.vocab_size
    # transformers 5 builds an empty tokenizer for a folder without vocabulary files: check the vocabulary size.
    if isinstance(tokenizer, Exception) or len(tokenizer) != vocab_size:
        found = tokenizer if isinstance(tokenizer, Exception) else f"a vocabulary of {len(tokenizer)} tokens"
        raise ValueError(
            f"No CLIP tokenizer with {vocab_size} tokens was found for {source.name!r} (got {found}); pass one with "
            "`tokenizer=CLIPTokenizer.from_pretrained(...)`."
        )
    return tokenizer


def tokenize_labels(id2label: dict[int, str], tokenizer, length: int) -> tuple[dict[int, str], list[list[int]]]:
    """Step 2b: `id2label` with int keys `0..K-1` (a `ValueError` otherwise) and the class names' token ids
    (`tokenize_class_names`)."""
    id2label = {int(label): name for label, name in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)}.")
    return id2label, tokenize_class_names([id2label[label] for label in range(len(id2label))], tokenizer, length)


def clip_denseclip_config(
    source: ClipSource, vision_config: PreTrainedConfig, id2label: dict[int, str], tokenizer, settings: dict
) -> DenseClipConfig:
    """The `DenseClipConfig` of a model built on a CLIP checkpoint: its text tower and projection width,
    `vision_config` (CLIP's own or a backbone's), the classes tokenized with the checkpoint's tokenizer (or
    `tokenizer`), and `settings`."""
    id2label, class_token_ids = tokenize_labels(
        id2label,
        load_clip_tokenizer(source, tokenizer),
        settings.get("class_name_token_length", DenseClipConfig.class_name_token_length),
    )
    return DenseClipConfig(
        text_config=source.text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=source.projection_dim,
        id2label=id2label,
        class_token_ids=class_token_ids,
        **settings,
    )


def check_clip_towers(
    loading_info: dict, source: ClipSource, tower_prefixes: tuple[str, ...], uses_text: bool = True
) -> None:
    """Step 4: a `ValueError` unless every CLIP tower tensor (keys starting with `tower_prefixes`) was loaded and the
    source held nothing else (CLIP's `logit_scale` aside, `_keys_to_ignore_on_load_unexpected`). A model whose
    prompting uses no text (`uses_text=False`, the CLIP + Semantic FPN baseline) leaves CLIP's text tower and image
    projection out: those tower tensors are not used."""
    unused = () if uses_text else tower_prefixes
    problems = {
        "missing": sorted(key for key in loading_info["missing_keys"] if key.startswith(tower_prefixes)),
        "unexpected": sorted(key for key in loading_info["unexpected_keys"] if not key.startswith(unused)),
        "mismatched": sorted(str(key) for key in loading_info["mismatched_keys"]),
    }
    if any(problems.values()):
        details = "; ".join(f"{kind}: {keys}" for kind, keys in problems.items() if keys)
        raise ValueError(f"{source.name!r} is not a complete CLIP checkpoint ({details}).")


# ---------------------------------------------------------------------------------------------------------------------
# Workarounds for transformers behaviour (`tests/test_transformers_behaviour.py` fails when the behaviour changes)
# ---------------------------------------------------------------------------------------------------------------------


def _is_not_a_load_report(record) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _without_load_report():
    """Drops the "LOAD REPORT" warning that transformers' `from_pretrained` (5.x, logger `transformers.modeling_utils`)
    writes whenever a checkpoint lacks tensors of the model. `from_clip_pretrained` loads a CLIP checkpoint, which
    lacks every DenseCLIP tensor by design, and checks the CLIP towers itself (`check_clip_towers`); transformers has
    no public switch for the report."""
    loading_logger = logging.get_logger("transformers.modeling_utils")
    loading_logger.addFilter(_is_not_a_load_report)
    try:
        yield
    finally:
        loading_logger.removeFilter(_is_not_a_load_report)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------

# The key layout of folders saved by version 0.1.0 (one model: `image_encoder.*`, `text_encoder.*`,
# `context_embeddings`, `prompting.*`, `neck.*`, `decode_head.*`) -> this version's. `from_pretrained` applies it to
# every checkpoint (its patterns match none of this version's keys), so old folders load unchanged.
_V0_1_0_BASE_MODEL_KEYS = {  # relative to DenseClipModel
    r"^(image_encoder|text_encoder|prompting)\.": r"\1.",
    r"^context_embeddings$": "prompting.context_embeddings",
}
_V0_1_0_DECODER_KEYS = {r"^neck\.": "decoder.neck.", r"^decode_head\.": "decoder.head."}


@contextmanager
def clear_loading_errors(source: Any, kwargs: dict) -> Iterator[None]:
    """The entry check of `from_pretrained` on a damaged folder: a local folder without `config.json` (when no
    `config=` is given) is an `OSError` up front, instead of a model built from the default config failing on the
    weights' shapes; a damaged `model.safetensors` (truncated, empty) is an `OSError` and a `config.json` value of
    the wrong type a `TypeError`, both naming the file and the fix."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) and kwargs.get("config") is None:
        subfolder = kwargs.get("subfolder") or ""
        if not os.path.isfile(os.path.join(source, subfolder, "config.json")):
            raise OSError(
                f"{os.path.join(source, subfolder)} has no config.json: save the model with `save_pretrained`, or "
                "pass `config=DenseClipConfig.from_pretrained(...)`."
            )
    try:
        yield
    except SafetensorError as error:
        raise OSError(
            f"The weights file (model.safetensors) of {source} is damaged ({error}): it was probably cut short by an "
            "interrupted save or download; save or download the model again."
        ) from error
    except StrictDataclassError as error:
        raise TypeError(
            f"config.json of {source} holds a value of the wrong type: {error} Fix the value in config.json (or "
            "save the config again with `DenseClipConfig.save_pretrained`)."
        ) from error


class DenseClipPreTrainedModel(PreTrainedModel):
    config: DenseClipConfig
    config_class = DenseClipConfig
    base_model_prefix = "denseclip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "DenseClipResNetBottleneck", "DenseClipContextDecoderLayer"]
    # CLIP's contrastive temperature is not part of DenseCLIP (the score map uses the fixed `temperature`).
    _keys_to_ignore_on_load_unexpected = [r"logit_scale"]

    @classmethod
    def _base_model_key_prefix(cls) -> str:
        """Where `DenseClipModel`'s tensors sit in this class's state dict: `""` in `DenseClipModel`, `"denseclip."` in
        the task models built on it."""
        return "" if issubclass(cls, DenseClipModel) else f"{cls.base_model_prefix}."

    @classmethod
    def _base_model_key_mapping(cls, mapping: dict[str, str]) -> dict[str, str]:
        """`mapping` (targets relative to `DenseClipModel`) for this class's state dict."""
        return {pattern: cls._base_model_key_prefix() + target for pattern, target in mapping.items()}

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, **kwargs):
        """`PreTrainedModel.from_pretrained`, also reading the key layout of version 0.1.0 and each other's
        checkpoints (`DenseClipModel` <-> task models); then the text tower is frozen again (loading makes tensors
        trainable)."""
        key_mapping = {
            **cls._base_model_key_mapping(_V0_1_0_BASE_MODEL_KEYS),
            **_V0_1_0_DECODER_KEYS,
            **(key_mapping or {}),
        }
        with clear_loading_errors(args[0] if args else kwargs.get("pretrained_model_name_or_path"), kwargs):
            loaded = super().from_pretrained(*args, key_mapping=key_mapping, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.base_model.freeze_text_encoder()
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, save_original_format: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, always in this version's key layout: transformers' default
        (`save_original_format=True`) would write a model loaded through a key mapping (`from_clip_pretrained`, an
        old folder) back in its source's layout."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @classmethod
    def from_clip_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        id2label: dict[int, str],
        tokenizer=None,
        *,
        vision_heads: int | None = None,
        text_heads: int | None = None,
        hidden_act: str | None = None,
        **kwargs,
    ):
        """Builds DenseCLIP on CLIP weights: a transformers `CLIPModel` (Hub id or folder; ViT), or a checkpoint file
        in OpenAI's or OpenCLIP's format (ViT or ResNet: OpenAI's `RN50.pt`, `ViT-B-16.pt`, an OpenCLIP state dict).

        The CLIP towers load bit-exactly; every DenseCLIP tensor gets its initial value from `_init_weights`.
        Class names (`id2label`) are tokenized with `tokenizer`, by default the CLIP tokenizer stored with the
        checkpoint (for a checkpoint file: the CLIP tokenizer shipped with this package), and kept in
        `config.class_token_ids`, so the resulting model needs no tokenizer.

        Args:
            pretrained_model_name_or_path: Hub id or local folder of a `CLIPModel` checkpoint, or the path of an
                OpenAI/OpenCLIP checkpoint file (converted in memory by `denseclip_hf.convert_clip_checkpoint`, which
                needs the package; TorchScript archives are read with `torch.jit.load`, so only load archives you
                trust).
            id2label: Class names by index, e.g. `{0: "wall", 1: "building"}`.
            tokenizer: A CLIP tokenizer, when the checkpoint has none.
            vision_heads, text_heads, hidden_act: Checkpoint files only, which do not store them: attention heads of
                the image tower (ViT, or the ResNet attention pool) and of the text tower, by default OpenAI's rule
                `channels // 64` (the pool has `32 * width` channels); and the activation of both transformers,
                `"quick_gelu"` by default (OpenAI's; OpenCLIP models without `-quickgelu` in their name use `"gelu"`).
            kwargs: `DenseClipConfig` settings (e.g. `num_context_tokens=8`), Hub arguments (`revision`,
                `cache_dir`, `local_files_only`, ...) and `from_pretrained` arguments (`dtype`, `attn_implementation`).
        """
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        settings = {key: kwargs.pop(key) for key in list(kwargs) if key in _CONFIG_SETTINGS}
        output_loading_info = kwargs.pop("output_loading_info", False)
        source = resolve_clip_source(
            pretrained_model_name_or_path,
            vision_heads=vision_heads,
            text_heads=text_heads,
            hidden_act=hidden_act,
            **hub_kwargs,
        )
        config = clip_denseclip_config(source, source.vision_config, id2label, tokenizer, settings)
        clip_key_mapping = cls._base_model_key_mapping(CLIP_KEY_MAPPING)
        with _without_load_report():
            model, info = cls.from_pretrained(
                **source.weights, config=config, key_mapping=clip_key_mapping, output_loading_info=True, **kwargs
            )
        check_clip_towers(info, source, tuple(clip_key_mapping.values()), model.base_model.prompting.uses_text)
        logger.info(
            f"Loaded the CLIP towers from {source.name!r}; {len(info['missing_keys'])} DenseCLIP tensors (contexts, "
            "context decoder, pyramid, decoder) are newly initialised."
        )
        return (model, info) if output_loading_info else model

    @classmethod
    def from_backbone_pretrained(
        cls,
        backbone_name_or_path: str | os.PathLike,
        clip_name_or_path: str | os.PathLike,
        id2label: dict[int, str],
        tokenizer=None,
        *,
        text_heads: int | None = None,
        hidden_act: str | None = None,
        **kwargs,
    ):
        """Builds DenseCLIP on any backbone (Sec. 4.3, Table 5): the image encoder is a transformers backbone
        checkpoint (e.g. an ImageNet ResNet or Swin; any model `AutoBackbone` loads) with a newly initialised attention
        pool over its last stage; the frozen text tower and the tokenizer come from a CLIP checkpoint (as in
        `from_clip_pretrained`; its image tower is not used). Every other DenseCLIP tensor is newly initialised.

        Args:
            backbone_name_or_path: Hub id or folder of the backbone checkpoint (its config and weights).
            clip_name_or_path, id2label, tokenizer, text_heads, hidden_act: As in `from_clip_pretrained`.
            kwargs: `DenseClipConfig` settings (e.g. `decoder_type="upernet"`), Hub arguments (used for both
                checkpoints) and `from_pretrained` arguments.
        """
        backbone_name_or_path = os.fspath(backbone_name_or_path)
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        settings = {key: kwargs.pop(key) for key in list(kwargs) if key in _CONFIG_SETTINGS}
        output_loading_info = kwargs.pop("output_loading_info", False)
        backbone_config = pyramid_backbone_config(AutoConfig.from_pretrained(backbone_name_or_path, **hub_kwargs))
        source = resolve_clip_source(clip_name_or_path, text_heads=text_heads, hidden_act=hidden_act, **hub_kwargs)
        config = clip_denseclip_config(source, backbone_config, id2label, tokenizer, settings)
        text_key_mapping = cls._base_model_key_mapping(
            {pattern: target for pattern, target in CLIP_KEY_MAPPING.items() if target.startswith("text_encoder.")}
        )
        with _without_load_report():
            model, info = cls.from_pretrained(
                **source.weights, config=config, key_mapping=text_key_mapping, output_loading_info=True, **kwargs
            )
        text_prefixes = tuple(text_key_mapping.values())
        missing = sorted(key for key in info["missing_keys"] if key.startswith(text_prefixes))
        if missing or info["mismatched_keys"]:
            raise ValueError(
                f"{source.name!r} is not a complete CLIP checkpoint (missing: {missing}; mismatched: "
                f"{info['mismatched_keys']})."
            )
        model.base_model.image_encoder.load_backbone_weights(backbone_name_or_path, **hub_kwargs)
        logger.info(
            f"Loaded the backbone from {backbone_name_or_path!r} and the CLIP text tower from "
            f"{source.name!r}; the attention pool, contexts, context decoder and decoder are newly initialised."
        )
        return (model, info) if output_loading_info else model

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # Workaround (test: tests/test_transformers_behaviour.py): for models defined outside transformers,
        # `PreTrainedModel._initialize_weights` skips every module whose own parameters are all loaded, including
        # modules with no parameters of their own (`DenseClipFPN`, `DenseClipResNetBottleneck`, ...), as it cannot
        # know whether their init would overwrite loaded tensors. `_init_weights` below only uses
        # `transformers.initialization`, which leaves loaded tensors alone, so every module gets its init.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config
        if isinstance(module, DenseClipModel):
            if config.class_token_ids is not None:
                init.copy_(module.class_token_ids, torch.tensor(config.class_token_ids))
        elif isinstance(module, DenseClipLanguageOnlyPrompting):
            init.trunc_normal_(module.context_embeddings, std=1.0, a=-2.0, b=2.0)
            if isinstance(module, DenseClipPostModelPrompting):
                init.constant_(module.gamma, config.gamma_init_value)
        elif isinstance(module, DenseClipPreModelPrompting):
            init.trunc_normal_(module.queries, std=1.0, a=-2.0, b=2.0)
        elif isinstance(module, DenseClipContextDecoder):
            for linear in (m for m in module.modules() if isinstance(m, nn.Linear)):
                init.trunc_normal_(linear.weight, std=config.initializer_range)
                if linear.bias is not None:
                    init.zeros_(linear.bias)
        elif isinstance(module, DenseClipTextEncoder):
            init.normal_(module.text_projection.weight, std=config.text_config.hidden_size**-0.5)
        elif isinstance(module, DenseClipViTImageEncoder) and module.needs_embeddings:
            init.normal_(module.visual_projection.weight, std=config.vision_config.hidden_size**-0.5)
        elif isinstance(module, DenseClipAttentionPool):
            # CLIP's init: std embed_dim ** -0.5 for the positions and every projection.
            std = module.q_proj.in_features**-0.5
            init.normal_(module.position_embedding, std=std)
            for linear in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                init.normal_(linear.weight, std=std)
                init.zeros_(linear.bias)
        elif isinstance(module, DenseClipResNetBottleneck):
            init.kaiming_normal_(module.expand.weight, mode="fan_out", nonlinearity="relu")
            init.zeros_(module.expand_norm.weight)  # CLIP's init: each residual branch starts at zero
        elif isinstance(module, DenseClipResNetShortcut):
            init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, DenseClipViTPyramid):
            for conv in (m for m in module.modules() if isinstance(m, nn.ConvTranspose2d)):
                init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
                init.zeros_(conv.bias)
        elif isinstance(module, DenseClipFPN):
            for conv in [*module.lateral_convs, *module.fpn_convs]:
                init.xavier_uniform_(conv.weight)
                init.zeros_(conv.bias)
        elif isinstance(module, DenseClipConvNormAct):
            init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (DenseClipSemanticFPNHead, DenseClipUperNetDecoder)):
            init.normal_(module.classifier.weight, std=0.01)
            init.zeros_(module.classifier.bias)


class DenseClipModel(DenseClipPreTrainedModel):
    """The DenseCLIP base model: pixels -> image encoder -> class text embeddings -> prompting -> pixel-text score map,
    joined to the pyramid (the language-guided features a decoder reads), as `SegformerModel` is to SegFormer.

    The parts come from the config (`image_encoder_family`, `prompting_type`). The CLIP text tower is frozen
    (`requires_grad=False`); gradients still flow through it to the learnable contexts.
    """

    # Loaded from a task model's checkpoint, the base model leaves its decoder out.
    _keys_to_ignore_on_load_unexpected = [*DenseClipPreTrainedModel._keys_to_ignore_on_load_unexpected, r"^decoder\."]

    def __init__(self, config: DenseClipConfig):
        super().__init__(config)
        self.prompting = PROMPTINGS[config.prompting_type](config)
        uses_text = self.prompting.uses_text
        self.image_encoder = IMAGE_ENCODERS[config.image_encoder_family](config, needs_embeddings=uses_text)
        self.text_encoder = DenseClipTextEncoder(config) if self.has_text_tower else None
        self.register_buffer(
            "class_token_ids",
            torch.tensor(config.class_token_ids) if config.class_token_ids is not None else None,
            persistent=False,
        )
        # t of a model whose text tower was removed (`remove_text_encoder`), saved with the weights.
        self.register_buffer(
            "class_text_embeddings",
            torch.zeros(config.num_labels, config.projection_dim) if config.text_encoder_removed else None,
        )
        # t computed in eval mode, with the state of every tensor it was computed from (`_text_embeddings_key`).
        self._text_embeddings_cache: tuple[tuple, torch.Tensor] | None = None
        self.freeze_text_encoder()
        self.post_init()

    def freeze_text_encoder(self) -> None:
        """The CLIP text tower trains no parameter of its own (the authors' `lr_mult=0`)."""
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)

    @property
    def has_text_tower(self) -> bool:
        """Whether the model has (or, being built, gets) the CLIP text tower: its prompting uses text and the tower was
        not removed for deployment (`remove_text_encoder`)."""
        return self.prompting.uses_text and not self.config.text_encoder_removed

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of the 4 levels of `DenseClipModelOutput.pyramid`: the image encoder's, plus the `num_labels`
        score-map channels on level `config.score_map_level` (none for a prompting without text)."""
        channels = list(self.image_encoder.pyramid_channels)
        if self.prompting.uses_text:
            channels[self.config.score_map_level] += self.config.num_labels
        return channels

    def resize_position_embeddings(self, image_size: int) -> None:
        """Resizes the image encoder's positional embedding to `image_size` x `image_size` inputs, once.

        The authors do this when they start from CLIP: its 224-pixel table (14x14 patches for ViT-B/16, 7x7 for the
        ResNets) becomes their crop size (640 -> 40x40, 512 -> 16x16), and that table is then trained. Without it the
        CLIP table is interpolated on every forward instead (the same values at the start, a different parameter to
        train). Inputs of any size still work afterwards. Updates the config's size of the table
        (`config.vision_config.image_size`; `config.backbone_attention_pool_image_size` for any backbone).
        """
        self.image_encoder.resize_position_embeddings(image_size)
        self.config.image_encoder_settings.set_position_embedding_size(self.config, image_size)

    def get_text_embeddings(
        self, image: DenseClipImageEncoderOutput | None = None, class_token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The class text embeddings t `(num_labels, projection_dim)`: the class names, after the prompting's contexts,
        through the CLIP text tower (Eq. 3). They do not depend on the image, except for promptings whose contexts do
        (`contexts_depend_on_image`, pre-model prompting): those need `image` and give t per image,
        `(batch, num_labels, projection_dim)`.

        `class_token_ids` `(classes, class_name_token_length)` (`tokenize_class_names` of other class names) gives
        the embeddings of those names instead, e.g. for `forward(text_embeddings=...)` with as many names as
        `num_labels`. In eval mode the model's own t is computed once and reused until anything it is computed from
        changes (weights, contexts, class token ids, device or dtype); see `_text_embeddings_key`.
        """
        if not self.prompting.uses_text:
            raise ValueError(
                f"prompting_type={self.config.prompting_type!r} (the CLIP + Semantic FPN baseline) uses no text: the "
                "model has no class text embeddings. Build it with a prompting that uses text (e.g. 'post_model')."
            )
        if self.text_encoder is None:
            if class_token_ids is not None:
                raise ValueError(
                    "This model's text tower was removed (`remove_text_encoder`): it cannot embed other class names. "
                    "Embed them with the model before removal and pass `text_embeddings=` to the forward."
                )
            if self.training:
                raise ValueError(
                    "This model's text tower was removed (`remove_text_encoder`) for deployment: its class text "
                    "embeddings are fixed and the learnable contexts cannot train. Train the model with its text "
                    "tower (the folder saved before `remove_text_encoder`), then remove it again."
                )
            return self.class_text_embeddings
        if class_token_ids is None and self.class_token_ids is None:
            raise ValueError(
                "This model has no class token ids: build it with `DenseClipForSemanticSegmentation."
                "from_clip_pretrained(..., id2label=...)` or set `config.class_token_ids` with "
                "`denseclip_hf.tokenize_class_names`."
            )
        if class_token_ids is not None or not self._can_cache_text_embeddings():
            token_ids = self.class_token_ids if class_token_ids is None else class_token_ids.to(self.device)
            return self.text_encoder(token_ids, self.prompting.text_contexts(image))
        key = self._text_embeddings_key()
        if self._text_embeddings_cache is None or self._text_embeddings_cache[0] != key:
            # Computed outside any `torch.inference_mode` of the caller, so that the cached tensor is a normal one.
            with torch.inference_mode(False), torch.no_grad():
                text_embeddings = self.text_encoder(self.class_token_ids, self.prompting.text_contexts(image))
            self._text_embeddings_cache = (key, text_embeddings)
        return self._text_embeddings_cache[1]

    def _text_inputs(self) -> list[torch.Tensor]:
        """Every tensor t is computed from: the class token ids, the text tower's and the prompting's parameters."""
        return [self.class_token_ids, *self.text_encoder.parameters(), *self.prompting.parameters()]

    def _can_cache_text_embeddings(self) -> bool:
        """t is cached in eval mode, for contexts that do not read the image, unless autograd needs its graph."""
        if self.training or self.prompting.contexts_depend_on_image:
            return False
        return not (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in self._text_inputs()))

    def _text_embeddings_key(self) -> tuple:
        """The state of every input of t: storage, in-place version (bumped by optimizer steps and `load_state_dict`),
        dtype and device of each tensor. Any change makes the cached t stale."""
        return tuple(
            (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device, tuple(tensor.shape))
            for tensor in self._text_inputs()
        )

    def _check_text_embeddings(self, text_embeddings: torch.Tensor) -> None:
        expected = (self.config.num_labels, self.config.projection_dim)
        if not isinstance(text_embeddings, torch.Tensor) or not text_embeddings.is_floating_point():
            raise TypeError(
                f"text_embeddings must be a floating-point tensor {expected}, got {type(text_embeddings)}."
            )
        if tuple(text_embeddings.shape) != expected:
            raise ValueError(
                f"text_embeddings must have shape (num_labels, projection_dim) = {expected}, got "
                f"{tuple(text_embeddings.shape)}: one embedding per class of the decoder, e.g. "
                "`model.get_text_embeddings(class_token_ids=...)` of as many class names."
            )

    def remove_text_encoder(self) -> None:
        """Stores the class text embeddings t in the model (`class_text_embeddings`, saved with the weights) and
        deletes the CLIP text tower, for deployment: a smaller model (ViT-B/16: 63 M parameters fewer) with the same
        outputs, which `save_pretrained` / `from_pretrained` keep (`config.text_encoder_removed`). Such a model cannot
        train (a `ValueError` in training mode) nor embed other class names."""
        if not self.prompting.uses_text:
            raise ValueError(
                f"prompting_type={self.config.prompting_type!r} (the CLIP + Semantic FPN baseline) has no text tower "
                "to remove."
            )
        if self.text_encoder is None:
            raise ValueError("This model's text tower is already removed.")
        if self.prompting.contexts_depend_on_image:
            raise ValueError(
                f"prompting_type={self.config.prompting_type!r} feeds the image into the text tower: its class text "
                "embeddings differ per image, so the tower cannot be removed."
            )
        was_training = self.training
        self.eval()
        text_embeddings = self.get_text_embeddings().detach().clone()
        self.train(was_training)
        self.text_encoder = None
        self._text_embeddings_cache = None
        self.class_text_embeddings = text_embeddings
        self.config.text_encoder_removed = True

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        text_embeddings: torch.Tensor | None = None,
        **kwargs,
    ) -> DenseClipModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalized images; height and width must be multiples of the patch size (ViT) or at least 32 (ResNet).
        output_hidden_states (`bool`, *optional*):
            Also return the 4 image-encoder pyramid levels before the score map is joined.
        text_embeddings (`torch.FloatTensor` of shape `(num_labels, projection_dim)`, *optional*):
            Class text embeddings t to use instead of the model's own (as CLIPSeg's `conditional_embeddings`), before
            prompting: e.g. `get_text_embeddings(class_token_ids=...)` of other class names, as many as `num_labels`.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        image = self.image_encoder(pixel_values)  # Eq. 1
        hidden_states = image.pyramid if output_hidden_states else None
        if not self.prompting.uses_text:
            if text_embeddings is not None:
                raise ValueError(
                    f"prompting_type={self.config.prompting_type!r} (the CLIP + Semantic FPN baseline) uses no text: "
                    "do not pass text_embeddings."
                )
            return DenseClipModelOutput(pyramid=image.pyramid, hidden_states=hidden_states)
        if text_embeddings is None:
            text_embeddings = self.get_text_embeddings(image)  # Eq. 3
        else:
            self._check_text_embeddings(text_embeddings)
        text_embeddings = self.prompting(text_embeddings, image)  # Eqs. 5-6
        score_map = pixel_text_score_map(image.dense_embedding, text_embeddings)  # Eq. 2
        return DenseClipModelOutput(
            pyramid=join_score_map(image.pyramid, score_map, self.config.score_map_level),  # x' = [x, s]
            score_map=score_map,
            global_embedding=image.global_embedding,
            dense_embedding=image.dense_embedding,
            text_embeddings=text_embeddings,
            hidden_states=hidden_states,
        )


class DenseClipForSemanticSegmentation(DenseClipPreTrainedModel):
    """DenseCLIP for semantic segmentation: `DenseClipModel`, a decoder (`config.decoder_type`, the Semantic FPN by
    default) on its language-guided pyramid, and the losses (Eq. 7)."""

    def __init__(self, config: DenseClipConfig):
        super().__init__(config)
        self.denseclip = DenseClipModel(config)
        self.decoder = DECODERS[config.decoder_type](config, self.denseclip.pyramid_channels)
        self.post_init()

    def resize_position_embeddings(self, image_size: int) -> None:
        """See `DenseClipModel.resize_position_embeddings`."""
        self.denseclip.resize_position_embeddings(image_size)

    def get_text_embeddings(self, class_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The class text embeddings t `(num_labels, projection_dim)` from the contexts (Eq. 3), or those of other
        class names' `class_token_ids`; see `DenseClipModel.get_text_embeddings`."""
        return self.denseclip.get_text_embeddings(class_token_ids=class_token_ids)

    def remove_text_encoder(self) -> None:
        """See `DenseClipModel.remove_text_encoder`: stores t, deletes the CLIP text tower (for deployment)."""
        self.denseclip.remove_text_encoder()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        test_mode: str | None = None,
        text_embeddings: torch.Tensor | None = None,
        **kwargs,
    ) -> DenseClipSemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalized images. The single pass needs height and width that are multiples of the patch size (ViT) or
            at least 32 (ResNet); a test protocol takes any size of at least 32.
        labels (`torch.LongTensor` of shape `(batch, height', width')`, *optional*):
            Class index per pixel (`config.semantic_loss_ignore_index` to ignore). Any size: logits and score map are
            bilinearly resized to it for the losses.
        output_hidden_states (`bool`, *optional*):
            Also return the 4 image-encoder pyramid levels (single pass only).
        test_mode (`str`, *optional*):
            `"plain"`: the single pass (logits at 1/4 of the input, score map, text embeddings, losses).
            `"slide"` / `"whole"`: the authors' test protocol (`config.test_crop_size`, `config.test_stride`), whose
            `logits` are at the input resolution, with `score_map`, `text_embeddings` and `hidden_states` `None`
            (see `predict_probabilities`). Default: `"plain"` in training mode or with `labels`, otherwise
            `config.test_mode`, so that an eval-mode call (and the `image-segmentation` pipeline) follows the
            model's test protocol.
        text_embeddings (`torch.FloatTensor` of shape `(num_labels, projection_dim)`, *optional*):
            Class text embeddings t to use instead of the model's own, in every pass and window (see
            `DenseClipModel.forward`).
        """
        if test_mode is None:
            test_mode = "plain" if self.training or labels is not None else self.config.test_mode
        if test_mode != "plain":
            if test_mode not in TEST_MODES:
                raise ValueError(f"test_mode={test_mode!r} is not one of {('plain', *TEST_MODES)} (or None).")
            if labels is not None:
                raise ValueError(
                    f"test_mode={test_mode!r} returns no loss: pass labels with test_mode='plain' (or None), and "
                    "evaluate a test protocol on its predictions (`predict_probabilities`)."
                )
            logits = self._protocol_logits(pixel_values, test_mode, text_embeddings)
            return DenseClipSemanticSegmenterOutput(logits=logits)
        outputs = self.denseclip(
            pixel_values, output_hidden_states=output_hidden_states, text_embeddings=text_embeddings
        )
        logits = self.decoder(outputs.pyramid)

        loss = decode_loss = identity_loss = None
        if labels is not None:
            loss, decode_loss, identity_loss = self.compute_loss(logits, outputs.score_map, labels)
        return DenseClipSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            score_map=outputs.score_map,
            text_embeddings=outputs.text_embeddings,
            decode_loss=decode_loss,
            identity_loss=identity_loss,
        )

    @torch.no_grad()
    def predict_probabilities(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        output_size: tuple[int, int],
        *,
        flip: bool = False,
        mode: str | None = None,
        crop_size: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Class probabilities by the authors' test protocol (their `slide_inference`, `inference` and `aug_test`).

        Per input: `mode="whole"` runs the model once; `mode="slide"` runs it on `crop_size` windows every `stride`
        pixels (the last window of a row or column shifted back inside the image, a side shorter than the crop
        taken whole), each window's logits bilinearly resized to the window, summed into place and divided by the
        number of windows covering each pixel. The logits are then bilinearly resized (align_corners=False) to
        `output_size` and soft-maxed; with `flip` each input also runs mirrored horizontally (its probabilities
        mirrored back); all results are averaged. Call `model.eval()` first (as the authors' test does).

        Like the authors' ViT, whose patch convolution ignores what does not fill a patch, each model input (a
        window, or a whole image or side shorter than the crop) is cut to a multiple of the patch size before the
        model runs; its logits are still resized to the full window.

        Args:
            pixel_values: Normalized images `(batch, 3, H, W)`, any size of at least 32; or a list of them, the inputs
                of a multi-scale test (each already resized, e.g. by `DenseClipImageProcessor(scale_ratios=...)`),
                all with the same batch. Moved to the model's device.
            output_size: `(height, width)` of the result, usually the original image size.
            flip: Also run each input mirrored horizontally (the authors' multi-scale test uses it).
            mode, crop_size, stride: `"slide"` or `"whole"`, the window size and the window step (int or
                `(height, width)`). Default: `config.test_mode`, `config.test_crop_size`, `config.test_stride`.

        Returns:
            `torch.FloatTensor` `(batch, num_labels, *output_size)`, float32, summing to 1 over the classes. Its
            memory is channels-last (each pixel's class probabilities contiguous, which makes the per-pixel softmax
            and `argmax(1)` fast); `.contiguous()` gives the usual layout where an operation needs it.
        """
        inputs = [pixel_values] if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
        if not inputs or not all(isinstance(item, torch.Tensor) and item.ndim == 4 for item in inputs):
            raise TypeError(
                "pixel_values must be a (batch, 3, height, width) tensor or a non-empty list of them (one per scale), "
                f"got {type(pixel_values).__name__}."
            )
        if len({item.shape[:2] for item in inputs}) > 1:
            raise ValueError(
                "The inputs of a multi-scale test must hold the same images, but their (batch, channels) differ: "
                f"{[tuple(item.shape) for item in inputs]}. Pass one tensor per scale, each of the whole batch."
            )
        size = tuple(output_size) if isinstance(output_size, (list, tuple, torch.Size)) else ()
        if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
            raise ValueError(f"output_size must be (height, width) of positive ints, got {output_size!r}.")
        mode, crop_size, stride = self._test_protocol(
            mode, crop_size, stride, owner="predict_probabilities", names=("mode", "crop_size", "stride")
        )
        for item in inputs:
            self._check_protocol_input(item)
        return protocol_probabilities(
            self._single_pass_logits,
            [item.to(self.device) for item in inputs],
            size,
            flip=flip,
            mode=mode,
            crop_size=crop_size,
            stride=stride,
        )

    def _test_protocol(
        self,
        mode: str | None = None,
        crop_size: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] | None = None,
        owner: str = "DenseClipConfig",
        names: tuple[str, str, str] = ("test_mode", "test_crop_size", "test_stride"),
    ) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """The given protocol settings, each defaulting to the config's, checked against this model."""
        config = self.config
        return check_test_protocol(
            config.test_mode if mode is None else mode,
            config.test_crop_size if crop_size is None else crop_size,
            config.test_stride if stride is None else stride,
            config.vision_config,
            owner=owner,
            names=names,
        )

    def _check_protocol_input(self, pixel_values: torch.Tensor) -> None:
        config = self.config
        minimum = max(PYRAMID_STRIDES[-1], input_size_multiple(config.vision_config))
        check_pixel_tensor(pixel_values, config.vision_config.num_channels, minimum, " for the test protocol")

    def _single_pass_logits(
        self, pixel_values: torch.Tensor, text_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`logits_fn` of the test protocol: the single pass on `pixel_values` cut to a multiple of the patch size
        (what the authors' patch convolution reads), logits `(batch, num_labels, h / 4, w / 4)`.

        It runs the parts, not `self.forward`: a wrapper around the forward (Accelerate's mixed-precision autocast
        decorator) is one `torch.autocast` object that is not re-entrant, and calling it again from inside itself
        leaves autocast switched on after the outer call returns."""
        multiple = input_size_multiple(self.config.vision_config)
        height, width = (side // multiple * multiple for side in pixel_values.shape[-2:])
        pixel_values = pixel_values[..., :height, :width]
        return self.decoder(self.denseclip(pixel_values, text_embeddings=text_embeddings).pyramid)

    def _protocol_logits(
        self, pixel_values: torch.Tensor, mode: str, text_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits `(batch, num_labels, H, W)` of the configured protocol with `mode` (see `predict_probabilities`)."""
        mode, crop_size, stride = self._test_protocol(mode)
        self._check_protocol_input(pixel_values)
        logits_fn = partial(self._single_pass_logits, text_embeddings=text_embeddings)
        return protocol_logits(logits_fn, pixel_values, mode, crop_size, stride)

    def compute_loss(
        self, logits: torch.Tensor, score_map: torch.Tensor | None, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Total, decode and (unweighted) identity loss for `labels` `(batch, H, W)`; without a score map (a
        prompting without text) the total is the decode loss and the identity loss `None`."""
        config = self.config
        labels = check_labels(labels, logits.shape[0], config.num_labels, config.semantic_loss_ignore_index)
        decode_loss = pixel_cross_entropy(logits, labels, config.semantic_loss_ignore_index, config.loss_reduction)
        if score_map is None:
            return decode_loss, decode_loss, None
        # Eq. 7: the score map, sharpened by tau, is itself a low-resolution segmentation.
        identity_loss = pixel_cross_entropy(
            score_map / config.temperature, labels, config.semantic_loss_ignore_index, config.loss_reduction
        )
        return decode_loss + config.identity_loss_weight * identity_loss, decode_loss, identity_loss


# ---------------------------------------------------------------------------------------------------------------------
# DenseCLIP as a transformers backbone: the language-guided pyramid for other models (`AutoBackbone`)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DenseClipBackboneOutput(BackboneOutput):
    r"""
    feature_maps (`tuple(torch.FloatTensor)`):
        The `config.out_features` levels of the language-guided pyramid, `(batch, channels[i], H / stride, W / stride)`
        (the score map joined onto level `config.score_map_level`).
    score_map (`torch.FloatTensor` of shape `(batch, num_labels, h, w)`):
        Pixel-text cosine similarities s (Eq. 2), for the auxiliary losses: `detection_score_map_loss` (Eq. 8) or
        the identity loss (Eq. 7).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The 4 image-encoder pyramid levels before the score map is joined.
    """

    score_map: torch.FloatTensor | None = None


class DenseClipBackbone(BackboneMixin, DenseClipPreTrainedModel):
    """DenseCLIP as a transformers backbone: `DenseClipModel`'s language-guided pyramid (x' = [x, s], Sec. 3.2) for
    any model that takes a `backbone_config` (`AutoBackbone.from_config(DenseClipBackboneConfig(...))`).

    `channels` are the `out_features` levels' channels (`DenseClipModel.pyramid_channels`). The output also carries
    the score map, so that a detector adds the Eq. 8 loss (`detection_score_map_loss`, see docs/backbone.md). Its
    weights sit under `denseclip.`, as in `DenseClipForSemanticSegmentation`: `from_pretrained` reads a DenseCLIP
    segmentation checkpoint's base model (its decoder is left out).
    """

    config: DenseClipBackboneConfig
    config_class = DenseClipBackboneConfig
    has_attentions = False
    # A segmentation checkpoint's decoder is not part of the backbone.
    _keys_to_ignore_on_load_unexpected = [*DenseClipPreTrainedModel._keys_to_ignore_on_load_unexpected, r"^decoder\."]

    def __init__(self, config: DenseClipBackboneConfig):
        super().__init__(config)
        self.denseclip = DenseClipModel(config)
        self.num_features = self.denseclip.pyramid_channels
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs
    ) -> DenseClipBackboneOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalized images, as for `DenseClipModel`.
        output_hidden_states (`bool`, *optional*):
            Also return the 4 image-encoder pyramid levels before the score map is joined.
        """
        outputs = self.denseclip(pixel_values, output_hidden_states=output_hidden_states)
        return DenseClipBackboneOutput(
            feature_maps=tuple(outputs.pyramid[index] for index in self.out_indices),
            score_map=outputs.score_map,
            hidden_states=outputs.hidden_states,
        )


# transformers renames the keys of a DETR checkpoint on load ("out_proj" -> "o_proj", "layers.N.fc1" ->
# "layers.N.mlp.fc1"; the reverse on save) for every key under the DETR model, its backbone's included. Applied after
# DETR's, these renamings (scoped to the backbone) undo that on DenseCLIP's keys, so that a DETR on `DenseClipBackbone`
# saves and loads (tests/test_backbone.py). A backbone saved on its own keeps DenseCLIP's key names.
register_checkpoint_conversion_mapping(
    DenseClipBackbone.__name__,
    [
        WeightRenaming(r"\.o_proj\.", ".out_proj."),
        WeightRenaming(r"context_decoder\.layers\.(\d+)\.mlp\.fc", r"context_decoder.layers.\1.fc"),
    ],
    overwrite=True,
)

__all__ = [
    "DenseClipBackbone",
    "DenseClipBackboneOutput",
    "DenseClipForSemanticSegmentation",
    "DenseClipModel",
    "DenseClipModelOutput",
    "DenseClipPreTrainedModel",
    "DenseClipSemanticSegmenterOutput",
    "detection_score_map_loss",
    "detection_targets",
    "pixel_text_score_map",
    "tokenize_class_names",
]
