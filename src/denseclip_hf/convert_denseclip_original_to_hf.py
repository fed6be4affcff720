"""Converts the DenseCLIP authors' checkpoints (github.com/raoyongming/DenseCLIP) to folders that `from_pretrained`,
the Auto classes and the pipelines load: their segmentation models (mmseg 0.x) and their detectors (mmdet 2.x:
RetinaNet, Mask R-CNN), DenseCLIP and the CLIP baselines alike. One command for all of them:

    python -m denseclip_hf.convert_denseclip_original_to_hf --checkpoint denseclip_fpn_res50.pth --output_dir out
    python -m denseclip_hf.convert_denseclip_original_to_hf --checkpoint retinanet_denseclip_r50.pth --output_dir out

The kind of model is recognised from the keys (`decode_head.*`: segmentation; `bbox_head.*`: RetinaNet;
`rpn_head.*` / `roi_head.*`: Mask R-CNN; no `text_encoder.*`: a CLIP baseline). Every hyperparameter is inferred from
tensor shapes; what checkpoints do not store comes from the training config mmcv embeds in them (`meta["config"]`,
read without running it: attention heads, the detectors' test settings and test pipeline), else from the authors'
values (`--vision_heads`, `--text_heads`, `--context_decoder_heads` override the heads). The quirks of the authors'
code are handled here, not in the model:

- their ViT adds the class embedding to token 0 twice (as the token, and again on top of its position): the second
  copy is folded into row 0 of the positional embedding, since transformers' CLIP adds it once;
- their ResNet attention pool hard-codes 32 heads (`attention_pool_heads=32`);
- their CLIP + Semantic FPN baselines (`fpn_clipres50`, `fpn_clipres101`, `fpn_clipvit-b`: no `text_encoder.*`
  keys) become `prompting_type="none"`; their ViT's unused `proj` / `ln_post` are dropped, their ResNet has no
  attention pool (`CLIPResNet`), so its crop (512, the grid the others store) is the authors' config value;
- mmcv's module names (`scale_heads.L.{0,2,4}` interleaved with upsampling, `neck.*.conv`, `conv_seg`, packed q/k/v,
  `(in, out)` projection matrices, the detectors' `ConvModule` wrappers) become this package's;
- their detection scripts embed COCO's 80 class names in the model (`A/test.py` sets them whatever the checkpoint
  says): an 80-class detector checkpoint without `meta["CLASSES"]` gets them (`COCO_CLASS_NAMES`, mmdet's order).

The detectors' keys map as follows (their image encoder, text encoder, contexts, context decoder and gamma have the
names of their segmentation checkpoints, `base_model_rules`):

    neck.lateral_convs.{i}.conv.*            -> fpn.lateral_convs.{i}.*      (input level start_level + i)
    neck.fpn_convs.{i}.conv.*, i < inputs    -> fpn.fpn_convs.{i}.*
    neck.fpn_convs.{i}.conv.*, i >= inputs   -> fpn.extra_convs.{i - inputs}.*  (RetinaNet's P6 on C5', P7)
    bbox_head.cls_convs.{i}.conv.*           -> head.class_convs.{i}.*
    bbox_head.reg_convs.{i}.conv.*           -> head.box_convs.{i}.*
    bbox_head.retina_cls.*                   -> head.classifier.*
    bbox_head.retina_reg.*                   -> head.box_regressor.*
    rpn_head.rpn_conv.*                      -> rpn.conv.*
    rpn_head.rpn_cls.*                       -> rpn.objectness.*
    rpn_head.rpn_reg.*                       -> rpn.box_regressor.*
    roi_head.bbox_head.shared_fcs.{i}.*      -> box_head.shared_fcs.{i}.*
    roi_head.bbox_head.fc_cls.*              -> box_head.classifier.*     (background last, as theirs)
    roi_head.bbox_head.fc_reg.*              -> box_head.box_regressor.*
    roi_head.mask_head.convs.{i}.conv.*      -> mask_head.convs.{i}.*
    roi_head.mask_head.upsample.*            -> mask_head.upsample.*
    roi_head.mask_head.conv_logits.*         -> mask_head.classifier.*
"""

import argparse
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import HfApi
from transformers import CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import logging

from .assets import CLIP_TOKENIZER_PATH
from .checkpoint_conversion import (
    CLIP_IMAGE_TOWERS,
    NORM_TENSORS,
    ClipImageTower,
    Rule,
    check_converted,
    clip_image_tower,
    clip_tower_rules,
    convert_keys,
    count_indexed,
    drop,
    infer_clip_text_config,
    load_checkpoint_file,
    rename,
    require_tensor,
    shapes_of,
    unwrap_state_dict,
    with_key_mapping,
)
from .configuration_denseclip import (
    ClipResNetSettings,
    ClipViTSettings,
    DenseClipConfig,
    describe_choices,
    image_encoder_settings,
)
from .configuration_denseclip_detection import (
    AUTHORS_DETECTION_IMAGE_SIZE,
    DenseClipDetectionConfig,
    DenseClipMaskRCNNConfig,
)
from .image_processing_denseclip import DenseClipImageProcessor
from .image_processing_denseclip_detection import DenseClipDetectionImageProcessor
from .loading_denseclip import CLIP_KEY_MAPPING, tokenize_class_names
from .loss_denseclip import LOSS_REDUCTIONS
from .mmcv_config import config_value, parse_config_text
from .modeling_denseclip import DenseClipForSemanticSegmentation
from .modeling_denseclip_detection import (
    DenseClipDetectionPreTrainedModel,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
)

logger = logging.get_logger(__name__)

# The authors' values of what checkpoints do not store.
AUTHORS_RESNET_ATTENTION_POOL_HEADS = 32  # hard-coded in their `CLIPResNetWithAttention`
AUTHORS_CONTEXT_DECODER_HEADS = 4
# Their ResNet baselines' crop (`fpn_clipres*` configs), which a ResNet without an attention pool does not store.
AUTHORS_RESNET_CROP = 512
# Their test pipeline: mmseg `Resize(img_scale=(2048, crop), keep_ratio=True)`, the crop being the training size.
AUTHORS_TEST_LONGEST_EDGE = 2048

