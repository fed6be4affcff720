"""DenseCLIP: language-guided dense prediction with context-aware prompting (Rao et al., CVPR 2022).

Read top to bottom, this file follows the data:
pixels -> image encoder (CLIP ViT or ResNet) -> stride 4/8/16/32 pyramid, global and dense embeddings z_bar, z (Eq. 1)
-> class text embeddings t from learnable contexts (Eq. 3; or from the image, pre-model, Eq. 4)
-> prompting (post-model, Eqs. 5-6) -> pixel-text score map s (Eq. 2), joined to the pyramid (x' = [x, s])
-> decoder (Semantic FPN or UperNet) -> logits -> losses (Eq. 7, `loss_denseclip.py`).

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
             or DenseClipUperNetDecoder               pyramid_pooling (PPM), lateral_convs, fpn_convs, fusion
"""

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    MODEL_FOR_BACKBONE_MAPPING,
    AutoBackbone,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import QuickGELUActivation
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention_forward
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import selected_hidden_states

from .configuration_denseclip import (
    PYRAMID_STRIDES,
    TEST_MODES,
    BackboneSettings,
    ClipResNetSettings,
    ClipViTSettings,
    DenseClipBackboneConfig,
    DenseClipConfig,
    input_size_multiple,
    pyramid_backbone_config,
    resolve_test_protocol,
)
from .loading_denseclip import (
    V0_1_0_BASE_MODEL_KEYS,
    V0_1_0_DECODER_KEYS,
    clear_loading_errors,
    declare_pipeline_support,
    load_on_clip,
)
from .loss_denseclip import check_labels, pixel_cross_entropy
from .modeling_clip_resnet import (
    DenseClipAttentionPool,
    DenseClipConvNormAct,
    DenseClipResNetVisionModel,
    multi_head_attention,
    resize_attention_pool_grid,
    resize_position_embedding,
    stored_table_mode,
)
from .protocol_denseclip import protocol_logits, protocol_probabilities
from .tensor_ops import resize_bilinear

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DenseClipImageEncoderOutput(ModelOutput):
    r"""
    What every image encoder returns (see `DenseClipImageEncoder`).

    Args:
        stem (`torch.FloatTensor` of shape `(batch, stem_channels, h, w)`):
            The output of the encoder's stem, before its first pyramid stage (ViT: the patch tokens after the
            pre-norm, stride `patch_size`; CLIP ResNet: the 3-convolution stem, stride 4; any backbone: its stem).
        pyramid (`tuple(torch.FloatTensor)`):
            4 feature maps `(batch, channels_i, height / stride, width / stride)` for strides 4, 8, 16 and 32.
        global_embedding (`torch.FloatTensor` of shape `(batch, projection_dim)`):
            The global image embedding z_bar (Eq. 1); `None` from an encoder built with `needs_embeddings=False`.
        dense_embedding (`torch.FloatTensor` of shape `(batch, projection_dim, h, w)`):
            The language-compatible feature map z (Eq. 1), not normalized; stride `patch_size` (ViT) or 32 (ResNet);
            `None` from an encoder built with `needs_embeddings=False`.
    """

    stem: torch.FloatTensor | None = None
    pyramid: tuple[torch.FloatTensor, ...] | None = None
    global_embedding: torch.FloatTensor | None = None
    dense_embedding: torch.FloatTensor | None = None


