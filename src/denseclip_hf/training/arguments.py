"""Command-line arguments of `examples/train_seg.py`: one dataclass per concern, parsed together by `HfArgumentParser`.

| dataclass | what it holds |
|---|---|
| [`ModelArguments`] | the checkpoint to start from |
| [`DataArguments`] | the dataset (Hub, local folders, the synthetic default), its columns, class names and subsets |
| [`OptimizationArguments`] | `--recipe`; optimizer, schedule, loss, steps, batches, validation interval, seed |
| [`AugmentationArguments`] | random rescale and crop of the training images |
| [`CheckpointArguments`] | the output folder, its checkpoints, resuming |
| [`TrackingArguments`] | experiment trackers |
| [`HubArguments`] | the upload of the output folder |

The optimization settings every training script shares (`examples/train_det.py` too) are those of
[`SharedOptimizationArguments`]; each task's group adds its own and quotes its authors' values in its help texts
([`quote_recipe_values`]).

Settings left `None` take the value of the recipe: [`SegmentationTrainingArguments`] holds one dataclass of each kind,
chooses the recipe, fills those settings and then checks them. [`DataArguments`] needs no recipe and checks itself, so
that other scripts (evaluation) take the same dataset flags by adding it to their own parser.
"""

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from transformers import HfArgumentParser

from ..configuration_denseclip import DECODER_TYPES, IGNORE_INDEX, PROMPTING_TYPES, describe_choices
from ..loss_denseclip import LOSS_REDUCTIONS
from .checkpointing import checkpoint_step, checkpoints_root
from .data import SegmentationData, load_segmentation_data
from .optimization import WEIGHT_DECAY_EXEMPTIONS
from .recipes import (
    DEFAULT_RECIPE_FOR_REAL_DATA,
    RECIPE_SETTINGS,
    RECIPES,
    Recipe,
    default_recipe_name,
    recipes_help,
)

# The trackers Accelerate knows: tensorboard, wandb, comet_ml, mlflow, aim, clearml, dvclive, swanlab, trackio.
TRACKER_NAMES = tuple(LOGGER_TYPE_TO_CLASS)


def installed_trackers() -> list[str]:
    """The trackers of [`TRACKER_NAMES`] whose package is installed."""
    return [str(tracker) for tracker in get_available_trackers()]


def _help(text: str) -> dict:
    return {"help": text}


CHANNELS_LAST_HELP = (
    "Store the model's convolution weights in channels-last memory, so that its convolutions run channels-last "
    "(faster on CPU; the same results up to float rounding)."
)


def choice_metadata(text: str, choices: dict[str, str]) -> dict:
    """The `field` metadata of a flag that takes one of `choices` (names and what they mean, e.g. `PROMPTING_TYPES`):
    argparse's `choices`, and a help of `text` followed by each choice and its meaning."""
    return {"help": f"{text}. {describe_choices(choices)}.", "choices": list(choices)}


def check_interval(value: str | None, flag: str) -> None:
    """A `ValueError` unless `value` (of `--checkpointing_steps`, `--eval_steps`) is `None`, a positive number of steps
    or `epoch`."""
    if value is not None and value != "epoch" and not (value.isdigit() and int(value) > 0):
        raise ValueError(f"--{flag} must be a positive number of steps or 'epoch', got {value!r}.")


def _check_positive(arguments, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}.")