# Where the parts sit in `DenseClipForSemanticSegmentation`'s state dict.
_MODEL = f"{DenseClipForSemanticSegmentation.base_model_prefix}."
_PROMPTING = _MODEL + "prompting."
_CONTEXT_DECODER = _PROMPTING + "context_decoder."
_POSITIONS = _MODEL + "image_encoder.vision_model.embeddings.position_embedding.weight"
_CLASS_EMBEDDING = _MODEL + "image_encoder.vision_model.embeddings.class_embedding"
_NECK, _HEAD = "decoder.neck.", "decoder.head."


def _contexts(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The learnable contexts `(1, N, width)` -> `context_embeddings` `(N, width)`."""
    return {_PROMPTING + "context_embeddings": tensor[0]}


def _scale_head_block(name: str) -> Callable[[re.Match], str]:
    """mmseg's `scale_heads.L` interleaves conv blocks (even indices) with parameter-free upsampling (odd ones)."""
    return lambda m: f"{_HEAD}scale_heads.{m[1]}.{int(m[2]) // 2}.{name}.{m[3]}"


def _pyramid_level(match: re.Match) -> str:
    """fpn1 = [GroupNorm, ConvT, BN, GELU, ConvT], fpn2 = [GroupNorm, ConvT], fpn3 = GroupNorm, fpn4 = [GroupNorm,
    MaxPool]: the same layers, at the same indices, as `DenseClipViTPyramid.levels[0-3]`."""
    return f"{_MODEL}image_encoder.pyramid.levels.{int(match[1]) - 1}.{match[2] or 0}.{match[3]}"


@dataclass(frozen=True)
class AuthorsImageTower:
    """What the authors' code does differently per image encoder family (`DenseClipConfig.image_encoder_family`)."""

    extra_rules: list[Rule] = dataclass_field(default_factory=list)  # their keys beyond CLIP's tower
    default_heads: int | None = None  # attention heads where they deviate from CLIP's rule
    fix: Callable[[dict[str, torch.Tensor]], None] | None = None  # applied to the converted tensors
    # Their keys that a baseline without text (`prompting_type="none"`) holds but never uses.
    unused_without_text: list[str] = dataclass_field(default_factory=list)
    # The positional grid whose size is the training crop, and the crop of a checkpoint without it.
    grid_key: str = "positional_embedding"
    crop_without_grid: int | None = None


def fold_repeated_class_embedding(converted: dict[str, torch.Tensor]) -> None:
    """The authors' ViT gives token 0 the class embedding twice (the token itself, and `pos[0] + class_embedding`);
    transformers' CLIP adds it once, so the second copy moves into row 0 of the positional embedding."""
    positions = converted[_POSITIONS].clone()
    positions[0] += converted[_CLASS_EMBEDDING]
    converted[_POSITIONS] = positions


AUTHORS_IMAGE_TOWERS = {
    # Their ViT's pyramid (`fpn1-4`) and its doubled class embedding.
    ClipViTSettings.name: AuthorsImageTower(
        extra_rules=[(r"backbone\.fpn([1-4])\.(?:(\d)\.)?" + NORM_TENSORS, rename(_pyramid_level))],
        fix=fold_repeated_class_embedding,
        unused_without_text=[r"backbone\.proj", r"backbone\.ln_post\.(weight|bias)"],
    ),
    ClipResNetSettings.name: AuthorsImageTower(
        default_heads=AUTHORS_RESNET_ATTENTION_POOL_HEADS,
        grid_key="attnpool.positional_embedding",
        crop_without_grid=AUTHORS_RESNET_CROP,
    ),
}


def has_text(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint has a text side: DenseCLIP's do, the CLIP + Semantic FPN baselines' have no
    `text_encoder.*` (nor contexts, context decoder or gamma)."""
    return any(key.startswith("text_encoder.") for key in state_dict)


def base_model_rules(family: str, uses_text: bool = True) -> list[Rule]:
    """The authors' keys of what `DenseClipModel` holds (`backbone.*`, `text_encoder.*`, `contexts`,
    `context_decoder.*`, `gamma`; the same in their segmentation and detection checkpoints) -> its keys under
    `denseclip.` (every task model's), for an image encoder `family` (`"vit"`/`"resnet"`); without text (the
    baselines), the image tower's keys the model does not have are dropped."""
    unused = [] if uses_text else [(pattern, drop) for pattern in AUTHORS_IMAGE_TOWERS[family].unused_without_text]
    layer = r"context_decoder\.decoder\.(\d+)\."
    decoder_layer = _CONTEXT_DECODER + r"layers.\1."
    clip_keys = {pattern: _MODEL + target for pattern, target in CLIP_KEY_MAPPING.items()}
    return [
        *unused,
        *with_key_mapping(clip_tower_rules(CLIP_IMAGE_TOWERS[family], "backbone.", "text_encoder."), clip_keys),
        (r"contexts", _contexts),
        (r"gamma", rename(_PROMPTING + "gamma")),
        (
            r"context_decoder\.(memory|text)_proj\.(\d)\.(weight|bias)",
            rename(_CONTEXT_DECODER + r"\1_projection.\2.\3"),
        ),
        (r"context_decoder\.out_proj\.(\d)\.(weight|bias)", rename(_CONTEXT_DECODER + r"output_projection.\1.\2")),
        (layer + r"(self_attn|cross_attn)\.([qkv])_proj\.weight", rename(decoder_layer + r"\2.\3_proj.weight")),
        (layer + r"(self_attn|cross_attn)\.proj\.(weight|bias)", rename(decoder_layer + r"\2.out_proj.\3")),
        (layer + r"(norm[1-3])\.(weight|bias)", rename(decoder_layer + r"\2.\3")),
        (layer + r"mlp\.0\.(weight|bias)", rename(decoder_layer + r"fc1.\2")),
        (layer + r"mlp\.3\.(weight|bias)", rename(decoder_layer + r"fc2.\2")),
        *AUTHORS_IMAGE_TOWERS[family].extra_rules,
    ]


def denseclip_rules(family: str, uses_text: bool = True) -> list[Rule]:
    """Authors' keys -> `DenseClipForSemanticSegmentation` keys: `base_model_rules` and the Semantic FPN decoder's."""
    return [
        *base_model_rules(family, uses_text),
        (r"neck\.(lateral_convs|fpn_convs)\.(\d)\.conv\.(weight|bias)", rename(_NECK + r"\1.\2.\3")),
        (r"decode_head\.scale_heads\.(\d)\.(\d+)\.conv\.(weight)", rename(_scale_head_block("conv"))),
        (r"decode_head\.scale_heads\.(\d)\.(\d+)\.bn\." + NORM_TENSORS, rename(_scale_head_block("norm"))),
        (r"decode_head\.conv_seg\.(weight|bias)", rename(_HEAD + r"classifier.\1")),
    ]


def _score_map_level(
    state_dict: dict[str, torch.Tensor], pyramid_channels: list[int], num_classes: int, start_level: int = 0
) -> dict[str, int]:
    """The pyramid level whose FPN lateral convolution reads `num_classes` extra channels: the score map's, as config
    settings (none for `num_classes=0`, a baseline without text, whose FPN reads the pyramid alone). The FPN reads the
    levels from `start_level` on (lateral convolution i reads level `start_level + i`)."""
    read = pyramid_channels[start_level:]
    extra = [
        require_tensor(state_dict, f"neck.lateral_convs.{index}.conv.weight", "the score map level").shape[1]
        - channels
        for index, channels in enumerate(read)
    ]
    if sorted(extra) != [0] * (len(read) - 1) + [num_classes]:
        raise ValueError(
            f"The FPN lateral convolutions read {[c + e for c, e in zip(read, extra, strict=True)]} channels: "
            f"expected the pyramid's {read} with {num_classes} score-map channels on one level."
        )
    return {"score_map_level": start_level + extra.index(num_classes)} if num_classes else {}


def _text_settings(
    state_dict: dict[str, torch.Tensor],
    class_names: list[str],
    tower: ClipImageTower,
    text_heads: int | None,
    context_decoder_heads: int,
) -> dict[str, Any]:
    """The config of the checkpoint's text side (text tower, contexts, context decoder, class token ids, embedding
    size), from tensor shapes; `prompting_type="none"` for a checkpoint without text (`has_text`)."""
    if not has_text(state_dict):
        return {"prompting_type": "none"}
    text_config = infer_clip_text_config(state_dict, "text_encoder.", text_heads, "quick_gelu")
    num_contexts = require_tensor(state_dict, "contexts", "the number of contexts").shape[1]
    name_length = text_config.max_position_embeddings - num_contexts
    return {
        "text_config": text_config.to_dict(),
        "projection_dim": tower.projection_dim(state_dict, "backbone."),
        "class_token_ids": tokenize_class_names(
            class_names, CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH), name_length
        ),
        "num_context_tokens": num_contexts,
        "class_name_token_length": name_length,
        "context_decoder_layers": count_indexed(state_dict, r"context_decoder\.decoder\.(\d+)\.", "decoder layers"),
        "context_decoder_hidden_size": require_tensor(
            state_dict, "context_decoder.memory_proj.1.weight", "its width"
        ).shape[0],
        "context_decoder_heads": context_decoder_heads,
    }


