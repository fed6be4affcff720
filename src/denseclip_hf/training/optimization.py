"""The paper's optimizer and schedule: AdamW parameter groups and mmcv's poly learning rate with linear warmup.

Model internals are reached only through `model.base_model.image_encoder` (the parameters trained at
`image_encoder_lr_multiplier`) and through parameter names: the learnable contexts end in `context_embeddings`, the
post-model prompting scale in `gamma`.
"""

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Name endings of the parameters trained without weight decay besides norms and biases: the learnable contexts p and
# gamma of the post-model prompting (Eq. 6).
NO_WEIGHT_DECAY_PARAMETERS = ("context_embeddings", "gamma")
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def no_weight_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters trained without weight decay: normalization layers, biases, contexts and gamma."""
    names = {name for name, _ in model.named_parameters() if name.endswith(("bias", *NO_WEIGHT_DECAY_PARAMETERS))}
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names.update(f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False))
    return names


def parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, image_encoder_lr_multiplier: float
) -> list[dict]:
    """AdamW parameter groups of the paper's recipe, from the trainable (`requires_grad`) parameters only.

    The frozen text encoder gets no group, hence no optimizer state. Each group holds `lr`, `weight_decay` and
    `lr_multiplier`: the image encoder (`model.base_model.image_encoder`, CLIP backbone and pyramid) trains at
    `image_encoder_lr_multiplier * learning_rate`, all else at `learning_rate`.
    """
    no_decay = no_weight_decay_parameter_names(model)
    image_encoder = {id(parameter) for parameter in model.base_model.image_encoder.parameters()}
    groups: dict[tuple[float, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        multiplier = image_encoder_lr_multiplier if id(parameter) in image_encoder else 1.0
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
    if step < num_warmup_steps:
        lr *= 1 - (1 - step / num_warmup_steps) * (1 - warmup_ratio)
    return lr


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

    def factor(base_lr: float):
        if base_lr == 0:
            return lambda step: 0.0
        return lambda step: (
            poly_learning_rate(step, base_lr, num_training_steps, power, min_lr, num_warmup_steps, warmup_ratio)
            / base_lr
        )

    return LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])


def num_update_steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of `num_batches` batches (the last step of an epoch may accumulate fewer)."""
    return math.ceil(num_batches / gradient_accumulation_steps)


__all__ = [
    "no_weight_decay_parameter_names",
    "num_update_steps_per_epoch",
    "parameter_groups",
    "poly_learning_rate",
    "poly_schedule_with_warmup",
]
