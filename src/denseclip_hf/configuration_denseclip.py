"""DenseCLIP configuration.

`DenseClipConfig` holds every setting of a DenseCLIP model. Its parts are chosen by name: the image encoder by the
`model_type` of `vision_config` (`IMAGE_ENCODER_SETTINGS` below; the modeling file maps each family to its module),
the prompting by `prompting_type` and the decoder by `decoder_type` (`PROMPTING_TYPES`, `DECODER_TYPES`).
"""

import copy
import json
import math
from functools import lru_cache
from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoBackbone, AutoConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import SubConfigSpec

from .loss_denseclip import LOSS_REDUCTIONS

# Strides of the 4 pyramid levels every image encoder returns (the Semantic FPN's).
PYRAMID_STRIDES = (4, 8, 16, 32)
# The ViT-B feature layers used by the authors (`out_indices=[3, 5, 7, 11]`).
_VIT_B_FEATURE_LAYERS = [3, 5, 7, 11]
# How a positional table meets an input of another size: resized (the ViT and segmentation models) or cropped to its
# top-left part (the authors' detectors' attention pool).
_INTERPOLATION_MODES = ("bilinear", "bicubic", "crop")
# Label value that the losses and the metrics ignore (`DenseClipConfig.semantic_loss_ignore_index`'s default, the
# processor's reduced-label background and padding): mmseg's and transformers' 255.
IGNORE_INDEX = 255
# The choices of a setting, each name with what it means: how the class text embeddings meet the image
# (`prompting_type`) and what turns the pyramid into logits (`decoder_type`), which the modeling file maps to their
# modules (`PROMPTINGS`, `DECODERS`); the test protocols (`test_mode`, the authors' `test_cfg.mode`). Command lines
# take their `choices` and help from here (`describe_choices`).
PROMPTING_TYPES = {
    "post_model": "the paper's DenseCLIP: learnable contexts, and the class embeddings attend to the image (Eqs. 5-6)",
    "language_only": "learnable contexts only (Table 2, row 3)",
    "pre_model": "learnable queries attend to the image and become the contexts (Eq. 4; Table 2, row 4)",
    "none": "no text at all: the CLIP image encoder and the decoder alone (Table 1's CLIP + Semantic FPN baselines)",
}
DECODER_TYPES = {
    "semantic_fpn": "the Semantic FPN (Sec. 4.1)",
    "upernet": "UperNet (Table 5's Swin models)",
}
TEST_MODES = {
    "slide": "sliding windows of the crop size (the authors' single-scale test)",
    "whole": "one pass over the whole image",
}
# The coarsest pyramid stride: no model input may be smaller.
_MIN_INPUT_SIZE = PYRAMID_STRIDES[-1]


def describe_choices(choices: dict[str, str]) -> str:
    """The choices of a setting for help texts and messages: `slide: sliding windows ...; whole: one pass ...`."""
    return "; ".join(f"{name}: {meaning}" for name, meaning in choices.items())


def default_vision_feature_layers(num_hidden_layers: int) -> list[int]:
    """The encoder layers whose patch tokens form the 4-level pyramid.

    A 12-layer tower uses the authors' layers `[3, 5, 7, 11]`; any other depth uses 4 layers evenly spaced and
    ending at the last one (`[0, 1, 2, 3]` for 4 layers, `[5, 11, 17, 23]` for 24).
    """
    if num_hidden_layers == 12:
        return list(_VIT_B_FEATURE_LAYERS)
    return [round(num_hidden_layers * (level + 1) / 4) - 1 for level in range(4)]


