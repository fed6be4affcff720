"""The model a training run starts from: a small random DenseCLIP (the offline default), CLIP, or DenseCLIP; for
segmentation ([`load_model`]) and detection ([`load_detection_model`])."""

import logging
import math
import os

import torch
from transformers import AutoConfig, CLIPTokenizer

from .. import CLIP_TOKENIZER_PATH
from ..configuration_denseclip import DenseClipConfig, DenseClipResNetConfig
from ..configuration_denseclip_detection import (
    DenseClipDetectionConfig,
    DenseClipMaskRCNNConfig,
    DenseClipRetinaNetConfig,
)
from ..loading_denseclip import tokenize_class_names
from ..modeling_denseclip import DenseClipForSemanticSegmentation
from ..modeling_denseclip_detection import (
    DenseClipDetectionPreTrainedModel,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
)

logger = logging.getLogger(__name__)

# The CLIP text tower of the offline default runs' small random models (segmentation and detection): width 32,
# 2 layers, 16 tokens, with the real CLIP vocabulary.
OFFLINE_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
}


def offline_model_config(
    id2label: dict[int, str], tokenizer: CLIPTokenizer | None = None, **overrides
) -> DenseClipConfig:
    """A small DenseCLIP (ViT width 64, 4 layers, patch 8; text width 32, 2 layers) for the offline default run.

    It keeps the real CLIP vocabulary (49408 tokens) so that the packaged CLIP tokenizer encodes the class names; its
    weights are random. `overrides` are further `DenseClipConfig` settings.
    """
    tokenizer = tokenizer or CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH)
    class_names = [id2label[label] for label in range(len(id2label))]
    settings = dict(
        text_config=dict(OFFLINE_TEXT_CONFIG),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=128,
            patch_size=8,
        ),
        projection_dim=64,
        context_decoder_layers=2,
        context_decoder_hidden_size=64,
        context_decoder_heads=4,
        fpn_channels=64,
        decode_head_channels=64,
        id2label=id2label,
        class_token_ids=tokenize_class_names(class_names, tokenizer, DenseClipConfig.class_name_token_length),
    )
    return DenseClipConfig(**{**settings, **overrides})


def _from_clip(
    name_or_path: str, id2label: dict[int, str], crop_size: int | None, settings: dict
) -> DenseClipForSemanticSegmentation:
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(name_or_path, id2label=id2label, **settings)
    if crop_size is not None:
        model.resize_position_embeddings(crop_size)
    return model


def _with_backbone(
    backbone_name_or_path: str,
    model_name_or_path: str | None,
    id2label: dict[int, str],
    crop_size: int | None,
    settings: dict,
) -> DenseClipForSemanticSegmentation:
    """Any backbone (Sec. 4.3): a backbone checkpoint (its weights) or the config.json of one (random weights) as
    the image encoder, with the text tower of the CLIP checkpoint `model_name_or_path` or the small random one."""
    random_backbone = os.path.isfile(backbone_name_or_path)
    if model_name_or_path is not None:
        if random_backbone:
            raise ValueError(
                f"--backbone_name_or_path {backbone_name_or_path} is a config file (random backbone weights): pass a "
                "backbone checkpoint to train with a CLIP text tower, or leave out --model_name_or_path."
            )
        model = DenseClipForSemanticSegmentation.from_backbone_pretrained(
            backbone_name_or_path, model_name_or_path, id2label, **settings
        )
    else:
        try:
            backbone_config = AutoConfig.from_pretrained(backbone_name_or_path)
        except OSError as error:
            raise ValueError(
                f"Could not load the backbone {backbone_name_or_path!r} ({error}). Without network access, pass a "
                "local folder or a config.json."
            ) from error
        config = offline_model_config(id2label, vision_config=backbone_config.to_dict(), **settings)
        model = DenseClipForSemanticSegmentation(config)
        if not random_backbone:
            model.base_model.image_encoder.load_backbone_weights(backbone_name_or_path)
    if crop_size is not None:
        model.resize_position_embeddings(crop_size)
    return model


