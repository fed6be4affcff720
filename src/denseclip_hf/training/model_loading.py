"""The model a training run starts from: a small random DenseCLIP (the offline default), CLIP, or DenseCLIP."""

import os

from transformers import AutoConfig, CLIPTokenizer

from .. import CLIP_TOKENIZER_PATH
from ..configuration_denseclip import DenseClipConfig
from ..modeling_denseclip import DenseClipForSemanticSegmentation, tokenize_class_names


def offline_model_config(
    id2label: dict[int, str], tokenizer: CLIPTokenizer | None = None, **overrides
) -> DenseClipConfig:
    """A small DenseCLIP (ViT width 64, 4 layers, patch 8; text width 32, 2 layers) for the offline default run.

    It keeps the real CLIP vocabulary (49408 tokens) so that the packaged CLIP tokenizer encodes the class names; its
    weights are random. `overrides` are further `DenseClipConfig` settings.
    """
    tokenizer = tokenizer or CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH)
    class_names = [id2label[label] for label in range(len(id2label))]
    return DenseClipConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
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
        **overrides,
    )


def _from_clip(
    name_or_path: str, id2label: dict[int, str], loss_reduction: str, crop_size: int | None, prompting_type: str
) -> DenseClipForSemanticSegmentation:
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        name_or_path, id2label=id2label, loss_reduction=loss_reduction, prompting_type=prompting_type
    )
    if crop_size is not None:
        model.resize_position_embeddings(crop_size)
    return model


def load_model(
    model_name_or_path: str | None,
    id2label: dict[int, str],
    loss_reduction: str = "mean_non_ignored",
    crop_size: int | None = None,
    prompting_type: str = "post_model",
) -> DenseClipForSemanticSegmentation:
    """The model to train: a random [`offline_model_config`] model (no path), DenseCLIP on a CLIP checkpoint
    (`model_type` "clip", or an OpenAI/OpenCLIP checkpoint file such as `RN50.pt`; class names from `id2label`) or a
    DenseCLIP checkpoint (its labels must be `id2label`, its prompting `prompting_type`), with the cross-entropy
    averaged per `loss_reduction`. A model built at random or from CLIP gets `prompting_type`.

    Starting from CLIP, the positional embedding is resized once to `crop_size`, as the authors do."""
    if model_name_or_path is None:
        return DenseClipForSemanticSegmentation(
            offline_model_config(id2label, loss_reduction=loss_reduction, prompting_type=prompting_type)
        )
    if os.path.isfile(model_name_or_path):
        return _from_clip(model_name_or_path, id2label, loss_reduction, crop_size, prompting_type)
    try:
        model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    except OSError as error:
        raise ValueError(
            f"Could not load {model_name_or_path!r} ({error}). Without network access, leave out --model_name_or_path "
            "to train a small random-weight model, or pass a local folder."
        ) from error
    if model_type == "clip":
        return _from_clip(model_name_or_path, id2label, loss_reduction, crop_size, prompting_type)
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
    if model.config.prompting_type != prompting_type:
        raise ValueError(
            f"{model_name_or_path} has prompting_type={model.config.prompting_type!r} but the run asks for "
            f"{prompting_type!r}: pass --prompting_type {model.config.prompting_type} (or a recipe with that "
            "prompting), or start from its CLIP checkpoint."
        )
    model.config.loss_reduction = loss_reduction
    return model


__all__ = ["load_model", "offline_model_config"]
