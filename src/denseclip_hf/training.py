"""The DenseCLIP training recipe: presets, command-line arguments, optimizer parameter groups, poly schedule, model.

The authors' recipe (mmseg configs of the DenseCLIP repository): AdamW with lr 1e-4 and weight decay 1e-4; the image
encoder (CLIP backbone and its pyramid) at 0.1x the learning rate; the CLIP text encoder frozen; no weight decay on
normalization layers, biases, the learnable contexts and gamma; poly decay (power 0.9) to 1e-6 after a linear warmup of
1500 iterations starting at 1e-6 of the learning rate; 80k iterations at a global batch of 32.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, CLIPTokenizer, HfArgumentParser

from .checkpointing import checkpoint_step, checkpoints_root
from .configuration_denseclip import DenseClipConfig
from .modeling_denseclip import DenseClipForSemanticSegmentation, tokenize_class_names

# Parameters (last part of their names) trained without weight decay besides norms and biases.
NO_WEIGHT_DECAY_PARAMETERS = ("context_embeddings", "gamma")
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A complete set of training settings; every field is also a command-line flag that overrides it."""

    description: str
    learning_rate: float
    weight_decay: float
    image_encoder_lr_multiplier: float
    lr_power: float
    min_learning_rate: float
    num_warmup_steps: int
    warmup_ratio: float
    max_train_steps: int
    total_train_batch_size: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    crop_size: int
    image_scale: tuple[int, int]
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    eval_steps: int | None
    checkpointing_steps: str | None
    dataloader_num_workers: int
    loss_reduction: str
    paper_miou: tuple[float, float] | None = None


_ADE20K_VIT_B16 = Recipe(
    description="DenseCLIP ViT-B/16 + Semantic FPN on ADE20K, 640x640 crops, 80k iterations (paper, Table 1)",
    learning_rate=1e-4,
    weight_decay=1e-4,
    image_encoder_lr_multiplier=0.1,
    lr_power=0.9,
    min_learning_rate=1e-6,
    num_warmup_steps=1500,
    warmup_ratio=1e-6,
    max_train_steps=80_000,
    total_train_batch_size=32,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=1,
    crop_size=640,
    image_scale=(2048, 640),
    ratio_range=(0.5, 2.0),
    cat_max_ratio=0.75,
    eval_steps=8_000,
    checkpointing_steps="8000",
    dataloader_num_workers=4,
    loss_reduction="mean_all_pixels",  # mmseg 0.x, which the authors used: ignored pixels count as 0 in the mean
    paper_miou=(50.6, 51.3),
)
# The ResNet runs share the ViT recipe but for the 512x512 crops and the (2048, 512) scale.
_ADE20K_RESNET = dataclasses.replace(_ADE20K_VIT_B16, crop_size=512, image_scale=(2048, 512))

RECIPES = {
    "ade20k-vit-b16": _ADE20K_VIT_B16,
    "ade20k-rn50": dataclasses.replace(
        _ADE20K_RESNET,
        description="DenseCLIP RN50 + Semantic FPN on ADE20K, 512x512 crops, 80k iterations (paper, Table 1)",
        paper_miou=(43.5, 44.7),
    ),
    "ade20k-rn101": dataclasses.replace(
        _ADE20K_RESNET,
        description="DenseCLIP RN101 + Semantic FPN on ADE20K, 512x512 crops, 80k iterations (paper, Table 1)",
        paper_miou=(45.1, 46.5),
    ),
    # The paper's recipe shrunk to a few minutes on 2 CPU cores for the bundled synthetic scenes and a small
    # random-weight model: a higher learning rate, and the image encoder trained at the full rate (its weights are
    # random, so there is no pre-training to preserve).
    "synthetic": Recipe(
        description="Small random-weight DenseCLIP on the bundled synthetic scenes, a few minutes on 2 CPU cores",
        learning_rate=1e-3,
        weight_decay=1e-4,
        image_encoder_lr_multiplier=1.0,
        lr_power=0.9,
        min_learning_rate=1e-6,
        num_warmup_steps=50,
        warmup_ratio=1e-6,
        max_train_steps=1_000,
        total_train_batch_size=8,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        crop_size=96,
        image_scale=(512, 128),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        eval_steps=None,
        checkpointing_steps=None,
        dataloader_num_workers=0,
        loss_reduction="mean_non_ignored",
    ),
}
DEFAULT_RECIPE_FOR_REAL_DATA = "ade20k-vit-b16"
DEFAULT_RECIPE_FOR_SYNTHETIC_DATA = "synthetic"
_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in ("description", "paper_miou"))