def load_model(
    model_name_or_path: str | None,
    id2label: dict[int, str],
    loss_reduction: str = "mean_non_ignored",
    crop_size: int | None = None,
    backbone_name_or_path: str | None = None,
    **settings,
) -> DenseClipForSemanticSegmentation:
    """The model to train: a random [`offline_model_config`] model (no path), DenseCLIP on a CLIP checkpoint
    (`model_type` "clip", or an OpenAI/OpenCLIP checkpoint file such as `RN50.pt`; class names from `id2label`) or a
    DenseCLIP checkpoint (its labels must be `id2label`), with the cross-entropy averaged per `loss_reduction`. With
    `backbone_name_or_path`, any backbone (see `_with_backbone`). `settings` are `DenseClipConfig` settings of a new
    model (`decoder_type`, `decode_head_channels`, `prompting_type`; `None` values are left to the config's
    defaults); a DenseCLIP checkpoint keeps its own, and must have the `prompting_type` asked for.

    Starting from CLIP, the positional embedding is resized once to `crop_size`, as the authors do."""
    settings = {name: value for name, value in settings.items() if value is not None}
    settings["loss_reduction"] = loss_reduction
    if backbone_name_or_path is not None:
        return _with_backbone(backbone_name_or_path, model_name_or_path, id2label, crop_size, settings)
    if model_name_or_path is None:
        return DenseClipForSemanticSegmentation(offline_model_config(id2label, **settings))
    if os.path.isfile(model_name_or_path):
        return _from_clip(model_name_or_path, id2label, crop_size, settings)
    try:
        model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    except OSError as error:
        raise ValueError(
            f"Could not load {model_name_or_path!r} ({error}). Without network access, leave out --model_name_or_path "
            "to train a small random-weight model, or pass a local folder."
        ) from error
    if model_type == "clip":
        return _from_clip(model_name_or_path, id2label, crop_size, settings)
    if model_type != DenseClipConfig.model_type:
        raise ValueError(f"{model_name_or_path} is a {model_type!r} model: pass a CLIP or a DenseCLIP checkpoint.")
    model = DenseClipForSemanticSegmentation.from_pretrained(model_name_or_path)
    checkpoint_labels = [model.config.id2label[label] for label in range(model.config.num_labels)]
    dataset_labels = [id2label[label] for label in range(len(id2label))]
    if checkpoint_labels != dataset_labels:
        raise ValueError(
            f"{model_name_or_path} predicts {len(checkpoint_labels)} classes {checkpoint_labels[:5]}... but the "
            f"dataset has {len(dataset_labels)} classes {dataset_labels[:5]}...: fine-tune from its CLIP checkpoint "
            "instead, or pass --id2label with the checkpoint's classes."
        )
    prompting_type = settings.get("prompting_type", model.config.prompting_type)
    if model.config.prompting_type != prompting_type:
        raise ValueError(
            f"{model_name_or_path} has prompting_type={model.config.prompting_type!r} but the run asks for "
            f"{prompting_type!r}: pass --prompting_type {model.config.prompting_type} (or a recipe with that "
            "prompting), or start from its CLIP checkpoint."
        )
    model.config.loss_reduction = loss_reduction
    return model


# The initial foreground probability of the offline RetinaNet's classifier (mmdet's `bias_prob` of `retina_cls`):
# random weights train from scratch, and without it every anchor starts at probability 0.5, a focal loss of ~100x
# its value after a few steps.
FOCAL_PRIOR_PROBABILITY = 0.01
# The detectors of `examples/train_det.py --model_type`.
DETECTOR_CLASSES = {"retinanet": DenseClipForObjectDetection, "maskrcnn": DenseClipForInstanceSegmentation}


def detection_input_size(image_scale: tuple[int, int] | list[int]) -> int:
    """The largest padded side of the detectors' inputs at the keep-ratio bounds `image_scale` (its long side padded
    to a multiple of 32): the attention pool's grid side in pixels (the authors' 1344 for 1333 x 800)."""
    return -(-max(image_scale) // 32) * 32


def offline_detection_config(
    model_type: str,
    id2label: dict[int, str],
    prompting_type: str = "post_model",
    image_size: int = 256,
    tokenizer: CLIPTokenizer | None = None,
) -> DenseClipDetectionConfig:
    """A small DenseCLIP detector for the offline default run (random weights): CLIP ResNet with one block per stage,
    width 16 (C2-C5: 64-512 channels); text width 32, 2 layers; FPN and heads of 64 channels (Mask R-CNN: 128-wide
    box head, 32-channel mask head of 2 convolutions, 128 sampled RoIs); anchors half the authors' size (RetinaNet:
    octave base scale 2, 16-25 pixels at stride 8; RPN: scale 4), for the small objects of small images (the
    synthetic scenes: 128 x 128, objects of 12-47 pixels). `image_size`: the attention pool's grid side in pixels
    ([`detection_input_size`]). The real CLIP vocabulary encodes the class names."""
    tokenizer = tokenizer or CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH)
    class_names = [id2label[label] for label in range(len(id2label))]
    settings = dict(
        vision_config=DenseClipResNetConfig(
            layers=[1, 1, 1, 1], width=16, attention_pool_heads=8, image_size=image_size
        ),
        text_config=dict(OFFLINE_TEXT_CONFIG),
        projection_dim=64,
        context_decoder_layers=1,
        context_decoder_hidden_size=64,
        context_decoder_heads=4,
        fpn_channels=64,
        id2label=id2label,
        prompting_type=prompting_type,
    )
    if prompting_type != "none":
        settings["class_token_ids"] = tokenize_class_names(
            class_names, tokenizer, DenseClipDetectionConfig.class_name_token_length
        )
    if model_type == "retinanet":
        return DenseClipRetinaNetConfig(head_channels=64, head_stacked_convs=2, anchor_octave_base_scale=2, **settings)
    return DenseClipMaskRCNNConfig(
        rpn_channels=64,
        box_head_fc_channels=128,
        mask_head_channels=32,
        mask_head_convs=2,
        rcnn_sampler_num=128,
        rpn_anchor_scales=[4],
        **settings,
    )