@dataclass
class ModelArguments:
    """The model to train."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "A CLIP checkpoint (e.g. openai/clip-vit-base-patch16) or a DenseCLIP checkpoint. Default: a small "
            "DenseCLIP with RANDOM weights (works offline). With --backbone_name_or_path: the CLIP checkpoint whose "
            "text tower is used (default: the small random one)."
        ),
    )
    backbone_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "Any backbone (paper Sec. 4.3, Table 5): a transformers backbone checkpoint (Hub id or folder, e.g. "
            "microsoft/resnet-50 or microsoft/swin-tiny-patch4-window7-224) as the image encoder, with a new "
            "attention pool; or the config.json of one (RANDOM weights). Default: the recipe's, else CLIP's image "
            "encoder."
        ),
    )
    decoder_type: str | None = field(
        default=None, metadata=choice_metadata("The decoder (default: the recipe's)", DECODER_TYPES)
    )
    decode_head_channels: int | None = field(
        default=None, metadata=_help("Channels of the decode head. Default: the recipe's (UperNet: 512), else 256.")
    )
    prompting_type: str | None = field(
        default=None,
        metadata=choice_metadata(
            "How the class text embeddings meet the image, for a model built from CLIP or at random (a DenseCLIP "
            "checkpoint keeps its own and must match; default: the recipe's)",
            PROMPTING_TYPES,
        ),
    )


@dataclass
class DataArguments:
    """The dataset: a Hub dataset, local folders or (neither given) the bundled synthetic scenes; checked when made."""

    _argument_group_name = "data"

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
        default=False,
        metadata=_help(f"Label 0 means 'unlabelled' (ADE20K): map 0 to {IGNORE_INDEX} (ignored) and x to x - 1."),
    )
    train_val_split: float | None = field(
        default=0.15, metadata=_help("Share of the training split held out when the dataset has no validation split.")
    )
    max_train_samples: int | None = field(default=None, metadata=_help("Keep the first N training examples."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Keep the first N validation examples."))
    cache_dir: str | None = field(default=None, metadata=_help("Where to cache Hub datasets."))

    def __post_init__(self):
        if self.dataset_name is not None and self.train_dir is not None:
            raise ValueError("Pass either --dataset_name or --train_dir, not both.")
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("--validation_dir needs --train_dir.")
        for name in ("train_dir", "validation_dir", "id2label"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ValueError(f"--{name} {path} does not exist.")
        _check_positive(self, ("max_train_samples", "max_eval_samples"))
        if self.train_val_split is not None and not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")

    @property
    def uses_real_data(self) -> bool:
        """Whether a dataset was named (a Hub dataset or a folder) rather than the synthetic default."""
        return self.dataset_name is not None or self.train_dir is not None

    def load(self, seed: int, default_id2label: dict[int, str] | None = None) -> SegmentationData:
        """The training and validation splits and class names (see [`load_segmentation_data`]); `seed` draws the
        validation share of a dataset without a validation split (`--train_val_split`); `default_id2label` names the
        classes of a dataset that does not (evaluation: the model's)."""
        return load_segmentation_data(
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            train_dir=self.train_dir,
            validation_dir=self.validation_dir,
            image_column_name=self.image_column_name,
            label_column_name=self.label_column_name,
            id2label_file=self.id2label,
            train_val_split=self.train_val_split,
            cache_dir=self.cache_dir,
            max_train_samples=self.max_train_samples,
            max_eval_samples=self.max_eval_samples,
            seed=seed,
            default_id2label=default_id2label,
        )


def recipe_value_text(value: Any) -> str:
    """A recipe value as the help texts quote it: `1e-4` (not `0.0001`), `0.001`, `80000`, `8 11` for a list."""
    if isinstance(value, (list, tuple)):
        return " ".join(recipe_value_text(item) for item in value)
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def quote_recipe_values(label: str, recipes: dict[str, Any]) -> Callable[[type], type]:
    """A class decorator for a task's argument dataclass: fills the `{authors}` mark in the help of each field with the
    value of the field in `recipes` (the authors' presets by name, e.g. `{"RetinaNet": ..., "Mask R-CNN": ...}`), as
    ` (<label>: 1e-4)` or, where the presets differ, ` (<label>: 1e-4 RetinaNet, 2e-4 Mask R-CNN)`; the mark goes
    where a preset has no such setting (or `None`). The help texts of the shared fields
    ([`SharedOptimizationArguments`]) thus quote each task's own values, from its recipes; the base keeps its marks."""

    def quote(name: str) -> str:
        values = {preset: getattr(recipe, name, None) for preset, recipe in recipes.items()}
        if any(value is None for value in values.values()):
            return ""
        texts = {preset: recipe_value_text(value) for preset, value in values.items()}
        if len(set(texts.values())) == 1:
            return f" ({label}: {next(iter(texts.values()))})"
        return f" ({label}: {', '.join(f'{text} {preset}' for preset, text in texts.items())})"

    def decorate(cls: type) -> type:
        for name, spec in list(cls.__dataclass_fields__.items()):
            help_text = spec.metadata.get("help", "")
            if "{authors}" in help_text:
                quoted = copy.copy(spec)  # the subclass's own copy: the base class and other tasks keep theirs
                quoted.metadata = MappingProxyType(
                    {**spec.metadata, "help": help_text.replace("{authors}", quote(name))}
                )
                cls.__dataclass_fields__[name] = quoted
        return cls

    return decorate


@dataclass
class SharedOptimizationArguments:
    """What the optimization group of every training script holds: `--recipe` (each task's subclass names its
    presets), the authors' AdamW and its parameter groups (`optimization.build_optimizer`), SyncBatchNorm, the linear
    warmup, steps or epochs, batches and gradient accumulation, the validation interval, data workers, the seed, the
    weights' memory layout and the CPU's handling of denormal numbers.
    Each task's subclass adds its own settings (the schedule after the warmup, the loss, clipping) and quotes its
    authors' values in the help texts (the `{authors}` marks, [`quote_recipe_values`])."""

    _argument_group_name = "recipe and optimization"

    recipe: str | None = field(default=None, metadata=_help("A preset of the settings below."))
    learning_rate: float | None = field(default=None, metadata=_help("AdamW learning rate{authors}."))
    weight_decay: float | None = field(default=None, metadata=_help("AdamW weight decay{authors}."))
    image_encoder_lr_multiplier: float | None = field(
        default=None, metadata=_help("Learning-rate factor of the image encoder{authors}.")
    )
    weight_decay_exemptions: str | None = field(
        default=None,
        metadata=choice_metadata(
            "Parameters trained without weight decay",
            {name: exemption.description for name, exemption in WEIGHT_DECAY_EXEMPTIONS.items()},
        ),
    )
    sync_batchnorm: bool = field(
        default=True,
        metadata=_help("With more than one process on GPUs, BatchNorm becomes SyncBatchNorm, as in the authors' "
        "training (norm_cfg SyncBN); --no_sync_batchnorm keeps per-process statistics."),
    )  # fmt: skip
    num_warmup_steps: int | None = field(default=None, metadata=_help("Linear warmup steps{authors}."))
    warmup_ratio: float | None = field(
        default=None, metadata=_help("Learning-rate factor at the start of the warmup{authors}.")
    )
    max_train_steps: int | None = field(
        default=None, metadata=_help("Optimizer steps{authors}; replaces --num_train_epochs when given.")
    )
    num_train_epochs: int | None = field(
        default=None,
        metadata=_help("Epochs{authors}; replaces the recipe's --max_train_steps unless that is given too."),
    )
    total_train_batch_size: int | None = field(
        default=None,
        metadata=_help("Global batch{authors}; sets --gradient_accumulation_steps from the device batch and the "
        "number of processes."),
    )  # fmt: skip
    per_device_train_batch_size: int | None = field(default=None, metadata=_help("Batch per device{authors}."))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_help("Validation batch per device."))
    gradient_accumulation_steps: int | None = field(
        default=None, metadata=_help("Batches per optimizer step; default: from --total_train_batch_size.")
    )
    eval_steps: str | None = field(
        default=None,
        metadata=_help("Validate every N steps, or at the end of every epoch with 'epoch' (and always at the end of "
        "the run){authors}."),
    )  # fmt: skip
    dataloader_num_workers: int | None = field(default=None, metadata=_help("Data loading worker processes."))
    seed: int = field(
        default=42, metadata=_help("Seed of initialization, shuffling, augmentation, samplers and dropout.")
    )
    channels_last: bool = field(default=False, metadata=_help(CHANNELS_LAST_HELP))
    flush_denormal: bool = field(
        default=True,
        metadata=_help("On CPU, float arithmetic flushes denormal numbers (below 1.2e-38) to zero during training "
        "and validation (`torch.set_flush_denormal`): on x86 they are up to ~100x slower. --no_flush_denormal keeps "
        "them."),
    )  # fmt: skip

    def validate(self) -> None:
        """Checks the shared settings once the recipe has filled them (a subclass checks its own after these)."""
        positive = (
            "learning_rate", "max_train_steps", "num_train_epochs", "per_device_train_batch_size",
            "per_device_eval_batch_size", "gradient_accumulation_steps", "total_train_batch_size",
        )  # fmt: skip
        _check_positive(self, positive)
        check_interval(self.eval_steps, "eval_steps")
        for name in ("weight_decay", "image_encoder_lr_multiplier", "num_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"--warmup_ratio must be in (0, 1], got {self.warmup_ratio}.")
        if self.max_train_steps is not None and self.num_warmup_steps >= self.max_train_steps:
            raise ValueError(
                f"--num_warmup_steps ({self.num_warmup_steps}) must be smaller than --max_train_steps "
                f"({self.max_train_steps}): pass a shorter warmup for a short run."
            )

    def resolve_gradient_accumulation_steps(self, num_processes: int) -> int:
        """Batches per optimizer step: `--gradient_accumulation_steps`, else from `--total_train_batch_size`."""
        return gradient_accumulation_steps(
            self.total_train_batch_size,
            self.per_device_train_batch_size,
            self.gradient_accumulation_steps,
            num_processes,
        )

    def resolve_eval_steps(self, steps_per_epoch: int) -> int | None:
        """The step interval of the validations during training: `--eval_steps N`, or for `epoch` the optimizer steps
        of one epoch (`steps_per_epoch`, from the dataset's length, the batch size, the processes and the
        accumulation), so that the run validates at the end of every epoch; `None`: at the end of the run only."""
        if self.eval_steps is None:
            return None
        return steps_per_epoch if self.eval_steps == "epoch" else int(self.eval_steps)


@quote_recipe_values("paper", {"": RECIPES[DEFAULT_RECIPE_FOR_REAL_DATA]})
@dataclass
class OptimizationArguments(SharedOptimizationArguments):
    """The optimization group of `examples/train_seg.py`: the shared settings, the segmentation recipes, the poly
    schedule and the loss."""

    recipe: str | None = field(default=None, metadata={"help": recipes_help(), "choices": list(RECIPES)})
    lr_power: float | None = field(default=None, metadata=_help("Power of the poly schedule{authors}."))
    min_learning_rate: float | None = field(default=None, metadata=_help("Final learning rate{authors}."))
    loss_reduction: str | None = field(
        default=None, metadata=choice_metadata("How the per-pixel cross-entropy is averaged", LOSS_REDUCTIONS)
    )

    def validate(self) -> None:
        """Checks the settings once the recipe has filled them."""
        super().validate()
        if self.min_learning_rate < 0:
            raise ValueError(f"--min_learning_rate must be >= 0, got {self.min_learning_rate}.")


@dataclass
class AugmentationArguments:
    """The random rescale and crop of the training images (see `transforms.SegmentationAugmentation`)."""

    _argument_group_name = "augmentation"

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

    def validate(self) -> None:
        """Checks the settings once the recipe has filled them."""
        _check_positive(self, ("crop_size",))
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


@dataclass
class CheckpointArguments:
    """Where the run writes (the model repository and its `checkpoints/`), how often it checkpoints, and resuming."""

    _argument_group_name = "output and checkpoints"

    output_dir: str | None = field(
        default=None, metadata=_help("Where to write the model repository. Default: outputs/denseclip-<recipe>.")
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Start over even if --output_dir holds checkpoints of an earlier run.")
    )
    checkpointing_steps: str | None = field(
        default=None, metadata=_help("Save the training state every N steps, or 'epoch'.")
    )
    checkpoints_total_limit: int | None = field(default=2, metadata=_help("Keep only the last K checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("A checkpoint folder, or 'latest' for the newest complete one in --output_dir.")
    )

    def validate(self) -> None:
        """Checks the settings once the recipe has filled them and `output_dir` is known."""
        _check_positive(self, ("checkpoints_total_limit",))
        check_interval(self.checkpointing_steps, "checkpointing_steps")
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

    @property
    def checkpoint_every_n_steps(self) -> int | None:
        """The step interval of `--checkpointing_steps N`; `None` for `epoch` or no checkpoints."""
        return None if self.checkpointing_steps in (None, "epoch") else int(self.checkpointing_steps)


@dataclass
class TrackingArguments:
    """Experiment trackers (through Accelerate); checked when made."""

    _argument_group_name = "tracking"

    with_tracking: bool = field(
        default=False, metadata=_help("Log losses, learning rate and validation metrics to the --report_to trackers.")
    )
    report_to: str = field(
        default="all",
        metadata=_help("Trackers for --with_tracking, comma-separated: tensorboard (logs in <output_dir>/runs), "
        f"{', '.join(name for name in TRACKER_NAMES if name != 'tensorboard')}; 'all': those installed; 'none'."),
    )  # fmt: skip

    def __post_init__(self):
        names = self._names()
        unknown = [name for name in names if name not in (*TRACKER_NAMES, "all", "none")]
        if unknown:
            raise ValueError(
                f"--report_to {self.report_to}: unknown tracker {unknown[0]!r}; choose from "
                f"{', '.join(TRACKER_NAMES)}, all or none."
            )
        if len(names) > 1 and ("all" in names or "none" in names):
            raise ValueError(f"--report_to {self.report_to}: 'all' and 'none' stand alone.")
        missing = [name for name in names if name in TRACKER_NAMES and name not in installed_trackers()]
        if self.with_tracking and missing:
            raise ValueError(
                f"--report_to {self.report_to}: {', '.join(missing)} is not installed: pip install "
                f"{' '.join(missing)}, or choose another tracker."
            )

    def _names(self) -> list[str]:
        return [name.strip() for name in self.report_to.split(",") if name.strip()]

    def trackers(self) -> list[str]:
        """The trackers the run logs to: none without `--with_tracking` or with `none`; for `all`, those installed."""
        names = self._names()
        if not self.with_tracking or names == ["none"]:
            return []
        return installed_trackers() if names == ["all"] else names


@dataclass
class HubArguments:
    """The upload of the output folder to the Hugging Face Hub."""

    _argument_group_name = "hub"

    push_to_hub: bool = field(default=False, metadata=_help("Upload the output folder to the Hub at the end."))
    hub_model_id: str | None = field(default=None, metadata=_help("Hub repository; default: the output folder name."))
    hub_token: str | None = field(default=None, metadata=_help("Hub token; default: the logged-in one."))


def apply_recipe(arguments, recipe, setting_groups: dict[str, str]) -> None:
    """Fills the settings of `arguments` (a task's training arguments) left `None` from `recipe`; `setting_groups`
    names the argument group of each recipe setting. An explicit `--num_train_epochs` replaces the recipe's
    `max_train_steps` and an explicit `--gradient_accumulation_steps` its `total_train_batch_size`."""
    replaced = set()
    if arguments.optimization.num_train_epochs is not None:
        replaced.add("max_train_steps")
    if arguments.optimization.gradient_accumulation_steps is not None:
        replaced.add("total_train_batch_size")
    for name, group_name in setting_groups.items():
        group = getattr(arguments, group_name)
        if name not in replaced and getattr(group, name) is None:
            value = getattr(recipe, name)
            setattr(group, name, list(value) if isinstance(value, tuple) else value)


def gradient_accumulation_steps(
    total_train_batch_size: int | None,
    per_device_train_batch_size: int,
    explicit_steps: int | None,
    num_processes: int,
) -> int:
    """Batches per optimizer step: `--gradient_accumulation_steps` (`explicit_steps`), else from
    `--total_train_batch_size`, checked against each other."""
    per_step = per_device_train_batch_size * num_processes
    if total_train_batch_size is None:
        return explicit_steps or 1
    if total_train_batch_size % per_step:
        raise ValueError(
            f"--total_train_batch_size {total_train_batch_size} is not a multiple of "
            f"--per_device_train_batch_size {per_device_train_batch_size} x {num_processes} processes."
        )
    steps = total_train_batch_size // per_step
    if explicit_steps not in (None, steps):
        raise ValueError(
            f"--gradient_accumulation_steps {explicit_steps} contradicts --total_train_batch_size "
            f"{total_train_batch_size} = {per_device_train_batch_size} per device x {num_processes} processes x "
            f"{steps} steps: pass only one of them."
        )
    return steps


class TrainingArgumentGroups:
    """What the arguments of every training script share: one dataclass field per concern (`groups`), the Hub
    repository of the trained model and the flat view for trackers. Subclasses are dataclasses whose fields are the
    argument groups, in the order of the command line."""

    @property
    def groups(self) -> tuple:
        """The dataclass instance of each concern, in the order of the command line."""
        return tuple(getattr(self, group.name) for group in fields(self))

    @property
    def hub_repo_id(self) -> str:
        """The Hub repository of the trained model: `--hub_model_id`, else the name of the output folder."""
        return self.hub.hub_model_id or Path(self.checkpoints.output_dir).absolute().name

    def to_flat_dict(self) -> dict:
        """Every flag and its value, `{"learning_rate": 1e-4, ...}` (for trackers)."""
        return {name: value for group in self.groups for name, value in vars(group).items()}


def parse_argument_groups(container: type, description: str, argv: list[str] | None = None) -> Any:
    """`container(*groups)` from `argv` (default: `sys.argv[1:]`), one argument group per field of the dataclass
    `container`; invalid arguments exit with the usage and a clear message."""
    parser = HfArgumentParser(tuple(group.type for group in fields(container)), description=description)
    try:
        groups = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
        return container(*groups)
    except ValueError as error:
        parser.error(str(error))


@dataclass
class SegmentationTrainingArguments(TrainingArgumentGroups):
    """All arguments of `examples/train_seg.py`, one dataclass per concern, completed from the recipe.

    On creation: chooses the recipe (`--recipe`, else [`default_recipe_name`]), fills every setting left `None` from
    it, defaults `output_dir` to `outputs/denseclip-<recipe>` and checks the values.
    """

    # The task in tracker logs, launch errors and the random-weights notice (see `loop.TrainingTask`).
    tracker_project: ClassVar[str] = "denseclip_semantic_segmentation"
    script: ClassVar[str] = "examples/train_seg.py"
    clip_example: ClassVar[str] = "openai/clip-vit-base-patch16"

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    optimization: OptimizationArguments = field(default_factory=OptimizationArguments)
    augmentation: AugmentationArguments = field(default_factory=AugmentationArguments)
    checkpoints: CheckpointArguments = field(default_factory=CheckpointArguments)
    tracking: TrackingArguments = field(default_factory=TrackingArguments)
    hub: HubArguments = field(default_factory=HubArguments)

    def __post_init__(self):
        if self.optimization.recipe is None:
            self.optimization.recipe = default_recipe_name(self.data.uses_real_data)
        self._apply_recipe(RECIPES[self.optimization.recipe])
        if self.checkpoints.output_dir is None:
            self.checkpoints.output_dir = f"outputs/denseclip-{self.optimization.recipe}"
        self.optimization.validate()
        self.augmentation.validate()
        self.checkpoints.validate()

    def make_task(self):
        """The segmentation parts of the training loop (`segmentation_task.SegmentationTask`)."""
        from .segmentation_task import SegmentationTask  # the task imports these arguments

        return SegmentationTask(self)

    def _apply_recipe(self, recipe: Recipe) -> None:
        apply_recipe(self, recipe, RECIPE_SETTING_GROUPS)


# The dataclass of each concern, in the order of the command line (and of `--help`).
ARGUMENT_GROUPS = tuple(group.type for group in fields(SegmentationTrainingArguments))
# Which group holds each recipe setting: {"learning_rate": "optimization", "crop_size": "augmentation", ...}.
RECIPE_SETTING_GROUPS = {
    name: group.name
    for group in fields(SegmentationTrainingArguments)
    for name in (setting.name for setting in fields(group.type))
    if name in RECIPE_SETTINGS
}


def parse_training_args(argv: list[str] | None = None) -> SegmentationTrainingArguments:
    """Parses `argv` (default: `sys.argv[1:]`); invalid arguments exit with the usage and a clear message."""
    return parse_argument_groups(SegmentationTrainingArguments, "Train DenseCLIP for semantic segmentation.", argv)


__all__ = [
    "ARGUMENT_GROUPS",
    "AugmentationArguments",
    "CheckpointArguments",
    "DataArguments",
    "HubArguments",
    "ModelArguments",
    "OptimizationArguments",
    "RECIPE_SETTING_GROUPS",
    "SegmentationTrainingArguments",
    "SharedOptimizationArguments",
    "TrainingArgumentGroups",
    "TrackingArguments",
    "apply_recipe",
    "check_interval",
    "choice_metadata",
    "gradient_accumulation_steps",
    "parse_argument_groups",
    "parse_training_args",
    "quote_recipe_values",
    "recipe_value_text",
]