# ---------------------------------------------------------------------------------------------------------------------
# Command-line arguments
# ---------------------------------------------------------------------------------------------------------------------


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class SegmentationTrainingArguments:
    """Arguments of `examples/train_seg.py`. Fields left `None` take the value of the recipe (`--recipe`)."""

    # Model and data
    model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "A CLIP checkpoint (e.g. openai/clip-vit-base-patch16) or a DenseCLIP checkpoint. Default: a small "
            "DenseCLIP with RANDOM weights (works offline)."
        ),
    )
    dataset_name: str | None = field(default=None, metadata=_help("A Hub dataset with an image and a label column."))
    dataset_config_name: str | None = field(default=None, metadata=_help("The Hub dataset's configuration."))
    train_dir: str | None = field(
        default=None,
        metadata=_help("A local dataset folder: ADE20K (ADEChallengeData2016), Pascal VOC (VOC2012) or images/ + "
        "annotations/ folders."),
    )  # fmt: skip
    validation_dir: str | None = field(
        default=None, metadata=_help("The validation folder, when --train_dir holds a single split.")
    )
    image_column_name: str = field(default="image", metadata=_help("The dataset column holding the images."))
    label_column_name: str = field(default="label", metadata=_help("The dataset column holding the label maps."))
    id2label: str | None = field(default=None, metadata=_help('A JSON file {"0": "wall", ...} of class names.'))
    do_reduce_labels: bool = field(
        default=False, metadata=_help("Label 0 means 'unlabelled' (ADE20K): map 0 to 255 (ignored) and x to x - 1.")
    )
    train_val_split: float | None = field(
        default=0.15, metadata=_help("Share of the training split held out when the dataset has no validation split.")
    )
    max_train_samples: int | None = field(default=None, metadata=_help("Keep the first N training examples."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Keep the first N validation examples."))
    cache_dir: str | None = field(default=None, metadata=_help("Where to cache Hub datasets."))
    output_dir: str | None = field(
        default=None, metadata=_help("Where to write the model repository. Default: outputs/denseclip-<recipe>.")
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Start over even if --output_dir holds checkpoints of an earlier run.")
    )

    # Recipe
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A preset of the settings below: "
            + "; ".join(f"{name}: {recipe.description}" for name, recipe in RECIPES.items())
            + f". Default: {DEFAULT_RECIPE_FOR_REAL_DATA} with a dataset, "
            + f"{DEFAULT_RECIPE_FOR_SYNTHETIC_DATA} without.",
            "choices": list(RECIPES),
        },
    )
    learning_rate: float | None = field(default=None, metadata=_help("AdamW learning rate (paper: 1e-4)."))
    weight_decay: float | None = field(default=None, metadata=_help("AdamW weight decay (paper: 1e-4)."))
    image_encoder_lr_multiplier: float | None = field(
        default=None, metadata=_help("Learning-rate factor of the image encoder (paper: 0.1).")
    )
    lr_power: float | None = field(default=None, metadata=_help("Power of the poly schedule (paper: 0.9)."))
    min_learning_rate: float | None = field(default=None, metadata=_help("Final learning rate (paper: 1e-6)."))
    num_warmup_steps: int | None = field(default=None, metadata=_help("Linear warmup steps (paper: 1500)."))
    warmup_ratio: float | None = field(
        default=None, metadata=_help("Learning-rate factor at the start of the warmup (paper: 1e-6).")
    )
    max_train_steps: int | None = field(default=None, metadata=_help("Optimizer steps (paper: 80000)."))
    num_train_epochs: int | None = field(
        default=None, metadata=_help("Epochs; replaces the recipe's --max_train_steps unless that is given too.")
    )
    total_train_batch_size: int | None = field(
        default=None,
        metadata=_help("Global batch (paper: 32); sets --gradient_accumulation_steps from the device batch and the "
        "number of processes."),
    )  # fmt: skip
    per_device_train_batch_size: int | None = field(default=None, metadata=_help("Batch per device (paper: 4)."))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_help("Validation batch per device."))
    gradient_accumulation_steps: int | None = field(
        default=None, metadata=_help("Batches per optimizer step; default: from --total_train_batch_size.")
    )
    crop_size: int | None = field(default=None, metadata=_help("Training crop side (paper: 640 ViT, 512 ResNet)."))
    image_scale: list[int] | None = field(
        default=None,
        metadata=_help("LONG SHORT: keep-ratio resize bounds before the random ratio, also used for validation "
        "(paper: 2048 640)."),
    )  # fmt: skip
    ratio_range: list[float] | None = field(
        default=None, metadata=_help("MIN MAX random rescale ratio (paper: 0.5 2.0).")
    )
    cat_max_ratio: float | None = field(
        default=None, metadata=_help("Max share of one class in a random crop (paper: 0.75).")
    )
    eval_steps: int | None = field(default=None, metadata=_help("Validate every N steps (and always at the end)."))
    dataloader_num_workers: int | None = field(default=None, metadata=_help("Data loading worker processes."))
    loss_reduction: str | None = field(
        default=None,
        metadata={
            "help": "Cross-entropy mean over labelled pixels, or over all pixels, ignored ones as 0 (the authors').",
            "choices": ["mean_non_ignored", "mean_all_pixels"],
        },
    )
    seed: int = field(default=42, metadata=_help("Seed of initialization, shuffling, augmentation and dropout."))

    # Checkpoints, tracking, Hub
    checkpointing_steps: str | None = field(
        default=None, metadata=_help("Save the training state every N steps, or 'epoch'.")
    )
    checkpoints_total_limit: int | None = field(default=2, metadata=_help("Keep only the last K checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("A checkpoint folder, or 'latest' for the newest complete one in --output_dir.")
    )
    with_tracking: bool = field(default=False, metadata=_help("Log metrics to the trackers of --report_to."))
    report_to: str = field(
        default="all", metadata=_help("Trackers for --with_tracking: tensorboard, wandb, comet_ml, ... or all.")
    )
    push_to_hub: bool = field(default=False, metadata=_help("Upload the output folder to the Hub at the end."))
    hub_model_id: str | None = field(default=None, metadata=_help("Hub repository; default: the output folder name."))
    hub_token: str | None = field(default=None, metadata=_help("Hub token; default: the logged-in one."))

    def __post_init__(self):
        if self.dataset_name is not None and self.train_dir is not None:
            raise ValueError("Pass either --dataset_name or --train_dir, not both.")
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("--validation_dir needs --train_dir.")
        for name in ("train_dir", "validation_dir", "id2label"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ValueError(f"--{name} {path} does not exist.")
        if self.recipe is None:
            real_data = self.dataset_name is not None or self.train_dir is not None
            self.recipe = DEFAULT_RECIPE_FOR_REAL_DATA if real_data else DEFAULT_RECIPE_FOR_SYNTHETIC_DATA
        self._apply_recipe(RECIPES[self.recipe])
        if self.output_dir is None:
            self.output_dir = f"outputs/denseclip-{self.recipe}"
        self._validate_values()
        self._validate_checkpointing()

    def _apply_recipe(self, recipe: Recipe) -> None:
        """Fills the settings left `None` from `recipe`; an explicit `--num_train_epochs` replaces the recipe's
        `max_train_steps` and an explicit `--gradient_accumulation_steps` its `total_train_batch_size`."""
        replaced = set()
        if self.num_train_epochs is not None:
            replaced.add("max_train_steps")
        if self.gradient_accumulation_steps is not None:
            replaced.add("total_train_batch_size")
        for name in _RECIPE_FIELDS:
            if getattr(self, name) is None and name not in replaced:
                value = getattr(recipe, name)
                setattr(self, name, list(value) if isinstance(value, tuple) else value)

    def _validate_values(self) -> None:
        positive = (
            "learning_rate", "max_train_steps", "num_train_epochs", "per_device_train_batch_size",
            "per_device_eval_batch_size", "gradient_accumulation_steps", "total_train_batch_size", "crop_size",
            "eval_steps", "checkpoints_total_limit", "max_train_samples", "max_eval_samples",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be > 0, got {value}.")
        for name in ("weight_decay", "image_encoder_lr_multiplier", "min_learning_rate", "num_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}.")
        if not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"--warmup_ratio must be in (0, 1], got {self.warmup_ratio}.")
        if self.max_train_steps is not None and self.num_warmup_steps >= self.max_train_steps:
            raise ValueError(
                f"--num_warmup_steps ({self.num_warmup_steps}) must be smaller than --max_train_steps "
                f"({self.max_train_steps}): pass a shorter warmup for a short run."
            )
        if self.crop_size % 32:
            raise ValueError(
                f"--crop_size must be a multiple of 32 (the pyramid's coarsest stride), got {self.crop_size}."
            )
        if len(self.image_scale) != 2 or min(self.image_scale) <= 0:
            raise ValueError(f"--image_scale takes two positive sizes LONG SHORT, got {self.image_scale}.")
        if len(self.ratio_range) != 2 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"--ratio_range takes MIN MAX with 0 < MIN <= MAX, got {self.ratio_range}.")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"--cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}.")
        if self.train_val_split is not None and not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")

    def _validate_checkpointing(self) -> None:
        steps = self.checkpointing_steps
        if steps is not None and steps != "epoch" and not (steps.isdigit() and int(steps) > 0):
            raise ValueError(f"--checkpointing_steps must be a positive number of steps or 'epoch', got {steps!r}.")
        resume = self.resume_from_checkpoint
        if resume not in (None, "latest") and not Path(resume).is_dir():
            raise ValueError(f"--resume_from_checkpoint {resume} is neither 'latest' nor a checkpoint folder.")
        root = checkpoints_root(self.output_dir)
        has_checkpoints = root.is_dir() and any(checkpoint_step(path) is not None for path in root.iterdir())
        if has_checkpoints and resume is None and not self.overwrite_output_dir:
            raise ValueError(
                f"{self.output_dir} holds checkpoints of an earlier run: pass --resume_from_checkpoint latest to "
                "continue it, --overwrite_output_dir to start over, or another --output_dir."
            )