def _image_encoder(
    state_dict: dict[str, torch.Tensor], vision_heads: int | None, size_without_grid: int | None
) -> tuple[ClipImageTower, Any]:
    """The image tower under `backbone.` and its config (heads default to the authors'); a ResNet without attention
    pool, which stores no positional grid, gets `size_without_grid` as its `image_size`."""
    tower = clip_image_tower(state_dict, "backbone.")
    quirks = AUTHORS_IMAGE_TOWERS[tower.family]
    vision_config = tower.infer_config(
        state_dict, "backbone.", quirks.default_heads if vision_heads is None else vision_heads, "quick_gelu"
    )
    if f"backbone.{quirks.grid_key}" not in state_dict:
        vision_config.image_size = size_without_grid
    return tower, vision_config


def _check_class_count(class_names: list[str], num_classes: int) -> None:
    if len(class_names) != num_classes:
        raise ValueError(f"Got {len(class_names)} class names for a checkpoint with {num_classes} classes.")


def infer_config(
    state_dict: dict[str, torch.Tensor],
    class_names: list[str],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    context_decoder_heads: int = AUTHORS_CONTEXT_DECODER_HEADS,
    vision_feature_layers: list[int] | None = None,
    loss_reduction: str | None = None,
    palette: list[list[int]] | None = None,
) -> DenseClipConfig:
    """The `DenseClipConfig` of an authors' segmentation state dict, from its tensor shapes and the class names.

    Heads default to `width // 64` (ViT, text; the authors' ViT-B/16 and CLIP text tower) and 32 (ResNet attention
    pool, hard-coded by the authors); `vision_feature_layers` to `[3, 5, 7, 11]` for 12 layers (their `out_indices`).
    The test protocol is the authors' `test_cfg`: sliding windows of the training crop (the size of the checkpoint's
    positional grid: 640 for ViT-B/16, 512 for RN50/RN101) every two thirds of it (426, 341).
    """
    family = clip_image_tower(state_dict, "backbone.").family
    tower, vision_config = _image_encoder(state_dict, vision_heads, AUTHORS_IMAGE_TOWERS[family].crop_without_grid)
    num_classes = _segmentation_classes(state_dict)
    _check_class_count(class_names, num_classes)
    pyramid_channels = image_encoder_settings(vision_config).pyramid_channels()
    score_channels = num_classes if has_text(state_dict) else 0
    return DenseClipConfig(
        vision_config=vision_config.to_dict(),
        id2label=dict(enumerate(class_names)),
        **_text_settings(state_dict, class_names, tower, text_heads, context_decoder_heads),
        **_score_map_level(state_dict, pyramid_channels, score_channels),
        vision_feature_layers=vision_feature_layers,
        fpn_channels=require_tensor(state_dict, "neck.lateral_convs.0.conv.weight", "the FPN width").shape[0],
        decode_head_channels=require_tensor(
            state_dict, "decode_head.scale_heads.0.0.conv.weight", "the head width"
        ).shape[0],
        palette=palette,
        test_mode="slide",
        test_crop_size=vision_config.image_size,
        **({"loss_reduction": loss_reduction} if loss_reduction else {}),
    )