@dataclass
class DenseClipModelOutput(ModelOutput):
    r"""
    Output of [`DenseClipModel`]: the language-guided pyramid and what it was made from.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, channels_3, height / 32, width / 32)`):
            The coarsest level of `pyramid` (stride 32; with the score map's channels where `score_map_level` is 3).
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
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
            The image encoder's stem output and its 4 pyramid levels before the score map is joined, 5 maps
            (`DenseClipImageEncoderOutput`; see `select_hidden_states` for a selection).
    """

    last_hidden_state: torch.FloatTensor | None = None
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
            Per-pixel class scores at a quarter of the input size (the single pass, in training and eval mode);
            `(batch, num_labels, height, width)` at the input size for a test protocol (`forward(test_mode="slide" |
            "whole")`, which the processor's output asks for), whose other outputs are then `None`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
            The image encoder's stem output and its 4 pyramid levels `(batch, channels, height / stride, width /
            stride)` for strides 4, 8, 16 and 32, before the score map is concatenated (see
            `DenseClipModelOutput.hidden_states`).
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


def select_hidden_states(
    hidden_states: tuple[torch.Tensor, ...], output_hidden_states: bool | int | Sequence[int] | None
) -> tuple[torch.Tensor | None, ...] | None:
    """What `output_hidden_states` asks for, by transformers 5's convention: `None` / `False` -> `None`; `True` -> all
    of `hidden_states`; an index or a list of them (negative ones count from the end) -> a tuple of the same length
    holding the selected states and `None` elsewhere."""
    if output_hidden_states is None or output_hidden_states is False:
        return None
    selected = selected_hidden_states(output_hidden_states)
    if selected is None:
        return tuple(hidden_states)
    kept = {index % len(hidden_states) for index in selected if -len(hidden_states) <= index < len(hidden_states)}
    return tuple(state if index in kept else None for index, state in enumerate(hidden_states))


# ---------------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------------


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


class DenseClipQuickGelu(nn.Module):
    """CLIP's activation `x * sigmoid(1.702 x)` (transformers' `quick_gelu`) with one new full-size tensor instead of
    three: `x * 1.702` is computed into a new tensor, the sigmoid and the product with `x` in place in it (the same
    values: `s * x == x * s`). Where autograd records the product (`x` requires a gradient), it is a new tensor, as the
    sigmoid's backward reads the sigmoid's output. In a ViT-B/16 MLP at 1025 tokens (`(1, 1025, 3072)`, 2 CPU
    threads) it takes about two thirds of the time of transformers' version (docs/benchmarks.md)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., features)` -> `(..., features)`."""
        gates = (hidden_states * 1.702).sigmoid_()
        if hidden_states.requires_grad and torch.is_grad_enabled():
            return hidden_states * gates
        return gates.mul_(hidden_states)


def use_fewer_pass_activations(layers: nn.ModuleList) -> None:
    """Gives the MLP of each CLIP encoder layer in `layers` `DenseClipQuickGelu` in place of transformers'
    `QuickGELUActivation` (the same values); layers with another activation (OpenCLIP's `gelu`) keep theirs."""
    for layer in layers:
        if isinstance(layer.mlp.activation_fn, QuickGELUActivation):
            layer.mlp.activation_fn = DenseClipQuickGelu()


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

    def _init_denseclip_weights(self) -> None:
        for conv in (module for module in self.modules() if isinstance(module, nn.ConvTranspose2d)):
            init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
            init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`features`: 4 maps `(batch, channels, h, w)` -> 4 maps `(batch, channels, H / stride, W / stride)`, in
        channels-last memory.

        The token maps come in channels-last memory (each patch's channels contiguous), but the GroupNorm returns
        channels-first maps: put back in channels-last, the transposed convolutions run oneDNN's channels-last
        kernels (the same values, at about half the CPU time of the 64x64 -> 128x128 one) and so does everything
        after them (the decoder's convolutions)."""
        outputs = []
        for level, feature in zip(self.levels, features, strict=True):
            hidden_states = level[0](feature).contiguous(memory_format=torch.channels_last)
            for layer in level[1:]:
                hidden_states = layer(hidden_states)
            outputs.append(hidden_states)
        return tuple(outputs)


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
        use_fewer_pass_activations(self.vision_model.encoder.layers)
        self.pyramid = DenseClipViTPyramid(vision_config.hidden_size, vision_config.patch_size)
        self.feature_layers = list(config.vision_feature_layers)
        self.interpolation = config.position_embedding_interpolation
        # Stochastic depth as in the authors' ViT (rates rising linearly to `drop_path_rate` at the last layer).
        # transformers' CLIP layers have none: hooks on each layer's two residual branches add it.
        # The rates are the authors' float32 `torch.linspace` values, computed on the CPU also when the model is built
        # on the meta device (`from_pretrained`, big-model loading).
        rates = torch.linspace(0, config.drop_path_rate, vision_config.num_hidden_layers, device="cpu").tolist()
        for layer, rate in zip(self.vision_model.encoder.layers, rates, strict=True):
            if rate > 0:
                layer.self_attn.register_forward_hook(partial(_drop_path_hook, rate))
                layer.mlp.register_forward_hook(partial(_drop_path_hook, rate))

    def _init_denseclip_weights(self) -> None:
        if self.needs_embeddings:  # CLIP's init
            init.normal_(self.visual_projection.weight, std=self.visual_projection.in_features**-0.5)

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
            embeddings.position_embedding.weight.detach(), (side, side), stored_table_mode(self.interpolation)
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

        def patch_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, 1:].transpose(1, 2).unflatten(2, (height, width))

        # The stem map is what the layers read (the class token put back in front), so gradients reach it.
        stem, features = patch_map(hidden_states), []
        hidden_states = torch.cat([hidden_states[:, :1], stem.flatten(2).transpose(1, 2)], dim=1)
        for index, layer in enumerate(self.vision_model.encoder.layers):
            hidden_states = layer(hidden_states, None)
            if index in self.feature_layers:
                features.append(patch_map(hidden_states))
        if not self.needs_embeddings:
            return DenseClipImageEncoderOutput(stem=stem, pyramid=self.pyramid(features))
        # Eq. 1 (ViT): post_layernorm + projection of ALL final tokens; token 0 is z_bar, the others form z.
        embeddings = self.visual_projection(self.vision_model.post_layernorm(hidden_states))
        return DenseClipImageEncoderOutput(
            stem=stem,
            pyramid=self.pyramid(features),
            global_embedding=embeddings[:, 0],
            dense_embedding=patch_map(embeddings),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Image encoder, CLIP ResNet (`modeling_clip_resnet.py`): 4 stages (the pyramid), attention pool (z_bar, z, Eq. 1)
# ---------------------------------------------------------------------------------------------------------------------


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
        features, global_embedding, dense_embedding = self.vision_model(
            pixel_values.to(self.vision_model.stem.layers[0].conv.weight.dtype)
        )
        return DenseClipImageEncoderOutput(
            stem=features[0], pyramid=features[1:], global_embedding=global_embedding, dense_embedding=dense_embedding
        )

    def resize_position_embeddings(self, image_size: int) -> None:
        resize_attention_pool_grid(self.vision_model.attention_pool, image_size)


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
        """Replaces by `nn.Identity` the modules a transformers backbone keeps but DenseCLIP never trains through, so
        that every trainable parameter gets a gradient, as multi-process training (DDP) requires: those whose weights
        checkpoints may lack (`_keys_to_ignore_on_load_missing`; SwinBackbone: SwinModel's final `layernorm`), and the
        norm some backbones (Swin, ConvNeXt) add to the stem they return (`hidden_states_norms`): the stem is a hidden
        state only, read by no decoder, so it comes back as the backbone's embedding output itself."""
        patterns = [re.compile(pattern) for pattern in self.backbone._keys_to_ignore_on_load_missing or ()]
        for name, module in list(self.backbone.named_modules()):
            own = [f"{name}.{parameter}" for parameter, _ in module.named_parameters(recurse=False)]
            if name and own and all(any(pattern.search(key) for pattern in patterns) for key in own):
                self.backbone.set_submodule(name, nn.Identity())
        stem_norms = getattr(self.backbone, "hidden_states_norms", None)
        if isinstance(stem_norms, nn.ModuleDict) and self.backbone.stage_names[0] in stem_norms:
            stem_norms[self.backbone.stage_names[0]] = nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> DenseClipImageEncoderOutput:
        self.check_pixel_values(pixel_values)
        if any(side < PYRAMID_STRIDES[-1] or side % PYRAMID_STRIDES[-1] for side in pixel_values.shape[-2:]):
            raise ValueError(
                f"pixel_values height and width must be multiples of {PYRAMID_STRIDES[-1]} (the backbone's last stage "
                f"has stride {PYRAMID_STRIDES[-1]}), got {tuple(pixel_values.shape[-2:])}."
            )
        dtype = next(self.backbone.parameters()).dtype
        stem, *pyramid = self.backbone(pixel_values.to(dtype)).feature_maps
        if self.attention_pool is None:
            return DenseClipImageEncoderOutput(stem=stem, pyramid=tuple(pyramid))
        global_embedding, dense_embedding = self.attention_pool(pyramid[-1])
        return DenseClipImageEncoderOutput(
            stem=stem, pyramid=tuple(pyramid), global_embedding=global_embedding, dense_embedding=dense_embedding
        )

    def resize_position_embeddings(self, image_size: int) -> None:
        resize_attention_pool_grid(self.attention_pool, image_size)

    def load_backbone_weights(self, name_or_path: str | os.PathLike, **hub_kwargs) -> None:
        """Copies the weights of a backbone checkpoint (Hub id or folder; an image classifier's too) into
        `backbone`; a `ValueError` when its architecture differs from this encoder's."""
        config = self.backbone.config
        # The backbone class itself: `AutoBackbone.from_pretrained` (transformers 5.25) takes every name for a Hub
        # repository id, even a local folder (an absolute path fails validation, a relative one asks the Hub).
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
        use_fewer_pass_activations(self.text_model.encoder.layers)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)

    def _init_denseclip_weights(self) -> None:
        init.normal_(self.text_projection.weight, std=self.text_projection.in_features**-0.5)  # CLIP's init

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
            if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
                # The layer's own checkpointing (`gradient_checkpointing_enable`), around the shared-prefix step.
                prefix, names = layer._gradient_checkpointing_func(partial(_shared_prefix_layer, layer), prefix, names)
            else:
                prefix, names = _shared_prefix_layer(layer, prefix, names)
        # Each prompt's positions after the contexts: the last context's output, then the name tokens'.
        hidden_states = torch.cat([prefix[:, -1:].repeat_interleave(num_classes, dim=0), names], dim=1)
        hidden_states = text_model.final_layer_norm(hidden_states)
        prompts = torch.arange(groups * num_classes, device=hidden_states.device)
        pooled = hidden_states[prompts, end_indices.repeat(groups)]
        return self.text_projection(pooled).view(groups, num_classes, -1)


def _masked_attention(config: CLIPTextConfig) -> Callable:
    """The attention function of the text tower's `attn_implementation` for a given mask: CLIP's eager attention, or
    transformers' SDPA one (also under flash-attention / flex implementations, whose kernels take no arbitrary
    mask)."""
    if config._attn_implementation == "eager":
        return clip_eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _shared_prefix_layer(
    layer: nn.Module, prefix: torch.Tensor, names: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm CLIP text layer (causal self-attention, MLP) over prompts that share their first positions.

    `prefix` `(groups, P, hidden)`: the shared positions of each group of prompts; `names` `(groups * classes, S,
    hidden)`: the positions after them, group by group. The prefix attends causally to itself; each prompt's later
    positions attend to its group's whole prefix and causally to their own prompt, as in the full causal sequence.
    Attention runs through the layer's attention implementation (`_masked_attention`).
    """
    attention = layer.self_attn
    attend = _masked_attention(attention.config)
    groups, prefix_length = prefix.shape[:2]
    prompts_per_group, name_length = names.shape[0] // groups, names.shape[1]
    dropout = attention.dropout if layer.training else 0.0

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (attention.num_heads, -1)).transpose(1, 2)

    def per_prompt(states: torch.Tensor) -> torch.Tensor:
        return states.repeat_interleave(prompts_per_group, dim=0)

    def attended(queries, keys, values, allowed: torch.Tensor) -> torch.Tensor:
        """`allowed` `(Q, K)` bool -> the output projection of the attention, `(batch, Q, hidden)`."""
        mask = torch.zeros(allowed.shape, dtype=queries.dtype, device=queries.device)
        mask = mask.masked_fill(~allowed, torch.finfo(queries.dtype).min)[None, None]
        output, _ = attend(
            attention, heads(queries), heads(keys), heads(values), mask, scaling=attention.scale, dropout=dropout
        )
        return attention.out_proj(output.flatten(2))

    normed_prefix, normed_names = layer.layer_norm1(prefix), layer.layer_norm1(names)
    prefix_keys, prefix_values = attention.k_proj(normed_prefix), attention.v_proj(normed_prefix)
    causal = torch.ones(prefix_length, prefix_length, dtype=torch.bool, device=prefix.device).tril()
    attended_prefix = attended(attention.q_proj(normed_prefix), prefix_keys, prefix_values, causal)
    keys = torch.cat([per_prompt(prefix_keys), attention.k_proj(normed_names)], dim=1)
    values = torch.cat([per_prompt(prefix_values), attention.v_proj(normed_names)], dim=1)
    after_prefix = torch.ones(name_length, prefix_length + name_length, dtype=torch.bool, device=names.device)
    attended_names = attended(attention.q_proj(normed_names), keys, values, after_prefix.tril(prefix_length))
    prefix, names = prefix + attended_prefix, names + attended_names
    return prefix + layer.mlp(layer.layer_norm2(prefix)), names + layer.mlp(layer.layer_norm2(names))


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


class DenseClipContextDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm Transformer decoder layer: self-attention, cross-attention to the visual context, 4x GELU MLP
    (recomputed in the backward pass under gradient checkpointing)."""

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
        self.initializer_range = config.initializer_range

    def _init_denseclip_weights(self) -> None:
        for linear in (module for module in self.modules() if isinstance(module, nn.Linear)):
            init.trunc_normal_(linear.weight, std=self.initializer_range)
            if linear.bias is not None:
                init.zeros_(linear.bias)

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

    def _init_denseclip_weights(self) -> None:
        init.trunc_normal_(self.context_embeddings, std=1.0, a=-2.0, b=2.0)

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
        self.gamma_init_value = float(config.gamma_init_value)
        self.gamma = nn.Parameter(torch.full((config.projection_dim,), self.gamma_init_value))

    def _init_denseclip_weights(self) -> None:
        super()._init_denseclip_weights()
        init.constant_(self.gamma, self.gamma_init_value)

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

    def _init_denseclip_weights(self) -> None:
        init.trunc_normal_(self.queries, std=1.0, a=-2.0, b=2.0)

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
    score_map = resize_bilinear(score_map, features[level].shape[-2:]).to(features[level].dtype)
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
    """Feature Pyramid Network neck (mmseg's / mmdet's `FPN`): 1x1 laterals on the input levels from `start_level` on,
    nearest top-down sums, 3x3 output convolutions (plain convolutions with bias, no activation); then `extra_levels`
    coarser levels, each of half the previous size (rounded up).

    The extra levels are stride-2 3x3 convolutions (`extra_convs`) when `extra_level_convs`: the first reads the last
    input level (mmdet's `add_extra_convs="on_input"`), the next ones the previous output, with no activation between
    (RetinaNet's P6, P7); otherwise they max-pool the previous output with kernel 1 and stride 2 (Mask R-CNN's P6).
    The segmentation models use 4 levels and none extra.

    Weights start as mmseg's FPN (`conv_init="xavier_uniform"`), or as the authors' detectors, which never apply their
    FPN's init config: mmcv `ConvModule`'s own init, `"kaiming_normal"` (fan-out, ReLU gain), zero biases.
    """

    def __init__(
        self,
        in_channels: list[int],
        channels: int,
        start_level: int = 0,
        extra_levels: int = 0,
        extra_level_convs: bool = False,
        conv_init: str = "xavier_uniform",
    ):
        super().__init__()
        if conv_init not in ("xavier_uniform", "kaiming_normal"):
            raise ValueError(f"conv_init={conv_init!r} must be 'xavier_uniform' or 'kaiming_normal'.")
        self.start_level, self.extra_levels, self.conv_init = start_level, extra_levels, conv_init
        inputs = in_channels[start_level:]
        self.lateral_convs = nn.ModuleList(nn.Conv2d(width, channels, 1) for width in inputs)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in inputs)
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(inputs[-1] if level == 0 else channels, channels, 3, stride=2, padding=1)
            for level in range(extra_levels if extra_level_convs else 0)
        )

    def _init_denseclip_weights(self) -> None:
        for conv in [*self.lateral_convs, *self.fpn_convs, *self.extra_convs]:
            if self.conv_init == "kaiming_normal":
                init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            else:
                init.xavier_uniform_(conv.weight)
            init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Maps `(batch, in_channels[i], h_i, w_i)` -> the maps of levels `start_level` on, then the extra levels, all
        `(batch, channels, h, w)`."""
        inputs = features[self.start_level :]
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, inputs, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):  # summed in place: a convolution keeps no output for backward
            laterals[level - 1] += F.interpolate(laterals[level], size=laterals[level - 1].shape[-2:], mode="nearest")
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=True)]
        hidden_states = inputs[-1]
        for conv in self.extra_convs:
            hidden_states = conv(hidden_states)
            outputs.append(hidden_states)
        for _ in range(self.extra_levels - len(self.extra_convs)):
            outputs.append(F.max_pool2d(outputs[-1], 1, stride=2))
        return tuple(outputs)


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

    def _init_denseclip_weights(self) -> None:
        init.normal_(self.classifier.weight, std=0.01)
        init.zeros_(self.classifier.bias)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        output = None
        for level, (hidden_states, blocks) in enumerate(zip(features, self.scale_heads, strict=True)):
            for block in blocks:
                hidden_states = block(hidden_states)
                if level > 0:
                    hidden_states = resize_bilinear(
                        hidden_states, (2 * hidden_states.shape[-2], 2 * hidden_states.shape[-1])
                    )
            # Levels 1-3 end in a resize, whose fresh output takes the sum in place (the same values: a + b == b + a).
            output = (
                hidden_states if output is None else resize_bilinear(hidden_states, output.shape[-2:]).add_(output)
            )
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
            resize_bilinear(conv(F.adaptive_avg_pool2d(features, scale)), features.shape[-2:])
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

    def _init_denseclip_weights(self) -> None:
        init.normal_(self.classifier.weight, std=0.01)
        init.zeros_(self.classifier.bias)

    def forward(self, pyramid: tuple[torch.Tensor, ...]) -> torch.Tensor:
        laterals = [conv(level) for conv, level in zip(self.lateral_convs, pyramid, strict=False)]
        laterals.append(self.pyramid_pooling(pyramid[-1]))
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + resize_bilinear(
                laterals[level], laterals[level - 1].shape[-2:]
            )
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        fused = self.fusion(torch.cat([resize_bilinear(output, outputs[0].shape[-2:]) for output in outputs], dim=1))
        return self.classifier(self.dropout(fused))


# The decoder of each `DenseClipConfig.decoder_type` (`DECODER_TYPES`).
DECODERS: dict[str, type[DenseClipDecoder]] = {
    "semantic_fpn": DenseClipSemanticFPNDecoder,
    "upernet": DenseClipUperNetDecoder,
}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


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
            **cls._base_model_key_mapping(V0_1_0_BASE_MODEL_KEYS),
            **V0_1_0_DECODER_KEYS,
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
                `cache_dir`, `local_files_only`, ...), `from_pretrained` arguments (`dtype`, `attn_implementation`)
                and `position_embedding_size`: the input size (pixels) CLIP's positional embedding is resized to once
                loaded (`resize_position_embeddings`), by default the config class's `clip_position_embedding_size`:
                the detectors' the authors' `input_resolution` 1344 (a 42 x 42 grid for the ResNets), segmentation's
                `None` (CLIP's grid kept).
        """
        return load_on_clip(
            cls,
            pretrained_model_name_or_path,
            id2label,
            tokenizer,
            kwargs,
            vision_heads=vision_heads,
            text_heads=text_heads,
            hidden_act=hidden_act,
        )

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
        return load_on_clip(
            cls,
            clip_name_or_path,
            id2label,
            tokenizer,
            kwargs,
            backbone_name_or_path=backbone_name_or_path,
            text_heads=text_heads,
            hidden_act=hidden_act,
        )

    @classmethod
    def is_custom_code(cls) -> bool:
        """Workaround (test: tests/test_transformers_behaviour.py): for a model whose code is not transformers' own
        ("custom code"), transformers' weight initialisation skips every module whose own parameters are all loaded,
        including modules with no parameters of their own (`DenseClipFPN`, `CLIPAttention`, ...), as it cannot know
        whether their init would overwrite loaded tensors; and it passes that on to the nested CLIP towers. DenseCLIP's
        and CLIP's `_init_weights` use only `transformers.initialization`, which leaves loaded tensors alone, so the
        path of transformers' own models applies: every module gets its init, the CLIP towers CLIP's."""
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation, then the module's own (`_init_denseclip_weights`): every DenseCLIP building
        block with an initialisation of its own defines it next to its parameters, using `transformers.initialization`
        (which leaves loaded tensors alone)."""
        super()._init_weights(module)
        if hasattr(module, "_init_denseclip_weights"):
            module._init_denseclip_weights()


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

    def _init_denseclip_weights(self) -> None:
        if self.class_token_ids is not None:
            init.copy_(self.class_token_ids, torch.tensor(self.config.class_token_ids))
        if self.class_text_embeddings is not None:
            init.zeros_(self.class_text_embeddings)

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
        output_hidden_states: bool | list[int] | None = None,
        text_embeddings: torch.Tensor | None = None,
        **kwargs,
    ) -> DenseClipModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalized images; height and width must be multiples of the patch size (ViT) or at least 32 (ResNet).
        output_hidden_states (`bool` or `list[int]`, *optional*):
            Also return the image encoder's stem output and its 4 pyramid levels before the score map is joined, 5
            maps (`True`), or those of the given indices (`[0, -1]`: the stem and the stride-32 level; the others
            `None`). Default: `config.output_hidden_states`.
        text_embeddings (`torch.FloatTensor` of shape `(num_labels, projection_dim)`, *optional*):
            Class text embeddings t to use instead of the model's own (as CLIPSeg's `conditional_embeddings`), before
            prompting: e.g. `get_text_embeddings(class_token_ids=...)` of other class names, as many as `num_labels`.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        image = self.image_encoder(pixel_values)  # Eq. 1
        hidden_states = select_hidden_states((image.stem, *image.pyramid), output_hidden_states)
        if not self.prompting.uses_text:
            if text_embeddings is not None:
                raise ValueError(
                    f"prompting_type={self.config.prompting_type!r} (the CLIP + Semantic FPN baseline) uses no text: "
                    "do not pass text_embeddings."
                )
            return DenseClipModelOutput(
                last_hidden_state=image.pyramid[-1], pyramid=image.pyramid, hidden_states=hidden_states
            )
        if text_embeddings is None:
            text_embeddings = self.get_text_embeddings(image)  # Eq. 3
        else:
            self._check_text_embeddings(text_embeddings)
        text_embeddings = self.prompting(text_embeddings, image)  # Eqs. 5-6
        score_map = pixel_text_score_map(image.dense_embedding, text_embeddings)  # Eq. 2
        joined = score_map / self.config.temperature if self.config.join_score_map_over_temperature else score_map
        pyramid = join_score_map(image.pyramid, joined, self.config.score_map_level)  # x' = [x, s] (or [x, s / tau])
        return DenseClipModelOutput(
            last_hidden_state=pyramid[-1],
            pyramid=pyramid,
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
        output_hidden_states: bool | list[int] | None = None,
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
        output_hidden_states (`bool` or `list[int]`, *optional*):
            Also return the image encoder's stem and its 4 pyramid levels (see `DenseClipModel.forward`). The single
            pass only: a test protocol runs several passes (windows) or a resized input, and raises a `ValueError`
            when hidden states are asked for (here or by `config.output_hidden_states`).
        test_mode (`str`, *optional*):
            `None` or `"plain"` (the default, in training and in eval mode alike): the single pass, logits at 1/4 of
            the input `(batch, num_labels, height / 4, width / 4)`, score map, text embeddings, hidden states and,
            with `labels`, the losses. `"slide"` / `"whole"`: the authors' test protocol with the model's window
            (`config.test_crop_size`, `config.test_stride`), `logits` at the input resolution `(batch, num_labels,
            height, width)` and every other output `None` (see `predict_probabilities` for probabilities, other
            windows, multi-scale and flips). `DenseClipImageProcessor` puts its `test_mode` in its output for images
            without label maps, so `model(**processor(images=...))` and the `image-segmentation` pipeline follow the
            paper's protocol.
        text_embeddings (`torch.FloatTensor` of shape `(num_labels, projection_dim)`, *optional*):
            Class text embeddings t to use instead of the model's own, in every pass and window (see
            `DenseClipModel.forward`).
        """
        if test_mode not in (None, "plain"):
            if test_mode not in TEST_MODES:
                raise ValueError(f"test_mode={test_mode!r} is not one of {('plain', *TEST_MODES)} (or None).")
            if labels is not None:
                raise ValueError(
                    f"test_mode={test_mode!r} returns no loss: pass labels with test_mode='plain' (or None), and "
                    "evaluate a test protocol on its predictions (`predict_probabilities`)."
                )
            if output_hidden_states is None:
                output_hidden_states = self.config.output_hidden_states
            if output_hidden_states not in (None, False):
                raise ValueError(
                    f"test_mode={test_mode!r} runs the model on windows or a resized input, so it has no hidden "
                    "states of the input: ask for them with the single pass (test_mode=None), or set "
                    "output_hidden_states=False (also in the config)."
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
                `(height, width)`). What is left out follows `resolve_test_protocol`: `config.test_mode`,
                `config.test_crop_size`, `config.test_stride`, except that a `crop_size` given without a `stride` gets
                two thirds of it (the authors' rule).

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
        mode, crop_size, stride = resolve_test_protocol(
            self.config, mode, crop_size, stride, owner="predict_probabilities", names=("mode", "crop_size", "stride")
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
        mode, crop_size, stride = resolve_test_protocol(self.config, mode)
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
        The `config.out_features` stages: the image encoder's stem and the levels of the language-guided pyramid,
        `(batch, channels[i], H / stride, W / stride)` (the score map joined onto level `config.score_map_level`).
    score_map (`torch.FloatTensor` of shape `(batch, num_labels, h, w)`):
        Pixel-text cosine similarities s (Eq. 2), for the auxiliary losses: `detection_score_map_loss` (Eq. 8) or
        the identity loss (Eq. 7).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The image encoder's stem and its 4 pyramid levels before the score map is joined.
    """

    score_map: torch.FloatTensor | None = None


class DenseClipBackbone(BackboneMixin, DenseClipPreTrainedModel):
    """DenseCLIP as a transformers backbone: `DenseClipModel`'s language-guided pyramid (x' = [x, s], Sec. 3.2) for
    any model that takes a `backbone_config` (`AutoBackbone.from_config(DenseClipBackboneConfig(...))`).

    Its stages (`stage_names`) are the image encoder's stem and the 4 levels of the language-guided pyramid; `channels`
    are the `out_features`' channels (`num_features`: the stem's, then `DenseClipModel.pyramid_channels`). The
    output also carries the score map, so that a detector adds the Eq. 8 loss (`detection_score_map_loss`, see
    docs/backbone.md). Its
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
        self.num_features = [config.image_encoder_settings.stem_channels(), *self.denseclip.pyramid_channels]
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | list[int] | None = None, **kwargs
    ) -> DenseClipBackboneOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalized images, as for `DenseClipModel`.
        output_hidden_states (`bool` or `list[int]`, *optional*):
            Also return the image encoder's stem and 4 pyramid levels before the score map is joined.
        """
        outputs = self.denseclip(pixel_values, output_hidden_states=True)
        stages = (outputs.hidden_states[0], *outputs.pyramid)  # the stem, then the language-guided pyramid
        return DenseClipBackboneOutput(
            feature_maps=tuple(stages[index] for index in self.out_indices),
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

declare_pipeline_support(DenseClipForSemanticSegmentation, MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES)

__all__ = [
    "DenseClipBackbone",
    "DenseClipBackboneOutput",
    "DenseClipForSemanticSegmentation",
    "DenseClipModel",
    "DenseClipModelOutput",
    "DenseClipPreTrainedModel",
    "DenseClipSemanticSegmenterOutput",
    "pixel_text_score_map",
]