def parse_training_args(argv: list[str] | None = None) -> SegmentationTrainingArguments:
    """Parses `argv` (default: `sys.argv[1:]`); invalid arguments exit with the usage and a clear message."""
    parser = HfArgumentParser(SegmentationTrainingArguments, description="Train DenseCLIP for semantic segmentation.")
    try:
        (args,) = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        parser.error(str(error))
    return args


def gradient_accumulation_steps(args: SegmentationTrainingArguments, num_processes: int) -> int:
    """Batches per optimizer step: `--gradient_accumulation_steps`, else from `--total_train_batch_size`."""
    per_step = args.per_device_train_batch_size * num_processes
    if args.total_train_batch_size is None:
        return args.gradient_accumulation_steps or 1
    if args.total_train_batch_size % per_step:
        raise ValueError(
            f"--total_train_batch_size {args.total_train_batch_size} is not a multiple of "
            f"--per_device_train_batch_size {args.per_device_train_batch_size} x {num_processes} processes."
        )
    steps = args.total_train_batch_size // per_step
    if args.gradient_accumulation_steps not in (None, steps):
        raise ValueError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} contradicts --total_train_batch_size "
            f"{args.total_train_batch_size} = {args.per_device_train_batch_size} per device x {num_processes} "
            f"processes x {steps} steps: pass only one of them."
        )
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------------


