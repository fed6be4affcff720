"""The same model made to compute what the authors' segmentor computes (their code needs mmcv/mmseg, which do not
run here): the baseline of the side-by-side benchmarks. It changes one instance only, never the package.

- Text tower: every position of every class prompt (K x 13 positions) on every forward, where this package runs the
  shared start token and contexts once and stops after the longest name (`DenseClipTextEncoder`), and caches the
  result in eval mode.
- Training: the text tower's weights take gradients and sit in the optimizer with learning rate 0 (their
  `lr_mult=0.0`), where this package freezes them (`requires_grad=False`).
- Losses: cross-entropy over the class dimension of `(batch, classes, H, W)` logits (mmseg's), where this package
  soft-maxes with the classes last (`pixel_cross_entropy`).
- Sliding windows: one forward per window, where this package batches the windows of an image.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from denseclip_hf import DenseClipForSemanticSegmentation


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


def behave_as_the_authors(model: DenseClipForSemanticSegmentation) -> list[nn.Parameter]:
    """Makes `model` compute as the authors' segmentor (see the module docstring). Returns the text tower's
    parameters, which a training benchmark puts in the optimizer with learning rate 0."""
    denseclip = model.denseclip
    text_encoder = denseclip.text_encoder
    text_encoder._encode = lambda class_token_ids, contexts: full_text_tower(text_encoder, class_token_ids, contexts)
    text_encoder.requires_grad_(True)
    denseclip._can_cache_text_embeddings = lambda: False
    model.compute_loss = partial(authors_loss, model)
    single_pass = model._single_pass_logits
    model._single_pass_logits = lambda pixel_values, text_embeddings=None: torch.cat(
        [single_pass(window[None], text_embeddings) for window in pixel_values]
    )
    return list(text_encoder.parameters())
