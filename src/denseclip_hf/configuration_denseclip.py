"""DenseCLIP configuration."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The ViT-B feature layers used by the authors (`out_indices=[3, 5, 7, 11]`).
_VIT_B_FEATURE_LAYERS = [3, 5, 7, 11]
_INTERPOLATION_MODES = ("bilinear", "bicubic")
_LOSS_REDUCTIONS = ("mean_non_ignored", "mean_all_pixels")


def default_vision_feature_layers(num_hidden_layers: int) -> list[int]:
    """The encoder layers whose patch tokens form the 4-level pyramid.

    A 12-layer tower uses the authors' layers `[3, 5, 7, 11]`; any other depth uses 4 layers evenly spaced and
    ending at the last one (`[0, 1, 2, 3]` for 4 layers, `[5, 11, 17, 23]` for 24).
    """
    if num_hidden_layers == 12:
        return list(_VIT_B_FEATURE_LAYERS)
    return [round(num_hidden_layers * (level + 1) / 4) - 1 for level in range(4)]


@strict
class DenseClipConfig(PreTrainedConfig):
    r"""
    Configuration of a DenseCLIP semantic segmentation model (Rao et al., CVPR 2022) built on a CLIP ViT image
    encoder and the CLIP text encoder. Defaults reproduce the authors' ViT-B/16 ADE20K model.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            The CLIP text tower. Defaults to CLIP's text transformer (width 512, 12 layers).
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP ViT image tower. Defaults to ViT-B/16 (`patch_size=16`). Its `patch_size` must be a power of two
            of at least 4 so that the feature maps form a stride 4/8/16/32 pyramid.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimension D of the joint image-text embedding space (CLIP's `projection_dim`).
        class_token_ids (`list[list[int]]`, *optional*):
            Token ids of each class name in `id2label` order (`[SOT, name..., EOT, 0...]`, length
            `class_name_token_length`). Stored with the model so that it runs with no tokenizer; written by
            [`DenseClipForSemanticSegmentation.from_clip_pretrained`] and [`tokenize_class_names`].
        num_context_tokens (`int`, *optional*, defaults to 8):
            Number N of learnable context vectors p inserted after the start token (Eq. 3). Paper: 8.
        class_name_token_length (`int`, *optional*, defaults to 5):
            Token length of a class name including start and end tokens (the authors' `context_length=5`).
            `num_context_tokens + class_name_token_length` must fit the text tower's positions.
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
        temperature (`float`, *optional*, defaults to 0.07):
            Temperature tau dividing the score map in the identity (auxiliary) loss (Eq. 7). Paper: 0.07.
        identity_loss_weight (`float`, *optional*, defaults to 0.4):
            Weight of the identity loss on the score map (Eq. 7) in the total loss. Paper: 0.4.
        score_map_level (`int`, *optional*, defaults to 2):
            Pyramid level (0-3, strides 4/8/16/32) onto which the score map is concatenated. The ViT score map has
            stride 16, so the authors use level 2.
        vision_feature_layers (`list[int]`, *optional*):
            The 4 encoder layers (0-based) whose patch tokens form the pyramid. Defaults to `[3, 5, 7, 11]` for a
            12-layer tower and to 4 evenly spaced layers ending at the last one otherwise.
        position_embedding_interpolation (`str`, *optional*, defaults to `"bilinear"`):
            How the ViT positional embedding is resized to the input's patch grid: `"bilinear"` (the authors') or
            `"bicubic"` (transformers' `interpolate_pos_encoding`).
        fpn_channels (`int`, *optional*, defaults to 256):
            Output channels of every FPN neck level. Paper: 256.
        decode_head_channels (`int`, *optional*, defaults to 256):
            Channels of the Semantic FPN head. Paper: 256.
        decode_head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before the classifier of the Semantic FPN head. Paper: 0.1.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by both losses.
        loss_reduction (`str`, *optional*, defaults to `"mean_non_ignored"`):
            How per-pixel cross-entropy is averaged: `"mean_non_ignored"` (PyTorch and transformers convention) or
            `"mean_all_pixels"` (mmseg 0.x, used by the authors: ignored pixels count as zero in the mean).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal init of the context decoder's linear layers.

    Example:

    ```python
    >>> from denseclip_hf import DenseClipConfig, DenseClipForSemanticSegmentation

    >>> config = DenseClipConfig(id2label={0: "wall", 1: "sky"})
    >>> model = DenseClipForSemanticSegmentation(config)  # random weights; see `from_clip_pretrained`
    ```
    """

    model_type = "denseclip"
    sub_configs_defaults = {
        "text_config": CLIPTextConfig,
        "vision_config": SubConfigSpec(CLIPVisionConfig, init_kwargs={"patch_size": 16}),
    }

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    class_token_ids: list[list[int]] | None = None
    num_context_tokens: int = 8
    class_name_token_length: int = 5
    context_decoder_layers: int = 3
    context_decoder_hidden_size: int = 256
    context_decoder_heads: int = 4
    context_decoder_dropout: float | int = 0.1
    gamma_init_value: float | int = 1e-4
    temperature: float | int = 0.07
    identity_loss_weight: float | int = 0.4
    score_map_level: int = 2
    vision_feature_layers: list[int] | None = None
    position_embedding_interpolation: str = "bilinear"
    fpn_channels: int = 256
    decode_head_channels: int = 256
    decode_head_dropout: float | int = 0.1
    semantic_loss_ignore_index: int = 255
    loss_reduction: str = "mean_non_ignored"
    initializer_range: float | int = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.id2label is not None and not self.label2id:
            self.label2id = {name: label for label, name in self.id2label.items()}
        if self.vision_feature_layers is None:
            self.vision_feature_layers = default_vision_feature_layers(self.vision_config.num_hidden_layers)

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
        for name in ("context_decoder_layers", "context_decoder_hidden_size", "context_decoder_heads"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(
            self.context_decoder_hidden_size % self.context_decoder_heads == 0,
            "context_decoder_hidden_size",
            self.context_decoder_hidden_size,
            f"must be divisible by context_decoder_heads={self.context_decoder_heads}",
        )
        for name in ("context_decoder_dropout", "decode_head_dropout"):
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
            self.loss_reduction in _LOSS_REDUCTIONS,
            "loss_reduction",
            self.loss_reduction,
            f"must be one of {_LOSS_REDUCTIONS}",
        )
        self._validate_vision_tower()
        self._validate_class_token_ids()

    def _validate_vision_tower(self):
        patch_size = self.vision_config.patch_size
        _check(
            patch_size >= 4 and patch_size & (patch_size - 1) == 0,
            "vision_config.patch_size",
            patch_size,
            "must be a power of two >= 4 so that the patch grid can form a stride 4/8/16/32 pyramid",
        )
        layers = self.vision_config.num_hidden_layers
        _check(
            len(self.vision_feature_layers) == 4
            and all(0 <= layer < layers for layer in self.vision_feature_layers)
            and sorted(set(self.vision_feature_layers)) == list(self.vision_feature_layers),
            "vision_feature_layers",
            self.vision_feature_layers,
            f"must be 4 increasing layer indices in [0, {layers - 1}]",
        )

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


def _check(condition: bool, name: str, value, requirement: str) -> None:
    if not condition:
        raise ValueError(f"DenseClipConfig: `{name}`={value} {requirement}.")


__all__ = ["DenseClipConfig", "default_vision_feature_layers"]