def _segmentation_classes(state_dict: dict[str, torch.Tensor]) -> int:
    return require_tensor(state_dict, "decode_head.conv_seg.weight", "the number of classes").shape[0]


def image_processor_for(config: DenseClipConfig) -> DenseClipImageProcessor:
    """The authors' test pipeline of a segmentation model: keep-ratio resize into `(2048, crop)`, the crop being the
    size the checkpoint was trained at (its positional grid: 640 for their ViT-B/16, 512 for their ResNets), CLIP
    mean/std, prepared for the model's test protocol (sliding windows: no rounding of the resized size)."""
    crop = config.vision_config.image_size
    return DenseClipImageProcessor(
        size={"shortest_edge": crop, "longest_edge": AUTHORS_TEST_LONGEST_EDGE}, test_mode=config.test_mode
    )


# ---------------------------------------------------------------------------------------------------------------------
# The authors' detectors (mmdet 2.x): RetinaNet and Mask R-CNN, DenseCLIP and CLIP baselines
# ---------------------------------------------------------------------------------------------------------------------

# mmdet's `CocoDataset.CLASSES` (label i is the i-th sorted COCO category id), which the authors' detection scripts
# give their models (`A/train.py`, `A/test.py`: `model.class_names = list(CocoDataset.CLASSES)`).
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def _fpn_conv(inputs: int) -> Callable[[re.Match], str]:
    """`neck.fpn_convs.{i}`: the output convolution of input level i, or (i >= inputs) extra level i - inputs."""

    def target(match: re.Match) -> str:
        index = int(match[1])
        if index < inputs:
            return f"fpn.fpn_convs.{index}.{match[2]}"
        return f"fpn.extra_convs.{index - inputs}.{match[2]}"

    return target


def authors_detection_rules(state_dict: dict[str, torch.Tensor]) -> list[Rule]:
    """The rules that map an authors' detection state dict (RetinaNet or Mask R-CNN, DenseCLIP or CLIP baseline,
    found from its keys) to the detectors' keys (see the module docstring)."""
    family = clip_image_tower(state_dict, "backbone.").family
    inputs = count_indexed(state_dict, r"neck\.lateral_convs\.(\d+)\.", "FPN input levels")
    tensor = r"\.(weight|bias)"
    return [
        *base_model_rules(family, has_text(state_dict)),
        (r"neck\.lateral_convs\.(\d+)\.conv" + tensor, rename(r"fpn.lateral_convs.\1.\2")),
        (r"neck\.fpn_convs\.(\d+)\.conv" + tensor, rename(_fpn_conv(inputs))),
        (r"bbox_head\.cls_convs\.(\d+)\.conv" + tensor, rename(r"head.class_convs.\1.\2")),
        (r"bbox_head\.reg_convs\.(\d+)\.conv" + tensor, rename(r"head.box_convs.\1.\2")),
        (r"bbox_head\.retina_cls" + tensor, rename(r"head.classifier.\1")),
        (r"bbox_head\.retina_reg" + tensor, rename(r"head.box_regressor.\1")),
        (r"rpn_head\.rpn_conv" + tensor, rename(r"rpn.conv.\1")),
        (r"rpn_head\.rpn_cls" + tensor, rename(r"rpn.objectness.\1")),
        (r"rpn_head\.rpn_reg" + tensor, rename(r"rpn.box_regressor.\1")),
        (r"roi_head\.bbox_head\.shared_fcs\.(\d+)" + tensor, rename(r"box_head.shared_fcs.\1.\2")),
        (r"roi_head\.bbox_head\.fc_cls" + tensor, rename(r"box_head.classifier.\1")),
        (r"roi_head\.bbox_head\.fc_reg" + tensor, rename(r"box_head.box_regressor.\1")),
        (r"roi_head\.mask_head\.convs\.(\d+)\.conv" + tensor, rename(r"mask_head.convs.\1.\2")),
        (r"roi_head\.mask_head\.upsample" + tensor, rename(r"mask_head.upsample.\1")),
        (r"roi_head\.mask_head\.conv_logits" + tensor, rename(r"mask_head.classifier.\1")),
    ]


def convert_authors_detection_state_dict(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module, source: str = "The detection checkpoint"
) -> dict[str, torch.Tensor]:
    """An authors' detection state dict (its `state_dict`, keys without `module.`) in `model`'s key layout, ready for
    `model.load_state_dict(..., strict=True)`; a `ValueError` naming every unknown, missing or misshapen key."""
    converted = convert_keys(state_dict, authors_detection_rules(state_dict), source)
    check_converted(converted, shapes_of(model), source)
    return converted


def _anchors_per_position(state_dict: dict[str, torch.Tensor], key: str) -> int:
    """Anchors per position of a head whose box regression layer `key` predicts 4 deltas for each."""
    outputs = require_tensor(state_dict, key, "the anchors per position").shape[0]
    if outputs % 4:
        raise ValueError(f"{key} has {outputs} outputs: not 4 box deltas per anchor.")
    return outputs // 4


def _retinanet_classes(state_dict: dict[str, torch.Tensor]) -> int:
    """`retina_cls` predicts anchors x classes logits per position."""
    anchors = _anchors_per_position(state_dict, "bbox_head.retina_reg.weight")
    outputs = require_tensor(state_dict, "bbox_head.retina_cls.weight", "the number of classes").shape[0]
    if outputs % anchors:
        raise ValueError(f"bbox_head.retina_cls has {outputs} outputs: not a multiple of the {anchors} anchors.")
    return outputs // anchors


def _mask_rcnn_classes(state_dict: dict[str, torch.Tensor]) -> int:
    """`fc_cls` scores the classes and the background (last)."""
    return require_tensor(state_dict, "roi_head.bbox_head.fc_cls.weight", "the number of classes").shape[0] - 1


def _retinanet_architecture(state_dict: dict[str, torch.Tensor], fpn_channels: int) -> dict[str, Any]:
    return {
        "head_channels": require_tensor(state_dict, "bbox_head.cls_convs.0.conv.weight", "the head width").shape[0],
        "head_stacked_convs": count_indexed(state_dict, r"bbox_head\.cls_convs\.(\d+)\.", "head convolutions"),
    }


