"""Training recipes: complete presets of the training settings, one per row of the paper that `--recipe` names.

The authors' recipe (mmseg configs of the DenseCLIP repository): AdamW with lr 1e-4 and weight decay 1e-4; the image
encoder (CLIP backbone and its pyramid) at 0.1x the learning rate; the CLIP text encoder frozen; no weight decay on
the LayerNorms of the vision-to-language decoder's layers only (mmcv's `norm` key); poly decay (power 0.9) to 1e-6
after a linear warmup of 1500 iterations starting at 1e-6 of the learning rate; 80k iterations at a global batch of
32.

A recipe is data: a new row is one more [`Recipe`] in [`RECIPES`], usually a `dataclasses.replace` of another. Every
field but `description` and `paper_miou` is also a command-line flag (see `arguments.py`) that overrides it.

The detection recipes (`examples/train_det.py`, paper Tables 3 and 4) are [`DetectionRecipe`]s in
[`DETECTION_RECIPES`] (flags: `detection_arguments.py`).
"""

import dataclasses
from dataclasses import dataclass


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
    eval_steps: str | None  # every N steps, or "epoch"; None: at the end only
    checkpointing_steps: str | None
    dataloader_num_workers: int
    loss_reduction: str
    # ADE20K validation mIoU, single-scale / multi-scale (None where the paper gives single-scale only: Table 2)
    paper_miou: tuple[float, float | None] | None = None
    weight_decay_exemptions: str = "authors"  # see `optimization.WEIGHT_DECAY_EXEMPTIONS`
    # The model (Table 5): a transformers backbone checkpoint as the image encoder, and the decoder.
    backbone_name_or_path: str | None = None
    decoder_type: str = "semantic_fpn"
    decode_head_channels: int | None = None  # None: the config's default (256, the Semantic FPN's)
    prompting_type: str = "post_model"  # Table 2: how the class text embeddings meet the image


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
    eval_steps="8000",
    checkpointing_steps="8000",
    dataloader_num_workers=4,
    loss_reduction="mean_all_pixels",  # mmseg 0.x, which the authors used: ignored pixels count as 0 in the mean
    paper_miou=(50.6, 51.3),
)
# The ResNet runs share the ViT recipe but for the 512x512 crops and the (2048, 512) scale.
_ADE20K_RESNET = dataclasses.replace(_ADE20K_VIT_B16, crop_size=512, image_scale=(2048, 512))

# Table 5 (Sec. 4.3), any backbone with the frozen CLIP text tower (`--model_name_or_path`, a CLIP checkpoint; the
# paper does not say which CLIP's): ImageNet ResNets with the Semantic FPN on the ResNet recipe above; Swin with
# UperNet (mmseg's 512 channels, no auxiliary head) on Swin's UperNet schedule, which Sec. 4.3 says it follows (AdamW,
# lr 6e-5, weight decay 0.01, poly power 1, 160k iterations at batch 16; the authors released no config for it).
_ADE20K_SWIN_UPERNET = dataclasses.replace(
    _ADE20K_RESNET,
    learning_rate=6e-5,
    weight_decay=0.01,
    image_encoder_lr_multiplier=1.0,
    lr_power=1.0,
    max_train_steps=160_000,
    total_train_batch_size=16,
    eval_steps="16000",
    checkpointing_steps="16000",
    decoder_type="upernet",
    decode_head_channels=512,
)

