"""Command-line arguments of `examples/train_det.py`: one dataclass per concern, parsed together by `HfArgumentParser`.

| dataclass | what it holds |
|---|---|
| [`DetectionModelArguments`] | the checkpoint, the detector (RetinaNet / Mask R-CNN), DenseCLIP or CLIP |
| `DetectionTrainingDataArguments` | the dataset: a COCO folder, a Hub dataset or synthetic scenes |
| [`DetectionOptimizationArguments`] | `--recipe`; schedule, clipping; the shared settings of every task |
| [`DetectionAugmentationArguments`] | the keep-ratio resize and the horizontal flip |
| `CheckpointArguments`, `TrackingArguments`, `HubArguments` | as `examples/train_seg.py` (`arguments.py`) |

The optimization settings both training scripts share (optimizer, warmup, steps, batches, seed) are those of
`arguments.SharedOptimizationArguments`. Settings left `None` take the value of the recipe
(`recipes.DETECTION_RECIPES`), as for segmentation.
"""

from dataclasses import dataclass, field, fields
from typing import ClassVar

from .arguments import (
    CheckpointArguments,
    HubArguments,
    SharedOptimizationArguments,
    TrackingArguments,
    TrainingArgumentGroups,
    _check_positive,
    _help,
    apply_recipe,
    choice_metadata,
    parse_argument_groups,
    quote_recipe_values,
)
from .detection_data import DetectionTrainingDataArguments
from .recipes import (
    DETECTION_RECIPE_SETTINGS,
    DETECTION_RECIPES,
    default_detection_recipe_name,
    detection_recipes_help,
)

# `--model_type`: the detectors.
DETECTION_MODEL_TYPES = {
    "retinanet": "DenseClipForObjectDetection, RetinaNet (paper Table 3)",
    "maskrcnn": "DenseClipForInstanceSegmentation, Mask R-CNN with instance masks (paper Table 4)",
}
# `--prompting_type` of a detector: DenseCLIP's post-model prompting, or the CLIP baseline without text.
DETECTION_PROMPTING_TYPES = {
    "post_model": "DenseCLIP: the score map of the prompted class text embeddings joins C5, with the Eq. 8 loss",
    "none": "the CLIP baseline: the CLIP ResNet fine-tuned under the detector, no text",
}
# The authors' recipes whose values the help texts quote (`quote_recipe_values`).
_RETINANET_RECIPE, _MASKRCNN_RECIPE = "coco-retinanet-denseclip-rn50", "coco-maskrcnn-denseclip-rn50"


@dataclass
class DetectionModelArguments:
    """The detector to train."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "An OpenAI CLIP ResNet checkpoint file (RN50.pt, RN101.pt: the authors' start), a transformers CLIP "
            "folder or Hub id, or a DenseCLIP detection checkpoint (fine-tuning). Default: a small detector with "
            "RANDOM weights (works offline)."
        ),
    )
    model_type: str | None = field(
        default=None, metadata=choice_metadata("The detector (default: the recipe's)", DETECTION_MODEL_TYPES)
    )
    prompting_type: str | None = field(
        default=None,
        metadata=choice_metadata("DenseCLIP or the CLIP baseline (default: the recipe's)", DETECTION_PROMPTING_TYPES),
    )


@quote_recipe_values(
    "authors",
    {"RetinaNet": DETECTION_RECIPES[_RETINANET_RECIPE], "Mask R-CNN": DETECTION_RECIPES[_MASKRCNN_RECIPE]},
)
@dataclass
class DetectionOptimizationArguments(SharedOptimizationArguments):
    """The optimization group of `examples/train_det.py`: the shared settings, the detection recipes, the step
    schedule and gradient clipping."""

    recipe: str | None = field(
        default=None, metadata={"help": detection_recipes_help(), "choices": list(DETECTION_RECIPES)}
    )
    lr_milestones: list[int] | None = field(
        default=None,
        metadata=_help("Epochs (0-based) from which the learning rate drops by --lr_decay{authors}."),
    )
    lr_decay: float | None = field(default=None, metadata=_help("Factor of each learning-rate step{authors}."))
    max_grad_norm: float | None = field(
        default=None, metadata=_help("Clip the gradients' global L2 norm to this{authors}; 0: no clipping.")
    )
    clip_text_encoder_gradients: bool | None = field(
        default=None,
        metadata=_help("Let the CLIP text tower take gradients (at learning rate 0, so it stays unchanged) so that "
        "they count in the clipped norm, as in the authors' training; slower. Default: the recipe's (no: the tower "
        "is frozen and the clip covers the trained parameters)."),
    )  # fmt: skip

    def validate(self) -> None:
        """Checks the settings once the recipe has filled them."""
        super().validate()
        _check_positive(self, ("lr_decay",))
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"--max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}.")
        if any(milestone < 0 for milestone in self.lr_milestones) or self.lr_milestones != sorted(self.lr_milestones):
            raise ValueError(f"--lr_milestones takes increasing epochs >= 0, got {self.lr_milestones}.")

    @property
    def clips_gradients(self) -> bool:
        """Whether the run clips the gradients' norm (`--max_grad_norm` set and > 0)."""
        return bool(self.max_grad_norm)