def _mask_rcnn_architecture(state_dict: dict[str, torch.Tensor], fpn_channels: int) -> dict[str, Any]:
    """The RPN and RoI heads' widths and depths; the box RoI size from the first fully connected layer's input (RoI
    features of `fpn_channels x size x size`)."""
    fc_width, fc_inputs = require_tensor(state_dict, "roi_head.bbox_head.shared_fcs.0.weight", "the box head").shape
    roi_size = round((fc_inputs / fpn_channels) ** 0.5)
    if fpn_channels * roi_size**2 != fc_inputs:
        raise ValueError(
            f"roi_head.bbox_head.shared_fcs.0 reads {fc_inputs} features: not {fpn_channels} FPN channels x a square "
            "RoI."
        )
    return {
        "rpn_channels": require_tensor(state_dict, "rpn_head.rpn_conv.weight", "the RPN width").shape[0],
        "box_head_fc_channels": fc_width,
        "box_roi_size": roi_size,
        "mask_head_convs": count_indexed(state_dict, r"roi_head\.mask_head\.convs\.(\d+)\.", "mask convolutions"),
        "mask_head_channels": require_tensor(
            state_dict, "roi_head.mask_head.convs.0.conv.weight", "the mask head width"
        ).shape[0],
    }


# Settings of the authors' mmdet configs that checkpoints do not store -> the config settings they become (read from
# the config mmcv embeds in a checkpoint; without it, the configs' defaults are the authors' values).
_DETECTION_SETTINGS = {"model.tau": "temperature"}
_RETINANET_SETTINGS = {
    "model.test_cfg.nms_pre": "nms_pre",
    "model.test_cfg.score_thr": "score_threshold",
    "model.test_cfg.nms.iou_threshold": "nms_iou_threshold",
    "model.test_cfg.max_per_img": "max_detections",
    "model.bbox_head.anchor_generator.octave_base_scale": "anchor_octave_base_scale",
    "model.bbox_head.anchor_generator.scales_per_octave": "anchor_scales_per_octave",
    "model.bbox_head.anchor_generator.ratios": "anchor_ratios",
    "model.bbox_head.anchor_generator.strides": "anchor_strides",
    "model.train_cfg.assigner.pos_iou_thr": "assigner_pos_iou_threshold",
    "model.train_cfg.assigner.neg_iou_thr": "assigner_neg_iou_threshold",
    "model.train_cfg.assigner.min_pos_iou": "assigner_min_pos_iou",
    "model.bbox_head.loss_cls.alpha": "focal_loss_alpha",
    "model.bbox_head.loss_cls.gamma": "focal_loss_gamma",
    "model.bbox_head.loss_cls.loss_weight": "classification_loss_weight",
    "model.bbox_head.loss_bbox.loss_weight": "box_loss_weight",
}
_MASK_RCNN_SETTINGS = {
    "model.test_cfg.rpn.nms_pre": "rpn_nms_pre",
    "model.test_cfg.rpn.max_per_img": "rpn_max_proposals",
    "model.test_cfg.rpn.nms.iou_threshold": "rpn_nms_iou_threshold",
    "model.test_cfg.rpn.min_bbox_size": "rpn_min_box_size",
    "model.test_cfg.rcnn.score_thr": "score_threshold",
    "model.test_cfg.rcnn.nms.iou_threshold": "nms_iou_threshold",
    "model.test_cfg.rcnn.max_per_img": "max_detections",
    "model.test_cfg.rcnn.mask_thr_binary": "mask_threshold",
    "model.rpn_head.anchor_generator.scales": "rpn_anchor_scales",
    "model.rpn_head.anchor_generator.ratios": "anchor_ratios",
    "model.rpn_head.anchor_generator.strides": "rpn_anchor_strides",
    "model.roi_head.bbox_roi_extractor.roi_layer.sampling_ratio": "roi_sampling_ratio",
    "model.roi_head.bbox_roi_extractor.finest_scale": "roi_finest_scale",
    "model.roi_head.mask_roi_extractor.roi_layer.output_size": "mask_roi_size",
    "model.roi_head.bbox_head.bbox_coder.target_stds": "box_coder_stds",
    "model.train_cfg.rpn_proposal.nms_pre": "rpn_train_nms_pre",
    "model.train_cfg.rpn.assigner.pos_iou_thr": "rpn_assigner_pos_iou_threshold",
    "model.train_cfg.rpn.assigner.neg_iou_thr": "rpn_assigner_neg_iou_threshold",
    "model.train_cfg.rpn.assigner.min_pos_iou": "rpn_assigner_min_pos_iou",
    "model.train_cfg.rpn.sampler.num": "rpn_sampler_num",
    "model.train_cfg.rpn.sampler.pos_fraction": "rpn_sampler_pos_fraction",
    "model.train_cfg.rcnn.assigner.pos_iou_thr": "rcnn_assigner_pos_iou_threshold",
    "model.train_cfg.rcnn.assigner.neg_iou_thr": "rcnn_assigner_neg_iou_threshold",
    "model.train_cfg.rcnn.assigner.min_pos_iou": "rcnn_assigner_min_pos_iou",
    "model.train_cfg.rcnn.sampler.num": "rcnn_sampler_num",
    "model.train_cfg.rcnn.sampler.pos_fraction": "rcnn_sampler_pos_fraction",
    "model.train_cfg.rcnn.sampler.add_gt_as_proposals": "rcnn_sampler_add_gt_as_proposals",
    "model.rpn_head.loss_cls.loss_weight": "rpn_classification_loss_weight",
    "model.rpn_head.loss_bbox.loss_weight": "rpn_box_loss_weight",
    "model.roi_head.bbox_head.loss_cls.loss_weight": "classification_loss_weight",
    "model.roi_head.bbox_head.loss_bbox.loss_weight": "box_loss_weight",
    "model.roi_head.mask_head.loss_mask.loss_weight": "mask_loss_weight",
}