RECIPES = {
    "ade20k-vit-b16": _ADE20K_VIT_B16,
    "ade20k-rn50": dataclasses.replace(
        _ADE20K_RESNET,
        description="DenseCLIP RN50 + Semantic FPN on ADE20K, 512x512 crops, 80k iterations (paper, Table 1)",
        paper_miou=(43.5, 44.7),
    ),
    # Table 2, the prompting ablation on RN50 (ADE20K, single-scale mIoU): the recipe of ade20k-rn50, its prompting
    # swapped.
    "ade20k-rn50-language-only": dataclasses.replace(
        _ADE20K_RESNET,
        description="Table 2 row 3: RN50 + Semantic FPN, language-domain prompting only (learnable contexts, no "
        "context decoder), ADE20K 512x512, 80k iterations",
        prompting_type="language_only",
        paper_miou=(42.1, None),
    ),
    "ade20k-rn50-pre-model": dataclasses.replace(
        _ADE20K_RESNET,
        description="Table 2 row 4: RN50 + Semantic FPN, pre-model vision-to-language prompting (learnable queries "
        "attend to the image; the text tower runs per image), ADE20K 512x512, 80k iterations",
        prompting_type="pre_model",
        paper_miou=(42.9, None),
    ),
    # Table 1 / Table 2 row 2, "CLIP + Semantic FPN" (the authors' fpn_clipres50 / fpn_clipres101 / fpn_clipvit-b):
    # the CLIP image encoder fine-tuned under the Semantic FPN with no text at all, on the same training strategy
    # (Sec. 4.1: "We also adopt the above training strategies to our baselines").
    "ade20k-rn50-baseline": dataclasses.replace(
        _ADE20K_RESNET,
        description="Table 1 / Table 2 row 2: CLIP RN50 + Semantic FPN, no text (no score map, no identity loss), "
        "ADE20K 512x512, 80k iterations",
        prompting_type="none",
        paper_miou=(39.6, 41.6),
    ),
    "ade20k-rn101-baseline": dataclasses.replace(
        _ADE20K_RESNET,
        description="Table 1: CLIP RN101 + Semantic FPN, no text (no score map, no identity loss), ADE20K 512x512, "
        "80k iterations",
        prompting_type="none",
        paper_miou=(42.7, 44.3),
    ),
    "ade20k-vit-b16-baseline": dataclasses.replace(
        _ADE20K_VIT_B16,
        description="Table 1: CLIP ViT-B/16 + Semantic FPN, no text (no score map, no identity loss), ADE20K "
        "640x640, 80k iterations",
        prompting_type="none",
        paper_miou=(49.4, 50.3),
    ),
    "ade20k-rn101": dataclasses.replace(
        _ADE20K_RESNET,
        description="DenseCLIP RN101 + Semantic FPN on ADE20K, 512x512 crops, 80k iterations (paper, Table 1)",
        paper_miou=(45.1, 46.5),
    ),
    "ade20k-any-rn50": dataclasses.replace(
        _ADE20K_RESNET,
        description="DenseCLIP on an ImageNet ResNet-50 (microsoft/resnet-50) + Semantic FPN on ADE20K, 512x512 "
        "crops, 80k iterations (paper, Table 5; the baseline without DenseCLIP: 38.6 / 40.6)",
        paper_miou=(41.0, 43.0),
        backbone_name_or_path="microsoft/resnet-50",
    ),
    "ade20k-any-rn101": dataclasses.replace(
        _ADE20K_RESNET,
        description="DenseCLIP on an ImageNet ResNet-101 (microsoft/resnet-101) + Semantic FPN on ADE20K, 512x512 "
        "crops, 80k iterations (paper, Table 5; the baseline without DenseCLIP: 40.4 / 42.3)",
        paper_miou=(43.0, 45.2),
        backbone_name_or_path="microsoft/resnet-101",
    ),
    "ade20k-swin-t-upernet": dataclasses.replace(
        _ADE20K_SWIN_UPERNET,
        description="DenseCLIP on Swin-T (microsoft/swin-tiny-patch4-window7-224) + UperNet on ADE20K, 512x512 crops, "
        "160k iterations (paper, Table 5; the baseline without DenseCLIP: 44.5 / 45.8)",
        paper_miou=(45.4, 46.5),
        backbone_name_or_path="microsoft/swin-tiny-patch4-window7-224",
    ),
    "ade20k-swin-s-upernet": dataclasses.replace(
        _ADE20K_SWIN_UPERNET,
        description="DenseCLIP on Swin-S (microsoft/swin-small-patch4-window7-224) + UperNet on ADE20K, 512x512 "
        "crops, 160k iterations (paper, Table 5; the baseline without DenseCLIP: 47.6 / 49.5)",
        paper_miou=(48.3, 49.7),
        backbone_name_or_path="microsoft/swin-small-patch4-window7-224",
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
# The fields of a recipe that are also command-line flags (the others describe it).
RECIPE_SETTINGS = tuple(
    field.name for field in dataclasses.fields(Recipe) if field.name not in ("description", "paper_miou")
)


def default_recipe_name(uses_real_data: bool) -> str:
    """The recipe of a run without `--recipe`: the paper's ViT-B/16 ADE20K one with a dataset, else `synthetic`."""
    return DEFAULT_RECIPE_FOR_REAL_DATA if uses_real_data else DEFAULT_RECIPE_FOR_SYNTHETIC_DATA


def recipes_help() -> str:
    """The help text of `--recipe`: every preset with its description, and the default."""
    return (
        "A preset of the settings below: "
        + "; ".join(f"{name}: {recipe.description}" for name, recipe in RECIPES.items())
        + f". Default: {DEFAULT_RECIPE_FOR_REAL_DATA} with a dataset, {DEFAULT_RECIPE_FOR_SYNTHETIC_DATA} without."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Detection (`examples/train_det.py`): the authors' mmdet configs, paper Tables 3 and 4
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionRecipe:
    """A complete set of detection training settings (`examples/train_det.py --recipe`); every field but
    `description`, `clip_checkpoint` and the paper's numbers is also a command-line flag that overrides it.

    The authors' recipe (their `retinanet_*_fpn_1x_coco.py` / `mask_rcnn_*_fpn_1x_coco.py`): AdamW (lr 1e-4 RetinaNet,
    2e-4 Mask R-CNN, weight decay 1e-4) with mmcv's `custom_keys` groups (`backbone` lr x0.1, `text_encoder` lr x0,
    `norm` weight decay x0), gradient clipping at an L2 norm of 0.1, linear warmup over 500 iterations from 0.001 of
    the learning rate, x0.1 steps at epochs 8 and 11 of 12, 16 images per batch (2 per GPU x 8), 1333x800 keep-ratio
    resize, horizontal flip 0.5, batches grouped by aspect ratio."""

    description: str
    model_type: str  # "retinanet" (Table 3) or "maskrcnn" (Table 4)
    prompting_type: str  # "post_model": DenseCLIP; "none": the CLIP baseline
    learning_rate: float
    weight_decay: float
    image_encoder_lr_multiplier: float
    num_warmup_steps: int
    warmup_ratio: float
    lr_milestones: tuple[int, ...]  # epochs (0-based) from which the learning rate is multiplied by lr_decay
    lr_decay: float
    num_train_epochs: int
    total_train_batch_size: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    image_scale: tuple[int, int]  # (long, short) keep-ratio resize bounds, training and validation
    flip_probability: float
    max_grad_norm: float | None
    clip_text_encoder_gradients: bool
    eval_steps: str | None  # every N steps, or "epoch"; None: at the end only
    checkpointing_steps: str | None
    dataloader_num_workers: int
    max_train_steps: int | None = None  # None: num_train_epochs epochs
    weight_decay_exemptions: str = "authors"
    clip_checkpoint: str | None = None  # the OpenAI CLIP checkpoint of the row (`--model_name_or_path`)
    paper_box_ap: float | None = None  # COCO val2017 box AP of the paper
    paper_mask_ap: float | None = None  # COCO val2017 mask AP of the paper (Mask R-CNN)


_COCO_RETINANET = DetectionRecipe(
    description="",
    model_type="retinanet",
    prompting_type="post_model",
    learning_rate=1e-4,
    weight_decay=1e-4,
    image_encoder_lr_multiplier=0.1,
    num_warmup_steps=500,
    warmup_ratio=0.001,
    lr_milestones=(8, 11),
    lr_decay=0.1,
    num_train_epochs=12,
    total_train_batch_size=16,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=1,
    image_scale=(1333, 800),
    flip_probability=0.5,
    max_grad_norm=0.1,
    # The authors' clip also covers the text tower's gradients (their tower trains at lr 0 but takes gradients); by
    # default the tower is frozen and the clip covers the trained parameters only (docs/detection.md, "Training").
    clip_text_encoder_gradients=False,
    eval_steps="epoch",  # the authors validate (`evaluation = dict(interval=1)`) and save every epoch
    checkpointing_steps="epoch",
    dataloader_num_workers=2,
)
_COCO_MASKRCNN = dataclasses.replace(_COCO_RETINANET, model_type="maskrcnn", learning_rate=2e-4)


def _coco_row(base: DetectionRecipe, table: str, encoder: str, denseclip: bool, box: float, mask: float | None):
    detector = "RetinaNet" if base.model_type == "retinanet" else "Mask R-CNN"
    name = "DenseCLIP" if denseclip else "CLIP baseline (no text)"
    paper = f"box AP {box}" + (f", mask AP {mask}" if mask is not None else "")
    return dataclasses.replace(
        base,
        description=f"{table}: {encoder}-{'DenseCLIP' if denseclip else 'CLIP'} {detector} ({name}) on COCO, 1x "
        f"schedule (12 epochs, batch 16; paper {paper})",
        prompting_type="post_model" if denseclip else "none",
        clip_checkpoint=f"{encoder}.pt",
        paper_box_ap=box,
        paper_mask_ap=mask,
    )


DETECTION_RECIPES = {
    "coco-retinanet-denseclip-rn50": _coco_row(_COCO_RETINANET, "Table 3", "RN50", True, 37.8, None),
    "coco-retinanet-clip-rn50": _coco_row(_COCO_RETINANET, "Table 3", "RN50", False, 36.9, None),
    "coco-retinanet-denseclip-rn101": _coco_row(_COCO_RETINANET, "Table 3", "RN101", True, 41.1, None),
    "coco-retinanet-clip-rn101": _coco_row(_COCO_RETINANET, "Table 3", "RN101", False, 40.5, None),
    "coco-maskrcnn-denseclip-rn50": _coco_row(_COCO_MASKRCNN, "Table 4", "RN50", True, 40.2, 37.6),
    "coco-maskrcnn-clip-rn50": _coco_row(_COCO_MASKRCNN, "Table 4", "RN50", False, 39.3, 36.8),
    "coco-maskrcnn-denseclip-rn101": _coco_row(_COCO_MASKRCNN, "Table 4", "RN101", True, 42.6, 39.6),
    "coco-maskrcnn-clip-rn101": _coco_row(_COCO_MASKRCNN, "Table 4", "RN101", False, 42.2, 38.9),
    # The authors' recipe shrunk to a few minutes on 2 CPU cores for the bundled synthetic detection scenes and a
    # small random-weight model: a higher learning rate, the image encoder at the full rate (random weights: no
    # pre-training to preserve), small images, a short warmup and step schedule.
    "synthetic": dataclasses.replace(
        _COCO_RETINANET,
        description="Small random-weight DenseCLIP RetinaNet on the bundled synthetic detection scenes, a few "
        "minutes on 2 CPU cores",
        learning_rate=1e-3,
        image_encoder_lr_multiplier=1.0,
        num_warmup_steps=50,
        lr_milestones=(2,),
        num_train_epochs=3,
        max_train_steps=300,
        total_train_batch_size=8,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        image_scale=(256, 128),
        max_grad_norm=None,
        eval_steps=None,
        checkpointing_steps=None,
        dataloader_num_workers=0,
    ),
}
DEFAULT_DETECTION_RECIPE_FOR_REAL_DATA = "coco-retinanet-denseclip-rn50"
DEFAULT_DETECTION_RECIPE_FOR_SYNTHETIC_DATA = "synthetic"
# The fields of a detection recipe that are also command-line flags.
DETECTION_RECIPE_SETTINGS = tuple(
    field.name
    for field in dataclasses.fields(DetectionRecipe)
    if field.name not in ("description", "clip_checkpoint", "paper_box_ap", "paper_mask_ap")
)


def default_detection_recipe_name(uses_real_data: bool) -> str:
    """The recipe of a detection run without `--recipe`: RN50 DenseCLIP RetinaNet with a dataset, else `synthetic`."""
    return DEFAULT_DETECTION_RECIPE_FOR_REAL_DATA if uses_real_data else DEFAULT_DETECTION_RECIPE_FOR_SYNTHETIC_DATA


def detection_recipes_help() -> str:
    """The help text of `examples/train_det.py --recipe`: every preset with its description (the paper's AP)."""
    return (
        "A preset of the settings below: "
        + "; ".join(f"{name}: {recipe.description}" for name, recipe in DETECTION_RECIPES.items())
        + f". Default: {DEFAULT_DETECTION_RECIPE_FOR_REAL_DATA} with a dataset, "
        f"{DEFAULT_DETECTION_RECIPE_FOR_SYNTHETIC_DATA} without."
    )


__all__ = [
    "DEFAULT_DETECTION_RECIPE_FOR_REAL_DATA",
    "DEFAULT_DETECTION_RECIPE_FOR_SYNTHETIC_DATA",
    "DETECTION_RECIPES",
    "DETECTION_RECIPE_SETTINGS",
    "DEFAULT_RECIPE_FOR_REAL_DATA",
    "DEFAULT_RECIPE_FOR_SYNTHETIC_DATA",
    "RECIPES",
    "RECIPE_SETTINGS",
    "DetectionRecipe",
    "Recipe",
    "default_detection_recipe_name",
    "default_recipe_name",
    "detection_recipes_help",
    "recipes_help",
]