def no_weight_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters trained without weight decay: normalization layers, biases, contexts and gamma."""
    names = {
        name
        for name, _ in model.named_parameters()
        if name.endswith("bias") or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY_PARAMETERS
    }
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


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def offline_model_config(
    id2label: dict[int, str], tokenizer: CLIPTokenizer | None = None, **overrides
) -> DenseClipConfig:
    """A small DenseCLIP (ViT width 64, 4 layers, patch 8; text width 32, 2 layers) for the offline default run.

    It keeps the real CLIP vocabulary (49408 tokens) so that the packaged CLIP tokenizer encodes the class names; its
    weights are random. `overrides` are further `DenseClipConfig` settings.
    """
    from . import CLIP_TOKENIZER_PATH  # the package's CLIP tokenizer files (imported late: the package imports us)

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
    name_or_path: str, id2label: dict[int, str], loss_reduction: str, crop_size: int | None
) -> DenseClipForSemanticSegmentation:
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        name_or_path, id2label=id2label, loss_reduction=loss_reduction
    )
    if crop_size is not None:
        model.resize_position_embeddings(crop_size)
    return model


def load_model(
    model_name_or_path: str | None,
    id2label: dict[int, str],
    loss_reduction: str = "mean_non_ignored",
    crop_size: int | None = None,
) -> DenseClipForSemanticSegmentation:
    """The model to train: a random [`offline_model_config`] model (no path), DenseCLIP on a CLIP checkpoint
    (`model_type` "clip", or an OpenAI/OpenCLIP checkpoint file such as `RN50.pt`; class names from `id2label`) or a
    DenseCLIP checkpoint (its labels must be `id2label`), with the cross-entropy averaged per `loss_reduction`.

    Starting from CLIP, the positional embedding is resized once to `crop_size`, as the authors do."""
    if model_name_or_path is None:
        return DenseClipForSemanticSegmentation(offline_model_config(id2label, loss_reduction=loss_reduction))
    if os.path.isfile(model_name_or_path):
        return _from_clip(model_name_or_path, id2label, loss_reduction, crop_size)
    try:
        model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    except OSError as error:
        raise ValueError(
            f"Could not load {model_name_or_path!r} ({error}). Without network access, leave out --model_name_or_path "
            "to train a small random-weight model, or pass a local folder."
        ) from error
    if model_type == "clip":
        return _from_clip(model_name_or_path, id2label, loss_reduction, crop_size)
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
    model.config.loss_reduction = loss_reduction
    return model


__all__ = [
    "RECIPES",
    "Recipe",
    "SegmentationTrainingArguments",
    "gradient_accumulation_steps",
    "load_model",
    "no_weight_decay_parameter_names",
    "offline_model_config",
    "parameter_groups",
    "parse_training_args",
    "poly_learning_rate",
    "poly_schedule_with_warmup",
]