@dataclass(frozen=True)
class AuthorsDetector:
    """One of the authors' detectors: the keys only its checkpoints have, the model it becomes, how its number of
    classes and head sizes are read from tensor shapes, which layer gives its anchors per position, and which
    settings of their config map onto the model's config."""

    name: str
    key_prefixes: tuple[str, ...]
    model_class: type[DenseClipDetectionPreTrainedModel]
    num_classes: Callable[[dict[str, torch.Tensor]], int]
    architecture: Callable[[dict[str, torch.Tensor], int], dict[str, Any]]
    anchors_key: str
    settings: dict[str, str]


AUTHORS_DETECTORS = {
    detector.name: detector
    for detector in (
        AuthorsDetector(
            "RetinaNet",
            ("bbox_head.",),
            DenseClipForObjectDetection,
            _retinanet_classes,
            _retinanet_architecture,
            "bbox_head.retina_reg.weight",
            _RETINANET_SETTINGS,
        ),
        AuthorsDetector(
            "Mask R-CNN",
            ("rpn_head.", "roi_head."),
            DenseClipForInstanceSegmentation,
            _mask_rcnn_classes,
            _mask_rcnn_architecture,
            "rpn_head.rpn_reg.weight",
            _MASK_RCNN_SETTINGS,
        ),
    )
}
# The key prefix of the authors' segmentation models (mmseg's decode head).
_SEGMENTATION_PREFIX = "decode_head."


def authors_detector(state_dict: dict[str, Any], source: str = "The checkpoint") -> AuthorsDetector | None:
    """The authors' detector a state dict holds (from its keys), or `None` for one of their segmentation models
    (`decode_head.*`); a `ValueError` for a state dict that is neither, or both."""
    found = [
        detector
        for detector in AUTHORS_DETECTORS.values()
        if any(key.startswith(detector.key_prefixes) for key in state_dict)
    ]
    segmentation = any(key.startswith(_SEGMENTATION_PREFIX) for key in state_dict)
    if len(found) + segmentation != 1:
        kinds = [detector.name for detector in found] + ["segmentation"] * segmentation
        raise ValueError(
            f"{source} does not hold one of the authors' DenseCLIP models: expected the keys of exactly one of "
            "decode_head.* (segmentation, mmseg), bbox_head.* (RetinaNet, mmdet) or rpn_head.* / roi_head.* (Mask "
            f"R-CNN, mmdet); found {' and '.join(kinds) if kinds else 'none of them'}."
        )
    return found[0] if found else None


def infer_detection_config(
    state_dict: dict[str, torch.Tensor],
    class_names: list[str],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    context_decoder_heads: int = AUTHORS_CONTEXT_DECODER_HEADS,
    checkpoint_config: dict[str, Any] | None = None,
) -> DenseClipDetectionConfig:
    """The config (`DenseClipRetinaNetConfig` or `DenseClipMaskRCNNConfig`) of an authors' detection state dict.

    From tensor shapes: the CLIP ResNet (depths, width, the attention pool's grid, 42 x 42 in the released models),
    the embedding size D, the text side (as `infer_config`), the number of classes, the FPN width and the level the
    score map joins, the heads' widths and depths, the box head's RoI size. From `checkpoint_config` (the training
    config mmcv embeds in the checkpoint, `parse_config_text`), where given: the test settings (score threshold, NMS,
    detections per image, ...), anchors, RoI settings, the training settings, and the baselines' `input_resolution`
    (their ResNet stores no grid). Everything else keeps the configs' defaults, the authors' values.

    Raises:
        ValueError: for keys of no detector, an image tower that is not a CLIP ResNet, shapes that do not fit
            together (anchors per position, score-map channels, box head inputs), or class names that do not fit.
    """
    detector = authors_detector(state_dict)
    if detector is None:
        raise ValueError("The state dict holds an authors' segmentation model: use infer_config.")
    checkpoint_config = checkpoint_config or {}
    family = clip_image_tower(state_dict, "backbone.").family
    if family != ClipResNetSettings.name:
        raise ValueError(
            f"The detector's image tower is a CLIP {family}: the authors' detectors use CLIP's ResNets (RN50, RN101)."
        )
    size_without_grid = config_value(checkpoint_config, "model.backbone.input_resolution")
    tower, vision_config = _image_encoder(state_dict, vision_heads, size_without_grid or AUTHORS_DETECTION_IMAGE_SIZE)
    num_classes = detector.num_classes(state_dict)
    _check_class_count(class_names, num_classes)
    fpn_channels = require_tensor(state_dict, "neck.lateral_convs.0.conv.weight", "the FPN width").shape[0]
    # The FPN reads the pyramid's last levels, from its start level on.
    pyramid_channels = image_encoder_settings(vision_config).pyramid_channels()
    start_level = len(pyramid_channels) - count_indexed(state_dict, r"neck\.lateral_convs\.(\d+)\.", "FPN inputs")
    if start_level < 0:
        raise ValueError(
            f"The FPN has more lateral convolutions than the image encoder's {len(pyramid_channels)} levels."
        )
    score_channels = num_classes if has_text(state_dict) else 0
    settings = {**_DETECTION_SETTINGS, **detector.settings}
    config = detector.model_class.config_class(
        vision_config=vision_config.to_dict(),
        id2label=dict(enumerate(class_names)),
        **_text_settings(state_dict, class_names, tower, text_heads, context_decoder_heads),
        **_score_map_level(state_dict, pyramid_channels, score_channels, start_level),
        fpn_channels=fpn_channels,
        **detector.architecture(state_dict, fpn_channels),
        **{
            field: value
            for path, field in settings.items()
            if (value := config_value(checkpoint_config, path)) is not None
        },
    )
    anchors = _anchors_per_position(state_dict, detector.anchors_key)
    if anchors != config.num_anchors:
        raise ValueError(
            f"The {detector.name} head predicts boxes for {anchors} anchors per position ({detector.anchors_key}); "
            f"the anchor settings give {config.num_anchors} (ratios {config.anchor_ratios}): the checkpoint's config "
            "had other anchors, which it does not embed."
        )
    return config