def load_detection_model(
    model_name_or_path: str | None,
    model_type: str,
    id2label: dict[int, str],
    prompting_type: str = "post_model",
    image_size: int = 1344,
) -> DenseClipDetectionPreTrainedModel:
    """The detector to train (`model_type` of [`DETECTOR_CLASSES`]): a random [`offline_detection_config`] model (no
    path; a RetinaNet's classifier bias at the [`FOCAL_PRIOR_PROBABILITY`] prior; its positional grid for `image_size`
    pixels, [`detection_input_size`]), a detector on CLIP weights (an OpenAI `RN50.pt` / `RN101.pt` file or a
    transformers CLIP folder; class names from `id2label`; `from_clip_pretrained` resizes CLIP's positional grid once
    to the authors' `input_resolution` 1344, as their `init_weights` does, or to `image_size` where that is larger),
    or a DenseCLIP detection checkpoint of that type (its classes must be `id2label`'s)."""
    if model_type not in DETECTOR_CLASSES:
        raise ValueError(f"Unknown detector {model_type!r}: pass one of {list(DETECTOR_CLASSES)}.")
    model_class = DETECTOR_CLASSES[model_type]
    if model_name_or_path is None:
        model = model_class(offline_detection_config(model_type, id2label, prompting_type, image_size))
        if model_type == "retinanet":  # mmdet's configured focal-loss prior (the authors' train.py skipped it)
            with torch.no_grad():
                model.head.classifier.bias.fill_(-math.log((1 - FOCAL_PRIOR_PROBABILITY) / FOCAL_PRIOR_PROBABILITY))
        return model
    if not os.path.isfile(model_name_or_path):
        try:
            checkpoint_type = AutoConfig.from_pretrained(model_name_or_path).model_type
        except OSError as error:
            raise ValueError(
                f"Could not load {model_name_or_path!r} ({error}). Without network access, leave out "
                "--model_name_or_path to train a small random-weight detector, or pass a local file or folder."
            ) from error
        if checkpoint_type in (DenseClipRetinaNetConfig.model_type, DenseClipMaskRCNNConfig.model_type):
            model = model_class.from_pretrained(model_name_or_path)
            if model.config.model_type != model_class.config_class.model_type:
                raise ValueError(
                    f"{model_name_or_path} is a {model.config.model_type!r} checkpoint but --model_type is "
                    f"{model_type!r}: pass the matching --model_type (or recipe)."
                )
            checkpoint_labels = [model.config.id2label[label] for label in range(model.config.num_labels)]
            if checkpoint_labels != [id2label[label] for label in range(len(id2label))]:
                raise ValueError(
                    f"{model_name_or_path} detects {len(checkpoint_labels)} classes {checkpoint_labels[:5]}... but "
                    f"the dataset has {len(id2label)}: fine-tune from its CLIP checkpoint instead."
                )
            return model
        if checkpoint_type != "clip":
            raise ValueError(
                f"{model_name_or_path} is a {checkpoint_type!r} model: pass a CLIP checkpoint (RN50.pt, a CLIP "
                "folder) or a DenseCLIP detection checkpoint."
            )
    # The authors' grid (the config's, which `from_clip_pretrained` makes), or a larger one for larger inputs.
    grid_size = max(image_size, model_class.config_class.clip_position_embedding_size)
    return model_class.from_clip_pretrained(
        model_name_or_path, id2label=id2label, prompting_type=prompting_type, position_embedding_size=grid_size
    )


def sync_batchnorm_devices() -> tuple[str, ...]:
    """The device types on which torch's `SyncBatchNorm` synchronizes (it raises on others, CPU included)."""
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def uses_sync_batchnorm(enabled: bool, num_processes: int, device_type: str) -> bool:
    """Whether a launch trains with `SyncBatchNorm` (the authors' `norm_cfg=dict(type="SyncBN")`): when `enabled`
    (`--sync_batchnorm`, the default), more than one process trains and the device type supports it."""
    return enabled and num_processes > 1 and device_type in sync_batchnorm_devices()


def convert_batchnorm_for_launch(
    model: torch.nn.Module, enabled: bool, num_processes: int, device_type: str
) -> torch.nn.Module:
    """`model` with every BatchNorm turned into a `SyncBatchNorm` (same weights and statistics) where
    [`uses_sync_batchnorm`], else `model` unchanged; a multi-process run on a device without `SyncBatchNorm` keeps
    per-process statistics, with a warning."""
    if uses_sync_batchnorm(enabled, num_processes, device_type):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if enabled and num_processes > 1:
        logger.warning(
            f"BatchNorm statistics stay per process: torch's SyncBatchNorm does not run on {device_type!r} "
            f"(only on {', '.join(sync_batchnorm_devices())})."
        )
    return model


__all__ = [
    "DETECTOR_CLASSES",
    "convert_batchnorm_for_launch",
    "detection_input_size",
    "load_detection_model",
    "load_model",
    "offline_detection_config",
    "offline_model_config",
    "sync_batchnorm_devices",
    "uses_sync_batchnorm",
]