def default_score_map_level(vision_config: PreTrainedConfig) -> int:
    """The pyramid level (strides 4/8/16/32) of the score map's own stride, the authors' `score_concat_index`: the
    ViT patch size (16 -> level 2, 8 -> level 1) or 32 for a ResNet (level 3); 3 for coarser maps."""
    stride = image_encoder_settings(vision_config).score_map_stride()
    return min(int(math.log2(stride // PYRAMID_STRIDES[0])), len(PYRAMID_STRIDES) - 1)


def input_size_multiple(vision_config: PreTrainedConfig) -> int:
    """What every model input side must be a multiple of (see `ImageEncoderSettings.input_size_multiple`)."""
    return image_encoder_settings(vision_config).input_size_multiple()


def default_test_window(
    vision_config: PreTrainedConfig, crop_size: int | list[int] | None = None
) -> tuple[int | list[int], int | list[int]]:
    """The authors' sliding window `(crop_size, stride)`: the image encoder's `default_test_crop_size` (their training
    crops: 640 for a ViT, 512 for a ResNet) and a stride of two thirds of the crop rounded down (640 -> 426,
    512 -> 341, their `test_cfg`). A given `crop_size` (int, or `[height, width]`) gets its stride by the same rule."""
    if crop_size is None:
        crop_size = image_encoder_settings(vision_config).default_test_crop_size
    if isinstance(crop_size, int):
        return crop_size, crop_size * 2 // 3
    return list(crop_size), [side * 2 // 3 for side in crop_size]


def _pair(value) -> tuple[int, int] | None:
    """An int or a `[height, width]` pair of positive ints as `(height, width)`; `None` for anything else."""
    pair = [value, value] if isinstance(value, int) else value
    if (
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in pair)
    ):
        return int(pair[0]), int(pair[1])
    return None


def check_test_protocol(
    mode: str,
    crop_size: int | list[int],
    stride: int | list[int],
    vision_config: PreTrainedConfig,
    owner: str = "DenseClipConfig",
    names: tuple[str, str, str] = ("test_mode", "test_crop_size", "test_stride"),
) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Checks a test protocol for a model with `vision_config`; returns `(mode, (crop_h, crop_w), (stride_h,
    stride_w))` or raises a `ValueError` that names the setting (`names`, as seen by `owner`) and the fix."""
    mode_name, crop_name, stride_name = names
    _check(mode in TEST_MODES, mode_name, repr(mode), f"must be one of {tuple(TEST_MODES)}", owner)
    crop, steps = _pair(crop_size), _pair(stride)
    multiple = input_size_multiple(vision_config)
    _check(crop is not None, crop_name, crop_size, "must be a positive int or [height, width]", owner)
    _check(
        all(side >= _MIN_INPUT_SIZE and side % multiple == 0 for side in crop),
        crop_name,
        crop_size,
        f"does not fit the model: each side must be at least {_MIN_INPUT_SIZE} (the pyramid's coarsest stride) and a "
        f"multiple of {multiple} (the image encoder's input granularity), e.g. "
        f"{default_test_window(vision_config)[0]}",
        owner,
    )
    _check(
        steps is not None and all(step <= side for step, side in zip(steps, crop, strict=True)),
        stride_name,
        stride,
        f"must be a positive int or [height, width] no larger than the crop {list(crop)} (windows must overlap or "
        "touch to cover the image); the authors use two thirds of the crop, here "
        f"{default_test_window(vision_config, crop_size)[1]}",
        owner,
    )
    return mode, crop, steps


def resolve_test_protocol(
    config: "DenseClipConfig",
    mode: str | None = None,
    crop_size: int | list[int] | None = None,
    stride: int | list[int] | None = None,
    owner: str = "DenseClipConfig",
    names: tuple[str, str, str] = ("test_mode", "test_crop_size", "test_stride"),
) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """The one rule for the test protocol a model runs: each of `mode`, `crop_size` and `stride` given here replaces
    the config's (`test_mode`, `test_crop_size`, `test_stride`); a `crop_size` given without a `stride` gets the
    authors' stride for that crop (two thirds of it, `default_test_window`), not the config's. Windows do not apply to
    `mode="whole"`: giving a crop or a stride with it is a `ValueError`. Returns `check_test_protocol`'s checked
    `(mode, (crop_h, crop_w), (stride_h, stride_w))`."""
    mode = config.test_mode if mode is None else mode
    if mode == "whole" and (crop_size is not None or stride is not None):
        raise ValueError(
            f"{owner}: `{names[1]}` and `{names[2]}` set the sliding windows; they do not apply to "
            f"`{names[0]}`='whole'. Leave them out, or use `{names[0]}`='slide'."
        )
    if crop_size is None:
        crop_size, default_stride = config.test_crop_size, config.test_stride
    else:
        default_stride = default_test_window(config.vision_config, crop_size)[1]
    stride = default_stride if stride is None else stride
    return check_test_protocol(mode, crop_size, stride, config.vision_config, owner=owner, names=names)


@strict
class DenseClipResNetConfig(PreTrainedConfig):
    r"""
    Configuration of CLIP's "ModifiedResNet" image encoder as DenseCLIP uses it: a 3-convolution stem, 4 stages of
    anti-aliased bottlenecks (strides 4, 8, 16, 32) and an attention pool over the mean token and every spatial token
    (Eq. 1). Defaults are CLIP RN50.

    Args:
        layers (`list[int]`, *optional*, defaults to `[3, 4, 6, 3]`):
            Bottleneck blocks in each of the 4 stages: `[3, 4, 6, 3]` for RN50, `[3, 4, 23, 3]` for RN101.
        width (`int`, *optional*, defaults to 64):
            Output channels of the stem. Stage `i` outputs `4 * width * 2**i` channels (256/512/1024/2048 for RN50);
            the attention pool works on `embed_dim = 32 * width` channels.
        attention_pool_heads (`int`, *optional*, defaults to 32):
            Heads of the attention pool. The DenseCLIP authors hard-code 32; OpenAI CLIP uses `32 * width // 64`
            (also 32 for RN50 and RN101, 40 for RN50x4).
        image_size (`int`, *optional*, defaults to 224):
            Resolution the attention pool's positional embedding was made for: it holds a square grid of
            `image_size // 32` positions per side (plus one for the mean token), resized to the actual input on every
            call. CLIP: 224; the authors' ADE20K checkpoints: 512.
        num_channels (`int`, *optional*, defaults to 3):
            Input image channels.
        recompute_stem_in_backward (`bool`, *optional*, defaults to `True`):
            In training, the stem's activations (3 convolutions at half the input resolution: about a tenth of what
            the backward pass keeps) are recomputed in the backward pass instead of kept (`torch.utils.checkpoint`,
            its BatchNorm running statistics updated once): the same gradients bit for bit, about 0.5 GiB less peak
            memory for a batch of two 1333 x 800 images, for a few percent more time. `False` keeps them, as the
            authors' code does.

    Example:

    ```python
    >>> from denseclip_hf import DenseClipConfig, DenseClipResNetConfig

    >>> rn101 = DenseClipResNetConfig(layers=[3, 4, 23, 3], image_size=512)
    >>> config = DenseClipConfig(vision_config=rn101, id2label={0: "wall", 1: "sky"})  # score_map_level=3
    ```
    """

    model_type = "denseclip_resnet_vision"

    layers: list[int] | tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    attention_pool_heads: int = 32
    image_size: int = 224
    num_channels: int = 3
    recompute_stem_in_backward: bool = True

    def __post_init__(self, **kwargs):
        self.layers = list(self.layers)
        super().__post_init__(**kwargs)
        self.validate_architecture()  # a plain ValueError (see `DenseClipConfig.__post_init__`)

    @property
    def embed_dim(self) -> int:
        """Channels of the last stage, which the attention pool attends over (2048 for RN50)."""
        return 32 * self.width

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of the 4 stage outputs, strides 4 to 32 (`[256, 512, 1024, 2048]` for RN50)."""
        return [4 * self.width * 2**stage for stage in range(4)]

    def validate_architecture(self):
        """Checks the encoder's shape settings; a bad one raises a `ValueError` that names it."""
        owner = "DenseClipResNetConfig"
        _check(
            len(self.layers) == 4 and all(isinstance(n, int) and n >= 1 for n in self.layers),
            "layers",
            self.layers,
            "must be 4 block counts >= 1 (one per stage)",
            owner,
        )
        _check(self.width >= 2 and self.width % 2 == 0, "width", self.width, "must be an even number >= 2", owner)
        _check(
            self.attention_pool_heads >= 1 and self.embed_dim % self.attention_pool_heads == 0,
            "attention_pool_heads",
            self.attention_pool_heads,
            f"must divide the attention pool width 32 * width = {self.embed_dim}",
            owner,
        )
        _check(
            self.image_size >= 32 and self.image_size % 32 == 0,
            "image_size",
            self.image_size,
            "must be a multiple of 32 (the positional grid has image_size // 32 positions per side)",
            owner,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Image encoder families: what each one implies for the DenseCLIP settings
# ---------------------------------------------------------------------------------------------------------------------


class ImageEncoderSettings:
    """The DenseCLIP settings that depend on the kind of image encoder: their defaults and their checks.

    One subclass per family, found by the `model_type` of the vision config (`IMAGE_ENCODER_SETTINGS`). Its `name`
    is `DenseClipConfig.image_encoder_family`, by which the modeling file picks the encoder module
    (`IMAGE_ENCODERS`) and the converters their checkpoint rules. A new family is one subclass here, one module there.
    """

    name: ClassVar[str]
    # Stochastic depth of the encoder layers in training (`DenseClipConfig.drop_path_rate`'s default).
    default_drop_path_rate: ClassVar[float] = 0.0
    # The sliding-window crop of the authors' test protocol (`DenseClipConfig.test_crop_size`'s default).
    default_test_crop_size: ClassVar[int]

    def __init__(self, vision_config: PreTrainedConfig):
        self.vision_config = vision_config

    def pyramid_channels(self) -> list[int]:
        """Channels of the 4 pyramid levels the encoder returns (strides 4, 8, 16, 32)."""
        raise NotImplementedError

    def stem_channels(self) -> int:
        """Channels of the encoder's stem output (before its first pyramid stage)."""
        raise NotImplementedError

    def score_map_stride(self) -> int:
        """Stride of the dense embedding z, hence of the score map (Eq. 2)."""
        raise NotImplementedError

    def default_feature_layers(self) -> list[int] | None:
        """`DenseClipConfig.vision_feature_layers`' default: the encoder layers the pyramid is read from, if any."""
        return None

    def input_size_multiple(self) -> int:
        """What every model input side must be a multiple of (1: any size). The test protocol cuts an input down to
        it, as the authors' encoder ignores the rest of a side."""
        return 1

    def set_position_embedding_size(self, config: "DenseClipConfig", image_size: int) -> None:
        """Records in `config` the input size the positional embedding was resized to."""
        config.vision_config.image_size = image_size

    def validate(self, config: "DenseClipConfig") -> None:
        """Checks the `config` settings that depend on this encoder; a bad one raises a `ValueError` naming it."""


class ClipViTSettings(ImageEncoderSettings):
    """CLIP ViT (`CLIPVisionConfig`): the pyramid is read from 4 encoder layers at stride `patch_size`, resampled to
    strides 4-32; z has stride `patch_size`; stochastic depth 0.1 as the authors' ViT."""

    name = "vit"
    default_drop_path_rate = 0.1
    default_test_crop_size = 640

    def pyramid_channels(self) -> list[int]:
        return [self.vision_config.hidden_size] * len(PYRAMID_STRIDES)

    def stem_channels(self) -> int:
        return self.vision_config.hidden_size

    def score_map_stride(self) -> int:
        return self.vision_config.patch_size

    def default_feature_layers(self) -> list[int]:
        return default_vision_feature_layers(self.vision_config.num_hidden_layers)

    def input_size_multiple(self) -> int:
        # The authors' patch convolution ignores the rest of a side.
        return self.vision_config.patch_size

    def validate(self, config: "DenseClipConfig") -> None:
        patch_size = self.vision_config.patch_size
        _check(
            patch_size >= 4 and patch_size & (patch_size - 1) == 0,
            "vision_config.patch_size",
            patch_size,
            "must be a power of two >= 4 so that the patch grid can form a stride 4/8/16/32 pyramid",
        )
        layers = self.vision_config.num_hidden_layers
        _check(
            len(config.vision_feature_layers) == 4
            and all(0 <= layer < layers for layer in config.vision_feature_layers)
            and sorted(set(config.vision_feature_layers)) == list(config.vision_feature_layers),
            "vision_feature_layers",
            config.vision_feature_layers,
            f"must be 4 increasing layer indices in [0, {layers - 1}]",
        )


class ClipResNetSettings(ImageEncoderSettings):
    """CLIP ResNet (`DenseClipResNetConfig`): the pyramid is its 4 stages; z (the attention pool's) has stride 32;
    no stochastic depth and no feature layers to choose."""

    name = "resnet"
    default_test_crop_size = 512

    def pyramid_channels(self) -> list[int]:
        return self.vision_config.pyramid_channels

    def stem_channels(self) -> int:
        return self.vision_config.width

    def score_map_stride(self) -> int:
        return PYRAMID_STRIDES[-1]

    def validate(self, config: "DenseClipConfig") -> None:
        _check(
            config.drop_path_rate == 0,
            "drop_path_rate",
            config.drop_path_rate,
            "applies to ViT image encoders only (CLIP ResNets have no stochastic depth): leave it unset",
        )
        _check(
            config.vision_feature_layers is None,
            "vision_feature_layers",
            config.vision_feature_layers,
            "applies to ViT image encoders only (a ResNet's pyramid is its 4 stages): leave it unset",
        )


def pyramid_backbone_config(vision_config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of a transformers backbone config whose `out_features` are its stem (its first stage name) and its last 4
    stages (the pyramid)."""
    config = copy.deepcopy(vision_config)
    config.out_features = [config.stage_names[0], *config.stage_names[-len(PYRAMID_STRIDES) :]]
    return config


@lru_cache(maxsize=32)
def _backbone_channels(config_json: str) -> tuple[int, ...]:
    """Channels of the stem and the last 4 stages of the backbone a config describes, read from the backbone built
    without memory (each backbone family names its widths differently: `hidden_sizes`, `embed_dim`, ...)."""
    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        backbone = AutoBackbone.from_config(pyramid_backbone_config(config))
    return tuple(backbone.channels)


class BackboneSettings(ImageEncoderSettings):
    """Any transformers backbone (a config with `stage_names` / `out_features`, `BackboneConfigMixin`: ResNet, Swin,
    ConvNeXt, ...; timm models through `TimmBackboneConfig`), the paper's "any backbone" (Sec. 4.3): the pyramid is
    its last 4 stages (strides 4-32), z (a new attention pool over the last stage) has stride 32. Stochastic depth,
    if any, is the backbone config's own (e.g. `SwinConfig.drop_path_rate`)."""

    name = "backbone"
    default_test_crop_size = 512

    def pyramid_channels(self) -> list[int]:
        return list(_backbone_channels(self.vision_config.to_json_string(use_diff=False))[1:])

    def stem_channels(self) -> int:
        return _backbone_channels(self.vision_config.to_json_string(use_diff=False))[0]

    def score_map_stride(self) -> int:
        return PYRAMID_STRIDES[-1]

    def set_position_embedding_size(self, config: "DenseClipConfig", image_size: int) -> None:
        config.backbone_attention_pool_image_size = image_size

    def input_size_multiple(self) -> int:
        # Stage outputs have exactly strides 4-32 (no rounding, no window padding) on such inputs.
        return PYRAMID_STRIDES[-1]

    def validate(self, config: "DenseClipConfig") -> None:
        stages = len(self.vision_config.stage_names) - 1
        _check(
            stages >= len(PYRAMID_STRIDES),
            "vision_config.stage_names",
            self.vision_config.stage_names,
            "must hold a stem and at least 4 stages (the pyramid is the last 4, strides 4-32)",
        )
        for name, rule in (
            (
                "drop_path_rate",
                "set the backbone's own stochastic depth in its config (e.g. SwinConfig.drop_path_rate)",
            ),
            (
                "vision_feature_layers",
                "applies to ViT image encoders only (a backbone's pyramid is its last 4 stages)",
            ),
        ):
            _check(getattr(config, name) in (0, None), name, getattr(config, name), f"{rule}: leave it unset")
        width = self.pyramid_channels()[-1]
        heads = config.backbone_attention_pool_heads
        _check(
            heads >= 1 and width % heads == 0,
            "backbone_attention_pool_heads",
            heads,
            f"must divide the backbone's last-stage channels {width}",
        )
        _check(
            config.backbone_attention_pool_image_size >= 32 and config.backbone_attention_pool_image_size % 32 == 0,
            "backbone_attention_pool_image_size",
            config.backbone_attention_pool_image_size,
            "must be a multiple of 32",
        )


# Vision config classes by `model_type`, with the settings of the image encoder each one describes.
VISION_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    CLIPVisionConfig.model_type: CLIPVisionConfig,
    DenseClipResNetConfig.model_type: DenseClipResNetConfig,
}
IMAGE_ENCODER_SETTINGS: dict[str, type[ImageEncoderSettings]] = {
    CLIPVisionConfig.model_type: ClipViTSettings,
    DenseClipResNetConfig.model_type: ClipResNetSettings,
}

_SUPPORTED_VISION_CONFIGS = (
    "must be one of "
    + ", ".join(f"{model_type!r} ({settings.name})" for model_type, settings in IMAGE_ENCODER_SETTINGS.items())
    + " or a transformers backbone config (ResNetConfig, SwinConfig, ConvNextConfig, ...)"
)


def image_encoder_settings(vision_config: PreTrainedConfig) -> ImageEncoderSettings:
    """The `ImageEncoderSettings` of `vision_config`; a `ValueError` naming the supported kinds for any other."""
    settings = IMAGE_ENCODER_SETTINGS.get(vision_config.model_type)
    if settings is None and isinstance(vision_config, BackboneConfigMixin):
        settings = BackboneSettings
    _check(settings is not None, "vision_config.model_type", vision_config.model_type, _SUPPORTED_VISION_CONFIGS)
    return settings(vision_config)


class VisionConfigSpec(SubConfigSpec):
    """transformers' sub-config spec for `vision_config`, resolving a dict by its `model_type` (`clip_vision_model`
    when it has none): this file's `VISION_CONFIG_CLASSES` first, then any config transformers knows (`AutoConfig`).

    Looking the own classes up here rather than registering them with `AutoConfig` keeps each copy of this file
    self-contained: loaded as remote code (no `denseclip_hf` installed, or another version of it in the same
    process), it builds its own `DenseClipResNetConfig`, and registers nothing globally.
    """

    def get_config_class(self, model_type: str | None = None) -> type[PreTrainedConfig]:
        if model_type in VISION_CONFIG_CLASSES:
            return VISION_CONFIG_CLASSES[model_type]
        try:
            return super().get_config_class(model_type)
        except ValueError:
            _check(False, "vision_config.model_type", model_type, _SUPPORTED_VISION_CONFIGS)


# ---------------------------------------------------------------------------------------------------------------------
# The DenseCLIP configuration
# ---------------------------------------------------------------------------------------------------------------------


@strict
class DenseClipConfig(PreTrainedConfig):
    r"""
    Configuration of a DenseCLIP model (Rao et al., CVPR 2022): a CLIP image encoder (ViT or ResNet), the CLIP text
    encoder, a prompting strategy and a dense-prediction decoder. Defaults reproduce the authors' ViT-B/16 ADE20K
    model.

    Image encoder:

        vision_config (`dict`, `CLIPVisionConfig` or `DenseClipResNetConfig`, *optional*):
            The CLIP image tower: a `CLIPVisionConfig` for a ViT (the default, ViT-B/16 with `patch_size=16`; the patch
            size must be a power of two of at least 4 so that the feature maps form a stride 4/8/16/32 pyramid) or a
            [`DenseClipResNetConfig`] for CLIP's ResNets (RN50, RN101, ...). A dict is read by its `model_type`
            (`"denseclip_resnet_vision"` for a ResNet, `"clip_vision_model"`, the default, for a ViT). The kind of
            tower is `image_encoder_family` (`"vit"` or `"resnet"`) and sets the defaults below. Any transformers
            backbone config (`ResNetConfig`, `SwinConfig`, `ConvNextConfig`, ...: a `BackboneConfigMixin`) is the
            `"backbone"` family (paper Sec. 4.3): its last 4 stages form the pyramid and a new attention pool gives
            z_bar and z (see `backbone_attention_pool_heads`).
        projection_dim (`int`, *optional*, defaults to 512):
            Dimension D of the joint image-text embedding space (CLIP's `projection_dim`).
        vision_feature_layers (`list[int]`, *optional*):
            ViT only: the 4 encoder layers (0-based) whose patch tokens form the pyramid. Defaults to `[3, 5, 7, 11]`
            for a 12-layer tower and to 4 evenly spaced layers ending at the last one otherwise. A ResNet's pyramid is
            its 4 stages, so this stays `None` there.
        position_embedding_interpolation (`str`, *optional*, defaults to `"bilinear"`):
            How the positional embedding (ViT patch grid, or the ResNet attention pool's grid) is resized to the
            input: `"bilinear"` (the authors' segmentation models) or `"bicubic"` (transformers'
            `interpolate_pos_encoding`); or `"crop"` (the authors' detectors): the top-left `h x w` part of the grid,
            not resized, for a feature map of `h x w` (which must fit in the grid).
        drop_path_rate (`float`, *optional*):
            ViT only: stochastic depth of the CLIP encoder layers during training, rising linearly from 0 at the first
            layer to this rate at the last. Defaults to the authors' 0.1 for a ViT and 0 for a ResNet (which has none).

        backbone_attention_pool_heads (`int`, *optional*, defaults to 32):
            Any backbone only (a transformers backbone config as `vision_config`, Sec. 4.3): heads of the newly
            initialised CLIP-style attention pool over the last stage that gives z_bar and z in the text embedding
            space (Eq. 1). Must divide the last stage's channels (2048 for ResNet-50, 768 for Swin-T). 32 as the
            authors' ResNet attention pool.
        backbone_attention_pool_image_size (`int`, *optional*, defaults to 512):
            Any backbone only: the input size the attention pool's positional grid (`image_size // 32` per side, plus
            the mean token) is made for, resized to the actual input on every call. 512: the ADE20K training crop.

    Text encoder and prompting:

        text_config (`dict` or `CLIPTextConfig`, *optional*):
            The CLIP text tower (frozen). Defaults to CLIP's text transformer (width 512, 12 layers).
        class_token_ids (`list[list[int]]`, *optional*):
            Token ids of each class name in `id2label` order (`[SOT, name..., EOT, 0...]`, length
            `class_name_token_length`). Stored with the model so that it runs with no tokenizer; written by
            [`DenseClipForSemanticSegmentation.from_clip_pretrained`] and [`tokenize_class_names`].
        class_name_token_length (`int`, *optional*, defaults to 5):
            Token length of a class name including start and end tokens (the authors' `context_length=5`).
            `num_context_tokens + class_name_token_length` must fit the text tower's positions.
        text_encoder_removed (`bool`, *optional*, defaults to `False`):
            Set by [`DenseClipModel.remove_text_encoder`]: the model has no CLIP text tower and stores its class text
            embeddings t instead (`class_text_embeddings`), for deployment. Such a model cannot train.
        prompting_type (`str`, *optional*, defaults to `"post_model"`):
            How the class text embeddings become context-aware. `"post_model"` (the paper's DenseCLIP, its default and
            best variant, Table 2): learnable contexts p before each class name (Eq. 3), then the text embeddings
            attend to the image's [z_bar, z] in a Transformer decoder and are refined, t <- t + gamma * v_post
            (Eqs. 5-6). `"language_only"` (Table 2 row 3, "+ language-domain prompting"): the learnable contexts p
            only, the same t for every image (no context decoder, `context_decoder_*` and `gamma_init_value` unused).
            `"pre_model"` (Table 2 row 4, "pre-model V->L prompting"): N learnable queries q attend to [z_bar, z] in
            the context decoder (Eq. 4) and the visual contexts v_pre, projected to the text width, replace p; the
            text tower runs for every image (t per image, never cached; `gamma_init_value` unused).
            `"none"` (Table 1 / Table 2 row 2, "CLIP + Semantic FPN", the authors' `fpn_clip*` configs): no text at
            all, the CLIP image encoder fine-tuned under the Semantic FPN; the model builds no text encoder, no
            attention pool (ResNet) or visual projection (ViT), makes no score map and has no identity loss (the text
            settings, `score_map_level`, `temperature` and `identity_loss_weight` are unused).
        num_context_tokens (`int`, *optional*, defaults to 8):
            Number N of learnable context vectors p inserted after the start token (Eq. 3), or of learnable queries q
            (pre-model prompting, Eq. 4). Paper: 8.
        context_decoder_layers (`int`, *optional*, defaults to 3):
            Transformer decoder layers of the context decoder (Eq. 5). Authors' configs: 3 (the paper text says 6).
        context_decoder_hidden_size (`int`, *optional*, defaults to 256):
            Width of the context decoder. Paper: 256.
        context_decoder_heads (`int`, *optional*, defaults to 4):
            Attention heads of the context decoder. Paper: 4.
        context_decoder_dropout (`float`, *optional*, defaults to 0.1):
            Dropout of the context decoder's attention projections and MLP. Paper: 0.1.
        gamma_init_value (`float`, *optional*, defaults to 1e-4):
            Initial value of every channel of gamma, the residual scale of post-model prompting (Eq. 6). Paper: 1e-4.

    Score map and decoder:

        join_score_map_over_temperature (`bool`, *optional*, defaults to `False`):
            Whether the score map joined to the pyramid is divided by `temperature` (x' = [x, s / tau], the authors'
            detectors) instead of the cosine itself (x' = [x, s], their segmentation models). The `score_map` output
            is the cosine either way.
        score_map_level (`int`, *optional*):
            Pyramid level (0-3, strides 4/8/16/32) onto which the score map is concatenated (x' = [x, s], Sec. 3.2).
            Defaults to the level of the score map's own stride, the authors' choice: 2 for a ViT-B/16 (stride 16; 1
            for patch 8), 3 for a ResNet (stride 32). At another level the score map is first resized bilinearly to
            that level's size.
        decoder_type (`str`, *optional*, defaults to `"semantic_fpn"`):
            What turns the language-guided pyramid into logits. `"semantic_fpn"` (the paper's segmentation decoder,
            Sec. 4.1): an FPN neck and a Semantic FPN head (Kirillov et al.). `"upernet"` (Table 5's Swin rows):
            UperNet (Xiao et al.), a pyramid pooling module on the last level and an FPN fusion of all 4 levels; as
            in the paper's Table 5, without mmseg's auxiliary FCN head.
        fpn_channels (`int`, *optional*, defaults to 256):
            Output channels of every FPN neck level (Semantic FPN only). Paper: 256.
        decode_head_channels (`int`, *optional*, defaults to 256):
            Channels of the decode head: 256 for the Semantic FPN (paper); mmseg's UperNet uses 512 (the Table 5
            recipes set it).
        decode_head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before the classifier of the decode head. Paper (and mmseg's UperNet): 0.1.
        upernet_pool_scales (`list[int]`, *optional*, defaults to `[1, 2, 3, 6]`):
            UperNet only: output sizes of the pyramid pooling module's adaptive average pools (mmseg's default).

    Losses:

        temperature (`float`, *optional*, defaults to 0.07):
            Temperature tau dividing the score map in the identity (auxiliary) loss (Eq. 7). Paper: 0.07.
        identity_loss_weight (`float`, *optional*, defaults to 0.4):
            Weight of the identity loss on the score map (Eq. 7) in the total loss. Paper: 0.4.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by both losses.
        loss_reduction (`str`, *optional*, defaults to `"mean_non_ignored"`):
            How per-pixel cross-entropy is averaged: `"mean_non_ignored"` (PyTorch and transformers convention) or
            `"mean_all_pixels"` (mmseg 0.x, used by the authors: ignored pixels count as zero in the mean).

    Other:

        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal init of the context decoder's linear layers.
        palette (`list[list[int]]`, *optional*):
            One RGB colour `[r, g, b]` (0-255) per label, in `id2label` order, for drawing segmentations. Not used by
            the model; the converter of the authors' checkpoints keeps their `PALETTE` here.
        test_mode (`str`, *optional*, defaults to `"slide"`):
            The model's test protocol: the default of `predict_probabilities` and of evaluation (training
            validation, `examples/evaluate_seg.py`), and what the converter writes into the image processor, whose
            output asks `forward` for it (`model(**processor(images=...))`, the `image-segmentation` pipeline).
            `"slide"` (the authors', every number of the paper) runs the model on `test_crop_size` windows every
            `test_stride` pixels and averages the overlapping logits; `"whole"` runs it once on the whole image. Both
            give logits at the input resolution. See docs/inference.md.
        test_crop_size (`int` or `list[int]`, *optional*):
            Sliding-window size (an int, or `[height, width]`); each side at least 32 and, for a ViT, a multiple of
            the patch size. Defaults to the authors': 640 for a ViT (ViT-B/16), 512 for a ResNet (RN50, RN101).
        test_stride (`int` or `list[int]`, *optional*):
            Sliding-window step (an int, or `[height, width]`), at most the crop. Defaults to two thirds of the crop,
            rounded down: the authors' 426 (crop 640) and 341 (crop 512).

    Example:

    ```python
    >>> from denseclip_hf import DenseClipConfig, DenseClipForSemanticSegmentation

    >>> config = DenseClipConfig(id2label={0: "wall", 1: "sky"})
    >>> model = DenseClipForSemanticSegmentation(config)  # random weights; see `from_clip_pretrained`
    ```
    """

    model_type = "denseclip"
    # The input size (pixels) that `from_clip_pretrained` resizes CLIP's positional embedding to, once, as it loads
    # the weights; `None`: CLIP's own 224-pixel grid stays (segmentation training resizes it to its crop size).
    clip_position_embedding_size = None
    sub_configs_defaults = {
        "text_config": CLIPTextConfig,
        "vision_config": VisionConfigSpec(
            config_class=AutoConfig, model_type=CLIPVisionConfig.model_type, init_kwargs={"patch_size": 16}
        ),
    }

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    class_token_ids: list[list[int]] | None = None
    text_encoder_removed: bool = False
    prompting_type: str = "post_model"
    num_context_tokens: int = 8
    class_name_token_length: int = 5
    context_decoder_layers: int = 3
    context_decoder_hidden_size: int = 256
    context_decoder_heads: int = 4
    context_decoder_dropout: float | int = 0.1
    gamma_init_value: float | int = 1e-4
    temperature: float | int = 0.07
    identity_loss_weight: float | int = 0.4
    join_score_map_over_temperature: bool = False
    score_map_level: int | None = None
    vision_feature_layers: list[int] | None = None
    position_embedding_interpolation: str = "bilinear"
    decoder_type: str = "semantic_fpn"
    fpn_channels: int = 256
    decode_head_channels: int = 256
    decode_head_dropout: float | int = 0.1
    semantic_loss_ignore_index: int = IGNORE_INDEX
    loss_reduction: str = "mean_non_ignored"
    initializer_range: float | int = 0.02
    palette: list[list[int]] | None = None
    drop_path_rate: float | int | None = None
    backbone_attention_pool_heads: int = 32
    backbone_attention_pool_image_size: int = 512
    upernet_pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6)
    # Test protocol (the authors' `test_cfg`)
    test_mode: str = "slide"
    test_crop_size: int | list[int] | None = None
    test_stride: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.id2label is not None and not isinstance(self.id2label, dict):
            raise TypeError(
                f"DenseClipConfig: `id2label` must be a dict {{class id: class name}}, got "
                f"{type(self.id2label).__name__}: use e.g. dict(enumerate(class_names))."
            )
        self.upernet_pool_scales = list(self.upernet_pool_scales)
        super().__post_init__(**kwargs)
        if self.id2label is not None and not self.label2id:
            self.label2id = {name: label for label, name in self.id2label.items()}
        encoder = self.image_encoder_settings
        if self.drop_path_rate is None:
            self.drop_path_rate = encoder.default_drop_path_rate
        if self.score_map_level is None:
            self.score_map_level = default_score_map_level(self.vision_config)
        if self.vision_feature_layers is None:
            self.vision_feature_layers = encoder.default_feature_layers()
        crop_size, stride = default_test_window(self.vision_config, self.test_crop_size)
        self.test_crop_size = crop_size
        if self.test_stride is None:
            self.test_stride = stride
        # Checked here already, so that a bad setting is a `ValueError` naming it: the strict-dataclass validation that
        # runs next (and on `validate()`) wraps the same error in a `StrictDataclassClassValidationError`.
        self.validate_architecture()

    @property
    def image_encoder_settings(self) -> ImageEncoderSettings:
        """The defaults and checks that come with the kind of `vision_config` (see `ImageEncoderSettings`)."""
        return image_encoder_settings(self.vision_config)

    @property
    def image_encoder_family(self) -> str:
        """The kind of image encoder: `"vit"` for a CLIP ViT, `"resnet"` for a CLIP ResNet, `"backbone"` for any
        transformers backbone."""
        return self.image_encoder_settings.name

    def validate_architecture(self):
        """Checks every DenseCLIP setting; a bad one raises a `ValueError` that names it."""
        _check(self.num_context_tokens >= 0, "num_context_tokens", self.num_context_tokens, "must be >= 0")
        _check(
            self.class_name_token_length >= 3,
            "class_name_token_length",
            self.class_name_token_length,
            "must be >= 3 (start token, at least one name token, end token)",
        )
        positions = self.text_config.max_position_embeddings
        _check(
            self.num_context_tokens + self.class_name_token_length <= positions,
            "num_context_tokens + class_name_token_length",
            self.num_context_tokens + self.class_name_token_length,
            f"must not exceed the text tower's {positions} positions",
        )
        for name, choices in (("prompting_type", PROMPTING_TYPES), ("decoder_type", DECODER_TYPES)):
            _check(getattr(self, name) in choices, name, getattr(self, name), f"must be one of {tuple(choices)}")
        for name in ("context_decoder_layers", "context_decoder_hidden_size", "context_decoder_heads"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(
            self.context_decoder_hidden_size % self.context_decoder_heads == 0,
            "context_decoder_hidden_size",
            self.context_decoder_hidden_size,
            f"must be divisible by context_decoder_heads={self.context_decoder_heads}",
        )
        for name in ("context_decoder_dropout", "decode_head_dropout", "drop_path_rate"):
            _check(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "must be in [0, 1)")
        _check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        _check(self.identity_loss_weight >= 0, "identity_loss_weight", self.identity_loss_weight, "must be >= 0")
        _check(self.score_map_level in range(4), "score_map_level", self.score_map_level, "must be 0, 1, 2 or 3")
        for name in ("projection_dim", "fpn_channels", "decode_head_channels"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(
            self.position_embedding_interpolation in _INTERPOLATION_MODES,
            "position_embedding_interpolation",
            self.position_embedding_interpolation,
            f"must be one of {_INTERPOLATION_MODES}",
        )
        _check(
            self.loss_reduction in LOSS_REDUCTIONS,
            "loss_reduction",
            self.loss_reduction,
            f"must be one of {tuple(LOSS_REDUCTIONS)}",
        )
        _check(
            len(self.upernet_pool_scales) >= 1 and all(scale >= 1 for scale in self.upernet_pool_scales),
            "upernet_pool_scales",
            self.upernet_pool_scales,
            "must be a non-empty list of pooled sizes >= 1, e.g. [1, 2, 3, 6]",
        )
        self.image_encoder_settings.validate(self)
        check_test_protocol(self.test_mode, self.test_crop_size, self.test_stride, self.vision_config)
        self._validate_class_token_ids()
        self._validate_palette()

    def _validate_class_token_ids(self):
        if self.class_token_ids is None:
            return
        _check(
            len(self.class_token_ids) == self.num_labels,
            "class_token_ids",
            f"<{len(self.class_token_ids)} classes>",
            f"must hold one entry per label ({self.num_labels} in id2label)",
        )
        eos = self.text_config.eos_token_id
        for label, ids in enumerate(self.class_token_ids):
            _check(
                len(ids) == self.class_name_token_length and eos in ids,
                "class_token_ids",
                f"<entry {label} ({self.id2label.get(label)!r}): {ids}>",
                f"each entry must have class_name_token_length={self.class_name_token_length} ids including the "
                f"end token {eos}",
            )

    def _validate_palette(self):
        if self.palette is None:
            return
        _check(
            len(self.palette) == self.num_labels,
            "palette",
            f"<{len(self.palette)} colours>",
            f"must hold one colour per label ({self.num_labels} in id2label)",
        )
        for label, colour in enumerate(self.palette):
            _check(
                len(colour) == 3 and all(0 <= channel <= 255 for channel in colour),
                "palette",
                f"<entry {label}: {colour}>",
                "each colour must be 3 integers in [0, 255] (RGB)",
            )


def _check(condition: bool, name: str, value, requirement: str, owner: str = "DenseClipConfig") -> None:
    if not condition:
        raise ValueError(f"{owner}: `{name}`={value} {requirement}.")


# Names of what `DenseClipBackbone` can return: the image encoder's stem, then the 4 pyramid levels (strides
# `PYRAMID_STRIDES`), as transformers' backbones name their stages.
BACKBONE_STAGE_NAMES = ["stem", *(f"stage{level}" for level in range(1, len(PYRAMID_STRIDES) + 1))]


@strict
class DenseClipBackboneConfig(BackboneConfigMixin, DenseClipConfig):
    r"""
    Configuration of a [`DenseClipBackbone`]: every [`DenseClipConfig`] setting (image encoder, text encoder,
    prompting, score map; the decoder settings are unused), plus the transformers backbone settings. Pass it as the
    `backbone_config` of a transformers model (`UperNetForSemanticSegmentation`, `DetrForObjectDetection` with
    `use_timm_backbone=False`, ...).

        out_features (`list[str]`, *optional*):
            What to return, among `stage_names`: `"stem"` (the image encoder's stem output) and `"stage1"` ...
            `"stage4"`, the levels of the language-guided pyramid (strides 4, 8, 16, 32; the score map is joined onto
            `score_map_level`). Defaults to the last, `["stage4"]`, as every transformers backbone; a detector or
            UperNet sets the levels it reads (e.g. `["stage1", "stage2", "stage3", "stage4"]`).
        out_indices (`list[int]`, *optional*):
            The same as indices into `stage_names`; give one of the two.
    """

    model_type = "denseclip_backbone"

    def __post_init__(self, **kwargs):
        self.stage_names = list(BACKBONE_STAGE_NAMES)
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)

    @property
    def depths(self) -> list[int]:
        """The encoder blocks of each of the 4 pyramid stages (ViT: the layers up to each feature layer; CLIP ResNet:
        its bottlenecks per stage; any backbone: its config's `depths` where it has them, else 1 per stage), as
        transformers' backbone configs report them (`len(depths)` is the number of stages after the stem)."""
        if self.image_encoder_family == "vit":
            taps = [-1, *self.vision_feature_layers]
            return [after - before for before, after in zip(taps, taps[1:], strict=False)]
        if self.image_encoder_family == "resnet":
            return list(self.vision_config.layers)
        depths = getattr(self.vision_config, "depths", None)
        return list(depths[-len(PYRAMID_STRIDES) :]) if depths else [1] * len(PYRAMID_STRIDES)


__all__ = [
    "BACKBONE_STAGE_NAMES",
    "DenseClipBackboneConfig",
    "DECODER_TYPES",
    "IMAGE_ENCODER_SETTINGS",
    "PROMPTING_TYPES",
    "PYRAMID_STRIDES",
    "TEST_MODES",
    "BackboneSettings",
    "DenseClipConfig",
    "DenseClipResNetConfig",
    "IGNORE_INDEX",
    "ImageEncoderSettings",
    "check_test_protocol",
    "default_score_map_level",
    "describe_choices",
    "default_test_window",
    "default_vision_feature_layers",
    "image_encoder_settings",
    "input_size_multiple",
    "resolve_test_protocol",
]