def detection_image_processor(
    checkpoint_config: dict[str, Any] | None = None, config: DenseClipConfig | None = None
) -> DenseClipDetectionImageProcessor:
    """The authors' mmdet test pipeline as a `DenseClipDetectionImageProcessor`: by default theirs
    (`img_scale=(1333, 800)`, keep ratio, CLIP mean / std, padding to 32); from the test pipeline of
    `checkpoint_config` (the training config mmcv embeds, `data.test.pipeline` or `test_pipeline`) where given: its
    scale (`MultiScaleFlipAug` or `Resize` `img_scale`), `keep_ratio`, `Normalize` mean / std and `Pad` divisor. What
    the processor cannot do (test-time flips or several scales, BGR input, padding to a fixed size) is logged as a
    warning and left out. The `mask_threshold` of a Mask R-CNN `config` becomes the processor's (the default of its
    `post_process_instance_segmentation`)."""
    checkpoint_config = checkpoint_config or {}
    pipeline = config_value(checkpoint_config, "data.test.pipeline") or checkpoint_config.get("test_pipeline") or []
    steps, unsupported = [], []
    for step in pipeline:  # MultiScaleFlipAug holds the resize, normalisation and padding
        steps += [step, *step.get("transforms", [])]
    settings: dict[str, Any] = {}
    if isinstance(config, DenseClipMaskRCNNConfig):
        settings["mask_threshold"] = config.mask_threshold
    scale, keep_ratio = None, True
    for step in steps:
        kind = step.get("type")
        if kind in ("MultiScaleFlipAug", "Resize"):
            scale = step.get("img_scale", scale)
            keep_ratio = step.get("keep_ratio", keep_ratio)
            if step.get("flip"):
                unsupported.append("test-time flips (flip=True)")
        elif kind == "Normalize":
            mean, std = (np.asarray(step[name], dtype=np.float64) / 255 for name in ("mean", "std"))
            if not (
                np.allclose(mean, OPENAI_CLIP_MEAN, rtol=0, atol=1e-9)
                and np.allclose(std, OPENAI_CLIP_STD, rtol=0, atol=1e-9)
            ):
                settings.update(image_mean=mean.tolist(), image_std=std.tolist())
            if not step.get("to_rgb", True):
                unsupported.append("BGR input (Normalize to_rgb=False)")
        elif kind == "Pad":
            if step.get("size") is not None:
                unsupported.append(f"padding to the fixed size {step['size']}")
            settings["size_divisor"] = step.get("size_divisor") or 1
    if scale is not None:
        if isinstance(scale[0], (list, tuple)):  # a list of scales: one test per scale
            if len(scale) > 1:
                unsupported.append(f"several scales {list(scale)} (the first is used)")
            scale = scale[0]
        # mmcv: keep-ratio scales bound the long and the short side; fixed scales are (width, height).
        width, height = scale
        settings["size"] = (
            {"shortest_edge": min(scale), "longest_edge": max(scale)}
            if keep_ratio
            else {"height": height, "width": width}
        )
    if unsupported:
        logger.warning(
            "The checkpoint's test pipeline does what DenseClipDetectionImageProcessor does not: "
            f"{'; '.join(unsupported)}. The converted processor runs without it."
        )
    return DenseClipDetectionImageProcessor(**settings)


# ---------------------------------------------------------------------------------------------------------------------
# One converter for all the authors' checkpoints
# ---------------------------------------------------------------------------------------------------------------------

ConvertedModel = DenseClipForSemanticSegmentation | DenseClipForObjectDetection | DenseClipForInstanceSegmentation


def _class_names(
    given: list[str] | None,
    meta: dict[str, Any],
    checkpoint_config: dict[str, Any],
    detector: AuthorsDetector | None,
    state_dict: dict[str, torch.Tensor],
    source: str,
) -> list[str]:
    """The class names: given, else the checkpoint's `meta["CLASSES"]`, else its config's `model.class_names`, else
    (an 80-class detector) COCO's, as the authors' detection scripts set them."""
    if given is not None:
        return list(given)
    for names in (meta.get("CLASSES"), config_value(checkpoint_config, "model.class_names")):
        if names:
            return list(names)
    if detector is not None and detector.num_classes(state_dict) == len(COCO_CLASS_NAMES):
        logger.warning(
            f"{source} has no meta['CLASSES']: its 80 classes get COCO's names in mmdet's order, as the authors' "
            "detection scripts give them (pass --class_names otherwise)."
        )
        return list(COCO_CLASS_NAMES)
    raise ValueError(f"{source} has no meta['CLASSES']: pass the class names (--class_names).")


