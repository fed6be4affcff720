"""The paper's optimizer and schedule: AdamW parameter groups and mmcv's poly learning rate with linear warmup.

Model internals are reached only through `model.base_model.image_encoder` (the parameters trained at
`image_encoder_lr_multiplier`) and through module and parameter names: the learnable contexts end in
`context_embeddings`, the post-model prompting scale in `gamma`, the pre-model prompting queries in
`prompting.queries`.
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# The authors' mmcv `paramwise_cfg.custom_keys` key `norm` (decay_mult 0) matches their module names; outside the
# backbone and the text encoder (whose keys match first) only the context decoder layers' LayerNorms `norm1-3` carry
# it (their projections' LayerNorms are `Sequential` indices, the head's BatchNorms `bn`). Ours keep those names.
AUTHORS_NO_DECAY_MODULE = re.compile(r"norm\d*")
# Name endings of the parameters the `extended` grouping also trains without weight decay: the learnable contexts p,
# gamma of the post-model prompting (Eq. 6) and the learnable queries q of the pre-model prompting (Eq. 4).
NO_WEIGHT_DECAY_PARAMETERS = ("context_embeddings", "gamma", "prompting.queries")


def _authors_no_weight_decay(model: nn.Module) -> set[str]:
    """mmcv's grouping of the authors' configs: the LayerNorms named `norm<i>` outside the image encoder."""
    image_encoder = {id(parameter) for parameter in model.base_model.image_encoder.parameters()}
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and AUTHORS_NO_DECAY_MODULE.fullmatch(module_name.rpartition(".")[2]):
            names.update(
                f"{module_name}.{name}"
                for name, parameter in module.named_parameters(recurse=False)
                if id(parameter) not in image_encoder
            )
    return names


def _extended_no_weight_decay(model: nn.Module) -> set[str]:
    """Every normalization layer, every bias, the learnable contexts, gamma and the pre-model queries."""
    names = {name for name, _ in model.named_parameters() if name.endswith(("bias", *NO_WEIGHT_DECAY_PARAMETERS))}
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names.update(f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False))
    return names


@dataclass(frozen=True)
class WeightDecayExemption:
    """A grouping of the parameters trained without weight decay: what it exempts, in words (help texts, model
    cards), and the function that names those parameters of a model."""

    description: str
    parameter_names: Callable[[nn.Module], set[str]]


# `--weight_decay_exemptions`: which parameters train without weight decay.
WEIGHT_DECAY_EXEMPTIONS = {
    "authors": WeightDecayExemption(
        "the LayerNorms of the vision-to-language decoder's layers (the authors' grouping)", _authors_no_weight_decay
    ),
    "extended": WeightDecayExemption(
        "every normalization layer, every bias, the learnable contexts, gamma and the pre-model queries",
        _extended_no_weight_decay,
    ),
}


def no_weight_decay_parameter_names(model: nn.Module, exemptions: str = "authors") -> set[str]:
    """Names of the parameters trained without weight decay under `exemptions` ([`WEIGHT_DECAY_EXEMPTIONS`]):

    - `"authors"` (default): as mmcv groups the authors' released configs (`custom_keys` `norm`: decay_mult 0 on
      parameters whose name contains `norm`, unless `backbone` or `text_encoder` matched first): the LayerNorms of
      the vision-to-language decoder's layers only. Biases, other norms, contexts and gamma decay.
    - `"extended"`: every normalization layer (image encoder included), every bias, the contexts and gamma.
    """
    if exemptions not in WEIGHT_DECAY_EXEMPTIONS:
        raise ValueError(
            f"Unknown weight decay exemptions {exemptions!r}: pass one of {list(WEIGHT_DECAY_EXEMPTIONS)}."
        )
    return WEIGHT_DECAY_EXEMPTIONS[exemptions].parameter_names(model)


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    image_encoder_lr_multiplier: float,
    weight_decay_exemptions: str = "authors",
) -> list[dict]:
    """AdamW parameter groups of the paper's recipe, from the trainable (`requires_grad`) parameters only.

    The frozen text encoder gets no group, hence no optimizer state (the authors' lr_mult 0); a text encoder made
    trainable (`requires_grad`, to take gradients as the authors' detection training does for its gradient clipping)
    gets learning rate 0 (`lr_multiplier` 0), so that it stays unchanged. Each group holds `lr`, `weight_decay` and
    `lr_multiplier`: the image encoder (`model.base_model.image_encoder`, CLIP backbone and pyramid, the authors'
    `backbone`) trains at `image_encoder_lr_multiplier * learning_rate`, all else at `learning_rate`; the parameters
    of [`no_weight_decay_parameter_names`]`(model, weight_decay_exemptions)` at weight decay 0, all else at
    `weight_decay`.
    """
    no_decay = no_weight_decay_parameter_names(model, weight_decay_exemptions)
    image_encoder = {id(parameter) for parameter in model.base_model.image_encoder.parameters()}
    text_encoder = model.base_model.text_encoder
    text_tower = {id(parameter) for parameter in text_encoder.parameters()} if text_encoder is not None else set()
    groups: dict[tuple[float, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        multiplier = image_encoder_lr_multiplier if id(parameter) in image_encoder else 1.0
        multiplier = 0.0 if id(parameter) in text_tower else multiplier
        decay = name not in no_decay
        group = groups.setdefault(
            (multiplier, decay),
            {
                "params": [],
                "lr": learning_rate * multiplier,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_multiplier": multiplier,
            },
        )
        group["params"].append(parameter)
    return list(groups.values())


# Devices whose PyTorch has a fused AdamW kernel.
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu")


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    image_encoder_lr_multiplier: float,
    weight_decay_exemptions: str = "authors",
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """The paper's AdamW over `parameter_groups(...)`, for training on `device_type`: PyTorch's fused implementation
    where the device has one (`FUSED_ADAMW_DEVICES`; one kernel for all parameters: on a 2-core CPU its step over
    ViT-B/16's trainable parameters is 3.9x faster than the default one, `benchmarks/components.py`; the same
    update), the default elsewhere."""
    groups = parameter_groups(model, learning_rate, weight_decay, image_encoder_lr_multiplier, weight_decay_exemptions)
    fused = device_type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)


def poly_learning_rate(
    step: int,
    base_lr: float,
    num_training_steps: int,
    power: float = 0.9,
    min_lr: float = 1e-6,
    num_warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
) -> float:
    """Learning rate of optimizer step `step` (0-based) under mmcv's `PolyLrUpdaterHook` with linear warmup.

    `lr = (base_lr - min_lr) * (1 - step / num_training_steps) ** power + min_lr`, and during the first
    `num_warmup_steps` steps that value times `1 - (1 - step / num_warmup_steps) * (1 - warmup_ratio)`.
    """
    progress = min(step, num_training_steps) / num_training_steps
    lr = (base_lr - min_lr) * (1 - progress) ** power + min_lr
    return lr * warmup_factor(step, num_warmup_steps, warmup_ratio)


def warmup_factor(step: int, num_warmup_steps: int, warmup_ratio: float) -> float:
    """mmcv's linear warmup: `1 - (1 - step / num_warmup_steps) * (1 - warmup_ratio)` during the first
    `num_warmup_steps` steps (0-based `step`), 1 after."""
    if step >= num_warmup_steps:
        return 1.0
    return 1 - (1 - step / num_warmup_steps) * (1 - warmup_ratio)


def schedule_from_rule(optimizer: torch.optim.Optimizer, rule: Callable[[int, float], float]) -> LambdaLR:
    """A `LambdaLR` that gives each parameter group the learning rate `rule(step, initial_lr)` at optimizer step
    `step` (0-based; call `step()` once per optimizer step); groups at learning rate 0 stay at 0."""

    def factor(base_lr: float):
        if base_lr == 0:
            return lambda step: 0.0
        return lambda step: rule(step, base_lr) / base_lr

    return LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])


def poly_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    power: float = 0.9,
    min_lr: float = 1e-6,
    num_warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
) -> LambdaLR:
    """A `LambdaLR` that gives every parameter group the [`poly_learning_rate`] of its initial learning rate; call
    `step()` once per optimizer step. All groups decay to the same absolute `min_lr`, as in mmcv."""
    return schedule_from_rule(
        optimizer,
        lambda step, base_lr: poly_learning_rate(
            step, base_lr, num_training_steps, power, min_lr, num_warmup_steps, warmup_ratio
        ),
    )


def step_learning_rate(
    step: int,
    base_lr: float,
    steps_per_epoch: int,
    milestones: Sequence[int],
    gamma: float = 0.1,
    num_warmup_steps: int = 0,
    warmup_ratio: float = 0.001,
) -> float:
    """Learning rate of optimizer step `step` (0-based) under mmcv's `StepLrUpdaterHook` (`by_epoch=True`) with
    linear warmup by iteration, the authors' detection schedule: in epoch `e = step // steps_per_epoch` (0-based)
    `base_lr * gamma ** #{m in milestones: m <= e}`, times [`warmup_factor`] during the first `num_warmup_steps`
    steps. The authors' `step=[8, 11]` of 12 epochs: x0.1 from the 9th epoch, x0.01 in the 12th."""
    epoch = step // steps_per_epoch
    decayed = base_lr * gamma ** sum(milestone <= epoch for milestone in milestones)
    return decayed * warmup_factor(step, num_warmup_steps, warmup_ratio)


def step_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    milestones: Sequence[int],
    gamma: float = 0.1,
    num_warmup_steps: int = 0,
    warmup_ratio: float = 0.001,
) -> LambdaLR:
    """A `LambdaLR` that gives every parameter group the [`step_learning_rate`] of its initial learning rate; call
    `step()` once per optimizer step."""
    return schedule_from_rule(
        optimizer,
        lambda step, base_lr: step_learning_rate(
            step, base_lr, steps_per_epoch, milestones, gamma, num_warmup_steps, warmup_ratio
        ),
    )


def num_update_steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of `num_batches` batches (the last step of an epoch may accumulate fewer)."""
    return math.ceil(num_batches / gradient_accumulation_steps)


__all__ = [
    "WEIGHT_DECAY_EXEMPTIONS",
    "WeightDecayExemption",
    "no_weight_decay_parameter_names",
    "num_update_steps_per_epoch",
    "parameter_groups",
    "poly_learning_rate",
    "poly_schedule_with_warmup",
    "schedule_from_rule",
    "step_learning_rate",
    "step_schedule_with_warmup",
    "warmup_factor",
]