@dataclass
class DetectionAugmentationArguments:
    """The authors' training transform: keep-ratio resize (also used for validation) and horizontal flip."""

    _argument_group_name = "augmentation"

    image_scale: list[int] | None = field(
        default=None,
        metadata=_help("LONG SHORT: keep-ratio resize bounds, training and validation (authors: 1333 800)."),
    )
    flip_probability: float | None = field(
        default=None, metadata=_help("Probability of a horizontal flip of a training image (authors: 0.5).")
    )

    def validate(self) -> None:
        """Checks the settings once the recipe has filled them."""
        if len(self.image_scale) != 2 or min(self.image_scale) <= 0:
            raise ValueError(f"--image_scale takes two positive sizes LONG SHORT, got {self.image_scale}.")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"--flip_probability must be in [0, 1], got {self.flip_probability}.")


@dataclass
class DetectionTrainingArguments(TrainingArgumentGroups):
    """All arguments of `examples/train_det.py`, one dataclass per concern, completed from the detection recipe.

    On creation: chooses the recipe (`--recipe`, else [`default_detection_recipe_name`]), fills every setting left
    `None` from it, defaults `output_dir` to `outputs/denseclip-det-<recipe>` and checks the values.
    """

    # The task in tracker logs, launch errors and the random-weights notice (see `loop.TrainingTask`).
    tracker_project: ClassVar[str] = "denseclip_object_detection"
    script: ClassVar[str] = "examples/train_det.py"
    clip_example: ClassVar[str] = "RN50.pt --recipe coco-retinanet-denseclip-rn50 --coco_dir data/coco"

    model: DetectionModelArguments = field(default_factory=DetectionModelArguments)
    data: DetectionTrainingDataArguments = field(default_factory=DetectionTrainingDataArguments)
    optimization: DetectionOptimizationArguments = field(default_factory=DetectionOptimizationArguments)
    augmentation: DetectionAugmentationArguments = field(default_factory=DetectionAugmentationArguments)
    checkpoints: CheckpointArguments = field(default_factory=CheckpointArguments)
    tracking: TrackingArguments = field(default_factory=TrackingArguments)
    hub: HubArguments = field(default_factory=HubArguments)

    def __post_init__(self):
        if self.optimization.recipe is None:
            self.optimization.recipe = default_detection_recipe_name(self.data.source != "synthetic")
        recipe = DETECTION_RECIPES[self.optimization.recipe]
        apply_recipe(self, recipe, DETECTION_RECIPE_SETTING_GROUPS)
        if self.checkpoints.output_dir is None:
            self.checkpoints.output_dir = f"outputs/denseclip-det-{self.optimization.recipe}"
        self.optimization.validate()
        self.augmentation.validate()
        self.checkpoints.validate()

    def make_task(self):
        """The detection parts of the training loop (`detection_task.DetectionTask`)."""
        from .detection_task import DetectionTask  # the task imports these arguments

        return DetectionTask(self)


# The dataclass of each concern, in the order of the command line (and of `--help`).
DETECTION_ARGUMENT_GROUPS = tuple(group.type for group in fields(DetectionTrainingArguments))
# Which group holds each detection recipe setting.
DETECTION_RECIPE_SETTING_GROUPS = {
    name: group.name
    for group in fields(DetectionTrainingArguments)
    for name in (setting.name for setting in fields(group.type))
    if name in DETECTION_RECIPE_SETTINGS
}


def parse_detection_training_args(argv: list[str] | None = None) -> DetectionTrainingArguments:
    """Parses `argv` (default: `sys.argv[1:]`); invalid arguments exit with the usage and a clear message."""
    return parse_argument_groups(
        DetectionTrainingArguments, "Train a DenseCLIP detector (RetinaNet, Mask R-CNN).", argv
    )


__all__ = [
    "DETECTION_ARGUMENT_GROUPS",
    "DETECTION_MODEL_TYPES",
    "DETECTION_PROMPTING_TYPES",
    "DETECTION_RECIPE_SETTING_GROUPS",
    "DetectionAugmentationArguments",
    "DetectionModelArguments",
    "DetectionOptimizationArguments",
    "DetectionTrainingArguments",
    "parse_detection_training_args",
]
