"""The same model made to compute what the authors' segmentor computes (their code needs mmcv/mmseg, which do not
run here): the baseline of the side-by-side benchmarks. It changes one instance only, never the package. Their
detectors (mmdet) compute as this package's at inference but for the text tower (`text_as_the_authors`; their NMS and
RoIAlign are mmcv's compiled ops, which do not run here either, so both sides run this package's).

- Text tower: every position of every class prompt (K x 13 positions) on every forward, where this package runs the
  shared start token and contexts once and stops after the longest name (`DenseClipTextEncoder`), and caches the
  result in eval mode.
- Training: the text tower's weights take gradients and sit in the optimizer with learning rate 0 (their
  `lr_mult=0.0`), where this package freezes them (`requires_grad=False`).
- Losses: cross-entropy over the class dimension of `(batch, classes, H, W)` logits (mmseg's), where this package
  soft-maxes with the classes last (`pixel_cross_entropy`).
- Test protocol: mmseg's `slide_inference` / `inference` (one forward per window, each window's logits padded to the
  image and added, softmax over dimension 1 of channels-first logits), where this package batches the windows of an
  image and keeps full-resolution logits in channels-last memory.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipModel
from denseclip_hf.configuration_denseclip import resolve_test_protocol


def full_text_tower(text_encoder: nn.Module, class_token_ids: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """Their `CLIPTextContextEncoder`: `[SOT, p, name ids[1:]]` of every prompt through the whole causal tower, pooled
    at the end token; `contexts` `(groups, N, width)` -> `(groups, classes, D)`."""
    text_model = text_encoder.text_model
    groups, classes = contexts.shape[0], class_token_ids.shape[0]
    tokens = text_model.embeddings.token_embedding(class_token_ids).repeat(groups, 1, 1)
    contexts = contexts.repeat_interleave(classes, dim=0)
    hidden_states = torch.cat([tokens[:, :1], contexts, tokens[:, 1:]], dim=1)
    length = hidden_states.shape[1]
    hidden_states = hidden_states + text_model.embeddings.position_embedding.weight[:length]
    mask = torch.full((length, length), float("-inf"), device=hidden_states.device).triu(1)[None, None]
    for layer in text_model.encoder.layers:
        hidden_states = layer(hidden_states, mask)
    hidden_states = text_model.final_layer_norm(hidden_states)
    end = (class_token_ids == text_model.config.eos_token_id).int().argmax(-1).repeat(groups) + contexts.shape[1]
    pooled = hidden_states[torch.arange(len(end), device=end.device), end]
    return text_encoder.text_projection(pooled).view(groups, classes, -1)


def channels_first_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """mmseg's segmentation loss: logits bilinearly resized to the labels, cross-entropy over dimension 1."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if reduction == "mean_all_pixels":
        return losses.mean()
    return losses.sum() / (labels != ignore_index).sum().clamp(min=1)


def authors_loss(model: DenseClipForSemanticSegmentation, logits, score_map, labels):
    """Eq. 7 with `channels_first_cross_entropy`: decode loss + weight * identity loss of the score map / tau."""
    config = model.config
    settings = (config.semantic_loss_ignore_index, config.loss_reduction)
    decode_loss = channels_first_cross_entropy(logits, labels, *settings)
    identity_loss = channels_first_cross_entropy(score_map / config.temperature, labels, *settings)
    return decode_loss + config.identity_loss_weight * identity_loss, decode_loss, identity_loss


def text_as_the_authors(denseclip: DenseClipModel) -> list[nn.Parameter]:
    """Makes the base model of a segmentor or a detector run its text tower as the authors' code does: every position
    of every prompt, on every forward (no cache), the tower's weights taking gradients. Returns its parameters."""
    text_encoder = denseclip.text_encoder
    text_encoder._encode = lambda class_token_ids, contexts: full_text_tower(text_encoder, class_token_ids, contexts)
    text_encoder.requires_grad_(True)
    denseclip._can_cache_text_embeddings = lambda: False
    return list(text_encoder.parameters())


def behave_as_the_authors(model: DenseClipForSemanticSegmentation) -> list[nn.Parameter]:
    """Makes `model` compute as the authors' segmentor (see the module docstring). Returns the text tower's
    parameters, which a training benchmark puts in the optimizer with learning rate 0."""
    text_parameters = text_as_the_authors(model.denseclip)
    model.compute_loss = partial(authors_loss, model)
    model.predict_probabilities = partial(authors_predict_probabilities, model)
    return text_parameters


def authors_slide_logits(model: DenseClipForSemanticSegmentation, pixel_values: torch.Tensor) -> torch.Tensor:
    """mmseg's `slide_inference` without rescale: `(batch, classes, H, W)`."""
    _, (crop_height, crop_width), (stride_height, stride_width) = resolve_test_protocol(model.config, "slide")
    height, width = pixel_values.shape[-2:]
    rows = max(height - crop_height + stride_height - 1, 0) // stride_height + 1
    columns = max(width - crop_width + stride_width - 1, 0) // stride_width + 1
    summed = pixel_values.new_zeros(pixel_values.shape[0], model.config.num_labels, height, width)
    coverage = pixel_values.new_zeros(pixel_values.shape[0], 1, height, width)
    for row in range(rows):
        for column in range(columns):
            bottom, right = (
                min(row * stride_height + crop_height, height),
                min(column * stride_width + crop_width, width),
            )
            top, left = max(bottom - crop_height, 0), max(right - crop_width, 0)
            crop = pixel_values[:, :, top:bottom, left:right]
            logits = F.interpolate(
                model._single_pass_logits(crop), size=crop.shape[-2:], mode="bilinear", align_corners=False
            )
            summed += F.pad(logits, (left, width - right, top, height - bottom))
            coverage[:, :, top:bottom, left:right] += 1
    return summed / coverage


def authors_predict_probabilities(
    model: DenseClipForSemanticSegmentation, pixel_values: torch.Tensor, output_size: tuple[int, int], mode: str
) -> torch.Tensor:
    """mmseg's `inference(rescale=True)` of one input, without flip: slide or whole logits, bilinearly resized to
    `output_size`, soft-maxed over dimension 1."""
    if mode == "slide":
        logits = authors_slide_logits(model, pixel_values)
    else:
        logits = F.interpolate(
            model._single_pass_logits(pixel_values), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False
        )
    return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False).softmax(1)