def convert_denseclip_checkpoint(
    checkpoint: str | os.PathLike | dict[str, Any],
    class_names: list[str] | None = None,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    context_decoder_heads: int | None = None,
    vision_feature_layers: list[int] | None = None,
    loss_reduction: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> ConvertedModel:
    """An authors' checkpoint as a model (eval mode) with the same outputs: a segmentation model as
    `DenseClipForSemanticSegmentation`, a RetinaNet as `DenseClipForObjectDetection`, a Mask R-CNN as
    `DenseClipForInstanceSegmentation` (DenseCLIP or CLIP baseline, recognised from the keys; every tensor loaded
    strictly).

    Args:
        checkpoint: A checkpoint file (mmcv's `{"state_dict": ..., "meta": {"CLASSES": ..., "PALETTE": ...,
            "config": ...}}`, or a bare state dict; read with `torch.load(weights_only=True)`) or the loaded object.
        class_names: One name per class, in the checkpoint's order. Default: `meta["CLASSES"]`, else the embedded
            config's `model.class_names`, else, for an 80-class detector, COCO's (`COCO_CLASS_NAMES`).
        vision_heads, text_heads, context_decoder_heads: Attention heads (not stored in checkpoints). Defaults: the
            embedded config's (text and context decoder), else the authors' (ViT and text: width // 64; ResNet
            attention pool: 32; context decoder: 4).
        vision_feature_layers: Segmentation, ViT: layers forming the pyramid (the authors' `out_indices`); default as
            `DenseClipConfig`.
        loss_reduction: Segmentation: `"mean_all_pixels"` to compute losses as the authors' mmseg does; default: the
            package's `"mean_non_ignored"`. Outputs other than losses do not depend on it.
        output_dir: Also save the model there, with the authors' test pipeline as its image processor
            (segmentation: `image_processor_for`; detectors: `detection_image_processor` of the embedded config) and
            the code both run with (for `trust_remote_code=True`).

    Raises:
        ValueError: for keys of none of the authors' models, an unknown key, a missing one, a tensor of the wrong
            shape, class names that do not fit, or a segmentation option given for a detector.
        OSError: for a file that is not a readable checkpoint (e.g. truncated).
    """
    source = "The checkpoint" if isinstance(checkpoint, dict) else f"Checkpoint {os.fspath(checkpoint)!r}"
    raw = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    meta = (raw.get("meta") or {}) if isinstance(raw, dict) and "state_dict" in raw else {}
    state_dict = unwrap_state_dict(raw, source)
    checkpoint_config = parse_config_text(meta.get("config"))
    detector = authors_detector(state_dict, source)
    class_names = _class_names(class_names, meta, checkpoint_config, detector, state_dict, source)
    # Attention heads are not stored in checkpoints: given, else the embedded config's, else the authors'.
    if text_heads is None:
        text_heads = config_value(checkpoint_config, "model.text_encoder.transformer_heads")
    if context_decoder_heads is None:
        context_decoder_heads = (
            config_value(checkpoint_config, "model.context_decoder.transformer_heads") or AUTHORS_CONTEXT_DECODER_HEADS
        )
    heads = dict(vision_heads=vision_heads, text_heads=text_heads, context_decoder_heads=context_decoder_heads)
    if detector is None:
        palette = [[int(value) for value in colour] for colour in meta["PALETTE"]] if meta.get("PALETTE") else None
        config = infer_config(
            state_dict,
            class_names,
            **heads,
            vision_feature_layers=vision_feature_layers,
            loss_reduction=loss_reduction,
            palette=palette,
        )
        model_class = DenseClipForSemanticSegmentation
        rules = denseclip_rules(config.image_encoder_family, has_text(state_dict))
    else:
        segmentation_only = {"vision_feature_layers": vision_feature_layers, "loss_reduction": loss_reduction}
        if given := [name for name, value in segmentation_only.items() if value is not None]:
            raise ValueError(
                f"{source} holds the authors' {detector.name}: {', '.join(given)} only applies to their segmentation "
                "models; leave it out."
            )
        config = infer_detection_config(state_dict, class_names, **heads, checkpoint_config=checkpoint_config)
        model_class, rules = detector.model_class, authors_detection_rules(state_dict)
    converted = convert_keys(state_dict, rules, source)
    model = model_class(config)
    check_converted(converted, shapes_of(model), source)
    fix = AUTHORS_IMAGE_TOWERS[config.image_encoder_family].fix
    if fix is not None:
        fix(converted)
    model.load_state_dict(converted, strict=True)
    model.eval()
    if output_dir is not None:
        processor = (
            image_processor_for(config) if detector is None else detection_image_processor(checkpoint_config, config)
        )
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model


def describe(model: ConvertedModel) -> str:
    """One line about a converted model, for the command's output."""
    config = model.config
    kind = "DenseCLIP" if config.prompting_type != "none" else "CLIP baseline"
    score_map = f", score map on level {config.score_map_level}" if config.prompting_type != "none" else ""
    return f"{type(model).__name__} ({kind}, {config.image_encoder_family}, {config.num_labels} classes{score_map})"


def _read_class_names(value: str) -> list[str]:
    """`--class_names`: a JSON file holding a list of names, or the JSON list itself."""
    text = Path(value).read_text() if os.path.isfile(value) else value
    names = json.loads(text)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"--class_names must be a JSON list of strings (or a file holding one), got {value!r}.")
    return names


def argument_parser() -> argparse.ArgumentParser:
    """The command line of `python -m denseclip_hf.convert_denseclip_original_to_hf`."""
    parser = argparse.ArgumentParser(
        description="Convert a DenseCLIP checkpoint of the authors (mmseg segmentation, mmdet RetinaNet or Mask "
        "R-CNN) to a transformers folder."
    )
    parser.add_argument("--checkpoint", required=True, help="The authors' .pth (mmcv checkpoint or bare state dict)")
    parser.add_argument("--output_dir", required=True, help="Folder to write the model and image processor to")
    parser.add_argument(
        "--class_names",
        help="JSON list of class names, or a .json file with one (default: meta; COCO's for 80-class detectors)",
    )
    parser.add_argument("--vision_heads", type=int, help="ViT heads (default width // 64) or ResNet pool heads (32)")
    parser.add_argument(
        "--text_heads", type=int, help="Text transformer heads (default: embedded config, width // 64)"
    )
    parser.add_argument(
        "--context_decoder_heads", type=int, help="Context decoder heads (default: embedded config, else 4)"
    )
    parser.add_argument("--vision_feature_layers", type=int, nargs=4, help="ViT layers forming the pyramid")
    parser.add_argument(
        "--loss_reduction",
        choices=list(LOSS_REDUCTIONS),
        help=f"How losses average (default: {DenseClipConfig.loss_reduction}). {describe_choices(LOSS_REDUCTIONS)}",
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="Also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="With --push_to_hub: create the repository private")
    parser.add_argument("--revision", help="With --push_to_hub: the branch to commit to (made from main if new)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision apply to --push_to_hub REPO_ID")
    model = convert_denseclip_checkpoint(
        args.checkpoint,
        _read_class_names(args.class_names) if args.class_names else None,
        vision_heads=args.vision_heads,
        text_heads=args.text_heads,
        context_decoder_heads=args.context_decoder_heads,
        vision_feature_layers=args.vision_feature_layers,
        loss_reduction=args.loss_reduction,
        output_dir=args.output_dir,
    )
    print(f"Wrote {describe(model)} to {args.output_dir}")
    if args.push_to_hub:
        api = HfApi()  # the token of `hf auth login` or HF_TOKEN
        repo_id = api.create_repo(args.push_to_hub, private=args.private, exist_ok=True).repo_id
        if args.revision:
            api.create_branch(repo_id, branch=args.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            revision=args.revision,
            commit_message=f"DenseCLIP converted from {Path(args.checkpoint).name} with denseclip_hf",
        )
        print(f"Uploaded {args.output_dir} to {commit.commit_url}")


if __name__ == "__main__":
    main()
